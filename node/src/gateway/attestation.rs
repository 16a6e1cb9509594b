//! The gateway's attestation policy applied to a worker: insecure workers
//! only when the operator allows them; a TDX worker's document fetched,
//! appraised off the runtime, and its verdict cached by (peer key, digest)
//! (audit F1); a peer that leaves a request unanswered is not asked again
//! for [`UNANSWERED_MEMORY`].

use std::time::{Duration, Instant};

use silk_overlay::{Announcement, AttestationMode, PeerId};

use super::select::ATTESTATION_CHECKS;
use super::Gateway;
use crate::attest::{self, AttestationDocument, Hex};

/// How long a peer that left an attestation request unanswered is not asked
/// again (for the same digest).
const UNANSWERED_MEMORY: Duration = Duration::from_secs(60);
/// Most (peer, digest) pairs remembered as unanswered.
const UNANSWERED_MAX: usize = 4096;

/// The raw ed25519 key inside an ed25519 peer id.
pub fn peer_public_key(peer: &PeerId) -> Option<[u8; 32]> {
    // An identity multihash: code 0, varint length (< 128 here), the
    // protobuf-encoded public key.
    let bytes = peer.to_bytes();
    let (&[0, len], digest) = (bytes.split_first_chunk::<2>()?.0, &bytes[2..]) else {
        return None;
    };
    if usize::from(len) != digest.len() {
        return None;
    }
    let key = libp2p_identity::PublicKey::try_decode_protobuf(digest).ok()?;
    Some(key.try_into_ed25519().ok()?.to_bytes())
}

impl Gateway {
    /// Applies the attestation policy to a worker's announcement.
    pub(crate) async fn check_attestation(&self, a: &Announcement) -> Result<(), String> {
        match a.attestation_mode {
            AttestationMode::Insecure if self.allow_insecure => Ok(()),
            AttestationMode::Insecure => Err("runs in insecure attestation mode".into()),
            AttestationMode::Tdx => {
                let digest = Hex(a
                    .attestation_digest
                    .ok_or("announces tdx without a digest")?);
                let now = attest::now_unix();
                // The verdict is looked up by this peer's key and the digest:
                // the digest alone is public and proves nothing (audit F1).
                let key = peer_public_key(&a.peer_id).ok_or("peer id is not an ed25519 key")?;
                if let Some(v) = self
                    .appraiser
                    .lock()
                    .ok()
                    .and_then(|mut ap| ap.cached(&key, &digest, now))
                {
                    return if v.is_accepted() {
                        Ok(())
                    } else {
                        Err(v.to_string())
                    };
                }
                if self.unanswered(a.peer_id, digest.0) {
                    return Err("did not answer an attestation request lately".into());
                }
                let bytes = match tokio::time::timeout(
                    ATTESTATION_CHECKS,
                    self.overlay.fetch_attestation(a.peer_id, Vec::new()),
                )
                .await
                {
                    Ok(Ok(bytes)) => bytes,
                    Ok(Err(e)) => {
                        self.history.metrics().attestation("unreachable");
                        return Err(format!("attestation fetch failed: {e}"));
                    }
                    Err(_) => {
                        self.history.metrics().attestation("unreachable");
                        self.note_unanswered(a.peer_id, digest.0);
                        return Err("attestation fetch timed out".into());
                    }
                };
                let doc = AttestationDocument::decode(&bytes).map_err(|e| e.to_string())?;
                // The slow part (PCCS fetches, quote verification) runs
                // without the appraiser's lock, so it blocks no other check
                // (audit F12); only the verdict is recorded under it.
                let job = self
                    .appraiser
                    .lock()
                    .map(|ap| ap.job())
                    .map_err(|_| "appraiser lock poisoned".to_string())?;
                let outcome =
                    tokio::task::spawn_blocking(move || job.run(&doc, &key, &digest, now))
                        .await
                        .map_err(|e| e.to_string())?;
                if let Ok(mut ap) = self.appraiser.lock() {
                    ap.record(&key, &outcome, now);
                }
                let verdict = outcome.verdict;
                self.history
                    .metrics()
                    .attestation(if verdict.is_accepted() {
                        "accepted"
                    } else {
                        "rejected"
                    });
                if verdict.is_accepted() {
                    Ok(())
                } else {
                    Err(verdict.to_string())
                }
            }
        }
    }

    /// Whether `peer` left an attestation request for `digest`
    /// unanswered within [`UNANSWERED_MEMORY`].
    fn unanswered(&self, peer: PeerId, digest: [u8; 32]) -> bool {
        self.attest_unanswered
            .lock()
            .ok()
            .and_then(|m| m.get(&(peer, digest)).copied())
            .is_some_and(|t| t.elapsed() < UNANSWERED_MEMORY)
    }

    pub(crate) fn note_unanswered(&self, peer: PeerId, digest: [u8; 32]) {
        if let Ok(mut m) = self.attest_unanswered.lock() {
            if m.len() >= UNANSWERED_MAX {
                m.retain(|_, t| t.elapsed() < UNANSWERED_MEMORY);
                if m.len() >= UNANSWERED_MAX {
                    return;
                }
            }
            m.insert((peer, digest), Instant::now());
        }
    }
}

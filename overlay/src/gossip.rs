//! Signed gossip payloads and their validation.
//!
//! Two topics carry small signed messages: [`ANNOUNCE_TOPIC`] (one
//! [`Announcement`] per worker, refreshed with a growing `seq`) and
//! [`REPUTATION_TOPIC`] (opaque reputation reports). Every payload travels in a
//! [`SignedEnvelope`]: postcard bytes signed by the author's libp2p key under a
//! domain tag, so an envelope can be checked anywhere, not only on gossip.
//!
//! [`GossipBook`] is the validation policy the overlay task runs before
//! gossipsub forwards a message; it is pure (time is passed in) so it can be
//! tested without a network.
//!
//! Gossipsub runs in anonymous mode: its messages carry no author, sequence
//! number or signature of their own, and a message's id is derived from its
//! content ([`message_id`]). The envelope already names and proves its
//! author, so one signature check per message (when it would change this
//! node's state) replaces gossipsub's check of every copy received,
//! duplicates included, which pegged both cores of a 200-node mesh. A
//! message is a [`publication`]: a publication counter, then the envelope;
//! the counter makes each (re-)publication of one envelope a message of its
//! own for the duplicate filters, and is not signed, since changing it
//! changes nothing else (a relay forwards an envelope it already holds at
//! most once per rate period).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use libp2p::{gossipsub::MessageId, identity, PeerId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::OverlayError;

/// Gossipsub topic for worker announcements.
pub const ANNOUNCE_TOPIC: &str = "/silk/announce/1";
/// Gossipsub topic for reputation reports.
pub const REPUTATION_TOPIC: &str = "/silk/reputation/1";

const ANNOUNCE_DOMAIN: &[u8] = b"silk/announcement/1";
const REPUTATION_DOMAIN: &[u8] = b"silk/reputation/1";

/// How a worker proves what runs on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttestationMode {
    /// Inside an Intel TDX trust domain; quotes are available over `/silk/attest/1.0.0`.
    Tdx,
    /// No confidential computing (laptops, CI, local testnets).
    Insecure,
}

/// What a worker tells the mesh about itself. Small by design: it travels on gossip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The worker; must equal the key that signs the envelope.
    #[serde(with = "peer_id_bytes")]
    pub peer_id: PeerId,
    /// Model ids served.
    pub models: Vec<String>,
    /// The context window, in tokens, of each model in `models`, in the
    /// same order (a shorter list leaves the rest unknown). A gateway
    /// refuses a request that fits none of them before it sends the job.
    pub context_windows: Vec<u32>,
    /// Jobs it can admit right now.
    pub free_slots: u32,
    /// Jobs waiting in its queue.
    pub queue_depth: u32,
    /// Measured decode speed, in tokens per second × 1000.
    pub decode_tokens_per_s_milli: u64,
    /// Price coefficient × 1000 (multiplies the base per-token price).
    pub price_coefficient_milli: u64,
    /// Attestation mode.
    pub attestation_mode: AttestationMode,
    /// Digest of the attestation evidence (e.g. SHA-256 of the quote), if any.
    pub attestation_digest: Option<[u8; 32]>,
    /// Sequence number; each new announcement of a peer must carry a larger one.
    pub seq: u64,
    /// Unix time in milliseconds after which the announcement is void.
    pub expires_at_ms: u64,
    /// Where the worker is paid (silk puts a TON wallet address here); opaque
    /// to the overlay, which only carries it signed with the rest.
    pub payout: Option<String>,
    /// The worker's network coordinate ([`crate::vivaldi`]), from which a
    /// gateway estimates its RTT to the worker without a connection. The
    /// overlay fills it in when it publishes the announcement.
    pub coordinate: Option<crate::vivaldi::Coordinate>,
}

/// A payload signed by its author's libp2p key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// The author's public key, protobuf-encoded (libp2p's format).
    pub public_key: Vec<u8>,
    /// The signed bytes (postcard-encoded for announcements).
    pub payload: Vec<u8>,
    /// Signature over `domain || payload`.
    pub signature: Vec<u8>,
}

/// Why an envelope or announcement failed verification.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The bytes are not an envelope.
    #[error("not a signed envelope")]
    Undecodable,
    /// The public key does not decode.
    #[error("bad public key")]
    BadKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The payload is not an announcement.
    #[error("payload is not an announcement")]
    BadPayload,
    /// The announcement names a peer other than its signer.
    #[error("claims to be {claimed}, but another key signed it")]
    SignerMismatch {
        /// The peer id inside the payload.
        claimed: PeerId,
    },
}

/// Most models one announcement may list.
pub const MAX_MODELS: usize = 16;
/// Longest model id, in bytes.
pub const MAX_MODEL_ID_BYTES: usize = 256;
/// Largest context window an announcement may claim, in tokens.
pub const MAX_CONTEXT_WINDOW: u32 = 1 << 24;
/// Most free slots an announcement may claim.
pub const MAX_FREE_SLOTS: u32 = 4096;
/// Longest queue an announcement may report.
pub const MAX_QUEUE_DEPTH: u32 = 1 << 20;
/// Fastest decode an announcement may claim, tokens/s × 1000 (a million
/// tokens per second).
pub const MAX_DECODE_MILLI: u64 = 1_000_000_000;
/// Longest payout address, in bytes.
pub const MAX_PAYOUT_BYTES: usize = 128;

impl Announcement {
    /// Checks every field against its bound. Routing ranks workers by what
    /// they announce, so a value no real worker has (a million free slots,
    /// a decode speed past any hardware, a price the payments cannot
    /// express) is refused before it is stored or forwarded.
    pub fn check_ranges(&self) -> Result<(), String> {
        if self.models.is_empty() || self.models.len() > MAX_MODELS {
            return Err(format!(
                "{} models listed; 1 to {MAX_MODELS} are allowed",
                self.models.len()
            ));
        }
        if let Some(m) = self
            .models
            .iter()
            .find(|m| m.is_empty() || m.len() > MAX_MODEL_ID_BYTES)
        {
            return Err(format!(
                "a model id of {} bytes; 1 to {MAX_MODEL_ID_BYTES} are allowed",
                m.len()
            ));
        }
        if self.context_windows.len() > self.models.len() {
            return Err(format!(
                "{} context windows for {} models",
                self.context_windows.len(),
                self.models.len()
            ));
        }
        if let Some(w) = self
            .context_windows
            .iter()
            .find(|&&w| w == 0 || w > MAX_CONTEXT_WINDOW)
        {
            return Err(format!(
                "a context window of {w} tokens; 1 to {MAX_CONTEXT_WINDOW} are allowed"
            ));
        }
        if self.free_slots > MAX_FREE_SLOTS {
            return Err(format!(
                "{} free slots; at most {MAX_FREE_SLOTS}",
                self.free_slots
            ));
        }
        if self.queue_depth > MAX_QUEUE_DEPTH {
            return Err(format!(
                "a queue of {}; at most {MAX_QUEUE_DEPTH}",
                self.queue_depth
            ));
        }
        if self.decode_tokens_per_s_milli > MAX_DECODE_MILLI {
            return Err(format!(
                "a decode speed of {} tokens/s; at most {}",
                self.decode_tokens_per_s_milli / 1000,
                MAX_DECODE_MILLI / 1000
            ));
        }
        if self.price_coefficient_milli > u64::from(u32::MAX) {
            return Err(format!(
                "a price coefficient of {} (× 1000); at most {}",
                self.price_coefficient_milli,
                u32::MAX
            ));
        }
        if self
            .payout
            .as_ref()
            .is_some_and(|p| p.len() > MAX_PAYOUT_BYTES)
        {
            return Err(format!(
                "a payout address of more than {MAX_PAYOUT_BYTES} bytes"
            ));
        }
        if let Some(c) = &self.coordinate {
            c.check_ranges()?;
        }
        Ok(())
    }

    /// The announced context window of `model`, if it is served and the
    /// worker said.
    pub fn context_window(&self, model: &str) -> Option<u32> {
        let i = self.models.iter().position(|m| m == model)?;
        self.context_windows.get(i).copied()
    }
}

impl SignedEnvelope {
    fn sign(
        keypair: &identity::Keypair,
        domain: &[u8],
        payload: Vec<u8>,
    ) -> Result<Self, OverlayError> {
        let signature = keypair.sign(&signing_bytes(domain, &payload))?;
        Ok(Self {
            public_key: keypair.public().encode_protobuf(),
            payload,
            signature,
        })
    }

    fn verify(&self, domain: &[u8]) -> Result<PeerId, EnvelopeError> {
        let key = identity::PublicKey::try_decode_protobuf(&self.public_key)
            .map_err(|_| EnvelopeError::BadKey)?;
        if !key.verify(&signing_bytes(domain, &self.payload), &self.signature) {
            return Err(EnvelopeError::BadSignature);
        }
        Ok(key.to_peer_id())
    }

    /// Signs `announcement` with `keypair`.
    pub fn sign_announcement(
        keypair: &identity::Keypair,
        announcement: &Announcement,
    ) -> Result<Self, OverlayError> {
        Self::sign(keypair, ANNOUNCE_DOMAIN, postcard::to_stdvec(announcement)?)
    }

    /// Checks the signature and that the signer is the announced peer.
    pub fn verify_announcement(&self) -> Result<Announcement, EnvelopeError> {
        let signer = self.verify(ANNOUNCE_DOMAIN)?;
        let announcement: Announcement =
            postcard::from_bytes(&self.payload).map_err(|_| EnvelopeError::BadPayload)?;
        if announcement.peer_id != signer {
            return Err(EnvelopeError::SignerMismatch {
                claimed: announcement.peer_id,
            });
        }
        Ok(announcement)
    }

    /// Signs an opaque reputation report with `keypair`.
    pub fn sign_reputation(
        keypair: &identity::Keypair,
        report: Vec<u8>,
    ) -> Result<Self, OverlayError> {
        Self::sign(keypair, REPUTATION_DOMAIN, report)
    }

    /// Checks the signature of a reputation report and returns its author.
    pub fn verify_reputation(&self) -> Result<PeerId, EnvelopeError> {
        self.verify(REPUTATION_DOMAIN)
    }

    /// Wire bytes (postcard).
    pub fn to_bytes(&self) -> Result<Vec<u8>, OverlayError> {
        Ok(postcard::to_stdvec(self)?)
    }

    /// Parses wire bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        postcard::from_bytes(bytes).map_err(|_| EnvelopeError::Undecodable)
    }
}

fn signing_bytes(domain: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(domain.len() + 1 + payload.len());
    out.extend_from_slice(domain);
    out.push(0);
    out.extend_from_slice(payload);
    out
}

mod peer_id_bytes {
    use libp2p::PeerId;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(peer: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&peer.to_bytes())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        PeerId::from_bytes(&bytes).map_err(D::Error::custom)
    }
}

/// Bytes of the publication counter in front of each gossiped envelope.
pub const COUNTER_BYTES: usize = 8;
/// Bytes of a message id: a prefix of the content's SHA-256.
const MESSAGE_ID_BYTES: usize = 20;

/// The gossip message for the `counter`-th publication of `envelope`
/// (its wire bytes): the counter, big-endian, then the envelope.
pub fn publication(counter: u64, envelope: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(COUNTER_BYTES + envelope.len());
    out.extend_from_slice(&counter.to_be_bytes());
    out.extend_from_slice(envelope);
    out
}

/// The envelope's bytes inside a publication; `None` when it is too short.
pub(crate) fn envelope_of(message: &[u8]) -> Option<&[u8]> {
    message.get(COUNTER_BYTES..)
}

/// A gossip message's id: a prefix of the SHA-256 of its bytes, so every
/// copy of one publication has the same id whoever relays it.
pub(crate) fn message_id(data: &[u8]) -> MessageId {
    MessageId::new(&Sha256::digest(data)[..MESSAGE_ID_BYTES])
}

/// What to tell gossipsub about a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict<T> {
    /// Valid: keep it and forward it.
    Accept(T),
    /// A re-publication of what this node already holds: forward it to
    /// peers that may have missed it, nothing changes here.
    Forward,
    /// Not worth forwarding, but not proof of misbehaviour (duplicates, races, floods).
    Ignore(&'static str),
    /// Invalid: drop it and penalise `author` when the envelope proved
    /// who wrote the invalid content, else the peer that sent it (an honest
    /// relay checks envelopes before forwarding, so junk comes from its
    /// sender).
    Reject {
        /// Why, as a short fixed code (a metrics label).
        kind: &'static str,
        /// Why, in full.
        reason: String,
        /// The signed author of the invalid content, when known.
        author: Option<PeerId>,
    },
}

impl<T> Verdict<T> {
    /// The same verdict with an accepted value turned into another.
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Verdict<U> {
        match self {
            Verdict::Accept(t) => Verdict::Accept(f(t)),
            Verdict::Forward => Verdict::Forward,
            Verdict::Ignore(r) => Verdict::Ignore(r),
            Verdict::Reject {
                kind,
                reason,
                author,
            } => Verdict::Reject {
                kind,
                reason,
                author,
            },
        }
    }

    /// A rejection of a message whose author is not proven.
    fn junk(kind: &'static str, reason: impl Into<String>) -> Self {
        Verdict::Reject {
            kind,
            reason: reason.into(),
            author: None,
        }
    }
}

/// A token bucket per origin.
#[derive(Clone, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The latest valid announcement of a peer and when it arrived.
#[derive(Clone, Debug)]
struct Latest {
    announcement: Announcement,
    received: Instant,
    /// The envelope as it arrived (empty for this node's own).
    wire: Vec<u8>,
    /// When a re-publication of it was last forwarded.
    forwarded: Instant,
}

/// Validation state: the latest valid announcement per peer, per-origin rate
/// limits. Every map is capped at `max_peers`; once full, a newcomer takes
/// the place of the entry heard from least recently (never this node's
/// own), so peers that flooded the table and went quiet cannot keep a new
/// worker out (audit F15).
#[derive(Debug)]
pub(crate) struct GossipBook {
    me: PeerId,
    latest: HashMap<PeerId, Latest>,
    buckets: HashMap<PeerId, Bucket>,
    max_peers: usize,
    max_announcement_size: usize,
    max_reputation_size: usize,
    max_ttl_ms: u64,
    burst: f64,
    period: Duration,
}

impl GossipBook {
    pub(crate) fn new(config: &crate::OverlayConfig) -> Self {
        Self {
            me: config.keypair.public().to_peer_id(),
            latest: HashMap::new(),
            buckets: HashMap::new(),
            max_peers: config.max_tracked_peers,
            max_announcement_size: config.max_announcement_size,
            max_reputation_size: config.max_reputation_size,
            max_ttl_ms: u64::try_from(config.max_announcement_ttl.as_millis()).unwrap_or(u64::MAX),
            burst: f64::from(config.gossip_rate_burst),
            period: config.gossip_rate_period,
        }
    }

    /// Validates an announcement publication that arrived on gossip (see
    /// [`publication`]). Whoever relayed it, the envelope's signature
    /// decides whose it is.
    pub(crate) fn check_announcement(
        &mut self,
        message: &[u8],
        now_ms: u64,
        now: Instant,
    ) -> Verdict<Announcement> {
        let Some(bytes) = envelope_of(message) else {
            return Verdict::junk("malformed", "message shorter than its publication counter");
        };
        if bytes.len() > self.max_announcement_size {
            return Verdict::junk(
                "oversized",
                format!("announcement of {} bytes", bytes.len()),
            );
        }
        let envelope = match SignedEnvelope::from_bytes(bytes) {
            Ok(e) => e,
            Err(e) => return Verdict::junk("malformed", e.to_string()),
        };
        // Cheap checks on the claimed content first; the signature is
        // verified only for messages that would change our state.
        let claimed: Announcement = match postcard::from_bytes(&envelope.payload) {
            Ok(a) => a,
            Err(_) => return Verdict::junk("malformed", EnvelopeError::BadPayload.to_string()),
        };
        if let Some(prev) = self.latest.get_mut(&claimed.peer_id) {
            if claimed.seq < prev.announcement.seq {
                return Verdict::Ignore("sequence number older than the last seen");
            }
            if claimed.seq == prev.announcement.seq {
                // An author re-publishes its announcement, same seq, for
                // peers that joined after it went out. Those peers may hear
                // it only through relays like this node, so an exact copy
                // of what was accepted is forwarded (at most once per rate
                // period per author: copies also arrive over several
                // paths). Anything else with the same seq is dropped.
                if bytes != prev.wire.as_slice() {
                    return Verdict::Ignore("sequence number not newer than the last seen");
                }
                if prev.announcement.expires_at_ms <= now_ms {
                    return Verdict::Ignore("expired announcement");
                }
                if now.saturating_duration_since(prev.forwarded) < self.period {
                    return Verdict::Ignore("re-publication forwarded moments ago");
                }
                prev.forwarded = now;
                return Verdict::Forward;
            }
        }
        // Time checks depend on this node's clock and on how long the
        // message took to get here: an announcement valid at the previous
        // hop may have expired since, and a node whose clock is off would
        // see every honest one as invalid. Not proof of misbehaviour, so
        // ignored, never rejected (audit F15).
        if claimed.expires_at_ms <= now_ms {
            return Verdict::Ignore("expired announcement");
        }
        if claimed.expires_at_ms > now_ms.saturating_add(self.max_ttl_ms) {
            return Verdict::Ignore("announcement expires too far in the future");
        }
        let announcement = match envelope.verify_announcement() {
            Ok(a) => a,
            Err(e) => return Verdict::junk("invalid envelope", e.to_string()),
        };
        // Signed by its author, so out-of-range content is the author's own
        // doing: refused and penalised, never stored or forwarded.
        if let Err(reason) = announcement.check_ranges() {
            return Verdict::Reject {
                kind: "out of range",
                reason: format!("out of range: {reason}"),
                author: Some(announcement.peer_id),
            };
        }
        if !self.take_token(announcement.peer_id, now) {
            return Verdict::Ignore("rate limit");
        }
        if !self.latest.contains_key(&announcement.peer_id) {
            self.make_room(now_ms);
        }
        self.latest.insert(
            announcement.peer_id,
            Latest {
                announcement: announcement.clone(),
                received: now,
                wire: bytes.to_vec(),
                forwarded: now,
            },
        );
        Verdict::Accept(announcement)
    }

    /// Validates a reputation report publication; returns its author and
    /// payload.
    pub(crate) fn check_reputation(
        &mut self,
        message: &[u8],
        now: Instant,
    ) -> Verdict<(PeerId, Vec<u8>)> {
        let Some(bytes) = envelope_of(message) else {
            return Verdict::junk("malformed", "message shorter than its publication counter");
        };
        if bytes.len() > self.max_reputation_size {
            return Verdict::junk(
                "oversized",
                format!("reputation report of {} bytes", bytes.len()),
            );
        }
        let envelope = match SignedEnvelope::from_bytes(bytes) {
            Ok(e) => e,
            Err(e) => return Verdict::junk("malformed", e.to_string()),
        };
        let author = match envelope.verify_reputation() {
            Ok(a) => a,
            Err(e) => return Verdict::junk("invalid envelope", e.to_string()),
        };
        if !self.take_token(author, now) {
            return Verdict::Ignore("rate limit");
        }
        Verdict::Accept((author, envelope.payload))
    }

    /// Records our own announcement (gossipsub does not deliver own messages).
    pub(crate) fn insert_own(&mut self, announcement: Announcement) {
        self.latest.insert(
            announcement.peer_id,
            Latest {
                announcement,
                received: Instant::now(),
                wire: Vec::new(),
                forwarded: Instant::now(),
            },
        );
    }

    /// The coordinate `peer` announced last, if any.
    pub(crate) fn coordinate(&self, peer: &PeerId) -> Option<&crate::vivaldi::Coordinate> {
        self.latest.get(peer)?.announcement.coordinate.as_ref()
    }

    /// The latest seq seen from `peer`.
    #[cfg(test)]
    pub(crate) fn last_seq(&self, peer: &PeerId) -> Option<u64> {
        self.latest.get(peer).map(|l| l.announcement.seq)
    }

    /// Unexpired announcements.
    pub(crate) fn current(&self, now_ms: u64) -> Vec<Announcement> {
        self.latest
            .values()
            .map(|l| &l.announcement)
            .filter(|a| a.expires_at_ms > now_ms)
            .cloned()
            .collect()
    }

    /// Drops expired announcements and idle buckets.
    pub(crate) fn prune(&mut self, now_ms: u64, now: Instant) {
        self.latest
            .retain(|_, l| l.announcement.expires_at_ms > now_ms);
        let full_after = self.period.mul_f64(self.burst);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < full_after);
    }

    /// Makes room for one more announcement: drops expired ones, then the
    /// one heard from least recently (not this node's own).
    fn make_room(&mut self, now_ms: u64) {
        if self.latest.len() < self.max_peers {
            return;
        }
        self.latest
            .retain(|_, l| l.announcement.expires_at_ms > now_ms);
        if self.latest.len() < self.max_peers {
            return;
        }
        let me = self.me;
        if let Some(stalest) = self
            .latest
            .iter()
            .filter(|(p, _)| **p != me)
            .min_by_key(|(_, l)| l.received)
            .map(|(p, _)| *p)
        {
            self.latest.remove(&stalest);
        }
    }

    fn take_token(&mut self, peer: PeerId, now: Instant) -> bool {
        if !self.buckets.contains_key(&peer) && self.buckets.len() >= self.max_peers {
            // The bucket used least recently goes: a peer that comes back
            // after that starts full, which a full bucket also is once it
            // has been idle for `burst` periods.
            if let Some(idlest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(p, _)| *p)
            {
                self.buckets.remove(&idlest);
            }
        }
        let (burst, period) = (self.burst, self.period);
        let bucket = self.buckets.entry(peer).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let refill =
            now.saturating_duration_since(bucket.last).as_secs_f64() / period.as_secs_f64();
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn announcement(keypair: &identity::Keypair, seq: u64) -> Announcement {
        Announcement {
            peer_id: keypair.public().to_peer_id(),
            models: vec!["smollm2-135m".into()],
            context_windows: vec![8192],
            free_slots: 2,
            queue_depth: 0,
            decode_tokens_per_s_milli: 40_000,
            price_coefficient_milli: 1_000,
            attestation_mode: AttestationMode::Insecure,
            attestation_digest: None,
            seq,
            expires_at_ms: NOW_MS + 60_000,
            payout: None,
            coordinate: None,
        }
    }

    fn book() -> GossipBook {
        let kp = identity::Keypair::ed25519_from_bytes([9u8; 32]).expect("key");
        GossipBook::new(&crate::OverlayConfig::new(kp, Vec::new()))
    }

    /// `a` signed by `keypair`, as its first publication.
    fn wire(keypair: &identity::Keypair, a: &Announcement) -> Vec<u8> {
        publication(0, &envelope(keypair, a))
    }

    fn envelope(keypair: &identity::Keypair, a: &Announcement) -> Vec<u8> {
        SignedEnvelope::sign_announcement(keypair, a)
            .and_then(|e| e.to_bytes())
            .expect("sign")
    }

    #[test]
    fn accepts_then_ignores_stale_seq() {
        let kp = identity::Keypair::ed25519_from_bytes([1u8; 32]).expect("key");
        let mut book = book();
        let now = Instant::now();
        let a5 = wire(&kp, &announcement(&kp, 5));
        assert!(matches!(
            book.check_announcement(&a5, NOW_MS, now),
            Verdict::Accept(_)
        ));
        assert!(matches!(
            book.check_announcement(&a5, NOW_MS, now),
            Verdict::Ignore(_)
        ));
        let a4 = wire(&kp, &announcement(&kp, 4));
        assert!(matches!(
            book.check_announcement(&a4, NOW_MS, now),
            Verdict::Ignore(_)
        ));
        let a6 = wire(&kp, &announcement(&kp, 6));
        assert!(matches!(
            book.check_announcement(&a6, NOW_MS, now),
            Verdict::Accept(_)
        ));
        assert_eq!(book.last_seq(&kp.public().to_peer_id()), Some(6));
    }

    /// Routing trusts what workers announce: values no real worker has are
    /// refused (and their author penalised) before they are stored.
    /// Before, any value was stored: a worker claiming 4 billion free slots
    /// and a decode speed of 18 quintillion tokens/s was ranked first for
    /// every job.
    #[test]
    fn out_of_range_announcements_are_rejected() {
        let kp = identity::Keypair::ed25519_from_bytes([1u8; 32]).expect("key");
        let now = Instant::now();
        type Break = Box<dyn Fn(&mut Announcement)>;
        let cases: Vec<(&str, Break)> = vec![
            ("no models", Box::new(|a| a.models.clear())),
            (
                "too many models",
                Box::new(|a| a.models = vec!["m".into(); MAX_MODELS + 1]),
            ),
            (
                "long model id",
                Box::new(|a| a.models = vec!["m".repeat(MAX_MODEL_ID_BYTES + 1)]),
            ),
            (
                "more windows than models",
                Box::new(|a| a.context_windows = vec![8192, 8192]),
            ),
            ("zero window", Box::new(|a| a.context_windows = vec![0])),
            (
                "huge window",
                Box::new(|a| a.context_windows = vec![MAX_CONTEXT_WINDOW + 1]),
            ),
            ("free slots", Box::new(|a| a.free_slots = u32::MAX)),
            ("queue", Box::new(|a| a.queue_depth = u32::MAX)),
            (
                "speed",
                Box::new(|a| a.decode_tokens_per_s_milli = u64::MAX),
            ),
            (
                "price",
                Box::new(|a| a.price_coefficient_milli = u64::from(u32::MAX) + 1),
            ),
            (
                "payout",
                Box::new(|a| a.payout = Some("x".repeat(MAX_PAYOUT_BYTES + 1))),
            ),
        ];
        for (seq, (name, break_it)) in (1u64..).zip(cases) {
            let mut book = book();
            let mut a = announcement(&kp, seq);
            break_it(&mut a);
            assert!(a.check_ranges().is_err(), "{name}");
            let verdict = book.check_announcement(&wire(&kp, &a), NOW_MS, now);
            // Signed, so its author is to blame, whoever relayed it.
            assert!(
                matches!(verdict, Verdict::Reject { author: Some(p), .. } if p == kp.public().to_peer_id()),
                "{name}: {verdict:?}"
            );
            assert_eq!(book.last_seq(&kp.public().to_peer_id()), None, "{name}");
        }
        // The bounds themselves are allowed.
        let mut a = announcement(&kp, 100);
        a.models = vec!["m".repeat(MAX_MODEL_ID_BYTES); 2];
        a.context_windows = vec![MAX_CONTEXT_WINDOW];
        a.free_slots = MAX_FREE_SLOTS;
        a.queue_depth = MAX_QUEUE_DEPTH;
        a.decode_tokens_per_s_milli = MAX_DECODE_MILLI;
        a.price_coefficient_milli = u64::from(u32::MAX);
        assert_eq!(a.check_ranges(), Ok(()));
    }

    /// An author re-publishes its announcement with the same seq for peers
    /// that joined later; those behind a relay hear it only if the relay
    /// forwards the copy. Before, the relay ignored it as "not newer", so a
    /// late joiner reached only through relays never learnt of a worker
    /// until its next seq (the flaky overlay convergence test).
    #[test]
    fn an_exact_republication_is_forwarded_once_per_period() {
        let kp = identity::Keypair::ed25519_from_bytes([1u8; 32]).expect("key");
        let mut book = book();
        let now = Instant::now();
        let a5 = wire(&kp, &announcement(&kp, 5));
        assert!(matches!(
            book.check_announcement(&a5, NOW_MS, now),
            Verdict::Accept(_)
        ));
        // The same copy over another path, at once: not forwarded again.
        assert!(matches!(
            book.check_announcement(&a5, NOW_MS, now),
            Verdict::Ignore(_)
        ));
        // The author's re-publication a period later (the same envelope
        // under its next publication counter): forwarded, once, whatever
        // the counter.
        let later = now + book.period;
        let again = publication(1, &envelope(&kp, &announcement(&kp, 5)));
        assert_eq!(
            book.check_announcement(&again, NOW_MS + 1_000, later),
            Verdict::Forward
        );
        let relabelled = publication(2, &envelope(&kp, &announcement(&kp, 5)));
        assert!(matches!(
            book.check_announcement(&relabelled, NOW_MS + 1_000, later),
            Verdict::Ignore(_)
        ));
        // Other content under the same seq is never forwarded.
        let mut other = announcement(&kp, 5);
        other.free_slots = 0;
        let other = wire(&kp, &other);
        assert!(matches!(
            book.check_announcement(&other, NOW_MS + 2_000, later + book.period),
            Verdict::Ignore(_)
        ));
        // Nor is an expired one.
        assert!(matches!(
            book.check_announcement(&a5, NOW_MS + 60_000, later + 2 * book.period),
            Verdict::Ignore(_)
        ));
        assert_eq!(book.last_seq(&kp.public().to_peer_id()), Some(5));
    }

    #[test]
    fn rejects_forgeries_and_expired() {
        let kp = identity::Keypair::ed25519_from_bytes([1u8; 32]).expect("key");
        let other = identity::Keypair::ed25519_from_bytes([2u8; 32]).expect("key");
        let mut book = book();
        let now = Instant::now();
        // Signed by another key: junk, whose author nothing proves, so
        // the peer that sent it is to blame.
        let forged = wire(&other, &announcement(&kp, 1));
        assert!(matches!(
            book.check_announcement(&forged, NOW_MS, now),
            Verdict::Reject { author: None, .. }
        ));
        // Tampered payload.
        let genuine = envelope(&kp, &announcement(&kp, 1));
        let mut env = SignedEnvelope::from_bytes(&genuine).expect("decode");
        if let Some(b) = env.payload.last_mut() {
            *b ^= 1;
        }
        let tampered = publication(0, &env.to_bytes().expect("encode"));
        assert!(matches!(
            book.check_announcement(&tampered, NOW_MS, now),
            Verdict::Reject { author: None, .. }
        ));
        // Shorter than the publication counter.
        assert!(matches!(
            book.check_announcement(&genuine[..COUNTER_BYTES - 1], NOW_MS, now),
            Verdict::Reject { author: None, .. }
        ));
        // Garbage.
        assert!(matches!(
            book.check_announcement(&publication(0, b"\xff\x00junk"), NOW_MS, now),
            Verdict::Reject { author: None, .. }
        ));
        assert_eq!(book.last_seq(&kp.public().to_peer_id()), None);
        // A genuine envelope is its author's whoever relays it.
        assert!(matches!(
            book.check_announcement(&publication(7, &genuine), NOW_MS, now),
            Verdict::Accept(a) if a.peer_id == kp.public().to_peer_id()
        ));
        // Expired, or too far ahead: this node's clock decides, so the
        // message is dropped without blaming whoever relayed it (F15;
        // these were rejections before).
        let mut old = announcement(&kp, 2);
        old.expires_at_ms = NOW_MS - 1;
        assert_eq!(
            book.check_announcement(&wire(&kp, &old), NOW_MS, now),
            Verdict::Ignore("expired announcement")
        );
        let mut ahead = announcement(&kp, 3);
        ahead.expires_at_ms = NOW_MS + 3_600_000;
        assert_eq!(
            book.check_announcement(&wire(&kp, &ahead), NOW_MS, now),
            Verdict::Ignore("announcement expires too far in the future")
        );
    }

    #[test]
    fn rate_limits_per_origin() {
        let kp = identity::Keypair::ed25519_from_bytes([1u8; 32]).expect("key");
        let mut book = book();
        let now = Instant::now();
        let burst = crate::OverlayConfig::new(kp.clone(), Vec::new()).gossip_rate_burst as u64;
        for seq in 1..=burst {
            let a = wire(&kp, &announcement(&kp, seq));
            assert!(matches!(
                book.check_announcement(&a, NOW_MS, now),
                Verdict::Accept(_)
            ));
        }
        let a = wire(&kp, &announcement(&kp, burst + 1));
        assert_eq!(
            book.check_announcement(&a, NOW_MS, now),
            Verdict::Ignore("rate limit")
        );
        let later = now + Duration::from_secs(2);
        assert!(matches!(
            book.check_announcement(&a, NOW_MS, later),
            Verdict::Accept(_)
        ));
    }

    /// Audit F15: once Sybils filled the announcement table (and the rate
    /// buckets), every new worker was ignored with "announcement table
    /// full" (or "rate limit") until their entries expired. Now the entry
    /// heard from least recently makes room, and this node's own stays.
    #[test]
    fn a_full_table_makes_room_for_a_newcomer_by_dropping_the_stalest() {
        let own = identity::Keypair::ed25519_from_bytes([9u8; 32]).expect("key");
        let mut config = crate::OverlayConfig::new(own.clone(), Vec::new());
        config.max_tracked_peers = 4;
        let mut book = GossipBook::new(&config);
        let t0 = Instant::now();
        book.insert_own(announcement(&own, 1));
        let sybils: Vec<_> = (0..3u8)
            .map(|i| identity::Keypair::ed25519_from_bytes([20 + i; 32]).expect("key"))
            .collect();
        for (i, kp) in sybils.iter().enumerate() {
            let at = t0 + Duration::from_millis(10 * (i as u64 + 1));
            let a = wire(kp, &announcement(kp, 1));
            assert!(matches!(
                book.check_announcement(&a, NOW_MS, at),
                Verdict::Accept(_)
            ));
        }
        // Full (own + 3). The first Sybil refreshes, so the second is stalest.
        let refresh = wire(&sybils[0], &announcement(&sybils[0], 2));
        let t1 = t0 + Duration::from_millis(100);
        assert!(matches!(
            book.check_announcement(&refresh, NOW_MS, t1),
            Verdict::Accept(_)
        ));
        let newcomer = identity::Keypair::ed25519_from_bytes([40u8; 32]).expect("key");
        let a = wire(&newcomer, &announcement(&newcomer, 1));
        let t2 = t0 + Duration::from_millis(200);
        assert!(matches!(
            book.check_announcement(&a, NOW_MS, t2),
            Verdict::Accept(_)
        ));
        assert_eq!(book.latest.len(), 4);
        assert_eq!(book.last_seq(&newcomer.public().to_peer_id()), Some(1));
        assert_eq!(book.last_seq(&own.public().to_peer_id()), Some(1));
        assert_eq!(book.last_seq(&sybils[1].public().to_peer_id()), None);
        assert_eq!(book.last_seq(&sybils[0].public().to_peer_id()), Some(2));
        assert!(book.buckets.len() <= 4);
    }
}

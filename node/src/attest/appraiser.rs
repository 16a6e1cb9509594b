//! The gateway side in one place: policy, insecure opt-in, collateral
//! source and verdict cache.
//!
//! The overlay calls [`Appraiser::cached`] when an announcement arrives (a
//! known digest needs no fetch), and [`Appraiser::appraise`] after fetching
//! a document over `/silk/attest/1.0.0`. `appraise` may read the collateral
//! cache and call the PCCS, both blocking: run it in
//! `tokio::task::spawn_blocking` (or hold the appraiser behind a mutex in a
//! blocking task).

use tracing::{debug, info};

use super::{
    appraise_document, AttestationDocument, CollateralSource, Digest, Policy, RejectReason,
    Verdict, VerdictCache,
};

/// Appraises workers' attestation documents and remembers the verdicts.
#[derive(Debug)]
pub struct Appraiser {
    policy: Policy,
    allow_insecure: bool,
    collateral: Option<CollateralSource>,
    cache: VerdictCache,
}

impl Appraiser {
    /// An appraiser with `policy`; `allow_insecure` is the gateway's
    /// `--allow-insecure-workers`. Without a collateral source it uses the
    /// collateral carried in each document.
    pub fn new(policy: Policy, allow_insecure: bool) -> Self {
        Self {
            policy,
            allow_insecure,
            collateral: None,
            cache: VerdictCache::default(),
        }
    }

    /// Prefers collateral from `source` (on-disk cache, then PCCS) over the
    /// collateral a document carries.
    pub fn with_collateral_source(mut self, source: CollateralSource) -> Self {
        self.collateral = Some(source);
        self
    }

    /// Replaces the verdict cache (e.g. with another capacity).
    pub fn with_cache(mut self, cache: VerdictCache) -> Self {
        self.cache = cache;
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether insecure workers are accepted.
    pub fn allows_insecure(&self) -> bool {
        self.allow_insecure
    }

    /// The cached verdict for a gossiped digest announced by the peer whose
    /// raw ed25519 key is `peer_public_key`, if still valid at `now`. A
    /// verdict on the same digest served by another peer does not answer.
    pub fn cached(
        &mut self,
        peer_public_key: &[u8; 32],
        digest: &Digest,
        now: u64,
    ) -> Option<Verdict> {
        self.cache.get(&(*peer_public_key, *digest), now).cloned()
    }

    /// What an appraisal needs, to run without this appraiser's lock: the
    /// slow part (collateral from a PCCS, quote verification) then blocks
    /// no other check (audit F12). Record the outcome with
    /// [`Appraiser::record`].
    pub fn job(&self) -> AppraisalJob {
        AppraisalJob {
            policy: self.policy.clone(),
            allow_insecure: self.allow_insecure,
            collateral: self.collateral.clone(),
        }
    }

    /// Caches the verdict `job` reached on `peer_public_key`'s document.
    pub fn record(&mut self, peer_public_key: &[u8; 32], outcome: &JobOutcome, now: u64) {
        if let Some((digest, valid_until)) = outcome.cache {
            self.cache.insert(
                (*peer_public_key, digest),
                outcome.verdict.clone(),
                valid_until,
                now,
            );
        }
    }

    /// Like [`Appraiser::appraise`], for a document fetched because of an
    /// announcement carrying `announced`: a document with another digest is
    /// refused (and not cached) without further checks.
    pub fn appraise_announced(
        &mut self,
        doc: &AttestationDocument,
        peer_public_key: &[u8; 32],
        announced: &Digest,
        now: u64,
    ) -> Verdict {
        if doc.digest() == *announced {
            if let Some(v) = self.cache.get(&(*peer_public_key, *announced), now) {
                return v.clone();
            }
        }
        let outcome = self.job().run(doc, peer_public_key, announced, now);
        self.record(peer_public_key, &outcome, now);
        outcome.verdict
    }

    /// Appraises `doc` as served by `peer_public_key`, from the cache when
    /// a verdict on it is still valid.
    pub fn appraise(
        &mut self,
        doc: &AttestationDocument,
        peer_public_key: &[u8; 32],
        now: u64,
    ) -> Verdict {
        self.appraise_announced(doc, peer_public_key, &doc.digest(), now)
    }
}

/// An appraisal taken out of an [`Appraiser`] (see [`Appraiser::job`]).
#[derive(Debug, Clone)]
pub struct AppraisalJob {
    policy: Policy,
    allow_insecure: bool,
    collateral: Option<CollateralSource>,
}

/// What an [`AppraisalJob`] concluded.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// The verdict.
    pub verdict: Verdict,
    /// The document's digest and until when the verdict holds, when it is
    /// to be cached (not for a document other than the one announced).
    cache: Option<(Digest, u64)>,
}

impl AppraisalJob {
    /// Appraises `doc`, which `peer_public_key` served for the announced
    /// digest `announced`: what [`Appraiser::appraise_announced`] does,
    /// without the appraiser.
    pub fn run(
        &self,
        doc: &AttestationDocument,
        peer_public_key: &[u8; 32],
        announced: &Digest,
        now: u64,
    ) -> JobOutcome {
        let digest = doc.digest();
        if digest != *announced {
            return JobOutcome {
                verdict: RejectReason::DigestMismatch {
                    announced: announced.to_string(),
                    actual: digest.to_string(),
                }
                .into(),
                cache: None,
            };
        }
        let own = match (&self.collateral, &doc.quote) {
            (Some(source), Some(quote)) => match source.get(quote, now) {
                Ok(c) => Some(c),
                Err(e) => {
                    debug!(error = %e, "no collateral of our own; using the document's");
                    None
                }
            },
            _ => None,
        };
        let appraisal = appraise_document(
            doc,
            peer_public_key,
            own.as_ref(),
            &self.policy,
            self.allow_insecure,
            now,
        );
        info!(%digest, mode = %doc.mode, verdict = %appraisal.verdict, "appraised attestation");
        JobOutcome {
            verdict: appraisal.verdict,
            cache: Some((digest, appraisal.valid_until)),
        }
    }
}

//! Verdicts remembered per (peer key, attestation digest), until they expire.
//!
//! A gateway appraises a worker's attestation document once and then looks
//! the verdict up by the peer's key and the digest the worker gossips. The
//! key is part of the cache key because a digest is public: a verdict on one
//! peer's document must never answer for another peer that announces the same
//! digest (audit F1), in either direction (a peer passing as another's TDX
//! worker, or poisoning an honest worker with a key-mismatch rejection). An entry lives until the
//! earlier of the collateral's `nextUpdate` and the claims' maximum age (see
//! [`Appraisal::valid_until`](super::Appraisal::valid_until)); a new quote
//! has a new digest, so refreshing a quote misses the cache by construction.

use std::collections::HashMap;

use super::{Digest, Verdict};

/// Default bound on the number of cached verdicts.
pub const DEFAULT_VERDICT_CACHE_CAPACITY: usize = 4096;

/// Whom a verdict is about: the peer's raw ed25519 key and the digest of the
/// document it served.
pub type VerdictKey = ([u8; 32], Digest);

/// A bounded map from (peer key, attestation digest) to verdict with an
/// expiry time.
#[derive(Debug, Clone)]
pub struct VerdictCache {
    entries: HashMap<VerdictKey, (Verdict, u64)>,
    capacity: usize,
}

impl Default for VerdictCache {
    fn default() -> Self {
        Self::new(DEFAULT_VERDICT_CACHE_CAPACITY)
    }
}

impl VerdictCache {
    /// A cache holding at most `capacity` verdicts (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The verdict for `key` (a peer and the digest of its document), if one
    /// is cached and `now` (Unix seconds) is before its expiry. Expired entries
    /// are removed.
    pub fn get(&mut self, key: &VerdictKey, now: u64) -> Option<&Verdict> {
        let expired = match self.entries.get(key) {
            None => return None,
            Some((_, expires)) => now >= *expires,
        };
        if expired {
            self.entries.remove(key);
            return None;
        }
        self.entries.get(key).map(|(v, _)| v)
    }

    /// Remembers `verdict` for `key` until `expires_at` (Unix seconds).
    /// When full, expired entries are dropped first, then the entry that
    /// expires soonest.
    pub fn insert(&mut self, key: VerdictKey, verdict: Verdict, expires_at: u64, now: u64) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, e)| *e > now);
            if self.entries.len() >= self.capacity {
                if let Some(soonest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, e))| *e)
                    .map(|(d, _)| *d)
                {
                    self.entries.remove(&soonest);
                }
            }
        }
        self.entries.insert(key, (verdict, expires_at));
    }

    /// Forgets the verdict for `key`.
    pub fn remove(&mut self, key: &VerdictKey) {
        self.entries.remove(key);
    }

    /// Number of entries (expired ones included until touched).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::hex::Hex;
    use crate::attest::RejectReason;

    #[test]
    fn expiry_and_capacity() {
        let mut c = VerdictCache::new(2);
        let (a, b, d) = (
            ([0; 32], Hex([1; 32])),
            ([0; 32], Hex([2; 32])),
            ([0; 32], Hex([3; 32])),
        );
        c.insert(a, Verdict::Accepted, 100, 0);
        assert_eq!(c.get(&a, 99), Some(&Verdict::Accepted));
        assert_eq!(c.get(&a, 100), None, "expired at its expiry time");
        assert!(c.is_empty());

        c.insert(a, Verdict::Accepted, 100, 0);
        c.insert(b, RejectReason::DebugNotAllowed.into(), 50, 0);
        c.insert(d, Verdict::AcceptedInsecure, 200, 10);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&b, 10), None, "soonest-expiring entry evicted");
        assert_eq!(c.get(&a, 10), Some(&Verdict::Accepted));
        assert_eq!(c.get(&d, 10), Some(&Verdict::AcceptedInsecure));
    }
}

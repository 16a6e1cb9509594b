//! What the worker remembers, in memory, about the lanes it reads from the
//! chain: when each was last checked (admission re-reads a lane once its
//! check is older than a TTL, audit F6), which lanes were seen closing
//! (redeemed at once, whatever the threshold), when lanes below the
//! threshold were last polled for a close, and which contracts or lanes
//! were found bad for good (refused without another chain read, audit F13).
//!
//! Nothing here is money state: losing it on a restart costs chain reads,
//! never earnings, because admission and the redemption pass re-read what
//! they need.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use silk_chain::Address;

/// How many refusals are remembered; beyond it new ones are not cached
/// (they cost a chain read each, as before).
const MAX_REFUSED: usize = 4096;
/// How long a refusal for good is remembered.
const REFUSED_FOR: Duration = Duration::from_secs(600);

type LaneKey = (Address, u32);

#[derive(Default)]
struct Inner {
    checked: HashMap<LaneKey, Instant>,
    polled: HashMap<LaneKey, Instant>,
    closing: HashSet<LaneKey>,
    /// `None` lane: the whole contract is bad.
    refused: HashMap<(Address, Option<u32>), (Instant, String)>,
}

/// See the module docs. Cheap to share behind an `Arc`.
#[derive(Default)]
pub(crate) struct LaneWatch {
    inner: Mutex<Inner>,
}

impl LaneWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The maps stay consistent whatever panicked while holding them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the lane was checked on chain less than `ttl` ago.
    pub(crate) fn fresh(&self, contract: &Address, lane_id: u32, ttl: Duration) -> bool {
        self.lock()
            .checked
            .get(&(contract.clone(), lane_id))
            .is_some_and(|t| t.elapsed() < ttl)
    }

    /// The lane was just read from the chain and found open.
    pub(crate) fn checked(&self, contract: &Address, lane_id: u32) {
        let mut g = self.lock();
        let k = (contract.clone(), lane_id);
        g.closing.remove(&k);
        g.polled.insert(k.clone(), Instant::now());
        g.checked.insert(k, Instant::now());
    }

    /// The lane was just read from the chain and found closing.
    pub(crate) fn closing(&self, contract: &Address, lane_id: u32) {
        let mut g = self.lock();
        let k = (contract.clone(), lane_id);
        g.checked.remove(&k);
        g.polled.insert(k.clone(), Instant::now());
        g.closing.insert(k);
    }

    /// Whether the lane was last seen closing.
    pub(crate) fn is_closing(&self, contract: &Address, lane_id: u32) -> bool {
        self.lock().closing.contains(&(contract.clone(), lane_id))
    }

    /// Whether a lane below the redemption threshold is due for a poll of
    /// its close state (not read for `every`).
    pub(crate) fn poll_due(&self, contract: &Address, lane_id: u32, every: Duration) -> bool {
        self.lock()
            .polled
            .get(&(contract.clone(), lane_id))
            .is_none_or(|t| t.elapsed() >= every)
    }

    /// The lane's close state was just polled.
    pub(crate) fn polled(&self, contract: &Address, lane_id: u32) {
        self.lock()
            .polled
            .insert((contract.clone(), lane_id), Instant::now());
    }

    /// Why `contract` (or its lane `lane_id`) was refused for good, if it
    /// was in the last [`REFUSED_FOR`].
    pub(crate) fn refused(&self, contract: &Address, lane_id: u32) -> Option<String> {
        let g = self.lock();
        [None, Some(lane_id)].into_iter().find_map(|l| {
            g.refused
                .get(&(contract.clone(), l))
                .filter(|(t, _)| t.elapsed() < REFUSED_FOR)
                .map(|(_, why)| why.clone())
        })
    }

    /// Remembers that `contract` (every lane when `lane_id` is `None`) is
    /// bad for a reason that cannot change.
    pub(crate) fn refuse(&self, contract: &Address, lane_id: Option<u32>, why: &str) {
        let mut g = self.lock();
        if g.refused.len() >= MAX_REFUSED {
            g.refused.retain(|_, (t, _)| t.elapsed() < REFUSED_FOR);
        }
        if g.refused.len() < MAX_REFUSED {
            g.refused.insert(
                (contract.clone(), lane_id),
                (Instant::now(), why.to_string()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_seen_closing_is_not_fresh_and_a_later_check_clears_it() {
        let w = LaneWatch::default();
        let c = Address::new(0, [1; 32]);
        assert!(!w.fresh(&c, 1, Duration::from_secs(30)));
        w.checked(&c, 1);
        assert!(w.fresh(&c, 1, Duration::from_secs(30)));
        assert!(!w.fresh(&c, 1, Duration::ZERO));
        w.closing(&c, 1);
        assert!(w.is_closing(&c, 1));
        assert!(!w.fresh(&c, 1, Duration::from_secs(30)));
        w.checked(&c, 1);
        assert!(!w.is_closing(&c, 1));
    }

    #[test]
    fn a_contract_refused_for_good_covers_every_lane_and_the_table_is_bounded() {
        let w = LaneWatch::default();
        let c = Address::new(0, [2; 32]);
        w.refuse(&c, None, "forged");
        assert_eq!(w.refused(&c, 7).as_deref(), Some("forged"));
        let d = Address::new(0, [3; 32]);
        w.refuse(&d, Some(1), "other worker");
        assert!(w.refused(&d, 1).is_some());
        assert!(w.refused(&d, 2).is_none());
        for i in 0..(MAX_REFUSED as u32 + 10) {
            let mut raw = [0u8; 32];
            raw[..4].copy_from_slice(&i.to_be_bytes());
            raw[31] = 9;
            w.refuse(&Address::new(0, raw), None, "x");
        }
        assert!(w.lock().refused.len() <= MAX_REFUSED);
    }
}

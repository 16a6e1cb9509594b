//! The peer budget: each node holds between [`OverlayConfig::min_peers`]
//! and [`OverlayConfig::max_peers`] connections.
//!
//! Without it every node ended up connected to every other: Kademlia's
//! walks dial most of the network, and gossipsub keeps every connection it
//! has busy, so none ever went idle (198 peers per node at 200 nodes, and
//! a flood publish sent one copy to each). Now, every [`CHECK_EVERY`], a
//! node over `max_peers` closes its surplus connections and a node under
//! `min_peers` starts a random Kademlia walk, which dials new peers.
//!
//! Which connections go is [`surplus`], a pure function: never one that
//! carries a job stream now or did within [`OverlayConfig::peer_use_memory`]
//! (the workers a gateway uses and the gateways that use a worker), never
//! one younger than [`GRACE`] (a dial in progress for a job, a Kademlia
//! query under way), and among the rest, one from the Kademlia bucket that
//! holds the most connections at the time, so the peers kept spread over
//! the key space (every distance still has peers to route through). A
//! worker needs no connection from a gateway to be known to it: its
//! announcement reaches every node through gossip, and a gateway that opens
//! a job to a peer it is not connected to finds its address in the DHT.
//!
//! [`OverlayConfig::min_peers`]: crate::OverlayConfig::min_peers
//! [`OverlayConfig::max_peers`]: crate::OverlayConfig::max_peers
//! [`OverlayConfig::peer_use_memory`]: crate::OverlayConfig::peer_use_memory

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::kad::KBucketKey;
use libp2p::PeerId;

/// How often the budget is checked.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(5);
/// A connection younger than this is never closed for the budget.
pub(crate) const GRACE: Duration = Duration::from_secs(10);

/// One connected peer, as the budget sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Connected {
    /// The peer.
    pub peer: PeerId,
    /// Its Kademlia bucket: the log2 of its XOR distance from this node.
    pub bucket: u32,
    /// Kept whatever the budget: it carries a job stream now or did
    /// lately, or it is younger than [`GRACE`].
    pub protected: bool,
    /// When its connection was established.
    pub since: Instant,
}

/// The Kademlia bucket of `peer` seen from `local`.
pub(crate) fn bucket(local: &PeerId, peer: &PeerId) -> u32 {
    KBucketKey::from(*local)
        .distance(&KBucketKey::from(*peer))
        .ilog2()
        .unwrap_or(0)
}

/// The peers to disconnect so that at most `max` stay connected: from the
/// bucket with the most connected peers first (ties: the farther bucket,
/// which covers more of the key space and so has more peers to replace
/// them), the newest connection of that bucket first. Protected peers are
/// never chosen, so more than `max` may stay when too many are protected.
pub(crate) fn surplus(peers: &[Connected], max: usize) -> Vec<PeerId> {
    let Some(mut excess) = peers.len().checked_sub(max).filter(|e| *e > 0) else {
        return Vec::new();
    };
    let mut per_bucket: HashMap<u32, usize> = HashMap::new();
    for p in peers {
        *per_bucket.entry(p.bucket).or_default() += 1;
    }
    // Per bucket, its prunable peers oldest first (popped from the back).
    let mut prunable: HashMap<u32, Vec<&Connected>> = HashMap::new();
    for p in peers.iter().filter(|p| !p.protected) {
        prunable.entry(p.bucket).or_default().push(p);
    }
    for list in prunable.values_mut() {
        list.sort_by(|a, b| a.since.cmp(&b.since).then(a.peer.cmp(&b.peer)));
    }
    let mut out = Vec::with_capacity(excess);
    while excess > 0 {
        let fullest = prunable
            .iter()
            .filter(|(_, list)| !list.is_empty())
            .map(|(bucket, _)| *bucket)
            .max_by_key(|bucket| (per_bucket[bucket], *bucket));
        let Some(bucket) = fullest else { break };
        if let Some(p) = prunable.get_mut(&bucket).and_then(Vec::pop) {
            out.push(p.peer);
            if let Some(n) = per_bucket.get_mut(&bucket) {
                *n -= 1;
            }
            excess -= 1;
        }
    }
    out
}

/// Job streams per peer, open now and when the last one ended: shared by
/// the job streams (which count themselves) and the overlay task (which
/// keeps the peers in use).
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamUse(Arc<Mutex<HashMap<PeerId, Use>>>);

#[derive(Debug, Clone, Copy)]
struct Use {
    open: u32,
    last: Instant,
}

impl StreamUse {
    /// Counts a job stream with `peer` until the guard is dropped.
    pub(crate) fn open(&self, peer: PeerId) -> InUse {
        if let Ok(mut map) = self.0.lock() {
            let u = map.entry(peer).or_insert(Use {
                open: 0,
                last: Instant::now(),
            });
            u.open = u.open.saturating_add(1);
            u.last = Instant::now();
        }
        InUse {
            uses: self.clone(),
            peer,
        }
    }

    /// Whether `peer` has a job stream open, or had one within `memory`.
    pub(crate) fn in_use(&self, peer: &PeerId, memory: Duration) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|map| map.get(peer).copied())
            .is_some_and(|u| u.open > 0 || u.last.elapsed() < memory)
    }

    /// Forgets peers with no stream open for longer than `memory`.
    pub(crate) fn prune(&self, memory: Duration) {
        if let Ok(mut map) = self.0.lock() {
            map.retain(|_, u| u.open > 0 || u.last.elapsed() < memory);
        }
    }
}

/// One job stream with a peer, counted while it lives.
#[derive(Debug)]
pub(crate) struct InUse {
    uses: StreamUse,
    peer: PeerId,
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Ok(mut map) = self.uses.0.lock() {
            if let Some(u) = map.get_mut(&self.peer) {
                u.open = u.open.saturating_sub(1);
                u.last = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        crate::testing::seeded_keypair(u64::from(n))
            .public()
            .to_peer_id()
    }

    fn connected(n: u8, bucket: u32, protected: bool, age_s: u64) -> Connected {
        Connected {
            peer: peer(n),
            bucket,
            protected,
            since: Instant::now() - Duration::from_secs(age_s),
        }
    }

    #[test]
    fn nothing_goes_within_the_budget() {
        let peers = vec![connected(1, 250, false, 60), connected(2, 251, false, 60)];
        assert!(surplus(&peers, 2).is_empty());
        assert!(surplus(&peers, 5).is_empty());
        assert!(surplus(&[], 0).is_empty());
    }

    #[test]
    fn the_fullest_bucket_loses_its_newest_connections_first() {
        // Bucket 255 holds four peers, 254 two, 200 one: two must go.
        let peers = vec![
            connected(1, 255, false, 100),
            connected(2, 255, false, 10),
            connected(3, 255, false, 50),
            connected(4, 255, false, 90),
            connected(5, 254, false, 80),
            connected(6, 254, false, 5),
            connected(7, 200, false, 1),
        ];
        let out = surplus(&peers, 5);
        // From 255 (four, then three peers): the newest, then the next.
        assert_eq!(out, vec![peer(2), peer(3)]);
        // Down to three: 255 is left with two, the same as 254, so the
        // farther bucket goes first; the lone peer of 200 stays.
        let out = surplus(&peers, 3);
        assert_eq!(out, vec![peer(2), peer(3), peer(4), peer(6)]);
    }

    #[test]
    fn protected_peers_stay_even_over_the_budget() {
        let peers = vec![
            connected(1, 255, true, 100),
            connected(2, 255, true, 10),
            connected(3, 255, false, 50),
            connected(4, 254, true, 5),
        ];
        assert_eq!(surplus(&peers, 2), vec![peer(3)]);
        assert_eq!(surplus(&peers, 0), vec![peer(3)]);
    }

    #[test]
    fn a_stream_keeps_its_peer_in_use_while_open_and_for_the_memory_after() {
        let uses = StreamUse::default();
        let (a, b) = (peer(1), peer(2));
        assert!(!uses.in_use(&a, Duration::ZERO));
        let first = uses.open(a);
        let second = uses.open(a);
        assert!(uses.in_use(&a, Duration::ZERO));
        drop(first);
        assert!(uses.in_use(&a, Duration::ZERO), "one stream is still open");
        drop(second);
        assert!(!uses.in_use(&a, Duration::ZERO));
        assert!(uses.in_use(&a, Duration::from_secs(60)));
        assert!(!uses.in_use(&b, Duration::from_secs(60)));
        uses.prune(Duration::ZERO);
        assert!(!uses.in_use(&a, Duration::from_secs(60)), "forgotten");
    }
}

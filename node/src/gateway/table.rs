//! The worker table: latest announcement and RTT per worker: measured
//! where this node is connected to the worker, estimated from network
//! coordinates ([`silk_overlay::vivaldi`]) where it is not.

use std::collections::HashMap;
use std::time::Duration;

use silk_overlay::{Announcement, Coordinate, PeerId};

/// A coordinate whose own error estimate is above this (thousandths) has
/// not settled yet: the estimate it gives is not used for routing.
pub(crate) const MAX_ESTIMATE_ERROR_MILLI: u16 = 1_000;

/// How often the table is re-read from the overlay.
pub const TABLE_SYNC: Duration = Duration::from_secs(1);

/// Every worker's latest announcement and this node's RTT to it.
#[derive(Debug, Default)]
pub struct WorkerTable {
    workers: HashMap<PeerId, Announcement>,
    rtts: HashMap<PeerId, Duration>,
    /// This node's network coordinate.
    coordinate: Option<Coordinate>,
}

impl WorkerTable {
    /// Takes `a` unless the table holds a later one (higher `seq`) of the
    /// same worker. The overlay checked its signature and times.
    pub fn offer(&mut self, a: Announcement) {
        match self.workers.get(&a.peer_id) {
            Some(held) if held.seq >= a.seq => {}
            _ => {
                self.workers.insert(a.peer_id, a);
            }
        }
    }

    /// Re-reads the overlay's book: takes each of `book` that is newer, and
    /// forgets workers the book no longer holds (expired or evicted there).
    pub fn sync(&mut self, book: Vec<Announcement>, own: Option<PeerId>) {
        let present: std::collections::HashSet<PeerId> = book.iter().map(|a| a.peer_id).collect();
        self.workers
            .retain(|peer, _| present.contains(peer) || Some(*peer) == own);
        for a in book {
            self.offer(a);
        }
    }

    /// Replaces the RTTs with those of the currently connected peers.
    pub fn set_rtts(&mut self, rtts: impl IntoIterator<Item = (PeerId, Duration)>) {
        self.rtts = rtts.into_iter().collect();
    }

    /// Sets this node's network coordinate.
    pub fn set_coordinate(&mut self, c: Coordinate) {
        self.coordinate = Some(c);
    }

    /// The RTT to `a`'s worker that its coordinate and this node's predict,
    /// when both have settled.
    fn estimate(&self, a: &Announcement) -> Option<Duration> {
        let (mine, theirs) = (self.coordinate.as_ref()?, a.coordinate.as_ref()?);
        (mine.error_milli <= MAX_ESTIMATE_ERROR_MILLI
            && theirs.error_milli <= MAX_ESTIMATE_ERROR_MILLI)
            .then(|| mine.estimate_rtt(theirs))
    }

    /// The connection to `peer` closed: its RTT is unknown until the next ping.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.rtts.remove(peer);
    }

    /// Unexpired announcements at `now_ms`.
    pub fn current(&self, now_ms: u64) -> impl Iterator<Item = &Announcement> {
        self.workers
            .values()
            .filter(move |a| a.expires_at_ms > now_ms)
    }

    /// Unexpired announcements of workers serving `model`, except those in
    /// `exclude`, with the RTT to each: zero for `own` (this node), the
    /// measured one for a connected worker, else the coordinates' estimate,
    /// else unknown.
    pub fn serving(
        &self,
        model: &str,
        now_ms: u64,
        own: PeerId,
        exclude: &[PeerId],
    ) -> Vec<(Announcement, Option<Duration>)> {
        self.current(now_ms)
            .filter(|a| a.models.iter().any(|m| m == model) && !exclude.contains(&a.peer_id))
            .map(|a| {
                let rtt = if a.peer_id == own {
                    Some(Duration::ZERO)
                } else {
                    self.rtts
                        .get(&a.peer_id)
                        .copied()
                        .or_else(|| self.estimate(a))
                };
                (a.clone(), rtt)
            })
            .collect()
    }

    /// Drops announcements that expired by `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        self.workers.retain(|_, a| a.expires_at_ms > now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use silk_overlay::testing::{seeded_keypair, worker_announcement};

    fn peer(n: u64) -> PeerId {
        seeded_keypair(n).public().to_peer_id()
    }

    #[test]
    fn a_later_announcement_replaces_an_earlier_one_and_never_the_reverse() {
        let mut t = WorkerTable::default();
        let p = peer(1);
        let mut a = worker_announcement(p, 5, &["m"]);
        a.free_slots = 1;
        t.offer(a.clone());
        let mut older = worker_announcement(p, 4, &["m"]);
        older.free_slots = 9;
        t.offer(older);
        let now = 0;
        assert_eq!(t.serving("m", now, peer(9), &[])[0].0.free_slots, 1);
        a.seq = 6;
        a.free_slots = 3;
        t.offer(a);
        assert_eq!(t.serving("m", now, peer(9), &[])[0].0.free_slots, 3);
    }

    #[test]
    fn serving_filters_by_model_expiry_and_exclusion_and_knows_rtts() {
        let mut t = WorkerTable::default();
        let (a, b, c, own) = (peer(1), peer(2), peer(3), peer(4));
        t.offer(worker_announcement(a, 1, &["m"]));
        t.offer(worker_announcement(b, 1, &["m", "n"]));
        t.offer(worker_announcement(c, 1, &["n"]));
        t.offer(worker_announcement(own, 1, &["m"]));
        t.set_rtts([(a, Duration::from_millis(7))]);
        let now = t.current(0).map(|x| x.expires_at_ms).min().unwrap_or(0) - 1;
        let mut got: Vec<(PeerId, Option<Duration>)> = t
            .serving("m", now, own, &[b])
            .into_iter()
            .map(|(x, rtt)| (x.peer_id, rtt))
            .collect();
        got.sort();
        let mut want = vec![
            (a, Some(Duration::from_millis(7))),
            (own, Some(Duration::ZERO)),
        ];
        want.sort();
        assert_eq!(got, want);
        t.disconnected(&a);
        assert!(t
            .serving("m", now, own, &[])
            .iter()
            .any(|(x, rtt)| x.peer_id == a && rtt.is_none()));
        // Past every expiry nothing is served, and pruning forgets it all.
        assert!(t.serving("m", u64::MAX, own, &[]).is_empty());
        t.prune(u64::MAX);
        assert_eq!(t.current(0).count(), 0);
    }

    #[test]
    fn a_sync_forgets_what_the_book_dropped_but_keeps_this_nodes_own() {
        let mut t = WorkerTable::default();
        let (a, b, own) = (peer(1), peer(2), peer(3));
        t.offer(worker_announcement(a, 1, &["m"]));
        t.offer(worker_announcement(b, 1, &["m"]));
        t.offer(worker_announcement(own, 1, &["m"]));
        t.sync(vec![worker_announcement(a, 2, &["m"])], Some(own));
        let mut left: Vec<(PeerId, u64)> = t.current(0).map(|x| (x.peer_id, x.seq)).collect();
        left.sort();
        let mut want = vec![(a, 2), (own, 1)];
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn a_worker_without_a_connection_gets_the_rtt_its_coordinate_predicts() {
        let mut t = WorkerTable::default();
        let (near, far, unsure) = (peer(1), peer(2), peer(3));
        let at = |x_us: i32, error_milli: u16| Coordinate {
            vec: [x_us, 0, 0, 0],
            height_us: 0,
            error_milli,
        };
        for (p, c) in [
            (near, at(5_000, 200)),
            (far, at(150_000, 200)),
            (unsure, at(1_000, 1_400)),
        ] {
            let mut a = worker_announcement(p, 1, &["m"]);
            a.coordinate = Some(c);
            t.offer(a);
        }
        let rtt_of = |t: &WorkerTable, p: PeerId| {
            t.serving("m", 0, peer(9), &[])
                .into_iter()
                .find(|(a, _)| a.peer_id == p)
                .and_then(|(_, rtt)| rtt)
        };
        // Without a coordinate of its own, the gateway knows nothing.
        assert_eq!(rtt_of(&t, near), None);
        t.set_coordinate(at(0, 300));
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis());
        assert_eq!(ms(rtt_of(&t, near)), Some(5));
        assert_eq!(ms(rtt_of(&t, far)), Some(150));
        // A coordinate that has not settled is no estimate.
        assert_eq!(rtt_of(&t, unsure), None);
        // A measured RTT wins over the estimate.
        t.set_rtts([(far, Duration::from_millis(90))]);
        assert_eq!(ms(rtt_of(&t, far)), Some(90));
    }
}

//! Per-peer misbehaviour scores and bans (policy, no I/O).
//!
//! Every offence adds its [`Misbehaviour::penalty`] to the peer's score; at
//! `ban_threshold` the overlay task disconnects the peer, blocks it and
//! blacklists it in gossipsub until the ban expires. A score loses one
//! point every `misbehaviour_decay`, so rare offences (a glitch, a version
//! skew) never add up to a ban (audit F15). Gossip offences are also
//! reported to gossipsub's own peer scoring, which stops meshing with the peer.

use std::{
    collections::HashMap,
    fmt,
    time::{Duration, Instant},
};

use libp2p::PeerId;

/// An offence a peer committed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Misbehaviour {
    /// A job stream opened with an unknown wire version.
    WrongProtocolVersion,
    /// A job frame over the size limit.
    OversizedFrame,
    /// A job frame that does not decode or comes out of order.
    MalformedFrame,
    /// A gossip message that failed validation (forged, expired, malformed).
    InvalidGossip,
    /// The node could not decode a job payload (reported by the node).
    UndecodablePayload,
    /// A job stream that sent no request frame in time (holding a slot).
    SilentJobStream,
    /// Any other offence the node detected, with its own penalty.
    Other {
        /// What happened, for logs.
        reason: String,
        /// Points added to the score.
        penalty: u32,
    },
}

impl Misbehaviour {
    /// Points added to the peer's score.
    pub fn penalty(&self) -> u32 {
        match self {
            Misbehaviour::WrongProtocolVersion => 10,
            Misbehaviour::OversizedFrame => 25,
            Misbehaviour::MalformedFrame => 25,
            Misbehaviour::InvalidGossip => 20,
            Misbehaviour::UndecodablePayload => 25,
            Misbehaviour::SilentJobStream => 10,
            Misbehaviour::Other { penalty, .. } => *penalty,
        }
    }
}

impl fmt::Display for Misbehaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Misbehaviour::WrongProtocolVersion => f.write_str("wrong job protocol version"),
            Misbehaviour::OversizedFrame => f.write_str("oversized job frame"),
            Misbehaviour::MalformedFrame => f.write_str("malformed job frame"),
            Misbehaviour::InvalidGossip => f.write_str("invalid gossip message"),
            Misbehaviour::UndecodablePayload => f.write_str("undecodable job payload"),
            Misbehaviour::SilentJobStream => f.write_str("job stream without a request in time"),
            Misbehaviour::Other { reason, .. } => f.write_str(reason),
        }
    }
}

/// What the overlay task must do after recording an offence.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Score raised; nothing else.
    Scored(u32),
    /// Score crossed the threshold: ban the peer now.
    Ban(u32),
}

/// A score and when it was last brought up to date.
#[derive(Clone, Copy, Debug)]
struct Score {
    points: u32,
    at: Instant,
}

/// Scores and bans, each map capped.
#[derive(Debug)]
pub(crate) struct PeerPolicy {
    scores: HashMap<PeerId, Score>,
    bans: HashMap<PeerId, Instant>,
    threshold: u32,
    ban_duration: Duration,
    /// One point is forgiven per this interval.
    decay: Duration,
    max_peers: usize,
}

impl PeerPolicy {
    pub(crate) fn new(
        threshold: u32,
        ban_duration: Duration,
        decay: Duration,
        max_peers: usize,
    ) -> Self {
        Self {
            scores: HashMap::new(),
            bans: HashMap::new(),
            threshold,
            ban_duration,
            decay,
            max_peers,
        }
    }

    /// `score` after the decay up to `now`.
    fn decayed(&self, score: Score, now: Instant) -> u32 {
        if self.decay.is_zero() {
            return score.points;
        }
        let forgiven = now.saturating_duration_since(score.at).as_nanos() / self.decay.as_nanos();
        score
            .points
            .saturating_sub(u32::try_from(forgiven).unwrap_or(u32::MAX))
    }

    pub(crate) fn record(&mut self, peer: PeerId, offence: &Misbehaviour, now: Instant) -> Outcome {
        if !self.scores.contains_key(&peer) && self.scores.len() >= self.max_peers {
            // Forget the mildest offender to stay bounded.
            if let Some(mildest) = self
                .scores
                .iter()
                .min_by_key(|(_, s)| self.decayed(**s, now))
                .map(|(p, _)| *p)
            {
                self.scores.remove(&mildest);
            }
        }
        let before = self.scores.get(&peer).map_or(0, |s| self.decayed(*s, now));
        let score = before.saturating_add(offence.penalty());
        self.scores.insert(
            peer,
            Score {
                points: score,
                at: now,
            },
        );
        if score >= self.threshold && !self.bans.contains_key(&peer) {
            if self.bans.len() >= self.max_peers {
                // Keep the newest bans: drop the one that ends first.
                if let Some(first) = self.bans.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p) {
                    self.bans.remove(&first);
                }
            }
            self.bans.insert(peer, now + self.ban_duration);
            return Outcome::Ban(score);
        }
        Outcome::Scored(score)
    }

    pub(crate) fn score(&self, peer: &PeerId) -> u32 {
        self.scores
            .get(peer)
            .map_or(0, |s| self.decayed(*s, Instant::now()))
    }

    pub(crate) fn is_banned(&self, peer: &PeerId) -> bool {
        self.bans.contains_key(peer)
    }

    /// Lifts bans that have run out (and forgets those peers' scores).
    pub(crate) fn expired_bans(&mut self, now: Instant) -> Vec<PeerId> {
        let done: Vec<PeerId> = self
            .bans
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in &done {
            self.bans.remove(peer);
            self.scores.remove(peer);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_at_threshold_and_lifts_later() {
        let mut policy = PeerPolicy::new(50, Duration::from_secs(10), Duration::ZERO, 16);
        let peer = PeerId::random();
        let t0 = Instant::now();
        assert_eq!(
            policy.record(peer, &Misbehaviour::MalformedFrame, t0),
            Outcome::Scored(25)
        );
        assert_eq!(
            policy.record(peer, &Misbehaviour::OversizedFrame, t0),
            Outcome::Ban(50)
        );
        assert!(policy.is_banned(&peer));
        assert!(policy.expired_bans(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(
            policy.expired_bans(t0 + Duration::from_secs(10)),
            vec![peer]
        );
        assert!(!policy.is_banned(&peer));
        assert_eq!(policy.score(&peer), 0);
    }

    #[test]
    fn stays_bounded() {
        let mut policy = PeerPolicy::new(1000, Duration::from_secs(10), Duration::ZERO, 4);
        let now = Instant::now();
        for _ in 0..100 {
            policy.record(PeerId::random(), &Misbehaviour::InvalidGossip, now);
        }
        assert!(policy.scores.len() <= 4);
    }

    /// Audit F15: scores never decayed, so an honest peer's rare offences
    /// (five over any span of time) added up to a ban. Now a point is
    /// forgiven per `decay`.
    #[test]
    fn scores_decay_so_rare_offences_never_ban() {
        let mut policy =
            PeerPolicy::new(100, Duration::from_secs(3600), Duration::from_secs(1), 16);
        let peer = PeerId::random();
        let t0 = Instant::now();
        for i in 0..10u64 {
            let at = t0 + Duration::from_secs(30 * i);
            assert!(matches!(
                policy.record(peer, &Misbehaviour::InvalidGossip, at),
                Outcome::Scored(20)
            ));
        }
        assert!(!policy.is_banned(&peer));
        // A burst still bans.
        let later = t0 + Duration::from_secs(1000);
        let outcomes: Vec<_> = (0..5)
            .map(|_| policy.record(peer, &Misbehaviour::InvalidGossip, later))
            .collect();
        assert_eq!(outcomes.last(), Some(&Outcome::Ban(100)), "{outcomes:?}");
    }
}

//! Network coordinates (Vivaldi, Dabek et al., SIGCOMM 2004, with the
//! height vectors and error weighting that Serf and Consul use): each node
//! places itself in a small Euclidean space plus a "height" (its access
//! link) so that the distance between two nodes' coordinates estimates
//! their round-trip time. A node moves its coordinate a little after every
//! RTT it measures to a peer whose coordinate it knows; workers carry
//! theirs in announcements, so a gateway can estimate its latency to a
//! worker it has never connected to.
//!
//! On the wire a coordinate is integers (microseconds, and the error in
//! thousandths), so an announcement stays `Eq`, has no NaN to smuggle in,
//! and is checked against fixed bounds ([`Coordinate::check_ranges`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Dimensions of the Euclidean part. Serf uses 8; a handful of regions
/// embed well in 4, and announcements stay small.
pub const DIMENSIONS: usize = 4;
/// Largest absolute component or height a coordinate may carry, in
/// microseconds (10 s: no round trip on Earth comes near it).
pub const MAX_COMPONENT_US: i32 = 10_000_000;
/// Largest error estimate, in thousandths (1.5, the starting value).
pub const MAX_ERROR_MILLI: u16 = 1_500;
/// Lowest height, in seconds (Serf's 10 µs).
const HEIGHT_MIN_S: f64 = 10e-6;
/// How fast the error estimate follows new samples.
const CE: f64 = 0.25;
/// How far one sample moves the coordinate.
const CC: f64 = 0.25;
/// RTT samples past this are not believed (a stalled connection, not a
/// distance).
const MAX_SAMPLE: Duration = Duration::from_secs(10);

/// A node's coordinate as announced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coordinate {
    /// Euclidean part, microseconds.
    pub vec: [i32; DIMENSIONS],
    /// Height (the access link's share of every RTT), microseconds.
    pub height_us: i32,
    /// The node's own estimate of its relative error, thousandths.
    pub error_milli: u16,
}

impl Default for Coordinate {
    fn default() -> Self {
        Self::from_state(&State::default())
    }
}

impl Coordinate {
    /// Checks every field against its bound; routing never sees one that
    /// fails.
    pub fn check_ranges(&self) -> Result<(), String> {
        if let Some(x) = self
            .vec
            .iter()
            .find(|x| x.unsigned_abs() > MAX_COMPONENT_US as u32)
        {
            return Err(format!(
                "a coordinate component of {x} µs; at most ±{MAX_COMPONENT_US}"
            ));
        }
        if !(0..=MAX_COMPONENT_US).contains(&self.height_us) {
            return Err(format!(
                "a coordinate height of {} µs; 0 to {MAX_COMPONENT_US} are allowed",
                self.height_us
            ));
        }
        if self.error_milli > MAX_ERROR_MILLI {
            return Err(format!(
                "a coordinate error of {}‰; at most {MAX_ERROR_MILLI}",
                self.error_milli
            ));
        }
        Ok(())
    }

    /// The round trip these two coordinates predict.
    pub fn estimate_rtt(&self, other: &Coordinate) -> Duration {
        let (a, b) = (State::from_wire(self), State::from_wire(other));
        Duration::from_secs_f64(a.distance(&b).clamp(0.0, MAX_SAMPLE.as_secs_f64()))
    }

    fn from_state(s: &State) -> Self {
        let us = |x: f64| {
            (x * 1e6)
                .round()
                .clamp(-f64::from(MAX_COMPONENT_US), f64::from(MAX_COMPONENT_US)) as i32
        };
        Coordinate {
            vec: s.vec.map(us),
            height_us: us(s.height).max(0),
            error_milli: (s.error * 1e3)
                .round()
                .clamp(0.0, f64::from(MAX_ERROR_MILLI)) as u16,
        }
    }
}

/// A node's own coordinate, in seconds, as it moves.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    vec: [f64; DIMENSIONS],
    height: f64,
    error: f64,
}

impl Default for State {
    /// The origin, with the largest error: the first samples move it far.
    fn default() -> Self {
        State {
            vec: [0.0; DIMENSIONS],
            height: HEIGHT_MIN_S,
            error: f64::from(MAX_ERROR_MILLI) / 1e3,
        }
    }
}

impl State {
    fn from_wire(c: &Coordinate) -> Self {
        State {
            vec: c.vec.map(|x| f64::from(x) / 1e6),
            height: (f64::from(c.height_us) / 1e6).max(HEIGHT_MIN_S),
            error: f64::from(c.error_milli) / 1e3,
        }
    }

    /// This state as announced.
    pub fn coordinate(&self) -> Coordinate {
        Coordinate::from_state(self)
    }

    fn distance(&self, other: &State) -> f64 {
        let euclid: f64 = self
            .vec
            .iter()
            .zip(&other.vec)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        euclid + self.height + other.height
    }

    /// Moves this coordinate after measuring `rtt` to a peer at `other`.
    /// `tiebreak` picks the direction to move in when both sit on the same
    /// point (any value that differs between peers: a hash of the peer id).
    /// Returns whether the sample was used; a zero or absurd RTT is not.
    pub fn observe(&mut self, other: &Coordinate, rtt: Duration, tiebreak: u64) -> bool {
        if rtt.is_zero() || rtt > MAX_SAMPLE || other.check_ranges().is_err() {
            return false;
        }
        let other = State::from_wire(other);
        let rtt = rtt.as_secs_f64();
        let dist = self.distance(&other);
        // Weigh the sample by how sure each side is of its place.
        let total = self.error + other.error;
        let w = if total > 0.0 { self.error / total } else { 0.5 };
        let sample_error = (dist - rtt).abs() / rtt;
        self.error = (sample_error * CE * w + self.error * (1.0 - CE * w))
            .clamp(0.0, f64::from(MAX_ERROR_MILLI) / 1e3);
        let force = CC * w * (rtt - dist);
        // Push away from (or pull towards) the other node along the line
        // between them.
        let mut dir: [f64; DIMENSIONS] = std::array::from_fn(|i| self.vec[i] - other.vec[i]);
        let norm = dir.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-9 {
            dir.iter_mut().for_each(|x| *x /= norm);
        } else {
            let mut h = tiebreak | 1;
            dir = std::array::from_fn(|_| {
                h ^= h << 13;
                h ^= h >> 7;
                h ^= h << 17;
                (h % 2001) as f64 / 1000.0 - 1.0
            });
            let n = dir.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
            dir.iter_mut().for_each(|x| *x /= n);
        }
        for (x, d) in self.vec.iter_mut().zip(dir) {
            *x += d * force;
        }
        if dist > 1e-9 {
            self.height =
                (self.height + (self.height + other.height) * force / dist).max(HEIGHT_MIN_S);
        }
        let limit = f64::from(MAX_COMPONENT_US) / 1e6;
        for x in &mut self.vec {
            *x = x.clamp(-limit, limit);
        }
        self.height = self.height.min(limit);
        true
    }
}

/// The median relative error `|estimate - rtt| / rtt` over `pairs` of
/// (estimate, measured RTT); `None` without pairs.
pub fn median_relative_error(pairs: &[(Duration, Duration)]) -> Option<f64> {
    let mut errs: Vec<f64> = pairs
        .iter()
        .filter(|(_, rtt)| !rtt.is_zero())
        .map(|(est, rtt)| (est.as_secs_f64() - rtt.as_secs_f64()).abs() / rtt.as_secs_f64())
        .collect();
    if errs.is_empty() {
        return None;
    }
    errs.sort_by(f64::total_cmp);
    Some(errs[errs.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regions with one-way-symmetric RTTs (ms) between them: Europe, US
    /// east, US west, Asia, South America; within a region 2 ms.
    const RTT_MS: [[f64; 5]; 5] = [
        [2.0, 80.0, 140.0, 220.0, 190.0],
        [80.0, 2.0, 65.0, 180.0, 120.0],
        [140.0, 65.0, 2.0, 120.0, 170.0],
        [220.0, 180.0, 120.0, 2.0, 300.0],
        [190.0, 120.0, 170.0, 300.0, 2.0],
    ];

    /// A deterministic stream of numbers for the simulation.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn coordinates_learned_from_a_few_neighbours_predict_the_rtt_to_everyone() {
        // 50 nodes in 5 regions; each measures RTTs only to 6 fixed
        // neighbours (as a node does to the peers it is connected to), with
        // ±10% jitter, and never to the other 43.
        let n = 50;
        let region = |i: usize| i % 5;
        let rtt = |i: usize, j: usize| RTT_MS[region(i)][region(j)];
        let mut rng = Lcg(7);
        let neighbours: Vec<Vec<usize>> = (0..n)
            .map(|i| {
                let mut v = Vec::new();
                while v.len() < 6 {
                    let j = (rng.next() as usize) % n;
                    if j != i && !v.contains(&j) {
                        v.push(j);
                    }
                }
                v
            })
            .collect();
        let mut states = vec![State::default(); n];
        for _round in 0..200 {
            for i in 0..n {
                let j = neighbours[i][(rng.next() as usize) % 6];
                let jitter = 0.9 + (rng.next() % 200) as f64 / 1000.0;
                let sample = Duration::from_secs_f64(rtt(i, j) * jitter / 1e3);
                let other = states[j].coordinate();
                assert!(states[i].observe(&other, sample, j as u64 + 1));
            }
        }
        let mut unmeasured = Vec::new();
        for i in 0..n {
            for j in 0..n {
                if i != j && !neighbours[i].contains(&j) && !neighbours[j].contains(&i) {
                    let est = states[i].coordinate().estimate_rtt(&states[j].coordinate());
                    unmeasured.push((est, Duration::from_secs_f64(rtt(i, j) / 1e3)));
                }
            }
        }
        let median = median_relative_error(&unmeasured).expect("pairs");
        println!(
            "vivaldi: median relative error {:.3} over {} pairs never measured",
            median,
            unmeasured.len()
        );
        assert!(median < 0.25, "median relative error {median}");
        // Every coordinate stays announceable.
        for s in &states {
            s.coordinate().check_ranges().expect("in range");
        }
    }

    #[test]
    fn samples_and_coordinates_out_of_range_move_nothing() {
        let mut s = State::default();
        let before = s.clone();
        let peer = Coordinate::default();
        assert!(!s.observe(&peer, Duration::ZERO, 1));
        assert!(!s.observe(&peer, Duration::from_secs(11), 1));
        let far = Coordinate {
            vec: [MAX_COMPONENT_US + 1, 0, 0, 0],
            ..Coordinate::default()
        };
        assert!(far.check_ranges().is_err());
        assert!(!s.observe(&far, Duration::from_millis(20), 1));
        let negative_height = Coordinate {
            height_us: -5,
            ..Coordinate::default()
        };
        assert!(negative_height.check_ranges().is_err());
        let sure = Coordinate {
            error_milli: MAX_ERROR_MILLI + 1,
            ..Coordinate::default()
        };
        assert!(sure.check_ranges().is_err());
        assert_eq!(s, before);
        // Two nodes on the same point separate along some direction.
        assert!(s.observe(&peer, Duration::from_millis(20), 42));
        assert!(s.coordinate().estimate_rtt(&peer) > Duration::ZERO);
    }
}

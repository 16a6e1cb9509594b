//! Worker reputation: what this gateway saw of each worker's jobs, plus the
//! summaries other gateways gossip on the reputation topic, each weighted by
//! its reporter's own standing.
//!
//! A worker's score is the mean of a Beta(1, 1) prior updated with job
//! outcomes (completed vs failed): 0.5 for a worker nobody has used, near 1
//! for one that completes its jobs, near 0 for one that fails them. This
//! gateway's own observations count in full. A report counts for at most
//! [`REPORT_CAP`] jobs per worker, times the reporter's standing, which
//! comes only from what this gateway saw the reporter do as a worker: its
//! own score, scaled down until it has completed [`REPORT_CAP`] jobs here.
//! A reporter this gateway never used has no standing, so its report is
//! not even kept: fresh keys (Sybils) move no score and fill no table
//! (audit F11). A reporter's newer report replaces its older one, nobody's
//! report about itself counts, and a report not renewed for
//! [`REPORT_MAX_AGE`] periods is dropped. Own observations decay by
//! [`DECAY`] at every report period, so old failures fade.
//!
//! [`Reputation`] is the book, pure and synchronous. [`ReputationService`]
//! is the node's task that owns it (no lock): job outcomes and gossiped
//! reports arrive in its inbox, it gossips this gateway's own report every
//! [`REPUTATION_EVERY`], and after each change it publishes every worker's
//! score as one snapshot that requests read through a
//! [`ReputationHandle`] without waiting on the task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use silk_overlay::{OverlayHandle, PeerId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Most jobs one report counts for, per worker.
pub const REPORT_CAP: f64 = 10.0;
/// Factor applied to own observations each report period.
pub const DECAY: f64 = 0.8;
/// Most workers in one report.
pub const MAX_ENTRIES: usize = 256;
/// Report periods after which a reporter's last report stops counting.
pub const REPORT_MAX_AGE: u32 = 10;
/// Most reporters and most workers remembered.
const MAX_TRACKED: usize = 4096;
/// Scores under this rank a worker after every healthier one.
pub const POOR: f64 = 0.25;
/// How often a gateway gossips its own report, then fades its observations.
pub const REPUTATION_EVERY: Duration = Duration::from_secs(30);
/// Room in the reputation task's inbox.
const INBOX: usize = 1024;

/// Outcomes of one worker's jobs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Jobs that completed.
    pub ok: f64,
    /// Jobs that failed (before or after their first token).
    pub failed: f64,
}

impl Tally {
    fn total(&self) -> f64 {
        self.ok + self.failed
    }

    fn scaled(self, f: f64) -> Tally {
        Tally {
            ok: self.ok * f,
            failed: self.failed * f,
        }
    }
}

/// One worker's line in a report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The worker's peer id, as bytes.
    pub worker: Vec<u8>,
    /// What the reporter saw.
    pub tally: Tally,
}

/// What a gateway gossips about the workers it used (postcard, signed by
/// the overlay as the reporter's envelope).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// When it was made, Unix milliseconds; a reporter's reports must grow.
    pub at_ms: u64,
    /// At most [`MAX_ENTRIES`] workers.
    pub entries: Vec<Entry>,
}

/// Why a report was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The payload is not a report.
    #[error("undecodable reputation report")]
    Undecodable,
    /// Too many entries, a bad peer id, or counts that are not finite and ≥ 0.
    #[error("malformed reputation report: {0}")]
    Malformed(&'static str),
    /// Not newer than the reporter's last report.
    #[error("stale reputation report")]
    Stale,
    /// The reporter has not served this gateway, so its word has no weight.
    #[error("reputation report from a reporter without standing here")]
    NoStanding,
}

/// A reporter's last report.
#[derive(Debug, Clone)]
struct Reported {
    at_ms: u64,
    /// Report periods since it came.
    age: u32,
    tallies: HashMap<PeerId, Tally>,
}

/// Reputation book of one gateway.
#[derive(Debug, Default)]
pub struct Reputation {
    own: HashMap<PeerId, Tally>,
    reported: HashMap<PeerId, Reported>,
}

impl Reputation {
    /// Records one job's outcome on `worker`.
    pub fn record(&mut self, worker: PeerId, completed: bool) {
        if !self.own.contains_key(&worker) && self.own.len() >= MAX_TRACKED {
            return;
        }
        let t = self.own.entry(worker).or_default();
        if completed {
            t.ok += 1.0;
        } else {
            t.failed += 1.0;
        }
    }

    /// Fades own observations and ages reports (call once per report
    /// period); drops reports not renewed for [`REPORT_MAX_AGE`] periods.
    pub fn decay(&mut self) {
        for t in self.own.values_mut() {
            *t = t.scaled(DECAY);
        }
        self.own.retain(|_, t| t.total() >= 0.01);
        for r in self.reported.values_mut() {
            r.age = r.age.saturating_add(1);
        }
        self.reported.retain(|_, r| r.age < REPORT_MAX_AGE);
    }

    /// This gateway's own observations as a report, the most-used workers
    /// first; `None` when it has seen nothing.
    pub fn report(&self, at_ms: u64) -> Option<Report> {
        let mut entries: Vec<Entry> = self
            .own
            .iter()
            .map(|(p, t)| Entry {
                worker: p.to_bytes(),
                tally: *t,
            })
            .collect();
        if entries.is_empty() {
            return None;
        }
        entries.sort_by(|a, b| b.tally.total().total_cmp(&a.tally.total()));
        entries.truncate(MAX_ENTRIES);
        Some(Report { at_ms, entries })
    }

    /// Takes `reporter`'s report (postcard bytes), replacing its older one.
    pub fn absorb(&mut self, reporter: PeerId, payload: &[u8]) -> Result<(), ReportError> {
        let report: Report = postcard::from_bytes(payload).map_err(|_| ReportError::Undecodable)?;
        if report.entries.len() > MAX_ENTRIES {
            return Err(ReportError::Malformed("too many entries"));
        }
        if let Some(prev) = self.reported.get(&reporter) {
            if report.at_ms <= prev.at_ms {
                return Err(ReportError::Stale);
            }
        }
        let mut tallies = HashMap::with_capacity(report.entries.len());
        for e in report.entries {
            let worker =
                PeerId::from_bytes(&e.worker).map_err(|_| ReportError::Malformed("peer id"))?;
            let t = e.tally;
            if !(t.ok.is_finite() && t.failed.is_finite() && t.ok >= 0.0 && t.failed >= 0.0) {
                return Err(ReportError::Malformed("counts"));
            }
            if worker != reporter {
                tallies.insert(worker, t);
            }
        }
        if self.standing(&reporter) <= 0.0 {
            // Only reporters this gateway used are kept, so the table is
            // bounded by `own`, which is capped.
            return Err(ReportError::NoStanding);
        }
        self.reported.insert(
            reporter,
            Reported {
                at_ms: report.at_ms,
                age: 0,
                tallies,
            },
        );
        Ok(())
    }

    fn own_score(&self, peer: &PeerId) -> Option<f64> {
        self.own
            .get(peer)
            .filter(|t| t.total() > 0.0)
            .map(|t| (t.ok + 1.0) / (t.total() + 2.0))
    }

    /// How much a reporter's word counts, 0 to 1: its score as a worker
    /// here, times the share of [`REPORT_CAP`] jobs it completed here; 0
    /// for a reporter this gateway never used.
    fn standing(&self, reporter: &PeerId) -> f64 {
        match (self.own_score(reporter), self.own.get(reporter)) {
            (Some(score), Some(t)) => score * (t.ok / REPORT_CAP).min(1.0),
            _ => 0.0,
        }
    }

    /// The worker's score, 0 to 1 (0.5 when nothing is known).
    pub fn score(&self, worker: &PeerId) -> f64 {
        let mut t = self.own.get(worker).copied().unwrap_or_default();
        for (reporter, reported) in &self.reported {
            if let Some(r) = reported.tallies.get(worker) {
                let weight = self.standing(reporter) * (REPORT_CAP / r.total().max(REPORT_CAP));
                t.ok += r.ok * weight;
                t.failed += r.failed * weight;
            }
        }
        (t.ok + 1.0) / (t.total() + 2.0)
    }

    /// Every worker's score that differs from the prior: those this
    /// gateway used and those a kept report names. One pass over the
    /// tallies (each reporter's standing computed once), where calling
    /// [`Reputation::score`] per worker would go over every report per
    /// worker.
    pub fn scores(&self) -> Scores {
        let mut totals: HashMap<PeerId, Tally> = self.own.clone();
        for (reporter, reported) in &self.reported {
            let standing = self.standing(reporter);
            for (worker, r) in &reported.tallies {
                let weight = standing * (REPORT_CAP / r.total().max(REPORT_CAP));
                let t = totals.entry(*worker).or_default();
                t.ok += r.ok * weight;
                t.failed += r.failed * weight;
            }
        }
        totals
            .into_iter()
            .map(|(worker, t)| (worker, (t.ok + 1.0) / (t.total() + 2.0)))
            .collect()
    }
}

/// Worker scores as the reputation task last published them.
pub type Scores = HashMap<PeerId, f64>;

/// What the reputation task is told.
#[derive(Debug)]
enum Input {
    /// A job this gateway placed on `worker` ended.
    Outcome { worker: PeerId, completed: bool },
    /// A report gossiped by `reporter` (postcard bytes).
    Report { reporter: PeerId, payload: Vec<u8> },
}

/// The cheap, cloneable side of [`ReputationService`]: sends it outcomes
/// and reports, reads its latest scores.
#[derive(Debug, Clone)]
pub struct ReputationHandle {
    inbox: mpsc::Sender<Input>,
    scores: watch::Receiver<Arc<Scores>>,
}

impl ReputationHandle {
    /// Records a job's outcome on `worker`. Waits for room in the inbox:
    /// an outcome is never dropped.
    pub async fn record(&self, worker: PeerId, completed: bool) {
        // Fails only once the task has stopped, with the node.
        let _ = self.inbox.send(Input::Outcome { worker, completed }).await;
    }

    /// Hands over a gossiped report. Never waits (the node's event loop
    /// calls it): when the inbox is full the report is dropped, as gossip
    /// may drop it anyway; the reporter sends a newer one next period.
    pub fn offer_report(&self, reporter: PeerId, payload: Vec<u8>) {
        if let Err(mpsc::error::TrySendError::Full(_)) =
            self.inbox.try_send(Input::Report { reporter, payload })
        {
            tracing::debug!(%reporter, "reputation inbox full; report dropped");
        }
    }

    /// A worker's score, 0 to 1 (0.5 when nothing is known).
    pub fn score(&self, worker: &PeerId) -> f64 {
        self.scores.borrow().get(worker).copied().unwrap_or(0.5)
    }

    /// Every score that differs from the prior, as last published.
    pub fn scores(&self) -> Arc<Scores> {
        Arc::clone(&self.scores.borrow())
    }
}

/// The task that owns this gateway's [`Reputation`].
#[derive(Debug)]
pub struct ReputationService {
    book: Reputation,
    inbox: mpsc::Receiver<Input>,
    scores: watch::Sender<Arc<Scores>>,
    overlay: OverlayHandle,
}

impl ReputationService {
    /// A service with an empty book that gossips through `overlay`, and
    /// its handle.
    pub fn new(overlay: OverlayHandle) -> (Self, ReputationHandle) {
        let (tx, inbox) = mpsc::channel(INBOX);
        let (scores, read) = watch::channel(Arc::default());
        let service = Self {
            book: Reputation::default(),
            inbox,
            scores,
            overlay,
        };
        (
            service,
            ReputationHandle {
                inbox: tx,
                scores: read,
            },
        )
    }

    /// Runs until `cancel` fires: takes every input waiting, then publishes
    /// the scores once; gossips and fades every [`REPUTATION_EVERY`].
    #[tracing::instrument(name = "reputation", skip_all)]
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(REPUTATION_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                _ = tick.tick() => {
                    if !self.gossip().await {
                        return;
                    }
                }
                input = self.inbox.recv() => {
                    let Some(input) = input else { return };
                    self.take(input).await;
                    while let Ok(input) = self.inbox.try_recv() {
                        self.take(input).await;
                    }
                }
            }
            let _ = self.scores.send(Arc::new(self.book.scores()));
        }
    }

    async fn take(&mut self, input: Input) {
        match input {
            Input::Outcome { worker, completed } => self.book.record(worker, completed),
            Input::Report { reporter, payload } => match self.book.absorb(reporter, &payload) {
                Ok(()) => {}
                // Stale, from a reporter without standing here, or in a
                // format this version cannot read (version skew, audit
                // F15): not misbehaviour.
                Err(
                    e @ (ReportError::Stale | ReportError::NoStanding | ReportError::Undecodable),
                ) => {
                    tracing::trace!(%reporter, error = %e, "reputation report ignored")
                }
                Err(e) => {
                    tracing::info!(%reporter, error = %e, "bad reputation report");
                    let _ = self
                        .overlay
                        .report_misbehaviour(
                            reporter,
                            silk_overlay::Misbehaviour::UndecodablePayload,
                        )
                        .await;
                }
            },
        }
    }

    /// Publishes this gateway's report, then fades its observations.
    /// Returns false once the overlay has stopped.
    async fn gossip(&mut self) -> bool {
        let report = self.book.report(crate::now_ms());
        self.book.decay();
        let Some(report) = report else { return true };
        match self
            .overlay
            .publish_reputation(crate::protocol::encode(&report))
            .await
        {
            Ok(()) => true,
            Err(silk_overlay::OverlayError::Stopped) => false,
            Err(e) => {
                tracing::debug!(error = %e, "reputation report not published");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(at_ms: u64, entries: &[(PeerId, f64, f64)]) -> Vec<u8> {
        postcard::to_stdvec(&Report {
            at_ms,
            entries: entries
                .iter()
                .map(|(p, ok, failed)| Entry {
                    worker: p.to_bytes(),
                    tally: Tally {
                        ok: *ok,
                        failed: *failed,
                    },
                })
                .collect(),
        })
        .expect("encode")
    }

    #[test]
    fn own_outcomes_move_the_score_and_fade() {
        let (good, bad) = (PeerId::random(), PeerId::random());
        let mut r = Reputation::default();
        assert_eq!(r.score(&good), 0.5);
        for _ in 0..5 {
            r.record(good, true);
            r.record(bad, false);
        }
        assert!(r.score(&good) > 0.8, "{}", r.score(&good));
        assert!(r.score(&bad) < POOR, "{}", r.score(&bad));
        for _ in 0..30 {
            r.decay();
        }
        assert!((r.score(&bad) - 0.5).abs() < 0.05, "{}", r.score(&bad));
    }

    #[test]
    fn reports_count_by_standing_are_capped_and_replace_older_ones() {
        let worker = PeerId::random();
        let (trusted, failing) = (PeerId::random(), PeerId::random());
        let mut r = Reputation::default();
        for _ in 0..8 {
            r.record(trusted, true);
            r.record(failing, false);
        }
        // A trusted reporter saying the worker fails lowers it a lot …
        let mut by_trusted = Reputation {
            own: r.own.clone(),
            ..Reputation::default()
        };
        by_trusted
            .absorb(trusted, &report(1, &[(worker, 0.0, 1000.0)]))
            .expect("absorb");
        // … a reporter that fails its own jobs, much less.
        let mut by_failing = Reputation {
            own: r.own.clone(),
            ..Reputation::default()
        };
        assert_eq!(
            by_failing.absorb(failing, &report(1, &[(worker, 0.0, 1000.0)])),
            Err(ReportError::NoStanding)
        );
        let (t, f) = (by_trusted.score(&worker), by_failing.score(&worker));
        assert!(t < POOR, "{t}");
        assert!(f > t + 0.2, "{f} vs {t}");
        // 1000 failures count as at most REPORT_CAP jobs.
        assert!(t > 1.0 / (REPORT_CAP + 2.0) - 1e-9, "{t}");

        // Stale reports are refused; a newer one replaces the old.
        assert_eq!(
            by_trusted.absorb(trusted, &report(1, &[(worker, 5.0, 0.0)])),
            Err(ReportError::Stale)
        );
        by_trusted
            .absorb(trusted, &report(2, &[(worker, 5.0, 0.0)]))
            .expect("newer");
        assert!(by_trusted.score(&worker) > 0.5);
    }

    #[test]
    fn self_praise_and_garbage_do_not_count() {
        let worker = PeerId::random();
        let mut r = Reputation::default();
        for _ in 0..10 {
            r.record(worker, true);
        }
        let own = r.score(&worker);
        r.absorb(worker, &report(1, &[(worker, 1000.0, 0.0)]))
            .expect("absorb");
        assert_eq!(r.score(&worker), own);
        assert_eq!(r.absorb(worker, b"\xff\xff"), Err(ReportError::Undecodable));
        let nan = report(2, &[(PeerId::random(), f64::NAN, 0.0)]);
        assert!(matches!(
            r.absorb(worker, &nan),
            Err(ReportError::Malformed(_))
        ));
        let bad_peer = postcard::to_stdvec(&Report {
            at_ms: 3,
            entries: vec![Entry {
                worker: vec![1, 2, 3],
                tally: Tally::default(),
            }],
        })
        .expect("encode");
        assert!(matches!(
            r.absorb(worker, &bad_peer),
            Err(ReportError::Malformed(_))
        ));
    }

    #[test]
    fn a_report_round_trips() {
        let mut r = Reputation::default();
        assert!(r.report(1).is_none());
        let w = PeerId::random();
        r.record(w, true);
        let rep = r.report(7).expect("report");
        assert_eq!(rep.entries.len(), 1);
        let mut other = Reputation::default();
        let reporter = PeerId::random();
        for _ in 0..10 {
            other.record(reporter, true);
        }
        other
            .absorb(reporter, &postcard::to_stdvec(&rep).expect("encode"))
            .expect("absorb");
        assert!(other.score(&w) > 0.5);
    }

    /// Audit F11: a reporter this gateway had never seen had standing 0.5,
    /// so N fresh keys landed about 5·N failures on any worker, and 4096
    /// of them filled the reporter table for good. Now they have no
    /// standing: nothing moves and nothing is kept.
    #[test]
    fn sybil_reporters_move_nothing_and_fill_nothing() {
        let worker = PeerId::random();
        let mut r = Reputation::default();
        for _ in 0..3 {
            r.record(worker, true);
        }
        let before = r.score(&worker);
        for _ in 0..200 {
            let sybil = PeerId::random();
            assert_eq!(
                r.absorb(sybil, &report(1, &[(worker, 0.0, 1000.0)])),
                Err(ReportError::NoStanding)
            );
        }
        assert_eq!(r.score(&worker), before);
        assert!(r.reported.is_empty());
    }

    #[test]
    fn a_report_not_renewed_stops_counting() {
        let (worker, reporter) = (PeerId::random(), PeerId::random());
        let mut r = Reputation::default();
        for _ in 0..REPORT_CAP as usize {
            r.record(reporter, true);
        }
        r.absorb(reporter, &report(1, &[(worker, 0.0, 10.0)]))
            .expect("absorb");
        assert!(r.score(&worker) < 0.5);
        for _ in 0..REPORT_MAX_AGE {
            r.decay();
        }
        assert!(r.reported.is_empty());
        assert_eq!(r.score(&worker), 0.5);
    }

    #[test]
    fn the_published_scores_are_the_books_scores_for_every_worker_it_knows() {
        let (good, bad, reporter, named) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        let mut r = Reputation::default();
        assert!(r.scores().is_empty());
        for _ in 0..12 {
            r.record(reporter, true);
        }
        r.record(good, true);
        r.record(bad, false);
        // A worker only a report names is in the scores too.
        r.absorb(reporter, &report(1, &[(named, 0.0, 9.0)]))
            .expect("a reporter with standing");
        let scores = r.scores();
        assert_eq!(scores.len(), 4);
        for p in [good, bad, reporter, named] {
            assert_eq!(scores[&p], r.score(&p), "{p}");
        }
        assert!(scores[&named] < 0.5);
    }
}

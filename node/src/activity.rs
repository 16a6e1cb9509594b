//! What this node did, for the operator: each job that ends is counted
//! (for `/metrics`) and recorded (for the dashboard and `silk status`),
//! and the money in the payment books is sampled over time.
//!
//! The record lives in `<data_dir>/history.redb`, written by one task with
//! an inbox ([`History::run`]) so that no request waits for a disk write:
//! - `jobs`: the last [`KEEP_JOBS`] jobs, oldest pruned;
//! - `minutes`: one row per minute in which something happened, holding
//!   the books' running totals at the end of that minute (earned,
//!   redeemed, charged) and the jobs and tokens of that minute. Rows older
//!   than [`KEEP_MINUTES`] are pruned.
//!
//! The series the dashboard charts ([`History::series`]) are differences
//! of those running totals, so they add up to what the books say. The
//! books stay the record of money: this is a view of them, and losing it
//! loses no money.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::billing::Billing;
use crate::metrics::{JobMetrics, MoneyTotals, Role};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const MINUTES: TableDefinition<u64, &[u8]> = TableDefinition::new("minutes");

/// Jobs kept.
pub const KEEP_JOBS: u64 = 500;
/// Minutes kept: eight days, a week's chart and a day to spare.
pub const KEEP_MINUTES: u64 = 8 * 24 * 60;
/// How often the books are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Records waiting for the writer; past it, records are counted but not kept.
const INBOX: usize = 1024;

/// One job that ended, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// When it ended, Unix milliseconds.
    pub at_ms: u64,
    /// Gateway or worker.
    pub role: Role,
    /// The model id.
    pub model: String,
    /// The worker (for a gateway's job) or the gateway (for a worker's).
    pub peer: String,
    /// Prompt tokens (0 when the job did not finish).
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// From the request's arrival to its first token.
    pub first_token_ms: Option<u64>,
    /// From the request's arrival to its end.
    pub duration_ms: u64,
    /// What the job cost this gateway, nanoTON (gateway jobs with payments).
    pub cost_nanoton: Option<u64>,
    /// `ok`, `failed`, `cancelled`, or a refusal's code.
    pub outcome: String,
}

impl JobRecord {
    /// Decode speed over the time after the first token, tokens/s.
    pub fn tokens_per_s(&self) -> Option<f64> {
        let first = self.first_token_ms?;
        let decode_ms = self.duration_ms.saturating_sub(first);
        (self.completion_tokens > 1 && decode_ms > 0)
            .then(|| f64::from(self.completion_tokens - 1) * 1000.0 / decode_ms as f64)
    }
}

/// One minute's row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Minute {
    /// The books' totals at the end of the minute.
    money: MoneyTotals,
    /// Jobs that ended in the minute, both roles.
    jobs: u32,
    /// Tokens generated in them.
    tokens: u64,
}

/// A span of the chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// The last hour, by minute.
    Hour,
    /// The last day, by quarter hour.
    Day,
    /// The last week, by hour.
    Week,
}

impl Span {
    /// Parses `hour`, `day` or `week`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            "week" => Some(Self::Week),
            _ => None,
        }
    }

    /// Minutes per point, and points.
    fn shape(self) -> (u64, u64) {
        match self {
            Self::Hour => (1, 60),
            Self::Day => (15, 96),
            Self::Week => (60, 168),
        }
    }
}

/// One point of a chart: what happened in `[start_ms, start_ms + step)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Point {
    /// Start of the interval, Unix milliseconds.
    pub start_ms: u64,
    /// nanoTON earned as a worker.
    pub earned_nanoton: u64,
    /// nanoTON spent as a gateway.
    pub charged_nanoton: u64,
    /// Jobs that ended.
    pub jobs: u32,
    /// Tokens generated.
    pub tokens: u64,
}

/// Why the history could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Another process has the file open.
    #[error("{0} is in use by another silk process")]
    InUse(String),
    /// The store failed.
    #[error("history store: {0}")]
    Store(String),
}

fn store_err(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Store(e.to_string())
}

/// The record of this node's jobs and money over time.
#[derive(Clone)]
pub struct History {
    db: Arc<Database>,
    inbox: mpsc::Sender<JobRecord>,
    metrics: JobMetrics,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").finish_non_exhaustive()
    }
}

/// The writer's half: run it with [`History::run`].
pub struct HistoryWriter {
    db: Arc<Database>,
    inbox: mpsc::Receiver<JobRecord>,
}

impl History {
    /// Opens (or creates) the history at `path`. Jobs are counted in
    /// `metrics` as they are recorded.
    pub fn open(path: &Path, metrics: JobMetrics) -> Result<(Self, HistoryWriter), HistoryError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(store_err)?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                HistoryError::InUse(path.display().to_string())
            }
            e => store_err(e),
        })?;
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(JOBS).map_err(store_err)?;
        tx.open_table(MINUTES).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        let db = Arc::new(db);
        let (inbox, rx) = mpsc::channel(INBOX);
        Ok((
            Self {
                db: Arc::clone(&db),
                inbox,
                metrics,
            },
            HistoryWriter { db, inbox: rx },
        ))
    }

    /// Counts a job that ended and hands it to the writer (never waits: a
    /// full inbox drops the record, not the count).
    pub fn job(&self, record: JobRecord) {
        self.metrics.job(&record);
        if self.inbox.try_send(record).is_err() {
            tracing::debug!("history inbox full: a job record was dropped");
        }
    }

    /// The event counters.
    pub fn metrics(&self) -> &JobMetrics {
        &self.metrics
    }

    /// The last `n` jobs, newest first.
    pub fn recent(&self, n: usize) -> Result<Vec<JobRecord>, HistoryError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let t = tx.open_table(JOBS).map_err(store_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(store_err)?.rev().take(n) {
            let (_, v) = row.map_err(store_err)?;
            match postcard::from_bytes::<JobRecord>(v.value()) {
                Ok(r) => out.push(r),
                Err(e) => tracing::debug!(error = %e, "unreadable job record skipped"),
            }
        }
        Ok(out)
    }

    /// The chart of `span` ending at `now_ms`: one point per interval,
    /// oldest first.
    pub fn series(&self, span: Span, now_ms: u64) -> Result<Vec<Point>, HistoryError> {
        let (step, points) = span.shape();
        let now_min = now_ms / 60_000;
        // The last interval holds the current minute.
        let first = (now_min / step + 1).saturating_sub(points) * step;
        let end = (now_min / step + 1) * step;
        let tx = self.db.begin_read().map_err(store_err)?;
        let t = tx.open_table(MINUTES).map_err(store_err)?;
        let decode = |v: &[u8]| postcard::from_bytes::<Minute>(v).unwrap_or_default();
        // The totals before the chart starts.
        let mut before = match t.range(..first).map_err(store_err)?.next_back() {
            Some(row) => decode(row.map_err(store_err)?.1.value()).money,
            None => MoneyTotals::default(),
        };
        let mut out: Vec<Point> = (0..points)
            .map(|i| Point {
                start_ms: (first + i * step) * 60_000,
                ..Point::default()
            })
            .collect();
        let mut closing: Vec<Option<MoneyTotals>> = vec![None; out.len()];
        for row in t.range(first..end).map_err(store_err)? {
            let (k, v) = row.map_err(store_err)?;
            let minute = decode(v.value());
            let bucket = ((k.value() - first) / step) as usize;
            if let Some(p) = out.get_mut(bucket) {
                p.jobs = p.jobs.saturating_add(minute.jobs);
                p.tokens = p.tokens.saturating_add(minute.tokens);
                closing[bucket] = Some(minute.money);
            }
        }
        for (p, close) in out.iter_mut().zip(closing) {
            if let Some(close) = close {
                p.earned_nanoton = close.earned.saturating_sub(before.earned);
                p.charged_nanoton = close.charged.saturating_sub(before.charged);
                before = close;
            }
        }
        Ok(out)
    }

    /// The writer: records jobs as they come and samples `billing`'s books
    /// every few seconds, until `cancel` fires (then writes what is left).
    pub async fn run(
        writer: HistoryWriter,
        billing: Option<Arc<Billing>>,
        cancel: CancellationToken,
    ) {
        let HistoryWriter { db, mut inbox } = writer;
        let mut money = last_money(&db).unwrap_or_default();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut batch = Vec::new();
            let stopping = tokio::select! {
                () = cancel.cancelled() => true,
                Some(r) = inbox.recv() => { batch.push(r); false }
                _ = tick.tick() => false,
            };
            while let Ok(r) = inbox.try_recv() {
                batch.push(r);
            }
            let sampled = billing.as_deref().map(MoneyTotals::of);
            let changed = sampled.is_some_and(|m| m != money);
            if let Some(m) = sampled {
                money = m;
            }
            if !batch.is_empty() || changed {
                let db = Arc::clone(&db);
                let write = tokio::task::spawn_blocking(move || write(&db, &batch, money)).await;
                match write {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not write the history"),
                    Err(e) => tracing::warn!(error = %e, "history writer failed"),
                }
            }
            if stopping {
                return;
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The totals in the newest row.
fn last_money(db: &Database) -> Result<MoneyTotals, HistoryError> {
    let tx = db.begin_read().map_err(store_err)?;
    let t = tx.open_table(MINUTES).map_err(store_err)?;
    let money = match t.last().map_err(store_err)? {
        Some((_, v)) => {
            postcard::from_bytes::<Minute>(v.value())
                .unwrap_or_default()
                .money
        }
        None => MoneyTotals::default(),
    };
    Ok(money)
}

/// Writes `jobs` and the books' `money` totals into the current minute's
/// row, in one transaction, and prunes.
fn write(db: &Database, jobs: &[JobRecord], money: MoneyTotals) -> Result<(), HistoryError> {
    let now_min = unix_ms() / 60_000;
    let tx = db.begin_write().map_err(store_err)?;
    {
        let mut t = tx.open_table(JOBS).map_err(store_err)?;
        let mut next = match t.last().map_err(store_err)? {
            Some((k, _)) => k.value() + 1,
            None => 0,
        };
        for job in jobs {
            let bytes = postcard::to_allocvec(job).map_err(store_err)?;
            t.insert(next, bytes.as_slice()).map_err(store_err)?;
            next += 1;
        }
        let keep_from = next.saturating_sub(KEEP_JOBS);
        t.retain_in(..keep_from, |_, _| false).map_err(store_err)?;
    }
    {
        let mut t = tx.open_table(MINUTES).map_err(store_err)?;
        let mut row = match t.get(now_min).map_err(store_err)? {
            Some(v) => postcard::from_bytes::<Minute>(v.value()).unwrap_or_default(),
            None => Minute::default(),
        };
        row.money = money;
        for job in jobs {
            row.jobs = row.jobs.saturating_add(1);
            row.tokens = row.tokens.saturating_add(u64::from(job.completion_tokens));
        }
        let bytes = postcard::to_allocvec(&row).map_err(store_err)?;
        t.insert(now_min, bytes.as_slice()).map_err(store_err)?;
        t.retain_in(..now_min.saturating_sub(KEEP_MINUTES), |_, _| false)
            .map_err(store_err)?;
    }
    tx.commit().map_err(store_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(tokens: u32) -> JobRecord {
        JobRecord {
            at_ms: unix_ms(),
            role: Role::Gateway,
            model: "m".into(),
            peer: "p".into(),
            prompt_tokens: 3,
            completion_tokens: tokens,
            first_token_ms: Some(10),
            duration_ms: 110,
            cost_nanoton: Some(5),
            outcome: "ok".into(),
        }
    }

    fn open() -> (tempfile::TempDir, History, HistoryWriter) {
        let dir = tempfile::tempdir().expect("test");
        let (h, w) =
            History::open(&dir.path().join("history.redb"), JobMetrics::default()).expect("test");
        (dir, h, w)
    }

    #[test]
    fn jobs_are_kept_newest_first_and_pruned_past_the_cap() {
        let (_dir, h, _w) = open();
        for i in 0..(KEEP_JOBS + 7) {
            write(&h.db, &[job(i as u32)], MoneyTotals::default()).expect("test");
        }
        let recent = h.recent(usize::MAX).expect("test");
        assert_eq!(recent.len() as u64, KEEP_JOBS);
        assert_eq!(recent[0].completion_tokens as u64, KEEP_JOBS + 6);
        assert_eq!(recent.last().expect("test").completion_tokens, 7);
    }

    #[test]
    fn series_are_differences_of_the_books_totals() {
        let (_dir, h, _w) = open();
        let now_min = unix_ms() / 60_000;
        let put = |minute: u64, earned: u64, charged: u64, jobs: u32| {
            let tx = h.db.begin_write().expect("test");
            {
                let mut t = tx.open_table(MINUTES).expect("test");
                let row = Minute {
                    money: MoneyTotals {
                        earned,
                        charged,
                        ..MoneyTotals::default()
                    },
                    jobs,
                    tokens: u64::from(jobs) * 10,
                };
                t.insert(
                    minute,
                    postcard::to_allocvec(&row).expect("test").as_slice(),
                )
                .expect("test");
            }
            tx.commit().expect("test");
        };
        // Before the hour's chart, during it (twice in one minute's row: the
        // later totals stand), and now.
        put(now_min - 120, 1_000, 50, 1);
        put(now_min - 30, 1_400, 50, 2);
        put(now_min - 29, 1_500, 80, 1);
        put(now_min, 2_000, 80, 3);
        let s = h.series(Span::Hour, now_min * 60_000 + 5).expect("test");
        assert_eq!(s.len(), 60);
        assert_eq!(s.last().expect("test").start_ms, now_min * 60_000);
        assert_eq!(s[59 - 30].earned_nanoton, 400);
        assert_eq!(s[59 - 29].earned_nanoton, 100);
        assert_eq!(s[59 - 29].charged_nanoton, 30);
        assert_eq!(s[59].earned_nanoton, 500);
        let earned: u64 = s.iter().map(|p| p.earned_nanoton).sum();
        assert_eq!(earned, 1_000, "the chart adds up to the books' growth");
        assert_eq!(s.iter().map(|p| p.jobs).sum::<u32>(), 6);
        // A week: the first row falls into the chart too.
        let w = h.series(Span::Week, now_min * 60_000).expect("test");
        assert_eq!(w.len(), 168);
        assert_eq!(w.iter().map(|p| p.earned_nanoton).sum::<u64>(), 2_000);
        assert_eq!(w.iter().map(|p| p.jobs).sum::<u32>(), 7);
    }

    #[tokio::test]
    async fn the_writer_records_jobs_and_counts_them() {
        let (_dir, h, w) = open();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(History::run(w, None, cancel.clone()));
        h.job(job(4));
        h.job(job(5));
        cancel.cancel();
        task.await.expect("test");
        let recent = h.recent(10).expect("test");
        assert_eq!(recent.len(), 2, "written before the writer stopped");
        assert_eq!(h.metrics().jobs_by_outcome(Role::Gateway), vec![("ok", 2)]);
        // Both jobs are in the last hour's chart (in the last minute, or the
        // one before if a minute turned since they were written).
        let s = h.series(Span::Hour, unix_ms()).expect("test");
        assert_eq!(s.iter().map(|p| p.tokens).sum::<u64>(), 9);
        assert_eq!(s.iter().map(|p| p.jobs).sum::<u32>(), 2);
    }
}

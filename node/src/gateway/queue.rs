//! The gateway's queue: a request that finds every worker for its model at
//! capacity waits here, in arrival order, for a slot, instead of getting a
//! 429 at once.
//!
//! A slot is this gateway's cap on jobs per worker (`Saturated`) or a
//! worker's own engine queue (every attempt answered `Busy`). Waiting
//! requests of one model pass a turnstile (tokio's semaphore, which is
//! first come first served) one at a time: the one at the head retries
//! when one of this gateway's jobs ends ([`JobQueue::slot_freed`]) and at
//! least every [`RETRY_EVERY`] (a worker's slots also free up when other
//! gateways' jobs end, which this gateway does not see), then passes the
//! turnstile on. While a model has requests waiting, a new one joins the
//! back instead of trying first. The queue holds at most
//! [`QueueConfig::limit`] requests over all models and each waits at most
//! [`QueueConfig::timeout`]; past either the caller gets a 429 with
//! `Retry-After`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

/// How often the request at the head of a queue retries when nothing of
/// this gateway's frees a slot.
pub const RETRY_EVERY: Duration = Duration::from_millis(250);

/// Bounds of the gateway's queue (config.toml `queue_limit`,
/// `queue_timeout_s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Most requests waiting at once, over all models; 0 turns the queue
    /// off (a request that finds no free slot gets a 429 at once).
    pub limit: usize,
    /// Longest a request waits for a slot.
    pub timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            limit: 256,
            timeout: Duration::from_secs(30),
        }
    }
}

/// One model's line: its turnstile and how many wait at it.
#[derive(Debug)]
struct Line {
    turnstile: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
}

/// Requests waiting for a slot, per model.
#[derive(Debug)]
pub struct JobQueue {
    config: QueueConfig,
    waiting: Arc<AtomicUsize>,
    lines: Mutex<HashMap<String, Line>>,
    freed: Notify,
}

/// A request's place in the queue; leaving (drop) frees it.
#[derive(Debug)]
pub struct Ticket {
    turnstile: Arc<Semaphore>,
    line: Arc<AtomicUsize>,
    all: Arc<AtomicUsize>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.line.fetch_sub(1, Ordering::SeqCst);
        self.all.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticket {
    /// Waits for this request's turn at the head of its model's line.
    pub async fn turn(&self) -> tokio::sync::SemaphorePermit<'_> {
        // The semaphore is never closed.
        self.turnstile
            .acquire()
            .await
            .unwrap_or_else(|_| unreachable!("the turnstile is never closed"))
    }
}

impl JobQueue {
    /// An empty queue with these bounds.
    pub fn new(config: QueueConfig) -> Self {
        Self {
            config,
            waiting: Arc::default(),
            lines: Mutex::default(),
            freed: Notify::new(),
        }
    }

    /// Its bounds.
    pub fn config(&self) -> QueueConfig {
        self.config
    }

    /// Requests of `model` waiting now.
    pub fn waiting_for(&self, model: &str) -> usize {
        self.lines
            .lock()
            .ok()
            .and_then(|l| l.get(model).map(|l| l.waiting.load(Ordering::SeqCst)))
            .unwrap_or(0)
    }

    /// Requests waiting now, over all models.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Joins `model`'s line, or `None` when the queue is full.
    pub fn enter(&self, model: &str) -> Option<Ticket> {
        let admitted = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.config.limit).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            return None;
        }
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        // Lines nobody waits at are dropped, so the map holds only models
        // with requests waiting (plus this one).
        lines.retain(|_, l| l.waiting.load(Ordering::SeqCst) > 0);
        let line = lines.entry(model.to_string()).or_insert_with(|| Line {
            turnstile: Arc::new(Semaphore::new(1)),
            waiting: Arc::default(),
        });
        line.waiting.fetch_add(1, Ordering::SeqCst);
        Some(Ticket {
            turnstile: Arc::clone(&line.turnstile),
            line: Arc::clone(&line.waiting),
            all: Arc::clone(&self.waiting),
        })
    }

    /// One of this gateway's jobs ended: the heads of the lines retry.
    pub fn slot_freed(&self) {
        self.freed.notify_waiters();
    }

    /// A registration for the next [`JobQueue::slot_freed`]: make it (and
    /// `enable` it) before the attempt that may find no slot, so a job
    /// that ends in between is not missed.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_admits_up_to_its_limit_and_forgets_who_left() {
        let q = JobQueue::new(QueueConfig {
            limit: 2,
            timeout: Duration::from_secs(1),
        });
        let a = q.enter("m").expect("room");
        let b = q.enter("n").expect("room");
        assert!(
            q.enter("m").is_none(),
            "a third request past the limit of 2"
        );
        assert_eq!(
            (q.waiting_for("m"), q.waiting_for("n"), q.waiting()),
            (1, 1, 2)
        );
        drop(a);
        assert_eq!((q.waiting_for("m"), q.waiting()), (0, 1));
        let _c = q.enter("m").expect("room again");
        drop(b);
        assert_eq!(q.waiting(), 1);
        let off = JobQueue::new(QueueConfig {
            limit: 0,
            timeout: Duration::from_secs(1),
        });
        assert!(off.enter("m").is_none(), "a queue of 0 admits nobody");
    }

    #[tokio::test]
    async fn turns_come_in_arrival_order() {
        let q = Arc::new(JobQueue::new(QueueConfig::default()));
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = q.enter("m").expect("room");
        let held = first.turn().await;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let ticket = q.enter("m").expect("room");
            let order = Arc::clone(&order);
            tasks.push(tokio::spawn(async move {
                let _turn = ticket.turn().await;
                order.lock().expect("lock").push(i);
            }));
            // Each joins the turnstile's line before the next is made.
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(*order.lock().expect("lock"), (0..8).collect::<Vec<_>>());
        drop(first);
        assert_eq!(q.waiting(), 0);
    }
}

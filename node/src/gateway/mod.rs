//! The gateway: takes a request, picks a worker, forwards the job, pays.
//!
//! [`Gateway`] owns everything a request reads or changes: the
//! [`WorkerTable`] (every worker's latest announcement and this node's RTT
//! to it), the attestation appraiser and its verdicts, this gateway's jobs
//! in flight per worker, recent failures, and the DHT lookups it reuses.
//! The node's router offers it each announcement the overlay accepts; the
//! node's own announcer offers this node's; and a keeper task re-reads the
//! overlay's book and ping RTTs every [`TABLE_SYNC`] (overlay events are
//! dropped when their channel is full, so the table never trusts them
//! alone). A request reads the table in memory: no round trip to the
//! overlay task, no copy of the whole book per request.
//!
//! - [`select`]: candidates for a request, filtered by context window,
//!   attestation, price and per-worker cap ([`select::select`] is the pure
//!   part), ranked by [`routing::rank`].
//! - [`attestation`]: the policy applied to a worker's document.
//! - [`forward`]: one attempt on one worker, retries before the first
//!   token, failover after it (the relay).
//! - [`pay`]: reservations before a job, settlement and the cheque after.
//! - [`error`]: why an attempt or a request failed, by cause.
//! - [`models`]: which model id a request's name means.
//! - [`context`]: the context-window check before any worker is asked.
//! - [`queue`]: requests that find no free slot wait for one, in order.

pub mod attestation;
pub mod context;
pub mod error;
mod forward;
pub mod models;
mod pay;
pub mod queue;
pub mod routing;
pub mod select;
mod table;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::Instrument;

use silk_overlay::{Announcement, AttestationMode, OverlayHandle, PeerId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::activity::{History, JobRecord};
use crate::api::keys::SpendHold;
use crate::attest::{self, Policy};
use crate::billing::Billing;
use crate::metrics::Role;
use crate::node::NodeOptions;
use crate::protocol::{JobRequest, JobUsage, TokenChunk};
use crate::reputation::ReputationHandle;
use crate::worker::WorkerService;
use crate::{now_ms, MeshError};

pub use error::{AttemptError, Attempts, DispatchError, FailureCause};
pub use models::{default_pinned_models, model_name, pick_model};
pub use table::{WorkerTable, TABLE_SYNC};

use context::PromptCounter;
use queue::JobQueue;

/// A peer id fixed by `n`, for the gateway's unit tests.
#[cfg(test)]
pub(crate) fn test_peer(n: u8) -> PeerId {
    silk_overlay::testing::seeded_keypair(u64::from(n))
        .public()
        .to_peer_id()
}

/// Default of [`NodeOptions::job_progress_timeout`]: the overlay's idle
/// timeout for a frame.
pub const JOB_PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// A job the gateway placed on a worker, first frame received.
#[derive(Debug)]
pub struct Dispatch {
    /// The worker.
    pub worker: PeerId,
    /// Its attestation mode.
    pub attestation: AttestationMode,
    /// The model id.
    pub model: String,
    /// Frames, first one included; ends with `Done` or `Failed`.
    pub events: mpsc::Receiver<JobEvent>,
}

/// What the gateway streams to the API.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// Generated tokens.
    Token(TokenChunk),
    /// The job finished.
    Done {
        /// What the worker counted.
        usage: JobUsage,
        /// What the job cost this gateway in nanoTON (zero on a worker that
        /// charges nothing); `None` if settling it failed.
        cost: Option<silk_chain::Coins>,
    },
    /// The job failed after its first token.
    Failed(String),
}

/// The gateway's state and its request path. Shared behind an `Arc` by the
/// node, the API and the gateway's own tasks.
pub struct Gateway {
    overlay: OverlayHandle,
    me: PeerId,
    /// This node's own worker, when it is one: a job placed on it runs on
    /// the local engine, unpaid.
    local: Option<Arc<WorkerService>>,
    allow_insecure: bool,
    default_max_coefficient_milli: u32,
    billing: Option<Arc<Billing>>,
    max_jobs_per_worker: u32,
    job_progress_timeout: Duration,
    /// Model ids a name resolves to first (audit F10).
    pinned_models: Vec<String>,
    /// Every worker's latest announcement and RTT, read by each request.
    workers: RwLock<WorkerTable>,
    /// Counts prompt tokens for the context-window check before dispatch.
    prompt_counter: PromptCounter,
    appraiser: Mutex<attest::Appraiser>,
    /// Attestation requests a peer left unanswered, by (peer, digest).
    attest_unanswered: Mutex<HashMap<(PeerId, [u8; 32]), Instant>>,
    /// The last DHT lookup per model: when, and the workers it found.
    dht_lookups: Mutex<HashMap<String, (Instant, Vec<Announcement>)>>,
    /// This gateway's jobs running on each worker.
    in_flight: Arc<Mutex<HashMap<PeerId, u32>>>,
    /// Requests waiting for a free slot.
    queue: Arc<JobQueue>,
    /// When each worker last failed or was busy.
    failures: Mutex<HashMap<PeerId, Instant>>,
    reputation: ReputationHandle,
    /// Where each job's end is counted and recorded.
    history: History,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("peer_id", &self.me)
            .finish_non_exhaustive()
    }
}

/// Whole milliseconds of `d`.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Gateway {
    /// The queue of requests waiting for a free worker slot.
    pub fn queue(&self) -> Arc<JobQueue> {
        Arc::clone(&self.queue)
    }

    /// Waits in the queue for a free slot and places `request` there
    /// (see [`queue`]): 429 errors when the queue is full or the wait
    /// passes its deadline.
    async fn place_queued(
        &self,
        request: &JobRequest,
        max_coefficient: u32,
        prefer: Option<PeerId>,
    ) -> Result<(PeerId, AttestationMode, forward::Attempt), DispatchError> {
        let config = self.queue.config();
        let model = request.model.clone();
        let Some(ticket) = self.queue.enter(&model) else {
            return Err(DispatchError::QueueFull {
                model,
                limit: config.limit,
            });
        };
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + config.timeout;
        let timed_out = || DispatchError::QueueTimeout {
            model: request.model.clone(),
            waited: started.elapsed(),
        };
        let _turn = tokio::time::timeout_at(deadline, ticket.turn())
            .await
            .map_err(|_| timed_out())?;
        loop {
            let freed = self.queue.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.place(request, max_coefficient, &[], prefer).await {
                Err(e) if self.may_wait(&e, &request.model) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(timed_out());
                    }
                    let wait = queue::RETRY_EVERY.min(deadline - now);
                    let _ = tokio::time::timeout(wait, freed).await;
                }
                other => {
                    if let Ok((worker, ..)) = &other {
                        tracing::debug!(%worker, waited_ms = started.elapsed().as_millis() as u64, "a queued request found a slot");
                    }
                    return other;
                }
            }
        }
    }

    /// Whether a request that failed with `e` may wait for a slot: every
    /// worker was at capacity, or the workers with room all failed while
    /// others serving `model` are at this gateway's cap (their slots will
    /// free up; a burst must not turn one worker's failure into a 503).
    fn may_wait(&self, e: &DispatchError, model: &str) -> bool {
        if e.is_saturation() {
            return true;
        }
        if !matches!(e, DispatchError::AllFailed(_)) {
            return false;
        }
        let in_flight = self.in_flight.lock().map(|m| m.clone()).unwrap_or_default();
        self.known_workers().iter().any(|a| {
            a.models.iter().any(|m| m == model)
                && in_flight.get(&a.peer_id).copied().unwrap_or(0) >= self.max_jobs_per_worker
        })
    }

    /// Requests waiting for a free slot now.
    pub fn queued(&self) -> usize {
        self.queue.waiting()
    }

    /// A gateway with an empty worker table, with the attestation policy,
    /// collateral source and payment settings of `options`.
    pub fn new(
        options: &NodeOptions,
        overlay: OverlayHandle,
        local: Option<Arc<WorkerService>>,
        reputation: ReputationHandle,
        history: History,
        cancel: CancellationToken,
    ) -> Result<Self, MeshError> {
        let policy = match &options.attestation_policy {
            Some(path) => Policy::load(path)?,
            None => Policy::default(),
        };
        let cache =
            attest::CollateralCache::new(options.data_dir.join("attest").join("collateral"));
        let collateral = match &options.pccs_url {
            Some(url) => attest::CollateralSource::with_pccs(cache, attest::PccsClient::new(url)),
            None => attest::CollateralSource::offline(cache),
        };
        let prompt_counter = PromptCounter::new(
            options.models_dir.clone(),
            local
                .as_ref()
                .map(|w| (w.model().id.clone(), w.engine().clone())),
        );
        Ok(Self {
            me: overlay.local_peer_id(),
            overlay,
            local,
            allow_insecure: options.allow_insecure_workers,
            default_max_coefficient_milli: options.default_max_coefficient_milli,
            billing: options.billing.clone(),
            max_jobs_per_worker: options.max_jobs_per_worker.max(1),
            job_progress_timeout: options.job_progress_timeout,
            pinned_models: options.pinned_models.clone(),
            workers: RwLock::default(),
            prompt_counter,
            appraiser: Mutex::new(
                attest::Appraiser::new(policy, options.allow_insecure_workers)
                    .with_collateral_source(collateral),
            ),
            attest_unanswered: Mutex::default(),
            dht_lookups: Mutex::default(),
            in_flight: Arc::default(),
            queue: Arc::new(JobQueue::new(options.queue)),
            failures: Mutex::default(),
            reputation,
            history,
            cancel,
        })
    }

    /// Whether this gateway routes to insecure workers.
    pub fn allows_insecure(&self) -> bool {
        self.allow_insecure
    }

    /// A worker's reputation here, 0 to 1.
    pub fn reputation_of(&self, worker: &PeerId) -> f64 {
        self.reputation.score(worker)
    }

    /// Takes a worker's announcement into the table (a later one replaces
    /// an earlier one, never the reverse).
    pub fn offer(&self, a: Announcement) {
        if let Ok(mut t) = self.workers.write() {
            t.offer(a);
        }
    }

    /// Forgets the RTT of a peer that disconnected.
    pub fn disconnected(&self, peer: &PeerId) {
        if let Ok(mut t) = self.workers.write() {
            t.disconnected(peer);
        }
    }

    /// Resolves the model a request names (id, name, or none when the mesh
    /// serves exactly one model) against the current announcements.
    pub fn resolve_model(&self, wanted: Option<&str>) -> Result<String, DispatchError> {
        let Ok(table) = self.workers.read() else {
            return Err(DispatchError::UnknownModel(
                wanted.unwrap_or("default").to_string(),
            ));
        };
        let served: Vec<(&str, PeerId)> = table
            .current(now_ms())
            .flat_map(|a| a.models.iter().map(move |m| (m.as_str(), a.peer_id)))
            .collect();
        pick_model(wanted, &served, &self.pinned_models)
    }

    /// The workers this gateway routes to: each one's latest unexpired
    /// announcement, this node's own included.
    pub fn known_workers(&self) -> Vec<Announcement> {
        self.workers
            .read()
            .map(|t| t.current(now_ms()).cloned().collect())
            .unwrap_or_default()
    }

    /// Keeps the worker table in step with the overlay's book and ping
    /// RTTs, every [`TABLE_SYNC`], until the node stops.
    pub async fn table_keeper(self: Arc<Self>) {
        let own = self.local.as_ref().map(|_| self.me);
        let mut tick = tokio::time::interval(TABLE_SYNC);
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (book, peers, coordinate) = match (
                self.overlay.announcements().await,
                self.overlay.peers().await,
                self.overlay.coordinate().await,
            ) {
                (Ok(b), Ok(p), Ok(c)) => (b, p, c),
                (Err(silk_overlay::OverlayError::Stopped), _, _)
                | (_, Err(silk_overlay::OverlayError::Stopped), _)
                | (_, _, Err(silk_overlay::OverlayError::Stopped)) => return,
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    tracing::warn!(error = %e, "could not read the overlay's workers");
                    continue;
                }
            };
            if let Ok(mut t) = self.workers.write() {
                t.sync(book, own);
                t.set_coordinate(coordinate);
                t.set_rtts(
                    peers
                        .into_iter()
                        .filter_map(|p| p.rtt.map(|r| (p.peer_id, r))),
                );
                t.prune(now_ms());
            }
        }
    }

    /// The most `request` can cost this gateway: its prompt bound and
    /// `max_tokens` at the highest coefficient it accepts, at this node's
    /// prices. Zero on a node without payments; the largest amount when
    /// the price overflows, so a spend cap refuses it.
    pub fn worst_case_cost(
        &self,
        request: &JobRequest,
        max_coefficient_milli: Option<u32>,
    ) -> silk_chain::Coins {
        let Some(billing) = &self.billing else {
            return silk_chain::Coins::ZERO;
        };
        let max = crate::payments::capped_coefficient(
            max_coefficient_milli,
            self.default_max_coefficient_milli,
        );
        billing
            .payments()
            .config()
            .price
            .worst_case(
                max,
                request.prompt_tokens_bound(),
                u64::from(request.max_tokens),
            )
            .unwrap_or(silk_chain::Coins(u128::MAX))
    }

    /// Places `request` (its `model` already resolved to an id) on the best
    /// worker whose coefficient is at most the node's maximum, or
    /// `max_coefficient_milli` when the caller asked for less, retrying the
    /// next candidate while no token has arrived. With payments, the job's
    /// worst case is reserved on the lane to the worker first and released
    /// if the worker fails. `spend`, the caller's API-key hold, is settled
    /// with what the job cost when it ends (before its last event), or
    /// dropped if no worker took it.
    ///
    /// A worker that fails after the first token is not the caller's
    /// problem: the job goes on on another worker serving the same id, from
    /// the prompt plus the tokens already delivered (see [`forward`]).
    pub async fn dispatch(
        self: &Arc<Self>,
        request: JobRequest,
        max_coefficient_milli: Option<u32>,
        spend: Option<SpendHold>,
    ) -> Result<Dispatch, DispatchError> {
        self.dispatch_to(request, max_coefficient_milli, spend, None)
            .await
    }

    /// [`Gateway::dispatch`], placing the job on `worker` when it is a
    /// candidate at all (else as usual). A request's `n` choices are `n`
    /// jobs with one prompt: the first goes where `dispatch` puts it, the
    /// others to the same worker, whose engine then reads the prompt once
    /// (its later choices fork from the first's prefill).
    pub async fn dispatch_near(
        self: &Arc<Self>,
        request: JobRequest,
        max_coefficient_milli: Option<u32>,
        spend: Option<SpendHold>,
        worker: PeerId,
    ) -> Result<Dispatch, DispatchError> {
        self.dispatch_to(request, max_coefficient_milli, spend, Some(worker))
            .await
    }

    async fn dispatch_to(
        self: &Arc<Self>,
        request: JobRequest,
        max_coefficient_milli: Option<u32>,
        spend: Option<SpendHold>,
        prefer: Option<PeerId>,
    ) -> Result<Dispatch, DispatchError> {
        let started = Instant::now();
        let max_coefficient = crate::payments::capped_coefficient(
            max_coefficient_milli,
            self.default_max_coefficient_milli,
        );
        // While others wait for this model, a new request joins the back.
        let placed = if self.queue.waiting_for(&request.model) == 0 {
            self.place(&request, max_coefficient, &[], prefer).await
        } else {
            Err(DispatchError::Saturated(request.model.clone()))
        };
        let (worker, attestation, attempt) = match placed {
            // A queue of 0 is off: the first answer stands.
            Err(e) if self.may_wait(&e, &request.model) && self.queue.config().limit > 0 => {
                self.place_queued(&request, max_coefficient, prefer).await
            }
            other => other,
        }
        .inspect_err(|e| {
            self.history.job(JobRecord {
                at_ms: now_ms(),
                role: Role::Gateway,
                model: request.model.clone(),
                peer: String::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
                first_token_ms: None,
                duration_ms: millis(started.elapsed()),
                cost_nanoton: None,
                outcome: e.code().to_string(),
            });
        })?;
        let (tx, events) = mpsc::channel(forward::JOB_CHANNEL);
        let model = request.model.clone();
        tokio::spawn(
            Arc::clone(self)
                .relay(
                    request,
                    max_coefficient,
                    (worker, attempt),
                    spend,
                    tx,
                    started,
                )
                .in_current_span(),
        );
        Ok(Dispatch {
            worker,
            attestation,
            model,
            events,
        })
    }
}

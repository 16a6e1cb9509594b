//! One running node: the overlay, the engine (on workers), the announcement
//! loop, the inbound-job loop, and the gateway's dispatch with retries.
//!
//! # Tasks
//!
//! [`Node::start`] spawns its long-lived tasks into one `JoinSet`, under one
//! [`CancellationToken`]; [`Node::shutdown_and_wait`] cancels and awaits
//! them (`silk run` does so on Ctrl-C, so a redemption pass in progress
//! finishes):
//! - the *event loop*: overlay events → worker jobs (each in its own task,
//!   bounded by the overlay's inbound-job limit), attestation requests,
//!   reputation reports, and announcements into the worker table;
//! - the *worker-table keeper* (see [`crate::gateway`]) and the *reputation
//!   reporter*; the attestation refresh;
//! - on workers, the *announcer*: re-announces load every
//!   [`ANNOUNCE_EVERY`] and within [`ANNOUNCE_POLL`] of a load change, and
//!   with payments, the worker's payment duties (overdue jobs, redemption).
//!
//! Each gateway job has a relay task (see [`Node::relay`]) and, per worker
//! it runs on, one forwarding task that reads the worker's frames into a
//! bounded channel; dropping the receiver drops the job stream, which
//! resets it and so cancels the job on the worker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use silk_inference::{backend::Device, Engine, EngineConfig, Event, ModelStore};
use silk_overlay::{
    Announcement, AttestationMode, JobErrorCode, JobFrame, Multiaddr, Overlay, OverlayConfig,
    OverlayEvent, OverlayHandle, PeerId,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::api::keys::SpendHold;
use crate::attest::{self, AttestationDocument, Claims, Hex, NodeIdentity, Policy, TsmReport};
use crate::billing::{Billing, Delivery};
use crate::context::{self, PromptCounter};
use crate::gateway::{WorkerTable, TABLE_SYNC};
use crate::jobs::{self, JobMessage, JobRequest, JobUsage, PaymentTerms, TokenChunk};
use crate::payments::Reservation;
use crate::reputation::Reputation;
use crate::routing::{self, Candidate};
use crate::MeshError;

/// How often a worker re-announces even when nothing changed.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);
/// How often a worker looks for load changes to announce.
pub const ANNOUNCE_POLL: Duration = Duration::from_millis(250);
/// Lifetime of one announcement.
const ANNOUNCE_TTL: Duration = Duration::from_secs(45);
/// A worker that failed a job is ranked last for this long.
const FAILURE_MEMORY: Duration = Duration::from_secs(30);
/// How long a DHT provider lookup for a model is reused. The DHT is the
/// fallback when gossip knows fewer than two workers for a model; asking it
/// on every request added its round trips (about 2 ms on loopback) to
/// every job of a small mesh.
const DHT_LOOKUP_REUSE: Duration = ANNOUNCE_EVERY;
/// Tokens buffered between a worker's stream and the HTTP response.
const JOB_CHANNEL: usize = 64;
/// Candidates tried before giving up.
const MAX_ATTEMPTS: usize = 4;
/// Workers a job may go on on after the first failed midway.
const MAX_CONTINUATIONS: usize = 2;
/// Every attestation check of one request's candidates ends within this.
const ATTESTATION_CHECKS: Duration = Duration::from_secs(5);
/// A peer that left an attestation request unanswered is not asked again
/// for this long.
const UNANSWERED_MEMORY: Duration = Duration::from_secs(60);
/// How often a gateway gossips what it saw of workers.
pub const REPUTATION_EVERY: Duration = Duration::from_secs(30);

/// Everything `silk run` decides.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Data directory (identity key).
    pub data_dir: PathBuf,
    /// libp2p listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap addresses.
    pub bootstrap: Vec<Multiaddr>,
    /// Serve this model (name or path) from `models_dir`.
    pub worker_model: Option<String>,
    /// Where models live.
    pub models_dir: PathBuf,
    /// Compute device of the engine.
    pub device: Device,
    /// Route to insecure workers.
    pub allow_insecure_workers: bool,
    /// This worker's price coefficient × 1000 (announced; with `billing`,
    /// the one its payments config charges).
    pub price_coefficient_milli: u64,
    /// The highest worker coefficient a request accepts when it names none, × 1000.
    pub default_max_coefficient_milli: u32,
    /// Payments: present when the node settles jobs on a ledger. Without
    /// it the node neither pays as a gateway nor charges as a worker.
    pub billing: Option<Arc<Billing>>,
    /// Jobs this gateway sends to one worker at once.
    pub max_jobs_per_worker: u32,
    /// mDNS on the LAN.
    pub mdns: bool,
    /// Faster gossip and pings (local testnets).
    pub fast_gossip: bool,
    /// TOML policy for TDX workers (accepted measurements, TCB statuses,
    /// debug); the built-in default accepts no measurements.
    pub attestation_policy: Option<PathBuf>,
    /// PCCS to fetch DCAP collateral from; without it, only collateral
    /// already in `<data_dir>/attest/collateral` is used.
    pub pccs_url: Option<String>,
    /// How long a worker may go without sending a new token once a job
    /// started (frames without one do not count); past it, or past the
    /// job's deadline, the gateway ends the job as the worker's failure.
    pub job_progress_timeout: Duration,
    /// Model ids a name (or no name) resolves to first; normally
    /// [`default_pinned_models`] plus the operator's `pinned_models`.
    pub pinned_models: Vec<String>,
}

/// Default of [`NodeOptions::job_progress_timeout`]: the overlay's idle
/// timeout for a frame.
pub const JOB_PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest average decode a job's deadline allows, seconds per token:
/// a job must end within the progress timeout plus this per `max_tokens`.
const SECONDS_PER_TOKEN_AT_WORST: u32 = 2;

/// What the served model is.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// `name@sha256:…`.
    pub id: String,
    /// Human name.
    pub name: String,
}

struct Worker {
    engine: Engine,
    model: ServedModel,
    tokens_per_s_milli: u64,
}

/// A running node. Cheap to share behind an `Arc`.
pub struct Node {
    overlay: OverlayHandle,
    worker: Option<Arc<Worker>>,
    mode: AttestationMode,
    /// This node's attestation document (encoded) and its digest, renewed
    /// every [`attest::QUOTE_REFRESH_INTERVAL`] so quotes and claims stay fresh.
    attestation: Mutex<(Vec<u8>, [u8; 32])>,
    allow_insecure: bool,
    price_milli: u64,
    default_max_coefficient_milli: u32,
    billing: Option<Arc<Billing>>,
    max_jobs_per_worker: u32,
    job_progress_timeout: Duration,
    in_flight: Arc<Mutex<HashMap<PeerId, u32>>>,
    failures: Mutex<HashMap<PeerId, Instant>>,
    /// Model ids a name resolves to first (audit F10).
    pinned_models: Vec<String>,
    /// Attestation requests a peer left unanswered, by (peer, digest).
    attest_unanswered: Mutex<HashMap<(PeerId, [u8; 32]), Instant>>,
    /// The last DHT lookup per model: when, and the workers it found.
    dht_lookups: Mutex<HashMap<String, (Instant, Vec<Announcement>)>>,
    reputation: Arc<Mutex<Reputation>>,
    /// Counts prompt tokens for the context-window check before dispatch.
    prompt_counter: PromptCounter,
    /// Every worker's latest announcement and RTT, read by each request.
    workers: RwLock<WorkerTable>,
    appraiser: Arc<Mutex<attest::Appraiser>>,
    cancel: CancellationToken,
    /// The node's long-lived tasks (see [`Node::spawn_task`]).
    tasks: Mutex<Tasks>,
    started: Instant,
}

/// Long-lived tasks and their names.
#[derive(Default)]
struct Tasks {
    set: tokio::task::JoinSet<()>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.overlay.local_peer_id())
            .field("worker", &self.worker.as_ref().map(|w| &w.model.id))
            .finish_non_exhaustive()
    }
}

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

/// Whose fault a failed attempt on one worker was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Blame {
    /// The worker's: it counts against its reputation.
    Worker,
    /// The caller's: the request is invalid on any worker.
    Caller,
    /// Nobody's, but the worker has no room now: route elsewhere for a while.
    Busy,
    /// Nobody's (this gateway's own frame, a payment this gateway could not
    /// make, a wire version apart).
    Nobody,
}

/// Why one attempt on one worker ended before its first token. The cause
/// decides who is blamed and, when every attempt failed, the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// The worker has no room now.
    #[error("busy: {0}")]
    Busy(String),
    /// The worker judged the request itself invalid (a prompt longer than
    /// its context window, `max_tokens` past it).
    #[error("refused the request: {0}")]
    Rejected(String),
    /// This gateway could not pay the worker (no lane, no funds, terms the
    /// worker refused, a worker that charges while this node has no
    /// payments).
    #[error("payment: {0}")]
    Payment(String),
    /// The worker did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The worker failed: a stream error, an undecodable frame, an
    /// internal error, a model it announced and does not serve.
    #[error("failed: {0}")]
    Failed(String),
    /// Not the worker's doing: this gateway's own frame was too large or
    /// malformed, or the two run wire versions apart.
    #[error("{0}")]
    Local(String),
}

impl AttemptError {
    /// The error for a worker's refusal with `code` before the first token.
    fn of_refusal(code: JobErrorCode, message: String) -> Self {
        let message = format!("worker refused ({code:?}): {message}");
        match code {
            // The engine's validation: prompt over the context window,
            // max_tokens past it, a KV budget the request can never fit.
            JobErrorCode::Rejected => Self::Rejected(message),
            JobErrorCode::Busy => Self::Busy(message),
            // Our frame was too large or malformed, or a wire version apart.
            JobErrorCode::FrameTooLarge
            | JobErrorCode::Malformed
            | JobErrorCode::ProtocolVersion => Self::Local(message),
            // Payment terms this gateway offered, or a cheque it sent.
            JobErrorCode::Application(
                jobs::ERR_PAYMENT_REQUIRED
                | jobs::ERR_PAYMENT_REFUSED
                | jobs::ERR_BAD_CHEQUE
                | jobs::ERR_NOT_CHARGING,
            ) => Self::Payment(message),
            JobErrorCode::Timeout => Self::Timeout(message),
            // It announced a model it does not serve, or failed.
            JobErrorCode::Application(_) | JobErrorCode::Internal => Self::Failed(message),
        }
    }

    /// The reason alone, without the cause's prefix.
    fn reason(&self) -> &str {
        match self {
            Self::Busy(m)
            | Self::Rejected(m)
            | Self::Payment(m)
            | Self::Timeout(m)
            | Self::Failed(m)
            | Self::Local(m) => m,
        }
    }

    /// Whom the failure counts against.
    fn blame(&self) -> Blame {
        match self {
            Self::Busy(_) => Blame::Busy,
            Self::Rejected(_) => Blame::Caller,
            Self::Payment(_) | Self::Local(_) => Blame::Nobody,
            Self::Timeout(_) | Self::Failed(_) => Blame::Worker,
        }
    }
}

/// Every attempt of one request, in the order they were made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempts(pub Vec<(PeerId, AttemptError)>);

impl std::fmt::Display for Attempts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no candidate");
        }
        for (i, (peer, e)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{peer}: {e}")?;
        }
        Ok(())
    }
}

/// What the attempts of a request that no worker took say, as one cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// Every worker tried was busy: retry shortly.
    Busy,
    /// This node could not pay any worker it tried.
    Payment,
    /// No worker answered in time (some may have been busy or unpayable).
    Timeout,
    /// A worker failed, or nothing was tried.
    Unavailable,
}

impl Attempts {
    /// The cause the caller is told: a failure of a worker or of this node
    /// outweighs a timeout, which outweighs payment, which outweighs busy.
    pub fn cause(&self) -> FailureCause {
        let has = |f: fn(&AttemptError) -> bool| self.0.iter().any(|(_, e)| f(e));
        if self.0.is_empty()
            || has(|e| matches!(e, AttemptError::Failed(_) | AttemptError::Local(_)))
        {
            FailureCause::Unavailable
        } else if has(|e| matches!(e, AttemptError::Timeout(_))) {
            FailureCause::Timeout
        } else if has(|e| matches!(e, AttemptError::Payment(_))) {
            FailureCause::Payment
        } else {
            FailureCause::Busy
        }
    }
}

/// Why a job could not be placed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// The request named no model and the mesh serves several (or none).
    #[error("no model given and the mesh serves {0}: name one of them in `model`")]
    ModelRequired(String),
    /// No worker announces the model.
    #[error("no worker on the mesh serves model `{0}` (see GET /v1/models)")]
    UnknownModel(String),
    /// Every worker for the model runs without TDX, and this gateway does
    /// not route to insecure workers.
    #[error("{0}")]
    InsecureRefused(String),
    /// Every worker for the model failed the attestation policy (some with
    /// TDX evidence the policy does not accept, or none in time).
    #[error("{0}")]
    AttestationRefused(String),
    /// Every worker is at this gateway's per-worker cap.
    #[error("every worker for `{0}` is at its concurrency cap; retry shortly")]
    Saturated(String),
    /// Every worker asks more than the caller's `max_coefficient`.
    #[error("every worker for `{model}` asks more than max_coefficient {max}: the cheapest asks {cheapest}", max = *max_milli as f64 / 1000.0, cheapest = *cheapest_milli as f64 / 1000.0)]
    TooExpensive {
        /// The model.
        model: String,
        /// The cheapest worker's coefficient, × 1000.
        cheapest_milli: u64,
        /// The caller's maximum, × 1000.
        max_milli: u32,
    },
    /// A worker judged the request itself invalid (a prompt longer than the
    /// context window, `max_tokens` past it): the caller's fault, so no
    /// other worker is tried and no worker is blamed.
    #[error("the worker refused the request: {0}")]
    InvalidRequest(String),
    /// The request fits the context window of no worker serving the model:
    /// judged by this gateway before any worker was asked.
    #[error("{}", context_message(model, *window, *prompt_tokens, *max_tokens))]
    ContextLengthExceeded {
        /// The model id.
        model: String,
        /// The largest context window a worker announces for it, in tokens.
        window: u32,
        /// The prompt's tokens, when this gateway could count them.
        prompt_tokens: Option<u64>,
        /// The request's `max_tokens`.
        max_tokens: u32,
    },
    /// Every attempt failed before the first token.
    #[error("no worker could take the job: {0}")]
    AllFailed(Attempts),
}

fn context_message(
    model: &str,
    window: u32,
    prompt_tokens: Option<u64>,
    max_tokens: u32,
) -> String {
    match prompt_tokens {
        Some(p) if p >= u64::from(window) => format!(
            "the prompt has {p} tokens, but the context window of `{model}` is {window} tokens: shorten the messages"
        ),
        _ => format!(
            "max_tokens is {max_tokens}, more than the context window of `{model}`, {window} tokens"
        ),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The name part of a model id (`name@sha256:…` → `name`).
pub fn model_name(id: &str) -> &str {
    id.split('@').next().unwrap_or(id)
}

/// The ids a gateway trusts a model name to mean without asking: the
/// known models (the default one), each pinned by the hash of its file.
pub fn default_pinned_models() -> Vec<String> {
    silk_inference::store::KNOWN_MODELS
        .iter()
        .map(|m| format!("{}@sha256:{}", m.name, m.sha256))
        .collect()
}

/// Resolves the model a request names to one id (audit F10), given the
/// `(id, worker)` pairs the mesh announces and the operator's `pinned`
/// ids. A full id (`name@sha256:…`) is taken as it is. A name (or none, or
/// `default`, meaning the first pinned id) resolves to a pinned id with
/// that name when any worker serves one, else to the id served by the most
/// distinct workers; a tie is refused with the ids to choose from. Never
/// by sort order: anyone can announce `name@sha256:0…`.
pub fn pick_model(
    wanted: Option<&str>,
    served: &[(&str, PeerId)],
    pinned: &[String],
) -> Result<String, DispatchError> {
    let wanted = wanted.filter(|w| !w.is_empty() && *w != "default");
    if let Some(w) = wanted.filter(|w| w.contains("@sha256:")) {
        // Gossip may not know it yet; the DHT can still have providers.
        return Ok(w.to_string());
    }
    let mut workers: HashMap<&str, std::collections::HashSet<PeerId>> = HashMap::new();
    for (id, peer) in served {
        workers.entry(id).or_default().insert(*peer);
    }
    let matching: Vec<(&str, usize)> = workers
        .iter()
        .filter(|(id, _)| match wanted {
            Some(w) => model_matches(id, w),
            None => true,
        })
        .map(|(id, w)| (*id, w.len()))
        .collect();
    let pinned_hit = pinned.iter().find(|p| {
        matching.iter().any(|(id, _)| id == p) && wanted.is_none_or(|w| model_matches(p, w))
    });
    if let Some(p) = pinned_hit {
        return Ok(p.clone());
    }
    let most = matching.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let mut best: Vec<&str> = matching
        .iter()
        .filter(|(_, n)| *n == most)
        .map(|(id, _)| *id)
        .collect();
    best.sort_unstable();
    match (best.as_slice(), wanted) {
        ([only], _) => Ok((*only).to_string()),
        ([], Some(w)) => Err(DispatchError::UnknownModel(w.to_string())),
        ([], None) => Err(DispatchError::ModelRequired("no model yet".into())),
        (many, _) => Err(DispatchError::ModelRequired(many.join(", "))),
    }
}

fn model_matches(id: &str, wanted: &str) -> bool {
    let wanted = wanted.trim_end_matches(".gguf");
    id == wanted || model_name(id).eq_ignore_ascii_case(wanted)
}

/// The raw ed25519 key inside an ed25519 peer id.
pub fn peer_public_key(peer: &PeerId) -> Option<[u8; 32]> {
    // An identity multihash: code 0, varint length (< 128 here), the
    // protobuf-encoded public key.
    let bytes = peer.to_bytes();
    let (&[0, len], digest) = (bytes.split_first_chunk::<2>()?.0, &bytes[2..]) else {
        return None;
    };
    if usize::from(len) != digest.len() {
        return None;
    }
    let key = libp2p_identity::PublicKey::try_decode_protobuf(digest).ok()?;
    Some(key.try_into_ed25519().ok()?.to_bytes())
}

struct InFlight {
    map: Arc<Mutex<HashMap<PeerId, u32>>>,
    peer: PeerId,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut map) = self.map.lock() {
            if let Some(n) = map.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.peer);
                }
            }
        }
    }
}

impl Node {
    /// Starts the overlay, loads the engine on workers (measuring its decode
    /// speed with a short warm-up), and spawns the node's tasks.
    pub async fn start(options: NodeOptions) -> Result<Arc<Self>, MeshError> {
        // In a TDX guest the key is made here, in memory, at each start.
        let tdx = TsmReport::default().is_available();
        let identity =
            NodeIdentity::for_start(&attest::identity::identity_path(&options.data_dir), tdx)?;
        let keypair =
            silk_overlay::keypair_from_secret(&identity.secret_bytes()).ok_or_else(|| {
                MeshError::Config {
                    path: attest::identity::identity_path(&options.data_dir),
                    reason: "identity key is not a valid ed25519 secret".into(),
                }
            })?;

        let worker = match &options.worker_model {
            Some(model) => Some(Arc::new(load_worker(model, &options).await?)),
            None => None,
        };
        let models: Vec<String> = worker.iter().map(|w| w.model.id.clone()).collect();
        let public_key = identity.public_key();
        let doc = produce_attestation(public_key, models.clone())
            .await
            .map_err(|reason| MeshError::Config {
                path: options.data_dir.clone(),
                reason,
            })?;
        let mode = match doc.mode {
            attest::AttestationMode::Tdx => AttestationMode::Tdx,
            attest::AttestationMode::Insecure => AttestationMode::Insecure,
        };

        let mut config = OverlayConfig::new(keypair, options.listen.clone())
            .with_bootstrap(options.bootstrap.clone())
            .with_mdns(options.mdns);
        config.agent_version = format!("silk/{}", env!("CARGO_PKG_VERSION"));
        if config.listens_only_on_loopback() {
            // A local testnet: every peer dials in from this machine.
            config.max_inbound_connections_per_ip = config.max_inbound_connections;
        }
        if options.fast_gossip {
            config.gossip_heartbeat = Duration::from_millis(200);
            config.announce_republish_interval = Duration::from_secs(2);
            config.ping_interval = Duration::from_secs(1);
            config.kad_query_timeout = Duration::from_secs(5);
        }
        let (overlay, events) = Overlay::spawn(config).await?;
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
            worker
                .as_ref()
                .map(|w| (w.model.id.clone(), w.engine.clone())),
        );
        let node = Arc::new(Self {
            overlay,
            worker,
            mode,
            attestation: Mutex::new((doc.encode()?, doc.digest().0)),
            allow_insecure: options.allow_insecure_workers,
            price_milli: options.price_coefficient_milli,
            default_max_coefficient_milli: options.default_max_coefficient_milli,
            billing: options.billing.clone(),
            max_jobs_per_worker: options.max_jobs_per_worker.max(1),
            job_progress_timeout: options.job_progress_timeout,
            in_flight: Arc::default(),
            failures: Mutex::default(),
            dht_lookups: Mutex::default(),
            attest_unanswered: Mutex::default(),
            pinned_models: options.pinned_models.clone(),
            reputation: Arc::default(),
            prompt_counter,
            workers: RwLock::default(),
            appraiser: Arc::new(Mutex::new(
                attest::Appraiser::new(policy, options.allow_insecure_workers)
                    .with_collateral_source(collateral),
            )),
            cancel: CancellationToken::new(),
            tasks: Mutex::default(),
            started: Instant::now(),
        });
        node.spawn_task("event loop", Arc::clone(&node).event_loop(events));
        node.spawn_task("worker table", Arc::clone(&node).table_keeper());
        node.spawn_task(
            "reputation reporter",
            Arc::clone(&node).reputation_reporter(),
        );
        node.spawn_task(
            "attestation refresh",
            Arc::clone(&node).refresh_attestation(public_key, models),
        );
        if let Some(worker) = &node.worker {
            for key in [worker.model.id.clone(), worker.model.name.clone()] {
                let overlay = node.overlay.clone();
                node.spawn_task("provider record", async move {
                    if let Err(e) = overlay.start_providing(key.as_bytes()).await {
                        tracing::debug!(error = %e, "provider record not replicated yet");
                    }
                });
            }
            node.spawn_task("announcer", Arc::clone(&node).announcer());
            if let Some(billing) = &node.billing {
                node.spawn_task(
                    "payment duties",
                    Arc::clone(billing).run_worker_duties(node.cancel.clone()),
                );
            }
        }
        Ok(node)
    }

    /// Runs one of the node's long-lived tasks under its supervision: every
    /// such task ends when the node's cancellation token fires, and
    /// [`Node::shutdown_and_wait`] waits for them.
    fn spawn_task(
        &self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        if let Ok(mut tasks) = self.tasks.lock() {
            let id = tasks.set.spawn(task).id();
            tasks.names.insert(id, name);
        }
    }

    /// Stops the node and waits, at most `grace`, for its long-lived tasks
    /// to end (a redemption pass or a store write in progress finishes);
    /// those still running then are aborted. Returns whether every task
    /// ended in time. A task that panicked is logged with its name.
    pub async fn shutdown_and_wait(&self, grace: Duration) -> bool {
        self.shutdown();
        let Tasks { mut set, mut names } = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, set.join_next_with_id()).await {
                Ok(None) => return true,
                Ok(Some(Ok((id, ())))) => {
                    names.remove(&id);
                }
                Ok(Some(Err(e))) => {
                    let task = names.remove(&e.id()).unwrap_or("unnamed");
                    if e.is_panic() {
                        tracing::error!(task, "a node task panicked");
                    }
                }
                Err(_) => {
                    // Finished tasks were joined first: what is left runs.
                    let running: Vec<&str> = names.values().copied().collect();
                    tracing::warn!(
                        ?running,
                        "node tasks still running after the grace period; stopping them"
                    );
                    set.abort_all();
                    return false;
                }
            }
        }
    }

    /// This node's payments, when it settles jobs on a ledger.
    pub fn billing(&self) -> Option<&Arc<Billing>> {
        self.billing.as_ref()
    }

    /// The overlay handle.
    pub fn overlay(&self) -> &OverlayHandle {
        &self.overlay
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.overlay.local_peer_id()
    }

    /// This node's attestation mode.
    pub fn attestation_mode(&self) -> AttestationMode {
        self.mode
    }

    /// Whether this gateway routes to insecure workers.
    pub fn allows_insecure(&self) -> bool {
        self.allow_insecure
    }

    /// The model this node serves, if it is a worker.
    pub fn served_model(&self) -> Option<&ServedModel> {
        self.worker.as_ref().map(|w| &w.model)
    }

    /// The local engine, if this node is a worker.
    pub fn engine(&self) -> Option<&Engine> {
        self.worker.as_ref().map(|w| &w.engine)
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops every task of the node and the overlay.
    pub fn shutdown(&self) {
        self.cancel.cancel();
        self.overlay.shutdown();
    }

    /// A token cancelled at shutdown.
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }

    fn announcement(&self, worker: &Worker, seq: u64) -> Announcement {
        let load = worker.engine.load();
        let busy = (load.active + load.queued) as u32;
        Announcement {
            peer_id: self.peer_id(),
            models: vec![worker.model.id.clone()],
            context_windows: vec![u32::try_from(worker.engine.context_length()).unwrap_or(u32::MAX)],
            free_slots: (load.max_batch as u32).saturating_sub(busy),
            queue_depth: load.queued as u32,
            decode_tokens_per_s_milli: worker.tokens_per_s_milli,
            price_coefficient_milli: self.price_milli,
            attestation_mode: self.mode,
            attestation_digest: Some(self.attestation_digest()),
            seq,
            expires_at_ms: now_ms() + ANNOUNCE_TTL.as_millis() as u64,
            payout: self.billing.as_ref().map(|b| b.payout().to_raw()),
        }
    }

    fn attestation_digest(&self) -> [u8; 32] {
        self.attestation.lock().map(|a| a.1).unwrap_or([0; 32])
    }

    /// Produces a fresh attestation document (new quote on TDX, new claims
    /// timestamp everywhere) every [`attest::QUOTE_REFRESH_INTERVAL`]; the
    /// next announcement carries the new digest.
    #[tracing::instrument(skip_all)]
    async fn refresh_attestation(self: Arc<Self>, public_key: [u8; 32], models: Vec<String>) {
        let mut tick = tokio::time::interval(attest::QUOTE_REFRESH_INTERVAL);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let fresh = match produce_attestation(public_key, models.clone()).await {
                Ok(doc) => doc.encode().map(|bytes| (bytes, doc.digest().0)),
                Err(reason) => {
                    tracing::warn!(%reason, "could not refresh the attestation document");
                    continue;
                }
            };
            match (fresh, self.attestation.lock()) {
                (Ok(fresh), Ok(mut current)) => *current = fresh,
                (Err(e), _) => {
                    tracing::warn!(error = %e, "could not encode the attestation document")
                }
                (_, Err(_)) => return,
            }
        }
    }

    /// Gossips this gateway's job outcomes per worker every
    /// [`REPUTATION_EVERY`], then fades them.
    #[tracing::instrument(skip_all)]
    async fn reputation_reporter(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REPUTATION_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let report = match self.reputation.lock() {
                Ok(mut r) => {
                    let report = r.report(now_ms());
                    r.decay();
                    report
                }
                Err(_) => return,
            };
            let Some(report) = report else { continue };
            match self.overlay.publish_reputation(jobs::encode(&report)).await {
                Ok(()) => {}
                Err(silk_overlay::OverlayError::Stopped) => return,
                Err(e) => tracing::debug!(error = %e, "reputation report not published"),
            }
        }
    }

    /// Records a job outcome on `worker` for reputation.
    fn record_outcome(reputation: &Mutex<Reputation>, worker: PeerId, completed: bool) {
        if let Ok(mut r) = reputation.lock() {
            r.record(worker, completed);
        }
    }

    /// A worker's reputation, 0 to 1.
    pub fn reputation_of(&self, worker: &PeerId) -> f64 {
        self.reputation
            .lock()
            .map(|r| r.score(worker))
            .unwrap_or(0.5)
    }

    #[tracing::instrument(skip_all)]
    async fn announcer(self: Arc<Self>) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        // Sequence numbers must grow across restarts too: start at the clock.
        let mut seq = now_ms();
        let mut last: Option<(u32, u32)> = None;
        let mut last_sent = Instant::now();
        let mut tick = tokio::time::interval(ANNOUNCE_POLL);
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !worker.engine.is_running() {
                // Announcing a dead engine would draw jobs that all fail
                // (audit F19); the last announcement expires on its own.
                tracing::error!(
                    "the engine stopped; this node no longer announces itself as a worker"
                );
                return;
            }
            seq += 1;
            let a = self.announcement(&worker, seq);
            let key = (a.free_slots, a.queue_depth);
            if last == Some(key) && last_sent.elapsed() < ANNOUNCE_EVERY {
                continue;
            }
            match self.overlay.announce(a.clone()).await {
                Ok(()) => {
                    if let Ok(mut t) = self.workers.write() {
                        t.offer(a);
                    }
                    last = Some(key);
                    last_sent = Instant::now();
                }
                Err(silk_overlay::OverlayError::Stopped) => return,
                Err(e) => tracing::warn!(error = %e, "announcement failed"),
            }
        }
    }

    #[tracing::instrument(skip_all)]
    async fn event_loop(self: Arc<Self>, mut events: mpsc::Receiver<OverlayEvent>) {
        loop {
            let event = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return,
                e = events.recv() => match e { Some(e) => e, None => return },
            };
            match event {
                OverlayEvent::InboundJob {
                    peer,
                    request,
                    responder,
                } => {
                    let node = Arc::clone(&self);
                    tokio::spawn(async move {
                        let ctx = jobs::WorkerContext {
                            engine: node.worker.as_ref().map(|w| &w.engine),
                            overlay: &node.overlay,
                            billing: node.billing.as_deref(),
                            price_milli: node.price_milli,
                        };
                        jobs::serve_stream(ctx, peer, request, responder, node.cancel.clone()).await
                    });
                }
                OverlayEvent::AttestationRequest { responder, .. } => {
                    let doc = self
                        .attestation
                        .lock()
                        .map(|a| a.0.clone())
                        .unwrap_or_default();
                    tokio::spawn(async move {
                        if let Err(e) = responder.respond(doc).await {
                            tracing::debug!(error = %e, "could not answer an attestation request");
                        }
                    });
                }
                OverlayEvent::Reputation { reporter, payload } => {
                    // A poisoned table (a panic while it was held) must not
                    // end the event loop, which also serves jobs.
                    let taken = match self.reputation.lock() {
                        Ok(mut r) => r.absorb(reporter, &payload),
                        Err(poisoned) => poisoned.into_inner().absorb(reporter, &payload),
                    };
                    match taken {
                        // Stale, from a reporter without standing here, or
                        // in a format this version cannot read (version
                        // skew, audit F15): not misbehaviour.
                        Err(
                            e @ (crate::reputation::ReportError::Stale
                            | crate::reputation::ReportError::NoStanding
                            | crate::reputation::ReportError::Undecodable),
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
                        Ok(()) => {}
                    }
                }
                OverlayEvent::Misbehaviour {
                    peer,
                    offence,
                    score,
                } => tracing::info!(%peer, ?offence, score, "peer misbehaved"),
                OverlayEvent::PeerBanned { peer, score } => {
                    tracing::warn!(%peer, score, "peer banned")
                }
                OverlayEvent::Announcement(a) => {
                    if let Ok(mut t) = self.workers.write() {
                        t.offer(a);
                    }
                }
                OverlayEvent::PeerDisconnected { peer } => {
                    if let Ok(mut t) = self.workers.write() {
                        t.disconnected(&peer);
                    }
                }
                other => tracing::trace!(?other, "overlay event"),
            }
        }
    }

    /// Resolves the model a request names (id, name, or none when the mesh
    /// serves exactly one model) against the current announcements.
    pub async fn resolve_model(&self, wanted: Option<&str>) -> Result<String, DispatchError> {
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

    /// The workers this node routes to: each one's latest unexpired
    /// announcement, this node's own included.
    pub fn known_workers(&self) -> Vec<Announcement> {
        self.workers
            .read()
            .map(|t| t.current(now_ms()).cloned().collect())
            .unwrap_or_default()
    }

    /// Keeps [`Node::workers`] in step with the overlay's book and ping
    /// RTTs, every [`TABLE_SYNC`], until the node stops.
    async fn table_keeper(self: Arc<Self>) {
        let own = self.worker.as_ref().map(|_| self.peer_id());
        let mut tick = tokio::time::interval(TABLE_SYNC);
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (book, peers) = match (
                self.overlay.announcements().await,
                self.overlay.peers().await,
            ) {
                (Ok(b), Ok(p)) => (b, p),
                (Err(silk_overlay::OverlayError::Stopped), _)
                | (_, Err(silk_overlay::OverlayError::Stopped)) => return,
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "could not read the overlay's workers");
                    continue;
                }
            };
            if let Ok(mut t) = self.workers.write() {
                t.sync(book, own);
                t.set_rtts(
                    peers
                        .into_iter()
                        .filter_map(|p| p.rtt.map(|r| (p.peer_id, r))),
                );
                t.prune(now_ms());
            }
        }
    }

    /// Candidates for `model`, attestation-filtered and ranked.
    async fn candidates(
        &self,
        model: &str,
        request: &JobRequest,
        max_coefficient_milli: u32,
        exclude: &[PeerId],
    ) -> Result<Vec<Candidate>, DispatchError> {
        let mut raw: Vec<(Announcement, Option<Duration>)> = self
            .workers
            .read()
            .map(|t| t.serving(model, now_ms(), self.peer_id(), exclude))
            .unwrap_or_default();
        if raw.len() < 2 {
            let found = self.dht_candidates_reused(model, &raw).await;
            raw.extend(
                found
                    .into_iter()
                    .filter(|a| !exclude.contains(&a.peer_id))
                    .map(|a| (a, None)),
            );
        }
        if raw.is_empty() {
            return Err(DispatchError::UnknownModel(model.to_string()));
        }
        // What this gateway can judge itself: a request that fits no
        // announced context window is the caller's error (issue 11, F11).
        if raw.iter().any(|(a, _)| a.context_window(model).is_some()) {
            let max_tokens = request.max_tokens.max(1);
            let windows = raw.iter().filter_map(|(a, _)| a.context_window(model));
            let (smallest, window) =
                windows.fold((u32::MAX, 0), |(lo, hi), w| (lo.min(w), hi.max(w)));
            // The byte bound is never below the true count: when it fits
            // every window, the prompt is not tokenized here at all.
            let prompt_tokens = if request.prompt_tokens_bound() < u64::from(smallest) {
                None
            } else {
                self.prompt_counter
                    .count(model, request.to_generate().prompt)
                    .await
                    .map(|p| p + request.continuation.len() as u64)
            };
            raw.retain(|(a, _)| {
                a.context_window(model)
                    .is_none_or(|w| context::fits(w, prompt_tokens, max_tokens))
            });
            if raw.is_empty() {
                return Err(DispatchError::ContextLengthExceeded {
                    model: model.to_string(),
                    window,
                    prompt_tokens,
                    max_tokens,
                });
            }
        }
        let in_flight = self.in_flight.lock().map(|m| m.clone()).unwrap_or_default();
        let failures = self.failures.lock().map(|m| m.clone()).unwrap_or_default();
        let mut refused = Vec::new();
        let mut out = Vec::new();
        // Every candidate's attestation is checked at once, under one
        // deadline (audit F12: one at a time, N silent Sybils cost N × 10 s
        // per request). A peer that did not answer is remembered.
        let deadline = tokio::time::Instant::now() + ATTESTATION_CHECKS;
        let checks = futures::future::join_all(raw.iter().map(|(a, _)| async move {
            match tokio::time::timeout_at(deadline, self.check_attestation(a)).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(digest) = a.attestation_digest {
                        self.note_unanswered(a.peer_id, digest);
                    }
                    Err("attestation check did not finish in time".into())
                }
            }
        }))
        .await;
        let mut only_insecure_refused = true;
        for ((a, rtt), check) in raw.into_iter().zip(checks) {
            if let Err(reason) = check {
                refused.push(format!("{}: {reason}", a.peer_id));
                only_insecure_refused &= a.attestation_mode == AttestationMode::Insecure;
                continue;
            }
            let mine = in_flight.get(&a.peer_id).copied().unwrap_or(0);
            let recently_failed = failures
                .get(&a.peer_id)
                .is_some_and(|t| t.elapsed() < FAILURE_MEMORY);
            let reputation = self.reputation_of(&a.peer_id);
            out.push(Candidate::from_announcement(
                a,
                rtt,
                mine,
                recently_failed,
                reputation,
            ));
        }
        if out.is_empty() {
            let message = format!(
                "every worker serving `{model}` was refused by this gateway's attestation policy ({}); {}",
                refused.join("; "),
                if only_insecure_refused {
                    "insecure workers let their operator read prompts: start the gateway with --allow-insecure-workers to use them anyway"
                } else {
                    "check the policy file"
                }
            );
            return Err(if only_insecure_refused {
                DispatchError::InsecureRefused(message)
            } else {
                DispatchError::AttestationRefused(message)
            });
        }
        let cheapest = out.iter().map(|c| c.price_milli).min().unwrap_or(0);
        out.retain(|c| c.price_milli <= u64::from(max_coefficient_milli));
        if out.is_empty() {
            return Err(DispatchError::TooExpensive {
                model: model.to_string(),
                cheapest_milli: cheapest,
                max_milli: max_coefficient_milli,
            });
        }
        let total = out.len();
        let out: Vec<Candidate> = out
            .into_iter()
            .filter(|c| c.in_flight < self.max_jobs_per_worker)
            .collect();
        if out.is_empty() && total > 0 {
            return Err(DispatchError::Saturated(model.to_string()));
        }
        Ok(routing::rank(
            out,
            request.estimated_prompt_tokens(),
            u64::from(request.max_tokens),
        ))
    }

    /// Workers found through provider records that gossip does not know:
    /// their attestation document tells their mode; load is unknown.
    /// [`Node::dht_candidates`], asked at most once per
    /// [`DHT_LOOKUP_REUSE`] per model once a lookup has found providers; in
    /// between, that lookup's workers that gossip does not know now.
    async fn dht_candidates_reused(
        &self,
        model: &str,
        known: &[(Announcement, Option<Duration>)],
    ) -> Vec<Announcement> {
        let fresh = self.dht_lookups.lock().ok().and_then(|lookups| {
            lookups
                .get(model)
                .filter(|(at, _)| at.elapsed() < DHT_LOOKUP_REUSE)
                .map(|(_, found)| found.clone())
        });
        let found = match fresh {
            Some(found) => found,
            None => match self.dht_candidates(model, known).await {
                Some(found) => {
                    if let Ok(mut lookups) = self.dht_lookups.lock() {
                        lookups.insert(model.to_string(), (Instant::now(), found.clone()));
                    }
                    found
                }
                // Nothing to reuse: a node whose DHT is still filling asks
                // again on the next request.
                None => Vec::new(),
            },
        };
        found
            .into_iter()
            .filter(|a| known.iter().all(|(k, _)| k.peer_id != a.peer_id))
            .collect()
    }

    /// Workers the DHT lists as providers of `model` that `known` lacks,
    /// described from their attestation documents; `None` when the lookup
    /// failed or found no provider at all.
    async fn dht_candidates(
        &self,
        model: &str,
        known: &[(Announcement, Option<Duration>)],
    ) -> Option<Vec<Announcement>> {
        let providers = match tokio::time::timeout(
            Duration::from_secs(5),
            self.overlay.get_providers(model.as_bytes()),
        )
        .await
        {
            Ok(Ok(p)) if !p.is_empty() => p,
            _ => return None,
        };
        let mut out = Vec::new();
        for peer in providers {
            if peer == self.peer_id() || known.iter().any(|(a, _)| a.peer_id == peer) {
                continue;
            }
            let Ok(Ok(bytes)) = tokio::time::timeout(
                Duration::from_secs(5),
                self.overlay.fetch_attestation(peer, Vec::new()),
            )
            .await
            else {
                continue;
            };
            let Ok(doc) = AttestationDocument::decode(&bytes) else {
                continue;
            };
            if !doc.claims.models.iter().any(|m| m == model) {
                continue;
            }
            out.push(Announcement {
                peer_id: peer,
                models: doc.claims.models.clone(),
                // The attestation document does not say; the worker judges.
                context_windows: Vec::new(),
                free_slots: 1,
                queue_depth: 0,
                decode_tokens_per_s_milli: 0,
                price_coefficient_milli: 1000,
                attestation_mode: match doc.mode {
                    attest::AttestationMode::Tdx => AttestationMode::Tdx,
                    attest::AttestationMode::Insecure => AttestationMode::Insecure,
                },
                attestation_digest: Some(doc.digest().0),
                seq: 0,
                expires_at_ms: now_ms(),
                payout: None,
            });
        }
        Some(out)
    }

    /// Applies the attestation policy to a worker's announcement.
    async fn check_attestation(&self, a: &Announcement) -> Result<(), String> {
        match a.attestation_mode {
            AttestationMode::Insecure if self.allow_insecure => Ok(()),
            AttestationMode::Insecure => Err("runs in insecure attestation mode".into()),
            AttestationMode::Tdx => {
                let digest = Hex(a
                    .attestation_digest
                    .ok_or("announces tdx without a digest")?);
                let now = attest::now_unix();
                // The verdict is looked up by this peer's key and the digest:
                // the digest alone is public and proves nothing (audit F1).
                let key = peer_public_key(&a.peer_id).ok_or("peer id is not an ed25519 key")?;
                if let Some(v) = self
                    .appraiser
                    .lock()
                    .ok()
                    .and_then(|mut ap| ap.cached(&key, &digest, now))
                {
                    return if v.is_accepted() {
                        Ok(())
                    } else {
                        Err(v.to_string())
                    };
                }
                if self.unanswered(a.peer_id, digest.0) {
                    return Err("did not answer an attestation request lately".into());
                }
                let bytes = match tokio::time::timeout(
                    ATTESTATION_CHECKS,
                    self.overlay.fetch_attestation(a.peer_id, Vec::new()),
                )
                .await
                {
                    Ok(r) => r.map_err(|e| format!("attestation fetch failed: {e}"))?,
                    Err(_) => {
                        self.note_unanswered(a.peer_id, digest.0);
                        return Err("attestation fetch timed out".into());
                    }
                };
                let doc = AttestationDocument::decode(&bytes).map_err(|e| e.to_string())?;
                // The slow part (PCCS fetches, quote verification) runs
                // without the appraiser's lock, so it blocks no other check
                // (audit F12); only the verdict is recorded under it.
                let job = self
                    .appraiser
                    .lock()
                    .map(|ap| ap.job())
                    .map_err(|_| "appraiser lock poisoned".to_string())?;
                let outcome =
                    tokio::task::spawn_blocking(move || job.run(&doc, &key, &digest, now))
                        .await
                        .map_err(|e| e.to_string())?;
                if let Ok(mut ap) = self.appraiser.lock() {
                    ap.record(&key, &outcome, now);
                }
                let verdict = outcome.verdict;
                if verdict.is_accepted() {
                    Ok(())
                } else {
                    Err(verdict.to_string())
                }
            }
        }
    }

    /// Whether `peer` left an attestation request for `digest`
    /// unanswered within [`UNANSWERED_MEMORY`].
    fn unanswered(&self, peer: PeerId, digest: [u8; 32]) -> bool {
        self.attest_unanswered
            .lock()
            .ok()
            .and_then(|m| m.get(&(peer, digest)).copied())
            .is_some_and(|t| t.elapsed() < UNANSWERED_MEMORY)
    }

    fn note_unanswered(&self, peer: PeerId, digest: [u8; 32]) {
        if let Ok(mut m) = self.attest_unanswered.lock() {
            if m.len() >= 4096 {
                m.retain(|_, t| t.elapsed() < UNANSWERED_MEMORY);
                if m.len() >= 4096 {
                    return;
                }
            }
            m.insert((peer, digest), Instant::now());
        }
    }

    fn note_failure(&self, peer: PeerId) {
        if let Ok(mut f) = self.failures.lock() {
            if f.len() > 4096 {
                f.retain(|_, t| t.elapsed() < FAILURE_MEMORY);
            }
            f.insert(peer, Instant::now());
        }
    }

    fn take_slot(&self, peer: PeerId) -> InFlight {
        if let Ok(mut m) = self.in_flight.lock() {
            *m.entry(peer).or_insert(0) += 1;
        }
        InFlight {
            map: Arc::clone(&self.in_flight),
            peer,
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
    /// next candidate while no token has arrived. With payments, the job's worst case is reserved
    /// on the lane to the worker first and released if the worker fails.
    /// `spend`, the caller's API-key hold, is settled with what the job
    /// cost when it ends (before its last event), or dropped if no worker
    /// took it.
    ///
    /// A worker that fails after the first token is not the caller's
    /// problem: the job goes on on another worker serving the same id, from
    /// the prompt plus the tokens already delivered (see [`Node::relay`]).
    pub async fn dispatch(
        self: &Arc<Self>,
        request: JobRequest,
        max_coefficient_milli: Option<u32>,
        spend: Option<SpendHold>,
    ) -> Result<Dispatch, DispatchError> {
        let max_coefficient = crate::payments::capped_coefficient(
            max_coefficient_milli,
            self.default_max_coefficient_milli,
        );
        let (worker, attestation, attempt) = self.place(&request, max_coefficient, &[]).await?;
        let (tx, events) = mpsc::channel(JOB_CHANNEL);
        let model = request.model.clone();
        tokio::spawn(Arc::clone(self).relay(request, max_coefficient, worker, attempt, spend, tx));
        Ok(Dispatch {
            worker,
            attestation,
            model,
            events,
        })
    }

    /// Places `request` on the best candidate not in `exclude`, trying the
    /// next while no token has arrived; returns the worker, its attestation
    /// mode and the running attempt.
    async fn place(
        &self,
        request: &JobRequest,
        max_coefficient: u32,
        exclude: &[PeerId],
    ) -> Result<(PeerId, AttestationMode, Attempt), DispatchError> {
        let candidates = self
            .candidates(&request.model, request, max_coefficient, exclude)
            .await?;
        let mut attempts = Vec::new();
        for c in candidates.into_iter().take(MAX_ATTEMPTS) {
            let local = c.peer == self.peer_id();
            let mut paid = match (&self.billing, &c.payout, local) {
                (Some(billing), Some(payout), false) => {
                    match self
                        .prepare_payment(billing, &c, payout, max_coefficient, request)
                        .await
                    {
                        Ok(p) => Some(p),
                        Err(e) => {
                            tracing::info!(worker = %c.peer, error = %e, "cannot pay this worker; trying the next");
                            attempts.push((c.peer, AttemptError::Payment(e)));
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let slot = self.take_slot(c.peer);
            let attempt = if local {
                self.run_local(request, slot).await
            } else {
                self.run_remote(request, c.peer, slot, &mut paid).await
            };
            match attempt {
                Ok(attempt) => return Ok((c.peer, c.mode, attempt)),
                Err(e) => {
                    if let Some(p) = paid.take() {
                        p.billing.release(p.reservation).await;
                    }
                    // Only a fault of the worker counts against it (audit
                    // F11): a request the caller got wrong, or a frame this
                    // gateway could not send, says nothing about the worker.
                    match e.blame() {
                        Blame::Caller => {
                            tracing::info!(worker = %c.peer, error = %e, "the worker refused the request as invalid");
                            return Err(DispatchError::InvalidRequest(e.reason().to_string()));
                        }
                        Blame::Worker => {
                            tracing::info!(worker = %c.peer, error = %e, "worker failed before the first token; trying the next");
                            self.note_failure(c.peer);
                            Self::record_outcome(&self.reputation, c.peer, false);
                        }
                        Blame::Busy => {
                            tracing::info!(worker = %c.peer, error = %e, "worker busy; trying the next");
                            self.note_failure(c.peer);
                        }
                        Blame::Nobody => {
                            tracing::info!(worker = %c.peer, error = %e, "attempt failed without the worker's fault; trying the next");
                        }
                    }
                    attempts.push((c.peer, e));
                }
            }
        }
        Err(DispatchError::AllFailed(Attempts(attempts)))
    }

    /// Forwards a job's events to the caller and settles the caller's
    /// API-key spending with what the job cost in all. When the worker
    /// fails after delivering tokens, and tokens are still owed, the job
    /// goes on on another worker for the same model id: the prompt plus
    /// every token delivered so far, for the rest of `max_tokens`. Each
    /// worker is paid for what it produced (its own attempt settles it),
    /// the caller sees one stream, and its usage counts the original prompt
    /// and every token it got. A request with stop strings is not continued
    /// (text a worker held back as a possible stop string never reached the
    /// caller, so the seam would lose it): it fails as before.
    async fn relay(
        self: Arc<Self>,
        mut request: JobRequest,
        max_coefficient: u32,
        first: PeerId,
        mut attempt: Attempt,
        spend: Option<SpendHold>,
        tx: mpsc::Sender<JobEvent>,
    ) {
        let max_tokens = request.max_tokens;
        let mut delivered: Vec<u32> = Vec::new();
        let mut total = Some(silk_chain::Coins::ZERO);
        let mut tried = vec![first];
        loop {
            let end = loop {
                let event = tokio::select! {
                    biased;
                    () = tx.closed() => break RelayEnd::CallerGone,
                    e = attempt.events.recv() => e,
                };
                match event {
                    Some(JobEvent::Token(chunk)) => {
                        delivered.extend_from_slice(&chunk.ids);
                        if tx.send(JobEvent::Token(chunk)).await.is_err() {
                            break RelayEnd::CallerGone;
                        }
                    }
                    Some(JobEvent::Done { usage, .. }) => break RelayEnd::Done(usage),
                    Some(JobEvent::Failed(message)) => break RelayEnd::Failed(message),
                    None => break RelayEnd::Failed("the job ended without a result".into()),
                }
            };
            // Dropping the events ends a job the caller left; its task then
            // settles what was delivered and reports the cost.
            drop(attempt.events);
            let cost = attempt.cost.await.unwrap_or(None);
            total = match (total, cost) {
                (Some(a), Some(b)) => a.checked_add(b).ok(),
                _ => None,
            };
            let message = match end {
                RelayEnd::CallerGone => {
                    settle_spend(spend, total).await;
                    return;
                }
                RelayEnd::Done(mut usage) => {
                    let carried = request.continuation.len() as u32;
                    usage.prompt_tokens = usage.prompt_tokens.saturating_sub(carried);
                    usage.completion_tokens = usage.completion_tokens.saturating_add(carried);
                    settle_spend(spend, total).await;
                    let _ = tx.send(JobEvent::Done { usage, cost: total }).await;
                    return;
                }
                RelayEnd::Failed(message) => message,
            };
            let owed = max_tokens.saturating_sub(delivered.len() as u32);
            if !delivered.is_empty()
                && owed > 0
                && request.stop.is_empty()
                && tried.len() <= MAX_CONTINUATIONS
            {
                request.continuation.clone_from(&delivered);
                request.max_tokens = owed;
                request.payment = None;
                match self.place(&request, max_coefficient, &tried).await {
                    Ok((peer, _, next)) => {
                        tracing::warn!(
                            failed = %tried[tried.len() - 1],
                            worker = %peer,
                            delivered = delivered.len(),
                            error = %message,
                            "a worker failed midway; the job goes on on another"
                        );
                        tried.push(peer);
                        attempt = next;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a worker failed midway and no other could go on");
                    }
                }
            }
            settle_spend(spend, total).await;
            let _ = tx.send(JobEvent::Failed(message)).await;
            return;
        }
    }

    async fn prepare_payment(
        &self,
        billing: &Arc<Billing>,
        c: &Candidate,
        payout: &str,
        max_coefficient_milli: u32,
        request: &JobRequest,
    ) -> Result<PaidJob, String> {
        let worker: silk_chain::Address = payout
            .parse()
            .map_err(|e| format!("announces an unusable payout address {payout:?}: {e}"))?;
        let coefficient_milli = u32::try_from(c.price_milli)
            .map_err(|_| format!("announces an absurd coefficient {}", c.price_milli))?;
        let prompt_bound = request.prompt_tokens_bound();
        let (reservation, terms) = billing
            .reserve(
                &worker,
                coefficient_milli,
                Some(max_coefficient_milli),
                prompt_bound,
                u64::from(request.max_tokens),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(PaidJob {
            billing: Arc::clone(billing),
            reservation,
            terms,
            coefficient_milli,
            prompt_bound,
        })
    }

    /// Runs a job on this node's own engine; a node does not pay itself.
    async fn run_local(
        &self,
        request: &JobRequest,
        slot: InFlight,
    ) -> Result<Attempt, AttemptError> {
        let worker = self
            .worker
            .clone()
            .ok_or_else(|| AttemptError::Local("this node is not a worker".into()))?;
        let mut stream = crate::jobs::submit_off_runtime(&worker.engine, request.to_generate())
            .await
            .map_err(|e| match e {
                silk_inference::InferenceError::Busy { .. } => AttemptError::Busy(e.to_string()),
                silk_inference::InferenceError::InvalidRequest { .. }
                | silk_inference::InferenceError::PromptTooLong { .. } => {
                    AttemptError::Rejected(e.to_string())
                }
                _ => AttemptError::Failed(e.to_string()),
            })?;
        let (tx, rx) = mpsc::channel(JOB_CHANNEL);
        // A node does not pay itself: the job costs nothing.
        let (cost_tx, cost) = oneshot::channel();
        let _ = cost_tx.send(Some(silk_chain::Coins::ZERO));
        let price = self.price_milli;
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            loop {
                let event = tokio::select! {
                    biased;
                    () = cancel.cancelled() => None,
                    e = stream.next() => e,
                };
                let out = match event {
                    Some(Event::Token { id, text }) => JobEvent::Token(TokenChunk {
                        ids: vec![id],
                        text,
                    }),
                    Some(Event::Done(u)) => JobEvent::Done {
                        usage: jobs::usage_record(&u, price),
                        cost: Some(silk_chain::Coins::ZERO),
                    },
                    Some(Event::Error(e)) => JobEvent::Failed(format!("engine failed: {e}")),
                    None => JobEvent::Failed("the engine stopped".into()),
                };
                let last = !matches!(out, JobEvent::Token(_));
                if tx.send(out).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Attempt { events: rx, cost })
    }

    /// Runs a job on `peer`. Returns once the first frame arrived; `paid`
    /// is taken (and settled when the job ends) only then, so on an error
    /// the caller still holds the reservation to release.
    async fn run_remote(
        &self,
        request: &JobRequest,
        peer: PeerId,
        slot: InFlight,
        paid: &mut Option<PaidJob>,
    ) -> Result<Attempt, AttemptError> {
        let max_tokens = request.max_tokens;
        let mut request = request.clone();
        request.payment = paid.as_ref().map(|p| p.terms.clone());
        let mut stream = tokio::time::timeout(
            Duration::from_secs(10),
            self.overlay
                .open_job(peer, jobs::encode(&JobMessage::Generate(request))),
        )
        .await
        .map_err(|_| AttemptError::Timeout("opening the job stream took more than 10 s".into()))?
        .map_err(|e| match e {
            // Our own request frame was over the limit: not the worker's doing.
            silk_overlay::OverlayError::TooLarge { .. } => AttemptError::Local(e.to_string()),
            silk_overlay::OverlayError::JobTimeout { .. } => AttemptError::Timeout(e.to_string()),
            e => AttemptError::Failed(e.to_string()),
        })?;
        let first = match stream.next_frame().await {
            Some(Ok(JobFrame::Data(d))) => Frame::Tokens(
                postcard::from_bytes(&d)
                    .map_err(|e| AttemptError::Failed(format!("undecodable token frame: {e}")))?,
            ),
            Some(Ok(JobFrame::End(u))) => Frame::End(
                postcard::from_bytes(&u)
                    .map_err(|e| AttemptError::Failed(format!("undecodable usage frame: {e}")))?,
            ),
            Some(Ok(JobFrame::Error { code, message })) => {
                return Err(AttemptError::of_refusal(code, message))
            }
            Some(Err(e @ silk_overlay::OverlayError::JobTimeout { .. })) => {
                return Err(AttemptError::Timeout(e.to_string()))
            }
            Some(Err(e)) => return Err(AttemptError::Failed(e.to_string())),
            None => return Err(AttemptError::Failed("the worker closed the stream".into())),
        };
        let paid = paid.take();
        let (cost_tx, cost_rx) = oneshot::channel();
        let overlay = self.overlay.clone();
        let reputation = Arc::clone(&self.reputation);
        let (tx, rx) = mpsc::channel(JOB_CHANNEL);
        let cancel = self.cancel.clone();
        let progress_timeout = self.job_progress_timeout;
        // The whole job ends by this (audit F16): a worker that trickles
        // frames cannot hold the slot, the reservation and the caller.
        let deadline = tokio::time::Instant::now()
            + progress_timeout
            + Duration::from_secs(u64::from(SECONDS_PER_TOKEN_AT_WORST)) * max_tokens;
        let mut delivery = Delivery::new(max_tokens);
        tokio::spawn(async move {
            let _slot = slot;
            let mut next = Some(first);
            let mut last_progress = tokio::time::Instant::now();
            loop {
                let frame = match next.take() {
                    Some(f) => f,
                    None => {
                        let stall = (last_progress + progress_timeout).min(deadline);
                        let raw = tokio::select! {
                            biased;
                            () = cancel.cancelled() => None,
                            // The caller went away: stop and pay for what it got.
                            () = tx.closed() => Some(Err(silk_overlay::OverlayError::Stopped)),
                            () = tokio::time::sleep_until(stall) => {
                                let why = if stall == deadline {
                                    format!("worker {peer} did not finish within the job's deadline")
                                } else {
                                    format!(
                                        "worker {peer} sent no token for {} s",
                                        progress_timeout.as_secs()
                                    )
                                };
                                next = Some(Frame::Failed(why));
                                continue;
                            }
                            f = stream.next_frame() => f,
                        };
                        if tx.is_closed() {
                            let cost = match paid {
                                Some(p) => {
                                    p.finish(&overlay, peer, None, delivery.paid_tokens()).await
                                }
                                None => Some(silk_chain::Coins::ZERO),
                            };
                            let _ = cost_tx.send(cost);
                            return;
                        }
                        Frame::decode(raw, peer, delivery.tokens())
                    }
                };
                let (out, usage) = match frame {
                    Frame::Tokens(chunk) => match delivery.accept(&chunk) {
                        Ok(progress) => {
                            if progress {
                                last_progress = tokio::time::Instant::now();
                            }
                            // A closed channel is seen at the next select.
                            let _ = tx.send(JobEvent::Token(chunk)).await;
                            continue;
                        }
                        Err(why) => (Some(format!("worker {peer} {why}")), None),
                    },
                    Frame::End(usage) => (None, Some(usage)),
                    Frame::Failed(message) => (Some(message), None),
                };
                let cost = match paid {
                    Some(p) => {
                        p.finish(&overlay, peer, usage.as_ref(), delivery.paid_tokens())
                            .await
                    }
                    None => Some(silk_chain::Coins::ZERO),
                };
                let _ = cost_tx.send(cost);
                Self::record_outcome(&reputation, peer, usage.is_some());
                let event = match (out, usage) {
                    (_, Some(usage)) => JobEvent::Done { usage, cost },
                    (Some(message), None) => JobEvent::Failed(message),
                    (None, None) => JobEvent::Failed("the job ended without a result".into()),
                };
                let _ = tx.send(event).await;
                return;
            }
        });
        Ok(Attempt {
            events: rx,
            cost: cost_rx,
        })
    }
}

/// Commits what a job cost to the caller's API-key spending, if it has a key.
async fn settle_spend(spend: Option<SpendHold>, cost: Option<silk_chain::Coins>) {
    if let Some(hold) = spend {
        hold.settle(cost).await;
    }
}

/// A job running on one worker.
struct Attempt {
    /// Its events; dropping them ends the job.
    events: mpsc::Receiver<JobEvent>,
    /// What it cost this gateway, sent once its task has settled it
    /// (`None`: settling failed).
    cost: oneshot::Receiver<Option<silk_chain::Coins>>,
}

/// How one attempt ended, as the relay sees it.
enum RelayEnd {
    CallerGone,
    Done(JobUsage),
    Failed(String),
}

/// One decoded frame of a running job.
enum Frame {
    Tokens(TokenChunk),
    End(JobUsage),
    Failed(String),
}

impl Frame {
    fn decode(
        raw: Option<Result<JobFrame, silk_overlay::OverlayError>>,
        peer: PeerId,
        delivered: u32,
    ) -> Frame {
        match raw {
            Some(Ok(JobFrame::Data(d))) => match postcard::from_bytes::<TokenChunk>(&d) {
                Ok(chunk) => Frame::Tokens(chunk),
                Err(e) => Frame::Failed(format!(
                    "worker {peer} sent an undecodable token frame after {delivered} tokens: {e}"
                )),
            },
            Some(Ok(JobFrame::End(u))) => match postcard::from_bytes::<JobUsage>(&u) {
                Ok(u) => Frame::End(u),
                Err(e) => Frame::Failed(format!(
                    "worker {peer} sent an undecodable usage frame: {e}"
                )),
            },
            Some(Ok(JobFrame::Error { code, message })) => Frame::Failed(format!(
                "worker {peer} failed after {delivered} tokens ({code:?}): {message}"
            )),
            Some(Err(e)) => Frame::Failed(format!(
                "worker {peer} failed after {delivered} tokens: {e}"
            )),
            None => Frame::Failed(format!(
                "worker {peer} stopped after {delivered} tokens without finishing the job"
            )),
        }
    }
}

/// A job's payment while it runs on a remote worker.
struct PaidJob {
    billing: Arc<Billing>,
    reservation: Reservation,
    terms: PaymentTerms,
    coefficient_milli: u32,
    prompt_bound: u64,
}

impl PaidJob {
    /// Settles the job (`usage` absent when it failed midway, `delivered`
    /// the tokens the caller got) and sends the cheque to `peer` in the
    /// background. Returns the cost, or `None` if settling failed.
    async fn finish(
        self,
        overlay: &OverlayHandle,
        peer: PeerId,
        usage: Option<&JobUsage>,
        delivered: u32,
    ) -> Option<silk_chain::Coins> {
        match self
            .billing
            .settle(
                self.reservation,
                &self.terms,
                self.coefficient_milli,
                self.prompt_bound,
                usage,
                delivered,
            )
            .await
        {
            Ok(bill) => {
                tokio::spawn(deliver_cheque(overlay.clone(), peer, bill.delivery));
                Some(bill.cost)
            }
            Err(e) => {
                tracing::error!(worker = %peer, error = %e, "could not settle a job");
                None
            }
        }
    }
}

/// Sends a cheque to the worker that earned it, retrying a few times; a
/// cheque that never arrives is covered by the next one (they are cumulative).
async fn deliver_cheque(overlay: OverlayHandle, peer: PeerId, delivery: jobs::ChequeDelivery) {
    let message = jobs::encode(&JobMessage::Cheque(delivery));
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            overlay.open_job(peer, message.clone()),
        )
        .await;
        let mut stream = match stream {
            Ok(Ok(s)) => s,
            Ok(Err(silk_overlay::OverlayError::Stopped)) => return,
            Ok(Err(e)) => {
                tracing::debug!(worker = %peer, error = %e, "cheque delivery failed; retrying");
                continue;
            }
            Err(_) => continue,
        };
        match stream.next_frame().await {
            Some(Ok(JobFrame::End(bytes))) => {
                match postcard::from_bytes::<jobs::ChequeAck>(&bytes) {
                    Ok(ack) => {
                        tracing::debug!(worker = %peer, cumulative = ack.cumulative_nano, outstanding = ack.outstanding_nano, "cheque acknowledged")
                    }
                    Err(e) => tracing::warn!(worker = %peer, error = %e, "undecodable cheque ack"),
                }
                return;
            }
            Some(Ok(JobFrame::Error { code, message })) => {
                tracing::warn!(worker = %peer, ?code, %message, "worker refused a cheque");
                return;
            }
            other => {
                tracing::debug!(worker = %peer, ?other, "no cheque ack; retrying");
            }
        }
    }
    tracing::warn!(worker = %peer, "could not deliver a cheque; the next one covers it");
}

async fn load_worker(model: &str, options: &NodeOptions) -> Result<Worker, MeshError> {
    let store = ModelStore::new(&options.models_dir);
    let source = store.resolve(model).map_err(|e| match e {
        silk_inference::InferenceError::ModelNotFound(_) => MeshError::ModelMissing {
            model: model.to_string(),
            dir: options.models_dir.clone(),
        },
        other => MeshError::Inference(other),
    })?;
    let served = ServedModel {
        id: source.id.clone(),
        name: source.name.clone(),
    };
    let device = options.device;
    let engine = tokio::task::spawn_blocking(move || {
        silk_inference::backend::start_engine(source, device, EngineConfig::default())
    })
    .await
    .map_err(|e| MeshError::Config {
        path: options.models_dir.clone(),
        reason: format!("engine task failed: {e}"),
    })??;
    let tokens_per_s_milli = measure_decode_speed(&engine).await;
    tracing::info!(model = %served.id, tokens_per_s = tokens_per_s_milli as f64 / 1000.0, "engine ready");
    Ok(Worker {
        engine,
        model: served,
        tokens_per_s_milli,
    })
}

/// Runs a short generation and returns its decode speed (tokens/s × 1000).
async fn measure_decode_speed(engine: &Engine) -> u64 {
    let mut request = silk_inference::GenerateRequest::new(
        silk_inference::Prompt::Text("The quick brown fox".into()),
        16,
    );
    request.ignore_eos = true;
    let Ok(mut stream) = engine.submit(request) else {
        return 0;
    };
    while let Some(event) = stream.next().await {
        match event {
            Event::Done(u) => return (u.decode_tokens_per_s.max(0.0) * 1000.0) as u64,
            Event::Error(_) => return 0,
            Event::Token { .. } => {}
        }
    }
    0
}

/// Claims for this node now, bound into a quote where configfs-tsm exists.
async fn produce_attestation(
    public_key: [u8; 32],
    models: Vec<String>,
) -> Result<AttestationDocument, String> {
    let claims = Claims::new(
        Hex(public_key),
        models,
        attest::NODE_VERSION,
        attest::now_unix(),
    )
    .map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || AttestationDocument::produce(claims, &TsmReport::default()))
        .await
        .map_err(|e| format!("attestation task failed: {e}"))?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        silk_overlay::testing::seeded_keypair(u64::from(n))
            .public()
            .to_peer_id()
    }

    /// Audit F10: ids were sorted and the first whose name matched won, so
    /// anyone announcing `name@sha256:0…` took every request by name, and a
    /// second announced id broke every request naming no model.
    #[test]
    fn a_model_name_resolves_to_the_pinned_id_then_to_the_most_served_one() {
        let real = default_pinned_models()[0].clone();
        let fake = format!(
            "{}@sha256:{}",
            silk_inference::DEFAULT_MODEL,
            "0".repeat(64)
        );
        let other = "Other-1B@sha256:aa".to_string();
        let pinned = default_pinned_models();
        // One honest worker; three Sybils serve the fake copy.
        let served: Vec<(&str, PeerId)> = vec![
            (real.as_str(), peer(1)),
            (fake.as_str(), peer(2)),
            (fake.as_str(), peer(3)),
            (fake.as_str(), peer(4)),
            (other.as_str(), peer(5)),
        ];
        let name = silk_inference::DEFAULT_MODEL;
        assert_eq!(
            pick_model(Some(name), &served, &pinned).expect("name"),
            real
        );
        assert_eq!(
            pick_model(Some(&name.to_lowercase()), &served, &pinned).expect("name"),
            real
        );
        // No model, or "default": the pinned model, whatever else is served.
        assert_eq!(pick_model(None, &served, &pinned).expect("none"), real);
        assert_eq!(
            pick_model(Some("default"), &served, &pinned).expect("default"),
            real
        );
        // A full id is taken as it is; another name resolves to its own id.
        assert_eq!(pick_model(Some(&fake), &served, &pinned).expect("id"), fake);
        assert_eq!(
            pick_model(Some("other-1b"), &served, &pinned).expect("other"),
            other
        );
        // Nothing pinned served: the id with the most distinct workers, not
        // the first in sort order; a tie is refused.
        let unpinned: Vec<(&str, PeerId)> = vec![
            ("M@sha256:00", peer(1)),
            ("M@sha256:ff", peer(2)),
            ("M@sha256:ff", peer(3)),
            ("M@sha256:ff", peer(3)),
        ];
        assert_eq!(
            pick_model(Some("M"), &unpinned, &pinned).expect("most"),
            "M@sha256:ff"
        );
        let tie: Vec<(&str, PeerId)> = vec![("M@sha256:00", peer(1)), ("M@sha256:ff", peer(2))];
        assert!(matches!(
            pick_model(Some("M"), &tie, &pinned),
            Err(DispatchError::ModelRequired(_))
        ));
        assert!(matches!(
            pick_model(Some("nope"), &served, &pinned),
            Err(DispatchError::UnknownModel(_))
        ));
    }

    #[test]
    fn the_cause_of_a_failed_request_weighs_the_attempts() {
        let at = |e: AttemptError| (peer(1), e);
        let busy = || AttemptError::Busy("b".into());
        let pay = || AttemptError::Payment("p".into());
        let slow = || AttemptError::Timeout("t".into());
        let failed = || AttemptError::Failed("f".into());
        let cause = |v: Vec<(PeerId, AttemptError)>| Attempts(v).cause();
        assert_eq!(cause(vec![]), FailureCause::Unavailable);
        assert_eq!(cause(vec![at(busy()), at(busy())]), FailureCause::Busy);
        assert_eq!(cause(vec![at(busy()), at(pay())]), FailureCause::Payment);
        assert_eq!(cause(vec![at(pay()), at(slow())]), FailureCause::Timeout);
        assert_eq!(
            cause(vec![at(slow()), at(failed()), at(busy())]),
            FailureCause::Unavailable
        );
        assert_eq!(
            cause(vec![at(AttemptError::Local("l".into()))]),
            FailureCause::Unavailable
        );
        // Who is blamed follows the cause: only a worker's failure or its
        // silence counts against it.
        assert_eq!(busy().blame(), Blame::Busy);
        assert_eq!(pay().blame(), Blame::Nobody);
        assert_eq!(slow().blame(), Blame::Worker);
        assert_eq!(failed().blame(), Blame::Worker);
        assert_eq!(AttemptError::Rejected("r".into()).blame(), Blame::Caller);
        assert_eq!(
            AttemptError::of_refusal(JobErrorCode::Application(jobs::ERR_BAD_CHEQUE), "x".into())
                .blame(),
            Blame::Nobody
        );
    }
}

//! One running node: the overlay, the engine (on workers), the announcement
//! loop, the inbound-job loop, and the gateway's dispatch with retries.
//!
//! # Tasks
//!
//! [`Node::start`] spawns, under one [`CancellationToken`]:
//! - the *event loop*: overlay events → worker jobs (each in its own task,
//!   bounded by the overlay's inbound-job limit) and attestation requests;
//! - on workers, the *announcer*: re-announces load every
//!   [`ANNOUNCE_EVERY`] and within [`ANNOUNCE_POLL`] of a load change.
//!
//! Each gateway job has one forwarding task that reads the worker's frames
//! into a bounded channel; dropping the receiver drops the job stream, which
//! resets it and so cancels the job on the worker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use silk_inference::{backend::Device, Engine, EngineConfig, Event, ModelStore};
use silk_overlay::{
    Announcement, AttestationMode, JobFrame, Multiaddr, Overlay, OverlayConfig, OverlayEvent,
    OverlayHandle, PeerId,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::attest::{self, AttestationDocument, Claims, Hex, NodeIdentity, Policy, TsmReport};
use crate::jobs::{self, JobRequest, JobUsage, TokenChunk};
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
/// Tokens buffered between a worker's stream and the HTTP response.
const JOB_CHANNEL: usize = 64;
/// Candidates tried before giving up.
const MAX_ATTEMPTS: usize = 4;

/// Called around every job a gateway dispatches: the hook that payment
/// books plug into. `before_dispatch` may refuse a worker (e.g. no lane
/// funds); `after_completion` gets the token counts the worker reported.
pub trait JobHook: Send + Sync + 'static {
    /// The gateway is about to send `request` to `worker` at `price_milli`.
    /// An error skips this worker.
    fn before_dispatch(
        &self,
        worker: &PeerId,
        request: &JobRequest,
        price_milli: u64,
    ) -> Result<(), HookRefusal>;
    /// The job on `worker` ended; `usage` is absent when it failed midway,
    /// with `delivered_tokens` the tokens the caller received.
    fn after_completion(&self, worker: &PeerId, usage: Option<&JobUsage>, delivered_tokens: u32);
}

/// A [`JobHook`]'s reason to skip a worker.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HookRefusal(pub String);

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
    /// This worker's price coefficient × 1000.
    pub price_coefficient_milli: u64,
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
}

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
    max_jobs_per_worker: u32,
    in_flight: Arc<Mutex<HashMap<PeerId, u32>>>,
    failures: Mutex<HashMap<PeerId, Instant>>,
    appraiser: Arc<Mutex<attest::Appraiser>>,
    hook: Mutex<Option<Arc<dyn JobHook>>>,
    cancel: CancellationToken,
    started: Instant,
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
    Done(JobUsage),
    /// The job failed after its first token.
    Failed(String),
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
    /// Every worker for the model failed the attestation policy.
    #[error("{0}")]
    AttestationRefused(String),
    /// Every worker is at this gateway's per-worker cap.
    #[error("every worker for `{0}` is at its concurrency cap; retry shortly")]
    Saturated(String),
    /// Every attempt failed before the first token.
    #[error("no worker could take the job: {0}")]
    AllFailed(String),
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
        let identity =
            NodeIdentity::load_or_generate(&attest::identity::identity_path(&options.data_dir))?;
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
        let node = Arc::new(Self {
            overlay,
            worker,
            mode,
            attestation: Mutex::new((doc.encode()?, doc.digest().0)),
            allow_insecure: options.allow_insecure_workers,
            price_milli: options.price_coefficient_milli,
            max_jobs_per_worker: options.max_jobs_per_worker.max(1),
            in_flight: Arc::default(),
            failures: Mutex::default(),
            appraiser: Arc::new(Mutex::new(
                attest::Appraiser::new(policy, options.allow_insecure_workers)
                    .with_collateral_source(collateral),
            )),
            hook: Mutex::new(None),
            cancel: CancellationToken::new(),
            started: Instant::now(),
        });
        tokio::spawn(Arc::clone(&node).event_loop(events));
        tokio::spawn(Arc::clone(&node).refresh_attestation(public_key, models));
        if let Some(worker) = &node.worker {
            for key in [worker.model.id.clone(), worker.model.name.clone()] {
                let overlay = node.overlay.clone();
                tokio::spawn(async move {
                    if let Err(e) = overlay.start_providing(key.as_bytes()).await {
                        tracing::debug!(error = %e, "provider record not replicated yet");
                    }
                });
            }
            tokio::spawn(Arc::clone(&node).announcer());
        }
        Ok(node)
    }

    /// Installs the hook called around every dispatched job (payments).
    pub fn set_job_hook(&self, hook: Arc<dyn JobHook>) {
        if let Ok(mut h) = self.hook.lock() {
            *h = Some(hook);
        }
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
            free_slots: (load.max_batch as u32).saturating_sub(busy),
            queue_depth: load.queued as u32,
            decode_tokens_per_s_milli: worker.tokens_per_s_milli,
            price_coefficient_milli: self.price_milli,
            attestation_mode: self.mode,
            attestation_digest: Some(self.attestation_digest()),
            seq,
            expires_at_ms: now_ms() + ANNOUNCE_TTL.as_millis() as u64,
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
            seq += 1;
            let a = self.announcement(&worker, seq);
            let key = (a.free_slots, a.queue_depth);
            if last == Some(key) && last_sent.elapsed() < ANNOUNCE_EVERY {
                continue;
            }
            match self.overlay.announce(a).await {
                Ok(()) => {
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
                        match &node.worker {
                            Some(w) => {
                                jobs::serve_job(
                                    &w.engine,
                                    &node.overlay,
                                    peer,
                                    request,
                                    responder,
                                    node.price_milli,
                                    node.cancel.clone(),
                                )
                                .await
                            }
                            None => {
                                let _ = responder
                                    .error(
                                        silk_overlay::JobErrorCode::Rejected,
                                        "this node is not a worker",
                                    )
                                    .await;
                            }
                        }
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
                OverlayEvent::Misbehaviour {
                    peer,
                    offence,
                    score,
                } => tracing::info!(%peer, ?offence, score, "peer misbehaved"),
                OverlayEvent::PeerBanned { peer, score } => {
                    tracing::warn!(%peer, score, "peer banned")
                }
                other => tracing::trace!(?other, "overlay event"),
            }
        }
    }

    /// Resolves the model a request names (id, name, or none when the mesh
    /// serves exactly one model) against the current announcements.
    pub async fn resolve_model(&self, wanted: Option<&str>) -> Result<String, DispatchError> {
        let anns = self.overlay.announcements().await.unwrap_or_default();
        let mut ids: Vec<String> = anns.iter().flat_map(|a| a.models.clone()).collect();
        ids.sort();
        ids.dedup();
        match wanted.filter(|w| !w.is_empty() && *w != "default") {
            None => match ids.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(DispatchError::ModelRequired("no model yet".into())),
                many => Err(DispatchError::ModelRequired(many.join(", "))),
            },
            Some(w) => {
                if let Some(id) = ids.iter().find(|id| model_matches(id, w)) {
                    return Ok(id.clone());
                }
                // Gossip may not know yet; the DHT can still have providers for a full id.
                if w.contains("@sha256:") {
                    Ok(w.to_string())
                } else {
                    Err(DispatchError::UnknownModel(w.to_string()))
                }
            }
        }
    }

    /// Candidates for `model`, attestation-filtered and ranked.
    async fn candidates(
        &self,
        model: &str,
        request: &JobRequest,
    ) -> Result<Vec<Candidate>, DispatchError> {
        let anns: Vec<Announcement> = self
            .overlay
            .announcements()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.models.iter().any(|m| m == model))
            .collect();
        let rtts: HashMap<PeerId, Duration> = self
            .overlay
            .peers()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.rtt.map(|r| (p.peer_id, r)))
            .collect();
        let mut raw: Vec<(Announcement, Option<Duration>)> = anns
            .into_iter()
            .map(|a| {
                let rtt = if a.peer_id == self.peer_id() {
                    Some(Duration::ZERO)
                } else {
                    rtts.get(&a.peer_id).copied()
                };
                (a, rtt)
            })
            .collect();
        if raw.len() < 2 {
            raw.extend(self.dht_candidates(model, &raw).await);
        }
        if raw.is_empty() {
            return Err(DispatchError::UnknownModel(model.to_string()));
        }
        let in_flight = self.in_flight.lock().map(|m| m.clone()).unwrap_or_default();
        let failures = self.failures.lock().map(|m| m.clone()).unwrap_or_default();
        let mut refused = Vec::new();
        let mut out = Vec::new();
        for (a, rtt) in raw {
            if let Err(reason) = self.check_attestation(&a).await {
                refused.push(format!("{}: {reason}", a.peer_id));
                continue;
            }
            let mine = in_flight.get(&a.peer_id).copied().unwrap_or(0);
            out.push(Candidate {
                peer: a.peer_id,
                rtt,
                free_slots: a.free_slots,
                queue_depth: a.queue_depth,
                tokens_per_s_milli: a.decode_tokens_per_s_milli,
                price_milli: a.price_coefficient_milli,
                mode: a.attestation_mode,
                in_flight: mine,
                recently_failed: failures
                    .get(&a.peer_id)
                    .is_some_and(|t| t.elapsed() < FAILURE_MEMORY),
            });
        }
        if out.is_empty() {
            return Err(DispatchError::AttestationRefused(format!(
                "every worker serving `{model}` was refused by this gateway's attestation policy ({}); {}",
                refused.join("; "),
                if self.allow_insecure {
                    "check the policy file"
                } else {
                    "insecure workers let their operator read prompts: start the gateway with --allow-insecure-workers to use them anyway"
                }
            )));
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
    async fn dht_candidates(
        &self,
        model: &str,
        known: &[(Announcement, Option<Duration>)],
    ) -> Vec<(Announcement, Option<Duration>)> {
        let providers = match tokio::time::timeout(
            Duration::from_secs(5),
            self.overlay.get_providers(model.as_bytes()),
        )
        .await
        {
            Ok(Ok(p)) => p,
            _ => return Vec::new(),
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
            out.push((
                Announcement {
                    peer_id: peer,
                    models: doc.claims.models.clone(),
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
                },
                None,
            ));
        }
        out
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
                if let Some(v) = self
                    .appraiser
                    .lock()
                    .ok()
                    .and_then(|mut ap| ap.cached(&digest, now))
                {
                    return if v.is_accepted() {
                        Ok(())
                    } else {
                        Err(v.to_string())
                    };
                }
                let key = peer_public_key(&a.peer_id).ok_or("peer id is not an ed25519 key")?;
                let bytes = tokio::time::timeout(
                    Duration::from_secs(10),
                    self.overlay.fetch_attestation(a.peer_id, Vec::new()),
                )
                .await
                .map_err(|_| "attestation fetch timed out".to_string())?
                .map_err(|e| format!("attestation fetch failed: {e}"))?;
                let doc = AttestationDocument::decode(&bytes).map_err(|e| e.to_string())?;
                let appraiser = Arc::clone(&self.appraiser);
                let verdict = tokio::task::spawn_blocking(move || {
                    appraiser
                        .lock()
                        .map(|mut ap| ap.appraise_announced(&doc, &key, &digest, now))
                        .map_err(|_| "appraiser lock poisoned".to_string())
                })
                .await
                .map_err(|e| e.to_string())??;
                if verdict.is_accepted() {
                    Ok(())
                } else {
                    Err(verdict.to_string())
                }
            }
        }
    }

    fn hook(&self) -> Option<Arc<dyn JobHook>> {
        self.hook.lock().ok().and_then(|h| h.clone())
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

    /// Places `request` (its `model` already resolved to an id) on the best
    /// worker, retrying the next candidate while no token has arrived.
    pub async fn dispatch(&self, request: JobRequest) -> Result<Dispatch, DispatchError> {
        let candidates = self.candidates(&request.model, &request).await?;
        let hook = self.hook();
        let mut errors = Vec::new();
        for c in candidates.into_iter().take(MAX_ATTEMPTS) {
            if let Some(h) = &hook {
                if let Err(e) = h.before_dispatch(&c.peer, &request, c.price_milli) {
                    errors.push(format!("{}: {e}", c.peer));
                    continue;
                }
            }
            let slot = self.take_slot(c.peer);
            let attempt = if c.peer == self.peer_id() {
                self.run_local(&request, slot, hook.clone())
            } else {
                self.run_remote(&request, c.peer, slot, hook.clone()).await
            };
            match attempt {
                Ok(events) => {
                    return Ok(Dispatch {
                        worker: c.peer,
                        attestation: c.mode,
                        model: request.model.clone(),
                        events,
                    })
                }
                Err(e) => {
                    tracing::info!(worker = %c.peer, error = %e, "worker failed before the first token; trying the next");
                    self.note_failure(c.peer);
                    errors.push(format!("{}: {e}", c.peer));
                }
            }
        }
        Err(DispatchError::AllFailed(if errors.is_empty() {
            "no candidate".into()
        } else {
            errors.join("; ")
        }))
    }

    fn run_local(
        &self,
        request: &JobRequest,
        slot: InFlight,
        hook: Option<Arc<dyn JobHook>>,
    ) -> Result<mpsc::Receiver<JobEvent>, String> {
        let worker = self.worker.clone().ok_or("not a worker")?;
        let mut stream = worker
            .engine
            .submit(request.to_generate())
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(JOB_CHANNEL);
        let me = self.peer_id();
        let price = self.price_milli;
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut delivered = 0u32;
            loop {
                let event = tokio::select! {
                    biased;
                    () = cancel.cancelled() => None,
                    e = stream.next() => e,
                };
                let out = match event {
                    Some(Event::Token { id, text }) => {
                        delivered += 1;
                        JobEvent::Token(TokenChunk {
                            ids: vec![id],
                            text,
                        })
                    }
                    Some(Event::Done(u)) => {
                        let usage = jobs::usage_record(&u, price);
                        if let Some(h) = &hook {
                            h.after_completion(&me, Some(&usage), delivered);
                        }
                        let _ = tx.send(JobEvent::Done(usage)).await;
                        return;
                    }
                    Some(Event::Error(e)) => JobEvent::Failed(format!("engine failed: {e}")),
                    None => JobEvent::Failed("the engine stopped".into()),
                };
                let last = matches!(out, JobEvent::Failed(_));
                if tx.send(out).await.is_err() || last {
                    if let Some(h) = &hook {
                        h.after_completion(&me, None, delivered);
                    }
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn run_remote(
        &self,
        request: &JobRequest,
        peer: PeerId,
        slot: InFlight,
        hook: Option<Arc<dyn JobHook>>,
    ) -> Result<mpsc::Receiver<JobEvent>, String> {
        let mut stream = tokio::time::timeout(
            Duration::from_secs(10),
            self.overlay.open_job(peer, jobs::encode(request)),
        )
        .await
        .map_err(|_| "opening the job stream timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let first = stream.next_frame().await;
        let first = match first {
            Some(Ok(JobFrame::Data(d))) => {
                let chunk: TokenChunk = postcard::from_bytes(&d)
                    .map_err(|e| format!("undecodable token frame: {e}"))?;
                JobEvent::Token(chunk)
            }
            Some(Ok(JobFrame::End(u))) => JobEvent::Done(
                postcard::from_bytes(&u).map_err(|e| format!("undecodable usage frame: {e}"))?,
            ),
            Some(Ok(JobFrame::Error { code, message })) => {
                return Err(format!("worker refused ({code:?}): {message}"))
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the worker closed the stream".into()),
        };
        let (tx, rx) = mpsc::channel(JOB_CHANNEL);
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut delivered = u32::from(matches!(first, JobEvent::Token(_)));
            let mut usage = None;
            if let JobEvent::Done(u) = &first {
                usage = Some(u.clone());
            }
            let done = usage.is_some();
            if tx.send(first).await.is_err() || done {
                if let Some(h) = &hook {
                    h.after_completion(&peer, usage.as_ref(), delivered);
                }
                return;
            }
            loop {
                let frame = tokio::select! {
                    biased;
                    () = cancel.cancelled() => None,
                    f = stream.next_frame() => f,
                };
                let out = match frame {
                    Some(Ok(JobFrame::Data(d))) => match postcard::from_bytes::<TokenChunk>(&d) {
                        Ok(chunk) => {
                            delivered += chunk.ids.len() as u32;
                            JobEvent::Token(chunk)
                        }
                        Err(e) => JobEvent::Failed(format!(
                            "worker {peer} sent an undecodable token frame after {delivered} tokens: {e}"
                        )),
                    },
                    Some(Ok(JobFrame::End(u))) => match postcard::from_bytes::<JobUsage>(&u) {
                        Ok(u) => {
                            usage = Some(u.clone());
                            JobEvent::Done(u)
                        }
                        Err(e) => JobEvent::Failed(format!(
                            "worker {peer} sent an undecodable usage frame: {e}"
                        )),
                    },
                    Some(Ok(JobFrame::Error { code, message })) => JobEvent::Failed(format!(
                        "worker {peer} failed after {delivered} tokens ({code:?}): {message}"
                    )),
                    Some(Err(e)) => JobEvent::Failed(format!(
                        "worker {peer} failed after {delivered} tokens: {e}"
                    )),
                    None => JobEvent::Failed(format!(
                        "worker {peer} stopped after {delivered} tokens without finishing the job"
                    )),
                };
                let last = !matches!(out, JobEvent::Token(_));
                if tx.send(out).await.is_err() || last {
                    if let Some(h) = &hook {
                        h.after_completion(&peer, usage.as_ref(), delivered);
                    }
                    return;
                }
            }
        });
        Ok(rx)
    }
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

//! One running node: the supervisor of its services.
//!
//! [`Node::start`] starts the overlay and the services, each owning its
//! state: the [`Gateway`] (worker table, selection, forwarding, paying),
//! the [`WorkerService`] on workers (engine, announcer), the
//! [`ReputationService`] (a task with an inbox), and this node's
//! attestation document. Their long-lived tasks run in one `JoinSet`
//! under one [`CancellationToken`]; [`Node::shutdown_and_wait`] cancels
//! and awaits them (`silk run` does so on Ctrl-C, so a redemption pass in
//! progress finishes):
//! - the *router*: overlay events → an inbound job to the worker side
//!   (each in its own task, bounded by the overlay's inbound-job limit),
//!   an attestation request to the document, a reputation report to the
//!   reputation inbox, announcements and disconnections to the gateway's
//!   table;
//! - the gateway's *worker-table keeper*; the *reputation* task; the
//!   *attestation refresh*;
//! - on workers, the *announcer* and, with payments, the worker's payment
//!   duties (overdue jobs, redemption).
//!
//! Each gateway job has a relay task and, per worker it runs on, one
//! forwarding task (see [`crate::gateway`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use silk_inference::{backend::Device, Engine, Precision};
use silk_overlay::{
    Announcement, AttestationMode, Multiaddr, Overlay, OverlayConfig, OverlayEvent, OverlayHandle,
    PeerId,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::activity::History;
use crate::api::keys::SpendHold;
use crate::attest::{self, NodeIdentity, TsmReport};
use crate::billing::Billing;
use crate::gateway::{Dispatch, DispatchError, Gateway};
use crate::protocol::JobRequest;
use crate::reputation::{ReputationHandle, ReputationService};
use crate::worker::{self, LoadedEngine, OwnAttestation, ServedModel, WorkerService};
use crate::MeshError;

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
    /// Float type of the engine's dense weights and activations.
    pub dtype: Precision,
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
    /// How many requests wait for a free slot, and for how long.
    pub queue: crate::gateway::queue::QueueConfig,
    /// mDNS on the LAN.
    pub mdns: bool,
    /// Relaying and reachability behind NAT.
    pub nat: NatOptions,
    /// Faster gossip and pings (local testnets).
    pub fast_gossip: bool,
    /// Fewest connected peers the overlay looks for.
    pub min_peers: u32,
    /// Most connected peers the overlay keeps.
    pub max_peers: u32,
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
    /// [`crate::gateway::default_pinned_models`] plus the operator's `pinned_models`.
    pub pinned_models: Vec<String>,
}

/// How a node deals with NAT: relaying for others, and being reached
/// through relays itself (see `silk_overlay`'s relay fields).
#[derive(Debug, Clone)]
pub struct NatOptions {
    /// Relay circuits for peers behind NAT.
    pub relay_server: bool,
    /// What the relay server grants.
    pub relay_limits: silk_overlay::RelayLimits,
    /// Relays to listen through from the start.
    pub relays: Vec<Multiaddr>,
    /// Peers reach each other on private addresses (a LAN, a lab, a VPN):
    /// autonat probes them.
    pub private_network: bool,
}

impl Default for NatOptions {
    fn default() -> Self {
        Self {
            relay_server: true,
            relay_limits: silk_overlay::RELAY_LIMITS,
            relays: Vec::new(),
            private_network: false,
        }
    }
}

/// A running node. Cheap to share behind an `Arc`.
pub struct Node {
    overlay: OverlayHandle,
    gateway: Arc<Gateway>,
    worker: Option<Arc<WorkerService>>,
    reputation: ReputationHandle,
    attestation: Arc<OwnAttestation>,
    billing: Option<Arc<Billing>>,
    cancel: CancellationToken,
    /// The node's long-lived tasks (see [`Node::spawn_task`]).
    tasks: Mutex<Tasks>,
    started: Instant,
    metrics: crate::metrics::Metrics,
    history: History,
}

/// The history's file in the data directory.
pub const HISTORY_FILE: &str = "history.redb";

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
            .field("worker", &self.worker.as_ref().map(|w| &w.model().id))
            .finish_non_exhaustive()
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

        let loaded = match &options.worker_model {
            Some(model) => Some(LoadedEngine::load(model, &options).await?),
            None => None,
        };
        let models: Vec<String> = loaded.iter().map(|l| l.model().id.clone()).collect();
        let attestation = Arc::new(
            OwnAttestation::produce(identity.public_key(), models)
                .await
                .map_err(|reason| MeshError::Config {
                    path: options.data_dir.clone(),
                    reason,
                })?,
        );

        let mut config = OverlayConfig::new(keypair, options.listen.clone())
            .with_bootstrap(options.bootstrap.clone())
            .with_mdns(options.mdns);
        config.agent_version = format!("silk/{}", env!("CARGO_PKG_VERSION"));
        config.min_peers = options.min_peers;
        config.max_peers = options.max_peers;
        config.relay_server = options.nat.relay_server;
        config.relay_limits = options.nat.relay_limits;
        config.relays = options.nat.relays.clone();
        config.autonat_private_addresses = options.nat.private_network;
        if config.listens_only_on_loopback() {
            // A local testnet: every peer dials in from this machine.
            config.max_inbound_connections_per_ip = config.max_inbound_connections;
        }
        if options.fast_gossip {
            config.gossip_heartbeat = Duration::from_millis(200);
            config.announce_republish_interval = Duration::from_secs(2);
            config.ping_interval = Duration::from_secs(1);
            config.kad_query_timeout = Duration::from_secs(5);
            config.autonat_boot_delay = Duration::from_secs(1);
            config.autonat_retry_interval = Duration::from_secs(5);
        }
        let mut metrics = crate::metrics::Metrics::new();
        config.metrics = Some(silk_overlay::OverlayMetrics::register(
            metrics.registry_mut(),
        ));
        let history_path = options.data_dir.join(HISTORY_FILE);
        let (history, history_writer) = History::open(&history_path, metrics.jobs().clone())
            .map_err(|e| MeshError::Config {
                path: history_path.clone(),
                reason: e.to_string(),
            })?;
        let (overlay, events) = Overlay::spawn(config).await?;
        let cancel = CancellationToken::new();
        let worker = loaded.map(|loaded| {
            Arc::new(WorkerService::new(
                loaded,
                options.price_coefficient_milli,
                overlay.clone(),
                options.billing.clone(),
                Arc::clone(&attestation),
            ))
        });
        let (reputation_service, reputation) = ReputationService::new(overlay.clone());
        let gateway = Arc::new(Gateway::new(
            &options,
            overlay.clone(),
            worker.clone(),
            reputation.clone(),
            history.clone(),
            cancel.clone(),
        )?);
        metrics
            .registry_mut()
            .sub_registry_with_prefix("silk")
            .register_collector(Box::new(crate::metrics::StateCollector {
                billing: options.billing.clone(),
                engine: worker.as_ref().map(|w| w.engine().clone()),
                queue: gateway.queue(),
            }));
        let node = Arc::new(Self {
            overlay,
            gateway,
            worker,
            reputation,
            attestation,
            billing: options.billing.clone(),
            cancel,
            tasks: Mutex::default(),
            started: Instant::now(),
            metrics,
            history,
        });
        node.spawn_task(
            "history",
            History::run(history_writer, node.billing.clone(), node.cancel.clone()),
        );
        node.spawn_task("router", Arc::clone(&node).route(events));
        node.spawn_task("worker table", Arc::clone(&node.gateway).table_keeper());
        if node.billing.is_some() {
            node.spawn_task("cheque courier", Arc::clone(&node.gateway).cheque_courier());
        }
        node.spawn_task("reputation", reputation_service.run(node.cancel.clone()));
        node.spawn_task(
            "attestation refresh",
            Arc::clone(&node.attestation).refresh(node.cancel.clone()),
        );
        if let Some(worker) = &node.worker {
            for key in [worker.model().id.clone(), worker.model().name.clone()] {
                let overlay = node.overlay.clone();
                node.spawn_task("provider record", async move {
                    if let Err(e) = overlay.start_providing(key.as_bytes()).await {
                        tracing::debug!(error = %e, "provider record not replicated yet");
                    }
                });
            }
            let gateway = Arc::clone(&node.gateway);
            node.spawn_task(
                "announcer",
                Arc::clone(worker).announcer(node.cancel.clone(), move |a| gateway.offer(a)),
            );
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

    /// This node's Prometheus registry.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// This node's record of jobs and money over time.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Payments, when this node settles jobs on a ledger.
    pub fn billing(&self) -> Option<&Arc<Billing>> {
        self.billing.as_ref()
    }

    /// The overlay handle.
    pub fn overlay(&self) -> &OverlayHandle {
        &self.overlay
    }

    /// The gateway: what this node knows of workers, and its request path.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.overlay.local_peer_id()
    }

    /// This node's attestation mode.
    pub fn attestation_mode(&self) -> AttestationMode {
        self.attestation.mode()
    }

    /// Whether this gateway routes to insecure workers.
    pub fn allows_insecure(&self) -> bool {
        self.gateway.allows_insecure()
    }

    /// The model this node serves, if it is a worker.
    pub fn served_model(&self) -> Option<&ServedModel> {
        self.worker.as_ref().map(|w| w.model())
    }

    /// The local engine, if this node is a worker.
    pub fn engine(&self) -> Option<&Engine> {
        self.worker.as_ref().map(|w| w.engine())
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

    /// A worker's reputation here, 0 to 1.
    pub fn reputation_of(&self, worker: &PeerId) -> f64 {
        self.reputation.score(worker)
    }

    /// See [`Gateway::resolve_model`].
    pub fn resolve_model(&self, wanted: Option<&str>) -> Result<String, DispatchError> {
        self.gateway.resolve_model(wanted)
    }

    /// See [`Gateway::known_workers`].
    pub fn known_workers(&self) -> Vec<Announcement> {
        self.gateway.known_workers()
    }

    /// See [`Gateway::worst_case_cost`].
    pub fn worst_case_cost(
        &self,
        request: &JobRequest,
        max_coefficient_milli: Option<u32>,
    ) -> silk_chain::Coins {
        self.gateway.worst_case_cost(request, max_coefficient_milli)
    }

    /// See [`Gateway::dispatch`].
    pub async fn dispatch(
        &self,
        request: JobRequest,
        max_coefficient_milli: Option<u32>,
        spend: Option<SpendHold>,
    ) -> Result<Dispatch, DispatchError> {
        self.gateway
            .dispatch(request, max_coefficient_milli, spend)
            .await
    }

    /// See [`Gateway::dispatch_near`].
    pub async fn dispatch_near(
        &self,
        request: JobRequest,
        max_coefficient_milli: Option<u32>,
        spend: Option<SpendHold>,
        worker: PeerId,
    ) -> Result<Dispatch, DispatchError> {
        self.gateway
            .dispatch_near(request, max_coefficient_milli, spend, worker)
            .await
    }

    /// Routes each overlay event to the service that owns it, until the
    /// node stops. Never waits on a service: a job runs in its own task,
    /// a report that finds the reputation inbox full is dropped.
    #[tracing::instrument(name = "router", skip_all)]
    async fn route(self: Arc<Self>, mut events: mpsc::Receiver<OverlayEvent>) {
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
                    let engine = self.worker.as_ref().map(|w| w.engine().clone());
                    let price_milli = self.worker.as_ref().map_or(0, |w| w.price_milli());
                    let overlay = self.overlay.clone();
                    let billing = self.billing.clone();
                    let cancel = self.cancel.clone();
                    let history = self.history.clone();
                    tokio::spawn(async move {
                        let ctx = worker::WorkerContext {
                            engine: engine.as_ref(),
                            overlay: &overlay,
                            billing: billing.as_deref(),
                            price_milli,
                            history: &history,
                        };
                        worker::serve_stream(ctx, peer, request, responder, cancel).await
                    });
                }
                OverlayEvent::AttestationRequest { responder, .. } => {
                    let doc = self.attestation.encoded();
                    tokio::spawn(async move {
                        if let Err(e) = responder.respond(doc).await {
                            tracing::debug!(error = %e, "could not answer an attestation request");
                        }
                    });
                }
                OverlayEvent::Reputation { reporter, payload } => {
                    self.reputation.offer_report(reporter, payload);
                }
                OverlayEvent::Misbehaviour {
                    peer,
                    offence,
                    score,
                } => tracing::info!(%peer, ?offence, score, "peer misbehaved"),
                OverlayEvent::PeerBanned { peer, score } => {
                    tracing::warn!(%peer, score, "peer banned")
                }
                OverlayEvent::Announcement(a) => self.gateway.offer(a),
                OverlayEvent::PeerDisconnected { peer } => self.gateway.disconnected(&peer),
                other => tracing::trace!(?other, "overlay event"),
            }
        }
    }
}

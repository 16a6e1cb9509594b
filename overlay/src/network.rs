//! The overlay task: owns the [`Swarm`], serves [`Command`]s from handles,
//! turns swarm events into [`OverlayEvent`]s and applies peer policy.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use libp2p::{
    autonat,
    core::transport::ListenerId,
    dcutr, gossipsub, identify, kad, mdns,
    multiaddr::Protocol,
    ping, relay, request_response,
    swarm::{
        dial_opts::{DialOpts, PeerCondition},
        ConnectionId, DialError, SwarmEvent,
    },
    Multiaddr, PeerId, Swarm,
};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::{
    behaviour::{
        build_swarm, AttestRequest, AttestResponse, Behaviour, BehaviourEvent, AUTO_RELAYS,
        KAD_PROTOCOL, RELAY_HOP_PROTOCOL,
    },
    gossip::{self, GossipBook, SignedEnvelope, Verdict},
    handle::{AttestationResponder, ConnectionInfo, OverlayHandle, PeerInfo, Reachability},
    job::{self, JobLimits, JOB_PROTOCOL},
    misbehaviour::{Outcome, PeerPolicy},
    peers::{self, StreamUse},
    Announcement, Misbehaviour, OverlayConfig, OverlayError,
};

/// Offences found outside the overlay task (job streams), sent to it.
pub(crate) type Reports = mpsc::Sender<(PeerId, Misbehaviour)>;

/// Capacity of the internal misbehaviour report channel.
const REPORT_BUFFER: usize = 256;
/// Most Kademlia queries or attestation requests waiting for a reply at once.
const MAX_PENDING: usize = 1024;
/// Most addresses kept per peer.
const MAX_ADDRS_PER_PEER: usize = 16;
/// Weight of a new ping sample in the RTT moving average.
const RTT_ALPHA: f64 = 0.2;
/// How often a peer met only through a relay is dialled at its direct
/// addresses.
const DIRECT_RETRY: Duration = Duration::from_secs(5 * 60);
/// How long a relay that refused us a reservation (it is full, or relays
/// for no one) is left alone before it is asked again.
const RELAY_RETRY: Duration = Duration::from_secs(2 * 60);
/// How long `spawn` waits for listeners to report their addresses.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

type Reply<T> = oneshot::Sender<Result<T, OverlayError>>;

/// A request from a handle to the overlay task.
pub(crate) enum Command {
    Dial {
        addr: Multiaddr,
        reply: Reply<()>,
    },
    /// Answers once this node holds a connection to `peer`, dialling it
    /// (by the addresses the behaviours know) when needed.
    Connect {
        peer: PeerId,
        reply: Reply<()>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Reachability {
        reply: oneshot::Sender<Reachability>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    Coordinate {
        reply: oneshot::Sender<crate::vivaldi::Coordinate>,
    },
    Announce {
        announcement: Announcement,
        reply: Reply<()>,
    },
    Announcements {
        reply: oneshot::Sender<Vec<Announcement>>,
    },
    PublishReputation {
        report: Vec<u8>,
        reply: Reply<()>,
    },
    StartProviding {
        key: Vec<u8>,
        reply: Reply<()>,
    },
    StopProviding {
        key: Vec<u8>,
        reply: Reply<()>,
    },
    GetProviders {
        key: Vec<u8>,
        reply: Reply<HashSet<PeerId>>,
    },
    FindPeer {
        peer: PeerId,
        reply: Reply<Vec<Multiaddr>>,
    },
    FetchAttestation {
        peer: PeerId,
        challenge: Vec<u8>,
        reply: Reply<Vec<u8>>,
    },
    RespondAttestation {
        channel: request_response::ResponseChannel<AttestResponse>,
        evidence: Vec<u8>,
        reply: Reply<()>,
    },
    ReportMisbehaviour {
        peer: PeerId,
        offence: Misbehaviour,
    },
    MisbehaviourScore {
        peer: PeerId,
        reply: oneshot::Sender<u32>,
    },
    #[cfg(feature = "testing")]
    PublishRaw {
        topic: &'static str,
        data: Vec<u8>,
        reply: Reply<()>,
    },
}

/// What the overlay tells the node.
///
/// Events are delivered through a bounded channel. Informational events are
/// dropped (with a warning) when the node does not keep up; the state they
/// describe stays readable through the handle. Inbound jobs wait for room.
#[derive(Debug)]
#[non_exhaustive]
pub enum OverlayEvent {
    /// A connection to a new peer is up.
    PeerConnected {
        /// The peer.
        peer: PeerId,
        /// Its address on this connection.
        address: Multiaddr,
    },
    /// The last connection to a peer closed.
    PeerDisconnected {
        /// The peer.
        peer: PeerId,
    },
    /// A valid, newer announcement arrived from gossip.
    Announcement(Announcement),
    /// A valid reputation report arrived from gossip.
    Reputation {
        /// The report's author (it signed the payload).
        reporter: PeerId,
        /// The opaque report.
        payload: Vec<u8>,
    },
    /// A gateway opened a job to this node.
    InboundJob {
        /// The gateway.
        peer: PeerId,
        /// The opaque request bytes.
        request: Vec<u8>,
        /// Where to write the answer.
        responder: job::JobResponder,
    },
    /// A peer asks for this node's attestation evidence.
    AttestationRequest {
        /// The asker.
        peer: PeerId,
        /// Its challenge (nonce), to bind into the evidence.
        challenge: Vec<u8>,
        /// Where to send the evidence.
        responder: AttestationResponder,
    },
    /// A peer misbehaved; its score went up.
    Misbehaviour {
        /// The peer.
        peer: PeerId,
        /// What it did.
        offence: Misbehaviour,
        /// Its score now.
        score: u32,
    },
    /// A peer crossed the ban threshold: it is disconnected and refused.
    PeerBanned {
        /// The peer.
        peer: PeerId,
        /// Its score.
        score: u32,
    },
}

impl OverlayEvent {
    fn kind(&self) -> &'static str {
        match self {
            OverlayEvent::PeerConnected { .. } => "peer connected",
            OverlayEvent::PeerDisconnected { .. } => "peer disconnected",
            OverlayEvent::Announcement(_) => "announcement",
            OverlayEvent::Reputation { .. } => "reputation report",
            OverlayEvent::InboundJob { .. } => "inbound job",
            OverlayEvent::AttestationRequest { .. } => "attestation request",
            OverlayEvent::Misbehaviour { .. } => "misbehaviour",
            OverlayEvent::PeerBanned { .. } => "peer banned",
        }
    }
}

#[derive(Debug, Default)]
struct PeerState {
    addresses: Vec<Multiaddr>,
    rtt: Option<Duration>,
    agent_version: Option<String>,
    /// When the first of its current connections was established.
    since: Option<Instant>,
    /// Its open connections.
    connections: HashMap<ConnectionId, ConnectionInfo>,
    /// It relays circuits (identify lists the hop protocol).
    relays: bool,
    /// When a direct dial to it was last tried while we held only relayed
    /// connections to it.
    direct_tried: Option<Instant>,
}

/// The peers a closest-peers lookup found, also when it timed out.
fn found_peers(result: kad::GetClosestPeersResult) -> Vec<kad::PeerInfo> {
    match result {
        Ok(ok) => ok.peers,
        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
    }
}

/// The addresses a lookup found for `target` (none when it was not found).
fn addresses_of(found: Vec<kad::PeerInfo>, target: PeerId) -> Vec<Multiaddr> {
    found
        .into_iter()
        .find(|p| p.peer_id == target)
        .map(|p| p.addrs)
        .unwrap_or_default()
}

/// Whether a relayed listener closed because the relay refused the
/// reservation (it is full, or grants none): the relay's own answer,
/// found in the error's chain, not a dial or connection failure.
fn reservation_refused(reason: &Result<(), std::io::Error>) -> bool {
    use relay::outbound::hop::ReserveError;
    let Err(e) = reason else {
        return false;
    };
    let mut next: Option<&(dyn std::error::Error + 'static)> =
        e.get_ref().map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(err) = next {
        if let Some(r) = err.downcast_ref::<ReserveError>() {
            return matches!(
                r,
                ReserveError::Refused | ReserveError::ResourceLimitExceeded
            );
        }
        next = err.source();
    }
    false
}

/// Whether `addr` goes through a relay.
fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

impl PeerState {
    fn add_address(&mut self, addr: Multiaddr) {
        if !self.addresses.contains(&addr) && self.addresses.len() < MAX_ADDRS_PER_PEER {
            self.addresses.push(addr);
        }
    }
}

struct OwnAnnouncement {
    announcement: Announcement,
    wire: Vec<u8>,
}

/// Entry point: builds the swarm and starts the overlay task.
#[derive(Debug)]
pub struct Overlay;

impl Overlay {
    /// Builds the swarm, binds every listen address, dials the bootstrap
    /// nodes and starts the overlay task. Returns once every listener has an
    /// address (so port-0 listeners know their port). Needs a Tokio runtime.
    ///
    /// The task runs until [`OverlayHandle::shutdown`] or until every handle
    /// is dropped.
    pub async fn spawn(
        config: OverlayConfig,
    ) -> Result<(OverlayHandle, mpsc::Receiver<OverlayEvent>), OverlayError> {
        config.validate()?;
        let mut swarm = build_swarm(&config)?;
        let local = *swarm.local_peer_id();
        let announce_topic = gossipsub::IdentTopic::new(gossip::ANNOUNCE_TOPIC);
        let reputation_topic = gossipsub::IdentTopic::new(gossip::REPUTATION_TOPIC);
        for topic in [&announce_topic, &reputation_topic] {
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(topic)
                .map_err(|e| OverlayError::Setup(format!("gossipsub subscribe: {e:?}").into()))?;
        }

        listen(&mut swarm, &config.listen_addrs).await?;

        for addr in &config.bootstrap {
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                return Err(OverlayError::BootstrapWithoutPeerId { addr: addr.clone() });
            };
            let transport_addr: Multiaddr = addr
                .iter()
                .filter(|p| !matches!(p, Protocol::P2p(_)))
                .collect();
            swarm.behaviour_mut().kad.add_address(&peer, transport_addr);
            if let Err(e) = swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "could not dial a bootstrap node");
            }
        }
        if !config.bootstrap.is_empty() {
            if let Err(e) = swarm.behaviour_mut().kad.bootstrap() {
                tracing::debug!(error = %e, "Kademlia bootstrap deferred");
            }
        }

        let mut relay_listeners = HashMap::new();
        for relay in &config.relays {
            let Some(Protocol::P2p(peer)) = relay.iter().last() else {
                continue; // `validate` refused it
            };
            match swarm.listen_on(relay.clone().with(Protocol::P2pCircuit)) {
                Ok(id) => {
                    relay_listeners.insert(peer, id);
                }
                Err(e) => tracing::warn!(%relay, error = %e, "cannot listen through a relay"),
            }
        }

        let mut control = swarm.behaviour().jobs.new_control();
        let incoming = control
            .accept(JOB_PROTOCOL)
            .map_err(|e| OverlayError::Setup(Box::new(e)))?;

        let (command_tx, command_rx) = mpsc::channel(config.command_buffer);
        let (event_tx, event_rx) = mpsc::channel(config.event_buffer);
        let (report_tx, report_rx) = mpsc::channel(REPORT_BUFFER);
        let cancel = CancellationToken::new();
        let limits = JobLimits {
            max_frame_size: config.max_frame_size,
            idle_timeout: config.job_idle_timeout,
            first_frame_timeout: config.job_first_frame_timeout,
        };

        let uses = StreamUse::default();
        let mut tasks = JoinSet::new();
        tasks.spawn(job::accept_jobs(
            incoming,
            limits,
            (config.max_inbound_jobs, config.max_inbound_jobs_per_peer),
            event_tx.clone(),
            report_tx.clone(),
            uses.clone(),
            cancel.child_token(),
        ));

        let event_loop = EventLoop {
            swarm,
            commands: command_rx,
            command_tx: command_tx.downgrade(),
            reports: report_rx,
            events: event_tx,
            tasks,
            cancel: cancel.clone(),
            announce_topic,
            reputation_topic,
            book: GossipBook::new(&config),
            vivaldi: crate::vivaldi::State::default(),
            policy: PeerPolicy::new(
                config.ban_threshold,
                config.ban_duration,
                config.misbehaviour_decay,
                config.max_tracked_peers,
            ),
            peers: HashMap::new(),
            own: None,
            republish: false,
            unsent: false,
            republish_every: config.announce_republish_interval,
            published: 0,
            last_published: Instant::now(),
            #[cfg(feature = "testing")]
            clock_offset_ms: config.clock_offset_ms,
            provide_queries: HashMap::new(),
            provider_queries: HashMap::new(),
            attest_requests: HashMap::new(),
            find_queries: HashMap::new(),
            connect_waiters: HashMap::new(),
            connect_dials: HashMap::new(),
            connect_lookups: HashMap::new(),
            max_announcement_size: config.max_announcement_size,
            max_reputation_size: config.max_reputation_size,
            keypair: config.keypair.clone(),
            tick: config.gossip_heartbeat,
            uses: uses.clone(),
            min_peers: config.min_peers as usize,
            max_peers: config.max_peers as usize,
            peer_use_memory: config.peer_use_memory,
            last_peer_check: Instant::now(),
            walk: None,
            metrics: config.metrics.clone(),
            nat: autonat::NatStatus::Unknown,
            auto_relay: config.auto_relay,
            relay_listeners,
            relay_refused: HashMap::new(),
        };
        tokio::spawn(event_loop.run());

        let handle =
            OverlayHandle::new(command_tx, report_tx, control, local, limits, uses, cancel);
        Ok((handle, event_rx))
    }
}

async fn listen(swarm: &mut Swarm<Behaviour>, addrs: &[Multiaddr]) -> Result<(), OverlayError> {
    let mut waiting = HashMap::new();
    for addr in addrs {
        match swarm.listen_on(addr.clone()) {
            Ok(id) => {
                waiting.insert(id, addr.clone());
            }
            Err(e) => return Err(listen_error(addr, &e)),
        }
    }
    let deadline = tokio::time::Instant::now() + LISTEN_WAIT;
    while !waiting.is_empty() {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some()).await;
        match event {
            Err(_) => {
                let addr = waiting
                    .into_values()
                    .next()
                    .unwrap_or_else(Multiaddr::empty);
                return Err(OverlayError::ListenTimeout {
                    addr,
                    after: LISTEN_WAIT,
                });
            }
            Ok(SwarmEvent::NewListenAddr {
                listener_id,
                address,
            }) => {
                tracing::info!(%address, "listening");
                waiting.remove(&listener_id);
            }
            Ok(SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            }) => {
                if let Some(addr) = waiting.remove(&listener_id) {
                    let reason = match reason {
                        Ok(()) => "the listener closed".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    return Err(OverlayError::Listen { addr, reason });
                }
            }
            Ok(SwarmEvent::ListenerError { listener_id, error }) => {
                if let Some(addr) = waiting.remove(&listener_id) {
                    return Err(OverlayError::Listen {
                        addr,
                        reason: error.to_string(),
                    });
                }
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

fn listen_error(addr: &Multiaddr, e: &libp2p::TransportError<std::io::Error>) -> OverlayError {
    if let libp2p::TransportError::Other(io) = e {
        if io.kind() == std::io::ErrorKind::AddrInUse {
            return OverlayError::PortInUse { addr: addr.clone() };
        }
    }
    // QUIC wraps the bind error in its own type: look for "in use" in the chain.
    let text = format!("{e:?}");
    if text.contains("AddrInUse") {
        return OverlayError::PortInUse { addr: addr.clone() };
    }
    OverlayError::Listen {
        addr: addr.clone(),
        reason: e.to_string(),
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn key_text(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// A running `get_providers` query: its key, the providers found so far, the reply.
type ProviderQuery = (Vec<u8>, HashSet<PeerId>, Reply<HashSet<PeerId>>);

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    /// Weak, so the loop still ends when every handle is dropped.
    command_tx: mpsc::WeakSender<Command>,
    reports: mpsc::Receiver<(PeerId, Misbehaviour)>,
    events: mpsc::Sender<OverlayEvent>,
    tasks: JoinSet<()>,
    cancel: CancellationToken,
    announce_topic: gossipsub::IdentTopic,
    reputation_topic: gossipsub::IdentTopic,
    book: GossipBook,
    /// This node's network coordinate, moved by every ping to a peer that
    /// announced one.
    vivaldi: crate::vivaldi::State,
    policy: PeerPolicy,
    peers: HashMap<PeerId, PeerState>,
    own: Option<OwnAnnouncement>,
    /// A peer subscribed since we last published our announcement.
    republish: bool,
    /// Our announcement has reached no peer yet (none was subscribed when
    /// it was published).
    unsent: bool,
    /// Period of the unconditional re-publication of our announcement.
    republish_every: Duration,
    /// Publications made so far: each one's counter (see
    /// [`gossip::publication`]).
    published: u64,
    /// When our announcement last went out.
    last_published: Instant,
    #[cfg(feature = "testing")]
    clock_offset_ms: i64,
    provide_queries: HashMap<kad::QueryId, Reply<()>>,
    provider_queries: HashMap<kad::QueryId, ProviderQuery>,
    attest_requests: HashMap<request_response::OutboundRequestId, (PeerId, Reply<Vec<u8>>)>,
    find_queries: HashMap<kad::QueryId, (PeerId, Reply<Vec<Multiaddr>>)>,
    /// `Connect` callers waiting for a dial to `peer` to succeed or fail.
    connect_waiters: HashMap<PeerId, Vec<Reply<()>>>,
    /// Dials started for `Connect` callers, per peer: the callers hear of a
    /// failure only when the last of them failed and no lookup is left.
    connect_dials: HashMap<PeerId, HashSet<ConnectionId>>,
    /// DHT lookups started next to a `Connect` dial: the addresses a node
    /// holds for a peer may be stale (a worker behind NAT now reached
    /// through a relay), and a dial to a black-holed address takes its
    /// whole timeout to fail.
    connect_lookups: HashMap<kad::QueryId, PeerId>,
    max_announcement_size: usize,
    max_reputation_size: usize,
    keypair: libp2p::identity::Keypair,
    tick: Duration,
    /// Job streams per peer (see [`crate::peers`]).
    uses: StreamUse,
    min_peers: usize,
    max_peers: usize,
    peer_use_memory: Duration,
    /// When the peer budget was last checked.
    last_peer_check: Instant,
    /// The random walk under way to find more peers, with the number of
    /// peers missing when it started.
    walk: Option<(kad::QueryId, usize)>,
    /// Where swarm events and gossip verdicts are counted, if anywhere.
    metrics: Option<crate::metrics::OverlayMetrics>,
    /// Whether peers can dial this node, as autonat last found.
    nat: autonat::NatStatus,
    /// Pick relays among peers once `nat` says private.
    auto_relay: bool,
    /// The relays this node listens through, and the listener on each.
    relay_listeners: HashMap<PeerId, ListenerId>,
    /// Relays that refused a reservation, and when: not asked again for
    /// [`RELAY_RETRY`].
    relay_refused: HashMap<PeerId, Instant>,
}

impl EventLoop {
    #[tracing::instrument(skip_all)]
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((peer, offence)) = self.reports.recv() => self.offend(peer, offence),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "an overlay child task failed");
                    }
                }
            }
        }
        self.cancel.cancel();
        self.tasks.shutdown().await;
        tracing::info!("overlay stopped");
    }

    fn emit(&self, event: OverlayEvent) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            tracing::warn!(
                kind = event.kind(),
                "the node is not reading overlay events: one was dropped"
            );
        }
    }

    /// Unix milliseconds on this node's clock (shifted in tests that play a
    /// node whose clock is off).
    fn now_ms(&self) -> u64 {
        #[cfg(feature = "testing")]
        {
            unix_ms().saturating_add_signed(self.clock_offset_ms)
        }
        #[cfg(not(feature = "testing"))]
        {
            unix_ms()
        }
    }

    fn on_tick(&mut self) {
        let now_ms = self.now_ms();
        let now = Instant::now();
        self.book.prune(now_ms, now);
        for peer in self.policy.expired_bans(now) {
            tracing::info!(%peer, "ban expired");
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            self.swarm
                .behaviour_mut()
                .gossipsub
                .remove_blacklisted_peer(&peer);
        }
        if self
            .own
            .as_ref()
            .is_some_and(|o| o.announcement.expires_at_ms <= now_ms)
        {
            self.own = None;
        }
        if self.own.is_some() && now.duration_since(self.last_published) >= self.republish_every {
            self.republish = true;
        }
        if self.republish {
            self.publish_own(now);
        }
        if now.duration_since(self.last_peer_check) >= peers::CHECK_EVERY {
            self.keep_peer_budget(now);
        }
        self.seek_relays();
        self.retire_relayed();
    }

    /// Closes relayed connections to peers this node also holds a direct
    /// connection to (after hole punching, say), once no job stream with
    /// the peer is open: new streams pick a connection at random, and a
    /// relay's circuits are a bounded favour, not a path to keep using.
    fn retire_relayed(&mut self) {
        let mut retire = Vec::new();
        for (peer, state) in &self.peers {
            if state.connections.values().any(|c| !c.relayed)
                && !self.uses.in_use(peer, Duration::ZERO)
            {
                retire.extend(
                    state
                        .connections
                        .iter()
                        .filter(|(_, c)| c.relayed)
                        .map(|(id, _)| (*peer, *id)),
                );
            }
        }
        for (peer, id) in retire {
            if self.swarm.close_connection(id) {
                tracing::debug!(%peer, "closing a relayed connection: a direct one is up");
            }
        }
    }

    /// Behind NAT (autonat found no peer could dial us back), listens
    /// through connected peers that offer relaying until it holds
    /// [`AUTO_RELAYS`] relayed listeners. The relayed address reaches
    /// peers through identify (pushed at once) and Kademlia.
    fn seek_relays(&mut self) {
        if !self.auto_relay
            || self.nat != autonat::NatStatus::Private
            || self.relay_listeners.len() >= AUTO_RELAYS
        {
            return;
        }
        self.relay_refused
            .retain(|_, at| at.elapsed() < RELAY_RETRY);
        let candidates: Vec<(PeerId, Multiaddr)> = self
            .peers
            .iter()
            .filter(|(peer, state)| {
                state.relays
                    && !self.relay_listeners.contains_key(peer)
                    && !self.relay_refused.contains_key(peer)
                    && !self.policy.is_banned(peer)
            })
            .filter_map(|(peer, state)| {
                // A direct address of the relay: the one we dialled, else
                // one it listens on.
                let dialled = state
                    .connections
                    .values()
                    .filter(|c| c.outbound && !c.relayed)
                    .map(|c| &c.address);
                let listed = state.addresses.iter().filter(|a| !is_relayed(a));
                let addr = dialled.chain(listed).next()?;
                let bare: Multiaddr = addr
                    .iter()
                    .filter(|p| !matches!(p, Protocol::P2p(_)))
                    .collect();
                Some((*peer, bare.with(Protocol::P2p(*peer))))
            })
            .take(AUTO_RELAYS - self.relay_listeners.len())
            .collect();
        for (peer, relay) in candidates {
            match self
                .swarm
                .listen_on(relay.clone().with(Protocol::P2pCircuit))
            {
                Ok(id) => {
                    tracing::info!(%relay, "unreachable from outside: listening through a relay");
                    self.relay_listeners.insert(peer, id);
                }
                Err(e) => tracing::debug!(%relay, error = %e, "cannot listen through a relay"),
            }
        }
    }

    /// Closes the connections over `max_peers`, or starts a random walk
    /// when under `min_peers` (see [`crate::peers`]).
    fn keep_peer_budget(&mut self, now: Instant) {
        self.last_peer_check = now;
        self.uses.prune(self.peer_use_memory);
        let local = *self.swarm.local_peer_id();
        let connected: Vec<peers::Connected> = self
            .swarm
            .connected_peers()
            .map(|peer| {
                let since = self.peers.get(peer).and_then(|s| s.since).unwrap_or(now);
                peers::Connected {
                    peer: *peer,
                    bucket: peers::bucket(&local, peer),
                    protected: now.duration_since(since) < peers::GRACE
                        || self.relay_listeners.contains_key(peer)
                        || self.connect_waiters.contains_key(peer)
                        || self.uses.in_use(peer, self.peer_use_memory),
                    since,
                }
            })
            .collect();
        if connected.len() > self.max_peers {
            let cut = peers::surplus(&connected, self.max_peers);
            tracing::debug!(
                connected = connected.len(),
                max = self.max_peers,
                closing = cut.len(),
                "over the peer budget"
            );
            for peer in cut {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        } else if connected.len() < self.min_peers && self.walk.is_none() {
            let missing = self.min_peers - connected.len();
            let id = self
                .swarm
                .behaviour_mut()
                .kad
                .get_closest_peers(PeerId::random());
            tracing::debug!(
                connected = connected.len(),
                min = self.min_peers,
                "under the peer budget: walking the DHT"
            );
            self.walk = Some((id, missing));
        }
    }

    /// Publishes our current announcement again.
    fn publish_own(&mut self, now: Instant) {
        let Some(own) = &self.own else {
            self.republish = false;
            return;
        };
        let topic = self.announce_topic.clone();
        let message = gossip::publication(self.published, &own.wire);
        self.published += 1;
        match self.swarm.behaviour_mut().gossipsub.publish(topic, message) {
            Ok(_) => {
                self.republish = false;
                self.unsent = false;
                self.last_published = now;
            }
            // Still nobody to send it to: try again when a peer subscribes.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => self.unsent = true,
            Err(e) => {
                tracing::debug!(error = %e, "re-publishing our announcement failed");
                self.republish = false;
                self.last_published = now;
            }
        }
    }

    fn offend(&mut self, peer: PeerId, offence: Misbehaviour) {
        let outcome = self.policy.record(peer, &offence, Instant::now());
        tracing::info!(%peer, %offence, ?outcome, "peer misbehaved");
        let score = match outcome {
            Outcome::Scored(score) => score,
            Outcome::Ban(score) => {
                tracing::warn!(%peer, score, "banning peer");
                let behaviour = self.swarm.behaviour_mut();
                behaviour.blocked.block_peer(peer);
                behaviour.gossipsub.blacklist_peer(&peer);
                let _ = behaviour.kad.remove_peer(&peer);
                self.emit(OverlayEvent::PeerBanned { peer, score });
                score
            }
        };
        self.emit(OverlayEvent::Misbehaviour {
            peer,
            offence,
            score,
        });
    }

    /// Serves [`Command::Connect`]. A job stream must only be opened once the
    /// connection is fully set up: libp2p-stream asked during the moment a
    /// connection is being established parks the request on a dial that the
    /// swarm refuses (the peer is already connected) and never answers it.
    fn connect(&mut self, peer: PeerId, reply: Reply<()>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        if self.policy.is_banned(&peer) {
            let _ = reply.send(Err(OverlayError::Banned { peer }));
            return;
        }
        let waiting = self.connect_waiters.get(&peer).map_or(0, Vec::len);
        if waiting == 0 && self.connect_waiters.len() >= MAX_PENDING {
            let _ = reply.send(Err(OverlayError::Dial {
                target: peer.to_string(),
                reason: "too many dials in flight".into(),
            }));
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.connect_dials.entry(peer).or_default().insert(id);
                self.look_up_for_connect(peer);
                self.connect_waiters.entry(peer).or_default().push(reply);
            }
            // Refused because a dial to the peer is already under way: wait for that one.
            Err(DialError::DialPeerConditionFalse(_)) => {
                self.connect_waiters.entry(peer).or_default().push(reply);
            }
            // Nothing to dial yet: the lookup may find an address.
            Err(DialError::NoAddresses) if self.look_up_for_connect(peer) => {
                self.connect_waiters.entry(peer).or_default().push(reply);
            }
            Err(e) => {
                let _ = reply.send(Err(OverlayError::Dial {
                    target: peer.to_string(),
                    reason: e.to_string(),
                }));
            }
        }
    }

    /// Starts a DHT lookup of `peer` for its `Connect` callers, unless one
    /// is under way; whether one is.
    fn look_up_for_connect(&mut self, peer: PeerId) -> bool {
        if self.connect_lookups.values().any(|p| *p == peer) {
            return true;
        }
        if self.connect_lookups.len() >= MAX_PENDING {
            return false;
        }
        let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
        self.connect_lookups.insert(id, peer);
        true
    }

    /// A `Connect` lookup ended with `addrs` for `peer`: dial them next to
    /// the first dial (which may be stuck on a stale address); with none,
    /// and no dial left, the callers hear that the peer cannot be found.
    fn connect_lookup_done(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self.swarm.is_connected(&peer) || !self.connect_waiters.contains_key(&peer) {
            return;
        }
        if !addrs.is_empty() {
            for addr in &addrs {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
            }
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::Always)
                .build();
            let id = opts.connection_id();
            if self.swarm.dial(opts).is_ok() {
                self.connect_dials.entry(peer).or_default().insert(id);
            }
        }
        if !self.connect_dials.contains_key(&peer) {
            self.connected(
                peer,
                Err(format!("no address of {peer} is known here or in the DHT")),
            );
        }
    }

    /// Answers the `Connect` callers waiting on `peer`.
    fn connected(&mut self, peer: PeerId, result: Result<(), String>) {
        self.connect_dials.remove(&peer);
        for reply in self.connect_waiters.remove(&peer).unwrap_or_default() {
            let _ = reply.send(result.clone().map_err(|reason| OverlayError::Dial {
                target: peer.to_string(),
                reason,
            }));
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Dial { addr, reply } => {
                let result = self
                    .swarm
                    .dial(addr.clone())
                    .map_err(|e| OverlayError::Dial {
                        target: addr.to_string(),
                        reason: e.to_string(),
                    });
                let _ = reply.send(result);
            }
            Command::Connect { peer, reply } => self.connect(peer, reply),
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Reachability { reply } => {
                let status = match self.nat {
                    autonat::NatStatus::Public(_) => "public",
                    autonat::NatStatus::Private => "private",
                    autonat::NatStatus::Unknown => "unknown",
                };
                let mut relays: Vec<PeerId> = self.relay_listeners.keys().copied().collect();
                relays.sort();
                let _ = reply.send(Reachability { status, relays });
            }
            Command::Coordinate { reply } => {
                let _ = reply.send(self.vivaldi.coordinate());
            }
            Command::Peers { reply } => {
                let gossipsub = &self.swarm.behaviour().gossipsub;
                let peers = self
                    .peers
                    .iter()
                    .map(|(peer, state)| PeerInfo {
                        peer_id: *peer,
                        addresses: state.addresses.clone(),
                        rtt: state.rtt,
                        gossip_score: gossipsub.peer_score(peer),
                        misbehaviour: self.policy.score(peer),
                        agent_version: state.agent_version.clone(),
                        connections: state.connections.values().cloned().collect(),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::Announce {
                announcement,
                reply,
            } => {
                let _ = reply.send(self.announce(announcement));
            }
            Command::Announcements { reply } => {
                let _ = reply.send(self.book.current(self.now_ms()));
            }
            Command::PublishReputation { report, reply } => {
                let _ = reply.send(self.publish_reputation(report));
            }
            Command::StartProviding { key, reply } => {
                if self.provide_queries.len() >= MAX_PENDING {
                    let _ = reply.send(Err(OverlayError::DhtTimeout {
                        what: key_text(&key),
                    }));
                    return;
                }
                match self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(kad::RecordKey::new(&key))
                {
                    Ok(id) => {
                        self.provide_queries.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::StopProviding { key, reply } => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&kad::RecordKey::new(&key));
                let _ = reply.send(Ok(()));
            }
            Command::GetProviders { key, reply } => {
                if self.provider_queries.len() >= MAX_PENDING {
                    let _ = reply.send(Err(OverlayError::DhtTimeout {
                        what: key_text(&key),
                    }));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&key));
                self.provider_queries
                    .insert(id, (key, HashSet::new(), reply));
            }
            Command::FindPeer { peer, reply } => {
                if let Some(state) = self.peers.get(&peer) {
                    if !state.addresses.is_empty() {
                        let _ = reply.send(Ok(state.addresses.clone()));
                        return;
                    }
                }
                if self.find_queries.len() >= MAX_PENDING {
                    let _ = reply.send(Err(OverlayError::PeerNotFound { peer }));
                    return;
                }
                let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                self.find_queries.insert(id, (peer, reply));
            }
            Command::FetchAttestation {
                peer,
                challenge,
                reply,
            } => {
                if self.policy.is_banned(&peer) {
                    let _ = reply.send(Err(OverlayError::Banned { peer }));
                    return;
                }
                if self.attest_requests.len() >= MAX_PENDING {
                    let _ = reply.send(Err(OverlayError::Attestation {
                        peer,
                        reason: "too many attestation requests in flight".into(),
                    }));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .attest
                    .send_request(&peer, AttestRequest { challenge });
                self.attest_requests.insert(id, (peer, reply));
            }
            Command::RespondAttestation {
                channel,
                evidence,
                reply,
            } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .attest
                    .send_response(channel, AttestResponse { evidence })
                    .map_err(|_| OverlayError::Attestation {
                        peer: *self.swarm.local_peer_id(),
                        reason: "the asker is gone or the request timed out".into(),
                    });
                let _ = reply.send(result);
            }
            Command::ReportMisbehaviour { peer, offence } => self.offend(peer, offence),
            Command::MisbehaviourScore { peer, reply } => {
                let _ = reply.send(self.policy.score(&peer));
            }
            #[cfg(feature = "testing")]
            Command::PublishRaw { topic, data, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(gossipsub::IdentTopic::new(topic), data)
                    .map(|_| ())
                    .map_err(OverlayError::from);
                let _ = reply.send(result);
            }
        }
    }

    fn announce(&mut self, mut announcement: Announcement) -> Result<(), OverlayError> {
        announcement.coordinate = Some(self.vivaldi.coordinate());
        let local = *self.swarm.local_peer_id();
        if announcement.peer_id != local {
            return Err(OverlayError::NotOwnAnnouncement {
                got: announcement.peer_id,
            });
        }
        if let Err(reason) = announcement.check_ranges() {
            return Err(OverlayError::AnnouncementOutOfRange { reason });
        }
        if let Some(own) = &self.own {
            if announcement.seq <= own.announcement.seq {
                return Err(OverlayError::StaleSequence {
                    seq: announcement.seq,
                    last: own.announcement.seq,
                });
            }
        }
        let wire = SignedEnvelope::sign_announcement(&self.keypair, &announcement)?.to_bytes()?;
        if wire.len() > self.max_announcement_size {
            return Err(OverlayError::TooLarge {
                what: "signed announcement",
                size: wire.len(),
                max: self.max_announcement_size,
            });
        }
        self.book.insert_own(announcement.clone());
        let topic = self.announce_topic.clone();
        let message = gossip::publication(self.published, &wire);
        self.published += 1;
        let published = self.swarm.behaviour_mut().gossipsub.publish(topic, message);
        self.own = Some(OwnAnnouncement { announcement, wire });
        match published {
            Ok(_) => {
                self.unsent = false;
                self.last_published = Instant::now();
                Ok(())
            }
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                // Nobody listens yet: publish when the first peer subscribes.
                self.unsent = true;
                self.republish = true;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn publish_reputation(&mut self, report: Vec<u8>) -> Result<(), OverlayError> {
        let wire = SignedEnvelope::sign_reputation(&self.keypair, report)?.to_bytes()?;
        if wire.len() > self.max_reputation_size {
            return Err(OverlayError::TooLarge {
                what: "signed reputation report",
                size: wire.len(),
                max: self.max_reputation_size,
            });
        }
        let topic = self.reputation_topic.clone();
        let message = gossip::publication(self.published, &wire);
        self.published += 1;
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, message)?;
        Ok(())
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let Some(metrics) = &self.metrics {
            metrics.record(&event);
            if let SwarmEvent::Behaviour(e) = &event {
                match e {
                    BehaviourEvent::Gossipsub(e) => metrics.record(e),
                    BehaviourEvent::Kad(e) => metrics.record(e),
                    BehaviourEvent::Identify(e) => metrics.record(e),
                    BehaviourEvent::Ping(e) => metrics.record(e),
                    BehaviourEvent::Dcutr(e) => metrics.record(e),
                    BehaviourEvent::RelayServer(e) => metrics.record(e),
                    _ => {}
                }
            }
        }
        if matches!(
            event,
            SwarmEvent::ConnectionEstablished { .. } | SwarmEvent::ConnectionClosed { .. }
        ) {
            // The swarm has applied the event when it reports it.
            if let Some(metrics) = &self.metrics {
                metrics.set_peers(self.swarm.connected_peers().count());
            }
        }
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let address = endpoint.get_remote_address().clone();
                let state = self.peers.entry(peer_id).or_default();
                if endpoint.is_dialer() {
                    state.add_address(address.clone());
                }
                state.connections.insert(
                    connection_id,
                    ConnectionInfo {
                        // An inbound circuit's remote address is only the
                        // peer id: the relay shows in our local address.
                        relayed: endpoint.is_relayed(),
                        address: address.clone(),
                        outbound: endpoint.is_dialer(),
                    },
                );
                if num_established.get() == 1 {
                    state.since = Some(Instant::now());
                }
                self.connected(peer_id, Ok(()));
                if num_established.get() == 1 {
                    tracing::debug!(peer = %peer_id, %address, "connected");
                    self.emit(OverlayEvent::PeerConnected {
                        peer: peer_id,
                        address,
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.peers.remove(&peer_id);
                tracing::debug!(peer = %peer_id, "disconnected");
                self.emit(OverlayEvent::PeerDisconnected { peer: peer_id });
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                if let Some(state) = self.peers.get_mut(&peer_id) {
                    state.connections.remove(&connection_id);
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => tracing::info!(%address, "listening"),
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let relay = self
                    .relay_listeners
                    .iter()
                    .find(|(_, id)| **id == listener_id)
                    .map(|(peer, _)| *peer);
                if let Some(relay) = relay {
                    self.relay_listeners.remove(&relay);
                    if reservation_refused(&reason) {
                        // Asking again at every tick would only load a
                        // full relay; others are tried meanwhile.
                        self.relay_refused.insert(relay, Instant::now());
                        tracing::info!(%relay, ?reason, "a relay refused a reservation");
                    } else {
                        // Picked again (this one or another) at the next tick.
                        tracing::info!(%relay, ?reason, "a relayed listener closed");
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                connection_id,
                error,
            } => {
                tracing::debug!(?peer_id, %error, "outgoing connection failed");
                // Another dial to the peer may still be under way (a bootstrap
                // dial by address next to one by peer id); a caller that gets
                // this error and asks again waits for that one. Dials and a
                // lookup of our own still under way are waited for.
                if let Some(peer) = peer_id.filter(|p| !self.swarm.is_connected(p)) {
                    if let Some(dials) = self.connect_dials.get_mut(&peer) {
                        dials.remove(&connection_id);
                        if dials.is_empty() {
                            self.connect_dials.remove(&peer);
                        }
                    }
                    let pending = self.connect_dials.contains_key(&peer)
                        || self.connect_lookups.values().any(|p| *p == peer);
                    if !pending {
                        self.connected(peer, Err(error.to_string()));
                    }
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!(%error, "incoming connection failed");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(event) => self.on_gossip(event),
            BehaviourEvent::Kad(event) => self.on_kad(event),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let speaks_kad = info.protocols.contains(&KAD_PROTOCOL);
                let state = self.peers.entry(peer_id).or_default();
                state.agent_version = Some(info.agent_version);
                state.relays = info.protocols.contains(&RELAY_HOP_PROTOCOL);
                for addr in info.listen_addrs {
                    state.add_address(addr.clone());
                    if speaks_kad {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
                // Met only through a relay, yet it lists direct addresses: try
                // them (it may be reachable, as a public node that dialled us
                // behind our NAT through our relay is); once a direct
                // connection is up the relayed one is retired.
                let relay_only =
                    !state.connections.is_empty() && state.connections.values().all(|c| c.relayed);
                let direct: Vec<Multiaddr> = state
                    .addresses
                    .iter()
                    .filter(|a| !is_relayed(a))
                    .cloned()
                    .collect();
                if relay_only
                    && !direct.is_empty()
                    && state
                        .direct_tried
                        .is_none_or(|t| t.elapsed() >= DIRECT_RETRY)
                {
                    state.direct_tried = Some(Instant::now());
                    let opts = DialOpts::peer_id(peer_id)
                        .addresses(direct)
                        .condition(PeerCondition::Always)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(peer = %peer_id, error = %e, "no direct dial to a relayed peer");
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event { peer, result, .. }) => match result {
                Ok(rtt) => {
                    if let Some(state) = self.peers.get_mut(&peer) {
                        state.rtt = Some(match state.rtt {
                            None => rtt,
                            Some(old) => old.mul_f64(1.0 - RTT_ALPHA) + rtt.mul_f64(RTT_ALPHA),
                        });
                    }
                    if let Some(theirs) = self.book.coordinate(&peer) {
                        let tiebreak = peer
                            .to_bytes()
                            .iter()
                            .fold(0u64, |h, b| h.rotate_left(8) ^ u64::from(*b));
                        self.vivaldi.observe(theirs, rtt, tiebreak);
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %e, "ping failed"),
            },
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(?old, ?new, "NAT status changed");
                self.nat = new;
                self.seek_relays();
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    tracing::debug!(%peer, %addr, "found a peer on the LAN");
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                    if !self.swarm.is_connected(&peer) {
                        if let Err(e) = self.swarm.dial(peer) {
                            tracing::debug!(%peer, error = %e, "could not dial an mDNS peer");
                        }
                    }
                }
            }
            BehaviourEvent::Attest(event) => self.on_attest(event),
            BehaviourEvent::Relay(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                ..
            }) => tracing::info!(relay = %relay_peer_id, "reachable through a relay"),
            BehaviourEvent::Relay(event) => tracing::debug!(?event, "relay client"),
            BehaviourEvent::RelayServer(event) => tracing::debug!(?event, "relay server"),
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    tracing::info!(peer = %remote_peer_id, "hole punched: a direct connection is up")
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punching failed: staying on the relay")
                }
            },
            _ => {}
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let now_ms = self.now_ms();
                let now = Instant::now();
                let (topic, verdict) = if message.topic == self.announce_topic.hash() {
                    let v = self.book.check_announcement(&message.data, now_ms, now);
                    ("announcement", v.map(OverlayEvent::Announcement))
                } else if message.topic == self.reputation_topic.hash() {
                    let v = self.book.check_reputation(&message.data, now);
                    (
                        "reputation",
                        v.map(|(reporter, payload)| OverlayEvent::Reputation { reporter, payload }),
                    )
                } else {
                    ("unknown", Verdict::Ignore("unknown topic"))
                };
                if let Some(metrics) = &self.metrics {
                    let (verdict, reason) = match &verdict {
                        Verdict::Accept(_) => ("accepted", ""),
                        Verdict::Forward => ("forwarded", ""),
                        Verdict::Ignore(reason) => ("ignored", *reason),
                        Verdict::Reject { kind, .. } => ("rejected", *kind),
                    };
                    metrics.gossip(topic, verdict, reason);
                }
                let acceptance = match &verdict {
                    Verdict::Accept(_) | Verdict::Forward => gossipsub::MessageAcceptance::Accept,
                    Verdict::Ignore(_) => gossipsub::MessageAcceptance::Ignore,
                    Verdict::Reject { .. } => gossipsub::MessageAcceptance::Reject,
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
                match verdict {
                    Verdict::Accept(event) => self.emit(event),
                    Verdict::Forward => {}
                    Verdict::Ignore(reason) => {
                        tracing::trace!(from = %propagation_source, reason, "gossip message ignored");
                    }
                    Verdict::Reject { reason, author, .. } => {
                        // Signed content that is invalid is its author's
                        // doing (a relay of another version may have
                        // passed it on: audit F15); junk whose author
                        // nothing proves is the sender's, since an honest
                        // relay checks envelopes before it forwards them.
                        let blamed = author.unwrap_or(propagation_source);
                        tracing::debug!(%blamed, from = %propagation_source, %reason, "gossip message rejected");
                        self.offend(blamed, Misbehaviour::InvalidGossip);
                    }
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic }
                if topic == self.announce_topic.hash() && self.own.is_some() =>
            {
                if self.unsent {
                    // A starting worker is unknown until this goes out:
                    // send it now, not at the next tick.
                    tracing::trace!(peer = %peer_id, "first subscriber: publishing our announcement");
                    self.publish_own(Instant::now());
                } else {
                    // Coalesced: many peers subscribe within one tick.
                    tracing::trace!(peer = %peer_id, "peer subscribed: will re-publish our announcement");
                    self.republish = true;
                }
            }
            _ => {}
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        } = event
        else {
            return;
        };
        match result {
            kad::QueryResult::StartProviding(result) => {
                if let Some(reply) = self.provide_queries.remove(&id) {
                    let result = result.map(|_| ()).map_err(|e| OverlayError::DhtTimeout {
                        what: format!("provider record {}", key_text(e.key().as_ref())),
                    });
                    let _ = reply.send(result);
                }
            }
            kad::QueryResult::GetProviders(result) => {
                let failed = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        if let Some((_, found, _)) = self.provider_queries.get_mut(&id) {
                            found.extend(providers);
                        }
                        false
                    }
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => false,
                    Err(_) => true,
                };
                if step.last || failed {
                    if let Some((key, found, reply)) = self.provider_queries.remove(&id) {
                        let result = if failed && found.is_empty() {
                            Err(OverlayError::DhtTimeout {
                                what: format!("providers of {}", key_text(&key)),
                            })
                        } else {
                            Ok(found)
                        };
                        let _ = reply.send(result);
                    }
                }
            }
            kad::QueryResult::GetClosestPeers(result) => {
                if let Some((_, missing)) = self.walk.filter(|(walk, _)| *walk == id) {
                    if step.last {
                        self.walk = None;
                    }
                    self.dial_found(found_peers(result), missing);
                    return;
                }
                if let Some(target) = self.connect_lookups.remove(&id) {
                    let addrs = addresses_of(found_peers(result), target);
                    self.connect_lookup_done(target, addrs);
                    return;
                }
                let Some((target, reply)) = self.find_queries.remove(&id) else {
                    return;
                };
                let addrs = addresses_of(found_peers(result), target);
                if addrs.is_empty() {
                    let _ = reply.send(Err(OverlayError::PeerNotFound { peer: target }));
                } else {
                    for addr in &addrs {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&target, addr.clone());
                    }
                    let _ = reply.send(Ok(addrs));
                }
            }
            kad::QueryResult::Bootstrap(result) => {
                tracing::debug!(ok = result.is_ok(), "Kademlia bootstrap step");
            }
            _ => {}
        }
    }

    /// Dials up to `missing` of the peers a random walk found that this
    /// node is not connected to.
    fn dial_found(&mut self, found: Vec<kad::PeerInfo>, missing: usize) {
        let mut dialled = 0;
        for info in found {
            if dialled >= missing {
                break;
            }
            let peer = info.peer_id;
            if peer == *self.swarm.local_peer_id()
                || self.swarm.is_connected(&peer)
                || self.policy.is_banned(&peer)
            {
                continue;
            }
            let opts = DialOpts::peer_id(peer)
                .addresses(info.addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if self.swarm.dial(opts).is_ok() {
                dialled += 1;
            }
        }
    }

    fn on_attest(&mut self, event: request_response::Event<AttestRequest, AttestResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let Some(commands) = self.command_tx.upgrade() else {
                        return;
                    };
                    self.emit(OverlayEvent::AttestationRequest {
                        peer,
                        challenge: request.challenge,
                        responder: AttestationResponder::new(channel, commands),
                    });
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some((_, reply)) = self.attest_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response.evidence));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some((peer, reply)) = self.attest_requests.remove(&request_id) {
                    let _ = reply.send(Err(OverlayError::Attestation {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound attestation request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the relay's own refusal puts it on hold; a listener lost to a
    /// failed dial or a dropped connection is replaced at once.
    #[test]
    fn a_refused_reservation_is_told_from_a_failed_connection() {
        use relay::outbound::hop::ReserveError;
        let refused = |e: ReserveError| {
            Err(std::io::Error::other(
                relay::client::transport::Error::Reservation(e),
            ))
        };
        assert!(reservation_refused(&refused(ReserveError::Refused)));
        assert!(reservation_refused(&refused(
            ReserveError::ResourceLimitExceeded
        )));
        assert!(!reservation_refused(&refused(ReserveError::Unsupported)));
        assert!(!reservation_refused(&Err(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))));
        assert!(!reservation_refused(&Ok(())));
    }
}

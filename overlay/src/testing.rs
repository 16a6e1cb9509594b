//! Helpers for tests and benchmarks: seeded identities, meshes of in-process
//! nodes on 127.0.0.1, and convergence measurement (`silk bench mesh`).
//!
//! Always compiled. Only the raw, check-skipping handle methods
//! (`publish_raw`, `open_raw_job_stream`) need the `testing` feature.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use libp2p::{identity, multiaddr::Protocol, Multiaddr, PeerId};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    network::unix_ms, Announcement, AttestationMode, Overlay, OverlayConfig, OverlayError,
    OverlayEvent, OverlayHandle,
};

/// How often the convergence wait looks at the nodes' announcement tables.
const POLL: Duration = Duration::from_millis(20);

/// A deterministic ed25519 identity for `seed` (tests and benchmarks only).
pub fn seeded_keypair(seed: u64) -> identity::Keypair {
    let mut secret = [0x5au8; 32];
    secret[..8].copy_from_slice(&seed.to_le_bytes());
    // 32 bytes are always a valid ed25519 secret.
    identity::Keypair::ed25519_from_bytes(secret)
        .unwrap_or_else(|_| identity::Keypair::generate_ed25519())
}

/// A configuration for an in-process node: TCP on 127.0.0.1 with a free
/// port, no mDNS, fast gossip heartbeats and pings.
pub fn local_config(keypair: identity::Keypair) -> OverlayConfig {
    let listen = Multiaddr::from(std::net::Ipv4Addr::LOCALHOST).with(Protocol::Tcp(0));
    let mut config = OverlayConfig::new(keypair, vec![listen]);
    config.gossip_heartbeat = Duration::from_millis(200);
    config.announce_republish_interval = Duration::from_secs(2);
    config.ping_interval = Duration::from_secs(1);
    config.kad_query_timeout = Duration::from_secs(10);
    config.job_idle_timeout = Duration::from_secs(10);
    // Every in-process node dials in from 127.0.0.1.
    config.max_inbound_connections_per_ip = config.max_inbound_connections;
    config
}

/// A running in-process node.
#[derive(Debug)]
pub struct LocalNode {
    /// Its handle.
    pub handle: OverlayHandle,
    /// Its event stream.
    pub events: mpsc::Receiver<OverlayEvent>,
    /// Its peer id.
    pub peer_id: PeerId,
    /// Its first listen address, with `/p2p/<peer id>` (usable as a bootstrap address).
    pub addr: Multiaddr,
}

/// Spawns a node with `config` and resolves its dialable address.
pub async fn spawn_local(config: OverlayConfig) -> Result<LocalNode, OverlayError> {
    let (handle, events) = Overlay::spawn(config).await?;
    let peer_id = handle.local_peer_id();
    let addr = handle
        .listen_addrs()
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| OverlayError::InvalidConfig("the node has no listen address".into()))?
        .with(Protocol::P2p(peer_id));
    Ok(LocalNode {
        handle,
        events,
        peer_id,
        addr,
    })
}

/// Spawns `n` nodes with identities seeded from `seed`; the first one is the
/// bootstrap node of all the others.
pub async fn spawn_mesh(n: usize, seed: u64) -> Result<Vec<LocalNode>, OverlayError> {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let mut config = local_config(seeded_keypair(seed.wrapping_add(i)));
        if let Some(first) = nodes.first() {
            let first: &LocalNode = first;
            config.bootstrap = vec![first.addr.clone()];
        }
        nodes.push(spawn_local(config).await?);
    }
    Ok(nodes)
}

/// An announcement for `peer` serving `models`, valid for five minutes.
pub fn worker_announcement(peer: PeerId, seq: u64, models: &[&str]) -> Announcement {
    Announcement {
        peer_id: peer,
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        context_windows: vec![8192; models.len()],
        free_slots: 4,
        queue_depth: 0,
        decode_tokens_per_s_milli: 50_000,
        price_coefficient_milli: 1_000,
        attestation_mode: AttestationMode::Insecure,
        attestation_digest: None,
        seq,
        expires_at_ms: unix_ms() + 5 * 60 * 1000,
        payout: None,
        coordinate: None,
    }
}

/// Waits until every handle holds an announcement from every peer in
/// `expected`; returns how long that took, or fails after `timeout`.
pub async fn wait_until_converged(
    handles: &[OverlayHandle],
    expected: &HashSet<PeerId>,
    timeout: Duration,
) -> Result<Duration, OverlayError> {
    let start = Instant::now();
    let mut poll = tokio::time::interval(POLL);
    // Indices of the handles that still miss something.
    let mut pending: Vec<usize> = (0..handles.len()).collect();
    let wait = async {
        loop {
            poll.tick().await;
            let mut still = Vec::with_capacity(pending.len());
            for &i in &pending {
                let known: HashSet<PeerId> = handles[i]
                    .announcements()
                    .await?
                    .iter()
                    .map(|a| a.peer_id)
                    .collect();
                if !expected.is_subset(&known) {
                    still.push(i);
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok::<_, OverlayError>(start.elapsed());
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| OverlayError::ConvergenceTimeout {
            nodes: handles.len(),
            after: timeout,
        })?
}

/// Waits until every handle has at least `min_peers` connections.
pub async fn wait_until_meshed(
    handles: &[OverlayHandle],
    min_peers: usize,
    timeout: Duration,
) -> Result<Duration, OverlayError> {
    let start = Instant::now();
    let mut poll = tokio::time::interval(POLL);
    let mut pending: Vec<usize> = (0..handles.len()).collect();
    let wait = async {
        loop {
            poll.tick().await;
            let mut still = Vec::with_capacity(pending.len());
            for &i in &pending {
                if handles[i].peers().await?.len() < min_peers {
                    still.push(i);
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok::<_, OverlayError>(start.elapsed());
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| OverlayError::WaitTimeout {
            what: format!("every node to have {min_peers} peers"),
            after: timeout,
        })?
}

/// Waits until `handle` has a connection to `peer`.
pub async fn wait_until_connected(
    handle: &OverlayHandle,
    peer: PeerId,
    timeout: Duration,
) -> Result<(), OverlayError> {
    let mut poll = tokio::time::interval(POLL);
    let wait = async {
        loop {
            poll.tick().await;
            if handle.peers().await?.iter().any(|p| p.peer_id == peer) {
                return Ok::<_, OverlayError>(());
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| OverlayError::WaitTimeout {
            what: format!("a connection to {peer}"),
            after: timeout,
        })?
}

/// `(node index, announcing peer, arrival time)` for every announcement a
/// node accepts, from [`watch_announcements`].
pub type Arrivals = mpsc::Receiver<(usize, PeerId, Instant)>;

/// Takes the nodes' event streams: returns their handles, a channel of
/// `(node index, announcing peer, arrival time)` for every announcement a
/// node accepts, and the tasks that read the streams.
pub fn watch_announcements(nodes: Vec<LocalNode>) -> (Vec<OverlayHandle>, Arrivals, JoinSet<()>) {
    let (tx, rx) = mpsc::channel(4096);
    let mut tasks = JoinSet::new();
    let mut handles = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.into_iter().enumerate() {
        let LocalNode {
            handle, mut events, ..
        } = node;
        let tx = tx.clone();
        tasks.spawn(async move {
            while let Some(event) = events.recv().await {
                if let OverlayEvent::Announcement(a) = event {
                    let _ = tx.send((i, a.peer_id, Instant::now())).await;
                }
            }
        });
        handles.push(handle);
    }
    (handles, rx, tasks)
}

/// One length-prefixed job request frame with an arbitrary wire `version`
/// (to play a peer with the wrong protocol version).
#[cfg(feature = "testing")]
pub fn raw_request_frame(version: u16, request: &[u8]) -> Result<Vec<u8>, OverlayError> {
    let body = postcard::to_stdvec(&crate::job::WireFrame::Request {
        version,
        request: request.to_vec(),
    })?;
    let len = u32::try_from(body.len()).map_err(|_| OverlayError::TooLarge {
        what: "raw frame",
        size: body.len(),
        max: u32::MAX as usize,
    })?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads one job frame from a raw stream opened with
/// [`OverlayHandle::open_raw_job_stream`].
#[cfg(feature = "testing")]
pub async fn read_raw_job_frame(
    stream: &mut libp2p::Stream,
    max_frame_size: usize,
) -> Result<crate::JobFrame, OverlayError> {
    use crate::job::{read_frame, FrameError, WireFrame};
    let bytes = read_frame(stream, max_frame_size)
        .await
        .map_err(|e| match e {
            FrameError::TooLarge(size) => OverlayError::TooLarge {
                what: "job frame",
                size,
                max: max_frame_size,
            },
            FrameError::Closed => OverlayError::JobStreamClosed,
            FrameError::Io(e) => OverlayError::Io(e),
        })?;
    match WireFrame::decode(&bytes).map_err(|e| OverlayError::MalformedFrame(e.to_string()))? {
        WireFrame::Data(d) => Ok(crate::JobFrame::Data(d)),
        WireFrame::End(u) => Ok(crate::JobFrame::End(u)),
        WireFrame::Error { code, message } => Ok(crate::JobFrame::Error { code, message }),
        WireFrame::Request { .. } => Err(OverlayError::MalformedFrame(
            "unexpected request frame".into(),
        )),
    }
}

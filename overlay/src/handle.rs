//! [`OverlayHandle`]: the cloneable front door to the overlay task.

use std::{collections::HashSet, time::Duration};

use libp2p::{request_response, Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::peers::StreamUse;
use crate::{
    behaviour::AttestResponse,
    job::{self, JobLimits, JobStream},
    network::{Command, Reports},
    Announcement, Misbehaviour, OverlayError,
};

/// A connected peer as the overlay sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerInfo {
    /// The peer.
    pub peer_id: PeerId,
    /// Addresses it listens on (from identify) or that we dialled.
    pub addresses: Vec<Multiaddr>,
    /// Round-trip time, an exponentially weighted moving average of pings.
    pub rtt: Option<Duration>,
    /// Gossipsub's score of the peer (negative after invalid messages).
    pub gossip_score: Option<f64>,
    /// The overlay's misbehaviour score of the peer (0 = clean).
    pub misbehaviour: u32,
    /// The peer's software, from identify.
    pub agent_version: Option<String>,
    /// Its open connections.
    pub connections: Vec<ConnectionInfo>,
}

/// One open connection to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The peer's address on it (a `/p2p-circuit` address when relayed).
    pub address: Multiaddr,
    /// Through a relay rather than direct.
    pub relayed: bool,
    /// We dialled it.
    pub outbound: bool,
}

/// Whether this node can be dialled, as autonat last found, and the relays
/// it listens through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reachability {
    /// `public`, `private` (peers asked to dial back could not) or
    /// `unknown` (not probed yet, or no peer to probe with).
    pub status: &'static str,
    /// The relays this node holds a listener on.
    pub relays: Vec<PeerId>,
}

/// Cloneable handle to the overlay task. Every method sends a command over a
/// bounded channel and waits for the task's reply; all fail with
/// [`OverlayError::Stopped`] once the task is gone.
#[derive(Clone)]
pub struct OverlayHandle {
    commands: mpsc::Sender<Command>,
    reports: Reports,
    control: libp2p_stream::Control,
    local_peer_id: PeerId,
    limits: JobLimits,
    uses: StreamUse,
    cancel: CancellationToken,
}

impl std::fmt::Debug for OverlayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayHandle")
            .field("local_peer_id", &self.local_peer_id)
            .finish_non_exhaustive()
    }
}

impl OverlayHandle {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        reports: Reports,
        control: libp2p_stream::Control,
        local_peer_id: PeerId,
        limits: JobLimits,
        uses: StreamUse,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            commands,
            reports,
            control,
            local_peer_id,
            limits,
            uses,
            cancel,
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, OverlayError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| OverlayError::Stopped)?;
        rx.await.map_err(|_| OverlayError::Stopped)
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The addresses the node listens on (with real ports for port-0 listeners).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, OverlayError> {
        self.ask(|reply| Command::ListenAddrs { reply }).await
    }

    /// Whether this node can be dialled, and the relays it listens through.
    pub async fn reachability(&self) -> Result<Reachability, OverlayError> {
        self.ask(|reply| Command::Reachability { reply }).await
    }

    /// Starts dialling `addr` (which may end in `/p2p/<peer id>`); returns
    /// when the dial has started, not when the connection is up.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), OverlayError> {
        self.ask(|reply| Command::Dial { addr, reply }).await?
    }

    /// Connected peers with their addresses, RTT and scores.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, OverlayError> {
        self.ask(|reply| Command::Peers { reply }).await
    }

    /// This node's network coordinate now ([`crate::vivaldi`]).
    pub async fn coordinate(&self) -> Result<crate::vivaldi::Coordinate, OverlayError> {
        self.ask(|reply| Command::Coordinate { reply }).await
    }

    /// Makes `announcement` this node's current announcement: signs it,
    /// publishes it on gossip, and re-publishes it to peers that subscribe
    /// later, until it expires. `peer_id` must be this node's and `seq` must
    /// grow with every call; its `coordinate` is replaced by this node's.
    /// Succeeds even when no peer listens yet.
    pub async fn announce(&self, announcement: Announcement) -> Result<(), OverlayError> {
        self.ask(|reply| Command::Announce {
            announcement,
            reply,
        })
        .await?
    }

    /// The latest unexpired announcement of every known worker, this node's included.
    pub async fn announcements(&self) -> Result<Vec<Announcement>, OverlayError> {
        self.ask(|reply| Command::Announcements { reply }).await
    }

    /// Signs `report` with this node's key and publishes it on the reputation topic.
    pub async fn publish_reputation(&self, report: Vec<u8>) -> Result<(), OverlayError> {
        self.ask(|reply| Command::PublishReputation { report, reply })
            .await?
    }

    /// Publishes a Kademlia provider record for `key` (e.g. a model id) and
    /// keeps republishing it. Returns when the record reached the closest
    /// peers; it is stored locally even if that fails.
    pub async fn start_providing(&self, key: impl AsRef<[u8]>) -> Result<(), OverlayError> {
        let key = key.as_ref().to_vec();
        self.ask(|reply| Command::StartProviding { key, reply })
            .await?
    }

    /// Stops providing `key` (the local record is removed; remote copies expire).
    pub async fn stop_providing(&self, key: impl AsRef<[u8]>) -> Result<(), OverlayError> {
        let key = key.as_ref().to_vec();
        self.ask(|reply| Command::StopProviding { key, reply })
            .await?
    }

    /// Peers that published a provider record for `key`, found through Kademlia.
    pub async fn get_providers(
        &self,
        key: impl AsRef<[u8]>,
    ) -> Result<HashSet<PeerId>, OverlayError> {
        let key = key.as_ref().to_vec();
        self.ask(|reply| Command::GetProviders { key, reply })
            .await?
    }

    /// Addresses of `peer`: those of the live connection, or else found by a
    /// Kademlia lookup (and remembered, so a following dial can use them).
    pub async fn find_peer(&self, peer: PeerId) -> Result<Vec<Multiaddr>, OverlayError> {
        self.ask(|reply| Command::FindPeer { peer, reply }).await?
    }

    /// Asks `peer` for its attestation evidence, bound to `challenge`.
    /// The bytes are opaque to the overlay.
    pub async fn fetch_attestation(
        &self,
        peer: PeerId,
        challenge: Vec<u8>,
    ) -> Result<Vec<u8>, OverlayError> {
        self.ask(|reply| Command::FetchAttestation {
            peer,
            challenge,
            reply,
        })
        .await?
    }

    /// Opens a job stream to `peer` and sends `request`; read the worker's
    /// frames from the returned [`JobStream`]. Dials the peer when needed.
    /// A stream whose connection closed before the request went out is
    /// opened again at once (on another connection, or a new one); when
    /// that fails too, or the dial did, the peer is looked up in Kademlia
    /// and tried once more.
    pub async fn open_job(
        &self,
        peer: PeerId,
        request: Vec<u8>,
    ) -> Result<JobStream, OverlayError> {
        if self.commands.is_closed() {
            return Err(OverlayError::Stopped);
        }
        let first = match self.connect_and_open(peer, request.clone()).await {
            Err(e @ OverlayError::OpenStream { .. }) => {
                tracing::debug!(%peer, error = %e, "job stream failed; opening another");
                self.connect_and_open(peer, request.clone()).await
            }
            other => other,
        };
        match first {
            Err(e @ (OverlayError::Dial { .. } | OverlayError::OpenStream { .. })) => {
                tracing::debug!(%peer, error = %e, "job stream failed; looking the peer up in the DHT");
                self.find_peer(peer).await?;
                self.connect_and_open(peer, request).await
            }
            other => other,
        }
    }

    async fn connect_and_open(
        &self,
        peer: PeerId,
        request: Vec<u8>,
    ) -> Result<JobStream, OverlayError> {
        let connect = self.ask(|reply| Command::Connect { peer, reply });
        tokio::time::timeout(self.limits.idle_timeout, connect)
            .await
            .map_err(|_| OverlayError::Dial {
                target: peer.to_string(),
                reason: format!("not connected after {:?}", self.limits.idle_timeout),
            })???;
        job::open(
            self.control.clone(),
            peer,
            request,
            self.limits,
            self.reports.clone(),
            self.uses.open(peer),
        )
        .await
    }

    /// Reports that `peer` misbehaved (e.g. sent an undecodable job payload).
    /// Past the ban threshold the peer is disconnected and banned.
    pub async fn report_misbehaviour(
        &self,
        peer: PeerId,
        offence: Misbehaviour,
    ) -> Result<(), OverlayError> {
        self.commands
            .send(Command::ReportMisbehaviour { peer, offence })
            .await
            .map_err(|_| OverlayError::Stopped)
    }

    /// The misbehaviour score of `peer` (0 when it never misbehaved).
    pub async fn misbehaviour_score(&self, peer: PeerId) -> Result<u32, OverlayError> {
        self.ask(|reply| Command::MisbehaviourScore { peer, reply })
            .await
    }

    /// Stops the overlay task; every later call fails with [`OverlayError::Stopped`].
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Publishes raw bytes on a gossip topic, skipping signing and checks
    /// (to play a misbehaving peer in tests).
    #[cfg(feature = "testing")]
    pub async fn publish_raw(
        &self,
        topic: &'static str,
        data: Vec<u8>,
    ) -> Result<(), OverlayError> {
        self.ask(|reply| Command::PublishRaw { topic, data, reply })
            .await?
    }

    /// Opens a bare `/silk/job/1.0.0` stream with nothing sent on it (to play
    /// a misbehaving peer in tests).
    #[cfg(any(test, feature = "testing"))]
    pub async fn open_raw_job_stream(&self, peer: PeerId) -> Result<libp2p::Stream, OverlayError> {
        self.control
            .clone()
            .open_stream(peer, job::JOB_PROTOCOL)
            .await
            .map_err(|e| OverlayError::OpenStream {
                peer,
                reason: e.to_string(),
            })
    }
}

/// Answers one inbound attestation request. Dropping it without answering
/// makes the request fail on the asker's side.
pub struct AttestationResponder {
    channel: request_response::ResponseChannel<AttestResponse>,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for AttestationResponder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestationResponder")
            .finish_non_exhaustive()
    }
}

impl AttestationResponder {
    pub(crate) fn new(
        channel: request_response::ResponseChannel<AttestResponse>,
        commands: mpsc::Sender<Command>,
    ) -> Self {
        Self { channel, commands }
    }

    /// Sends `evidence` (opaque bytes) to the asker.
    pub async fn respond(self, evidence: Vec<u8>) -> Result<(), OverlayError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::RespondAttestation {
                channel: self.channel,
                evidence,
                reply,
            })
            .await
            .map_err(|_| OverlayError::Stopped)?;
        rx.await.map_err(|_| OverlayError::Stopped)?
    }
}

//! [`OverlayConfig`] and the on-disk identity key.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use libp2p::{identity, multiaddr::Protocol, Multiaddr};

use crate::OverlayError;

/// File name of the identity key inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// How the overlay runs. Required values go through [`OverlayConfig::new`];
/// every other field has a default that suits a public node and can be
/// changed before [`crate::Overlay::spawn`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OverlayConfig {
    /// This node's identity (ed25519). Its peer id is derived from it.
    pub keypair: identity::Keypair,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/4001` and
    /// `/ip4/0.0.0.0/udp/4001/quic-v1`. Port 0 picks a free port.
    pub listen_addrs: Vec<Multiaddr>,
    /// Nodes to join the mesh through; each must end in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS (multicast). Off by default.
    pub enable_mdns: bool,
    /// Largest job frame, in bytes, read or written on a job stream.
    pub max_frame_size: usize,
    /// A job stream that sees no frame for this long is closed.
    pub job_idle_timeout: Duration,
    /// Inbound job streams served at once; further ones are refused as busy.
    pub max_inbound_jobs: usize,
    /// Inbound job streams served at once for one peer; its further ones
    /// are refused as busy, so one peer cannot take every slot.
    pub max_inbound_jobs_per_peer: usize,
    /// Time a new inbound job stream has to send its request frame; a
    /// stream that stays silent counts as misbehaviour.
    pub job_first_frame_timeout: Duration,
    /// Largest signed announcement accepted from gossip, in bytes.
    pub max_announcement_size: usize,
    /// Largest signed reputation report accepted from gossip, in bytes.
    pub max_reputation_size: usize,
    /// Announcements whose expiry lies further ahead than this are rejected.
    pub max_announcement_ttl: Duration,
    /// Per-origin gossip rate limit: burst size.
    pub gossip_rate_burst: u32,
    /// Per-origin gossip rate limit: one more message is allowed per this period.
    pub gossip_rate_period: Duration,
    /// Our current announcement is published again this often (same `seq`:
    /// peers that have it ignore the copy, peers that missed it take it).
    pub announce_republish_interval: Duration,
    /// Gossipsub heartbeat (mesh maintenance and lazy gossip).
    pub gossip_heartbeat: Duration,
    /// Interval between Kademlia routing-table refreshes.
    pub kad_refresh_interval: Duration,
    /// Timeout of one Kademlia query.
    pub kad_query_timeout: Duration,
    /// Answer Kademlia queries even before autonat confirms an external
    /// address. A silk node is meant to be reachable, so this is on.
    pub kad_server_mode: bool,
    /// Interval between pings to each connected peer.
    pub ping_interval: Duration,
    /// Relay circuits between peers for those behind NAT (circuit relay
    /// v2's hop protocol), within [`Self::relay_limits`]. A relayed
    /// connection carries jobs until hole punching (DCUtR) replaces it
    /// with a direct one, or for good when that fails.
    pub relay_server: bool,
    /// What the relay server grants ([`crate::RELAY_LIMITS`] by default).
    pub relay_limits: crate::RelayLimits,
    /// Relays to listen through from the start, each ending in
    /// `/p2p/<peer id>`: peers reach this node at
    /// `<relay>/p2p-circuit/p2p/<us>`.
    pub relays: Vec<Multiaddr>,
    /// Once autonat finds this node unreachable, listen through up to
    /// [`crate::AUTO_RELAYS`] connected peers that offer relaying.
    pub auto_relay: bool,
    /// Let autonat probe private addresses (RFC 1918, loopback): a mesh
    /// on a LAN or in a lab, where those are the addresses peers reach.
    /// Off on a public mesh, where a peer asked to dial one would be
    /// probing someone else's network.
    pub autonat_private_addresses: bool,
    /// How long after start autonat first asks peers to dial back.
    pub autonat_boot_delay: Duration,
    /// Interval between autonat probes while unsure (and after a probe
    /// fails to reach a peer).
    pub autonat_retry_interval: Duration,
    /// Misbehaviour score at which a peer is disconnected and banned.
    pub ban_threshold: u32,
    /// How long a ban lasts.
    pub ban_duration: Duration,
    /// A misbehaviour score loses one point per this interval.
    pub misbehaviour_decay: Duration,
    /// Most established connections in total.
    pub max_connections: u32,
    /// Most established inbound connections, below `max_connections` so
    /// that peers dialing in (fresh peer ids cost nothing) cannot take the
    /// slots this node needs to dial out (audit F13).
    pub max_inbound_connections: u32,
    /// Most inbound connections, pending or established, from one IP
    /// address, and through one relay (audit F13). A node listening only
    /// on loopback (a local testnet) has every peer on 127.0.0.1 and needs
    /// this raised.
    pub max_inbound_connections_per_ip: u32,
    /// Most established connections per peer.
    pub max_connections_per_peer: u32,
    /// Fewest connected peers a node looks for: under it, a random
    /// Kademlia walk dials more (see [`crate::peers`]).
    pub min_peers: u32,
    /// Most connected peers a node keeps: over it, the surplus is closed,
    /// keeping peers with job streams and spreading the rest over the
    /// Kademlia buckets (see [`crate::peers`]). At most `max_connections`.
    pub max_peers: u32,
    /// A peer that carried a job stream is kept this long after the stream
    /// ended (the workers a gateway uses, the gateways that use a worker).
    pub peer_use_memory: Duration,
    /// Most peers tracked in per-peer maps (announcements, scores, rate limits).
    pub max_tracked_peers: usize,
    /// Capacity of the command channel from handles to the overlay task.
    pub command_buffer: usize,
    /// Capacity of the event channel from the overlay task to the node.
    pub event_buffer: usize,
    /// Connections with no open stream are closed after this long.
    pub idle_connection_timeout: Duration,
    /// Agent version sent through identify.
    pub agent_version: String,
    /// Where to count swarm events and gossip verdicts (the node's
    /// `/metrics`); `None` counts nothing.
    pub metrics: Option<crate::metrics::OverlayMetrics>,
    /// Shifts this node's clock by this many milliseconds, to play a node
    /// whose clock is off (tests only).
    #[cfg(feature = "testing")]
    pub clock_offset_ms: i64,
}

impl OverlayConfig {
    /// A configuration with the two values that have no sensible default.
    pub fn new(keypair: identity::Keypair, listen_addrs: Vec<Multiaddr>) -> Self {
        Self {
            keypair,
            listen_addrs,
            bootstrap: Vec::new(),
            enable_mdns: false,
            max_frame_size: 1024 * 1024,
            job_idle_timeout: Duration::from_secs(60),
            max_inbound_jobs: 64,
            max_inbound_jobs_per_peer: 16,
            job_first_frame_timeout: Duration::from_secs(10),
            max_announcement_size: 4 * 1024,
            max_reputation_size: 16 * 1024,
            max_announcement_ttl: Duration::from_secs(10 * 60),
            gossip_rate_burst: 8,
            gossip_rate_period: Duration::from_secs(1),
            announce_republish_interval: Duration::from_secs(15),
            gossip_heartbeat: Duration::from_millis(700),
            kad_refresh_interval: Duration::from_secs(5 * 60),
            kad_query_timeout: Duration::from_secs(30),
            kad_server_mode: true,
            ping_interval: Duration::from_secs(15),
            relay_server: true,
            relay_limits: crate::RELAY_LIMITS,
            relays: Vec::new(),
            auto_relay: true,
            autonat_private_addresses: false,
            autonat_boot_delay: Duration::from_secs(15),
            autonat_retry_interval: Duration::from_secs(90),
            ban_threshold: 100,
            ban_duration: Duration::from_secs(60 * 60),
            misbehaviour_decay: Duration::from_secs(30),
            max_connections: 512,
            max_inbound_connections: 384,
            max_inbound_connections_per_ip: 16,
            max_connections_per_peer: 4,
            min_peers: 25,
            max_peers: 50,
            peer_use_memory: Duration::from_secs(5 * 60),
            max_tracked_peers: 8192,
            command_buffer: 256,
            event_buffer: 1024,
            idle_connection_timeout: Duration::from_secs(120),
            agent_version: format!("silk-overlay/{}", env!("CARGO_PKG_VERSION")),
            metrics: None,
            #[cfg(feature = "testing")]
            clock_offset_ms: 0,
        }
    }

    /// Whether every listen address is a loopback one (a local testnet,
    /// where every peer dials in from 127.0.0.1 or ::1).
    pub fn listens_only_on_loopback(&self) -> bool {
        use libp2p::multiaddr::Protocol;
        self.listen_addrs.iter().all(|a| match a.iter().next() {
            Some(Protocol::Ip4(ip)) => ip.is_loopback(),
            Some(Protocol::Ip6(ip)) => ip.is_loopback(),
            _ => false,
        })
    }

    /// Sets the bootstrap nodes.
    pub fn with_bootstrap(mut self, bootstrap: Vec<Multiaddr>) -> Self {
        self.bootstrap = bootstrap;
        self
    }

    /// Turns mDNS discovery on or off.
    pub fn with_mdns(mut self, enable: bool) -> Self {
        self.enable_mdns = enable;
        self
    }

    /// Checks values that would make the overlay misbehave.
    pub fn validate(&self) -> Result<(), OverlayError> {
        let bad = |what: &str| Err(OverlayError::InvalidConfig(what.to_owned()));
        if self.keypair.key_type() != identity::KeyType::Ed25519 {
            return Err(OverlayError::NotEd25519);
        }
        if self.listen_addrs.is_empty() {
            return bad("no listen address: pass --listen, e.g. /ip4/0.0.0.0/tcp/4001");
        }
        if self.max_frame_size < 64 || self.max_frame_size > u32::MAX as usize {
            return bad("max_frame_size must be between 64 bytes and 4 GiB");
        }
        if self.max_inbound_connections_per_ip == 0
            || self.max_inbound_connections == 0
            || self.max_inbound_connections > self.max_connections
        {
            return bad("max_inbound_connections and max_inbound_connections_per_ip must be at least 1, and max_inbound_connections at most max_connections");
        }
        if self.min_peers > self.max_peers
            || self.max_peers == 0
            || self.max_peers > self.max_connections
        {
            return bad("the peer budget needs 1 <= max_peers <= max_connections and min_peers <= max_peers");
        }
        if self.max_inbound_jobs == 0 {
            return bad("max_inbound_jobs must be at least 1");
        }
        if self.max_inbound_jobs_per_peer == 0 {
            return bad("max_inbound_jobs_per_peer must be at least 1");
        }
        if self.job_first_frame_timeout.is_zero() {
            return bad("job_first_frame_timeout must be above zero");
        }
        if self.gossip_rate_burst == 0 || self.gossip_rate_period.is_zero() {
            return bad("the gossip rate limit needs a burst of at least 1 and a non-zero period");
        }
        if self.command_buffer == 0 || self.event_buffer == 0 || self.max_tracked_peers == 0 {
            return bad("channel capacities and max_tracked_peers must be at least 1");
        }
        if self.announce_republish_interval.is_zero() || self.gossip_heartbeat.is_zero() {
            return bad("announce_republish_interval and gossip_heartbeat must be non-zero");
        }
        if self.ban_threshold == 0 {
            return bad("ban_threshold must be at least 1");
        }
        for addr in &self.bootstrap {
            if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
                return Err(OverlayError::BootstrapWithoutPeerId { addr: addr.clone() });
            }
        }
        for addr in &self.relays {
            if !matches!(addr.iter().last(), Some(Protocol::P2p(_)))
                || addr.iter().any(|p| p == Protocol::P2pCircuit)
            {
                return bad(&format!(
                    "relay {addr}: give the relay's own address, ending in /p2p/<peer id>"
                ));
            }
        }
        Ok(())
    }
}

/// Path of the identity key inside `data_dir`.
pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_FILE)
}

/// Loads the ed25519 identity from `<data_dir>/identity.key`, or creates the
/// directory and a fresh key there when the file does not exist.
///
/// The file holds the 32-byte raw ed25519 secret (the seed), so other code
/// can read it with `ed25519_dalek::SigningKey::from_bytes`. It is created
/// with mode 0600 on Unix.
pub fn load_or_create_identity(data_dir: &Path) -> Result<identity::Keypair, OverlayError> {
    let path = identity_path(data_dir);
    let io_err = |source| OverlayError::IdentityIo {
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(bytes) => keypair_from_secret(&bytes).ok_or(OverlayError::IdentityFormat {
            path: path.clone(),
            len: bytes.len(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(data_dir).map_err(io_err)?;
            let keypair = identity::ed25519::Keypair::generate();
            write_secret(&path, keypair.secret().as_ref()).map_err(io_err)?;
            tracing::info!(path = %path.display(), "created a new identity key");
            Ok(keypair.into())
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Builds a keypair from a 32-byte raw ed25519 secret; `None` for any other length.
pub fn keypair_from_secret(secret: &[u8]) -> Option<identity::Keypair> {
    let mut bytes: [u8; 32] = secret.try_into().ok()?;
    let secret = identity::ed25519::SecretKey::try_from_bytes(&mut bytes).ok()?;
    Some(identity::ed25519::Keypair::from(secret).into())
}

/// The 32-byte raw ed25519 secret of `keypair`, the format of `identity.key`.
pub fn secret_bytes(keypair: &identity::Keypair) -> Result<[u8; 32], OverlayError> {
    let ed = keypair
        .clone()
        .try_into_ed25519()
        .map_err(|_| OverlayError::NotEd25519)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(ed.secret().as_ref());
    Ok(out)
}

fn write_secret(path: &Path, secret: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("key.tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(secret)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_the_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create_identity(dir.path()).expect("create");
        let second = load_or_create_identity(dir.path()).expect("load");
        assert_eq!(first.public(), second.public());
        let raw = fs::read(identity_path(dir.path())).expect("read");
        assert_eq!(raw.len(), 32);
        assert_eq!(raw, secret_bytes(&first).expect("secret"));
    }

    #[test]
    fn a_truncated_identity_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(identity_path(dir.path()), [1u8; 7]).expect("write");
        let err = load_or_create_identity(dir.path()).expect_err("must fail");
        assert!(matches!(err, OverlayError::IdentityFormat { len: 7, .. }));
    }

    #[test]
    fn bootstrap_needs_a_peer_id() {
        let kp = identity::Keypair::generate_ed25519();
        let listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
        let cfg = OverlayConfig::new(kp, listen)
            .with_bootstrap(vec!["/ip4/127.0.0.1/tcp/4001".parse().expect("addr")]);
        assert!(matches!(
            cfg.validate(),
            Err(OverlayError::BootstrapWithoutPeerId { .. })
        ));
    }

    #[test]
    fn a_relay_is_named_by_its_own_address_and_peer_id() {
        let kp = identity::Keypair::generate_ed25519();
        let listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
        let relay = identity::Keypair::generate_ed25519().public().to_peer_id();
        let mut cfg = OverlayConfig::new(kp, listen);
        for bad in [
            "/ip4/10.0.0.1/tcp/4001".to_string(),
            format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit"),
            format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{relay}"),
        ] {
            cfg.relays = vec![bad.parse().expect("addr")];
            let err = cfg.validate().expect_err(&bad);
            assert!(err.to_string().contains("relay"), "{bad}: {err}");
        }
        cfg.relays = vec![format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}")
            .parse()
            .expect("addr")];
        cfg.validate().expect("a relay's own address");
    }
}

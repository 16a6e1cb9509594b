//! The combined libp2p behaviour and the swarm that runs it.
//!
//! | field | protocol | role |
//! | --- | --- | --- |
//! | `limits` | — | caps established connections, total and per peer |
//! | `blocked` | — | refuses connections from banned peers |
//! | `identify` | `/ipfs/id/1.0.0` | learns peers' listen addresses for Kademlia |
//! | `ping` | `/ipfs/ping/1.0.0` | keeps connections alive, measures RTT |
//! | `kad` | `/silk/kad/1.0.0` | peer discovery and model provider records |
//! | `gossipsub` | `/meshsub/1.1.0` | signed announcements and reputation reports |
//! | `autonat` | `/libp2p/autonat/1.0.0` | learns whether we are reachable |
//! | `relay` | `/libp2p/circuit/relay/0.2.0/stop` | listens through relays when behind NAT |
//! | `relay_server` | `/libp2p/circuit/relay/0.2.0/hop` | relays circuits for others, with `relay_server` |
//! | `dcutr` | `/libp2p/dcutr` | upgrades relayed connections to direct ones |
//! | `mdns` | multicast DNS | LAN discovery, only with `enable_mdns` |
//! | `attest` | `/silk/attest/1.0.0` | attestation evidence as opaque bytes |
//! | `jobs` | `/silk/job/1.0.0` | raw job streams (see [`crate::job`]) |

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns, noise,
    ping, relay, request_response, swarm::behaviour::toggle::Toggle, swarm::NetworkBehaviour, tcp,
    yamux, StreamProtocol, Swarm, SwarmBuilder,
};
use serde::{Deserialize, Serialize};

use crate::{gossip, OverlayConfig, OverlayError};

/// Kademlia protocol name: keeps silk nodes out of the public IPFS DHT.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/silk/kad/1.0.0");
/// Attestation request-response protocol name.
pub const ATTEST_PROTOCOL: StreamProtocol = StreamProtocol::new("/silk/attest/1.0.0");
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/silk/id/1.0.0";

/// The identify protocol name a relay server lists.
pub(crate) const RELAY_HOP_PROTOCOL: StreamProtocol =
    StreamProtocol::new("/libp2p/circuit/relay/0.2.0/hop");

/// What a node's relay server grants (with [`OverlayConfig::relay_server`];
/// [`OverlayConfig::relay_limits`], [`RELAY_LIMITS`] by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Peers holding a reservation (a relayed listen address) at once.
    pub max_reservations: usize,
    /// Circuits relayed at once, in all.
    pub max_circuits: usize,
    /// Circuits relayed at once for one peer.
    pub max_circuits_per_peer: usize,
    /// A circuit is closed after this long.
    pub circuit_duration: Duration,
    /// A circuit is closed after carrying this many bytes (both ways).
    pub circuit_bytes: u64,
}

/// The relay server's limits. libp2p's defaults (2 minutes and 128 KiB a
/// circuit) suit a circuit that only carries hole punching; a silk job
/// runs over the circuit when hole punching fails, and a long answer with
/// logprobs is a few hundred KiB, so circuits may carry more and last
/// longer. The connection is reopened (a new circuit) when one ends.
pub const RELAY_LIMITS: RelayLimits = RelayLimits {
    max_reservations: 128,
    max_circuits: 32,
    max_circuits_per_peer: 4,
    circuit_duration: Duration::from_secs(10 * 60),
    circuit_bytes: 16 << 20,
};

/// Relays a node behind NAT listens through when it picks them itself.
pub const AUTO_RELAYS: usize = 2;

/// Largest attestation request or response, in bytes.
const MAX_ATTEST_BYTES: u64 = 256 * 1024;

/// An attestation request: a challenge (nonce) chosen by the asker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct AttestRequest {
    pub(crate) challenge: Vec<u8>,
}

/// An attestation response: evidence bytes defined by the attestation module.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct AttestResponse {
    pub(crate) evidence: Vec<u8>,
}

/// Every behaviour the overlay runs, polled together by the swarm.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) ip_limits: crate::ip_limits::Behaviour,
    pub(crate) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) autonat: autonat::Behaviour,
    pub(crate) relay: relay::client::Behaviour,
    pub(crate) relay_server: Toggle<crate::relay_server::RelayServer>,
    pub(crate) dcutr: dcutr::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) attest: request_response::cbor::Behaviour<AttestRequest, AttestResponse>,
    pub(crate) jobs: libp2p_stream::Behaviour,
}

fn setup<E: std::error::Error + Send + Sync + 'static>(e: E) -> OverlayError {
    OverlayError::Setup(Box::new(e))
}

/// Builds the swarm: QUIC and TCP+noise+yamux transports, a relay client, and
/// every behaviour configured from `config`.
pub(crate) fn build_swarm(config: &OverlayConfig) -> Result<Swarm<Behaviour>, OverlayError> {
    let gossip_config = gossip_config(config)?;
    let swarm = SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(setup)?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(setup)?
        .with_behaviour(|key, relay| {
            let local = key.public().to_peer_id();

            let limits = connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_established(Some(config.max_connections))
                    .with_max_established_incoming(Some(config.max_inbound_connections))
                    .with_max_established_per_peer(Some(config.max_connections_per_peer)),
            );
            let ip_limits = crate::ip_limits::Behaviour::new(config.max_inbound_connections_per_ip);

            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                    .with_agent_version(config.agent_version.clone())
                    // Peers learn a new relayed address at once, not at the
                    // next periodic exchange.
                    .with_push_listen_addr_updates(true),
            );

            let ping =
                ping::Behaviour::new(ping::Config::new().with_interval(config.ping_interval));

            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_query_timeout(config.kad_query_timeout);
            kad_config.set_periodic_bootstrap_interval(Some(config.kad_refresh_interval));
            let mut kad =
                kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad_config);
            if config.kad_server_mode {
                kad.set_mode(Some(kad::Mode::Server));
            }

            // Anonymous: our envelope names and proves the author, so
            // gossipsub's own signature (checked on every copy) is not
            // needed (see `gossip`).
            let mut gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Anonymous,
                gossip_config,
            )?;
            let (params, thresholds) = score_params();
            gossipsub.with_peer_score(params, thresholds)?;

            let autonat = autonat::Behaviour::new(
                local,
                autonat::Config {
                    boot_delay: config.autonat_boot_delay,
                    retry_interval: config.autonat_retry_interval,
                    only_global_ips: !config.autonat_private_addresses,
                    ..autonat::Config::default()
                },
            );
            let relay_server = config.relay_server.then(|| {
                crate::relay_server::RelayServer::new(
                    local,
                    relay::Config {
                        max_reservations: config.relay_limits.max_reservations,
                        max_circuits: config.relay_limits.max_circuits,
                        max_circuits_per_peer: config.relay_limits.max_circuits_per_peer,
                        max_circuit_duration: config.relay_limits.circuit_duration,
                        max_circuit_bytes: config.relay_limits.circuit_bytes,
                        ..relay::Config::default()
                    },
                )
            });
            let dcutr = dcutr::Behaviour::new(local);

            let mdns = if config.enable_mdns {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
            } else {
                None
            };

            let attest = request_response::cbor::Behaviour::with_codec(
                request_response::cbor::codec::Codec::default()
                    .set_request_size_maximum(MAX_ATTEST_BYTES)
                    .set_response_size_maximum(MAX_ATTEST_BYTES),
                [(ATTEST_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
            );

            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour {
                limits,
                ip_limits,
                blocked: allow_block_list::Behaviour::default(),
                identify,
                ping,
                kad,
                gossipsub,
                autonat,
                relay,
                relay_server: Toggle::from(relay_server),
                dcutr,
                mdns: Toggle::from(mdns),
                attest,
                jobs: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| OverlayError::Setup(format!("{e}").into()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_connection_timeout))
        .build();
    Ok(swarm)
}

fn gossip_config(config: &OverlayConfig) -> Result<gossipsub::Config, OverlayError> {
    let max = config.max_announcement_size.max(config.max_reputation_size)
        + crate::gossip::COUNTER_BYTES
        + 1024;
    gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .message_id_fn(|m| crate::gossip::message_id(&m.data))
        .validate_messages()
        .max_transmit_size(max)
        .heartbeat_interval(config.gossip_heartbeat)
        .build()
        .map_err(|e| OverlayError::InvalidConfig(format!("gossipsub: {e}")))
}

/// Peer scoring: invalid messages (P4) weigh heavily, so one forged
/// announcement drops the sender below the gossip threshold and a few more
/// graylist it. Mesh-delivery penalties (P3) are off because announcements
/// are sparse; loopback is exempt from the same-IP penalty so local testnets
/// work.
fn score_params() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let mut params = gossipsub::PeerScoreParams {
        ip_colocation_factor_whitelist: HashSet::from([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]),
        ..Default::default()
    };
    let topic = |weight: f64| gossipsub::TopicScoreParams {
        topic_weight: weight,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 0.5,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 20.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -15.0,
        invalid_message_deliveries_decay: 0.9,
        ..Default::default()
    };
    params.topics.insert(
        gossipsub::IdentTopic::new(gossip::ANNOUNCE_TOPIC).hash(),
        topic(1.0),
    );
    params.topics.insert(
        gossipsub::IdentTopic::new(gossip::REPUTATION_TOPIC).hash(),
        topic(0.5),
    );
    let thresholds = gossipsub::PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -40.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 2.0,
    };
    (params, thresholds)
}

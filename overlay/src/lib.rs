//! silk's peer-to-peer overlay: libp2p and nothing about money, models or HTTP.
//!
//! # Bird's-eye view
//!
//! ```text
//!   node code ──OverlayHandle (Clone)──► Command ──► overlay task ──► Swarm<Behaviour>
//!        ▲         (bounded mpsc + oneshot reply)      │   owns        (behaviour.rs)
//!        └──────────── OverlayEvent (bounded mpsc) ◄───┘
//! ```
//!
//! **Tasks.** [`Overlay::spawn`] builds the swarm, binds the listen addresses
//! and starts one *overlay task* (`network.rs`) that alone owns the
//! [`libp2p::Swarm`]. It runs a `biased` select over: cancellation, swarm
//! events, misbehaviour reports from job tasks, [`OverlayHandle`] commands,
//! and a housekeeping tick. Its children, in a `JoinSet`, are the *job
//! acceptor* (admits inbound `/silk/job/1.0.0` streams up to
//! `max_inbound_jobs`, `max_inbound_jobs_per_peer` of them from one peer)
//! and the short handshake tasks it starts, which wait
//! `job_first_frame_timeout` for the request and report a silent stream as
//! misbehaviour. Each outbound
//! [`JobStream`] has one reader task, aborted when the stream is dropped.
//!
//! **Ownership.** The overlay task owns the swarm, the pending replies
//! (keyed by Kademlia `QueryId` and request-response id), the gossip
//! validation state ([`gossip`]: latest announcement per peer, per-origin
//! rate limits) and the peer policy ([`misbehaviour`]: scores and bans). Job
//! streams bypass it: `libp2p-stream` hands streams straight to the job
//! tasks, so tokens never queue behind gossip or DHT work.
//!
//! **Data flow.**
//! - Discovery: bootstrap addresses → Kademlia (`/silk/kad/1.0.0`) → identify
//!   fills in listen addresses; mDNS on the LAN when enabled; autonat finds
//!   out whether the node can be dialled, and a node that cannot listens
//!   through relays (its own `relays`, or peers offering the hop protocol),
//!   where DCUtR upgrades relayed connections to direct ones; every node
//!   relays for others within its `relay_limits` ([`RELAY_LIMITS`] by
//!   default) unless `relay_server` is off.
//! - Announcements: [`OverlayHandle::announce`] signs an [`Announcement`]
//!   into a [`SignedEnvelope`] and publishes it; every receiver validates it
//!   (size, signature, signer = announced peer, expiry,
//!   growing `seq`, rate) *before* gossipsub forwards it. Rejections lower
//!   the sender's gossipsub score and raise its misbehaviour score.
//! - Jobs: [`OverlayHandle::open_job`] (asks the overlay task for a
//!   connection to the worker and waits until it is established, dialling
//!   what it knows and what a Kademlia lookup started at once finds; only then opens the
//!   stream, because `libp2p-stream` loses a request made while a connection
//!   is half set up) → length-prefixed postcard frames →
//!   the worker's node gets [`OverlayEvent::InboundJob`] with a
//!   [`JobResponder`]; frames are opaque bytes to this crate.
//! - Attestation: [`OverlayHandle::fetch_attestation`] ↔
//!   [`OverlayEvent::AttestationRequest`] over `/silk/attest/1.0.0`.
//! - Provider records: [`OverlayHandle::start_providing`] /
//!   [`OverlayHandle::get_providers`] for model ids.
//!
//! - Coordinates ([`vivaldi`]): each ping to a peer that announced a
//!   network coordinate moves this node's own; [`OverlayHandle::announce`]
//!   stamps it into the announcement, so a gateway can estimate its RTT to
//!   a worker it holds no connection to ([`OverlayHandle::coordinate`]).
//! - Peer budget ([`peers`]): between `min_peers` and `max_peers`
//!   connections; the surplus is closed, keeping peers with job streams
//!   and spreading the rest over the Kademlia buckets; too few start a
//!   random DHT walk.
//!
//! - Metrics ([`metrics`]): with [`OverlayConfig::metrics`] set, every
//!   swarm event goes through `libp2p-metrics`, and each gossip verdict
//!   and the peer count are counted for the node's `/metrics`.
//!
//! Every channel, queue and per-peer map is bounded (see [`OverlayConfig`]).

mod behaviour;
mod config;
mod error;
pub mod gossip;
mod handle;
mod ip_limits;
pub mod job;
pub mod metrics;
pub mod misbehaviour;
mod network;
pub mod peers;
mod relay_server;
pub mod testing;
pub mod vivaldi;

pub use behaviour::{
    RelayLimits, ATTEST_PROTOCOL, AUTO_RELAYS, IDENTIFY_PROTOCOL, KAD_PROTOCOL, RELAY_LIMITS,
};
pub use config::{
    identity_path, keypair_from_secret, load_or_create_identity, secret_bytes, OverlayConfig,
    IDENTITY_FILE,
};
pub use error::OverlayError;
pub use gossip::{Announcement, AttestationMode, EnvelopeError, SignedEnvelope};
pub use handle::{AttestationResponder, ConnectionInfo, OverlayHandle, PeerInfo, Reachability};
pub use job::{JobErrorCode, JobFrame, JobResponder, JobStream, JOB_PROTOCOL, JOB_WIRE_VERSION};
pub use metrics::OverlayMetrics;
pub use misbehaviour::Misbehaviour;
pub use network::{Overlay, OverlayEvent};
pub use vivaldi::Coordinate;

pub use libp2p::{identity::Keypair, multiaddr, Multiaddr, PeerId};

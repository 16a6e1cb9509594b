//! The one error type of this crate.

use std::{io, path::PathBuf, time::Duration};

use libp2p::{Multiaddr, PeerId};

/// Everything that can go wrong in the overlay. Each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OverlayError {
    /// The identity key file could not be read or written.
    #[error(
        "cannot read or write the identity key at {path}: {source}; \
         check the data directory's permissions or pass --data-dir"
    )]
    IdentityIo {
        /// The key file.
        path: PathBuf,
        /// The I/O failure.
        #[source]
        source: io::Error,
    },
    /// The identity key file exists but does not hold a 32-byte ed25519 secret.
    #[error(
        "the identity key at {path} is not a 32-byte raw ed25519 secret ({len} bytes); \
         move it away to create a fresh identity"
    )]
    IdentityFormat {
        /// The key file.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The keypair handed to the overlay is not ed25519.
    #[error("the overlay needs an ed25519 identity key; create one with load_or_create_identity")]
    NotEd25519,
    /// A configuration value is out of range.
    #[error("invalid overlay configuration: {0}")]
    InvalidConfig(String),
    /// The libp2p transports or behaviours could not be built.
    #[error("could not set up libp2p: {0}")]
    Setup(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A listen address is already in use by another process.
    #[error("{addr} is taken: pass --listen with another port (or port 0 for any free port)")]
    PortInUse {
        /// The address that could not be bound.
        addr: Multiaddr,
    },
    /// A listen address could not be used.
    #[error("cannot listen on {addr}: {reason}; pass --listen with an address like /ip4/0.0.0.0/tcp/4001 or /ip4/0.0.0.0/udp/4001/quic-v1")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A listener did not report its address in time.
    #[error("the listener for {addr} did not start within {after:?}; check the address")]
    ListenTimeout {
        /// The address.
        addr: Multiaddr,
        /// How long we waited.
        after: Duration,
    },
    /// A bootstrap address lacks the peer id of the node it points at.
    #[error(
        "bootstrap address {addr} has no /p2p/<peer id> suffix: append the node's peer id, \
         e.g. /ip4/192.0.2.1/tcp/4001/p2p/12D3KooW..."
    )]
    BootstrapWithoutPeerId {
        /// The address as given.
        addr: Multiaddr,
    },
    /// The overlay task is gone (it was shut down or crashed).
    #[error("the overlay task has stopped; restart the node")]
    Stopped,
    /// A dial failed.
    #[error("could not dial {target}: {reason}")]
    Dial {
        /// The peer or address that was dialled.
        target: String,
        /// Why the dial failed.
        reason: String,
    },
    /// `announce` was given an announcement for another peer.
    #[error("an announcement must carry this node's own peer id, not {got}")]
    NotOwnAnnouncement {
        /// The peer id in the announcement.
        got: PeerId,
    },
    /// `announce` was given an announcement with a field out of range.
    #[error("announcement out of range: {reason}")]
    AnnouncementOutOfRange {
        /// Which field, and its bound.
        reason: String,
    },
    /// `announce` was given a sequence number that is not above the last one.
    #[error("announcement seq {seq} is not above the last one ({last}): increase it")]
    StaleSequence {
        /// The seq given.
        seq: u64,
        /// The last seq announced.
        last: u64,
    },
    /// A payload is larger than the configured cap.
    #[error("{what} is {size} bytes, over the {max}-byte limit")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Gossipsub refused to publish.
    #[error("could not publish on gossip: {0}")]
    Publish(#[from] libp2p::gossipsub::PublishError),
    /// Serialising or deserialising a message failed.
    #[error("could not encode or decode a message: {0}")]
    Codec(#[from] postcard::Error),
    /// Signing with the local key failed.
    #[error("could not sign with the local identity key: {0}")]
    Signing(#[from] libp2p::identity::SigningError),
    /// Kademlia has no peers to ask.
    #[error("Kademlia knows no peers yet: pass --bootstrap with the address of a running node")]
    NoKnownPeers,
    /// The local provider record store refused a record.
    #[error("could not store the provider record: {0}")]
    ProviderStore(#[from] libp2p::kad::store::Error),
    /// A Kademlia query ran out of time without a result.
    #[error("the Kademlia query for {what} timed out; check connectivity to the bootstrap nodes")]
    DhtTimeout {
        /// What was looked up.
        what: String,
    },
    /// Kademlia found no address for a peer.
    #[error("no address of peer {peer} is known in the DHT: it may be offline")]
    PeerNotFound {
        /// The peer looked up.
        peer: PeerId,
    },
    /// A peer is banned for misbehaviour.
    #[error("peer {peer} is banned for misbehaviour")]
    Banned {
        /// The banned peer.
        peer: PeerId,
    },
    /// A peer does not speak the job protocol.
    #[error("peer {peer} does not speak /silk/job/1.0.0; it is not a silk worker or runs an incompatible version")]
    JobProtocolUnsupported {
        /// The peer.
        peer: PeerId,
    },
    /// Opening a job stream failed.
    #[error("could not open a job stream to {peer}: {reason}")]
    OpenStream {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// A job stream was idle for longer than the configured timeout.
    #[error("the job stream was idle for {after:?}; the peer is slow or gone")]
    JobTimeout {
        /// The idle timeout.
        after: Duration,
    },
    /// The peer closed a job stream without an end or error frame.
    #[error("the peer closed the job stream before its end frame")]
    JobStreamClosed,
    /// The peer sent a frame that does not decode or is out of order.
    #[error("the peer sent a malformed job frame: {0}")]
    MalformedFrame(String),
    /// The peer answered the job with the wrong protocol version.
    #[error("the peer speaks job wire version {got}, this node speaks {expected}")]
    ProtocolVersion {
        /// Our version.
        expected: u16,
        /// Theirs.
        got: u16,
    },
    /// An I/O error on a stream.
    #[error("stream I/O failed: {0}")]
    Io(#[from] io::Error),
    /// An attestation request failed.
    #[error("attestation request to {peer} failed: {reason}")]
    Attestation {
        /// The peer asked.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// A wait ran out of time (testing helpers).
    #[error("timed out after {after:?} waiting for {what}")]
    WaitTimeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// A wait for the mesh to converge ran out of time (testing helpers).
    #[error("{nodes} nodes did not converge within {after:?}")]
    ConvergenceTimeout {
        /// Mesh size.
        nodes: usize,
        /// How long we waited.
        after: Duration,
    },
}

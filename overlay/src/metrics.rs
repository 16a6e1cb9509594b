//! The overlay's Prometheus metrics: libp2p's own (`libp2p-metrics`:
//! connections, identify, Kademlia, gossipsub, ping, DCUtR) and silk's
//! gossip verdicts and peer count.
//!
//! The node registers them in its registry ([`OverlayMetrics::register`])
//! and puts them in [`crate::OverlayConfig::metrics`]; the overlay task
//! records every swarm event into them. Without them it records nothing.

use std::sync::Arc;

use libp2p::metrics::Recorder;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What a gossip message was judged.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GossipLabels {
    /// `announcement`, `reputation` or `unknown`.
    topic: &'static str,
    /// `accepted`, `forwarded`, `ignored` or `rejected`.
    verdict: &'static str,
    /// Why, for `ignored` and `rejected` (a short, fixed code).
    reason: &'static str,
}

/// The overlay's metrics, shared with the registry they are registered in.
#[derive(Clone)]
pub struct OverlayMetrics {
    libp2p: Arc<libp2p::metrics::Metrics>,
    gossip: Family<GossipLabels, Counter>,
    peers: Gauge,
}

impl std::fmt::Debug for OverlayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayMetrics").finish_non_exhaustive()
    }
}

impl OverlayMetrics {
    /// Registers libp2p's metrics under `libp2p_` and silk's overlay
    /// metrics under `silk_` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let libp2p = Arc::new(libp2p::metrics::Metrics::new(registry));
        let gossip = Family::<GossipLabels, Counter>::default();
        let peers = Gauge::default();
        let silk = registry.sub_registry_with_prefix("silk");
        silk.register(
            "gossip_messages",
            "Gossip messages received, by topic and by what validation judged them",
            gossip.clone(),
        );
        silk.register("peers", "Peers with at least one connection", peers.clone());
        Self {
            libp2p,
            gossip,
            peers,
        }
    }

    pub(crate) fn record<E>(&self, event: &E)
    where
        libp2p::metrics::Metrics: Recorder<E>,
    {
        self.libp2p.record(event);
    }

    pub(crate) fn gossip(&self, topic: &'static str, verdict: &'static str, reason: &'static str) {
        self.gossip
            .get_or_create(&GossipLabels {
                topic,
                verdict,
                reason,
            })
            .inc();
    }

    pub(crate) fn set_peers(&self, n: usize) {
        self.peers.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

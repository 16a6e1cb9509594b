//! The node's Prometheus metrics, served at `GET /metrics` in the
//! OpenMetrics text format, written with `prometheus-client` (the crate
//! rust-libp2p uses, so libp2p's own metrics join the same registry).
//!
//! Two kinds of values:
//! - *events*, counted where they happen ([`JobMetrics`]): jobs by role and
//!   outcome, their duration and time to first token, tokens, attestation
//!   verdicts; the overlay counts gossip verdicts, peers and libp2p's swarm
//!   events ([`silk_overlay::OverlayMetrics`]);
//! - *state*, read when Prometheus scrapes ([`StateCollector`]): the money
//!   in the payment books (earned, charged, redeemed, reserved) and the
//!   engine's load and the gateway's queue. Read from the books
//!   themselves, the money counters cannot drift from what the node's API
//!   reports, and they survive a restart as the books do.
//!
//! Names follow Prometheus's conventions: `silk_` prefix, base units
//! (`_seconds`, `_nanoton`), `_total` on counters.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::activity::JobRecord;
use crate::billing::Billing;
use crate::gateway::queue::JobQueue;

/// Which side of a job this node was on.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// It took the request from a caller and placed it on a worker.
    Gateway,
    /// It ran the job for a gateway.
    Worker,
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Worker => "worker",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    role: &'static str,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Counters of events, shared (cheaply cloned) by the services that count.
#[derive(Debug, Clone)]
pub struct JobMetrics {
    jobs: Family<JobLabels, Counter>,
    duration: Family<RoleLabels, Histogram>,
    first_token: Family<RoleLabels, Histogram>,
    generated: Family<RoleLabels, Counter>,
    prompt: Family<RoleLabels, Counter>,
    attestation: Family<ResultLabels, Counter>,
}

impl Default for JobMetrics {
    fn default() -> Self {
        Self {
            jobs: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.05, 2.0, 12))
            }),
            first_token: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 2.0, 12))
            }),
            generated: Family::default(),
            prompt: Family::default(),
            attestation: Family::default(),
        }
    }
}

impl JobMetrics {
    fn register(&self, silk: &mut Registry) {
        silk.register(
            "jobs",
            "Jobs by role (gateway: requests this node placed; worker: jobs it ran for other nodes) and outcome",
            self.jobs.clone(),
        );
        silk.register_with_unit(
            "job_duration",
            "Time from a request's arrival to its end",
            prometheus_client::registry::Unit::Seconds,
            self.duration.clone(),
        );
        silk.register_with_unit(
            "time_to_first_token",
            "Time from a request's arrival to its first token",
            prometheus_client::registry::Unit::Seconds,
            self.first_token.clone(),
        );
        silk.register(
            "generated_tokens",
            "Tokens generated, by role",
            self.generated.clone(),
        );
        silk.register(
            "prompt_tokens",
            "Prompt tokens, by role",
            self.prompt.clone(),
        );
        silk.register(
            "attestation_verdicts",
            "Appraisals of workers' attestation documents, by result",
            self.attestation.clone(),
        );
    }

    /// Counts a job that ended.
    pub fn job(&self, end: &JobRecord) {
        let role = end.role.as_str();
        self.jobs
            .get_or_create(&JobLabels {
                role,
                outcome: end.outcome.clone(),
            })
            .inc();
        let labels = RoleLabels { role };
        self.duration
            .get_or_create(&labels)
            .observe(end.duration_ms as f64 / 1000.0);
        if let Some(t) = end.first_token_ms {
            self.first_token
                .get_or_create(&labels)
                .observe(t as f64 / 1000.0);
        }
        self.generated
            .get_or_create(&labels)
            .inc_by(u64::from(end.completion_tokens));
        self.prompt
            .get_or_create(&labels)
            .inc_by(u64::from(end.prompt_tokens));
    }

    /// Counts an appraisal: `accepted`, `rejected` or `unreachable` (no
    /// document came).
    pub fn attestation(&self, result: &'static str) {
        self.attestation
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Jobs counted so far for `role`, by outcome (what `/v1/status`
    /// reports: the same numbers `/metrics` serves).
    pub fn jobs_by_outcome(&self, role: Role) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        for outcome in OUTCOMES {
            let n = self
                .jobs
                .get(&JobLabels {
                    role: role.as_str(),
                    outcome: (*outcome).to_string(),
                })
                .map_or(0, |c| c.get());
            if n > 0 {
                out.push((*outcome, n));
            }
        }
        out
    }
}

/// Every outcome label a job can get: `ok`, `failed`, `cancelled`, and the
/// API's refusal codes.
pub const OUTCOMES: &[&str] = &[
    "ok",
    "failed",
    "cancelled",
    "refused",
    "model_required",
    "model_not_found",
    "insecure_workers_refused",
    "attestation_refused",
    "workers_saturated",
    "queue_full",
    "price_above_max_coefficient",
    "invalid_request",
    "context_length_exceeded",
    "workers_busy",
    "payment_failed",
    "worker_timeout",
    "no_worker_available",
];

/// The node's registry, with the event counters in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs: JobMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with silk's job counters; the overlay's and the state
    /// collector are added by the node as it starts.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let jobs = JobMetrics::default();
        jobs.register(registry.sub_registry_with_prefix("silk"));
        Self { registry, jobs }
    }

    /// The registry, to add metrics to while the node starts.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The event counters.
    pub fn jobs(&self) -> &JobMetrics {
        &self.jobs
    }

    /// Everything, in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Reads the node's state when Prometheus scrapes.
#[derive(Debug)]
pub struct StateCollector {
    /// The payment books, on a node with payments.
    pub billing: Option<Arc<Billing>>,
    /// The engine, on a worker.
    pub engine: Option<silk_inference::Engine>,
    /// The gateway's queue of requests waiting for a slot.
    pub queue: Arc<JobQueue>,
}

/// Totals from the payment books, in nanoTON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MoneyTotals {
    /// Cheques taken as a worker (what gateways owe it).
    pub earned: u64,
    /// Of those, redeemed on chain.
    pub redeemed: u64,
    /// Cheques signed as a gateway (what it owes workers).
    pub charged: u64,
    /// Held for jobs under way as a gateway.
    pub reserved: u64,
}

impl MoneyTotals {
    /// Reads the books (zeros where a book cannot be read).
    pub fn of(billing: &Billing) -> Self {
        let p = billing.payments();
        let lanes = p.client_book().lanes().unwrap_or_default();
        let held = p.worker_book().lanes().unwrap_or_default();
        let sum = |it: &mut dyn Iterator<Item = silk_chain::Coins>| {
            it.fold(0u64, |a, c| {
                a.saturating_add(u64::try_from(c.nano()).unwrap_or(u64::MAX))
            })
        };
        Self {
            earned: sum(&mut held.iter().map(|l| l.cheque_total())),
            redeemed: sum(&mut held.iter().map(|l| l.redeemed)),
            charged: sum(&mut lanes.iter().map(|l| l.signed)),
            reserved: sum(&mut lanes.iter().map(|l| l.reserved)),
        }
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(billing) = &self.billing {
            let m = MoneyTotals::of(billing);
            counter(
                &mut encoder,
                "earned_nanoton",
                "nanoTON in cheques this node took as a worker",
                m.earned,
            )?;
            counter(
                &mut encoder,
                "redeemed_nanoton",
                "nanoTON of those cheques redeemed on chain",
                m.redeemed,
            )?;
            counter(
                &mut encoder,
                "charged_nanoton",
                "nanoTON in cheques this node signed as a gateway",
                m.charged,
            )?;
            gauge(
                &mut encoder,
                "reserved_nanoton",
                "nanoTON reserved for jobs under way as a gateway",
                i64::try_from(m.reserved).unwrap_or(i64::MAX),
            )?;
        }
        if let Some(engine) = &self.engine {
            let load = engine.load();
            let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            gauge(
                &mut encoder,
                "engine_batch_in_use",
                "Requests in the engine's batch",
                as_i64(load.active),
            )?;
            gauge(
                &mut encoder,
                "engine_batch_size",
                "Batch slots of the engine",
                as_i64(load.max_batch),
            )?;
            gauge(
                &mut encoder,
                "engine_queue_depth",
                "Requests waiting for a batch slot in the engine",
                as_i64(load.queued),
            )?;
            gauge(
                &mut encoder,
                "engine_prefix_cache_bytes",
                "Bytes of keys and values the engine's prefix cache holds",
                as_i64(load.prefix_cache_bytes),
            )?;
            counter(
                &mut encoder,
                "engine_cached_prompt_tokens",
                "Prompt tokens read from the prefix cache instead of computed",
                load.cached_tokens,
            )?;
            let tps = ConstGauge::new(load.decode_tokens_per_s);
            tps.encode(encoder.encode_descriptor(
                "engine_decode_tokens_per_second",
                "Recent aggregate decode speed of the engine",
                None,
                MetricType::Gauge,
            )?)?;
        }
        gauge(
            &mut encoder,
            "gateway_queue_depth",
            "Requests waiting at this gateway for a free worker slot",
            i64::try_from(self.queue.waiting()).unwrap_or(i64::MAX),
        )?;
        Ok(())
    }
}

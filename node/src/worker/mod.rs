//! The worker: the engine serving one model, the announcer that tells the
//! mesh about it, and the side of a job stream that runs jobs
//! ([`serve`]). Its attestation document ([`attest`]) is every node's,
//! worker or not.
//!
//! The announcer re-announces load every [`ANNOUNCE_EVERY`] and within
//! [`ANNOUNCE_POLL`] of a load change, no more than once per
//! [`ANNOUNCE_MIN_GAP`] (the mesh's per-author rate), and stops announcing (the last
//! announcement then expires) once the engine has stopped (audit F19).

pub mod attest;
pub mod serve;

use std::sync::Arc;
use std::time::{Duration, Instant};

use silk_inference::{Engine, EngineConfig, Event, ModelStore};
use silk_overlay::{Announcement, OverlayHandle};
use tokio_util::sync::CancellationToken;

use crate::billing::Billing;
use crate::node::NodeOptions;
use crate::{now_ms, MeshError};

pub use attest::OwnAttestation;
pub use serve::{serve_stream, submit_off_runtime, WorkerContext};

/// How often a worker re-announces even when nothing changed.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);
/// How often a worker looks for load changes to announce.
pub const ANNOUNCE_POLL: Duration = Duration::from_millis(250);
/// Shortest gap between two announcements. Peers take one announcement
/// per author per `gossip_rate_period` (1 s) past a burst of 8 and ignore
/// the rest, so a worker whose load changed four times a second had its
/// latest load ignored as often as not, and that stale load stood until the
/// next change or [`ANNOUNCE_EVERY`]. Paced to the limit, the latest load
/// always goes out, at most this long after it changed.
pub const ANNOUNCE_MIN_GAP: Duration = Duration::from_secs(1);

/// Whether the announcer sends now: the load changed and the last
/// announcement is at least [`ANNOUNCE_MIN_GAP`] old, or it is
/// [`ANNOUNCE_EVERY`] old whatever changed. A change it holds back is sent
/// at the first poll past the gap (it is still a change then).
fn announce_now(changed: bool, since_last: Duration) -> bool {
    since_last >= ANNOUNCE_EVERY || (changed && since_last >= ANNOUNCE_MIN_GAP)
}
/// Lifetime of one announcement.
const ANNOUNCE_TTL: Duration = Duration::from_secs(45);

/// What the served model is.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// `name@sha256:…`.
    pub id: String,
    /// Human name.
    pub name: String,
}

/// The engine, loaded and measured.
#[derive(Debug)]
pub struct LoadedEngine {
    engine: Engine,
    model: ServedModel,
    tokens_per_s_milli: u64,
}

impl LoadedEngine {
    /// Loads `model` (a name or a path in `options.models_dir`) on
    /// `options.device` and measures its decode speed with a short
    /// generation.
    pub async fn load(model: &str, options: &NodeOptions) -> Result<Self, MeshError> {
        let store = ModelStore::new(&options.models_dir);
        let source = store.resolve(model).map_err(|e| match e {
            silk_inference::InferenceError::ModelNotFound(_) => MeshError::ModelMissing {
                model: model.to_string(),
                dir: options.models_dir.clone(),
            },
            other => MeshError::Inference(other),
        })?;
        let served = ServedModel {
            id: source.id.clone(),
            name: source.name.clone(),
        };
        let (device, dtype) = (options.device, options.dtype);
        let engine = tokio::task::spawn_blocking(move || {
            silk_inference::backend::start_engine(source, device, dtype, EngineConfig::default())
        })
        .await
        .map_err(|e| MeshError::Config {
            path: options.models_dir.clone(),
            reason: format!("engine task failed: {e}"),
        })??;
        let tokens_per_s_milli = measure_decode_speed(&engine).await;
        tracing::info!(model = %served.id, tokens_per_s = tokens_per_s_milli as f64 / 1000.0, "engine ready");
        Ok(Self {
            engine,
            model: served,
            tokens_per_s_milli,
        })
    }

    /// The served model.
    pub fn model(&self) -> &ServedModel {
        &self.model
    }
}

/// A worker: its engine, its price, and what it announces.
#[derive(Debug)]
pub struct WorkerService {
    loaded: LoadedEngine,
    price_milli: u64,
    overlay: OverlayHandle,
    billing: Option<Arc<Billing>>,
    attestation: Arc<OwnAttestation>,
}

impl WorkerService {
    /// A worker serving `loaded` at `price_milli` (× 1000), announcing
    /// through `overlay` with the digest of `attestation`, and paid
    /// through `billing` when it charges.
    pub fn new(
        loaded: LoadedEngine,
        price_milli: u64,
        overlay: OverlayHandle,
        billing: Option<Arc<Billing>>,
        attestation: Arc<OwnAttestation>,
    ) -> Self {
        Self {
            loaded,
            price_milli,
            overlay,
            billing,
            attestation,
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.loaded.engine
    }

    /// The served model.
    pub fn model(&self) -> &ServedModel {
        &self.loaded.model
    }

    /// The price coefficient it charges, × 1000.
    pub fn price_milli(&self) -> u64 {
        self.price_milli
    }

    /// This worker's announcement now, numbered `seq`.
    fn announcement(&self, seq: u64) -> Announcement {
        let engine = &self.loaded.engine;
        let load = engine.load();
        let busy = (load.active + load.queued) as u32;
        Announcement {
            peer_id: self.overlay.local_peer_id(),
            models: vec![self.loaded.model.id.clone()],
            context_windows: vec![u32::try_from(engine.context_length()).unwrap_or(u32::MAX)],
            free_slots: (load.max_batch as u32).saturating_sub(busy),
            queue_depth: load.queued as u32,
            decode_tokens_per_s_milli: self.loaded.tokens_per_s_milli,
            price_coefficient_milli: self.price_milli,
            attestation_mode: self.attestation.mode(),
            attestation_digest: Some(self.attestation.digest()),
            seq,
            expires_at_ms: now_ms() + ANNOUNCE_TTL.as_millis() as u64,
            payout: self.billing.as_ref().map(|b| b.payout().to_raw()),
            // The overlay puts its coordinate in when it publishes.
            coordinate: None,
        }
    }

    /// Announces this worker until `cancel` fires or the engine stops;
    /// `announced` is given each announcement the overlay took (the node
    /// puts it in its own gateway's table).
    #[tracing::instrument(name = "announcer", skip_all)]
    pub async fn announcer(
        self: Arc<Self>,
        cancel: CancellationToken,
        announced: impl Fn(Announcement) + Send + 'static,
    ) {
        // Sequence numbers must grow across restarts too: start at the clock.
        let mut seq = now_ms();
        let mut last: Option<(u32, u32)> = None;
        let mut last_sent = Instant::now();
        let mut tick = tokio::time::interval(ANNOUNCE_POLL);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.loaded.engine.is_running() {
                // Announcing a dead engine would draw jobs that all fail
                // (audit F19); the last announcement expires on its own.
                tracing::error!(
                    "the engine stopped; this node no longer announces itself as a worker"
                );
                return;
            }
            seq += 1;
            let a = self.announcement(seq);
            let key = (a.free_slots, a.queue_depth);
            if last.is_some() && !announce_now(last != Some(key), last_sent.elapsed()) {
                continue;
            }
            match self.overlay.announce(a.clone()).await {
                Ok(()) => {
                    announced(a);
                    last = Some(key);
                    last_sent = Instant::now();
                }
                Err(silk_overlay::OverlayError::Stopped) => return,
                Err(e) => tracing::warn!(error = %e, "announcement failed"),
            }
        }
    }
}

/// Runs a short generation and returns its decode speed (tokens/s × 1000).
async fn measure_decode_speed(engine: &Engine) -> u64 {
    let mut request = silk_inference::GenerateRequest::new(
        silk_inference::Prompt::Text("The quick brown fox".into()),
        16,
    );
    request.ignore_eos = true;
    let Ok(mut stream) = engine.submit(request) else {
        return 0;
    };
    while let Some(event) = stream.next().await {
        match event {
            Event::Done(u) => return (u.decode_tokens_per_s.max(0.0) * 1000.0) as u64,
            Event::Error(_) => return 0,
            Event::Token { .. } | Event::PromptLogprobs(_) => {}
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Load changing every poll for 10.5 s: the announcer sends at most one
    /// announcement per [`ANNOUNCE_MIN_GAP`], and the last change, made
    /// between two sends, still goes out within the gap (trailing edge)
    /// rather than at [`ANNOUNCE_EVERY`].
    #[test]
    fn a_busy_worker_announces_once_a_second_and_never_drops_its_last_load() {
        let mut since_last = Duration::ZERO;
        let mut sent = 0u32;
        let mut pending = false;
        let polls = (Duration::from_millis(10_500).as_millis() / ANNOUNCE_POLL.as_millis()) as u32;
        let mut last_change_sent_after = None;
        for poll in 0..polls + 8 {
            // The load changes at every poll for 10.5 s, then stays put.
            pending |= poll < polls;
            since_last += ANNOUNCE_POLL;
            if announce_now(pending, since_last) {
                sent += 1;
                if pending && poll >= polls - 1 {
                    last_change_sent_after = Some((poll + 1 - polls) * 250);
                }
                pending = false;
                since_last = Duration::ZERO;
            }
        }
        assert!(!pending, "the last load change was never announced");
        assert_eq!(
            sent, 11,
            "announcements in 10.5 s of changes: one per second expected"
        );
        let after = last_change_sent_after.expect("the last change went out");
        assert!(
            u128::from(after) <= ANNOUNCE_MIN_GAP.as_millis(),
            "the last change went out {after} ms after it was made"
        );
        // Nothing changed: only the periodic re-announcement.
        assert!(!announce_now(false, ANNOUNCE_EVERY - ANNOUNCE_POLL));
        assert!(announce_now(false, ANNOUNCE_EVERY));
        assert!(!announce_now(true, ANNOUNCE_MIN_GAP - ANNOUNCE_POLL));
    }
}

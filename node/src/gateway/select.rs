//! The candidates for one request: the workers serving its model (from the
//! worker table, and from DHT provider records when gossip knows fewer
//! than two), those whose context window fits it, then [`select`]: the
//! pure policy over what was checked (attestation verdicts, price, this
//! gateway's per-worker cap), ranked by [`routing::rank`].

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use silk_overlay::{Announcement, AttestationMode, PeerId};

use super::context;
use super::routing::{self, Candidate};
use super::{DispatchError, Gateway};
use crate::attest::{self, AttestationDocument};
use crate::now_ms;
use crate::protocol::JobRequest;
use crate::reputation::Scores;

/// A worker that failed a job, or was busy, is ranked last for this long.
pub(crate) const FAILURE_MEMORY: Duration = Duration::from_secs(30);
/// How long a DHT provider lookup for a model is reused. The DHT is the
/// fallback when gossip knows fewer than two workers for a model; asking it
/// on every request added its round trips (about 2 ms on loopback) to
/// every job of a small mesh.
const DHT_LOOKUP_REUSE: Duration = crate::worker::ANNOUNCE_EVERY;
/// Every attestation check of one request's candidates ends within this.
pub(crate) const ATTESTATION_CHECKS: Duration = Duration::from_secs(5);

/// A worker that serves the model, with this node's RTT to it and the
/// attestation policy's verdict (`Err` says why it was refused).
pub type Checked = (Announcement, Option<Duration>, Result<(), String>);

/// What this gateway knows of the workers besides their announcements.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    /// Its jobs running on each worker.
    pub in_flight: HashMap<PeerId, u32>,
    /// Workers that failed or were busy within [`FAILURE_MEMORY`].
    pub recently_failed: HashSet<PeerId>,
    /// Reputation scores (0.5 for a worker not in it).
    pub reputation: std::sync::Arc<Scores>,
}

/// The limits a request is placed under.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// The most a worker's coefficient may be, × 1000.
    pub max_coefficient_milli: u32,
    /// The most jobs this gateway runs on one worker.
    pub max_jobs_per_worker: u32,
}

/// The workers `request` may be placed on, best first: those the
/// attestation policy accepted, at most the caller's price, under this
/// gateway's cap. When none is left the error names the first filter that
/// emptied the list: attestation (insecure workers only, or a policy
/// refusal), then price, then the cap.
pub fn select(
    model: &str,
    checked: Vec<Checked>,
    standing: &Standing,
    caps: Caps,
    request: &JobRequest,
) -> Result<Vec<Candidate>, DispatchError> {
    let mut refused = Vec::new();
    let mut only_insecure_refused = true;
    let mut out = Vec::new();
    for (a, rtt, verdict) in checked {
        if let Err(reason) = verdict {
            refused.push(format!("{}: {reason}", a.peer_id));
            only_insecure_refused &= a.attestation_mode == AttestationMode::Insecure;
            continue;
        }
        let in_flight = standing.in_flight.get(&a.peer_id).copied().unwrap_or(0);
        let recently_failed = standing.recently_failed.contains(&a.peer_id);
        let reputation = standing.reputation.get(&a.peer_id).copied().unwrap_or(0.5);
        out.push(Candidate::from_announcement(
            a,
            rtt,
            in_flight,
            recently_failed,
            reputation,
        ));
    }
    if out.is_empty() {
        let message = format!(
            "every worker serving `{model}` was refused by this gateway's attestation policy ({}); {}",
            refused.join("; "),
            if only_insecure_refused {
                "insecure workers let their operator read prompts: start the gateway with --allow-insecure-workers to use them anyway"
            } else {
                "check the policy file"
            }
        );
        return Err(if only_insecure_refused {
            DispatchError::InsecureRefused(message)
        } else {
            DispatchError::AttestationRefused(message)
        });
    }
    let cheapest = out.iter().map(|c| c.price_milli).min().unwrap_or(0);
    out.retain(|c| c.price_milli <= u64::from(caps.max_coefficient_milli));
    if out.is_empty() {
        return Err(DispatchError::TooExpensive {
            model: model.to_string(),
            cheapest_milli: cheapest,
            max_milli: caps.max_coefficient_milli,
        });
    }
    out.retain(|c| c.in_flight < caps.max_jobs_per_worker);
    if out.is_empty() {
        return Err(DispatchError::Saturated(model.to_string()));
    }
    Ok(routing::rank(
        out,
        request.estimated_prompt_tokens(),
        u64::from(request.max_tokens),
    ))
}

impl Gateway {
    /// Candidates for `model`, attestation-filtered and ranked.
    pub(crate) async fn candidates(
        &self,
        model: &str,
        request: &JobRequest,
        max_coefficient_milli: u32,
        exclude: &[PeerId],
    ) -> Result<Vec<Candidate>, DispatchError> {
        let mut raw: Vec<(Announcement, Option<Duration>)> = self
            .workers
            .read()
            .map(|t| t.serving(model, now_ms(), self.me, exclude))
            .unwrap_or_default();
        if raw.len() < 2 {
            let found = self.dht_candidates_reused(model, &raw).await;
            raw.extend(
                found
                    .into_iter()
                    .filter(|a| !exclude.contains(&a.peer_id))
                    .map(|a| (a, None)),
            );
        }
        if raw.is_empty() {
            return Err(DispatchError::UnknownModel(model.to_string()));
        }
        self.fit_context(model, request, &mut raw).await?;
        // Every candidate's attestation is checked at once, under one
        // deadline (audit F12: one at a time, N silent Sybils cost N × 10 s
        // per request). A peer that did not answer is remembered.
        let deadline = tokio::time::Instant::now() + ATTESTATION_CHECKS;
        let verdicts = futures::future::join_all(raw.iter().map(|(a, _)| async move {
            match tokio::time::timeout_at(deadline, self.check_attestation(a)).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(digest) = a.attestation_digest {
                        self.note_unanswered(a.peer_id, digest);
                    }
                    Err("attestation check did not finish in time".into())
                }
            }
        }))
        .await;
        let checked = raw
            .into_iter()
            .zip(verdicts)
            .map(|((a, rtt), v)| (a, rtt, v))
            .collect();
        let standing = Standing {
            in_flight: self.in_flight.lock().map(|m| m.clone()).unwrap_or_default(),
            recently_failed: self
                .failures
                .lock()
                .map(|m| {
                    m.iter()
                        .filter(|(_, t)| t.elapsed() < FAILURE_MEMORY)
                        .map(|(p, _)| *p)
                        .collect()
                })
                .unwrap_or_default(),
            reputation: self.reputation.scores(),
        };
        let caps = Caps {
            max_coefficient_milli,
            max_jobs_per_worker: self.max_jobs_per_worker,
        };
        select(model, checked, &standing, caps, request)
    }

    /// Drops the workers whose context window the request does not fit;
    /// fails when that leaves none. What this gateway can judge itself: a
    /// request that fits no announced window is the caller's error (issue
    /// 11, audit F11).
    async fn fit_context(
        &self,
        model: &str,
        request: &JobRequest,
        raw: &mut Vec<(Announcement, Option<Duration>)>,
    ) -> Result<(), DispatchError> {
        if raw.iter().all(|(a, _)| a.context_window(model).is_none()) {
            return Ok(());
        }
        let max_tokens = request.max_tokens.max(1);
        let windows = raw.iter().filter_map(|(a, _)| a.context_window(model));
        let (smallest, window) = windows.fold((u32::MAX, 0), |(lo, hi), w| (lo.min(w), hi.max(w)));
        // The byte bound is never below the true count: when it fits
        // every window, the prompt is not tokenized here at all.
        let prompt_tokens = if request.prompt_tokens_bound() < u64::from(smallest) {
            None
        } else {
            self.prompt_counter
                .count(model, request.to_generate().prompt)
                .await
                .map(|p| p + request.continuation.len() as u64)
        };
        raw.retain(|(a, _)| {
            a.context_window(model)
                .is_none_or(|w| context::fits(w, prompt_tokens, max_tokens))
        });
        if raw.is_empty() {
            return Err(DispatchError::ContextLengthExceeded {
                model: model.to_string(),
                window,
                prompt_tokens,
                max_tokens,
            });
        }
        Ok(())
    }

    /// Workers found through provider records that gossip does not know:
    /// their attestation document tells their mode; load is unknown.
    /// [`Gateway::dht_candidates`], asked at most once per
    /// [`DHT_LOOKUP_REUSE`] per model once a lookup has found providers; in
    /// between, that lookup's workers that gossip does not know now.
    async fn dht_candidates_reused(
        &self,
        model: &str,
        known: &[(Announcement, Option<Duration>)],
    ) -> Vec<Announcement> {
        let fresh = self.dht_lookups.lock().ok().and_then(|lookups| {
            lookups
                .get(model)
                .filter(|(at, _)| at.elapsed() < DHT_LOOKUP_REUSE)
                .map(|(_, found)| found.clone())
        });
        let found = match fresh {
            Some(found) => found,
            None => match self.dht_candidates(model, known).await {
                Some(found) => {
                    if let Ok(mut lookups) = self.dht_lookups.lock() {
                        lookups.insert(model.to_string(), (Instant::now(), found.clone()));
                    }
                    found
                }
                // Nothing to reuse: a node whose DHT is still filling asks
                // again on the next request.
                None => Vec::new(),
            },
        };
        found
            .into_iter()
            .filter(|a| known.iter().all(|(k, _)| k.peer_id != a.peer_id))
            .collect()
    }

    /// Workers the DHT lists as providers of `model` that `known` lacks,
    /// described from their attestation documents; `None` when the lookup
    /// failed or found no provider at all.
    async fn dht_candidates(
        &self,
        model: &str,
        known: &[(Announcement, Option<Duration>)],
    ) -> Option<Vec<Announcement>> {
        let providers = match tokio::time::timeout(
            Duration::from_secs(5),
            self.overlay.get_providers(model.as_bytes()),
        )
        .await
        {
            Ok(Ok(p)) if !p.is_empty() => p,
            _ => return None,
        };
        let mut out = Vec::new();
        for peer in providers {
            if peer == self.me || known.iter().any(|(a, _)| a.peer_id == peer) {
                continue;
            }
            let Ok(Ok(bytes)) = tokio::time::timeout(
                Duration::from_secs(5),
                self.overlay.fetch_attestation(peer, Vec::new()),
            )
            .await
            else {
                continue;
            };
            let Ok(doc) = AttestationDocument::decode(&bytes) else {
                continue;
            };
            if !doc.claims.models.iter().any(|m| m == model) {
                continue;
            }
            out.push(Announcement {
                peer_id: peer,
                models: doc.claims.models.clone(),
                // The attestation document does not say; the worker judges.
                context_windows: Vec::new(),
                free_slots: 1,
                queue_depth: 0,
                decode_tokens_per_s_milli: 0,
                price_coefficient_milli: 1000,
                attestation_mode: match doc.mode {
                    attest::AttestationMode::Tdx => AttestationMode::Tdx,
                    attest::AttestationMode::Insecure => AttestationMode::Insecure,
                },
                attestation_digest: Some(doc.digest().0),
                seq: 0,
                expires_at_ms: now_ms(),
                payout: None,
                coordinate: None,
            });
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::test_peer as peer;
    use crate::protocol::WirePrompt;

    fn worker(n: u8, mode: AttestationMode, price_milli: u64) -> Announcement {
        Announcement {
            peer_id: peer(n),
            models: vec!["m@sha256:00".into()],
            context_windows: vec![2048],
            free_slots: 4,
            queue_depth: 0,
            decode_tokens_per_s_milli: 50_000,
            price_coefficient_milli: price_milli,
            attestation_mode: mode,
            attestation_digest: Some([n; 32]),
            seq: 1,
            expires_at_ms: u64::MAX,
            payout: None,
            coordinate: None,
        }
    }

    fn request() -> JobRequest {
        JobRequest {
            model: "m@sha256:00".into(),
            prompt: WirePrompt::Text("hello".into()),
            max_tokens: 16,
            sampling: silk_inference::SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            payment: None,
            continuation: Vec::new(),
            logprobs: None,
            constraint: None,
            prompt_logprobs: None,
        }
    }

    const CAPS: Caps = Caps {
        max_coefficient_milli: 1_000,
        max_jobs_per_worker: 2,
    };

    fn accepted(a: Announcement) -> Checked {
        (a, None, Ok(()))
    }

    fn refused(a: Announcement) -> Checked {
        (a, None, Err("no".into()))
    }

    fn ids(out: &[Candidate]) -> Vec<PeerId> {
        out.iter().map(|c| c.peer).collect()
    }

    #[test]
    fn the_error_names_the_first_filter_that_left_no_worker() {
        let tdx = AttestationMode::Tdx;
        let insecure = AttestationMode::Insecure;
        let none = Standing::default();
        let select = |checked: Vec<Checked>, standing: &Standing| {
            select("m@sha256:00", checked, standing, CAPS, &request())
        };
        // Only insecure workers, all refused: the operator can allow them.
        let e =
            select(vec![refused(worker(1, insecure, 1_000))], &none).expect_err("no worker left");
        assert!(
            matches!(e, DispatchError::InsecureRefused(ref m) if m.contains("--allow-insecure-workers")),
            "{e}"
        );
        // A TDX worker among the refused: the policy refused it.
        let e = select(
            vec![
                refused(worker(1, insecure, 1_000)),
                refused(worker(2, tdx, 1_000)),
            ],
            &none,
        )
        .expect_err("no worker left");
        assert!(matches!(e, DispatchError::AttestationRefused(_)), "{e}");
        // Attestation comes before price: a cheap refused worker and an
        // accepted one too dear are "too expensive", naming the cheapest
        // accepted coefficient.
        let e = select(
            vec![
                refused(worker(1, tdx, 500)),
                accepted(worker(2, tdx, 3_000)),
            ],
            &none,
        )
        .expect_err("no worker left");
        assert!(
            matches!(
                e,
                DispatchError::TooExpensive {
                    cheapest_milli: 3_000,
                    max_milli: 1_000,
                    ..
                }
            ),
            "{e}"
        );
        // Price comes before the cap: a worker at the cap and one too dear
        // is "saturated" only when every affordable worker is at the cap.
        let mut busy = Standing::default();
        busy.in_flight.insert(peer(1), 2);
        let e = select(
            vec![
                accepted(worker(1, tdx, 1_000)),
                accepted(worker(2, tdx, 3_000)),
            ],
            &busy,
        )
        .expect_err("no worker left");
        assert!(matches!(e, DispatchError::Saturated(_)), "{e}");
        // Below the cap the worker is a candidate, its jobs in flight known.
        busy.in_flight.insert(peer(1), 1);
        let out = select(vec![accepted(worker(1, tdx, 1_000))], &busy).expect("one");
        assert_eq!(ids(&out), vec![peer(1)]);
        assert_eq!(out[0].in_flight, 1);
    }

    #[test]
    fn what_the_gateway_knows_of_a_worker_reaches_its_ranking() {
        let tdx = AttestationMode::Tdx;
        let checked = || {
            vec![
                accepted(worker(1, tdx, 1_000)),
                accepted(worker(2, tdx, 1_000)),
            ]
        };
        let mut standing = Standing::default();
        // Equal workers: a recent failure ranks its worker last.
        standing.recently_failed.insert(peer(1));
        let out = select("m@sha256:00", checked(), &standing, CAPS, &request()).expect("two");
        assert_eq!(ids(&out), vec![peer(2), peer(1)]);
        assert!(out[1].recently_failed);
        // A poor reputation does too; a worker not in the scores has the
        // prior, 0.5.
        let standing = Standing {
            reputation: std::sync::Arc::new([(peer(2), 0.05)].into_iter().collect()),
            ..Standing::default()
        };
        let out = select("m@sha256:00", checked(), &standing, CAPS, &request()).expect("two");
        assert_eq!(ids(&out), vec![peer(1), peer(2)]);
        assert_eq!((out[0].reputation, out[1].reputation), (0.5, 0.05));
    }
}

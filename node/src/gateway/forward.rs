//! One job on one worker, and the relay that makes the attempts one
//! stream for the caller.
//!
//! [`Gateway::place`] tries the ranked candidates in turn while no token has
//! arrived; an attempt on a remote worker forwards its frames, checked by
//! [`Delivery`] (only tokens with text, never past `max_tokens`), into a
//! bounded channel, and settles the job when it ends. The relay forwards
//! those events to the caller; when the worker fails after delivering
//! tokens it places the rest of the job on another worker (failover).
//! Dropping an attempt's receiver drops the job stream, which resets it
//! and so cancels the job on the worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

use silk_inference::Event;
use silk_overlay::{AttestationMode, JobFrame, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::error::{AttemptError, Attempts, Blame, DispatchError};
use super::pay::PaidJob;
use super::select::FAILURE_MEMORY;
use super::{Gateway, JobEvent};
use crate::activity::JobRecord;
use crate::api::keys::SpendHold;
use crate::billing::Delivery;
use crate::metrics::Role;
use crate::protocol::{self, JobMessage, JobRequest, JobUsage, TokenChunk};

/// Tokens buffered between a worker's stream and the HTTP response.
pub(crate) const JOB_CHANNEL: usize = 64;
/// Candidates tried before giving up.
const MAX_ATTEMPTS: usize = 4;
/// Workers a job may go on on after the first failed midway.
const MAX_CONTINUATIONS: usize = 2;
/// The slowest average decode a job's deadline allows, seconds per token:
/// a job must end within the progress timeout plus this per `max_tokens`.
const SECONDS_PER_TOKEN_AT_WORST: u32 = 2;
/// Most workers remembered as recently failed.
const FAILURES_MAX: usize = 4096;

/// A job running on one worker.
pub(crate) struct Attempt {
    /// Its events; dropping them ends the job.
    events: mpsc::Receiver<JobEvent>,
    /// What it cost this gateway, sent once its task has settled it
    /// (`None`: settling failed).
    cost: oneshot::Receiver<Option<silk_chain::Coins>>,
}

/// One of this gateway's jobs on a worker, counted while it lives.
struct InFlight {
    map: Arc<Mutex<HashMap<PeerId, u32>>>,
    peer: PeerId,
    /// Told when the slot frees, so queued requests retry.
    queue: Arc<super::queue::JobQueue>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut map) = self.map.lock() {
            if let Some(n) = map.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.peer);
                }
            }
        }
        self.queue.slot_freed();
    }
}

impl Gateway {
    /// Places `request` on the best candidate not in `exclude` (`prefer`
    /// first when it is a candidate at all), trying the next while no token
    /// has arrived; returns the worker, its attestation mode and the
    /// running attempt.
    pub(crate) async fn place(
        &self,
        request: &JobRequest,
        max_coefficient: u32,
        exclude: &[PeerId],
        prefer: Option<PeerId>,
    ) -> Result<(PeerId, AttestationMode, Attempt), DispatchError> {
        let mut candidates = self
            .candidates(&request.model, request, max_coefficient, exclude)
            .await?;
        if let Some(at) = prefer.and_then(|p| candidates.iter().position(|c| c.peer == p)) {
            let preferred = candidates.remove(at);
            candidates.insert(0, preferred);
        }
        let mut attempts = Vec::new();
        for c in candidates.into_iter().take(MAX_ATTEMPTS) {
            let local = c.peer == self.me;
            let mut paid = match (&self.billing, &c.payout, local) {
                (Some(billing), Some(payout), false) => {
                    match self
                        .prepare_payment(billing, &c, payout, max_coefficient, request)
                        .await
                    {
                        Ok(p) => Some(p),
                        Err(e) => {
                            tracing::info!(worker = %c.peer, error = %e, "cannot pay this worker; trying the next");
                            attempts.push((c.peer, AttemptError::Payment(e)));
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let slot = self.take_slot(c.peer);
            let attempt = if local {
                self.run_local(request, slot).await
            } else {
                self.run_remote(request, c.peer, slot, &mut paid).await
            };
            match attempt {
                Ok(attempt) => return Ok((c.peer, c.mode, attempt)),
                Err(e) => {
                    if let Some(p) = paid.take() {
                        p.release().await;
                    }
                    // Only a fault of the worker counts against it (audit
                    // F11): a request the caller got wrong, or a frame this
                    // gateway could not send, says nothing about the worker.
                    match e.blame() {
                        Blame::Caller => {
                            tracing::info!(worker = %c.peer, error = %e, "the worker refused the request as invalid");
                            return Err(DispatchError::InvalidRequest(e.reason().to_string()));
                        }
                        Blame::Worker => {
                            tracing::info!(worker = %c.peer, error = %e, "worker failed before the first token; trying the next");
                            self.note_failure(c.peer);
                            self.reputation.record(c.peer, false).await;
                        }
                        Blame::Busy => {
                            tracing::info!(worker = %c.peer, error = %e, "worker busy; trying the next");
                            self.note_failure(c.peer);
                        }
                        Blame::Nobody => {
                            tracing::info!(worker = %c.peer, error = %e, "attempt failed without the worker's fault; trying the next");
                        }
                    }
                    attempts.push((c.peer, e));
                }
            }
        }
        Err(DispatchError::AllFailed(Attempts(attempts)))
    }

    /// Forwards a job's events to the caller and settles the caller's
    /// API-key spending with what the job cost in all. When the worker
    /// fails after delivering tokens, and tokens are still owed, the job
    /// goes on on another worker for the same model id: the prompt plus
    /// every token delivered so far, for the rest of `max_tokens`. Each
    /// worker is paid for what it produced (its own attempt settles it),
    /// the caller sees one stream, and its usage counts the original prompt
    /// and every token it got. A request with stop strings is not continued
    /// (text a worker held back as a possible stop string never reached the
    /// caller, so the seam would lose it): it fails as before. `placed` is
    /// the first worker and its attempt; `started`, when the request came
    /// (for the job's record).
    pub(crate) async fn relay(
        self: Arc<Self>,
        mut request: JobRequest,
        max_coefficient: u32,
        placed: (PeerId, Attempt),
        spend: Option<SpendHold>,
        tx: mpsc::Sender<JobEvent>,
        started: Instant,
    ) {
        let (first, mut attempt) = placed;
        let max_tokens = request.max_tokens;
        let mut first_token: Option<Duration> = None;
        let model = request.model.clone();
        let mut delivered: Vec<u32> = Vec::new();
        let mut total = Some(silk_chain::Coins::ZERO);
        let mut tried = vec![first];
        loop {
            let end = loop {
                let event = tokio::select! {
                    biased;
                    () = tx.closed() => break RelayEnd::CallerGone,
                    e = attempt.events.recv() => e,
                };
                match event {
                    Some(JobEvent::Token(chunk)) => {
                        if first_token.is_none() && !chunk.ids.is_empty() {
                            first_token = Some(started.elapsed());
                        }
                        delivered.extend_from_slice(&chunk.ids);
                        if tx.send(JobEvent::Token(chunk)).await.is_err() {
                            break RelayEnd::CallerGone;
                        }
                    }
                    Some(JobEvent::Done { usage, .. }) => break RelayEnd::Done(usage),
                    Some(JobEvent::Failed(message)) => break RelayEnd::Failed(message),
                    None => break RelayEnd::Failed("the job ended without a result".into()),
                }
            };
            // Dropping the events ends a job the caller left; its task then
            // settles what was delivered and reports the cost.
            drop(attempt.events);
            let cost = attempt.cost.await.unwrap_or(None);
            total = match (total, cost) {
                (Some(a), Some(b)) => a.checked_add(b).ok(),
                _ => None,
            };
            let worker = tried[tried.len() - 1];
            let record = |outcome: &str, prompt_tokens: u32, completion_tokens: u32| JobRecord {
                at_ms: crate::now_ms(),
                role: Role::Gateway,
                model: model.clone(),
                peer: worker.to_string(),
                prompt_tokens,
                completion_tokens,
                first_token_ms: first_token.map(super::millis),
                duration_ms: super::millis(started.elapsed()),
                cost_nanoton: total.and_then(|c| u64::try_from(c.0).ok()),
                outcome: outcome.to_string(),
            };
            let message = match end {
                RelayEnd::CallerGone => {
                    self.history
                        .job(record("cancelled", 0, delivered.len() as u32));
                    settle_spend(spend, total).await;
                    return;
                }
                RelayEnd::Done(mut usage) => {
                    let carried = request.continuation.len() as u32;
                    usage.prompt_tokens = usage.prompt_tokens.saturating_sub(carried);
                    usage.completion_tokens = usage.completion_tokens.saturating_add(carried);
                    tracing::info!(
                        worker = %tried[tried.len() - 1],
                        workers = tried.len(),
                        prompt_tokens = usage.prompt_tokens,
                        completion_tokens = usage.completion_tokens,
                        cost_nanoton = total.and_then(|c| u64::try_from(c.0).ok()),
                        "job done"
                    );
                    self.history
                        .job(record("ok", usage.prompt_tokens, usage.completion_tokens));
                    settle_spend(spend, total).await;
                    let _ = tx.send(JobEvent::Done { usage, cost: total }).await;
                    return;
                }
                RelayEnd::Failed(message) => message,
            };
            let owed = max_tokens.saturating_sub(delivered.len() as u32);
            if !delivered.is_empty()
                && owed > 0
                && request.stop.is_empty()
                && tried.len() <= MAX_CONTINUATIONS
            {
                request.continuation.clone_from(&delivered);
                request.max_tokens = owed;
                request.payment = None;
                // The prompt's scores came before the first token.
                request.prompt_logprobs = None;
                match self.place(&request, max_coefficient, &tried, None).await {
                    Ok((peer, _, next)) => {
                        tracing::warn!(
                            failed = %tried[tried.len() - 1],
                            worker = %peer,
                            delivered = delivered.len(),
                            error = %message,
                            "a worker failed midway; the job goes on on another"
                        );
                        tried.push(peer);
                        attempt = next;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a worker failed midway and no other could go on");
                    }
                }
            }
            self.history
                .job(record("failed", 0, delivered.len() as u32));
            settle_spend(spend, total).await;
            let _ = tx.send(JobEvent::Failed(message)).await;
            return;
        }
    }
    fn note_failure(&self, peer: PeerId) {
        if let Ok(mut f) = self.failures.lock() {
            if f.len() > FAILURES_MAX {
                f.retain(|_, t| t.elapsed() < FAILURE_MEMORY);
            }
            f.insert(peer, Instant::now());
        }
    }

    fn take_slot(&self, peer: PeerId) -> InFlight {
        if let Ok(mut m) = self.in_flight.lock() {
            *m.entry(peer).or_insert(0) += 1;
        }
        InFlight {
            map: Arc::clone(&self.in_flight),
            peer,
            queue: Arc::clone(&self.queue),
        }
    }

    /// Runs a job on this node's own engine; a node does not pay itself.
    async fn run_local(
        &self,
        request: &JobRequest,
        slot: InFlight,
    ) -> Result<Attempt, AttemptError> {
        let worker = self
            .local
            .clone()
            .ok_or_else(|| AttemptError::Local("this node is not a worker".into()))?;
        let mut stream = crate::worker::submit_off_runtime(worker.engine(), request.to_generate())
            .await
            .map_err(|e| match e {
                silk_inference::InferenceError::Busy { .. } => AttemptError::Busy(e.to_string()),
                silk_inference::InferenceError::InvalidRequest { .. }
                | silk_inference::InferenceError::PromptTooLong { .. } => {
                    AttemptError::Rejected(e.to_string())
                }
                _ => AttemptError::Failed(e.to_string()),
            })?;
        let (tx, rx) = mpsc::channel(JOB_CHANNEL);
        // A node does not pay itself: the job costs nothing.
        let (cost_tx, cost) = oneshot::channel();
        let _ = cost_tx.send(Some(silk_chain::Coins::ZERO));
        let price = worker.price_milli();
        let cancel = self.cancel.clone();
        tokio::spawn(
            async move {
                let _slot = slot;
                loop {
                    let event = tokio::select! {
                        biased;
                        () = cancel.cancelled() => None,
                        e = stream.next() => e,
                    };
                    let out = match event {
                        Some(Event::Token { id, text, logprob }) => JobEvent::Token(TokenChunk {
                            ids: vec![id],
                            text,
                            logprobs: logprob.into_iter().collect(),
                            prompt_logprobs: Vec::new(),
                        }),
                        Some(Event::PromptLogprobs(scored)) => JobEvent::Token(TokenChunk {
                            prompt_logprobs: scored,
                            ..TokenChunk::default()
                        }),
                        Some(Event::Done(u)) => JobEvent::Done {
                            usage: protocol::usage_record(&u, price),
                            cost: Some(silk_chain::Coins::ZERO),
                        },
                        Some(Event::Error(e)) => JobEvent::Failed(format!("engine failed: {e}")),
                        None => JobEvent::Failed("the engine stopped".into()),
                    };
                    let last = !matches!(out, JobEvent::Token(_));
                    if tx.send(out).await.is_err() || last {
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        Ok(Attempt { events: rx, cost })
    }

    /// Runs a job on `peer`. Returns once the first frame arrived; `paid`
    /// is taken (and settled when the job ends) only then, so on an error
    /// the caller still holds the reservation to release.
    async fn run_remote(
        &self,
        request: &JobRequest,
        peer: PeerId,
        slot: InFlight,
        paid: &mut Option<PaidJob>,
    ) -> Result<Attempt, AttemptError> {
        let max_tokens = request.max_tokens;
        let logprobs = request.logprobs;
        let (prompt_logprobs, prompt_bound) =
            (request.prompt_logprobs, request.prompt_tokens_bound());
        let mut request = request.clone();
        request.payment = paid.as_ref().map(|p| p.terms().clone());
        let mut stream = tokio::time::timeout(
            Duration::from_secs(10),
            self.overlay
                .open_job(peer, protocol::encode(&JobMessage::Generate(request))),
        )
        .await
        .map_err(|_| AttemptError::Timeout("opening the job stream took more than 10 s".into()))?
        .map_err(|e| match e {
            // Our own request frame was over the limit: not the worker's doing.
            silk_overlay::OverlayError::TooLarge { .. } => AttemptError::Local(e.to_string()),
            silk_overlay::OverlayError::JobTimeout { .. } => AttemptError::Timeout(e.to_string()),
            e => AttemptError::Failed(e.to_string()),
        })?;
        let first = match stream.next_frame().await {
            Some(Ok(JobFrame::Data(d))) => Frame::Tokens(
                postcard::from_bytes(&d)
                    .map_err(|e| AttemptError::Failed(format!("undecodable token frame: {e}")))?,
            ),
            Some(Ok(JobFrame::End(u))) => Frame::End(
                postcard::from_bytes(&u)
                    .map_err(|e| AttemptError::Failed(format!("undecodable usage frame: {e}")))?,
            ),
            Some(Ok(JobFrame::Error { code, message })) => {
                return Err(AttemptError::of_refusal(code, message))
            }
            Some(Err(e @ silk_overlay::OverlayError::JobTimeout { .. })) => {
                return Err(AttemptError::Timeout(e.to_string()))
            }
            Some(Err(e)) => return Err(AttemptError::Failed(e.to_string())),
            None => return Err(AttemptError::Failed("the worker closed the stream".into())),
        };
        let paid = paid.take();
        let (cost_tx, cost_rx) = oneshot::channel();
        let overlay = self.overlay.clone();
        let reputation = self.reputation.clone();
        let (tx, rx) = mpsc::channel(JOB_CHANNEL);
        let cancel = self.cancel.clone();
        let progress_timeout = self.job_progress_timeout;
        // The whole job ends by this (audit F16): a worker that trickles
        // frames cannot hold the slot, the reservation and the caller.
        let deadline = tokio::time::Instant::now()
            + progress_timeout
            + Duration::from_secs(u64::from(SECONDS_PER_TOKEN_AT_WORST)) * max_tokens;
        let mut delivery = Delivery::new(max_tokens)
            .with_logprobs(logprobs)
            .with_prompt_logprobs(prompt_logprobs, prompt_bound);
        tokio::spawn(async move {
            let _slot = slot;
            let mut next = Some(first);
            let mut last_progress = tokio::time::Instant::now();
            loop {
                let frame = match next.take() {
                    Some(f) => f,
                    None => {
                        let stall = (last_progress + progress_timeout).min(deadline);
                        let raw = tokio::select! {
                            biased;
                            () = cancel.cancelled() => None,
                            // The caller went away: stop and pay for what it got.
                            () = tx.closed() => Some(Err(silk_overlay::OverlayError::Stopped)),
                            () = tokio::time::sleep_until(stall) => {
                                let why = if stall == deadline {
                                    format!("worker {peer} did not finish within the job's deadline")
                                } else {
                                    format!(
                                        "worker {peer} sent no token for {} s",
                                        progress_timeout.as_secs()
                                    )
                                };
                                next = Some(Frame::Failed(why));
                                continue;
                            }
                            f = stream.next_frame() => f,
                        };
                        if tx.is_closed() {
                            let cost = match paid {
                                Some(p) => p.finish(&overlay, peer, None, delivery).await,
                                None => Some(silk_chain::Coins::ZERO),
                            };
                            let _ = cost_tx.send(cost);
                            return;
                        }
                        Frame::decode(raw, peer, delivery.tokens())
                    }
                };
                let (out, usage) = match frame {
                    Frame::Tokens(chunk) => match delivery.accept(&chunk) {
                        Ok(progress) => {
                            if progress {
                                last_progress = tokio::time::Instant::now();
                            }
                            // A closed channel is seen at the next select.
                            let _ = tx.send(JobEvent::Token(chunk)).await;
                            continue;
                        }
                        Err(why) => (Some(format!("worker {peer} {why}")), None),
                    },
                    Frame::End(usage) => (None, Some(usage)),
                    Frame::Failed(message) => (Some(message), None),
                };
                let cost = match paid {
                    Some(p) => p.finish(&overlay, peer, usage.as_ref(), delivery).await,
                    None => Some(silk_chain::Coins::ZERO),
                };
                let _ = cost_tx.send(cost);
                reputation.record(peer, usage.is_some()).await;
                let event = match (out, usage) {
                    (_, Some(usage)) => JobEvent::Done { usage, cost },
                    (Some(message), None) => JobEvent::Failed(message),
                    (None, None) => JobEvent::Failed("the job ended without a result".into()),
                };
                let _ = tx.send(event).await;
                return;
            }
        }.instrument(tracing::info_span!("attempt", worker = %peer)));
        Ok(Attempt {
            events: rx,
            cost: cost_rx,
        })
    }
}

/// Commits what a job cost to the caller's API-key spending, if it has a key.
async fn settle_spend(spend: Option<SpendHold>, cost: Option<silk_chain::Coins>) {
    if let Some(hold) = spend {
        hold.settle(cost).await;
    }
}

/// How one attempt ended, as the relay sees it.
enum RelayEnd {
    CallerGone,
    Done(JobUsage),
    Failed(String),
}

/// One decoded frame of a running job.
enum Frame {
    Tokens(TokenChunk),
    End(JobUsage),
    Failed(String),
}

impl Frame {
    fn decode(
        raw: Option<Result<JobFrame, silk_overlay::OverlayError>>,
        peer: PeerId,
        delivered: u32,
    ) -> Frame {
        match raw {
            Some(Ok(JobFrame::Data(d))) => match postcard::from_bytes::<TokenChunk>(&d) {
                Ok(chunk) => Frame::Tokens(chunk),
                Err(e) => Frame::Failed(format!(
                    "worker {peer} sent an undecodable token frame after {delivered} tokens: {e}"
                )),
            },
            Some(Ok(JobFrame::End(u))) => match postcard::from_bytes::<JobUsage>(&u) {
                Ok(u) => Frame::End(u),
                Err(e) => Frame::Failed(format!(
                    "worker {peer} sent an undecodable usage frame: {e}"
                )),
            },
            Some(Ok(JobFrame::Error { code, message })) => Frame::Failed(format!(
                "worker {peer} failed after {delivered} tokens ({code:?}): {message}"
            )),
            Some(Err(e)) => Frame::Failed(format!(
                "worker {peer} failed after {delivered} tokens: {e}"
            )),
            None => Frame::Failed(format!(
                "worker {peer} stopped after {delivered} tokens without finishing the job"
            )),
        }
    }
}

//! The worker's side of a job stream: decode the [`JobMessage`], check the
//! payment terms, run the job on the engine and stream its tokens, or take
//! a cheque.

use silk_inference::{Engine, Event, GenerateRequest};
use silk_overlay::{JobErrorCode, JobResponder, Misbehaviour, OverlayHandle, PeerId};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::activity::{History, JobRecord};
use crate::billing::Billing;
use crate::metrics::Role;
use crate::protocol::{
    encode, usage_record, JobMessage, JobRequest, TokenChunk, ERR_BAD_CHEQUE, ERR_NOT_CHARGING,
    ERR_PAYMENT_REFUSED, ERR_PAYMENT_REQUIRED, ERR_WRONG_MODEL,
};

/// What a worker needs to serve inbound streams.
#[derive(Debug, Clone, Copy)]
pub struct WorkerContext<'a> {
    /// The engine, on workers.
    pub engine: Option<&'a Engine>,
    /// The overlay (for misbehaviour reports).
    pub overlay: &'a OverlayHandle,
    /// Payments, when this node charges for jobs.
    pub billing: Option<&'a Billing>,
    /// The coefficient put in usage records, × 1000.
    pub price_milli: u64,
    /// Where each job's end is counted and recorded.
    pub history: &'a History,
}

/// Serves one inbound stream: decodes its [`JobMessage`] and runs the job
/// or takes the cheque.
pub async fn serve_stream(
    ctx: WorkerContext<'_>,
    peer: PeerId,
    message: Vec<u8>,
    responder: JobResponder,
    cancel: CancellationToken,
) {
    let message: JobMessage = match postcard::from_bytes(&message) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "undecodable job message");
            let _ = ctx
                .overlay
                .report_misbehaviour(peer, Misbehaviour::UndecodablePayload)
                .await;
            let _ = responder
                .error(
                    JobErrorCode::Malformed,
                    format!("undecodable job message: {e}"),
                )
                .await;
            return;
        }
    };
    match message {
        JobMessage::Generate(request) => match ctx.engine {
            Some(engine) => {
                // Every line about the job carries the gateway and, for a
                // paid job, the job's number on its payment lane.
                let span = tracing::info_span!(
                    "job",
                    gateway = %peer,
                    job = request.payment.as_ref().map(|p| p.job),
                );
                serve_job(ctx, engine, peer, request, responder, cancel)
                    .instrument(span)
                    .await
            }
            None => {
                let _ = responder
                    .error(JobErrorCode::Rejected, "this node is not a worker")
                    .await;
            }
        },
        JobMessage::Cheque(delivery) => {
            let Some(billing) = ctx.billing else {
                let _ = responder
                    .error(
                        JobErrorCode::Application(ERR_NOT_CHARGING),
                        "this node charges nothing and takes no cheques",
                    )
                    .await;
                return;
            };
            match billing.on_cheque(delivery).await {
                Ok(ack) => {
                    if let Err(e) = responder.end(encode(&ack)).await {
                        tracing::debug!(%peer, error = %e, "could not acknowledge a cheque");
                    }
                }
                Err(e) => {
                    tracing::info!(%peer, error = %e, "cheque refused");
                    let _ = responder
                        .error(JobErrorCode::Application(ERR_BAD_CHEQUE), e.to_string())
                        .await;
                }
            }
        }
    }
}

/// Serves one job on `engine`: runs it and streams the tokens back. Stops
/// early when `cancel` fires or the gateway goes away (dropping the engine
/// stream cancels the generation).
async fn serve_job(
    ctx: WorkerContext<'_>,
    engine: &Engine,
    peer: PeerId,
    request: JobRequest,
    responder: JobResponder,
    cancel: CancellationToken,
) {
    let started = std::time::Instant::now();
    let record = |outcome: &str, served: &Served| JobRecord {
        at_ms: crate::now_ms(),
        role: Role::Worker,
        model: request.model.clone(),
        peer: peer.to_string(),
        prompt_tokens: served.prompt_tokens,
        completion_tokens: served.produced,
        first_token_ms: served.first_token.map(crate::gateway::millis),
        duration_ms: crate::gateway::millis(started.elapsed()),
        cost_nanoton: None,
        outcome: outcome.to_string(),
    };
    if request.model != engine.source().id {
        ctx.history.job(record("refused", &Served::default()));
        let _ = responder
            .error(
                JobErrorCode::Application(ERR_WRONG_MODEL),
                format!(
                    "this worker serves {}, not {}",
                    engine.source().id,
                    request.model
                ),
            )
            .await;
        return;
    }
    if let Some(billing) = ctx.billing {
        let refusal = match &request.payment {
            None => Some((
                ERR_PAYMENT_REQUIRED,
                format!(
                    "this worker charges for jobs: send payment terms (a lane to {})",
                    billing.payout()
                ),
            )),
            Some(terms) => match billing.admit(terms).await {
                Ok(()) => billing
                    .start_job(terms)
                    .await
                    .err()
                    .map(|e| (ERR_PAYMENT_REFUSED, e.to_string())),
                Err(e) => Some((ERR_PAYMENT_REFUSED, e.to_string())),
            },
        };
        if let Some((code, message)) = refusal {
            tracing::info!(%peer, %message, "job refused");
            ctx.history.job(record("refused", &Served::default()));
            let _ = responder
                .error(JobErrorCode::Application(code), message)
                .await;
            return;
        }
    }
    // From here on a paid job has a row in the worker's book: whatever
    // happens, its end is recorded with the tokens produced (audit F3).
    let served = run_job(
        engine,
        peer,
        &request,
        responder,
        ctx.price_milli,
        &cancel,
        started,
    )
    .await;
    if let (Some(billing), Some(terms)) = (ctx.billing, &request.payment) {
        billing
            .end_job(
                terms,
                served.prompt_tokens,
                served.cached_tokens,
                served.produced,
            )
            .await;
    }
    ctx.history.job(record(served.outcome, &served));
}

/// [`Engine::submit`] on a blocking thread: it tokenizes the prompt (and
/// renders the chat template), which for a prompt of a megabyte takes long
/// enough to stall a tokio worker and every task on it (audit F19).
pub async fn submit_off_runtime(
    engine: &Engine,
    request: GenerateRequest,
) -> silk_inference::Result<silk_inference::GenerationStream> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || engine.submit(request))
        .await
        .unwrap_or_else(|e| {
            Err(silk_inference::InferenceError::Backend(format!(
                "tokenizing the prompt failed: {e}"
            )))
        })
}

/// What a job on this worker came to.
#[derive(Debug, Default)]
struct Served {
    /// Prompt tokens (0 unless the job finished).
    prompt_tokens: u32,
    /// Of those, how many the engine read from a cache (priced apart).
    cached_tokens: u32,
    /// Tokens produced, a cancelled stream's included.
    produced: u32,
    /// From the job's arrival to its first token.
    first_token: Option<std::time::Duration>,
    /// `ok`, `failed`, `cancelled` or `refused`.
    outcome: &'static str,
}

/// Runs `request` on `engine`, streaming tokens to `responder`, and ends
/// the stream.
async fn run_job(
    engine: &Engine,
    peer: PeerId,
    request: &JobRequest,
    mut responder: JobResponder,
    price_milli: u64,
    cancel: &CancellationToken,
    started: std::time::Instant,
) -> Served {
    let ended = |outcome, prompt_tokens, produced, first_token| Served {
        prompt_tokens,
        cached_tokens: 0,
        produced,
        first_token,
        outcome,
    };
    let mut stream = match submit_off_runtime(engine, request.to_generate()).await {
        Ok(s) => s,
        Err(silk_inference::InferenceError::Busy { .. }) => {
            let _ = responder
                .error(JobErrorCode::Busy, "worker queue is full")
                .await;
            return ended("refused", 0, 0, None);
        }
        // Only the request's own faults are `Rejected`: a gateway takes that
        // as the caller's error and blames no worker. Anything else (the
        // engine shut down, the tokenizer or template failed) is ours.
        Err(
            e @ (silk_inference::InferenceError::InvalidRequest { .. }
            | silk_inference::InferenceError::PromptTooLong { .. }),
        ) => {
            let _ = responder.error(JobErrorCode::Rejected, e.to_string()).await;
            return ended("refused", 0, 0, None);
        }
        Err(e) => {
            let _ = responder.error(JobErrorCode::Internal, e.to_string()).await;
            return ended("failed", 0, 0, None);
        }
    };
    let mut produced = 0u32;
    let mut first_token = None;
    loop {
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                let _ = responder.error(JobErrorCode::Internal, "worker is shutting down").await;
                return ended("failed", 0, produced, first_token);
            }
            event = stream.next() => event,
        };
        match event {
            Some(Event::Token { id, text, logprob }) => {
                let chunk = TokenChunk {
                    ids: vec![id],
                    text,
                    logprobs: logprob.into_iter().collect(),
                    prompt_logprobs: Vec::new(),
                };
                if let Err(e) = responder.send_data(encode(&chunk)).await {
                    tracing::debug!(%peer, error = %e, "gateway went away; cancelling the job");
                    return ended("cancelled", 0, produced, first_token);
                }
                produced = produced.saturating_add(1);
                first_token.get_or_insert_with(|| started.elapsed());
            }
            Some(Event::PromptLogprobs(scored)) => {
                let chunk = TokenChunk {
                    prompt_logprobs: scored,
                    ..TokenChunk::default()
                };
                if let Err(e) = responder.send_data(encode(&chunk)).await {
                    tracing::debug!(%peer, error = %e, "gateway went away; cancelling the job");
                    return ended("cancelled", 0, produced, first_token);
                }
            }
            Some(Event::Done(usage)) => {
                let record = usage_record(&usage, price_milli);
                tracing::info!(
                    prompt_tokens = record.prompt_tokens,
                    completion_tokens = record.completion_tokens,
                    "job served"
                );
                if let Err(e) = responder.end(encode(&record)).await {
                    tracing::debug!(%peer, error = %e, "could not send the usage frame");
                }
                return Served {
                    cached_tokens: record.cached_tokens.min(record.prompt_tokens),
                    ..ended(
                        "ok",
                        record.prompt_tokens,
                        record.completion_tokens,
                        first_token,
                    )
                };
            }
            Some(Event::Error(e)) => {
                let _ = responder.error(JobErrorCode::Internal, e).await;
                return ended("failed", 0, produced, first_token);
            }
            None => {
                let _ = responder
                    .error(JobErrorCode::Internal, "the engine stopped")
                    .await;
                return ended("failed", 0, produced, first_token);
            }
        }
    }
}

//! The job protocol carried in the overlay's opaque `/silk/job/1.0.0`
//! frames, and the worker's side of it.
//!
//! Each stream opens with one [`JobMessage`] (postcard):
//! - [`JobMessage::Generate`]: a [`JobRequest`]. The worker answers with data
//!   frames, each a postcard [`TokenChunk`], then an end frame holding a
//!   [`JobUsage`], or an error frame.
//! - [`JobMessage::Cheque`]: the gateway's cheque for a finished job. The
//!   worker stores it and answers with an end frame holding a [`ChequeAck`],
//!   or an error frame saying why it refused the cheque.
//!
//! A message that does not decode is answered with an error frame and
//! reported as misbehaviour.

use serde::{Deserialize, Serialize};
use silk_chain::{Address, SignedCheque};
use silk_inference::{ChatMessage, Engine, Event, GenerateRequest, Prompt, SamplingParams};
use silk_overlay::{JobErrorCode, JobResponder, Misbehaviour, OverlayHandle, PeerId};
use tokio_util::sync::CancellationToken;

use crate::billing::Billing;

/// Application error code: the worker does not serve the requested model.
pub const ERR_WRONG_MODEL: u32 = 1;
/// Application error code: the worker charges for jobs and the request
/// carried no payment terms.
pub const ERR_PAYMENT_REQUIRED: u32 = 2;
/// Application error code: the payment terms do not check out, or the
/// client is behind on its cheques or out of lane funds.
pub const ERR_PAYMENT_REFUSED: u32 = 3;
/// Application error code: the worker refused a cheque.
pub const ERR_BAD_CHEQUE: u32 = 4;
/// Application error code: this node takes no cheques (it charges nothing).
pub const ERR_NOT_CHARGING: u32 = 5;

/// The first frame of every job stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobMessage {
    /// Run a job.
    Generate(JobRequest),
    /// Take the cheque for a finished job.
    Cheque(ChequeDelivery),
}

/// How a job is paid: the lane of the client's settlement contract that
/// the cheques are drawn on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentTerms {
    /// The client's settlement contract.
    pub contract: Address,
    /// The key the contract checks cheques against.
    pub public_key: [u8; 32],
    /// The lane paying this worker.
    pub lane_id: u32,
    /// The gateway's id for this job; the cheque names it again.
    pub job: u64,
}

/// A cheque for one finished job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChequeDelivery {
    /// The job it pays ([`PaymentTerms::job`]).
    pub job: u64,
    /// The key that signed it.
    pub public_key: [u8; 32],
    /// The cumulative cheque.
    pub cheque: SignedCheque,
}

/// The worker's receipt for a cheque: it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChequeAck {
    /// The lane's cheque total the worker now holds.
    pub cumulative_nano: u128,
    /// Work by this client its cheques do not cover.
    pub outstanding_nano: u128,
}

/// What a gateway asks a worker to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Model id (`name@sha256:…`).
    pub model: String,
    /// Input.
    pub prompt: WirePrompt,
    /// Most tokens to generate (≥ 1).
    pub max_tokens: u32,
    /// Sampling temperature, 0 to 2.
    pub temperature: f32,
    /// Nucleus mass, (0, 1].
    pub top_p: f32,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// How the job is paid; `None` for a worker that charges nothing.
    pub payment: Option<PaymentTerms>,
    /// Token ids the answer already has from a worker that failed midway:
    /// the worker goes on after them (they are prefilled with the prompt,
    /// counted as prompt tokens, and not against `max_tokens`).
    pub continuation: Vec<u32>,
}

/// The prompt of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WirePrompt {
    /// Raw text.
    Text(String),
    /// Chat messages as (role, content).
    Chat(Vec<(String, String)>),
}

/// One data frame: generated text and its token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenChunk {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Text they complete (may be empty).
    pub text: String,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finish {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` or the context window.
    Length,
}

impl Finish {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// The end frame: what the worker counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobUsage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Why it ended.
    pub finish: Finish,
    /// Decode speed of this job, tokens/s × 1000.
    pub decode_tokens_per_s_milli: u64,
    /// Price coefficient the worker charges, × 1000.
    pub price_coefficient_milli: u64,
}

impl JobRequest {
    /// The engine request.
    pub fn to_generate(&self) -> GenerateRequest {
        let prompt = match &self.prompt {
            WirePrompt::Text(t) => Prompt::Text(t.clone()),
            WirePrompt::Chat(m) => Prompt::Chat(
                m.iter()
                    .map(|(role, content)| ChatMessage {
                        role: role.clone(),
                        content: content.clone(),
                    })
                    .collect(),
            ),
        };
        GenerateRequest {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: 0,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            continuation: self.continuation.clone(),
            ..GenerateRequest::new(prompt, self.max_tokens.max(1) as usize)
        }
    }

    /// A rough prompt length in tokens (4 bytes a token), for routing.
    pub fn estimated_prompt_tokens(&self) -> u64 {
        self.prompt_bytes().div_ceil(4) + self.continuation.len() as u64
    }

    /// The most prompt tokens a worker can honestly count: byte-level
    /// tokenizers never make more tokens than bytes, and a chat template
    /// adds a few per message plus a generation prompt. The gateway pays for
    /// no more prompt tokens than this.
    pub fn prompt_tokens_bound(&self) -> u64 {
        let messages = match &self.prompt {
            WirePrompt::Text(_) => 0,
            WirePrompt::Chat(m) => m.len() as u64,
        };
        self.prompt_bytes() + 16 * messages + 32 + self.continuation.len() as u64
    }

    fn prompt_bytes(&self) -> u64 {
        let bytes = match &self.prompt {
            WirePrompt::Text(t) => t.len(),
            WirePrompt::Chat(m) => m.iter().map(|(r, c)| r.len() + c.len() + 8).sum(),
        };
        bytes as u64
    }
}

/// Encodes a value for a frame.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard only fails for types serde cannot describe; ours are plain.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// The engine usage as a wire record.
pub fn usage_record(usage: &silk_inference::engine::Usage, price_milli: u64) -> JobUsage {
    JobUsage {
        prompt_tokens: usage.prompt_tokens as u32,
        completion_tokens: usage.completion_tokens as u32,
        finish: match usage.finish_reason {
            silk_inference::engine::FinishReason::Stop => Finish::Stop,
            silk_inference::engine::FinishReason::Length => Finish::Length,
        },
        decode_tokens_per_s_milli: (usage.decode_tokens_per_s.max(0.0) * 1000.0) as u64,
        price_coefficient_milli: price_milli,
    }
}

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
            Some(engine) => serve_job(ctx, engine, peer, request, responder, cancel).await,
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
    if request.model != engine.source().id {
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
            let _ = responder
                .error(JobErrorCode::Application(code), message)
                .await;
            return;
        }
    }
    // From here on a paid job has a row in the worker's book: whatever
    // happens, its end is recorded with the tokens produced (audit F3).
    let (prompt_tokens, produced) =
        run_job(engine, peer, &request, responder, ctx.price_milli, &cancel).await;
    if let (Some(billing), Some(terms)) = (ctx.billing, &request.payment) {
        billing.end_job(terms, prompt_tokens, produced).await;
    }
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

/// Runs `request` on `engine`, streaming tokens to `responder`, and ends
/// the stream. Returns the prompt tokens (0 unless the job finished) and
/// the tokens produced, a cancelled stream's included.
async fn run_job(
    engine: &Engine,
    peer: PeerId,
    request: &JobRequest,
    mut responder: JobResponder,
    price_milli: u64,
    cancel: &CancellationToken,
) -> (u32, u32) {
    let mut stream = match submit_off_runtime(engine, request.to_generate()).await {
        Ok(s) => s,
        Err(silk_inference::InferenceError::Busy { .. }) => {
            let _ = responder
                .error(JobErrorCode::Busy, "worker queue is full")
                .await;
            return (0, 0);
        }
        // Only the request's own faults are `Rejected`: a gateway takes that
        // as the caller's error and blames no worker. Anything else (the
        // engine shut down, the tokenizer or template failed) is ours.
        Err(
            e @ (silk_inference::InferenceError::InvalidRequest { .. }
            | silk_inference::InferenceError::PromptTooLong { .. }),
        ) => {
            let _ = responder.error(JobErrorCode::Rejected, e.to_string()).await;
            return (0, 0);
        }
        Err(e) => {
            let _ = responder.error(JobErrorCode::Internal, e.to_string()).await;
            return (0, 0);
        }
    };
    let mut produced = 0u32;
    loop {
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                let _ = responder.error(JobErrorCode::Internal, "worker is shutting down").await;
                return (0, produced);
            }
            event = stream.next() => event,
        };
        match event {
            Some(Event::Token { id, text }) => {
                let chunk = TokenChunk {
                    ids: vec![id],
                    text,
                };
                if let Err(e) = responder.send_data(encode(&chunk)).await {
                    tracing::debug!(%peer, error = %e, "gateway went away; cancelling the job");
                    return (0, produced);
                }
                produced = produced.saturating_add(1);
            }
            Some(Event::Done(usage)) => {
                let record = usage_record(&usage, price_milli);
                if let Err(e) = responder.end(encode(&record)).await {
                    tracing::debug!(%peer, error = %e, "could not send the usage frame");
                }
                return (record.prompt_tokens, record.completion_tokens);
            }
            Some(Event::Error(e)) => {
                let _ = responder.error(JobErrorCode::Internal, e).await;
                return (0, produced);
            }
            None => {
                let _ = responder
                    .error(JobErrorCode::Internal, "the engine stopped")
                    .await;
                return (0, produced);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = JobRequest {
            model: "m@sha256:00".into(),
            prompt: WirePrompt::Chat(vec![("user".into(), "hi".into())]),
            max_tokens: 4,
            temperature: 0.5,
            top_p: 1.0,
            seed: Some(3),
            stop: vec!["\n".into()],
            ignore_eos: false,
            payment: Some(PaymentTerms {
                contract: Address::new(0, [7; 32]),
                public_key: [9; 32],
                lane_id: 2,
                job: 11,
            }),
            continuation: vec![5, 6],
        };
        let m = JobMessage::Generate(r);
        let back: JobMessage = postcard::from_bytes(&encode(&m)).expect("decode");
        assert_eq!(back, m);
        assert!(postcard::from_bytes::<JobMessage>(&[0xff, 0xff, 0xff]).is_err());
        assert!(postcard::from_bytes::<JobMessage>(&[]).is_err());
    }
}

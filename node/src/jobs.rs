//! The job protocol carried in the overlay's opaque `/silk/job/1.0.0`
//! frames, and the worker's side of it.
//!
//! The gateway sends one [`JobRequest`] (postcard). The worker answers with
//! data frames, each a postcard [`TokenChunk`], then an end frame holding a
//! [`JobUsage`], or an error frame. A request that does not decode is
//! answered with an error frame and reported as misbehaviour.

use serde::{Deserialize, Serialize};
use silk_inference::{ChatMessage, Engine, Event, GenerateRequest, Prompt, SamplingParams};
use silk_overlay::{JobErrorCode, JobResponder, Misbehaviour, OverlayHandle, PeerId};
use tokio_util::sync::CancellationToken;

/// Application error code: the worker does not serve the requested model.
pub const ERR_WRONG_MODEL: u32 = 1;

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
            ..GenerateRequest::new(prompt, self.max_tokens.max(1) as usize)
        }
    }

    /// A rough prompt length in tokens (4 bytes a token), for routing.
    pub fn estimated_prompt_tokens(&self) -> u64 {
        let bytes = match &self.prompt {
            WirePrompt::Text(t) => t.len(),
            WirePrompt::Chat(m) => m.iter().map(|(r, c)| r.len() + c.len() + 8).sum(),
        };
        (bytes as u64).div_ceil(4)
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

/// Serves one inbound job on `engine`: decodes the request, runs it and
/// streams the tokens back. Stops early when `cancel` fires or the gateway
/// goes away (dropping the engine stream cancels the generation).
pub async fn serve_job(
    engine: &Engine,
    overlay: &OverlayHandle,
    peer: PeerId,
    request: Vec<u8>,
    mut responder: JobResponder,
    price_milli: u64,
    cancel: CancellationToken,
) {
    let request: JobRequest = match postcard::from_bytes(&request) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "undecodable job request");
            let _ = overlay
                .report_misbehaviour(peer, Misbehaviour::UndecodablePayload)
                .await;
            let _ = responder
                .error(
                    JobErrorCode::Malformed,
                    format!("undecodable job request: {e}"),
                )
                .await;
            return;
        }
    };
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
    let mut stream = match engine.submit(request.to_generate()) {
        Ok(s) => s,
        Err(silk_inference::InferenceError::Busy { .. }) => {
            let _ = responder
                .error(JobErrorCode::Busy, "worker queue is full")
                .await;
            return;
        }
        Err(e) => {
            let _ = responder.error(JobErrorCode::Rejected, e.to_string()).await;
            return;
        }
    };
    loop {
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                let _ = responder.error(JobErrorCode::Internal, "worker is shutting down").await;
                return;
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
                    return;
                }
            }
            Some(Event::Done(usage)) => {
                let record = usage_record(&usage, price_milli);
                if let Err(e) = responder.end(encode(&record)).await {
                    tracing::debug!(%peer, error = %e, "could not send the usage frame");
                }
                return;
            }
            Some(Event::Error(e)) => {
                let _ = responder.error(JobErrorCode::Internal, e).await;
                return;
            }
            None => {
                let _ = responder
                    .error(JobErrorCode::Internal, "the engine stopped")
                    .await;
                return;
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
        };
        let back: JobRequest = postcard::from_bytes(&encode(&r)).expect("decode");
        assert_eq!(back, r);
        assert!(postcard::from_bytes::<JobRequest>(&[0xff, 0xff, 0xff]).is_err());
    }
}

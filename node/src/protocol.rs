//! The job protocol carried in the overlay's opaque `/silk/job/1.0.0`
//! frames: the wire types both sides share, and nothing else (the worker's
//! side is [`crate::worker`], the gateway's [`crate::gateway`]).
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
use silk_inference::{
    ChatMessage, Constraint, GenerateRequest, Prompt, SamplingParams, TokenLogprob, Tool,
};

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
    /// How to pick tokens: temperature, top-p/k, min-p, seed, penalties,
    /// logit bias. The worker's engine checks every range again (a gateway
    /// is a peer like any other).
    pub sampling: SamplingParams,
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
    /// Report each token's log-probability and this many alternatives
    /// (at most [`silk_inference::MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<u8>,
    /// What the answer must parse as (`response_format`), enforced by the
    /// worker's engine.
    pub constraint: Option<Constraint>,
    /// Score the prompt (completions' `echo` with `logprobs`): the worker
    /// reports each prompt token's log-probability and this many
    /// alternatives in the first chunk. With it, `max_tokens` may be 0.
    pub prompt_logprobs: Option<u8>,
}

/// The prompt of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WirePrompt {
    /// Raw text.
    Text(String),
    /// Chat messages as (role, content).
    Chat(Vec<(String, String)>),
    /// A conversation with what [`WirePrompt::Chat`] cannot carry: tools
    /// the model may call, assistant messages with calls, tool results,
    /// names. A gateway sends [`WirePrompt::Chat`] when it can, so workers
    /// that predate this variant still serve plain conversations.
    Conversation {
        /// The messages.
        messages: Vec<ChatMessage>,
        /// The functions the model may call.
        tools: Vec<Tool>,
    },
}

/// One data frame: generated text and its token ids.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenChunk {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Text they complete (may be empty).
    pub text: String,
    /// The log-probability of each of `ids`, when the job asked for them
    /// (none for an end-of-sequence token).
    pub logprobs: Vec<TokenLogprob>,
    /// When the job scores its prompt ([`JobRequest::prompt_logprobs`]):
    /// in the first chunk, which has no `ids`, the log-probability of each
    /// prompt token after the first; empty in every other chunk.
    pub prompt_logprobs: Vec<TokenLogprob>,
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
    /// Prompt tokens the worker read from its prefix cache instead of
    /// computing (reported to the caller; at most `prompt_tokens`).
    pub cached_tokens: u32,
}

impl JobRequest {
    /// The engine request.
    pub fn to_generate(&self) -> GenerateRequest {
        let prompt = match &self.prompt {
            WirePrompt::Text(t) => Prompt::Text(t.clone()),
            WirePrompt::Chat(m) => Prompt::Chat {
                messages: m
                    .iter()
                    .map(|(role, content)| ChatMessage::new(role.clone(), content.clone()))
                    .collect(),
                tools: Vec::new(),
            },
            WirePrompt::Conversation { messages, tools } => Prompt::Chat {
                messages: messages.clone(),
                tools: tools.clone(),
            },
        };
        GenerateRequest {
            sampling: self.sampling.clone(),
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            continuation: self.continuation.clone(),
            logprobs: self.logprobs,
            constraint: self.constraint.clone(),
            prompt_logprobs: self.prompt_logprobs,
            ..GenerateRequest::new(prompt, self.max_tokens as usize)
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
            WirePrompt::Chat(m) => m.len(),
            WirePrompt::Conversation { messages, .. } => messages.len(),
        };
        self.prompt_bytes() + 16 * messages as u64 + 32 + self.continuation.len() as u64
    }

    /// The prompt's bytes as a template writes them, at most: tools and
    /// calls are written again as JSON with spaces (at most twice their
    /// bytes) inside a fixed preamble and tags.
    fn prompt_bytes(&self) -> u64 {
        let bytes = match &self.prompt {
            WirePrompt::Text(t) => t.len(),
            WirePrompt::Chat(m) => m.iter().map(|(r, c)| r.len() + c.len() + 8).sum(),
            WirePrompt::Conversation { messages, tools } => {
                let message = |m: &ChatMessage| {
                    let calls: usize = m
                        .tool_calls
                        .iter()
                        .map(|c| c.id.len() + c.name.len() + 2 * c.arguments.len() + 64)
                        .sum();
                    m.role.len()
                        + m.content.len()
                        + m.name.as_ref().map_or(0, String::len)
                        + m.tool_call_id.as_ref().map_or(0, String::len)
                        + calls
                        + if m.role == "tool" { 48 } else { 8 }
                };
                let tools_bytes: usize = tools
                    .iter()
                    .map(|t| {
                        2 * (t.name.len()
                            + t.description.as_ref().map_or(0, String::len)
                            + t.parameters.len())
                            + 64
                    })
                    .sum();
                let preamble = if tools.is_empty() { 0 } else { 1024 };
                messages.iter().map(message).sum::<usize>() + tools_bytes + preamble
            }
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
        cached_tokens: usage.cached_tokens.min(usage.prompt_tokens) as u32,
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
            sampling: SamplingParams {
                temperature: 0.5,
                seed: Some(3),
                presence_penalty: 0.25,
                logit_bias: vec![(17, -100.0)],
                ..Default::default()
            },
            stop: vec!["\n".into()],
            ignore_eos: false,
            payment: Some(PaymentTerms {
                contract: Address::new(0, [7; 32]),
                public_key: [9; 32],
                lane_id: 2,
                job: 11,
            }),
            continuation: vec![5, 6],
            logprobs: Some(3),
            constraint: Some(Constraint::JsonSchema(r#"{"type":"object"}"#.into())),
            prompt_logprobs: Some(2),
        };
        let m = JobMessage::Generate(r);
        let back: JobMessage = postcard::from_bytes(&encode(&m)).expect("decode");
        assert_eq!(back, m);
        assert!(postcard::from_bytes::<JobMessage>(&[0xff, 0xff, 0xff]).is_err());
        assert!(postcard::from_bytes::<JobMessage>(&[]).is_err());
    }
}

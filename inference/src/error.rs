//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model or generating text.
///
/// Messages name the file or field at fault and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A model file is not in the format its name or header claims.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration field is missing or has an unusable value.
    #[error("model config field `{field}`: {reason}")]
    Config {
        /// The field, as named in `config.json` or the GGUF metadata.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The model's architecture is not one this engine implements.
    #[error(
        "unsupported architecture `{0}`: silk runs the Llama family (llama) and Qwen3 (qwen3)"
    )]
    UnsupportedArchitecture(String),
    /// A tensor is stored in a quantization this engine cannot read.
    #[error("tensor `{tensor}` uses {kind}, which silk cannot read (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)")]
    UnsupportedQuantization {
        /// The tensor's name in the file.
        tensor: String,
        /// The quantization type.
        kind: String,
    },
    /// A weight the architecture needs is absent, or has the wrong shape.
    #[error("weight `{name}`: {reason}")]
    Weight {
        /// Our name for the weight.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer or the chat template could not be built or applied.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// A request field is out of range.
    #[error("invalid request: `{field}` {reason}")]
    InvalidRequest {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The prompt does not fit in the model's context window.
    #[error("the prompt has {prompt_tokens} tokens but the context window is {context} tokens")]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// The engine's queue is full.
    #[error("the engine is busy: {queued} requests are already queued; retry later or use another worker")]
    Busy {
        /// Requests waiting.
        queued: usize,
    },
    /// The engine has stopped (its scheduler thread ended).
    #[error("the inference engine has shut down")]
    Shutdown,
    /// A named model is not in the local model store.
    #[error("model `{0}` is not installed: run `silk model fetch` or pass a path to a GGUF file or a Hugging Face directory")]
    ModelNotFound(String),
    /// Fetching the default model failed.
    #[error("fetching the model: {0}")]
    Fetch(String),
    /// The CPU kernels asked for cannot run here, or are not a known set.
    #[error("CPU kernels: {0}")]
    CpuKernels(String),
    /// The requested compute backend is unavailable.
    #[error("backend: {0}")]
    Backend(String),
    /// Constrained decoding failed midway (the grammar engine's own error).
    #[error("constrained decoding: {0}")]
    Grammar(String),
}

impl InferenceError {
    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn weight(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Weight {
            name: name.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = InferenceError> = std::result::Result<T, E>;

//! The engine a worker runs: one scheduler thread per loaded model doing
//! continuous batching.
//!
//! Callers [`Engine::submit`] a request from any thread; it is tokenized and
//! checked there (so bad input fails at once), then queued in a bounded
//! queue (full → [`InferenceError::Busy`]). Between forward passes the
//! scheduler admits queued requests while the batch has room and the KV
//! budget allows their worst case (prompt + max_tokens). Every step
//! advances every admitted request: new ones by a chunk of their prompt,
//! the rest by one token, so a long request never starves the others.
//! Tokens go out through a bounded channel per request; a request whose
//! receiver is gone is dropped (cancellation), and one whose receiver is
//! full waits out steps without holding the rest back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::prelude::Backend;
use tokio::sync::mpsc;

use crate::cache::{bytes_for, KvCache};
use crate::constraint::{apply_mask, Constraint, Grammars};
use crate::error::{InferenceError, Result};
use crate::model::{LoadedModel, ModelSource};
use crate::prefix::{reusable_len, PrefixCache};
use crate::sampling::{History, Sampler, SamplingParams, TokenLogprob, TopLogprob};
use crate::tokenizer::{ChatMessage, IncrementalDecoder, Tokenizer};
use crate::tools::Tool;
use crate::transformer::{Segment, Transformer};
use llguidance::Matcher;

/// Most stop strings a request may carry.
pub const MAX_STOP_STRINGS: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// Limits of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most requests decoded together.
    pub max_batch: usize,
    /// Most requests waiting for a batch slot.
    pub max_queue: usize,
    /// Bytes of KV cache all admitted requests may reserve (worst case).
    pub kv_budget_bytes: usize,
    /// Most prompt tokens one request processes per step.
    pub prefill_chunk: usize,
    /// Events buffered per request before the request waits for its reader.
    pub stream_buffer: usize,
    /// Bytes of finished sequences' keys and values kept for requests that
    /// start with the same tokens ([`crate::prefix`]); 0 turns it off.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_queue: 256,
            kv_budget_bytes: 4 << 30,
            prefill_chunk: 256,
            stream_buffer: 64,
            prefix_cache_bytes: 512 << 20,
        }
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized with the model's special tokens (BOS).
    Text(String),
    /// A conversation, rendered with the model's chat template, and the
    /// functions the model may call (see [`crate::tools`]).
    Chat {
        /// The messages.
        messages: Vec<ChatMessage>,
        /// The functions; empty for none.
        tools: Vec<Tool>,
    },
    /// Pre-tokenized input.
    Tokens(Vec<u32>),
}

/// The ids `tokenizer` makes of `prompt`, as the engine counts them: text
/// with the model's special tokens, a conversation through its chat
/// template with the generation prompt. A gateway that holds the model's
/// tokenizer counts a prompt with this before it sends the job anywhere.
pub fn prompt_ids(tokenizer: &Tokenizer, prompt: &Prompt) -> Result<Vec<u32>> {
    match prompt {
        Prompt::Text(text) => tokenizer.encode(text, true),
        Prompt::Chat { messages, tools } => {
            let text = tokenizer.apply_chat_template_with_tools(messages, tools, true)?;
            tokenizer.encode(&text, false)
        }
        Prompt::Tokens(ids) => Ok(ids.clone()),
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Input.
    pub prompt: Prompt,
    /// Most tokens to generate, at least 1.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Strings that end generation; they are not part of the output.
    pub stop: Vec<String>,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Tokens this answer already has, generated elsewhere (by a worker
    /// that failed midway). After the prompt they are fed back one decode
    /// step at a time, as if this engine had sampled them (the sampler
    /// draws and discards, so a seeded run keeps its random stream), and
    /// generation goes on after them: the cache holds what the first
    /// engine's did, so a greedy answer continues as it would have. The text
    /// decoder starts from them, so a character split across the seam comes
    /// out whole. They count as prompt tokens in [`Usage`], not against
    /// `max_tokens`.
    pub continuation: Vec<u32>,
    /// Report each generated token's log-probability and this many most
    /// likely alternatives (0 to [`crate::MAX_TOP_LOGPROBS`]); `None` for
    /// none.
    pub logprobs: Option<u8>,
    /// What the answer must parse as; enforced by masking every step's
    /// logits (see [`crate::constraint`]). The answer ends when it is
    /// complete.
    pub constraint: Option<Constraint>,
    /// Score the prompt: report the log-probability of each prompt token
    /// after the first, given the ones before it, and this many most likely
    /// alternatives ([`Event::PromptLogprobs`], before any token). With it,
    /// `max_tokens` may be 0: the prompt is scored and nothing generated.
    pub prompt_logprobs: Option<u8>,
}

impl GenerateRequest {
    /// A greedy request for `max_tokens` tokens.
    pub fn new(prompt: Prompt, max_tokens: usize) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            continuation: Vec::new(),
            logprobs: None,
            constraint: None,
            prompt_logprobs: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context window.
    Length,
}

/// Token counts and timing of a finished request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Time from admission to the first token, milliseconds.
    pub prefill_ms: f64,
    /// Time waiting in the queue, milliseconds.
    pub queue_ms: f64,
    /// Prompt tokens whose keys and values came from the prefix cache
    /// instead of being computed.
    #[serde(default)]
    pub cached_tokens: usize,
    /// Generated tokens after the first, per second of decoding.
    pub decode_tokens_per_s: f64,
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (may be empty while a
    /// multi-byte character or a possible stop string is pending).
    Token {
        /// Token id.
        id: u32,
        /// New text.
        text: String,
        /// Its log-probability, when the request asked for them (none for
        /// the end-of-sequence token that ends the answer).
        logprob: Option<TokenLogprob>,
    },
    /// The prompt's log-probabilities, when the request asked for them
    /// ([`GenerateRequest::prompt_logprobs`]): one per prompt token after
    /// the first (the first has nothing before it), sent once the prompt is
    /// read and before any token.
    PromptLogprobs(Vec<TokenLogprob>),
    /// The request finished.
    Done(Usage),
    /// The request failed after admission.
    Error(String),
}

/// The receiving end of one request. Dropping it cancels the request.
#[derive(Debug)]
pub struct GenerationStream {
    /// The prompt as the engine tokenized it.
    pub prompt_token_ids: Vec<u32>,
    receiver: mpsc::Receiver<Event>,
}

impl GenerationStream {
    /// The next event; `None` once the request is over.
    pub async fn next(&mut self) -> Option<Event> {
        self.receiver.recv().await
    }

    /// The next event, blocking the thread (for CLI and benchmarks).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.receiver.blocking_recv()
    }
}

/// The engine's current load, for gossip and routing.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineLoad {
    /// Requests in the batch.
    pub active: usize,
    /// Requests waiting.
    pub queued: usize,
    /// Requests in the batch whose reader is behind: the engine holds
    /// their next event and leaves them out of its steps until it is read.
    pub stalled: usize,
    /// Batch slots.
    pub max_batch: usize,
    /// Recent aggregate decode speed (tokens/s over recent steps).
    pub decode_tokens_per_s: f64,
    /// Bytes the prefix cache holds.
    pub prefix_cache_bytes: usize,
    /// Prompt tokens read from the prefix cache since the engine started.
    pub cached_tokens: u64,
}

#[derive(Debug, Default)]
struct Counters {
    active: AtomicUsize,
    queued: AtomicUsize,
    stalled: AtomicUsize,
    /// f64 bits of the decode-speed moving average.
    decode_tps: AtomicU64,
    /// Bytes the prefix cache holds, and prompt tokens read from it.
    prefix_bytes: AtomicUsize,
    cached_tokens: AtomicU64,
    /// Tokens picked under a constraint, and the nanoseconds spent
    /// computing their masks and advancing their grammars.
    masked_tokens: AtomicU64,
    mask_nanos: AtomicU64,
}

struct Job {
    prompt: Vec<u32>,
    /// The request's constraint, compiled.
    matcher: Option<Matcher>,
    request: GenerateRequest,
    sender: mpsc::Sender<Event>,
    enqueued: Instant,
}

/// A model loaded on a device with its scheduler running. Clones share
/// the scheduler.
#[derive(Clone)]
pub struct Engine {
    source: ModelSource,
    tokenizer: Arc<Tokenizer>,
    context: usize,
    config: EngineConfig,
    queue: mpsc::Sender<Job>,
    counters: Arc<Counters>,
    kv_bytes_per_token: usize,
    /// See [`crate::transformer::Transformer::decode_weight_bytes`].
    decode_weight_bytes: usize,
    /// Rows of the model's embedding table.
    embedding_rows: usize,
    /// The vocabulary as the grammar engine sees it, built at the first
    /// constrained request.
    grammars: Arc<std::sync::OnceLock<std::result::Result<Grammars, String>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.source.id)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the scheduler thread for `model`.
    pub fn start<B: Backend>(model: LoadedModel<B>, config: EngineConfig) -> Result<Self> {
        if config.max_batch == 0 || config.max_queue == 0 || config.prefill_chunk == 0 {
            return Err(InferenceError::config(
                "engine",
                "max_batch, max_queue and prefill_chunk must be positive",
            ));
        }
        let LoadedModel {
            source,
            tokenizer,
            transformer,
        } = model;
        let c = transformer.config();
        let context = c.max_position_embeddings;
        let embedding_rows = c.vocab_size;
        let kv_bytes_per_token = bytes_for(c.num_layers, c.num_kv_heads, c.head_dim, 1);
        let decode_weight_bytes = transformer.decode_weight_bytes();
        let tokenizer = Arc::new(tokenizer);
        let counters = Arc::new(Counters::default());
        let (queue, jobs) = mpsc::channel(config.max_queue);
        let scheduler = Scheduler {
            transformer,
            tokenizer: tokenizer.clone(),
            config: config.clone(),
            counters: counters.clone(),
            jobs,
            waiting: VecDeque::new(),
            parked: Vec::new(),
            active: Vec::new(),
            prefix: PrefixCache::new(
                config.prefix_cache_bytes,
                kv_bytes_per_token,
                config.prefill_chunk,
            ),
            kv_bytes_per_token,
        };
        // The scheduler runs on a worker of its own rayon pool, so the
        // parallel matrix products of a forward pass (`packed`, burn-flex)
        // split across the pool with the scheduler's thread taking a share,
        // instead of parking it and waking other threads for every product.
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name({
                let name = source.name.clone();
                move |i| format!("silk-engine-{name}-{i}")
            })
            .build()
            .map_err(|e| {
                InferenceError::Backend(format!("cannot start the engine's threads: {e}"))
            })?;
        std::thread::Builder::new()
            .name(format!("silk-engine-{}", source.name))
            .spawn(move || {
                // A panic ends the scheduler and closes the queue: every
                // later `submit` answers `Shutdown` and `is_running` turns
                // false, which the node watches (audit F19).
                let run = std::panic::AssertUnwindSafe(|| pool.install(|| scheduler.run()));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(panic = %why, "the engine's scheduler panicked; the engine is stopped");
                }
            })
            .map_err(|e| {
                InferenceError::Backend(format!("cannot start the scheduler thread: {e}"))
            })?;
        Ok(Self {
            source,
            tokenizer,
            context,
            config,
            queue,
            counters,
            kv_bytes_per_token,
            decode_weight_bytes,
            embedding_rows,
            grammars: Arc::default(),
        })
    }

    /// A matcher for `constraint` over this model's vocabulary.
    fn matcher(&self, constraint: &Constraint) -> Result<Matcher> {
        let vocab = self.tokenizer.vocab_size().min(self.embedding_rows).max(1);
        let grammars = self
            .grammars
            .get_or_init(|| Grammars::new(self.tokenizer.clone(), vocab).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| InferenceError::Grammar(e.clone()))?;
        grammars.matcher(constraint)
    }

    /// The model's identity.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Bytes of weights a one-token forward pass reads (see
    /// [`crate::transformer::Transformer::decode_weight_bytes`]).
    pub fn decode_weight_bytes(&self) -> usize {
        self.decode_weight_bytes
    }

    /// The context window in tokens.
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// Tokenizes a prompt as [`Engine::submit`] would.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = prompt_ids(&self.tokenizer, prompt)?;
        // Every id must have a row in the embedding table. A tokenizer can
        // know more tokens than the model has rows (added special tokens
        // of a small model), so this checks text prompts too.
        let vocab = self.tokenizer.vocab_size().min(self.embedding_rows).max(1);
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(InferenceError::InvalidRequest {
                field: "prompt",
                reason: format!("token id {bad} is outside the model's vocabulary of {vocab}"),
            });
        }
        Ok(ids)
    }

    /// Checks and queues a request. Errors: invalid fields, a prompt that
    /// does not fit, or a full queue.
    pub fn submit(&self, request: GenerateRequest) -> Result<GenerationStream> {
        request.sampling.validate()?;
        let vocab = self.tokenizer.vocab_size().min(self.embedding_rows).max(1);
        if let Some((bad, _)) = request
            .sampling
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= vocab)
        {
            return Err(InferenceError::InvalidRequest {
                field: "logit_bias",
                reason: format!("token id {bad} is outside the model's vocabulary of {vocab}"),
            });
        }
        if let Some(k) = request.logprobs.filter(|&k| k > crate::MAX_TOP_LOGPROBS) {
            return Err(InferenceError::InvalidRequest {
                field: "top_logprobs",
                reason: format!("is {k}, at most {} are allowed", crate::MAX_TOP_LOGPROBS),
            });
        }
        if let Some(k) = request
            .prompt_logprobs
            .filter(|&k| k > crate::MAX_TOP_LOGPROBS)
        {
            return Err(InferenceError::InvalidRequest {
                field: "logprobs",
                reason: format!("is {k}, at most {} are allowed", crate::MAX_TOP_LOGPROBS),
            });
        }
        if request.max_tokens == 0 && request.prompt_logprobs.is_none() {
            return Err(InferenceError::InvalidRequest {
                field: "max_tokens",
                reason: "must be at least 1 (0 only when scoring the prompt)".into(),
            });
        }
        if request.max_tokens == 0 && !request.continuation.is_empty() {
            return Err(InferenceError::InvalidRequest {
                field: "max_tokens",
                reason: "must be at least 1 to go on after a continuation".into(),
            });
        }
        if request.max_tokens > self.context {
            return Err(InferenceError::InvalidRequest {
                field: "max_tokens",
                reason: format!(
                    "is {}, more than the context window of {}",
                    request.max_tokens, self.context
                ),
            });
        }
        // Each token is checked against every stop string, and the text that
        // may start one is held back: both grow with the strings (audit F19).
        if request.stop.iter().any(String::is_empty)
            || request.stop.len() > MAX_STOP_STRINGS
            || request.stop.iter().any(|s| s.len() > MAX_STOP_BYTES)
        {
            return Err(InferenceError::InvalidRequest {
                field: "stop",
                reason: format!(
                    "takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_BYTES} bytes"
                ),
            });
        }
        // Fault tests hold a job here to see which thread tokenizes it.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("engine-tokenize");
        let prompt = self.tokenize(&request.prompt)?;
        if prompt.is_empty() {
            return Err(InferenceError::InvalidRequest {
                field: "prompt",
                reason: "is empty".into(),
            });
        }
        let vocab = self.tokenizer.vocab_size().min(self.embedding_rows).max(1);
        if let Some(bad) = request
            .continuation
            .iter()
            .find(|&&id| id as usize >= vocab)
        {
            return Err(InferenceError::InvalidRequest {
                field: "continuation",
                reason: format!("token id {bad} is outside the model's vocabulary of {vocab}"),
            });
        }
        let before = prompt.len() + request.continuation.len();
        if before >= self.context {
            return Err(InferenceError::PromptTooLong {
                prompt_tokens: before,
                context: self.context,
            });
        }
        let worst = (before + request.max_tokens).min(self.context);
        if worst * self.kv_bytes_per_token > self.config.kv_budget_bytes {
            return Err(InferenceError::InvalidRequest {
                field: "max_tokens",
                reason: format!(
                    "prompt plus max_tokens ({worst} tokens) needs more KV cache than this engine's budget of {} MiB",
                    self.config.kv_budget_bytes >> 20
                ),
            });
        }
        let matcher = request
            .constraint
            .as_ref()
            .map(|c| self.matcher(c))
            .transpose()?;
        let (sender, receiver) = mpsc::channel(self.config.stream_buffer.max(1));
        let job = Job {
            prompt: prompt.clone(),
            matcher,
            request,
            sender,
            enqueued: Instant::now(),
        };
        match self.queue.try_send(job) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                Ok(GenerationStream {
                    prompt_token_ids: prompt,
                    receiver,
                })
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(InferenceError::Busy {
                queued: self.config.max_queue,
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(InferenceError::Shutdown),
        }
    }

    /// Tokens picked under a constraint so far, and the time spent on
    /// their masks and grammars (what constrained decoding costs).
    pub fn mask_stats(&self) -> (u64, Duration) {
        (
            self.counters.masked_tokens.load(Ordering::Relaxed),
            Duration::from_nanos(self.counters.mask_nanos.load(Ordering::Relaxed)),
        )
    }

    /// Whether the scheduler thread still runs (it stops only on a panic).
    pub fn is_running(&self) -> bool {
        !self.queue.is_closed()
    }

    /// Current load.
    pub fn load(&self) -> EngineLoad {
        EngineLoad {
            active: self.counters.active.load(Ordering::Relaxed),
            queued: self.counters.queued.load(Ordering::Relaxed),
            stalled: self.counters.stalled.load(Ordering::Relaxed),
            max_batch: self.config.max_batch,
            decode_tokens_per_s: f64::from_bits(self.counters.decode_tps.load(Ordering::Relaxed)),
            prefix_cache_bytes: self.counters.prefix_bytes.load(Ordering::Relaxed),
            cached_tokens: self.counters.cached_tokens.load(Ordering::Relaxed),
        }
    }
}

struct Sequence<B: Backend> {
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    consumed: usize,
    /// Of those, how many came from the prefix cache.
    cached: usize,
    /// Ended with its `Done` event: its cache is sound to keep.
    done: bool,
    cache: KvCache<B>,
    sampler: Sampler,
    /// What the penalties look at: the prompt and the answer so far.
    history: History,
    /// The answer's grammar, when the request has a constraint.
    matcher: Option<Matcher>,
    /// The prompt's log-probabilities so far, when the request scores it.
    prompt_logprobs: Vec<TokenLogprob>,
    request: GenerateRequest,
    sender: mpsc::Sender<Event>,
    decoder: IncrementalDecoder,
    /// Generated text not yet sent because it may start a stop string.
    held: String,
    /// Continuation tokens still to feed back (see
    /// [`GenerateRequest::continuation`]).
    replay: VecDeque<u32>,
    /// How many continuation tokens the request carried.
    carried: usize,
    generated: usize,
    /// The last sampled token, fed back at the next decode step.
    next_input: Option<u32>,
    /// An event the reader had no room for.
    pending: Option<Event>,
    finished: bool,
    reserved_bytes: usize,
    enqueued: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    /// The logits after the last prompt token, once the prompt is read: a
    /// request with the same prompt forks from this sequence (copies its
    /// prompt's keys and values and samples from this row) instead of
    /// reading the prompt again (see [`Scheduler::fork_point`]).
    prompt_row: Option<Arc<[f32]>>,
}

struct Scheduler<B: Backend> {
    transformer: Transformer<B>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    counters: Arc<Counters>,
    jobs: mpsc::Receiver<Job>,
    /// Jobs taken off the channel that did not fit yet, or whose wait in
    /// `parked` is over.
    waiting: VecDeque<Job>,
    /// Jobs waiting for a sequence in the batch to finish reading a prompt
    /// they share, to copy it rather than compute it alongside (see
    /// [`Scheduler::worth_waiting`]), in arrival order.
    parked: Vec<Job>,
    active: Vec<Sequence<B>>,
    /// Finished sequences' caches, for requests that share their prefix.
    prefix: PrefixCache<B>,
    kv_bytes_per_token: usize,
}

impl<B: Backend> Scheduler<B> {
    fn run(mut self) {
        let _span = tracing::info_span!("engine").entered();
        loop {
            if !self.admit() {
                return;
            }
            self.flush_pending();
            self.retire();
            self.counters
                .active
                .store(self.active.len(), Ordering::Relaxed);
            let stalled = self.active.iter().filter(|s| s.pending.is_some()).count();
            self.counters.stalled.store(stalled, Ordering::Relaxed);
            if self.active.is_empty() {
                continue;
            }
            self.step();
        }
    }

    /// Drops finished and abandoned sequences; the caches of those that
    /// finished go to the prefix cache (moved, not copied).
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let seq = &self.active[i];
            if !seq.finished && !seq.sender.is_closed() {
                i += 1;
                continue;
            }
            let seq = self.active.swap_remove(i);
            if seq.done && seq.request.prompt_logprobs.is_none() {
                self.prefix.insert(&seq.prompt, seq.cache, seq.prompt_row);
                self.counters
                    .prefix_bytes
                    .store(self.prefix.used_bytes(), Ordering::Relaxed);
            }
        }
    }

    fn reserved(&self) -> usize {
        self.active.iter().map(|s| s.reserved_bytes).sum()
    }

    /// Moves queued jobs into the batch while there is room. Blocks when
    /// there is nothing to do. Returns false when the engine is dropped and
    /// every request is done.
    fn admit(&mut self) -> bool {
        // Parked jobs whose wait is over go first, in arrival order.
        let mut i = 0;
        while i < self.parked.len() {
            if self.worth_waiting(&self.parked[i]) {
                i += 1;
            } else {
                let job = self.parked.remove(i);
                self.waiting.push_back(job);
            }
        }
        loop {
            if self.active.len() >= self.config.max_batch {
                return true;
            }
            let job = match self.waiting.pop_front() {
                Some(job) => job,
                None if self.active.is_empty() => match self.jobs.blocking_recv() {
                    Some(job) => job,
                    None => return false,
                },
                None => match self.jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => return true,
                },
            };
            if job.sender.is_closed() {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            if self.worth_waiting(&job) {
                self.parked.push(job);
                continue;
            }
            let context = self.transformer.config().max_position_embeddings;
            let worst =
                (job.prompt.len() + job.request.continuation.len() + job.request.max_tokens)
                    .min(context);
            let bytes = worst * self.kv_bytes_per_token;
            if !self.active.is_empty() && self.reserved() + bytes > self.config.kv_budget_bytes {
                self.waiting.push_front(job);
                return true;
            }
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            let now = Instant::now();
            // The continuation's text was sent by whoever generated it;
            // all the decoder may still owe is the tail of a character
            // split across the seam.
            let replay: VecDeque<u32> = job.request.continuation.iter().copied().collect();
            let carried = replay.len();
            let mut decoder = IncrementalDecoder::default();
            for &id in &job.request.continuation {
                let _ = decoder.push(&self.tokenizer, id);
            }
            // The same prompt in the batch, already read: fork from it. A
            // request that scores its prompt needs every position's logits,
            // so it computes them all; one that goes on after a
            // continuation feeds it after the prompt itself.
            let plain =
                job.request.prompt_logprobs.is_none() && job.request.continuation.is_empty();
            let fork = plain.then(|| self.fork_point(&job.prompt)).flatten();
            let (cache, cached, prompt_row) = match fork {
                Some((cache, row)) => (cache, job.prompt.len(), Some(row)),
                None => {
                    let (cache, cached) = match job.request.prompt_logprobs {
                        None => self.shared_prefix(&job.prompt),
                        Some(_) => None,
                    }
                    .unwrap_or_else(|| (self.transformer.new_cache(), 0));
                    (cache, cached, None)
                }
            };
            self.counters
                .cached_tokens
                .fetch_add(cached as u64, Ordering::Relaxed);
            self.active.push(Sequence {
                cache,
                cached,
                done: false,
                sampler: Sampler::new(job.request.sampling.clone()),
                history: History::new(&job.prompt),
                matcher: job.matcher,
                prompt_logprobs: Vec::new(),
                prompt: job.prompt,
                consumed: cached,
                request: job.request,
                sender: job.sender,
                decoder,
                held: String::new(),
                replay,
                carried,
                generated: 0,
                next_input: None,
                pending: None,
                finished: false,
                reserved_bytes: bytes,
                enqueued: job.enqueued,
                admitted: now,
                first_token: None,
                prompt_row: prompt_row.clone(),
            });
            // A fork's first token comes from the row it shares.
            if let Some(row) = prompt_row {
                self.choose(self.active.len() - 1, &row);
            }
        }
    }

    /// A running sequence whose whole prompt is `prompt` and has been
    /// read, or else a prefix cache entry of exactly that prompt: a copy of
    /// its prompt's keys and values, and the logits after it. The `n`
    /// choices of one request are `n` requests with one prompt; the first
    /// reads it, the others start here, sharing its prefill.
    fn fork_point(&mut self, prompt: &[u32]) -> Option<(KvCache<B>, Arc<[f32]>)> {
        self.active
            .iter()
            .filter(|s| !s.finished && s.prompt == prompt)
            .find_map(|s| {
                let row = s.prompt_row.as_ref()?;
                Some((s.cache.snapshot(prompt.len()), Arc::clone(row)))
            })
            .or_else(|| self.prefix.fork(prompt))
    }

    /// The longest start of `prompt` whose keys and values are already
    /// computed, copied, and its length: from the prefix cache, or from a
    /// sequence still running whose prompt starts the same way (a burst
    /// of requests with one system prompt shares it while the first is
    /// still answering). Only a running sequence's own prompt positions
    /// are taken, in whole prefill chunks, as the prefix cache does.
    fn shared_prefix(&mut self, prompt: &[u32]) -> Option<(KvCache<B>, usize)> {
        match self.running_share(prompt) {
            Some((n, seq)) if n > 0 && n > self.prefix.shared_len(prompt) => {
                Some((seq.cache.snapshot(n), n))
            }
            _ => self.prefix.lookup(prompt),
        }
    }

    /// The running sequence holding the most whole chunks of `prompt`
    /// already computed, and how many positions that is.
    fn running_share(&self, prompt: &[u32]) -> Option<(usize, &Sequence<B>)> {
        let align = self.config.prefill_chunk;
        self.active
            .iter()
            .filter(|s| !s.finished && s.request.prompt_logprobs.is_none())
            .map(|s| {
                let computed = &s.prompt[..s.consumed.min(s.prompt.len())];
                (reusable_len(computed, prompt, align), s)
            })
            .max_by_key(|(n, _)| *n)
    }

    /// Whether `job` gains by waiting: a sequence in the batch is still
    /// reading a prompt that shares more whole chunks with `job`'s than
    /// `job` could copy now, or is `job`'s very prompt (which `job` then
    /// forks from whole). Waiting costs `job` little: alongside, it would
    /// compute the same chunks in the same passes, making them slower. A
    /// burst with one system prompt reads it once, not once per request.
    fn worth_waiting(&self, job: &Job) -> bool {
        if job.request.prompt_logprobs.is_some() {
            return false;
        }
        let align = self.config.prefill_chunk;
        let plain = job.request.continuation.is_empty();
        let mut have = None;
        for s in self.active.iter().filter(|s| {
            !s.finished && s.request.prompt_logprobs.is_none() && s.consumed < s.prompt.len()
        }) {
            let want = if plain && s.prompt == job.prompt {
                s.prompt.len()
            } else {
                reusable_len(&s.prompt, &job.prompt, align)
            };
            if want == 0 || s.consumed >= want {
                continue;
            }
            let have = *have.get_or_insert_with(|| self.available(&job.prompt, plain));
            if want > have {
                return true;
            }
        }
        false
    }

    /// How many positions of `prompt` a request could copy now: all of
    /// them when it can fork (`plain`: no continuation), else the most
    /// whole chunks a running sequence or the prefix cache holds.
    fn available(&self, prompt: &[u32], plain: bool) -> usize {
        let forkable = plain
            && (self
                .active
                .iter()
                .any(|s| !s.finished && s.prompt == prompt && s.prompt_row.is_some())
                || self.prefix.holds_whole(prompt));
        if forkable {
            return prompt.len();
        }
        let running = self.running_share(prompt).map_or(0, |(n, _)| n);
        running.max(self.prefix.shared_len(prompt))
    }

    fn flush_pending(&mut self) {
        for seq in &mut self.active {
            if let Some(event) = seq.pending.take() {
                match seq.sender.try_send(event) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(event)) => seq.pending = Some(event),
                    Err(mpsc::error::TrySendError::Closed(_)) => seq.finished = true,
                }
            }
        }
    }

    fn step(&mut self) {
        // Fault tests make a forward pass panic here.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("engine-step");
        let started = Instant::now();
        let chunk = self.config.prefill_chunk;
        // Which sequences take part, and with which tokens.
        let mut inputs: Vec<(usize, Vec<u32>)> = Vec::with_capacity(self.active.len());
        for (i, seq) in self.active.iter().enumerate() {
            if seq.pending.is_some() {
                continue;
            }
            if seq.consumed < seq.prompt.len() {
                let end = (seq.consumed + chunk).min(seq.prompt.len());
                inputs.push((i, seq.prompt[seq.consumed..end].to_vec()));
            } else if let Some(t) = seq.next_input {
                inputs.push((i, vec![t]));
            }
        }
        if inputs.is_empty() {
            // Every request waits on its reader; don't spin.
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        let vocab = self.transformer.config().vocab_size;
        // A request that scores its prompt needs every position's logits
        // while its prompt is read; then the step computes them for every
        // segment (each one's last row is still its next-token row).
        let all_positions = inputs.iter().any(|(i, _)| {
            let seq = &self.active[*i];
            seq.request.prompt_logprobs.is_some() && seq.consumed < seq.prompt.len()
        });
        let logits = {
            let mut picked: Vec<&mut Sequence<B>> = Vec::with_capacity(inputs.len());
            let mut rest: &mut [Sequence<B>] = &mut self.active;
            let mut offset = 0;
            for (i, _) in &inputs {
                let (_, tail) = rest.split_at_mut(i - offset);
                let (head, tail) = tail.split_at_mut(1);
                picked.push(&mut head[0]);
                rest = tail;
                offset = i + 1;
            }
            let mut segments: Vec<Segment<'_, B>> = picked
                .into_iter()
                .zip(&inputs)
                .map(|(seq, (_, tokens))| Segment {
                    tokens,
                    cache: &mut seq.cache,
                })
                .collect();
            let out = self.transformer.forward(&mut segments, all_positions);
            out.into_data().to_vec::<f32>()
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                for (i, _) in &inputs {
                    let seq = &mut self.active[*i];
                    let _ = seq
                        .sender
                        .try_send(Event::Error(format!("reading logits failed: {e:?}")));
                    seq.finished = true;
                }
                return;
            }
        };
        let mut decoded = 0usize;
        let mut first_row = 0usize;
        for (i, tokens) in &inputs {
            let seq = &mut self.active[*i];
            // This segment's rows: one per token with every position, else
            // its last.
            let rows = if all_positions { tokens.len() } else { 1 };
            let segment = &logits[first_row * vocab..(first_row + rows) * vocab];
            first_row += rows;
            let row = &segment[(rows - 1) * vocab..];
            if seq.consumed < seq.prompt.len() {
                if let Some(k) = seq.request.prompt_logprobs {
                    // Row j predicts the prompt token after position
                    // consumed + j.
                    for j in 0..tokens.len() {
                        let Some(&next) = seq.prompt.get(seq.consumed + j + 1) else {
                            break;
                        };
                        let (logprob, top) = crate::sampling::logprobs(
                            &segment[j * vocab..(j + 1) * vocab],
                            next,
                            usize::from(k),
                        );
                        seq.prompt_logprobs.push(token_logprob(
                            &self.tokenizer,
                            next,
                            logprob,
                            top,
                        ));
                    }
                }
                seq.consumed += tokens.len();
                if seq.consumed < seq.prompt.len() {
                    continue;
                }
                // A pass that computed every position's logits may have
                // taken other kernels: only a plain prefill's row is shared.
                if seq.request.prompt_logprobs.is_none() {
                    seq.prompt_row = Some(Arc::from(row));
                }
                if seq.request.prompt_logprobs.is_some() {
                    let scored = std::mem::take(&mut seq.prompt_logprobs);
                    if seq.sender.try_send(Event::PromptLogprobs(scored)).is_err() {
                        // The first event of a stream finds room unless the
                        // reader is gone.
                        seq.finished = true;
                        continue;
                    }
                    if seq.request.max_tokens == 0 {
                        self.finish_scored(*i);
                        continue;
                    }
                }
            } else {
                decoded += 1;
            }
            self.choose(*i, row);
        }
        if decoded > 0 {
            let tps = decoded as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let old = f64::from_bits(self.counters.decode_tps.load(Ordering::Relaxed));
            let new = if old == 0.0 {
                tps
            } else {
                0.8 * old + 0.2 * tps
            };
            self.counters
                .decode_tps
                .store(new.to_bits(), Ordering::Relaxed);
        }
    }

    /// Picks sequence `index`'s next token from `row`, its logits: the
    /// continuation's next token when it replays one, else a sample
    /// (masked by its grammar when it has one); then emits it.
    fn choose(&mut self, index: usize, row: &[f32]) {
        let seq = &mut self.active[index];
        if let Some(carried) = seq.replay.pop_front() {
            // This step made `carried` on the engine that began the
            // answer: feed it back instead of drawing one here (the
            // sampler still draws, so a seeded run keeps its stream).
            let _ = seq.sampler.sample(row, &seq.history);
            seq.next_input = Some(carried);
            seq.history.push(carried);
            if let Some(m) = seq.matcher.as_mut() {
                if let Err(e) = m.consume_token(carried) {
                    let _ = seq.sender.try_send(Event::Error(format!(
                        "the continuation does not fit the response format: {e}"
                    )));
                    seq.finished = true;
                }
            }
            return;
        }
        let mut grammar_time = Duration::ZERO;
        let token = match seq.matcher.as_mut() {
            None => seq.sampler.sample(row, &seq.history),
            Some(m) => {
                let mut masked = row.to_vec();
                let started = Instant::now();
                let masking = apply_mask(m, &mut masked);
                grammar_time += started.elapsed();
                match masking {
                    Ok(()) => seq.sampler.sample(&masked, &seq.history),
                    Err(e) => {
                        let _ = seq.sender.try_send(Event::Error(e.to_string()));
                        seq.finished = true;
                        return;
                    }
                }
            }
        };
        seq.history.push(token);
        let complete = match seq.matcher.as_mut() {
            None => false,
            Some(m) => {
                let started = Instant::now();
                let consumed = m.consume_token(token);
                grammar_time += started.elapsed();
                match consumed {
                    Ok(()) => {
                        let nanos = u64::try_from(grammar_time.as_nanos()).unwrap_or(u64::MAX);
                        self.counters.mask_nanos.fetch_add(nanos, Ordering::Relaxed);
                        self.counters.masked_tokens.fetch_add(1, Ordering::Relaxed);
                        m.is_stopped()
                    }
                    Err(e) => {
                        let _ = seq
                            .sender
                            .try_send(Event::Error(format!("constrained decoding: {e}")));
                        seq.finished = true;
                        return;
                    }
                }
            }
        };
        let logprob = seq
            .request
            .logprobs
            .map(|k| crate::sampling::logprobs(row, token, usize::from(k)));
        self.emit(index, token, logprob, complete);
    }

    /// Handles one sampled token: stop checks, text, events.
    /// `complete`: the answer's grammar is satisfied and allows nothing
    /// more, so it ends here.
    fn emit(
        &mut self,
        index: usize,
        token: u32,
        logprob: Option<(f32, Vec<(u32, f32)>)>,
        complete: bool,
    ) {
        let tokenizer = self.tokenizer.clone();
        let context = self.transformer.config().max_position_embeddings;
        let seq = &mut self.active[index];
        let now = Instant::now();
        if seq.first_token.is_none() {
            seq.first_token = Some(now);
        }
        seq.generated += 1;
        seq.next_input = Some(token);
        let is_stop_token = !seq.request.ignore_eos && tokenizer.stop_ids().contains(&token);
        let mut finish = None;
        let mut text = String::new();
        if is_stop_token {
            finish = Some(FinishReason::Stop);
        } else {
            match seq.decoder.push(&tokenizer, token) {
                Ok(Some(delta)) => seq.held.push_str(&delta),
                Ok(None) => {}
                Err(e) => {
                    let _ = seq.sender.try_send(Event::Error(e.to_string()));
                    seq.finished = true;
                    return;
                }
            }
            if complete {
                text = std::mem::take(&mut seq.held);
                finish = Some(FinishReason::Stop);
            } else if let Some(pos) = earliest_stop(&seq.held, &seq.request.stop) {
                seq.held.truncate(pos);
                text = std::mem::take(&mut seq.held);
                finish = Some(FinishReason::Stop);
            } else {
                let keep = stop_prefix_len(&seq.held, &seq.request.stop);
                text = seq.held[..seq.held.len() - keep].to_string();
                seq.held.drain(..seq.held.len() - keep);
            }
        }
        if finish.is_none()
            && (seq.generated >= seq.request.max_tokens
                || seq.prompt.len() + seq.carried + seq.generated >= context)
        {
            finish = Some(FinishReason::Length);
            text.push_str(&std::mem::take(&mut seq.held));
        }
        let logprob = logprob
            .filter(|_| !is_stop_token)
            .map(|(lp, top)| token_logprob(&tokenizer, token, lp, top));
        let token_event = Event::Token {
            id: token,
            text,
            logprob,
        };
        match seq.sender.try_send(token_event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => seq.pending = Some(event),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                seq.finished = true;
                return;
            }
        }
        if let Some(reason) = finish {
            let first = seq.first_token.unwrap_or(now);
            let decode_secs = now.duration_since(first).as_secs_f64();
            let usage = Usage {
                prompt_tokens: seq.prompt.len() + seq.carried,
                completion_tokens: seq.generated,
                finish_reason: reason,
                prefill_ms: first.duration_since(seq.admitted).as_secs_f64() * 1e3,
                queue_ms: seq.admitted.duration_since(seq.enqueued).as_secs_f64() * 1e3,
                cached_tokens: seq.cached,
                decode_tokens_per_s: if seq.generated > 1 && decode_secs > 0.0 {
                    (seq.generated - 1) as f64 / decode_secs
                } else {
                    0.0
                },
            };
            // The final record must not be lost to a full buffer: if the
            // token is still pending, the reader is slow; hand both over on
            // a helper path that waits.
            let sender = seq.sender.clone();
            match seq.pending.take() {
                None => {
                    if let Err(mpsc::error::TrySendError::Full(ev)) =
                        sender.try_send(Event::Done(usage))
                    {
                        deliver_later(sender, vec![ev]);
                    }
                }
                Some(pending) => deliver_later(sender, vec![pending, Event::Done(usage)]),
            }
            seq.finished = true;
            seq.done = true;
        }
    }
}

impl<B: Backend> Scheduler<B> {
    /// Ends a request that only scored its prompt (`max_tokens` 0).
    fn finish_scored(&mut self, index: usize) {
        let seq = &mut self.active[index];
        let now = Instant::now();
        let usage = Usage {
            prompt_tokens: seq.prompt.len(),
            completion_tokens: 0,
            finish_reason: FinishReason::Length,
            prefill_ms: now.duration_since(seq.admitted).as_secs_f64() * 1e3,
            queue_ms: seq.admitted.duration_since(seq.enqueued).as_secs_f64() * 1e3,
            cached_tokens: seq.cached,
            decode_tokens_per_s: 0.0,
        };
        if let Err(mpsc::error::TrySendError::Full(ev)) = seq.sender.try_send(Event::Done(usage)) {
            deliver_later(seq.sender.clone(), vec![ev]);
        }
        seq.finished = true;
    }
}

/// A token's log-probability with its bytes and its alternatives'.
fn token_logprob(
    tokenizer: &Tokenizer,
    token: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
) -> TokenLogprob {
    TokenLogprob {
        bytes: tokenizer.token_bytes(token),
        logprob,
        top: top
            .into_iter()
            .map(|(id, logprob)| TopLogprob {
                id,
                bytes: tokenizer.token_bytes(id),
                logprob,
            })
            .collect(),
    }
}

/// Sends the last events of a finished request from a short-lived thread,
/// so the scheduler never blocks on a slow reader.
fn deliver_later(sender: mpsc::Sender<Event>, events: Vec<Event>) {
    let spawned = std::thread::Builder::new()
        .name("silk-engine-tail".into())
        .spawn(move || {
            for event in events {
                if sender.blocking_send(event).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("could not deliver the end of a stream: {e}");
    }
}

/// Byte position of the earliest stop string in `text`.
fn earliest_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop
/// string (that text must be held back until we know).
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if i > best && text.ends_with(&stop[..i]) {
                best = i;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_their_prefixes_held_back() {
        let stops = vec!["</end>".to_string(), "STOP".to_string()];
        assert_eq!(earliest_stop("abc STOP x </end>", &stops), Some(4));
        assert_eq!(earliest_stop("nothing", &stops), None);
        assert_eq!(stop_prefix_len("hello </e", &stops), 3);
        assert_eq!(stop_prefix_len("hello ST", &stops), 2);
        assert_eq!(stop_prefix_len("hello", &stops), 0);
    }
}

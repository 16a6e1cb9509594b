//! Request bodies of the OpenAI-compatible API and their validation.
//! Unknown fields are refused (`deny_unknown_fields`), as are values out of
//! range, with OpenAI's error shape and a 4xx status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use silk_inference::{ChatMessage, Constraint, SamplingParams, Tool, ToolCall};

use crate::protocol::WirePrompt;

/// Default `max_tokens` of a chat completion.
pub const DEFAULT_CHAT_MAX_TOKENS: u32 = 256;
/// Default `max_tokens` of a text completion (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;
/// Largest `max_tokens` accepted.
pub const MAX_TOKENS_LIMIT: u32 = 8192;
/// Most stop strings.
pub const MAX_STOP: usize = silk_inference::MAX_STOP_STRINGS;
/// Most choices (`n`) one request may ask for.
pub const MAX_N: u32 = 8;

/// An OpenAI-style error: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    param: Option<&'static str>,
    message: String,
    /// `Retry-After`, in seconds.
    retry_after_s: Option<u64>,
}

impl ApiError {
    /// An error with a status, type, code and message.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// The same error with a `Retry-After` of `secs` seconds.
    pub fn with_retry_after(self, secs: u64) -> Self {
        Self {
            retry_after_s: Some(secs),
            ..self
        }
    }

    /// The request field it names, if any.
    pub fn param(&self) -> Option<&'static str> {
        self.param
    }

    /// Its HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The same error naming the request field it is about.
    pub fn with_param(self, param: &'static str) -> Self {
        Self {
            param: Some(param),
            ..self
        }
    }

    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                message,
            )
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_s {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        r
    }
}

/// Parses a JSON body, mapping serde errors (unknown fields, wrong types) to a 400.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            format!("invalid request body: {e}"),
        )
    })
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Usage is always sent in the last chunk; accepted for compatibility.
    pub include_usage: Option<bool>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool` (or `developer`, treated as
    /// `system`).
    pub role: String,
    /// The text, or a list of content parts (what most current clients
    /// send); read by [`content_text`].
    pub content: Option<serde_json::Value>,
    /// Participant name, passed to templates that use it.
    pub name: Option<String>,
    /// The calls an assistant message made.
    pub tool_calls: Option<Vec<MessageToolCall>>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
    /// An assistant's refusal (accepted, and read as its content when it
    /// has none).
    pub refusal: Option<String>,
    /// Fields of the SDKs' own response messages, which clients hand back
    /// as they got them (`messages.append(completion.choices[0].message)`):
    /// accepted and not used.
    pub annotations: Option<serde::de::IgnoredAny>,
    /// See `annotations`.
    pub audio: Option<serde::de::IgnoredAny>,
    /// See `annotations` (the openai SDK's `parse()` result).
    pub parsed: Option<serde::de::IgnoredAny>,
    /// See `annotations` (the deprecated single call).
    pub function_call: Option<serde::de::IgnoredAny>,
}

/// `messages[].tool_calls[]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageToolCall {
    /// The call's id, which a later `tool` message answers.
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The function called.
    pub function: FunctionCall,
}

/// `messages[].tool_calls[].function`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, as JSON text.
    pub arguments: String,
    /// What the openai SDK's `parse()` adds to a call it hands back:
    /// accepted and not used.
    pub parsed_arguments: Option<serde::de::IgnoredAny>,
}

/// `tools[]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolDefinition {
    /// `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDefinition,
}

/// `tools[].function`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDefinition {
    /// 1 to 64 letters, digits, `_` or `-`.
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// Its arguments' JSON schema; absent, it takes none.
    pub parameters: Option<serde_json::Value>,
    /// Accepted: with `tool_choice` `required` or naming the function the
    /// arguments always match the schema; with `auto` the model writes
    /// them freely.
    pub strict: Option<bool>,
}

/// `tool_choice`: `none`, `auto`, `required`, or
/// `{"type": "function", "function": {"name": …}}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `none`, `auto` or `required`.
    Mode(String),
    /// One named function.
    Named(NamedToolChoice),
}

/// `tool_choice` naming a function.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedToolChoice {
    /// `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: NamedFunction,
}

/// `tool_choice.function`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    /// Its name.
    pub name: String,
}

/// Text parts join with a newline, as vLLM joins them for text-only models.
const PART_SEPARATOR: &str = "\n";

/// The text of message `index`'s `content`: a string as it is, a list of
/// `text` parts joined by a newline. An `image_url`, `input_audio` or
/// `file` part is refused naming `model` (the request's, or the default):
/// every model the mesh serves today reads text only. Anything else is
/// refused saying what was expected.
fn content_text(
    content: serde_json::Value,
    model: Option<&str>,
    index: usize,
) -> Result<String, ApiError> {
    use serde_json::Value;
    let bad = |message: String| Err(ApiError::invalid("messages", message));
    let parts = match content {
        Value::Null => return Ok(String::new()),
        Value::String(text) => return Ok(text),
        Value::Array(parts) => parts,
        _ => {
            return bad(format!(
                "messages[{index}].content must be a string or a list of content parts"
            ))
        }
    };
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.into_iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        match (kind, part.get("text")) {
            ("text", Some(Value::String(text))) => texts.push(text.clone()),
            ("text", _) => {
                return bad(format!(
                    "messages[{index}].content[{j}] is a text part without a `text` string"
                ))
            }
            ("image_url" | "input_audio" | "file", _) => {
                let model =
                    model.map_or_else(|| "the default model".to_string(), |m| format!("model `{m}`"));
                return bad(format!(
                    "messages[{index}] has an `{kind}` part, but {model} takes text only: send text parts"
                ));
            }
            _ => {
                return bad(format!(
                    "messages[{index}].content[{j}] has no known `type` (got {kind:?}): use {{\"type\":\"text\",\"text\":…}}"
                ))
            }
        }
    }
    Ok(texts.join(PART_SEPARATOR))
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// Model id or name; without it, the pinned model (or the mesh's only one).
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// 0 to 2.
    pub temperature: Option<f32>,
    /// (0, 1].
    pub top_p: Option<f32>,
    /// Must be 1.
    pub n: Option<u32>,
    /// Stream with SSE.
    pub stream: Option<bool>,
    /// Stream options.
    pub stream_options: Option<StreamOptions>,
    /// Up to 4 stop strings.
    pub stop: Option<Stop>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// End-user id (ignored).
    pub user: Option<String>,
    /// -2 to 2: lowers every token the answer already holds, once.
    pub presence_penalty: Option<f32>,
    /// -2 to 2: lowers a token once per time the answer holds it.
    pub frequency_penalty: Option<f32>,
    /// (0, 2], 1 is off: vLLM's penalty on every token of the prompt and
    /// the answer.
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) to a bias from -100 to 100 added to its logit.
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// [0, 1]: drops tokens less likely than this share of the best one.
    pub min_p: Option<f32>,
    /// Keep only the k most likely tokens; 0 or absent keeps all (vLLM's).
    pub top_k: Option<u32>,
    /// Generate past end-of-sequence (vLLM extension).
    pub ignore_eos: Option<bool>,
    /// Highest worker price coefficient to pay (silk extension; e.g. `1.5`,
    /// at most three decimals). Default: the node's configured maximum.
    pub max_coefficient: Option<f64>,
    /// Return each answer token's log-probability.
    pub logprobs: Option<bool>,
    /// With `logprobs`, also the 0 to 20 most likely tokens at each step.
    pub top_logprobs: Option<u32>,
    /// What the answer must parse as, enforced by the worker's sampler.
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call.
    pub tools: Option<Vec<ToolDefinition>>,
    /// Whether and which to call (default `auto` with tools).
    pub tool_choice: Option<ToolChoice>,
    /// Whether an answer may make several calls (default true).
    pub parallel_tool_calls: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// Model id or name.
    pub model: Option<String>,
    /// The prompt: a string or a list with exactly one string.
    pub prompt: PromptInput,
    /// Most tokens to generate (default 16).
    pub max_tokens: Option<u32>,
    /// 0 to 2.
    pub temperature: Option<f32>,
    /// (0, 1].
    pub top_p: Option<f32>,
    /// Must be 1.
    pub n: Option<u32>,
    /// Stream with SSE.
    pub stream: Option<bool>,
    /// Stream options.
    pub stream_options: Option<StreamOptions>,
    /// Up to 4 stop strings.
    pub stop: Option<Stop>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// End-user id (ignored).
    pub user: Option<String>,
    /// -2 to 2: lowers every token the answer already holds, once.
    pub presence_penalty: Option<f32>,
    /// -2 to 2: lowers a token once per time the answer holds it.
    pub frequency_penalty: Option<f32>,
    /// (0, 2], 1 is off: vLLM's penalty on every token of the prompt and
    /// the answer.
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) to a bias from -100 to 100 added to its logit.
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// [0, 1]: drops tokens less likely than this share of the best one.
    pub min_p: Option<f32>,
    /// Keep only the k most likely tokens; 0 or absent keeps all (vLLM's).
    pub top_k: Option<u32>,
    /// Generate past end-of-sequence (vLLM extension).
    pub ignore_eos: Option<bool>,
    /// Highest worker price coefficient to pay (silk extension; e.g. `1.5`,
    /// at most three decimals). Default: the node's configured maximum.
    pub max_coefficient: Option<f64>,
    /// Return each answer token's log-probability and this many (0 to 20)
    /// most likely tokens at each step.
    pub logprobs: Option<u32>,
    /// What the answer must parse as (vLLM takes it here too).
    pub response_format: Option<ResponseFormat>,
    /// Put the prompt before the answer, with its tokens' log-probabilities
    /// when `logprobs` is given; with `max_tokens: 0` the prompt is only
    /// scored (what evaluation harnesses do).
    pub echo: Option<bool>,
}

/// `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
}

/// `response_format.json_schema`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// 1 to 64 letters, digits, `_` or `-`.
    pub name: String,
    /// Accepted and not used.
    pub description: Option<String>,
    /// The JSON schema; absent, any JSON value.
    pub schema: Option<serde_json::Value>,
    /// Accepted: silk enforces every schema as OpenAI's strict mode does.
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// The constraint the worker enforces, after the checks the gateway
    /// can make itself (the worker compiles the schema and refuses what
    /// llguidance cannot enforce).
    fn constraint(self) -> Result<Option<Constraint>, ApiError> {
        match self {
            ResponseFormat::Text => Ok(None),
            ResponseFormat::JsonObject => Ok(Some(Constraint::JsonObject)),
            ResponseFormat::JsonSchema { json_schema } => {
                let name_ok = (1..=64).contains(&json_schema.name.len())
                    && json_schema
                        .name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !name_ok {
                    return Err(ApiError::invalid(
                        "response_format",
                        "response_format.json_schema.name must be 1 to 64 letters, digits, _ or -",
                    ));
                }
                let schema = json_schema.schema.unwrap_or_else(|| json!({}));
                if !schema.is_object() {
                    return Err(ApiError::invalid(
                        "response_format",
                        "response_format.json_schema.schema must be a JSON object",
                    ));
                }
                let text = schema.to_string();
                if text.len() > silk_inference::constraint::MAX_SCHEMA_BYTES {
                    return Err(ApiError::invalid(
                        "response_format",
                        format!(
                            "response_format.json_schema.schema is {} bytes, at most {} are allowed",
                            text.len(),
                            silk_inference::constraint::MAX_SCHEMA_BYTES
                        ),
                    ));
                }
                Ok(Some(Constraint::JsonSchema(text)))
            }
        }
    }
}

/// A completion prompt.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One string.
    One(String),
    /// A list (exactly one string accepted).
    Many(Vec<String>),
}

/// A validated request, ready to dispatch.
#[derive(Debug)]
pub struct Validated {
    /// Model as named.
    pub model: Option<String>,
    /// Prompt.
    pub prompt: WirePrompt,
    /// Most tokens.
    pub max_tokens: u32,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream.
    pub stream: bool,
    /// Ignore EOS.
    pub ignore_eos: bool,
    /// `max_coefficient` × 1000.
    pub max_coefficient_milli: Option<u32>,
    /// Log-probabilities with this many alternatives per token.
    pub logprobs: Option<u8>,
    /// What the answer must parse as.
    pub constraint: Option<Constraint>,
    /// The functions whose calls are read out of the answer (empty: the
    /// answer is all text).
    pub tools: Vec<Tool>,
    /// `echo`: the prompt text to put before the answer.
    pub echo: Option<String>,
    /// Score the prompt with this many alternatives per token.
    pub prompt_logprobs: Option<u8>,
    /// Choices to generate (1 to [`MAX_N`]).
    pub n: u32,
}

/// Checks a count of alternative tokens asked log-probabilities for.
fn check_top_logprobs(param: &'static str, k: u32) -> Result<u8, ApiError> {
    u8::try_from(k)
        .ok()
        .filter(|&k| k <= silk_inference::MAX_TOP_LOGPROBS)
        .ok_or_else(|| {
            ApiError::invalid(
                param,
                format!(
                    "{param} must be between 0 and {}, got {k}",
                    silk_inference::MAX_TOP_LOGPROBS
                ),
            )
        })
}

/// Largest `max_coefficient` accepted.
pub const MAX_COEFFICIENT: f64 = 1000.0;

fn check_max_coefficient(v: Option<f64>) -> Result<Option<u32>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    let milli = (v * 1000.0).round();
    if !(v > 0.0 && v <= MAX_COEFFICIENT) || (v * 1000.0 - milli).abs() > 1e-6 {
        return Err(ApiError::invalid(
            "max_coefficient",
            format!(
                "max_coefficient must be in (0, {MAX_COEFFICIENT}] with at most three decimals, got {v}"
            ),
        ));
    }
    Ok(Some(milli as u32))
}

struct Common {
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<u32>,
    stop: Option<Stop>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    min_p: Option<f32>,
    top_k: Option<u32>,
}

/// The sampling fields past temperature and top-p: parsed, and checked by
/// the engine's own rules (the worker checks them again), the error naming
/// the field.
fn check_sampling(
    c: &mut Common,
    temperature: f32,
    top_p: f32,
) -> Result<SamplingParams, ApiError> {
    let mut logit_bias = Vec::new();
    for (key, &bias) in c.logit_bias.iter().flatten() {
        let id = key.parse::<u32>().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("logit_bias keys are token ids, got {key:?}"),
            )
        })?;
        logit_bias.push((id, bias));
    }
    let sampling = SamplingParams {
        temperature,
        top_p,
        top_k: c.top_k.unwrap_or(0) as usize,
        seed: c.seed,
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        min_p: c.min_p.unwrap_or(0.0),
        logit_bias,
    };
    match sampling.validate() {
        Ok(()) => Ok(sampling),
        Err(silk_inference::InferenceError::InvalidRequest { field, reason }) => {
            Err(ApiError::invalid(field, format!("{field} {reason}")))
        }
        Err(e) => Err(ApiError::invalid("sampling", e.to_string())),
    }
}

fn check_common(
    mut c: Common,
    default_max: u32,
    scoring: bool,
) -> Result<(u32, SamplingParams, Vec<String>, u32), ApiError> {
    let max_tokens = c.max_tokens.unwrap_or(default_max);
    if max_tokens == 0 && !scoring {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got 0 (0 only scores a prompt: completions with echo)"
            ),
        ));
    }
    if max_tokens > MAX_TOKENS_LIMIT {
        return Err(ApiError::invalid(
            "max_tokens",
            format!("max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens}"),
        ));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {MAX_N}, got {n}"),
        ));
    }
    let sampling = check_sampling(&mut c, temperature, top_p)?;
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop strings, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    if let Some(s) = stop
        .iter()
        .find(|s| s.len() > silk_inference::MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "stop strings are at most {} bytes, got one of {}",
                silk_inference::MAX_STOP_BYTES,
                s.len()
            ),
        ));
    }
    Ok((max_tokens, sampling, stop, n))
}

impl ChatRequest {
    /// Checks ranges and builds the job parameters.
    pub fn validate(self) -> Result<Validated, ApiError> {
        if self.max_tokens.is_some() && self.max_completion_tokens.is_some() {
            return Err(ApiError::invalid(
                "max_tokens",
                "give max_tokens or max_completion_tokens, not both",
            ));
        }
        let (max_tokens, sampling, stop, n) = check_common(
            Common {
                max_tokens: self.max_tokens.or(self.max_completion_tokens),
                temperature: self.temperature,
                top_p: self.top_p,
                n: self.n,
                stop: self.stop,
                seed: self.seed,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                repetition_penalty: self.repetition_penalty,
                logit_bias: self.logit_bias,
                min_p: self.min_p,
                top_k: self.top_k,
            },
            DEFAULT_CHAT_MAX_TOKENS,
            false,
        )?;
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (index, m) in self.messages.into_iter().enumerate() {
            messages.push(chat_message(m, self.model.as_deref(), index)?);
        }
        let tools = check_tool_definitions(self.tools.unwrap_or_default())?;
        let choice = check_tool_choice(self.tool_choice, &tools)?;
        let parallel = self.parallel_tool_calls.unwrap_or(true);
        let response_format = self
            .response_format
            .map(ResponseFormat::constraint)
            .transpose()?
            .flatten();
        // What the worker renders, what it must produce, and whose calls
        // are read out of the answer.
        let (tools, constraint) = match choice {
            Choice::None => (Vec::new(), response_format),
            Choice::Auto => (tools, response_format),
            Choice::Required | Choice::Named(_) if response_format.is_some() => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "a required tool call and a response_format cannot both be enforced: drop one",
                ))
            }
            Choice::Required => {
                let constraint = Constraint::ToolCalls {
                    tools: tools.clone(),
                    parallel,
                };
                (tools, Some(constraint))
            }
            Choice::Named(name) => {
                let named = tools.iter().filter(|t| t.name == name).cloned().collect();
                let constraint = Constraint::ToolCalls {
                    tools: named,
                    parallel: false,
                };
                (tools, Some(constraint))
            }
        };
        let plain = tools.is_empty()
            && messages
                .iter()
                .all(|m| m.name.is_none() && m.tool_calls.is_empty() && m.tool_call_id.is_none());
        let prompt = if plain {
            WirePrompt::Chat(messages.into_iter().map(|m| (m.role, m.content)).collect())
        } else {
            WirePrompt::Conversation {
                messages,
                tools: tools.clone(),
            }
        };
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (true, k) => Some(check_top_logprobs("top_logprobs", k.unwrap_or(0))?),
            (false, None) => None,
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ))
            }
        };
        Ok(Validated {
            model: self.model,
            prompt,
            max_tokens,
            sampling,
            stop,
            stream: self.stream.unwrap_or(false),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            max_coefficient_milli: check_max_coefficient(self.max_coefficient)?,
            logprobs,
            constraint,
            tools,
            echo: None,
            prompt_logprobs: None,
            n,
        })
    }
}

impl CompletionRequest {
    /// Checks ranges and builds the job parameters.
    pub fn validate(self) -> Result<Validated, ApiError> {
        let (max_tokens, sampling, stop, n) = check_common(
            Common {
                max_tokens: self.max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                n: self.n,
                stop: self.stop,
                seed: self.seed,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                repetition_penalty: self.repetition_penalty,
                logit_bias: self.logit_bias,
                min_p: self.min_p,
                top_k: self.top_k,
            },
            DEFAULT_COMPLETION_MAX_TOKENS,
            self.echo == Some(true),
        )?;
        let prompt = match self.prompt {
            PromptInput::One(s) => s,
            PromptInput::Many(mut v) if v.len() == 1 => v.remove(0),
            PromptInput::Many(v) => {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("exactly one prompt per request, got {}", v.len()),
                ))
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "prompt must not be empty"));
        }
        let logprobs = self
            .logprobs
            .map(|k| check_top_logprobs("logprobs", k))
            .transpose()?;
        let echo = (self.echo == Some(true)).then(|| prompt.clone());
        // The worker scores the prompt when the caller wants its
        // log-probabilities, or wants nothing generated.
        let prompt_logprobs = echo
            .as_ref()
            .filter(|_| logprobs.is_some() || max_tokens == 0)
            .map(|_| logprobs.unwrap_or(0));
        Ok(Validated {
            model: self.model,
            prompt: WirePrompt::Text(prompt),
            max_tokens,
            sampling,
            stop,
            stream: self.stream.unwrap_or(false),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            max_coefficient_milli: check_max_coefficient(self.max_coefficient)?,
            logprobs,
            constraint: self
                .response_format
                .map(ResponseFormat::constraint)
                .transpose()?
                .flatten(),
            tools: Vec::new(),
            echo,
            prompt_logprobs,
            n,
        })
    }
}

/// Message `index` of a chat request, checked: a known role, its content
/// as text, calls only on assistant messages and an answered call's id
/// only (and always) on tool messages.
fn chat_message(m: Message, model: Option<&str>, index: usize) -> Result<ChatMessage, ApiError> {
    let bad = |message: String| Err(ApiError::invalid("messages", message));
    let role = match m.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        "tool" => "tool",
        other => {
            return bad(format!(
                "unknown role `{other}` in messages[{index}]: use system, developer, user, assistant or tool"
            ))
        }
    };
    let mut content = match m.content {
        Some(content) => content_text(content, model, index)?,
        None => String::new(),
    };
    if content.is_empty() && role == "assistant" {
        content = m.refusal.unwrap_or_default();
    }
    let mut tool_calls = Vec::new();
    for (j, call) in m.tool_calls.into_iter().flatten().enumerate() {
        if role != "assistant" {
            return bad(format!(
                "messages[{index}] has tool_calls, which only assistant messages make"
            ));
        }
        if call.kind.as_deref().is_some_and(|k| k != "function") {
            return bad(format!(
                "messages[{index}].tool_calls[{j}].type must be \"function\""
            ));
        }
        if !silk_inference::tools::valid_name(&call.function.name) {
            return bad(format!(
                "messages[{index}].tool_calls[{j}].function.name must be 1 to 64 letters, digits, _ or -"
            ));
        }
        tool_calls.push(ToolCall {
            id: call.id,
            name: call.function.name,
            arguments: call.function.arguments,
        });
    }
    let tool_call_id = match (role, m.tool_call_id) {
        ("tool", Some(id)) => Some(id),
        ("tool", None) => {
            return bad(format!(
                "messages[{index}] is a tool message without tool_call_id"
            ))
        }
        (_, Some(_)) => {
            return bad(format!(
                "messages[{index}] has tool_call_id, which only tool messages carry"
            ))
        }
        (_, None) => None,
    };
    Ok(ChatMessage {
        role: role.to_string(),
        content,
        name: m.name,
        tool_calls,
        tool_call_id,
    })
}

/// `tools`, checked by the engine's rules (the worker checks them again).
fn check_tool_definitions(tools: Vec<ToolDefinition>) -> Result<Vec<Tool>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::invalid(
                "tools",
                format!("tools[{i}].type must be \"function\", got {:?}", t.kind),
            ));
        }
        let parameters = match t.function.parameters {
            None => String::new(),
            Some(p @ serde_json::Value::Object(_)) => p.to_string(),
            Some(_) => {
                return Err(ApiError::invalid(
                    "tools",
                    format!("tools[{i}].function.parameters must be a JSON schema object"),
                ))
            }
        };
        out.push(Tool {
            name: t.function.name,
            description: t.function.description,
            parameters,
        });
    }
    match silk_inference::tools::check_tools(&out) {
        Ok(()) => Ok(out),
        Err(silk_inference::InferenceError::InvalidRequest { field, reason }) => {
            Err(ApiError::invalid(field, format!("{field} {reason}")))
        }
        Err(e) => Err(ApiError::invalid("tools", e.to_string())),
    }
}

/// What `tool_choice` asks for.
enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

fn check_tool_choice(choice: Option<ToolChoice>, tools: &[Tool]) -> Result<Choice, ApiError> {
    let bad = |message: String| Err(ApiError::invalid("tool_choice", message));
    let choice = match choice {
        None if tools.is_empty() => Choice::None,
        None => Choice::Auto,
        Some(ToolChoice::Mode(mode)) => match mode.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return bad(format!(
                    "tool_choice must be none, auto, required or a named function, got {other:?}"
                ))
            }
        },
        Some(ToolChoice::Named(named)) => {
            if named.kind != "function" {
                return bad(format!(
                    "tool_choice.type must be \"function\", got {:?}",
                    named.kind
                ));
            }
            Choice::Named(named.function.name)
        }
    };
    match &choice {
        Choice::Auto | Choice::Required if tools.is_empty() => {
            bad("tool_choice needs tools to choose from".into())
        }
        Choice::Named(name) if !tools.iter().any(|t| &t.name == name) => bad(format!(
            "tool_choice names `{name}`, which is not among the request's tools"
        )),
        _ => Ok(choice),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Validated, ApiError> {
        parse::<ChatRequest>(body.as_bytes()).and_then(ChatRequest::validate)
    }

    #[test]
    fn accepts_a_plain_chat_request() {
        let v = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true,"stop":"\n"}"#)
            .expect("valid");
        assert_eq!(v.max_tokens, 3);
        assert!(v.stream);
        assert_eq!(v.stop, vec!["\n".to_string()]);
        assert_eq!(v.max_coefficient_milli, None);
        let v = chat(r#"{"messages":[{"role":"user","content":"hi"}],"max_coefficient":1.25}"#)
            .expect("valid");
        assert_eq!(v.max_coefficient_milli, Some(1250));
        assert_eq!(v.n, 1, "one choice unless asked");
        let v = chat(r#"{"messages":[{"role":"user","content":"hi"}],"n":8}"#).expect("valid");
        assert_eq!(v.n, 8);
    }

    /// What LangChain, the Agents SDK and most current clients send: the
    /// content as a list of parts. Before, any such message was refused
    /// with `invalid type: sequence, expected a string`.
    #[test]
    fn content_parts_are_read_as_text_and_other_kinds_are_refused_by_name() {
        let v = chat(
            r#"{"messages":[{"role":"system","content":[{"type":"text","text":"Be brief."}]},{"role":"user","content":[{"type":"text","text":"Hello"},{"type":"text","text":"there"}]}]}"#,
        )
        .expect("text parts");
        let WirePrompt::Chat(messages) = v.prompt else {
            panic!("a chat prompt")
        };
        assert_eq!(
            messages,
            vec![
                ("system".to_string(), "Be brief.".to_string()),
                ("user".to_string(), "Hello\nthere".to_string()),
            ]
        );
        // An empty list is an empty message, like an empty string.
        let v = chat(r#"{"messages":[{"role":"user","content":[]}]}"#).expect("no parts");
        let WirePrompt::Chat(messages) = v.prompt else {
            panic!("a chat prompt")
        };
        assert_eq!(messages, vec![("user".to_string(), String::new())]);
        for (kind, part) in [
            (
                "image_url",
                r#"{"type":"image_url","image_url":{"url":"https://x/y.png"}}"#,
            ),
            (
                "input_audio",
                r#"{"type":"input_audio","input_audio":{"data":"AA==","format":"wav"}}"#,
            ),
            ("file", r#"{"type":"file","file":{"file_id":"f"}}"#),
        ] {
            let body = format!(
                r#"{{"model":"SmolLM2","messages":[{{"role":"user","content":"a"}},{{"role":"user","content":[{{"type":"text","text":"see"}},{part}]}}]}}"#
            );
            let e = chat(&body).expect_err(kind);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{kind}");
            assert_eq!(e.param, Some("messages"), "{kind}");
            assert!(
                e.message
                    .contains(&format!("messages[1] has an `{kind}` part"))
                    && e.message.contains("model `SmolLM2` takes text only"),
                "{kind}: {}",
                e.message
            );
        }
        // A part of no known type, a text part without its text, or
        // content of another shape is refused, saying what was expected.
        for (body, says) in [
            (
                r#"{"messages":[{"role":"user","content":[{"type":"video","video":{}}]}]}"#,
                "messages[0].content[0] has no known `type` (got \"video\")",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
                "messages[0].content[0] is a text part without a `text` string",
            ),
            (
                r#"{"messages":[{"role":"user","content":42}]}"#,
                "messages[0].content must be a string or a list of content parts",
            ),
        ] {
            let e = chat(body).expect_err(body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
    }

    #[test]
    fn rejects_unknown_fields_and_bad_ranges() {
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        for body in [
            format!(r#"{{{m},"bogus":1}}"#),
            format!(r#"{{{m},"max_tokens":0}}"#),
            format!(r#"{{{m},"temperature":2.5}}"#),
            format!(r#"{{{m},"top_p":0}}"#),
            format!(r#"{{{m},"n":0}}"#),
            format!(r#"{{{m},"n":9}}"#),
            format!(r#"{{{m},"stop":["a","b","c","d","e"]}}"#),
            format!(r#"{{{m},"stop":["{}"]}}"#, "x".repeat(257)),
            format!(r#"{{{m},"max_coefficient":0}}"#),
            format!(r#"{{{m},"max_coefficient":-1}}"#),
            format!(r#"{{{m},"max_coefficient":1.0005}}"#),
            format!(r#"{{{m},"max_coefficient":5000}}"#),
            format!(r#"{{{m},"max_coefficient":"2"}}"#),
            format!(r#"{{{m},"presence_penalty":2.5}}"#),
            format!(r#"{{{m},"frequency_penalty":-2.1}}"#),
            format!(r#"{{{m},"repetition_penalty":0}}"#),
            format!(r#"{{{m},"min_p":1.1}}"#),
            format!(r#"{{{m},"logit_bias":{{"5":101}}}}"#),
            format!(r#"{{{m},"logit_bias":{{"the":1}}}}"#),
            r#"{"messages":[]}"#.to_string(),
            r#"{"messages":[{"role":"wizard","content":"x"}]}"#.to_string(),
        ] {
            let e = chat(&body).expect_err(&body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
        }
        // Each sampling error names its field as `param`.
        for (body, param) in [
            (
                format!(r#"{{{m},"presence_penalty":3}}"#),
                "presence_penalty",
            ),
            (
                format!(r#"{{{m},"frequency_penalty":-3}}"#),
                "frequency_penalty",
            ),
            (
                format!(r#"{{{m},"repetition_penalty":2.5}}"#),
                "repetition_penalty",
            ),
            (format!(r#"{{{m},"min_p":-0.1}}"#), "min_p"),
            (
                format!(r#"{{{m},"logit_bias":{{"7":-100.5}}}}"#),
                "logit_bias",
            ),
            (
                format!(r#"{{{m},"logprobs":true,"top_logprobs":21}}"#),
                "top_logprobs",
            ),
            (format!(r#"{{{m},"top_logprobs":2}}"#), "top_logprobs"),
        ] {
            let e = chat(&body).expect_err(&body);
            assert_eq!(e.param, Some(param), "{body}: {}", e.message);
        }
        let v = chat(&format!(
            r#"{{{m},"presence_penalty":0.5,"frequency_penalty":-0.5,"repetition_penalty":1.2,"min_p":0.05,"top_k":40,"seed":9,"logit_bias":{{"42":-100,"7":3.5}}}}"#
        ))
        .expect("valid sampling");
        assert_eq!(
            (v.sampling.presence_penalty, v.sampling.frequency_penalty),
            (0.5, -0.5)
        );
        assert_eq!(
            (
                v.sampling.repetition_penalty,
                v.sampling.min_p,
                v.sampling.top_k
            ),
            (1.2, 0.05, 40)
        );
        assert_eq!(v.sampling.seed, Some(9));
        assert_eq!(v.sampling.logit_bias, vec![(42, -100.0), (7, 3.5)]);
        assert_eq!(v.logprobs, None);
        let v = chat(&format!(r#"{{{m},"logprobs":true}}"#)).expect("logprobs");
        assert_eq!(v.logprobs, Some(0));
        let v = chat(&format!(r#"{{{m},"logprobs":true,"top_logprobs":20}}"#)).expect("20");
        assert_eq!(v.logprobs, Some(20));
        let completion = |body: &str| {
            parse::<CompletionRequest>(body.as_bytes()).and_then(CompletionRequest::validate)
        };
        assert_eq!(
            completion(r#"{"prompt":"a","logprobs":5}"#)
                .expect("5")
                .logprobs,
            Some(5)
        );
        let e = completion(r#"{"prompt":"a","logprobs":21}"#).expect_err("21");
        assert_eq!(e.param, Some("logprobs"));
    }

    #[test]
    fn response_formats_become_constraints_and_bad_ones_are_refused() {
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        let with = |rf: &str| chat(&format!(r#"{{{m},"response_format":{rf}}}"#));
        assert_eq!(with(r#"{"type":"text"}"#).expect("text").constraint, None);
        assert_eq!(
            with(r#"{"type":"json_object"}"#)
                .expect("object")
                .constraint,
            Some(Constraint::JsonObject)
        );
        let v = with(r#"{"type":"json_schema","json_schema":{"name":"City","strict":true,"schema":{"type":"object","properties":{"name":{"type":"string"}},"required":["name"]}}}"#)
            .expect("schema");
        match v.constraint {
            Some(Constraint::JsonSchema(s)) => {
                let back: serde_json::Value = serde_json::from_str(&s).expect("json");
                assert_eq!(back["required"], json!(["name"]));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            r#"{"type":"xml"}"#,
            r#"{"type":"json_schema"}"#,
            r#"{"type":"json_schema","json_schema":{"name":"a b","schema":{}}}"#,
            r#"{"type":"json_schema","json_schema":{"name":"ok","schema":[1]}}"#,
            r#"{"type":"json_schema","json_schema":{"name":"ok","schema":{},"extra":1}}"#,
        ] {
            let e = with(bad).expect_err(bad);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        let e = parse::<CompletionRequest>(br#"{"prompt":["a","b"]}"#)
            .and_then(CompletionRequest::validate)
            .expect_err("two prompts");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    const WEATHER: &str = r#"{"type":"function","function":{"name":"get_weather","description":"Weather in a city.","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}"#;
    const NOW: &str = r#"{"type":"function","function":{"name":"now"}}"#;

    fn with_tools(extra: &str) -> Result<Validated, ApiError> {
        chat(&format!(
            r#"{{"messages":[{{"role":"user","content":"hi"}}],"tools":[{WEATHER},{NOW}]{extra}}}"#
        ))
    }

    #[test]
    fn tools_reach_the_worker_and_tool_choice_picks_the_grammar() {
        // auto (the default): tools rendered, calls read, no grammar.
        let v = with_tools("").expect("auto");
        let WirePrompt::Conversation { messages, tools } = &v.prompt else {
            panic!("a conversation: {:?}", v.prompt)
        };
        assert_eq!(messages.len(), 1);
        assert_eq!(tools.len(), 2);
        assert_eq!(tools[0].name, "get_weather");
        assert_eq!(
            tools[0].parameters,
            r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#
        );
        assert_eq!(tools[1].parameters, "");
        assert_eq!(v.tools, *tools);
        assert_eq!(v.constraint, None);
        // required: a grammar over every tool, parallel unless refused.
        let v = with_tools(r#","tool_choice":"required""#).expect("required");
        assert_eq!(
            v.constraint,
            Some(Constraint::ToolCalls {
                tools: v.tools.clone(),
                parallel: true
            })
        );
        let v = with_tools(r#","tool_choice":"required","parallel_tool_calls":false"#)
            .expect("required, one call");
        assert!(matches!(
            v.constraint,
            Some(Constraint::ToolCalls {
                parallel: false,
                ..
            })
        ));
        // A named function: a grammar over it alone, all tools rendered.
        let v = with_tools(r#","tool_choice":{"type":"function","function":{"name":"now"}}"#)
            .expect("named");
        match &v.constraint {
            Some(Constraint::ToolCalls { tools, parallel }) => {
                assert_eq!(tools.len(), 1);
                assert_eq!(tools[0].name, "now");
                assert!(!parallel);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(v.tools.len(), 2);
        // none: the worker sees no tools and the answer is all text; a
        // conversation without tool fields goes as a plain chat, which
        // workers of every version read.
        let v = with_tools(r#","tool_choice":"none""#).expect("none");
        assert!(v.tools.is_empty() && v.constraint.is_none());
        assert!(matches!(v.prompt, WirePrompt::Chat(_)), "{:?}", v.prompt);
    }

    #[test]
    fn a_conversation_with_calls_and_results_is_carried_whole() {
        let v = chat(&format!(
            r#"{{"messages":[
                {{"role":"user","content":"weather in Paris?","name":"ann"}},
                {{"role":"assistant","content":null,"tool_calls":[{{"id":"c1","type":"function","function":{{"name":"get_weather","arguments":"{{\"city\":\"Paris\"}}"}}}}]}},
                {{"role":"tool","tool_call_id":"c1","content":[{{"type":"text","text":"9 C"}}]}}
            ],"tools":[{WEATHER}]}}"#
        ))
        .expect("valid");
        let WirePrompt::Conversation { messages, .. } = v.prompt else {
            panic!("a conversation")
        };
        assert_eq!(messages[0].name.as_deref(), Some("ann"));
        assert_eq!(messages[1].content, "");
        assert_eq!(
            messages[1].tool_calls,
            vec![silk_inference::ToolCall {
                id: "c1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            }]
        );
        assert_eq!(messages[2].role, "tool");
        assert_eq!(messages[2].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(messages[2].content, "9 C");
    }

    #[test]
    fn bad_tools_and_tool_choices_are_refused_naming_the_field() {
        for (body, param, says) in [
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"tool_choice":"auto"}"#.to_string(),
                "tool_choice",
                "needs tools",
            ),
            (
                format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"tools":[{NOW}],"tool_choice":"sometimes"}}"#),
                "tool_choice",
                "none, auto, required",
            ),
            (
                format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"tools":[{NOW}],"tool_choice":{{"type":"function","function":{{"name":"rm"}}}}}}"#),
                "tool_choice",
                "`rm`, which is not among",
            ),
            (
                format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"tools":[{NOW}],"tool_choice":"required","response_format":{{"type":"json_object"}}}}"#),
                "tool_choice",
                "cannot both be enforced",
            ),
            (
                format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"tools":[{NOW},{NOW}]}}"#),
                "tools",
                "twice",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"retrieval","function":{"name":"f"}}]}"#.to_string(),
                "tools",
                "tools[0].type must be \"function\"",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"no spaces"}}]}"#.to_string(),
                "tools",
                "must be 1 to 64 letters",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":[1]}}]}"#.to_string(),
                "tools",
                "must be a JSON schema object",
            ),
            (
                r#"{"messages":[{"role":"tool","content":"9 C"}]}"#.to_string(),
                "messages",
                "without tool_call_id",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi","tool_call_id":"c1"}]}"#.to_string(),
                "messages",
                "only tool messages carry",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}]}"#.to_string(),
                "messages",
                "only assistant messages make",
            ),
            (
                r#"{"messages":[{"role":"robot","content":"hi"}]}"#.to_string(),
                "messages",
                "unknown role `robot`",
            ),
        ] {
            let e = chat(&body).expect_err(says);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{says}");
            assert_eq!(e.param, Some(param), "{says}: {}", e.message);
            assert!(e.message.contains(says), "{says}: {}", e.message);
        }
    }
}

//! The OpenAI-compatible HTTP API that every node serves (axum).
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: streaming (SSE,
//!   ending in `data: [DONE]`) or not, with `usage`. Requests are validated
//!   strictly ([`types`]); errors use OpenAI's `{"error":{…}}` shape.
//! - `GET /v1/models`, `GET /v1/mesh`, `GET /health`.
//! - The operator's: `GET /v1/status` (this node, its jobs and money over
//!   time), `GET /metrics` (Prometheus) and the dashboard at `GET /`
//!   ([`status`]).
//!
//! Every completion names its worker and that worker's attestation mode in
//! the `x-silk-worker` / `x-silk-attestation` headers and in `silk` in the body.
//!
//! # Layout
//!
//! - [`server`]: the HTTP/1.1 server (header timeout, connection caps);
//! - [`guard`]: what a request must be to reach a handler (Host, Origin,
//!   JSON, API key, rate, concurrency, deadline);
//! - [`keys`]: API keys in redb, with rate limits and daily spend caps;
//! - [`types`]: request bodies and their validation;
//! - this file: the routes.

pub mod guard;
pub mod keys;
pub mod server;
pub mod status;
pub mod types;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use silk_inference::{ParsedCall, Piece, ToolCallReader};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::gateway::{model_name, Dispatch, DispatchError, FailureCause, JobEvent};
use crate::node::Node;
use crate::protocol::JobRequest;
use crate::MeshError;
use guard::{Caller, Deadlines, Guard, HttpConfig, API_BODY_LIMIT};
use keys::{ApiKeys, KeyError, SpendHold};
use types::{ApiError, ChatRequest, CompletionRequest, Validated};

/// Header naming the worker that served a completion.
pub const WORKER_HEADER: &str = "x-silk-worker";
/// Header with that worker's attestation mode (`tdx` or `insecure`).
pub const ATTESTATION_HEADER: &str = "x-silk-attestation";

/// The API's routes over `node`, behind `guard`.
pub fn router(node: Arc<Node>, guard: Arc<Guard>, config: &HttpConfig) -> Router {
    let mut app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/mesh", get(mesh))
        .route("/health", get(health))
        .route("/v1/status", get(status::status))
        .route("/metrics", get(status::metrics))
        .route("/", get(status::dashboard_html))
        .route(status::DASHBOARD_JS_PATH, get(status::dashboard_js))
        .route(status::DASHBOARD_CSS_PATH, get(status::dashboard_css))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such route",
            )
        })
        .with_state(node)
        .layer(axum::middleware::from_fn_with_state(guard, guard::check));
    if !config.allowed_origins.is_empty() {
        // Browser apps at the allowed origins get CORS answers; the guard
        // refuses every other origin.
        let origins: Vec<HeaderValue> = config
            .allowed_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
                .max_age(Duration::from_secs(600)),
        );
    }
    app
}

/// How the API is served.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Address to bind, e.g. `127.0.0.1:8080`.
    pub addr: String,
    /// Access rules and server limits.
    pub http: HttpConfig,
    /// The API keys.
    pub keys: ApiKeys,
}

/// Binds `options.addr` and serves the API until `cancel` fires. Returns
/// the bound address (useful with port 0) and the server task. On a bind
/// that is not loopback every request needs an API key.
pub async fn serve(
    node: Arc<Node>,
    options: ApiOptions,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MeshError> {
    let addr = options.addr.clone();
    options
        .http
        .validate()
        .map_err(|reason| MeshError::Config {
            path: crate::config::CONFIG_FILE.into(),
            reason,
        })?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| MeshError::ApiBind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| MeshError::ApiBind { addr, source })?;
    let guard = Arc::new(Guard::new(&options.http, options.keys, local.ip()));
    let app = router(node, guard, &options.http);
    let task = tokio::spawn(server::run(
        listener,
        app,
        options.http,
        cancel,
        Duration::from_secs(3),
    ));
    Ok((local, task))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn completion_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{prefix}-{:016x}", h.finish())
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> Self {
        let (status, kind) = match &e {
            DispatchError::ModelRequired(_)
            | DispatchError::TooExpensive { .. }
            | DispatchError::InvalidRequest(_)
            | DispatchError::ContextLengthExceeded { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            DispatchError::UnknownModel(_) => (StatusCode::NOT_FOUND, "invalid_request_error"),
            DispatchError::InsecureRefused(_) | DispatchError::AttestationRefused(_) => {
                (StatusCode::FORBIDDEN, "attestation_error")
            }
            DispatchError::Saturated(_)
            | DispatchError::QueueTimeout { .. }
            | DispatchError::QueueFull { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error")
            }
            DispatchError::AllFailed(attempts) => match attempts.cause() {
                FailureCause::Busy => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
                FailureCause::Payment => (StatusCode::PAYMENT_REQUIRED, "payment_error"),
                FailureCause::Timeout => (StatusCode::GATEWAY_TIMEOUT, "server_error"),
                FailureCause::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
            },
        };
        let code = e.code();
        let param = match &e {
            DispatchError::ContextLengthExceeded {
                window,
                prompt_tokens,
                ..
            } => Some(match prompt_tokens {
                Some(p) if *p >= u64::from(*window) => "messages",
                _ => "max_tokens",
            }),
            DispatchError::InvalidRequest(message) => refused_param(message),
            _ => None,
        };
        let mut error = ApiError::new(status, kind, code, e.to_string());
        if status == StatusCode::TOO_MANY_REQUESTS {
            // Slots free up as jobs end: a second is a fair first retry.
            error = error.with_retry_after(1);
        }
        match param {
            Some(p) => error.with_param(p),
            None => error,
        }
    }
}

/// Request fields a worker's engine judges again, by the name its
/// refusal gives them (`invalid request: `logit_bias` …`).
const ENGINE_PARAMS: &[&str] = &[
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "min_p",
    "presence_penalty",
    "prompt",
    "repetition_penalty",
    "response_format",
    "stop",
    "temperature",
    "tools",
    "top_k",
    "top_logprobs",
    "top_p",
];

/// The request field a worker's refusal names, when it names one this API
/// has (a worker is a peer: anything else it says names nothing).
fn refused_param(message: &str) -> Option<&'static str> {
    const MARK: &str = "invalid request: `";
    let start = message.find(MARK)? + MARK.len();
    let field = &message[start..start + message[start..].find('`')?];
    ENGINE_PARAMS.iter().copied().find(|p| *p == field)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// Reads a request body within its deadline and [`API_BODY_LIMIT`].
async fn read_body(body: Body, deadline: Instant) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, API_BODY_LIMIT);
    match tokio::time::timeout_at(deadline, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is over {API_BODY_LIMIT} bytes"),
        )),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "bad_body",
            format!("could not read the request body: {e}"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "body_timeout",
            "the request body did not arrive in time",
        )),
    }
}

async fn chat_completions(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    Extension(deadlines): Extension<Deadlines>,
    body: Body,
) -> Response {
    let parsed = match read_body(body, deadlines.body).await {
        Ok(body) => types::parse::<ChatRequest>(&body).and_then(ChatRequest::validate),
        Err(e) => Err(e),
    };
    match parsed {
        Ok(v) => complete(node, caller, v, Kind::Chat, deadlines.request).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    Extension(deadlines): Extension<Deadlines>,
    body: Body,
) -> Response {
    let parsed = match read_body(body, deadlines.body).await {
        Ok(body) => types::parse::<CompletionRequest>(&body).and_then(CompletionRequest::validate),
        Err(e) => Err(e),
    };
    match parsed {
        Ok(v) => complete(node, caller, v, Kind::Text, deadlines.request).await,
        Err(e) => e.into_response(),
    }
}

/// Answers a validated request. Every log line about it, on this node and
/// in the tasks it starts, carries its id (the response's `id`).
async fn complete(
    node: Arc<Node>,
    caller: Caller,
    v: Validated,
    kind: Kind,
    deadline: Instant,
) -> Response {
    let id = completion_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let span = tracing::info_span!("request", id = %id);
    answer(node, caller, v, kind, deadline, id)
        .instrument(span)
        .await
}

async fn answer(
    node: Arc<Node>,
    caller: Caller,
    v: Validated,
    kind: Kind,
    deadline: Instant,
    id: String,
) -> Response {
    let model = match node.resolve_model(v.model.as_deref()) {
        Ok(m) => m,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let request = JobRequest {
        model,
        prompt: v.prompt,
        max_tokens: v.max_tokens,
        sampling: v.sampling,
        stop: v.stop,
        ignore_eos: v.ignore_eos,
        payment: None,
        continuation: Vec::new(),
        logprobs: v.logprobs,
        constraint: v.constraint,
        prompt_logprobs: v.prompt_logprobs,
    };
    let logprobs = v.logprobs.is_some();
    let tools = v.tools;
    let echo = v.echo;
    // `n` choices are `n` jobs with one prompt; a seed gives each its own
    // (seed, seed + 1, …), so they differ and each can be reproduced.
    let requests: Vec<JobRequest> = (0..u64::from(v.n.max(1)))
        .map(|i| {
            let mut r = request.clone();
            r.sampling.seed = request.sampling.seed.map(|s| s.wrapping_add(i));
            r
        })
        .collect();
    // The key's daily cap is checked against the jobs' worst case before
    // any lane is opened or reserved.
    let worst = node.worst_case_cost(&request, v.max_coefficient_milli);
    let mut spends = Vec::with_capacity(requests.len());
    for _ in &requests {
        spends.push(match caller.hold(worst) {
            Ok(hold) => hold,
            Err(e @ KeyError::SpendCapReached { .. }) => {
                return ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "insufficient_quota",
                    "insufficient_quota",
                    e.to_string(),
                )
                .into_response()
            }
            Err(e) => {
                tracing::error!(error = %e, "API key spend check failed");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "key_store_failed",
                    "the node could not check the API key's spending; try again",
                )
                .into_response();
            }
        });
    }
    let dispatches = match dispatch_choices(&node, requests, v.max_coefficient_milli, spends).await
    {
        Ok(d) => d,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let workers = Workers::of(&dispatches);
    let mut headers = HeaderMap::new();
    if let Ok(w) = HeaderValue::from_str(&workers.first().to_string()) {
        headers.insert(WORKER_HEADER, w);
    }
    headers.insert(
        ATTESTATION_HEADER,
        HeaderValue::from_static(mode_str(workers.weakest())),
    );
    let choices: Vec<(Dispatch, Shape)> = dispatches
        .into_iter()
        .enumerate()
        .map(|(index, d)| {
            let shape = Shape {
                index,
                logprobs,
                reader: (!tools.is_empty()).then(|| ToolCallReader::new(&tools)),
                echo: echo.clone(),
            };
            (d, shape)
        })
        .collect();
    let answer = Answer {
        kind,
        id,
        model: choices[0].0.model.clone(),
        workers,
    };
    if v.stream {
        (headers, stream_response(answer, choices, deadline)).into_response()
    } else {
        match collect(answer, choices).await {
            Ok(body) => (headers, Json(body)).into_response(),
            Err(e) => (headers, e).into_response(),
        }
    }
}

/// Places a request's choices: the first where the gateway puts it, the
/// others on the same worker when it has room (they then share the first
/// one's prefill), all at once. Fails with the first error, dropping the
/// jobs already placed (which cancels them).
async fn dispatch_choices(
    node: &Arc<Node>,
    mut requests: Vec<JobRequest>,
    max_coefficient_milli: Option<u32>,
    mut spends: Vec<Option<SpendHold>>,
) -> Result<Vec<Dispatch>, DispatchError> {
    let rest_requests = requests.split_off(1);
    let rest_spends = spends.split_off(1);
    let (Some(request), Some(spend)) = (requests.pop(), spends.pop()) else {
        return Err(DispatchError::InvalidRequest("no choices asked for".into()));
    };
    let first = node.dispatch(request, max_coefficient_milli, spend).await?;
    let worker = first.worker;
    let rest =
        futures::future::try_join_all(rest_requests.into_iter().zip(rest_spends).map(
            |(request, spend)| node.dispatch_near(request, max_coefficient_milli, spend, worker),
        ))
        .await?;
    Ok(std::iter::once(first).chain(rest).collect())
}

/// The workers that answer a request's choices.
struct Workers(Vec<(silk_overlay::PeerId, silk_overlay::AttestationMode)>);

impl Workers {
    fn of(dispatches: &[Dispatch]) -> Self {
        Self(
            dispatches
                .iter()
                .map(|d| (d.worker, d.attestation))
                .collect(),
        )
    }

    /// The first choice's worker (the only one when `n` is 1).
    fn first(&self) -> silk_overlay::PeerId {
        self.0[0].0
    }

    /// `insecure` if any choice ran on an insecure worker.
    fn weakest(&self) -> silk_overlay::AttestationMode {
        if self
            .0
            .iter()
            .any(|(_, m)| *m == silk_overlay::AttestationMode::Insecure)
        {
            silk_overlay::AttestationMode::Insecure
        } else {
            self.0[0].1
        }
    }
}

/// What a whole answer is made into: which API's shape, under which id,
/// for which model, from which workers.
struct Answer {
    kind: Kind,
    /// `chatcmpl-…` or `cmpl-…`, also the request's id in the node's logs.
    id: String,
    model: String,
    workers: Workers,
}

pub(crate) fn mode_str(mode: silk_overlay::AttestationMode) -> &'static str {
    match mode {
        silk_overlay::AttestationMode::Tdx => "tdx",
        silk_overlay::AttestationMode::Insecure => "insecure",
    }
}

fn silk_info(d: &Dispatch) -> Value {
    json!({ "worker": d.worker.to_string(), "attestation": mode_str(d.attestation) })
}

/// `silk` of the final chunk or body: the worker, its attestation mode and
/// what the answer cost in nanoTON (a JSON number; `null` if the gateway
/// could not settle it). With several choices: the first's worker, the
/// weakest mode, every choice's worker in `workers`, and the cost of all.
fn silk_final(workers: &Workers, cost: Option<silk_chain::Coins>) -> Value {
    let mut v = json!({
        "worker": workers.first().to_string(),
        "attestation": mode_str(workers.weakest()),
    });
    if workers.0.len() > 1 {
        v["workers"] = workers
            .0
            .iter()
            .map(|(p, _)| json!(p.to_string()))
            .collect();
    }
    v["cost_nanoton"] = match cost.map(|c| u64::try_from(c.nano())) {
        Some(Ok(n)) => json!(n),
        _ => Value::Null,
    };
    v
}

/// The usage of a request's choices together: the prompt once (each
/// choice read the same one), every choice's completion tokens.
fn total_usage(usages: &[crate::protocol::JobUsage]) -> Option<crate::protocol::JobUsage> {
    let mut total = usages.first()?.clone();
    total.completion_tokens = usages
        .iter()
        .fold(0u32, |n, u| n.saturating_add(u.completion_tokens));
    Some(total)
}

/// What all the choices cost; `None` if any could not be settled.
fn total_cost(costs: &[Option<silk_chain::Coins>]) -> Option<silk_chain::Coins> {
    costs.iter().try_fold(silk_chain::Coins::ZERO, |sum, c| {
        c.and_then(|c| sum.checked_add(c).ok())
    })
}

fn usage_json(u: &crate::protocol::JobUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        // A worker's claim, bounded by the prompt.
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens.min(u.prompt_tokens)},
    })
}

/// A log-probability as JSON: a number, and OpenAI's -9999 for a token the
/// model ruled out (JSON has no -inf).
fn logprob_json(lp: f32) -> Value {
    json!(if lp.is_finite() {
        f64::from(lp)
    } else {
        -9999.0
    })
}

/// Chat's `logprobs` for `tokens`: `{"content": [{token, logprob, bytes,
/// top_logprobs}], "refusal": null}`.
fn chat_logprobs(tokens: &[silk_inference::TokenLogprob]) -> Value {
    let entry = |bytes: &[u8], lp: f32| {
        json!({
            "token": String::from_utf8_lossy(bytes),
            "logprob": logprob_json(lp),
            "bytes": bytes,
        })
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.bytes, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|a| entry(&a.bytes, a.logprob)).collect();
            e
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// Completions' `logprobs` of an echoed prompt, from the worker's scores
/// of its tokens after the first (moving `offset` past the prompt). The
/// first token has no score (`null`, as OpenAI and vLLM report it); its
/// text is what the scored tokens leave of the prompt at its start.
fn echo_logprobs(
    prompt: &str,
    scored: &[silk_inference::TokenLogprob],
    offset: &mut usize,
) -> Value {
    let scored_bytes: usize = scored.iter().map(|t| t.bytes.len()).sum();
    let first_len = prompt.len().saturating_sub(scored_bytes);
    let first = String::from_utf8_lossy(&prompt.as_bytes()[..first_len]).into_owned();
    let start = *offset;
    *offset += first_len;
    let rest = text_logprobs(scored, offset);
    let head = json!({
        "tokens": [first], "token_logprobs": [null], "top_logprobs": [null], "text_offset": [start],
    });
    // The answer starts after the prompt as the caller sent it.
    *offset = start + prompt.len();
    join_text_logprobs(head, rest)
}

/// Two completions' `logprobs` objects, one after the other.
fn join_text_logprobs(mut a: Value, b: Value) -> Value {
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(Value::Array(x)), Value::Array(y)) = (a.get_mut(key), &b[key]) {
            x.extend(y.iter().cloned());
        }
    }
    a
}

/// Completions' `logprobs` for `tokens`, whose text starts `offset` bytes
/// into the answer (moved past them): `{tokens, token_logprobs,
/// top_logprobs, text_offset}`.
fn text_logprobs(tokens: &[silk_inference::TokenLogprob], offset: &mut usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(*offset);
        *offset += t.bytes.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| String::from_utf8_lossy(&t.bytes)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| logprob_json(t.logprob)).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            t.top
                .iter()
                .map(|a| (String::from_utf8_lossy(&a.bytes).into_owned(), logprob_json(a.logprob)))
                .collect::<serde_json::Map<String, Value>>()
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// A new tool call id.
fn tool_call_id() -> String {
    completion_id("call").replace('-', "_")
}

/// A read call in OpenAI's shape (`index` only in stream deltas).
fn tool_call_json(call: ParsedCall, index: Option<usize>) -> Value {
    let mut v = json!({
        "id": tool_call_id(),
        "type": "function",
        "function": { "name": call.name, "arguments": call.arguments },
    });
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

/// `finish_reason`: `tool_calls` when an answer that ended by itself made
/// calls.
fn finish_str(usage: &crate::protocol::JobUsage, calls: usize) -> &'static str {
    match usage.finish {
        crate::protocol::Finish::Stop if calls > 0 => "tool_calls",
        _ => usage.finish.as_str(),
    }
}

/// What one choice of an answer is made into: its index, with
/// log-probabilities or not, calls read out of it, the prompt before it.
struct Shape {
    index: usize,
    logprobs: bool,
    reader: Option<ToolCallReader>,
    echo: Option<String>,
}

/// The whole answer's body: every choice, read to its end together.
async fn collect(answer: Answer, choices: Vec<(Dispatch, Shape)>) -> Result<Value, ApiError> {
    let kind = answer.kind;
    let ended = futures::future::try_join_all(
        choices
            .into_iter()
            .map(|(d, shape)| collect_choice(d, shape, kind)),
    )
    .await?;
    let usages: Vec<_> = ended.iter().map(|(_, u, _)| u.clone()).collect();
    let costs: Vec<_> = ended.iter().map(|(_, _, c)| *c).collect();
    let choices: Vec<Value> = ended.into_iter().map(|(c, _, _)| c).collect();
    let usage = total_usage(&usages).map(|u| usage_json(&u));
    Ok(json!({
        "id": answer.id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": unix_now(),
        "model": answer.model,
        "choices": choices,
        "usage": usage,
        "silk": silk_final(&answer.workers, total_cost(&costs)),
    }))
}

/// One choice read to its end: its JSON, usage and cost.
async fn collect_choice(
    mut d: Dispatch,
    shape: Shape,
    kind: Kind,
) -> Result<(Value, crate::protocol::JobUsage, Option<silk_chain::Coins>), ApiError> {
    let Shape {
        index,
        logprobs: want_logprobs,
        reader,
        echo,
    } = shape;
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut scored = Vec::new();
    let (usage, cost) = loop {
        match d.events.recv().await {
            Some(JobEvent::Token(t)) => {
                text.push_str(&t.text);
                logprobs.extend(t.logprobs);
                scored.extend(t.prompt_logprobs);
            }
            Some(JobEvent::Done { usage, cost }) => break (usage, cost),
            Some(JobEvent::Failed(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "worker_failed",
                    e,
                ))
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "worker_failed",
                    "the job ended without a result",
                ))
            }
        }
    };
    let choice = match kind {
        Kind::Chat => {
            let mut message = json!({ "role": "assistant", "content": text });
            let mut calls = 0;
            if let Some(mut reader) = reader {
                let mut pieces = reader.push(&text);
                pieces.extend(reader.finish());
                let mut content = String::new();
                let mut tool_calls = Vec::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(t) => content.push_str(&t),
                        Piece::Call(c) => tool_calls.push(tool_call_json(c, None)),
                    }
                }
                calls = tool_calls.len();
                if calls > 0 {
                    message["content"] = if content.is_empty() {
                        Value::Null
                    } else {
                        json!(content)
                    };
                    message["tool_calls"] = json!(tool_calls);
                }
            }
            json!({
                "index": index,
                "message": message,
                "logprobs": want_logprobs.then(|| chat_logprobs(&logprobs)),
                "finish_reason": finish_str(&usage, calls),
            })
        }
        Kind::Text => {
            let mut offset = 0;
            let prompt_part = echo
                .as_deref()
                .map(|prompt| echo_logprobs(prompt, &scored, &mut offset));
            let answer_part = text_logprobs(&logprobs, &mut offset);
            let logprobs = match prompt_part {
                Some(p) => join_text_logprobs(p, answer_part),
                None => answer_part,
            };
            json!({
                "index": index,
                "text": echo.unwrap_or_default() + &text,
                "logprobs": want_logprobs.then_some(logprobs),
                "finish_reason": usage.finish.as_str(),
            })
        }
    };
    Ok((choice, usage, cost))
}

fn stream_response(
    answer: Answer,
    choices: Vec<(Dispatch, Shape)>,
    deadline: Instant,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(pump(answer, choices, tx, deadline).in_current_span());
    let stream =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Streams every choice's chunks as they come, then `[DONE]`. With several
/// choices, each one's last chunk has its `finish_reason` and a final chunk
/// with no choices carries the usage and cost of all (OpenAI's shape); with
/// one, its last chunk carries them. The first choice to fail ends the
/// stream with an error, dropping the others (which cancels their jobs).
async fn pump(
    answer: Answer,
    choices: Vec<(Dispatch, Shape)>,
    tx: mpsc::Sender<SseEvent>,
    deadline: Instant,
) {
    let created = unix_now();
    let alone = choices.len() == 1;
    let ends = futures::future::try_join_all(
        choices
            .into_iter()
            .map(|(d, shape)| pump_choice(&answer, d, shape, alone, created, &tx, deadline)),
    )
    .await;
    let Ok(ends) = ends else { return };
    if !alone {
        let usages: Vec<_> = ends.iter().map(|(u, _)| u.clone()).collect();
        let costs: Vec<_> = ends.iter().map(|(_, c)| *c).collect();
        let last = json!({
            "id": answer.id,
            "object": if answer.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": created,
            "model": answer.model,
            "choices": [],
            "usage": total_usage(&usages).map(|u| usage_json(&u)),
            "silk": silk_final(&answer.workers, total_cost(&costs)),
        });
        if tx
            .send(SseEvent::default().data(last.to_string()))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
}

/// Turns one choice's job events into SSE events; stops (dropping the job,
/// which cancels it on the worker) as soon as the client goes away or the
/// request's deadline passes. With a tool-call reader, text that may begin
/// a call is held until it is decided, and each call goes out as one
/// `tool_calls` delta (id, name and all its arguments) when its block
/// closes. Returns the choice's usage and cost, or `Err` once it has sent
/// the error that ends the stream (or found the client gone). `alone`: the
/// only choice, whose last chunk carries the usage and cost.
async fn pump_choice(
    answer: &Answer,
    mut d: Dispatch,
    shape: Shape,
    alone: bool,
    created: u64,
    tx: &mpsc::Sender<SseEvent>,
    deadline: Instant,
) -> Result<(crate::protocol::JobUsage, Option<silk_chain::Coins>), ()> {
    let Shape {
        index,
        logprobs: want_logprobs,
        mut reader,
        mut echo,
    } = shape;
    let kind = answer.kind;
    let id = &answer.id;
    let mut text_offset = 0usize;
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let silk = silk_info(&d);
    let model = d.model.clone();
    let chunk = |delta: Delta,
                 logprobs: Value,
                 finish: Option<&str>,
                 usage: Option<Value>,
                 silk: &Value| {
        let choice = match kind {
            Kind::Chat => {
                let mut map = serde_json::Map::new();
                if delta.first {
                    map.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = delta.text {
                    map.insert("content".into(), json!(t));
                }
                if let Some(call) = delta.call {
                    map.insert("tool_calls".into(), json!([call]));
                }
                json!({ "index": index, "delta": map, "logprobs": logprobs, "finish_reason": finish })
            }
            Kind::Text => json!({
                "index": index, "text": delta.text.unwrap_or_default(), "logprobs": logprobs, "finish_reason": finish
            }),
        };
        let mut v = json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": [choice], "silk": silk,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        SseEvent::default().data(v.to_string())
    };
    let mut first = true;
    let mut calls = 0usize;
    // Log-probabilities of tokens whose text the reader still holds.
    let mut held_logprobs: Vec<silk_inference::TokenLogprob> = Vec::new();
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, d.events.recv()).await else {
            let err = json!({ "error": {
                "message": "the request passed its deadline ([http] request_timeout_s)",
                "type": "server_error", "param": null, "code": "request_timeout",
            }});
            let _ = tx.send(SseEvent::default().data(err.to_string())).await;
            return Err(());
        };
        let mut events = Vec::new();
        // The echoed prompt goes first, with its scores when asked.
        if let Some(prompt) = echo.take() {
            let scored = match &next {
                Some(JobEvent::Token(t)) => t.prompt_logprobs.as_slice(),
                _ => &[],
            };
            let logprobs = if want_logprobs {
                echo_logprobs(&prompt, scored, &mut text_offset)
            } else {
                Value::Null
            };
            let delta = Delta {
                first,
                text: Some(prompt),
                call: None,
            };
            events.push(chunk(delta, logprobs, None, None, &silk));
            first = false;
        }
        let more = match next {
            Some(JobEvent::Token(t)) if t.ids.is_empty() && t.text.is_empty() => Vec::new(),
            Some(JobEvent::Token(t)) => {
                let pieces = match reader.as_mut() {
                    None => vec![Piece::Text(t.text)],
                    Some(r) => r.push(&t.text),
                };
                held_logprobs.extend(t.logprobs);
                let mut events = Vec::with_capacity(pieces.len());
                for piece in pieces {
                    let logprobs = match kind {
                        _ if !want_logprobs => Value::Null,
                        Kind::Chat => chat_logprobs(&std::mem::take(&mut held_logprobs)),
                        Kind::Text => {
                            text_logprobs(&std::mem::take(&mut held_logprobs), &mut text_offset)
                        }
                    };
                    let delta = Delta::of(piece, first, &mut calls);
                    events.push(chunk(delta, logprobs, None, None, &silk));
                    first = false;
                }
                events
            }
            Some(JobEvent::Done { usage, cost }) => {
                for piece in reader
                    .as_mut()
                    .map(ToolCallReader::finish)
                    .unwrap_or_default()
                {
                    let delta = Delta::of(piece, first, &mut calls);
                    events.push(chunk(delta, Value::Null, None, None, &silk));
                    first = false;
                }
                let (usage_value, silk_value) = if alone {
                    (Some(usage_json(&usage)), silk_final(&answer.workers, cost))
                } else {
                    (None, silk.clone())
                };
                events.push(chunk(
                    Delta {
                        first,
                        text: first.then(String::new),
                        call: None,
                    },
                    Value::Null,
                    Some(finish_str(&usage, calls)),
                    usage_value,
                    &silk_value,
                ));
                for e in events {
                    if tx.send(e).await.is_err() {
                        return Err(());
                    }
                }
                return Ok((usage, cost));
            }
            Some(JobEvent::Failed(msg)) => {
                let err = json!({ "error": {
                    "message": msg, "type": "server_error", "param": null, "code": "worker_failed",
                }});
                let _ = tx.send(SseEvent::default().data(err.to_string())).await;
                return Err(());
            }
            None => {
                let err = json!({ "error": {
                    "message": "the job ended without a result", "type": "server_error",
                    "param": null, "code": "worker_failed",
                }});
                let _ = tx.send(SseEvent::default().data(err.to_string())).await;
                return Err(());
            }
        };
        events.extend(more);
        for e in events {
            if tx.send(e).await.is_err() {
                return Err(());
            }
        }
    }
}

/// What one stream chunk adds to the answer.
struct Delta {
    /// The first chunk, which carries the role.
    first: bool,
    /// Text.
    text: Option<String>,
    /// One tool call.
    call: Option<Value>,
}

impl Delta {
    /// The delta of one piece of the answer; a call takes the next index
    /// of the `calls` made so far.
    fn of(piece: Piece, first: bool, calls: &mut usize) -> Self {
        match piece {
            Piece::Text(text) => Delta {
                first,
                text: Some(text),
                call: None,
            },
            Piece::Call(call) => {
                *calls += 1;
                Delta {
                    first,
                    text: None,
                    call: Some(tool_call_json(call, Some(*calls - 1))),
                }
            }
        }
    }
}

async fn models(State(node): State<Arc<Node>>) -> Response {
    let anns = node.known_workers();
    let mut by_model: std::collections::BTreeMap<String, (u32, u64, u64, Vec<&'static str>)> =
        Default::default();
    for a in &anns {
        for m in &a.models {
            let e = by_model
                .entry(m.clone())
                .or_insert((0, u64::MAX, 0, Vec::new()));
            e.0 += 1;
            e.1 = e.1.min(a.price_coefficient_milli);
            e.2 = e.2.max(a.price_coefficient_milli);
            let mode = mode_str(a.attestation_mode);
            if !e.3.contains(&mode) {
                e.3.push(mode);
            }
        }
    }
    let data: Vec<Value> = by_model
        .into_iter()
        .map(|(id, (workers, min, max, modes))| {
            json!({
                "id": id,
                "object": "model",
                "created": 0,
                "owned_by": "silk",
                "silk": {
                    "name": model_name(&id),
                    "workers": workers,
                    "price_coefficient_milli": { "min": min, "max": max },
                    "attestation": modes,
                },
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

async fn mesh(State(node): State<Arc<Node>>, Extension(caller): Extension<Caller>) -> Response {
    Json(mesh_json(&node, &caller).await).into_response()
}

/// This node, its peers and the workers it knows (`GET /v1/mesh`, and part
/// of `GET /v1/status`); the books only for a caller who may see them.
pub(crate) async fn mesh_json(node: &Node, caller: &Caller) -> Value {
    let overlay = node.overlay();
    let peers = overlay.peers().await.unwrap_or_default();
    let listen = overlay.listen_addrs().await.unwrap_or_default();
    let reachability = overlay.reachability().await.ok();
    let anns = node.known_workers();
    let coordinate = overlay.coordinate().await.ok();
    let rtt_of = |p: &silk_overlay::PeerId| {
        peers
            .iter()
            .find(|i| &i.peer_id == p)
            .and_then(|i| i.rtt)
            .map(|r| r.as_secs_f64() * 1000.0)
    };
    let me = node.peer_id();
    let workers: Vec<Value> = anns
        .iter()
        .map(|a| {
            json!({
                "peer_id": a.peer_id.to_string(),
                "local": a.peer_id == me,
                "rtt_ms": if a.peer_id == me { Some(0.0) } else { rtt_of(&a.peer_id) },
                "coordinate": a.coordinate,
                "estimated_rtt_ms": coordinate.as_ref().zip(a.coordinate.as_ref())
                    .map(|(mine, theirs)| mine.estimate_rtt(theirs).as_secs_f64() * 1000.0),
                "models": a.models,
                "context_windows": a.context_windows,
                "free_slots": a.free_slots,
                "queue_depth": a.queue_depth,
                "decode_tokens_per_s": a.decode_tokens_per_s_milli as f64 / 1000.0,
                "price_coefficient_milli": a.price_coefficient_milli,
                "reputation": node.reputation_of(&a.peer_id),
                "attestation": mode_str(a.attestation_mode),
                "attestation_digest": a.attestation_digest.map(hex::encode),
                "seq": a.seq,
                "expires_at_ms": a.expires_at_ms,
            })
        })
        .collect();
    let peers: Vec<Value> = peers
        .iter()
        .map(|p| {
            json!({
                "peer_id": p.peer_id.to_string(),
                "addresses": p.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "rtt_ms": p.rtt.map(|r| r.as_secs_f64() * 1000.0),
                "misbehaviour": p.misbehaviour,
                "agent_version": p.agent_version,
                "connections": p.connections.iter().map(|c| json!({
                    "address": c.address.to_string(),
                    "relayed": c.relayed,
                    "outbound": c.outbound,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "peer_id": me.to_string(),
        // A relayed listen address already ends in our peer id.
        "listen_addrs": listen.iter().map(|a| match a.iter().last() {
            Some(silk_overlay::multiaddr::Protocol::P2p(_)) => a.to_string(),
            _ => format!("{a}/p2p/{me}"),
        }).collect::<Vec<_>>(),
        "reachability": reachability.map(|r| json!({
            "status": r.status,
            "relays": r.relays.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })),
        "attestation": mode_str(node.attestation_mode()),
        "coordinate": coordinate,
        "allow_insecure_workers": node.allows_insecure(),
        "worker": node.served_model().map(|m| json!({ "model": m.id, "name": m.name })),
        "peers": peers,
        "workers": workers,
        "payments": node.billing().filter(|_| caller.sees_books()).map(|b| payments_json(b)),
    })
}

/// A nanoTON amount as a JSON number (a string past `u64`).
pub(crate) fn nano_json(c: silk_chain::Coins) -> Value {
    match u64::try_from(c.nano()) {
        Ok(n) => json!(n),
        Err(_) => json!(c.nano().to_string()),
    }
}

/// What this node spent as a gateway and earned as a worker, from its
/// payment books (no chain query).
fn payments_json(b: &crate::billing::Billing) -> Value {
    let p = b.payments();
    let sum = |it: &mut dyn Iterator<Item = silk_chain::Coins>| {
        it.fold(silk_chain::Coins::ZERO, |a, c| {
            silk_chain::Coins(a.nano().saturating_add(c.nano()))
        })
    };
    let lanes = p.client_book().lanes().unwrap_or_default();
    let held = p.worker_book().lanes().unwrap_or_default();
    json!({
        "wallet": p.wallet_address().to_string(),
        "contract": p.client_contract().to_string(),
        "coefficient_milli": p.config().coefficient_milli,
        "spent_nanoton": nano_json(sum(&mut lanes.iter().map(|l| l.signed))),
        "reserved_nanoton": nano_json(sum(&mut lanes.iter().map(|l| l.reserved))),
        "lanes": lanes.iter().map(|l| json!({
            "worker": l.worker.to_string(),
            "lane_id": l.lane_id,
            "deposited_nanoton": nano_json(l.deposited),
            "signed_nanoton": nano_json(l.signed),
            "reserved_nanoton": nano_json(l.reserved),
        })).collect::<Vec<_>>(),
        "earned_nanoton": nano_json(sum(&mut held.iter().map(|l| l.cheque_total()))),
        "redeemed_nanoton": nano_json(sum(&mut held.iter().map(|l| l.redeemed))),
        "uncovered_nanoton": nano_json(sum(&mut held.iter().map(|l| l.outstanding()))),
        "clients": held.iter().map(|l| json!({
            "contract": l.contract.to_string(),
            "lane_id": l.lane_id,
            "cheques_nanoton": nano_json(l.cheque_total()),
            "redeemed_nanoton": nano_json(l.redeemed),
            "uncovered_nanoton": nano_json(l.outstanding()),
        })).collect::<Vec<_>>(),
    })
}

/// Liveness. Without a key on a bind that needs one, it says only that the
/// node is up (no peer id, no wallet).
async fn health(State(node): State<Arc<Node>>, Extension(caller): Extension<Caller>) -> Response {
    if !caller.sees_books() {
        return Json(json!({ "status": "ok" })).into_response();
    }
    Json(json!({
        "status": "ok",
        "peer_id": node.peer_id().to_string(),
        "worker": node.served_model().is_some(),
        "attestation": mode_str(node.attestation_mode()),
        "uptime_s": node.uptime().as_secs(),
        "wallet": node.billing().map(|b| b.payout().to_string()),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use silk_inference::TokenLogprob;

    /// `n` choices are counted as OpenAI counts them: the prompt once,
    /// every choice's completion; the cost is every choice's, or unknown
    /// when one could not be settled.
    #[test]
    fn choices_count_the_prompt_once_and_every_answer() {
        let usage = |completion: u32, cached: u32| crate::protocol::JobUsage {
            prompt_tokens: 40,
            completion_tokens: completion,
            finish: crate::protocol::Finish::Length,
            decode_tokens_per_s_milli: 0,
            price_coefficient_milli: 1000,
            cached_tokens: cached,
        };
        let total = total_usage(&[usage(5, 0), usage(7, 40), usage(9, 40)]).expect("usage");
        assert_eq!((total.prompt_tokens, total.completion_tokens), (40, 21));
        assert_eq!(
            total.cached_tokens, 0,
            "the prompt as the first choice read it"
        );
        assert!(total_usage(&[]).is_none());
        let c = silk_chain::Coins;
        assert_eq!(total_cost(&[Some(c(3)), Some(c(4))]), Some(c(7)));
        assert_eq!(total_cost(&[Some(c(3)), None]), None);
    }

    fn lp(text: &str, logprob: f32) -> TokenLogprob {
        TokenLogprob {
            bytes: text.as_bytes().to_vec(),
            logprob,
            top: Vec::new(),
        }
    }

    /// A worker's refusal names the field it refused, as the node's own
    /// checks do; a name the API does not have names nothing.
    #[test]
    fn a_workers_refusal_names_the_field_it_refused() {
        let refusal = |m: &str| {
            ApiError::from(DispatchError::InvalidRequest(format!(
                "worker refused (Rejected): {m}"
            )))
        };
        let e = refusal("invalid request: `logit_bias` token id 99999999 is outside the model's vocabulary of 49152");
        assert_eq!(e.param(), Some("logit_bias"));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e = refusal("invalid request: `response_format` the schema cannot be enforced: x");
        assert_eq!(e.param(), Some("response_format"));
        for m in [
            "invalid request: `continuation` token id 7 is outside",
            "invalid request: `logit_bias",
            "the chat template cannot render",
        ] {
            assert_eq!(refusal(m).param(), None, "{m}");
        }
    }

    /// An echoed prompt's first token has no score and takes whatever the
    /// scored tokens leave of the prompt; offsets run on into the answer.
    #[test]
    fn an_echoed_prompt_is_listed_before_the_answer_with_its_scores() {
        let mut offset = 0;
        let prompt = echo_logprobs(
            "The sky is",
            &[lp(" sky", -2.5), lp(" is", -0.5)],
            &mut offset,
        );
        assert_eq!(offset, 10);
        let answer = text_logprobs(&[lp(" blue", -0.25)], &mut offset);
        let all = join_text_logprobs(prompt, answer);
        assert_eq!(all["tokens"], json!(["The", " sky", " is", " blue"]));
        assert_eq!(all["token_logprobs"], json!([null, -2.5, -0.5, -0.25]));
        assert_eq!(all["text_offset"], json!([0, 3, 7, 10]));
        assert_eq!(all["top_logprobs"][0], Value::Null);
        // Scores a hostile worker made longer than the prompt cannot push
        // the first token's cut out of the text.
        let mut offset = 0;
        let v = echo_logprobs("ab", &[lp("abc", -1.0)], &mut offset);
        assert_eq!(v["tokens"][0], json!(""));
        assert_eq!(offset, 2);
    }
}

//! The OpenAI-compatible HTTP API that every node serves (axum).
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: streaming (SSE,
//!   ending in `data: [DONE]`) or not, with `usage`. Requests are validated
//!   strictly ([`types`]); errors use OpenAI's `{"error":{…}}` shape.
//! - `GET /v1/models`, `GET /v1/mesh`, `GET /health`.
//!
//! Every completion names its worker and that worker's attestation mode in
//! the `x-silk-worker` / `x-silk-attestation` headers and in `silk` in the body.

pub mod types;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::jobs::JobRequest;
use crate::service::{model_name, Dispatch, DispatchError, JobEvent, Node};
use crate::MeshError;
use types::{ApiError, ChatRequest, CompletionRequest, Validated};

/// Header naming the worker that served a completion.
pub const WORKER_HEADER: &str = "x-silk-worker";
/// Header with that worker's attestation mode (`tdx` or `insecure`).
pub const ATTESTATION_HEADER: &str = "x-silk-attestation";

/// The API's routes over `node`.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/mesh", get(mesh))
        .route("/health", get(health))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such route",
            )
        })
        .with_state(node)
}

/// Binds `addr` and serves the API until `cancel` fires. Returns the bound
/// address (useful with port 0) and the server task.
pub async fn serve(
    node: Arc<Node>,
    addr: &str,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MeshError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MeshError::ApiBind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| MeshError::ApiBind {
        addr: addr.to_string(),
        source,
    })?;
    let app = router(node);
    let task = tokio::spawn(async move {
        let shutdown = cancel.clone();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    });
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
        let (status, kind, code) = match &e {
            DispatchError::ModelRequired(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "model_required",
            ),
            DispatchError::UnknownModel(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            DispatchError::AttestationRefused(_) => (
                StatusCode::FORBIDDEN,
                "attestation_error",
                "insecure_workers_refused",
            ),
            DispatchError::Saturated(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "workers_saturated",
            ),
            DispatchError::TooExpensive { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "price_above_max_coefficient",
            ),
            DispatchError::InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            DispatchError::AllFailed(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_worker_available",
            ),
        };
        ApiError::new(status, kind, code, e.to_string())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    match types::parse::<ChatRequest>(&body).and_then(ChatRequest::validate) {
        Ok(v) => complete(node, v, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    match types::parse::<CompletionRequest>(&body).and_then(CompletionRequest::validate) {
        Ok(v) => complete(node, v, Kind::Text).await,
        Err(e) => e.into_response(),
    }
}

async fn complete(node: Arc<Node>, v: Validated, kind: Kind) -> Response {
    let model = match node.resolve_model(v.model.as_deref()).await {
        Ok(m) => m,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let request = JobRequest {
        model,
        prompt: v.prompt,
        max_tokens: v.max_tokens,
        temperature: v.temperature,
        top_p: v.top_p,
        seed: v.seed,
        stop: v.stop,
        ignore_eos: v.ignore_eos,
        payment: None,
    };
    let dispatch = match node.dispatch(request, v.max_coefficient_milli).await {
        Ok(d) => d,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let mut headers = HeaderMap::new();
    if let Ok(w) = HeaderValue::from_str(&dispatch.worker.to_string()) {
        headers.insert(WORKER_HEADER, w);
    }
    headers.insert(
        ATTESTATION_HEADER,
        HeaderValue::from_static(mode_str(dispatch.attestation)),
    );
    if v.stream {
        (headers, stream_response(dispatch, kind)).into_response()
    } else {
        match collect(dispatch, kind).await {
            Ok(body) => (headers, Json(body)).into_response(),
            Err(e) => (headers, e).into_response(),
        }
    }
}

fn mode_str(mode: silk_overlay::AttestationMode) -> &'static str {
    match mode {
        silk_overlay::AttestationMode::Tdx => "tdx",
        silk_overlay::AttestationMode::Insecure => "insecure",
    }
}

fn silk_info(d: &Dispatch) -> Value {
    json!({ "worker": d.worker.to_string(), "attestation": mode_str(d.attestation) })
}

/// `silk` of the final chunk or body: [`silk_info`] plus the job's cost in
/// nanoTON (a JSON number; `null` if the gateway could not settle it).
fn silk_final(d: &Dispatch, cost: Option<silk_chain::Coins>) -> Value {
    let mut v = silk_info(d);
    v["cost_nanoton"] = match cost.map(|c| u64::try_from(c.nano())) {
        Some(Ok(n)) => json!(n),
        _ => Value::Null,
    };
    v
}

fn usage_json(u: &crate::jobs::JobUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

async fn collect(mut d: Dispatch, kind: Kind) -> Result<Value, ApiError> {
    let mut text = String::new();
    let (usage, cost) = loop {
        match d.events.recv().await {
            Some(JobEvent::Token(t)) => text.push_str(&t.text),
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
        Kind::Chat => json!({
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": null,
            "finish_reason": usage.finish.as_str(),
        }),
        Kind::Text => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": usage.finish.as_str(),
        }),
    };
    Ok(json!({
        "id": completion_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": unix_now(),
        "model": d.model,
        "choices": [choice],
        "usage": usage_json(&usage),
        "silk": silk_final(&d, cost),
    }))
}

fn stream_response(
    d: Dispatch,
    kind: Kind,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(pump(d, kind, tx));
    let stream =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Turns job events into SSE events; stops (dropping the job, which cancels
/// it on the worker) as soon as the client goes away.
async fn pump(mut d: Dispatch, kind: Kind, tx: mpsc::Sender<SseEvent>) {
    let id = completion_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = unix_now();
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let silk = silk_info(&d);
    let chunk = |text: Option<&str>,
                 finish: Option<&str>,
                 first: bool,
                 usage: Option<Value>,
                 silk: &Value| {
        let choice = match kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
            Kind::Text => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish
            }),
        };
        let mut v = json!({
            "id": id, "object": object, "created": created, "model": d.model,
            "choices": [choice], "silk": silk,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        SseEvent::default().data(v.to_string())
    };
    let mut first = true;
    loop {
        let event = match d.events.recv().await {
            Some(JobEvent::Token(t)) => {
                let e = chunk(Some(&t.text), None, first, None, &silk);
                first = false;
                e
            }
            Some(JobEvent::Done { usage, cost }) => {
                let e = chunk(
                    if first { Some("") } else { None },
                    Some(usage.finish.as_str()),
                    first,
                    Some(usage_json(&usage)),
                    &silk_final(&d, cost),
                );
                if tx.send(e).await.is_ok() {
                    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                }
                return;
            }
            Some(JobEvent::Failed(msg)) => {
                let err = json!({ "error": {
                    "message": msg, "type": "server_error", "param": null, "code": "worker_failed",
                }});
                let _ = tx.send(SseEvent::default().data(err.to_string())).await;
                return;
            }
            None => {
                let err = json!({ "error": {
                    "message": "the job ended without a result", "type": "server_error",
                    "param": null, "code": "worker_failed",
                }});
                let _ = tx.send(SseEvent::default().data(err.to_string())).await;
                return;
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

async fn models(State(node): State<Arc<Node>>) -> Response {
    let anns = node.overlay().announcements().await.unwrap_or_default();
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

async fn mesh(State(node): State<Arc<Node>>) -> Response {
    let overlay = node.overlay();
    let peers = overlay.peers().await.unwrap_or_default();
    let listen = overlay.listen_addrs().await.unwrap_or_default();
    let anns = overlay.announcements().await.unwrap_or_default();
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
                "models": a.models,
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
            })
        })
        .collect();
    Json(json!({
        "peer_id": me.to_string(),
        "listen_addrs": listen.iter().map(|a| format!("{a}/p2p/{me}")).collect::<Vec<_>>(),
        "attestation": mode_str(node.attestation_mode()),
        "allow_insecure_workers": node.allows_insecure(),
        "worker": node.served_model().map(|m| json!({ "model": m.id, "name": m.name })),
        "peers": peers,
        "workers": workers,
        "payments": node.billing().map(|b| payments_json(b)),
    }))
    .into_response()
}

/// A nanoTON amount as a JSON number (a string past `u64`).
fn nano_json(c: silk_chain::Coins) -> Value {
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

async fn health(State(node): State<Arc<Node>>) -> Response {
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

//! The operator's routes: `GET /v1/status`, `GET /metrics` and the
//! dashboard at `GET /`.
//!
//! `/v1/status` is what the dashboard and `silk status` read: this node
//! (identity, attestation in plain words, uptime, balances), the mesh as
//! `/v1/mesh` shows it, the jobs counted by outcome (the same counters
//! `/metrics` serves), the recent jobs and the money over time from the
//! node's history ([`crate::activity`]), and the engine's load.
//!
//! The dashboard is three static files compiled into the binary (no
//! build step, no CDN): it works offline and on a phone, and polls
//! `/v1/status` (polling, not SSE: `EventSource` cannot send the API key
//! a node on a public address asks for). The page itself holds no data,
//! so it loads without a key; it asks for one when `/v1/status` answers
//! 401 and keeps it in the browser's session storage.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::guard::Caller;
use super::types::ApiError;
use super::{mesh_json, mode_str, nano_json};
use crate::activity::Span;
use crate::metrics::{MoneyTotals, Role};
use crate::node::Node;

/// The dashboard's script.
pub const DASHBOARD_JS_PATH: &str = "/dashboard.js";
/// The dashboard's style sheet.
pub const DASHBOARD_CSS_PATH: &str = "/dashboard.css";

const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// Most recent jobs `/v1/status` lists.
const MAX_RECENT: usize = 500;
/// How old the balances shown may be.
const BALANCES_MAX_AGE: Duration = Duration::from_secs(30);
/// How long a status read waits for the chain.
const BALANCES_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether `path` is one of the dashboard's static files.
pub fn is_page(path: &str) -> bool {
    matches!(path, "/" | DASHBOARD_JS_PATH | DASHBOARD_CSS_PATH)
}

/// `GET /v1/status` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    /// `hour` (default), `day` or `week`.
    span: Option<String>,
    /// How many recent jobs (default 20, at most 500).
    jobs: Option<usize>,
}

/// The attestation mode in plain words.
fn attestation_words(mode: silk_overlay::AttestationMode) -> &'static str {
    match mode {
        silk_overlay::AttestationMode::Tdx => {
            "Intel TDX: prompts are processed inside a hardware-isolated VM whose memory this \
             machine's operator cannot read"
        }
        silk_overlay::AttestationMode::Insecure => {
            "insecure: no TDX here, so whoever runs this machine could read the prompts it \
             processes (for testnets and development)"
        }
    }
}

fn jobs_json(node: &Node, role: Role) -> Value {
    let mut out = serde_json::Map::new();
    for (outcome, n) in node.history().metrics().jobs_by_outcome(role) {
        out.insert(outcome.to_string(), json!(n));
    }
    Value::Object(out)
}

/// This node's status: what the dashboard and `silk status` show.
pub async fn status(
    State(node): State<Arc<Node>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_query",
                format!("bad query string: {}", e.body_text()),
            )
            .into_response()
        }
    };
    let span_name = query.span.as_deref().unwrap_or("hour");
    let Some(span) = Span::parse(span_name) else {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_span",
            format!("span must be `hour`, `day` or `week`, not `{span_name}`"),
        )
        .with_param("span")
        .into_response();
    };
    let n_jobs = query.jobs.unwrap_or(20).min(MAX_RECENT);
    let history = node.history().clone();
    let now = crate::now_ms();
    let read = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::activity::HistoryError>((
            history.recent(n_jobs)?,
            history.series(span, now)?,
        ))
    })
    .await;
    let read = match read {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (recent, series) = match read {
        Ok(r) => r,
        Err(e) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "history_unreadable",
                e,
            )
            .into_response()
        }
    };
    let books = node.billing().filter(|_| caller.sees_books());
    let balances = match books {
        Some(b) => Some(
            match b.balances_cached(BALANCES_MAX_AGE, BALANCES_TIMEOUT).await {
                Ok(b) => json!({
                    "wallet_nanoton": nano_json(b.wallet),
                    "contract_nanoton": nano_json(b.contract),
                    "committed_nanoton": nano_json(b.committed),
                }),
                Err(e) => json!({ "error": e }),
            },
        ),
        None => None,
    };
    let money = books.map(|b| MoneyTotals::of(b));
    let engine = node.engine().map(|e| {
        let load = e.load();
        json!({
            "batch_in_use": load.active,
            "batch_size": load.max_batch,
            "queued": load.queued,
            "decode_tokens_per_s": load.decode_tokens_per_s,
            "prefix_cache_bytes": load.prefix_cache_bytes,
            "cached_prompt_tokens": load.cached_tokens,
        })
    });
    let (step_s, _) = match span {
        Span::Hour => (60, 60),
        Span::Day => (900, 96),
        Span::Week => (3600, 168),
    };
    Json(json!({
        "node": {
            "peer_id": node.peer_id().to_string(),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": node.uptime().as_secs(),
            "attestation": mode_str(node.attestation_mode()),
            "attestation_words": attestation_words(node.attestation_mode()),
            "worker": node.served_model().map(|m| json!({ "model": m.id, "name": m.name })),
            "wallet": books.map(|b| b.payout().to_string()),
            "contract": books.map(|b| b.payments().client_contract().to_string()),
        },
        "balances": balances,
        "money": money,
        "jobs": {
            "gateway": jobs_json(&node, Role::Gateway),
            "worker": jobs_json(&node, Role::Worker),
        },
        "engine": engine,
        "gateway_queue": node.gateway().queue().waiting(),
        "recent_jobs": recent.iter().map(|j| json!({
            "at_ms": j.at_ms,
            "role": j.role,
            "model": j.model,
            "peer": j.peer,
            "prompt_tokens": j.prompt_tokens,
            "completion_tokens": j.completion_tokens,
            "first_token_ms": j.first_token_ms,
            "duration_ms": j.duration_ms,
            "tokens_per_s": j.tokens_per_s(),
            "cost_nanoton": j.cost_nanoton,
            "outcome": j.outcome,
        })).collect::<Vec<_>>(),
        "series": {
            "span": span_name,
            "step_s": step_s,
            "points": series,
        },
        "mesh": mesh_json(&node, &caller).await,
    }))
    .into_response()
}

/// `GET /metrics`: Prometheus's text format (OpenMetrics 1.0).
pub async fn metrics(State(node): State<Arc<Node>>) -> Response {
    match node.metrics().encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            )],
            body,
        )
            .into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "metrics_unavailable",
            "could not encode the metrics",
        )
        .into_response(),
    }
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // Everything comes from this node; nothing may frame the page.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'self'; style-src 'self'; \
                     connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
                     base-uri 'none'; form-action 'none'",
                ),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the dashboard.
pub async fn dashboard_html() -> Response {
    page("text/html; charset=utf-8", DASHBOARD_HTML)
}

/// The dashboard's script.
pub async fn dashboard_js() -> Response {
    page("text/javascript; charset=utf-8", DASHBOARD_JS)
}

/// The dashboard's style sheet.
pub async fn dashboard_css() -> Response {
    page("text/css; charset=utf-8", DASHBOARD_CSS)
}

//! The API's front door: what a request must be to reach a handler.
//!
//! In order, for every request:
//! 1. `Host` is an IP address, `localhost`, or a name in `[http] hosts`
//!    (a page on a DNS-rebinding domain sends its own name and is refused);
//! 2. an `Origin`, when present, is in `[http] allowed_origins` or the
//!    node's own (a web page elsewhere cannot drive the API);
//! 3. a `POST` body is declared `application/json` (a "simple" cross-site
//!    form or `text/plain` request never is);
//! 4. `Authorization: Bearer <key>` names a valid key. A key is required on
//!    every bind that is not loopback (there only `GET /health` answers
//!    without one, and says less); on loopback it is optional: a silk key
//!    (`sk-silk-…`) is checked when given, any other token (the placeholder
//!    an OpenAI client must send) is no key;
//! 5. the key's rate is not exceeded;
//! 6. a permit of `[http] max_concurrent_requests` is free before the
//!    request deadline.
//!
//! The handler then runs under the request deadline (`request_timeout_s`).
//! Refusals use OpenAI's error shape: 400, 401, 403, 415, 429, 503, 504.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::keys::{ApiKey, ApiKeys, KeyError, SpendHold};
use super::types::ApiError;

/// Largest request body: below the overlay's 1 MiB job frame, with room
/// for what the gateway adds to the prompt (model id, payment terms), so a
/// body the API accepts always fits in a frame.
pub const API_BODY_LIMIT: usize = 1024 * 1024 - 4096;

/// The `[http]` section of config.toml: who may call the API and the
/// server's limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Browser origins allowed to call the API, e.g. `https://app.example`.
    /// A request carrying any other `Origin` is refused.
    pub allowed_origins: Vec<String>,
    /// Host names the API answers to besides IP addresses and `localhost`.
    pub hosts: Vec<String>,
    /// Seconds a connection may take to send a request's headers (also
    /// how long an idle keep-alive connection stays open).
    pub header_timeout_s: u64,
    /// Seconds a request may take to send its body.
    pub body_timeout_s: u64,
    /// Seconds a request may run in all, a streamed answer included.
    pub request_timeout_s: u64,
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one IP address at most.
    pub max_connections_per_ip: usize,
    /// Requests handled at once; more wait for a permit until their deadline.
    pub max_concurrent_requests: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            hosts: Vec::new(),
            header_timeout_s: 10,
            body_timeout_s: 30,
            request_timeout_s: 600,
            max_connections: 1024,
            max_connections_per_ip: 256,
            max_concurrent_requests: 256,
        }
    }
}

impl HttpConfig {
    /// Checks the limits are usable.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("header_timeout_s", self.header_timeout_s as usize),
            ("body_timeout_s", self.body_timeout_s as usize),
            ("request_timeout_s", self.request_timeout_s as usize),
            ("max_connections", self.max_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_concurrent_requests", self.max_concurrent_requests),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("[http] {name} must be above zero"));
            }
        }
        for o in &self.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(format!(
                    "[http] allowed_origins: {o:?} is not an origin; write it as scheme://host[:port], e.g. \"https://app.example\""
                ));
            }
        }
        Ok(())
    }
}

/// Whether a server bound to `ip` needs a key on every request: yes
/// unless it is loopback (`0.0.0.0` and `::` are not).
pub fn key_required(ip: IpAddr) -> bool {
    !ip.is_loopback()
}

/// Who is calling, as the guard found it.
#[derive(Clone, Debug)]
pub enum Caller {
    /// No key, on a loopback bind where keys are optional.
    Local,
    /// A valid key.
    Key {
        /// The key.
        key: ApiKey,
        /// The store its spending is counted in.
        keys: ApiKeys,
    },
    /// No key where one is required (only `GET /health` lets it through).
    Anonymous,
}

impl Caller {
    /// Whether the caller may see the node's books (wallet, lanes, earnings).
    pub fn sees_books(&self) -> bool {
        !matches!(self, Caller::Anonymous)
    }

    /// Holds a request's worst case against the caller's daily spend cap
    /// (nothing to hold without a key).
    pub fn hold(&self, worst: silk_chain::Coins) -> Result<Option<SpendHold>, KeyError> {
        match self {
            Caller::Key { key, keys } => keys.hold(key, worst).map(Some),
            Caller::Local | Caller::Anonymous => Ok(None),
        }
    }
}

/// When a request must have sent its body, and be answered by.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// The whole body read by then.
    pub body: Instant,
    /// The answer (a streamed one included) finished by then.
    pub request: Instant,
}

/// The guard's state.
#[derive(Debug)]
pub struct Guard {
    origins: Vec<String>,
    hosts: Vec<String>,
    keys: ApiKeys,
    key_required: bool,
    body_timeout: Duration,
    request_timeout: Duration,
    permits: Arc<Semaphore>,
}

impl Guard {
    /// A guard for a server bound to `bind` with `config` and `keys`.
    pub fn new(config: &HttpConfig, keys: ApiKeys, bind: IpAddr) -> Self {
        Self {
            origins: config
                .allowed_origins
                .iter()
                .map(|o| o.to_ascii_lowercase())
                .collect(),
            hosts: config
                .hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            keys,
            key_required: key_required(bind),
            body_timeout: Duration::from_secs(config.body_timeout_s),
            request_timeout: Duration::from_secs(config.request_timeout_s),
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests)),
        }
    }

    /// The key store.
    pub fn keys(&self) -> &ApiKeys {
        &self.keys
    }

    /// Whether every request needs a key.
    pub fn requires_key(&self) -> bool {
        self.key_required
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).trim_end_matches('.').to_ascii_lowercase();
        name == "localhost" || name.parse::<IpAddr>().is_ok() || self.hosts.contains(&name)
    }

    fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        let host = host.to_ascii_lowercase();
        self.origins.contains(&origin)
            // The node's own pages (same origin).
            || origin == format!("http://{host}")
            || origin == format!("https://{host}")
    }

    fn caller(&self, req: &Request) -> Result<Caller, ApiError> {
        let value = req.headers().get(header::AUTHORIZATION);
        // On loopback keys are optional, and OpenAI clients always send
        // one: a placeholder (`api_key="unused"`, "EMPTY") is no key. A
        // token shaped like a silk key is checked, so a mistyped real key
        // is refused rather than silently ignored.
        let value = value.filter(|v| {
            self.key_required
                || v.to_str().is_ok_and(|v| {
                    v.split_once(' ').is_some_and(|(scheme, token)| {
                        scheme.eq_ignore_ascii_case("bearer")
                            && token.trim().starts_with(super::keys::KEY_PREFIX)
                    })
                })
        });
        let Some(value) = value else {
            return if !self.key_required {
                Ok(Caller::Local)
            } else if req.method() == Method::GET
                && (req.uri().path() == "/health" || super::status::is_page(req.uri().path()))
            {
                // Liveness, and the dashboard's page and scripts: they hold
                // no data (the page asks for a key to read `/v1/status`).
                Ok(Caller::Anonymous)
            } else {
                Err(unauthorized(
                    "missing_api_key",
                    "this node's API needs an API key: send `Authorization: Bearer sk-silk-…` \
                     (the node's operator creates keys with `silk api-key create`)",
                ))
            };
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| {
                unauthorized(
                    "invalid_api_key",
                    "the Authorization header must be `Bearer <API key>`",
                )
            })?;
        match self.keys.authenticate(token) {
            Ok(key) => Ok(Caller::Key {
                key,
                keys: self.keys.clone(),
            }),
            Err(e @ KeyError::Store(_)) => {
                tracing::error!(error = %e, "API key store failed");
                Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "key_store_failed",
                    "the node could not check the API key; try again",
                ))
            }
            Err(e) => Err(unauthorized("invalid_api_key", e.to_string())),
        }
    }
}

fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        code,
        message,
    )
}

fn forbidden(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "invalid_request_error",
        code,
        message,
    )
}

/// The host part of a `Host` header (`[::1]:8080` → `::1`, `a.b:80` → `a.b`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// The middleware: the checks of this module's header, then the handler
/// under the deadline. Inserts [`Caller`] and [`Deadlines`] into the request.
pub async fn check(State(guard): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    let deadline = Instant::now() + guard.request_timeout;
    let host = match req.headers().get(header::HOST).map(HeaderValue::to_str) {
        Some(Ok(h)) => h.to_string(),
        Some(Err(_)) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_host",
                "the Host header is not ASCII",
            )
            .into_response()
        }
        None => match req.uri().authority() {
            // HTTP/2 and absolute-form requests carry it in the URI.
            Some(a) => a.to_string(),
            None => {
                return ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "host_required",
                    "the request has no Host header",
                )
                .into_response()
            }
        },
    };
    if !guard.host_allowed(&host) {
        return forbidden(
            "host_not_allowed",
            format!(
                "this node does not answer to the host `{host}`: call it by IP address or \
                 localhost, or have its operator add the name to [http] hosts in config.toml"
            ),
        )
        .into_response();
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("(not ASCII)");
        if !guard.origin_allowed(origin, &host) {
            return forbidden(
                "origin_not_allowed",
                format!(
                    "requests from web pages at `{origin}` are refused: the node's operator can \
                     allow it in [http] allowed_origins in config.toml"
                ),
            )
            .into_response();
        }
    }
    if req.method() == Method::POST && !is_json(req.headers().get(header::CONTENT_TYPE)) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            "send the request body as JSON with `Content-Type: application/json`",
        )
        .into_response();
    }
    let caller = match guard.caller(&req) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Caller::Key { key, .. } = &caller {
        if let Err(wait) = guard.keys.check_rate(key) {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut r = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                format!(
                    "API key `{}` allows {} requests a minute; retry in {secs} s",
                    key.name,
                    key.rate_per_min.unwrap_or_default()
                ),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
    }
    let permit =
        match tokio::time::timeout_at(deadline, Arc::clone(&guard.permits).acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "server_busy",
                    "the node is handling as many requests as it is configured for; retry shortly",
                )
                .into_response()
            }
        };
    req.extensions_mut().insert(caller);
    req.extensions_mut().insert(Deadlines {
        body: (Instant::now() + guard.body_timeout).min(deadline),
        request: deadline,
    });
    let response = tokio::time::timeout_at(deadline, next.run(req)).await;
    drop(permit);
    match response {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "request_timeout",
            format!(
                "the request was not answered within {} s",
                guard.request_timeout.as_secs()
            ),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_lose_their_port() {
        assert_eq!(host_name("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("[::1]"), "::1");
        assert_eq!(host_name("Example.COM"), "Example.COM");
        assert_eq!(host_name("a.example:443"), "a.example");
    }

    #[test]
    fn only_ip_literals_localhost_and_configured_names_are_hosts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = ApiKeys::open(&dir.path().join("k.redb")).expect("keys");
        let config = HttpConfig {
            hosts: vec!["api.example.".into()],
            ..HttpConfig::default()
        };
        let g = Guard::new(&config, keys, "127.0.0.1".parse().expect("ip"));
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:1",
            "10.1.2.3",
            "api.example",
            "API.example.:443",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        assert!(g.origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(!g.origin_allowed("https://evil.example", "127.0.0.1:8080"));
        assert!(!g.origin_allowed("null", "127.0.0.1:8080"));
    }

    #[test]
    fn keys_are_required_on_every_bind_but_loopback() {
        for ip in ["127.0.0.1", "127.0.0.2", "::1"] {
            assert!(!key_required(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["0.0.0.0", "::", "10.0.0.1", "192.0.2.7"] {
            assert!(key_required(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn json_content_types() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(is_json(Some(&v("application/json"))));
        assert!(is_json(Some(&v("Application/JSON; charset=utf-8"))));
        assert!(!is_json(Some(&v("text/plain"))));
        assert!(!is_json(Some(&v("application/x-www-form-urlencoded"))));
        assert!(!is_json(Some(&v("multipart/form-data; boundary=x"))));
        assert!(!is_json(None));
    }

    #[test]
    fn origins_must_be_origins() {
        let bad = HttpConfig {
            allowed_origins: vec!["app.example".into()],
            ..HttpConfig::default()
        };
        assert!(bad.validate().is_err());
        let zero = HttpConfig {
            max_connections: 0,
            ..HttpConfig::default()
        };
        assert!(zero.validate().is_err());
        assert!(HttpConfig::default().validate().is_ok());
    }
}

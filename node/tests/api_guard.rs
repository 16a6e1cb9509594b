//! The HTTP API's front door, on a real node in this process: web pages
//! and DNS-rebinding hosts are refused (audit F4), keys are checked and
//! rate-limited, and keys are required off loopback (F4, F22); bodies are
//! capped below the job frame and must arrive in time, and half-open
//! connections (slowloris) hold nobody out (F14).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use silk_node::api::guard::{Guard, HttpConfig, API_BODY_LIMIT};
use silk_node::api::keys::{ApiKeys, KeyLimits, KEYS_FILE};
use silk_node::api::{self, ApiOptions};
use silk_node::node::{Node, NodeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

struct Api {
    addr: SocketAddr,
    keys: ApiKeys,
    node: Arc<Node>,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.node.shutdown();
    }
}

async fn node(dir: &std::path::Path) -> Arc<Node> {
    Node::start(NodeOptions {
        data_dir: dir.to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")],
        bootstrap: Vec::new(),
        worker_model: None,
        models_dir: dir.join("models"),
        device: Default::default(),
        dtype: Default::default(),
        allow_insecure_workers: true,
        price_coefficient_milli: 1000,
        default_max_coefficient_milli: 2000,
        billing: None,
        max_jobs_per_worker: 8,
        queue: Default::default(),
        mdns: false,
        nat: Default::default(),
        min_peers: 25,
        max_peers: 50,
        fast_gossip: false,
        attestation_policy: None,
        pccs_url: None,
        job_progress_timeout: silk_node::gateway::JOB_PROGRESS_TIMEOUT,
        pinned_models: silk_node::gateway::default_pinned_models(),
    })
    .await
    .expect("node starts")
}

/// A node whose API is served the way `silk run` serves it, on 127.0.0.1.
async fn loopback_api(http: HttpConfig) -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path()).await;
    let keys = ApiKeys::open(&dir.path().join(KEYS_FILE)).expect("keys");
    let cancel = CancellationToken::new();
    let options = ApiOptions {
        addr: "127.0.0.1:0".into(),
        http,
        keys: keys.clone(),
    };
    let (addr, _task) = api::serve(Arc::clone(&node), options, cancel.clone())
        .await
        .expect("serve");
    Api {
        addr,
        keys,
        node,
        cancel,
        _dir: dir,
    }
}

/// The API with the rules of a server bound to `bind` (e.g. `0.0.0.0`),
/// listening on 127.0.0.1 so that test traffic stays on loopback.
async fn api_as_if_bound_to(bind: IpAddr, http: HttpConfig) -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node(dir.path()).await;
    let keys = ApiKeys::open(&dir.path().join(KEYS_FILE)).expect("keys");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let guard = Arc::new(Guard::new(&http, keys.clone(), bind));
    let app = api::router(Arc::clone(&node), guard, &http);
    let cancel = CancellationToken::new();
    tokio::spawn(api::server::run(
        listener,
        app,
        http,
        cancel.clone(),
        Duration::from_secs(1),
    ));
    Api {
        addr,
        keys,
        node,
        cancel,
        _dir: dir,
    }
}

/// Sends `head` (request line and headers, without the blank line) and
/// `body` on a fresh connection; returns the status and the JSON body.
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    s.write_all(&request).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("an answer within 30 s")
        .expect("read");
    parse_response(&out)
}

fn parse_response(bytes: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(bytes);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn chat_body() -> Vec<u8> {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        .to_string()
        .into_bytes()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_the_api() {
    let api = loopback_api(HttpConfig::default()).await;
    let a = api.addr;
    let host = format!("Host: {a}");

    // The audit's reproduction: a page at another origin POSTs text/plain
    // (no CORS preflight) to the local node.
    let (status, body) = raw(
        a,
        &format!("POST /v1/chat/completions HTTP/1.1\r\n{host}\r\nOrigin: https://evil.example\r\nContent-Type: text/plain"),
        &chat_body(),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "origin_not_allowed"), "{body}");
    // Without an Origin, a form or text/plain body is still not JSON.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let (status, body) = raw(
            a,
            &format!("POST /v1/chat/completions HTTP/1.1\r\n{host}\r\nContent-Type: {ct}"),
            &chat_body(),
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (415, "unsupported_media_type"),
            "{ct}: {body}"
        );
    }
    // JSON from a foreign origin, and reads from one, are refused too.
    let (status, body) = raw(
        a,
        &format!("POST /v1/chat/completions HTTP/1.1\r\n{host}\r\nOrigin: https://evil.example\r\nContent-Type: application/json"),
        &chat_body(),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "origin_not_allowed"), "{body}");
    let (status, body) = raw(
        a,
        &format!("GET /v1/mesh HTTP/1.1\r\n{host}\r\nOrigin: null"),
        b"",
    )
    .await;
    assert_eq!((status, code(&body)), (403, "origin_not_allowed"), "{body}");
    // DNS rebinding: a page on evil.example rebound to 127.0.0.1 reads
    // /v1/mesh with its own name as Host.
    let (status, body) = raw(
        a,
        &format!("GET /v1/mesh HTTP/1.1\r\nHost: evil.example:{}", a.port()),
        b"",
    )
    .await;
    assert_eq!((status, code(&body)), (403, "host_not_allowed"), "{body}");
    let (status, body) = raw(a, "GET /v1/mesh HTTP/1.1", b"").await;
    assert_eq!((status, code(&body)), (400, "host_required"), "{body}");

    // What clients send passes: JSON, no Origin or the node's own, Host an
    // IP or localhost. (No worker serves a model here, so the chat request
    // gets the handler's answer, not the guard's.)
    let (status, body) = raw(
        a,
        &format!("POST /v1/chat/completions HTTP/1.1\r\n{host}\r\nOrigin: http://{a}\r\nContent-Type: application/json; charset=utf-8"),
        &chat_body(),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "model_required"), "{body}");
    let (status, body) = raw(
        a,
        &format!("GET /v1/models HTTP/1.1\r\nHost: localhost:{}", a.port()),
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_origins_get_cors_answers_and_pass_the_guard() {
    let api = loopback_api(HttpConfig {
        allowed_origins: vec!["https://app.example".into()],
        ..HttpConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/models", api.addr);
    let r = client
        .get(&url)
        .header("Origin", "https://app.example")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://app.example")
    );
    let r = client
        .get(&url)
        .header("Origin", "https://evil.example")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_on_loopback_are_optional_but_checked_and_rate_limited() {
    let api = loopback_api(HttpConfig::default()).await;
    let (_, good) = api.keys.create("good", KeyLimits::default()).expect("key");
    let (_, slow) = api
        .keys
        .create(
            "slow",
            KeyLimits {
                rate_per_min: Some(2),
                ..KeyLimits::default()
            },
        )
        .expect("key");
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/models", api.addr);
    let get = |key: Option<String>| {
        let mut r = client.get(&url);
        if let Some(k) = key {
            r = r.header("Authorization", k);
        }
        async move {
            let r = r.send().await.expect("send");
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            (
                status,
                retry,
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    assert_eq!(get(None).await.0, 200, "no key on loopback");
    assert_eq!(get(Some(format!("Bearer {good}"))).await.0, 200);
    assert_eq!(get(Some(format!("bearer {good}"))).await.0, 200);
    // The placeholder an OpenAI client must send is no key on loopback.
    assert_eq!(get(Some("Bearer unused".into())).await.0, 200);
    // A silk key that is wrong is refused, not ignored.
    let mut wrong = good.clone();
    wrong.replace_range(wrong.len() - 4.., "0000");
    for bad in [format!("Bearer {wrong}"), "Bearer sk-silk-0123".into()] {
        let (status, _, body) = get(Some(bad.clone())).await;
        assert_eq!(
            (status, code(&body)),
            (401, "invalid_api_key"),
            "{bad}: {body}"
        );
    }
    for _ in 0..2 {
        assert_eq!(get(Some(format!("Bearer {slow}"))).await.0, 200);
    }
    let (status, retry, body) = get(Some(format!("Bearer {slow}"))).await;
    assert_eq!(
        (status, code(&body)),
        (429, "rate_limit_exceeded"),
        "{body}"
    );
    let retry: u64 = retry.expect("Retry-After").parse().expect("seconds");
    assert!((1..=30).contains(&retry), "retry after {retry}");
    // Revoked while the node runs: refused at once.
    api.keys.revoke("good").expect("revoke");
    let (status, _, body) = get(Some(format!("Bearer {good}"))).await;
    assert_eq!((status, code(&body)), (401, "invalid_api_key"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_every_request_needs_a_key_and_health_says_little() {
    let api = api_as_if_bound_to("0.0.0.0".parse().expect("ip"), HttpConfig::default()).await;
    let (_, key) = api.keys.create("app", KeyLimits::default()).expect("key");
    let client = reqwest::Client::new();
    let base = format!("http://{}", api.addr);
    for path in ["/v1/models", "/v1/mesh", "/v1/status", "/metrics"] {
        let r = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 401, "{path}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(code(&body), "missing_api_key", "{path}: {body}");
    }
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    // Off loopback a placeholder is no way in.
    let r = client
        .get(format!("{base}/v1/models"))
        .bearer_auth("unused")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    // Health answers without a key, and says only that the node is up.
    let health: Value = client
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(health, json!({"status": "ok"}));
    // The dashboard's page and script load without a key: they hold no
    // data (the page asks for a key to read /v1/status), and they may
    // load nothing from elsewhere.
    let me = api.node.peer_id().to_string();
    for path in ["/", "/dashboard.js", "/dashboard.css"] {
        let r = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let csp = r
            .headers()
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
            "{path}: {csp}"
        );
        let body = r.text().await.expect("text");
        assert!(!body.contains(&me), "{path} leaks the peer id");
    }
    // With the key: everything.
    let status: Value = client
        .get(format!("{base}/v1/status"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(status["node"]["peer_id"], me);
    let r = client
        .get(format!("{base}/v1/status?span=month"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(
        (code(&body), &body["error"]["param"]),
        ("invalid_span", &json!("span")),
        "{body}"
    );
    let metrics = client
        .get(format!("{base}/metrics"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("# TYPE silk_peers gauge"), "{metrics}");
    assert!(metrics.contains("libp2p_swarm"), "{metrics}");
    let health: Value = client
        .get(format!("{base}/health"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(health["peer_id"], api.node.peer_id().to_string());
    let r = client
        .get(format!("{base}/v1/mesh"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_capped_below_the_job_frame_and_must_arrive_in_time() {
    let api = loopback_api(HttpConfig {
        body_timeout_s: 1,
        ..HttpConfig::default()
    })
    .await;
    let a = api.addr;
    let big = vec![b' '; API_BODY_LIMIT + 1];
    let (status, body) = raw(
        a,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json"
        ),
        &big,
    )
    .await;
    assert_eq!((status, code(&body)), (413, "request_too_large"), "{body}");
    let frame_limit =
        silk_overlay::OverlayConfig::new(silk_overlay::Keypair::generate_ed25519(), Vec::new())
            .max_frame_size;
    assert!(
        API_BODY_LIMIT < frame_limit,
        "below the overlay's frame limit"
    );

    // Ten bytes of a hundred, then silence.
    let mut s = TcpStream::connect(a).await.expect("connect");
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"messages"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut out))
        .await
        .expect("answered within 30 s")
        .expect("read");
    let (status, body) = parse_response(&out[..n]);
    assert_eq!((status, code(&body)), (408, "body_timeout"), "{body}");
}

/// Whether the server has closed `s` (EOF or reset); `false` while it is open.
fn closed(s: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.try_read(&mut buf) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("addr"))
        .expect("bind source");
    socket.connect(to).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_hold_nobody_out() {
    // 400 attacker sockets plus the server's ends of them.
    let _ = rlimit::increase_nofile_limit(4096);
    const PER_IP: usize = 100;
    let api = loopback_api(HttpConfig {
        max_connections_per_ip: PER_IP,
        ..HttpConfig::default()
    })
    .await;
    let a = api.addr;
    // 300 connections from 127.0.0.2 that send half a request and stop,
    // 100 from 127.0.0.3 that send nothing.
    let mut partial = Vec::new();
    for _ in 0..300 {
        let mut s = connect_from("127.0.0.2", a).await;
        s.write_all(format!("GET /v1/models HTTP/1.1\r\nHost: {a}\r\nX-Slow: ").as_bytes())
            .await
            .expect("write");
        partial.push(s);
    }
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(connect_from("127.0.0.3", a).await);
    }

    // A client on another address is served while they hang.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        reqwest::get(format!("http://{a}/v1/models")),
    )
    .await
    .expect("served within 5 s despite 400 half-open connections")
    .expect("request");
    assert_eq!(r.status().as_u16(), 200);

    // The per-IP cap closed 127.0.0.2's surplus at once; the rest are open
    // (held, not yet timed out).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let open = partial.iter().filter(|s| !closed(s)).count();
        if open <= PER_IP {
            assert!(open > 0, "the held connections should still be open");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} connections from one address are open, the cap is {PER_IP}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // hyper's header timeout (10 s by default) then closes every one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let open = partial
            .iter()
            .chain(silent.iter())
            .filter(|s| !closed(s))
            .count();
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} half-open connections still open after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

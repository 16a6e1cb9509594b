//! A 5-node mesh: convergence, jobs from any node, failures, attestation policy.
//!
//! Nodes: 0 gateway (bootstrap), 1 and 2 workers, 3 gateway, 4 a gateway
//! *without* `--allow-insecure-workers`. All scenarios share one mesh to keep
//! the test short on small machines.

use std::time::Duration;

use anyhow::{ensure, Context};
use futures::StreamExt;
use serde_json::{json, Value};
use silk_testnet::{stream_chat, Testnet, TestnetConfig};

fn chat_body(prompt: &str, max_tokens: u32) -> Value {
    json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

async fn post(
    net: &Testnet,
    node: usize,
    path: &str,
    body: &Value,
) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Value)> {
    let r = net
        .client()
        .post(format!("{}{path}", net.nodes[node].api_url))
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Ok((status, headers, r.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_node_mesh() -> anyhow::Result<()> {
    let mut config = TestnetConfig::new(5, 2)?;
    config.strict_nodes = vec![4];
    config.converge_timeout = Duration::from_secs(60);
    // `spawn` waits (bounded) until every node's /v1/mesh lists both workers.
    let mut net = Testnet::spawn(config)
        .await
        .context("mesh did not start/converge")?;
    let workers = net.worker_ids();
    ensure!(workers.len() == 2, "expected 2 workers, got {workers:?}");
    assert!(!net.nodes[0].worker && !net.nodes[3].worker && !net.nodes[4].worker);

    // Models list: one model with two workers.
    let models = net
        .get_json(&format!("{}/v1/models", net.nodes[3].api_url))
        .await?;
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1), "{models}");
    assert_eq!(models["data"][0]["silk"]["workers"], 2, "{models}");

    // A streamed job injected at a non-worker node is served by a worker.
    let out = stream_chat(
        net.client(),
        &net.nodes[3].api_url,
        chat_body("Say hello.", 8),
        |_| {},
        |_| {},
    )
    .await?;
    assert_eq!(out.status, 200, "{:?}", out.error);
    assert!(out.error.is_none(), "{:?}", out.error);
    assert!(out.done, "no [DONE]");
    let served_by = out.worker.clone().context("no x-silk-worker header")?;
    assert!(workers.contains(&served_by), "{served_by} is not a worker");
    assert_eq!(out.attestation.as_deref(), Some("insecure"));
    let last = out.events.last().context("no events")?;
    assert_eq!(last["silk"]["worker"], served_by.as_str());
    assert!(
        last["usage"]["completion_tokens"].as_u64().unwrap_or(0) >= 1,
        "{last}"
    );

    // Non-streamed completion: headers and `silk` in the body agree.
    let (status, headers, body) = post(
        &net,
        0,
        "/v1/completions",
        &json!({"prompt": "1, 2, 3,", "max_tokens": 4}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let w = headers
        .get("x-silk-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(body["silk"]["worker"], w.as_str());
    assert_eq!(body["silk"]["attestation"], "insecure");
    assert!(workers.contains(&w));
    assert!(
        body["usage"]["completion_tokens"].as_u64().unwrap_or(0) >= 1,
        "{body}"
    );

    // Invalid request: OpenAI-style error, 400.
    let (status, _, body) = post(
        &net,
        0,
        "/v1/chat/completions",
        &json!({"messages": [], "bogus": 1}),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"].is_string() && body["error"]["type"].is_string(),
        "{body}"
    );

    // Audit F11: a prompt longer than the context window is the caller's
    // fault. It gets a 400 and leaves the workers' reputation alone. Before
    // the fix each such request counted as a failure of every worker tried
    // (503 `no_worker_available`), and ten of them pushed both workers'
    // reputation from 0.5/0.75 to 0.08/0.21 on the gateway.
    let reputations = |mesh: &Value| -> Vec<(String, f64)> {
        let mut r: Vec<(String, f64)> = mesh["workers"]
            .as_array()
            .map(|ws| {
                ws.iter()
                    .filter_map(|w| {
                        Some((
                            w["peer_id"].as_str()?.to_string(),
                            w["reputation"].as_f64()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        r.sort_by(|a, b| a.0.cmp(&b.0));
        r
    };
    let before = reputations(
        &net.get_json(&format!("{}/v1/mesh", net.nodes[0].api_url))
            .await?,
    );
    ensure!(before.len() == 2, "{before:?}");
    // Workers announce their context window; the gateway, which holds the
    // model's tokenizer here, counts the prompt and answers the 400 itself
    // before any worker is asked (the code and the message are the
    // gateway's; a worker's refusal would be `invalid_request`).
    let mesh = net
        .get_json(&format!("{}/v1/mesh", net.nodes[0].api_url))
        .await?;
    for w in mesh["workers"].as_array().context("workers")? {
        assert_eq!(w["context_windows"], json!([8192]), "{w}");
    }
    let too_long = "hello ".repeat(9000);
    for _ in 0..10 {
        let (status, _, body) =
            post(&net, 0, "/v1/chat/completions", &chat_body(&too_long, 4)).await?;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
        assert_eq!(body["error"]["param"], "messages", "{body}");
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("the prompt has 9") && msg.contains("8192 tokens"),
            "{msg}"
        );
    }
    let after = reputations(
        &net.get_json(&format!("{}/v1/mesh", net.nodes[0].api_url))
            .await?,
    );
    for ((w, b), (w2, a)) in before.iter().zip(&after) {
        assert_eq!(w, w2);
        assert!(
            a >= b,
            "{w}: reputation fell from {b} to {a} on requests the caller got wrong"
        );
    }
    // The operator sees them as refusals by cause, not as failed jobs.
    let status = net
        .get_json(&format!("{}/v1/status?jobs=10", net.nodes[0].api_url))
        .await?;
    assert_eq!(
        status["jobs"]["gateway"]["context_length_exceeded"],
        json!(10),
        "{}",
        status["jobs"]
    );
    assert_eq!(
        status["jobs"]["gateway"].get("failed"),
        None,
        "{}",
        status["jobs"]
    );
    // Records reach the history through its writer's inbox: moments later.
    // Until the last refusal is in, the ten most recent still hold older
    // jobs (a CI run broke out as soon as there were ten, one an earlier
    // `ok`), so wait for the refusals themselves.
    let mut recent = Vec::new();
    for _ in 0..100 {
        let status = net
            .get_json(&format!("{}/v1/status?jobs=10", net.nodes[0].api_url))
            .await?;
        recent = status["recent_jobs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if recent.len() == 10
            && recent
                .iter()
                .all(|job| job["outcome"] == "context_length_exceeded")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recent.len(), 10, "{recent:?}");
    for job in &recent {
        assert_eq!(job["outcome"], "context_length_exceeded", "{job}");
        assert_eq!(job["peer"], "", "no worker was asked: {job}");
    }

    // A gateway without --allow-insecure-workers refuses them, clearly.
    let (status, _, body) = post(&net, 4, "/v1/chat/completions", &chat_body("hi", 4)).await?;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "insecure_workers_refused", "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("--allow-insecure-workers"), "{msg}");

    // A worker killed before the first token: the job completes on the other.
    // Gateway 3 prefers the worker it used above (rankings are stable on an
    // idle mesh), so it tries the dead one first and must retry.
    let first_killed = net
        .kill_peer(&served_by)
        .context("served_by is not a node")?;
    let other = workers
        .iter()
        .find(|w| **w != served_by)
        .cloned()
        .context("no second worker")?;
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        stream_chat(
            net.client(),
            &net.nodes[3].api_url,
            chat_body("Say hello.", 6),
            |_| {},
            |_| {},
        ),
    )
    .await
    .context("job after a worker was killed hung")??;
    assert_eq!(out.status, 200, "{:?}", out.error);
    assert!(out.done && out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.worker.as_deref(), Some(other.as_str()));

    // A worker killed mid-stream while another serves the same model: the
    // gateway goes on on the other from the prompt plus the tokens already
    // delivered, and the caller sees one stream, whole, with the text of an
    // uninterrupted greedy run. (Before: an error event after the tokens so
    // far, as in the last step below.)
    net.restart(first_killed).await?;
    let mut body = chat_body("Count from one to one thousand.", 120);
    body["ignore_eos"] = json!(true);
    let (status, _, whole) = post(&net, 0, "/v1/chat/completions", &body).await?;
    assert_eq!(status, 200, "{whole}");
    let reference = whole["choices"][0]["message"]["content"]
        .as_str()
        .context("no content")?
        .to_string();
    body["stream"] = json!(true);
    let client = net.client().clone();
    let resp = client
        .post(format!("{}/v1/chat/completions", net.nodes[0].api_url))
        .json(&body)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    let serving = resp
        .headers()
        .get("x-silk-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let survivor = workers
        .iter()
        .find(|w| **w != serving)
        .cloned()
        .context("no second worker")?;
    let mut sse = Sse::new(resp.bytes_stream());
    let mut text = String::new();
    let mut pieces = 0;
    let mut killed = None;
    let mut last = Value::Null;
    let mut done = false;
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), sse.next_data())
        .await
        .context("the stream hung after its worker was killed")?
    {
        if line == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(&line)?;
        ensure!(v.get("error").is_none(), "error event: {v}");
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
            pieces += 1;
        }
        if pieces >= 20 && killed.is_none() {
            killed = net.kill_peer(&serving);
        }
        last = v;
    }
    ensure!(killed.is_some(), "the job ended before 20 pieces: {text:?}");
    assert!(done, "no [DONE] after the worker was killed");
    assert_eq!(
        last["usage"]["completion_tokens"], 120,
        "the caller gets every token it asked for: {last}"
    );
    assert_eq!(
        text, reference,
        "the continued text differs from an uninterrupted run"
    );

    // A worker killed mid-stream with no other left: a clear error event,
    // no [DONE], no hang.
    let other = survivor;
    let mut body = chat_body("Count from one to one thousand.", 400);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let resp = net
        .client()
        .post(format!("{}/v1/chat/completions", net.nodes[0].api_url))
        .json(&body)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    let w = resp
        .headers()
        .get("x-silk-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(w, other);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.context("no first chunk")??;
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    net.kill_peer(&w);
    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
                Err(_) => break,
            }
        }
        text
    })
    .await
    .context("the stream hung after its worker was killed")?;
    assert!(
        !rest.contains("[DONE]"),
        "a killed worker's stream must not end normally"
    );
    let error = rest
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|v| v.get("error").is_some())
        .context("no error event after the worker was killed")?;
    assert_eq!(error["error"]["code"], "worker_failed", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&w),
        "{error}"
    );
    Ok(())
}

/// Reads the `data:` payloads of a server-sent event stream.
struct Sse<S> {
    stream: S,
    buffer: Vec<u8>,
}

impl<S, B> Sse<S>
where
    S: futures::Stream<Item = reqwest::Result<B>> + Unpin,
    B: AsRef<[u8]>,
{
    fn new(stream: S) -> Self {
        Self {
            stream,
            buffer: Vec::new(),
        }
    }

    /// The next `data:` payload; `None` when the stream ends or fails.
    async fn next_data(&mut self) -> Option<String> {
        loop {
            while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                if let Some(data) = line.trim_end().strip_prefix("data:") {
                    return Some(data.trim().to_string());
                }
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(chunk.as_ref()),
                _ => return None,
            }
        }
    }
}

/// A burst past the workers' free slots waits in the gateway's queue and
/// is served: 64 concurrent streamed requests on 2 workers (each gateway
/// sends a worker at most 8 jobs at once, so 48 wait). Before the queue,
/// 46 of 64 got an immediate `429 workers_saturated`. Prints the time to
/// first token across the burst (not asserted: the machine decides it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_free_slots_is_queued_and_served() -> anyhow::Result<()> {
    let mut config = TestnetConfig::new(3, 2)?;
    config.payments = false;
    // CI runs the end-to-end tests side by side on two cores: give the
    // queue room to wait out a slow machine.
    config.node_options = vec![silk_testnet::NodeOptions {
        config_toml: "queue_timeout_s = 300\n".into(),
        ..Default::default()
    }];
    let net = Testnet::spawn(config)
        .await
        .context("testnet did not start")?;
    ensure!(!net.nodes[0].worker, "node 0 is the gateway");
    const BURST: usize = 64;
    let started = std::time::Instant::now();
    let results = futures::future::join_all((0..BURST).map(|i| {
        let client = net.client().clone();
        let url = net.nodes[0].api_url.clone();
        async move {
            let mut first: Option<Duration> = None;
            let r = stream_chat(
                &client,
                &url,
                json!({
                    "messages": [{"role": "user", "content": format!("Say the number {i}.")}],
                    "max_tokens": 8,
                    "temperature": 0,
                }),
                |_| {},
                |_| {
                    first.get_or_insert_with(|| started.elapsed());
                },
            )
            .await;
            (r, first)
        }
    }))
    .await;
    let mut ttft = Vec::new();
    for (i, (r, first)) in results.into_iter().enumerate() {
        let r = r.with_context(|| format!("request {i}"))?;
        ensure!(
            r.status == 200 && r.error.is_none() && r.done,
            "request {i} of the burst was not served: status {}, {:?}",
            r.status,
            r.error
        );
        ttft.push(first.with_context(|| format!("request {i} had no token"))?);
    }
    ttft.sort();
    let at = |q: f64| ttft[((ttft.len() - 1) as f64 * q).round() as usize].as_secs_f64();
    println!(
        "burst of {BURST} on 2 workers: time to first token p50 {:.2} s, p90 {:.2} s, max {:.2} s",
        at(0.5),
        at(0.9),
        at(1.0)
    );
    Ok(())
}

/// With `--log-format json` (here `SILK_LOG_FORMAT=json`), every log line is
/// one JSON object, and a job's lines carry who and what it was about: on
/// the gateway the request's id (the response's `id`) and the worker, on
/// the worker the gateway that sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_tie_each_job_to_its_request_and_peers() -> anyhow::Result<()> {
    let mut config = TestnetConfig::new(2, 1)?;
    config.payments = false;
    config.log_filter = "warn,silk_node=info".into();
    let json_logs = silk_testnet::NodeOptions {
        env: vec![("SILK_LOG_FORMAT".into(), "json".into())],
        ..Default::default()
    };
    config.node_options = vec![json_logs.clone(), json_logs];
    let net = Testnet::spawn(config)
        .await
        .context("testnet did not start")?;
    let (gateway, worker) = if net.nodes[0].worker { (1, 0) } else { (0, 1) };
    let (status, _, body) =
        post(&net, gateway, "/v1/chat/completions", &chat_body("Hi.", 4)).await?;
    ensure!(status == 200, "{body}");
    let id = body["id"].as_str().context("no id")?.to_string();

    // The node's log file holds its stdout too (what `silk run` prints
    // for people); every log line in it is JSON. Lines are written as
    // events happen: give the worker's a moment.
    let lines = |node: usize| -> anyhow::Result<Vec<Value>> {
        let log = net.nodes[node].log();
        for l in log.lines().filter(|l| !l.starts_with('{')) {
            ensure!(
                !["TRACE", "DEBUG", " INFO", " WARN", "ERROR"]
                    .iter()
                    .any(|lvl| l.contains(lvl)),
                "a log line that is not JSON: {l}"
            );
        }
        log.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    };
    let find = |lines: &[Value], message: &str| -> Option<Value> {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .cloned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (done, served) = loop {
        let (g, w) = (lines(gateway)?, lines(worker)?);
        if let (Some(d), Some(s)) = (find(&g, "job done"), find(&w, "job served")) {
            break (d, s);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no `job done` / `job served` lines:\n{}\n{}",
            net.nodes[gateway].log(),
            net.nodes[worker].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let span = |line: &Value, name: &str| -> Option<Value> {
        line["spans"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    };
    let request = span(&done, "request").context(format!("no request span: {done}"))?;
    ensure!(request["id"] == id.as_str(), "{done} is not about {id}");
    ensure!(
        done["fields"]["worker"] == net.nodes[worker].peer_id.as_str(),
        "{done}"
    );
    ensure!(
        done["fields"]["completion_tokens"] == body["usage"]["completion_tokens"],
        "{done} vs {body}"
    );
    let job = span(&served, "job").context(format!("no job span: {served}"))?;
    ensure!(
        job["gateway"] == net.nodes[gateway].peer_id.as_str(),
        "{served}"
    );
    println!("gateway: {done}\nworker: {served}");
    Ok(())
}

//! A gateway pays for at most what it received (audit F8) and ends a job
//! that stops making progress (F16). The gateway is a real node in this
//! process, settling on an in-process devnet; the worker is a hostile peer
//! built from `silk-overlay` and `silk-node`'s wire types: it announces a
//! model, takes the gateway's paid jobs, and answers each with frames the
//! stock worker never sends.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use silk_chain::devnet::{Devnet, DevnetConfig};
use silk_chain::ledger::Ledger;
use silk_chain::{Address, Coins, Keys};
use silk_node::billing::Billing;
use silk_node::gateway::queue::QueueConfig;
use silk_node::gateway::JobEvent;
use silk_node::node::{Node, NodeOptions};
use silk_node::payments::{Payments, PaymentsConfig};
use silk_node::protocol::{self, Finish, JobMessage, JobRequest, JobUsage, TokenChunk, WirePrompt};
use silk_overlay::testing::{local_config, seeded_keypair, spawn_local, worker_announcement};
use silk_overlay::{JobErrorCode, JobResponder, OverlayEvent};
use tokio_util::sync::CancellationToken;

const MODEL: &str = "hostile@sha256:00";

/// A gateway queue that holds nobody: no free slot is a 429 at once.
const NO_QUEUE: QueueConfig = QueueConfig {
    limit: 0,
    timeout: Duration::from_secs(1),
};

/// What the hostile worker does with the next job.
#[derive(Clone, Copy, Debug)]
enum Play {
    /// 40 token ids with no text, then a usage record claiming a huge prompt.
    IdsWithoutText,
    /// Tokens with text, three more than the job's `max_tokens`.
    PastMaxTokens,
    /// One token, then empty frames every 100 ms, forever.
    EmptyFramesForever,
    /// What an honest worker does: a token, then its usage.
    Honest,
    /// A token every 500 ms, forever: progress, but slow.
    Trickle,
    /// Refuses the job with this code before any token.
    Refuse(JobErrorCode),
}

fn token(text: &str) -> Vec<u8> {
    protocol::encode(&TokenChunk {
        ids: vec![42],
        text: text.into(),
        logprobs: Vec::new(),
        prompt_logprobs: Vec::new(),
    })
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Vec<u8> {
    protocol::encode(&JobUsage {
        prompt_tokens,
        completion_tokens,
        finish: Finish::Length,
        decode_tokens_per_s_milli: 1_000_000,
        price_coefficient_milli: 1_000,
        cached_tokens: 0,
    })
}

async fn play(play: Play, max_tokens: u32, mut r: JobResponder) {
    match play {
        Play::IdsWithoutText => {
            let chunk = TokenChunk {
                ids: vec![42; 40],
                text: String::new(),
                logprobs: Vec::new(),
                prompt_logprobs: Vec::new(),
            };
            let _ = r.send_data(protocol::encode(&chunk)).await;
            let _ = r.end(usage(1_000_000, 40)).await;
        }
        Play::PastMaxTokens => {
            for _ in 0..max_tokens + 3 {
                if r.send_data(token("a")).await.is_err() {
                    return;
                }
            }
            let _ = r.end(usage(3, max_tokens + 3)).await;
        }
        Play::Honest => {
            if r.send_data(token("hi")).await.is_ok() {
                let _ = r.end(usage(3, 1)).await;
            }
        }
        Play::Trickle => {
            for _ in 0..6000 {
                if r.send_data(token("a")).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Play::Refuse(code) => {
            let _ = r.error(code, "refused by the hostile worker").await;
        }
        Play::EmptyFramesForever => {
            let _ = r.send_data(token("a")).await;
            let empty = protocol::encode(&TokenChunk {
                ids: Vec::new(),
                text: String::new(),
                logprobs: Vec::new(),
                prompt_logprobs: Vec::new(),
            });
            for _ in 0..6000 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if r.send_data(empty.clone()).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn dispatch(gateway: &Arc<Node>, max_tokens: u32) -> (u32, Result<Option<Coins>, String>) {
    let request = JobRequest {
        model: MODEL.into(),
        prompt: WirePrompt::Text("Hello there.".into()),
        max_tokens,
        sampling: silk_inference::SamplingParams::default(),
        stop: Vec::new(),
        ignore_eos: false,
        payment: None,
        continuation: Vec::new(),
        logprobs: None,
        constraint: None,
        prompt_logprobs: None,
    };
    let mut job = gateway
        .dispatch(request, None, None)
        .await
        .expect("the hostile worker takes the job");
    let mut tokens = 0;
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match job.events.recv().await {
                Some(JobEvent::Token(t)) => tokens += t.ids.len() as u32,
                Some(JobEvent::Done { cost, .. }) => return Ok(cost),
                Some(JobEvent::Failed(e)) => return Err(e),
                None => return Err("ended without a result".into()),
            }
        }
    })
    .await
    .expect("the job ends within 60 s");
    (tokens, end)
}

/// What the gateway's lane to the worker says: (signed, reserved).
fn lane(billing: &Billing, worker: &Address) -> (Coins, Coins) {
    let l = billing
        .payments()
        .client_book()
        .lane(worker)
        .expect("book")
        .expect("a lane to the worker");
    (l.signed, l.reserved)
}

/// A hostile worker: a plain overlay node, bootstrapped from `gateway`, that
/// announces [`MODEL`] (paid to `payout`), answers each job with the
/// current `plays`, and never acknowledges a cheque. Returns once the
/// gateway has heard it.
async fn hostile_worker(
    gateway: &Node,
    seed: u64,
    payout: Option<String>,
    plays: Arc<Mutex<Play>>,
) -> (tokio::task::JoinHandle<()>, silk_overlay::PeerId) {
    let gw_addr: silk_overlay::Multiaddr = format!(
        "{}/p2p/{}",
        gateway.overlay().listen_addrs().await.expect("addrs")[0],
        gateway.peer_id()
    )
    .parse()
    .expect("multiaddr");
    let mut hostile = spawn_local(local_config(seeded_keypair(seed)).with_bootstrap(vec![gw_addr]))
        .await
        .expect("hostile node");
    let handle = hostile.handle.clone();
    let peer = hostile.peer_id;
    let worker = tokio::spawn(async move {
        let mut seq = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    let mut a = worker_announcement(peer, seq, &[MODEL]);
                    a.payout = payout.clone();
                    let _ = handle.announce(a).await;
                }
                event = hostile.events.recv() => match event {
                    Some(OverlayEvent::InboundJob { request, responder, .. }) => {
                        match postcard::from_bytes::<JobMessage>(&request) {
                            Ok(JobMessage::Generate(job)) => {
                                let p = *plays.lock().expect("lock");
                                tokio::spawn(play(p, job.max_tokens, responder));
                            }
                            // Cheques are taken and never acknowledged.
                            _ => drop(responder),
                        }
                    }
                    Some(_) => {}
                    None => return,
                },
            }
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !gateway
        .overlay()
        .announcements()
        .await
        .unwrap_or_default()
        .iter()
        .any(|a| a.peer_id == peer)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never heard the hostile worker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (worker, peer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_pays_only_for_what_it_received_and_drops_stalled_jobs() {
    let devnet = Devnet::in_memory(DevnetConfig::new(Duration::from_millis(10))).expect("devnet");
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let ledger: Arc<dyn Ledger> = Arc::new(devnet.clone());

    let dir = tempfile::tempdir().expect("tempdir");
    let config = PaymentsConfig {
        timeout_s: 30,
        ..PaymentsConfig::default()
    };
    let payments = Payments::open(dir.path(), config.clone(), ledger, Keys::from_seed([3; 32]))
        .await
        .expect("payments");
    devnet
        .mint(
            &payments.wallet_address(),
            Coins::from_ton(100).expect("ton"),
        )
        .expect("mint");
    let billing = Arc::new(Billing::new(payments));
    let gateway = Node::start(NodeOptions {
        data_dir: dir.path().to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")],
        bootstrap: Vec::new(),
        worker_model: None,
        models_dir: dir.path().join("models"),
        device: Default::default(),
        dtype: Default::default(),
        allow_insecure_workers: true,
        price_coefficient_milli: 1000,
        default_max_coefficient_milli: 2000,
        billing: Some(Arc::clone(&billing)),
        max_jobs_per_worker: 8,
        queue: Default::default(),
        mdns: false,
        nat: Default::default(),
        min_peers: 25,
        max_peers: 50,
        fast_gossip: true,
        attestation_policy: None,
        pccs_url: None,
        job_progress_timeout: Duration::from_secs(2),
        pinned_models: silk_node::gateway::default_pinned_models(),
    })
    .await
    .expect("gateway");

    // The hostile worker: a plain overlay node that announces MODEL.
    let payout = Address::new(0, [0x66; 32]);
    let next_play = Arc::new(Mutex::new(Play::IdsWithoutText));
    let (worker, peer) =
        hostile_worker(&gateway, 66, Some(payout.to_raw()), Arc::clone(&next_play)).await;

    // 40 ids without text and a claimed prompt of a million tokens: the
    // caller got no text, so nothing is paid. Before the fix the gateway
    // paid its prompt bound and all 40 tokens.
    let (tokens, end) = dispatch(&gateway, 64).await;
    assert_eq!(tokens, 40);
    assert_eq!(end, Ok(Some(Coins::ZERO)));
    assert_eq!(lane(&billing, &payout), (Coins::ZERO, Coins::ZERO));

    // Three tokens past max_tokens: the caller gets max_tokens, the job
    // ends as the worker's failure, and only those tokens are paid (no
    // prompt: the worker never finished). Before the fix all eight were
    // passed on and paid.
    *next_play.lock().expect("lock") = Play::PastMaxTokens;
    let (tokens, end) = dispatch(&gateway, 5).await;
    assert_eq!(tokens, 5);
    let why = end.expect_err("the job fails");
    assert!(why.contains("past max_tokens"), "{why}");
    let five = config.price.cost(1_000, 0, 5).expect("price");
    assert_eq!(lane(&billing, &payout), (five, Coins::ZERO));

    // One token, then empty frames forever: the job ends once no token came
    // for the progress timeout (2 s here), and the one token is paid.
    // Before the fix each empty frame reset the 60 s idle timeout, so the
    // job held its slot, reservation and caller forever.
    *next_play.lock().expect("lock") = Play::EmptyFramesForever;
    let (tokens, end) = dispatch(&gateway, 64).await;
    assert_eq!(tokens, 1);
    let why = end.expect_err("the job fails");
    assert!(why.contains("sent no token"), "{why}");
    let six = config.price.cost(1_000, 0, 6).expect("price");
    assert_eq!(lane(&billing, &payout), (six, Coins::ZERO));
    assert!(
        gateway.reputation_of(&peer) < 0.5,
        "the worker's failures count against it: {}",
        gateway.reputation_of(&peer)
    );

    worker.abort();
    // Every long-lived task of the node ends when it is stopped.
    assert!(
        gateway.shutdown_and_wait(Duration::from_secs(10)).await,
        "node tasks outlived the shutdown"
    );
    cancel.cancel();
    producer.await.expect("producer");
}

/// Audit F12: a gateway checked candidates' attestation one at a time, up to
/// 10 s each, and forgot a timeout, so every request for a model paid 10 s
/// per Sybil that announces TDX and never answers. Four such Sybils here
/// (plain overlay nodes that hold every attestation request open) and one
/// worker: the request is placed on the worker after one deadline for all
/// checks, and the next request asks the Sybils nothing. Before the fix the
/// first request took 4 × 10 s, past this test's 30 s bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tdx_sybils_do_not_stall_dispatch() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = Node::start(NodeOptions {
        data_dir: dir.path().to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")],
        bootstrap: Vec::new(),
        worker_model: None,
        models_dir: dir.path().join("models"),
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
        fast_gossip: true,
        attestation_policy: None,
        pccs_url: None,
        job_progress_timeout: Duration::from_secs(10),
        pinned_models: silk_node::gateway::default_pinned_models(),
    })
    .await
    .expect("gateway");
    let gw_addr: silk_overlay::Multiaddr = format!(
        "{}/p2p/{}",
        gateway.overlay().listen_addrs().await.expect("addrs")[0],
        gateway.peer_id()
    )
    .parse()
    .expect("multiaddr");

    let asked = Arc::new(AtomicUsize::new(0));
    let mut peers = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..5u64 {
        let sybil = i > 0;
        let mut node = spawn_local(
            local_config(seeded_keypair(500 + i)).with_bootstrap(vec![gw_addr.clone()]),
        )
        .await
        .expect("node");
        let peer = node.peer_id;
        peers.push((peer, sybil));
        let handle = node.handle.clone();
        let asked = Arc::clone(&asked);
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut seq = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        seq += 1;
                        let mut a = worker_announcement(peer, seq, &[MODEL]);
                        if sybil {
                            // Faster and cheaper on paper, and "TDX".
                            a.attestation_mode = silk_overlay::AttestationMode::Tdx;
                            a.attestation_digest = Some([i as u8; 32]);
                            a.decode_tokens_per_s_milli = 10_000_000;
                        }
                        let _ = handle.announce(a).await;
                    }
                    event = node.events.recv() => match event {
                        Some(OverlayEvent::AttestationRequest { responder, .. }) => {
                            asked.fetch_add(1, Ordering::SeqCst);
                            held.push(responder);
                        }
                        Some(OverlayEvent::InboundJob { request, responder, .. }) => {
                            if let Ok(JobMessage::Generate(job)) = postcard::from_bytes::<JobMessage>(&request) {
                                tokio::spawn(play(Play::Honest, job.max_tokens, responder));
                            }
                        }
                        Some(_) => {}
                        None => return,
                    },
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let known = gateway.overlay().announcements().await.unwrap_or_default();
        if peers
            .iter()
            .all(|(p, _)| known.iter().any(|a| a.peer_id == *p))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never heard every node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let placed = tokio::time::timeout(Duration::from_secs(30), dispatch(&gateway, 4))
        .await
        .expect("placed within 30 s despite four silent TDX peers");
    assert_eq!(placed.0, 1);
    assert!(placed.1.is_ok(), "{:?}", placed.1);
    let first = asked.load(Ordering::SeqCst);
    assert!(first >= 4, "every Sybil was asked once: {first}");
    let again = tokio::time::timeout(Duration::from_secs(30), dispatch(&gateway, 4))
        .await
        .expect("placed");
    assert!(again.1.is_ok(), "{:?}", again.1);
    assert_eq!(
        asked.load(Ordering::SeqCst),
        first,
        "the silent peers were asked again"
    );
    for t in tasks {
        t.abort();
    }
    gateway.shutdown();
}

/// A gateway in this process that pays nothing and routes to insecure
/// workers, its data in `dir`, with a queue of `queue`.
async fn free_gateway(dir: &std::path::Path, queue: QueueConfig) -> Arc<Node> {
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
        queue,
        mdns: false,
        nat: Default::default(),
        min_peers: 25,
        max_peers: 50,
        fast_gossip: true,
        attestation_policy: None,
        pccs_url: None,
        job_progress_timeout: silk_node::gateway::JOB_PROGRESS_TIMEOUT,
        pinned_models: silk_node::gateway::default_pinned_models(),
    })
    .await
    .expect("gateway")
}

/// The API's request deadline (`[http] request_timeout_s`) holds against a
/// worker that keeps making progress, too slowly: a token every 500 ms is
/// within the progress timeout, so only the deadline ends the request. A
/// non-streaming caller gets a 504 `request_timeout`; a streaming one gets
/// the tokens so far, then an error event with that code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_deadline_ends_a_slow_job_with_a_504_or_an_error_event() {
    use silk_node::api::{self, guard::HttpConfig, keys::ApiKeys, ApiOptions};

    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = free_gateway(dir.path(), QueueConfig::default()).await;
    let (worker, _peer) =
        hostile_worker(&gateway, 67, None, Arc::new(Mutex::new(Play::Trickle))).await;
    let cancel = CancellationToken::new();
    let options = ApiOptions {
        addr: "127.0.0.1:0".into(),
        http: HttpConfig {
            request_timeout_s: 3,
            ..HttpConfig::default()
        },
        keys: ApiKeys::open(&dir.path().join(api::keys::KEYS_FILE)).expect("keys"),
    };
    let (addr, _task) = api::serve(Arc::clone(&gateway), options, cancel.clone())
        .await
        .expect("serve");
    // Without the deadline the job would run to the gateway's own job
    // deadline (60 s plus 2 s a token), far past this client's patience.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let url = format!("http://{addr}/v1/chat/completions");
    let body = |stream: bool| {
        serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hello there."}],
            "max_tokens": 200,
            "stream": stream,
        })
    };

    let r = client
        .post(&url)
        .json(&body(false))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 504);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");

    let r = client
        .post(&url)
        .json(&body(true))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.expect("the stream ends within 30 s");
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["choices"][0]["delta"]["content"] == "a"),
        "no token before the deadline: {text}"
    );
    assert_eq!(
        events.last().map(|e| e["error"]["code"].clone()),
        Some(serde_json::json!("request_timeout")),
        "{text}"
    );

    worker.abort();
    cancel.cancel();
    gateway.shutdown();
}

/// When no worker takes a job, the API answers with the status of the
/// cause, not 503 for everything: a busy worker is a 429 to retry, a worker
/// that did not answer in time a 504, a payment this node could not make a
/// 402, a worker's own failure a 503, and a request the worker judged
/// invalid a 400. Before the causes were typed, all but the last were
/// `503 no_worker_available`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_worker_took_is_answered_with_the_status_of_its_cause() {
    use silk_node::api::{self, guard::HttpConfig, keys::ApiKeys, ApiOptions};

    let dir = tempfile::tempdir().expect("tempdir");
    // No queue: the first answer is the subject here (the queue has its
    // own test below).
    let gateway = free_gateway(dir.path(), NO_QUEUE).await;
    let plays = Arc::new(Mutex::new(Play::Honest));
    let (worker, peer) = hostile_worker(&gateway, 68, None, Arc::clone(&plays)).await;
    let cancel = CancellationToken::new();
    let options = ApiOptions {
        addr: "127.0.0.1:0".into(),
        http: HttpConfig::default(),
        keys: ApiKeys::open(&dir.path().join(api::keys::KEYS_FILE)).expect("keys"),
    };
    let (addr, _task) = api::serve(Arc::clone(&gateway), options, cancel.clone())
        .await
        .expect("serve");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let url = format!("http://{addr}/v1/chat/completions");
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello there."}],
        "max_tokens": 4,
    });
    let cases = [
        (JobErrorCode::Busy, 429, "workers_busy"),
        (JobErrorCode::Timeout, 504, "worker_timeout"),
        (
            JobErrorCode::Application(protocol::ERR_PAYMENT_REFUSED),
            402,
            "payment_failed",
        ),
        (JobErrorCode::Internal, 503, "no_worker_available"),
        (JobErrorCode::Rejected, 400, "invalid_request"),
    ];
    for (code, status, name) in cases {
        *plays.lock().expect("lock") = Play::Refuse(code);
        let r = client.post(&url).json(&body).send().await.expect("send");
        let got = r.status().as_u16();
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(got, status, "{code:?}: {v}");
        assert_eq!(v["error"]["code"], name, "{code:?}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("refused by the hostile worker")),
            "{code:?}: the message names the worker's reason: {v}"
        );
    }
    // A gateway without the model's tokenizer cannot judge a prompt's
    // length itself: the worker's refusal is the caller's fault, and ten of
    // them leave the worker's standing where it was (audit F11).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = gateway.reputation_of(&peer);
    *plays.lock().expect("lock") = Play::Refuse(JobErrorCode::Rejected);
    for _ in 0..10 {
        let r = client.post(&url).json(&body).send().await.expect("send");
        assert_eq!(r.status().as_u16(), 400);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gateway.reputation_of(&peer),
        before,
        "the caller's bad requests moved the worker's reputation"
    );
    // And the worker still serves once it stops refusing.
    *plays.lock().expect("lock") = Play::Honest;
    let r = client.post(&url).json(&body).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 200);

    cancel.cancel();
    worker.abort();
    // Every long-lived task of the node ends when it is stopped.
    assert!(
        gateway.shutdown_and_wait(Duration::from_secs(10)).await,
        "node tasks outlived the shutdown"
    );
}

/// A request that finds the only worker busy waits in the gateway's queue
/// and is served once the worker takes jobs again; past the queue's limit
/// a request gets `429 queue_full` at once, and past its deadline `429
/// workers_saturated`, both with `Retry-After`. Before the queue every
/// one of them was an immediate `429 workers_busy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_no_free_slot_waits_for_one() {
    use silk_node::api::{self, guard::HttpConfig, keys::ApiKeys, ApiOptions};

    let dir = tempfile::tempdir().expect("tempdir");
    let queue = QueueConfig {
        limit: 1,
        timeout: Duration::from_secs(3),
    };
    let gateway = free_gateway(dir.path(), queue).await;
    let plays = Arc::new(Mutex::new(Play::Refuse(JobErrorCode::Busy)));
    let (worker, _peer) = hostile_worker(&gateway, 69, None, Arc::clone(&plays)).await;
    let cancel = CancellationToken::new();
    let options = ApiOptions {
        addr: "127.0.0.1:0".into(),
        http: HttpConfig::default(),
        keys: ApiKeys::open(&dir.path().join(api::keys::KEYS_FILE)).expect("keys"),
    };
    let (addr, _task) = api::serve(Arc::clone(&gateway), options, cancel.clone())
        .await
        .expect("serve");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let url = format!("http://{addr}/v1/chat/completions");
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello there."}],
        "max_tokens": 4,
    });

    // 1. The worker is busy: the request waits; the worker frees up; the
    //    request is served.
    let waiting = tokio::spawn({
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        async move {
            let r = client.post(&url).json(&body).send().await.expect("send");
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
    });
    let start = std::time::Instant::now();
    while gateway.gateway().queued() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the request did not wait in the queue"
        );
        assert!(
            !waiting.is_finished(),
            "answered at once: {:?}",
            waiting.await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 2. Meanwhile the queue (of 1) is full: the next request is told so.
    let r = client.post(&url).json(&body).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "queue_full", "{v}");

    *plays.lock().expect("lock") = Play::Honest;
    let (status, text) = waiting.await.expect("task");
    assert_eq!(status, 200, "the queued request: {text}");
    assert_eq!(gateway.gateway().queued(), 0);

    // 3. A worker busy for longer than the queue's deadline.
    *plays.lock().expect("lock") = Play::Refuse(JobErrorCode::Busy);
    let r = client.post(&url).json(&body).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "workers_saturated", "{v}");
    assert_eq!(gateway.gateway().queued(), 0);

    cancel.cancel();
    worker.abort();
    gateway.shutdown();
}

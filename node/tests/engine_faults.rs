//! A worker's engine under faults (audit F19): tokenizing a prompt never
//! holds up the node's async runtime, and a worker whose engine died stops
//! announcing itself instead of drawing jobs that all fail.
//!
//! The worker is a real node in this process serving the tiny Llama
//! fixture; the faults come from the engine's fail points (compiled in by
//! `cargo test` only). Fail points are global to the process, so each test
//! holds a `fail::FailScenario`, which runs them one at a time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use silk_node::node::{Node, NodeOptions};
use silk_node::protocol::{self, JobMessage, JobRequest, WirePrompt};
use silk_node::worker::ANNOUNCE_EVERY;
use silk_overlay::testing::{local_config, seeded_keypair, spawn_local};
use silk_overlay::JobFrame;

fn tiny_llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../inference/tests/fixtures/tiny-llama")
}

async fn start_worker(dir: &tempfile::TempDir) -> Arc<Node> {
    Node::start(NodeOptions {
        data_dir: dir.path().to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")],
        bootstrap: Vec::new(),
        worker_model: Some(tiny_llama().display().to_string()),
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
        job_progress_timeout: Duration::from_secs(5),
        pinned_models: Vec::new(),
    })
    .await
    .expect("worker node")
}

/// The sequence number of the worker's own latest announcement.
fn own_seq(node: &Node) -> Option<u64> {
    node.known_workers()
        .into_iter()
        .find(|a| a.peer_id == node.peer_id())
        .map(|a| a.seq)
}

/// A job sent from another peer is tokenized off the runtime: the test
/// runs on a single-threaded runtime (the worker's overlay, its job
/// handler and this test all share one thread) and holds the job inside
/// `Engine::submit`, where the prompt is tokenized. The test itself must
/// still run while the job is held. Before the fix `submit` ran on the
/// runtime thread: nothing else ran until a watchdog thread let the job
/// go after 20 s, and the test failed with "stalled".
#[tokio::test(flavor = "current_thread")]
async fn tokenizing_a_prompt_does_not_hold_up_the_runtime() {
    let scenario = fail::FailScenario::setup();
    let reached = Arc::new(AtomicBool::new(false));
    let stalled = Arc::new(AtomicBool::new(false));
    let (release, held) = mpsc::channel::<()>();
    let held = Mutex::new(held);
    {
        let reached = Arc::clone(&reached);
        fail::cfg_callback("engine-tokenize", move || {
            reached.store(true, Ordering::SeqCst);
            let _ = held
                .lock()
                .expect("lock")
                .recv_timeout(Duration::from_secs(60));
        })
        .expect("fail point");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let worker = start_worker(&dir).await;
    let model = worker.served_model().expect("a worker").id.clone();
    let addr: silk_overlay::Multiaddr = format!(
        "{}/p2p/{}",
        worker.overlay().listen_addrs().await.expect("addrs")[0],
        worker.peer_id()
    )
    .parse()
    .expect("multiaddr");
    let gateway = spawn_local(local_config(seeded_keypair(91)).with_bootstrap(vec![addr]))
        .await
        .expect("gateway peer");

    // The watchdog: if the job is held and this test has not seen it
    // within 20 s, the runtime is stuck; say so and let the job go.
    let seen = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (reached, seen, stalled, release) = (
            Arc::clone(&reached),
            Arc::clone(&seen),
            Arc::clone(&stalled),
            release.clone(),
        );
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(120) {
                if seen.load(Ordering::SeqCst) {
                    return;
                }
                if reached.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_secs(20));
                    if !seen.load(Ordering::SeqCst) {
                        stalled.store(true, Ordering::SeqCst);
                        let _ = release.send(());
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let request = JobRequest {
        model,
        prompt: WirePrompt::Text("The quick brown fox jumps over the lazy dog. ".repeat(4)),
        max_tokens: 4,
        sampling: silk_inference::SamplingParams::default(),
        stop: Vec::new(),
        ignore_eos: true,
        payment: None,
        continuation: Vec::new(),
        logprobs: None,
        constraint: None,
        prompt_logprobs: None,
    };
    let message = protocol::encode(&JobMessage::Generate(request));
    let job = {
        let handle = gateway.handle.clone();
        let peer = worker.peer_id();
        tokio::spawn(async move {
            let mut stream = handle.open_job(peer, message).await.expect("job stream");
            let mut tokens = 0;
            while let Some(frame) = stream.next_frame().await {
                match frame.expect("frame") {
                    JobFrame::Data(_) => tokens += 1,
                    JobFrame::End(_) => return tokens,
                    JobFrame::Error { code, message } => panic!("job failed: {code:?} {message}"),
                }
            }
            panic!("the job stream ended without its end frame")
        })
    };
    // This loop is the "test itself": it only runs if the runtime does.
    let start = Instant::now();
    while !reached.load(Ordering::SeqCst) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the job never reached the engine"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    seen.store(true, Ordering::SeqCst);
    assert!(
        !stalled.load(Ordering::SeqCst),
        "the runtime stalled while the worker tokenized a prompt"
    );
    let _ = release.send(());
    let tokens = tokio::time::timeout(Duration::from_secs(60), job)
        .await
        .expect("the job ends")
        .expect("job task");
    assert!(tokens > 0, "the job produced nothing");
    watchdog.join().expect("watchdog");
    fail::remove("engine-tokenize");
    worker.shutdown_and_wait(Duration::from_secs(5)).await;
    drop(scenario);
}

/// After the scheduler panics mid-job, the job ends with an error, the
/// engine says it is stopped, and the worker announces itself no more
/// (its last announcement expires). Before the fix the announcer went on
/// every [`ANNOUNCE_EVERY`] for an engine that failed every job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_engine_died_stops_announcing_itself() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().expect("tempdir");
    let worker = start_worker(&dir).await;
    let engine = worker.engine().expect("a worker").clone();
    let start = Instant::now();
    while own_seq(&worker).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the worker never announced itself"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    fail::cfg("engine-step", "panic(injected fault)").expect("fail point");
    let mut job = engine
        .submit(silk_inference::GenerateRequest::new(
            silk_inference::Prompt::Text("Hello".into()),
            4,
        ))
        .expect("submit");
    let mut finished = false;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), job.next())
        .await
        .expect("the job ends")
    {
        finished |= matches!(event, silk_inference::Event::Done(_));
    }
    fail::remove("engine-step");
    assert!(
        !finished,
        "the job finished although its forward pass panicked"
    );
    let start = Instant::now();
    while engine.is_running() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the engine still says it runs after its scheduler panicked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = engine.submit(silk_inference::GenerateRequest::new(
        silk_inference::Prompt::Text("Hello".into()),
        4,
    ));
    assert!(again.is_err(), "the dead engine still takes jobs");

    // One poll of the announcer may still have been on its way.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let last = own_seq(&worker);
    tokio::time::sleep(ANNOUNCE_EVERY * 2 + Duration::from_secs(1)).await;
    assert_eq!(
        own_seq(&worker),
        last,
        "the worker went on announcing a dead engine"
    );
    worker.shutdown_and_wait(Duration::from_secs(5)).await;
    drop(scenario);
}

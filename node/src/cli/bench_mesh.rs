//! `silk bench mesh`: routing overhead, time until a new worker is known,
//! and gossip convergence of in-process overlays. Prints a markdown table.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use silk_inference::{backend::Device, Event};

use super::mesh_shard::{self, MeshShardArgs};
use crate::gateway::JobEvent;
use crate::node::{Node, NodeOptions};
use crate::protocol::{JobRequest, WirePrompt};

/// Arguments of `silk bench mesh`.
#[derive(Debug, Args)]
pub struct MeshBenchArgs {
    /// Model the in-process worker serves (name or path).
    #[arg(long, default_value = silk_inference::DEFAULT_MODEL)]
    pub model: String,
    /// Jobs per route for the overhead measurement (0 skips it).
    #[arg(long, default_value_t = 50)]
    pub jobs: usize,
    /// Mesh sizes for gossip convergence, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,50,200")]
    pub sizes: Vec<usize>,
    /// Most nodes run in one process; larger meshes are spread over
    /// several processes of this binary (each connection costs a file
    /// descriptor at both ends).
    #[arg(long, default_value_t = 50)]
    pub nodes_per_process: usize,
    /// Known workers for the selection-time measurement (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub known_workers: usize,
    /// The overlay nodes' peer budget, `MIN,MAX` connections (the
    /// production default 25,50; `0,512` turns it off, as before it existed).
    #[arg(long, value_delimiter = ',', default_values_t = [25, 50])]
    pub peer_budget: Vec<u32>,
    /// Overlay nodes listen on QUIC only (one UDP socket per node) instead
    /// of TCP (one descriptor per connection end).
    #[arg(long)]
    pub quic: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A measured time, or why there is none.
fn outcome(r: &anyhow::Result<Duration>) -> String {
    match r {
        Ok(d) => ms(*d),
        Err(e) => format!("failed: {e:#}"),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn options(data_dir: &Path, models_dir: &Path, worker: Option<String>) -> NodeOptions {
    NodeOptions {
        data_dir: data_dir.to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("static multiaddr")],
        bootstrap: Vec::new(),
        worker_model: worker,
        models_dir: models_dir.to_path_buf(),
        device: Device::Cpu,
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
        job_progress_timeout: crate::gateway::JOB_PROGRESS_TIMEOUT,
        pinned_models: crate::gateway::default_pinned_models(),
    }
}

/// Runs `silk bench mesh`.
pub fn run(args: MeshBenchArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    raise_open_files_limit();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(bench(args, data_dir))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `silk bench mesh-shard`, a child of `silk bench mesh`.
pub fn run_shard(args: MeshShardArgs) -> anyhow::Result<ExitCode> {
    raise_open_files_limit();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(mesh_shard::run_shard(args))?;
    Ok(ExitCode::SUCCESS)
}

/// Raises the soft open-files limit to the hard one: a mesh of in-process
/// nodes needs a descriptor per connection end, far past the usual 1024.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
}

async fn bench(args: MeshBenchArgs, data_dir: &Path) -> anyhow::Result<()> {
    println!("## silk bench mesh\n");
    println!("machine: {}\n", super::bench::machine());
    if args.jobs > 0 {
        routing_overhead(&args, data_dir).await?;
    }
    if args.known_workers > 0 {
        selection_time(args.known_workers);
    }
    println!(
        "Overlay nodes on 127.0.0.1, at most {} per process, with the production gossip \
         settings. Settled: the mesh's connection count stayed within 1% for {} s (waiting at \
         most {} s). Then one new node joins and announces itself, then every node announces \
         itself at once.\n",
        args.nodes_per_process,
        mesh_shard::STEADY_FOR.as_secs(),
        mesh_shard::SETTLE_LIMIT.as_secs(),
    );
    let setup = match args.peer_budget[..] {
        [min, max] => mesh_shard::NodeSetup {
            peer_budget: (min, max),
            quic: args.quic,
        },
        _ => anyhow::bail!("--peer-budget takes MIN,MAX"),
    };
    println!(
        "Peer budget: {} to {} connections per node; transport: {}.\n",
        setup.peer_budget.0,
        setup.peer_budget.1,
        if setup.quic { "QUIC" } else { "TCP" }
    );
    println!(
        "| nodes | processes | spawn | meshed | settled | connections per node (fewest–most) | settled CPU per node | descriptors per node | a new worker known by all | every node holds every announcement |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &n in &args.sizes {
        eprintln!(
            "gossip convergence with {n} overlay nodes, at most {} per process…",
            args.nodes_per_process
        );
        match mesh_shard::measure(n, args.nodes_per_process, setup).await {
            Ok(r) => println!(
                "| {n} | {} | {} | {} | {} | {:.1} ({}–{}) | {} | {} | {} | {} |",
                r.processes,
                ms(r.spawn),
                ms(r.meshed),
                ms(r.settled),
                r.connections_per_node,
                r.connections_range.0,
                r.connections_range.1,
                r.cpu_per_node
                    .map_or("n/a".into(), |c| format!("{:.2}% of a core", c * 100.0)),
                r.descriptors_per_node
                    .map_or("n/a".into(), |d| format!("{d:.1}")),
                outcome(&r.new_worker_known),
                outcome(&r.converged),
            ),
            Err(e) => println!("| {n} | failed: {e:#} | | | | | | | | |"),
        }
    }
    Ok(())
}

/// Times a gateway's selection among `n` known workers of one model: the
/// worker-table lookup, candidate building and ranking that every request
/// runs (without the attestation checks, which are a verdict-cache lookup
/// per TDX worker and nothing for insecure ones).
fn selection_time(n: usize) {
    use crate::gateway::routing::{self, Candidate};
    use crate::gateway::WorkerTable;
    use silk_overlay::testing::{seeded_keypair, worker_announcement};

    const ROUNDS: usize = 500;
    let model = "bench@sha256:00";
    let mut table = WorkerTable::default();
    let mut rtts = Vec::new();
    for i in 0..n as u64 {
        let peer = seeded_keypair(1_000_000 + i).public().to_peer_id();
        let mut a = worker_announcement(peer, 1, &[model]);
        // Spread load, speed and price so the ranking has work to do.
        a.free_slots = (i % 33) as u32;
        a.queue_depth = (i % 7) as u32;
        a.decode_tokens_per_s_milli = 20_000 + (i * 7_919) % 200_000;
        a.price_coefficient_milli = 500 + (i * 104_729) % 1_500;
        table.offer(a);
        if i % 2 == 0 {
            rtts.push((peer, Duration::from_micros(200 + (i * 37) % 150_000)));
        }
    }
    table.set_rtts(rtts);
    let own = seeded_keypair(999_999).public().to_peer_id();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let candidates: Vec<Candidate> = table
            .serving(model, now, own, &[])
            .into_iter()
            .map(|(a, rtt)| Candidate::from_announcement(a, rtt, 0, false, 0.5))
            .collect();
        let ranked = routing::rank(candidates, 128, 64);
        times.push(t.elapsed());
        std::hint::black_box(ranked);
    }
    times.sort();
    println!(
        "| selection among {n} known workers (table lookup, candidates, ranking) | p50 | p99 |"
    );
    println!("| --- | --- | --- |");
    println!(
        "| one request | {} | {} |\n",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.99))
    );
}

/// Times 1-token jobs on a worker's engine and through a gateway to that
/// worker, in this process; prints the table.
async fn routing_overhead(args: &MeshBenchArgs, data_dir: &Path) -> anyhow::Result<()> {
    let models_dir = data_dir.join("models");
    let tmp = tempfile::Builder::new()
        .prefix("silk-bench-mesh")
        .tempdir()?;
    eprintln!("starting an in-process worker and gateway…");
    let worker = Node::start(options(
        &tmp.path().join("w"),
        &models_dir,
        Some(args.model.clone()),
    ))
    .await
    .context("starting the worker (run `silk model fetch` first)")?;
    let wpeer = worker.peer_id();
    let waddr = worker
        .overlay()
        .listen_addrs()
        .await?
        .into_iter()
        .next()
        .context("worker has no listen address")?;
    let waddr: silk_overlay::Multiaddr = format!("{waddr}/p2p/{wpeer}").parse()?;
    let mut gopts = options(&tmp.path().join("g"), &models_dir, None);
    gopts.bootstrap = vec![waddr];
    let t0 = Instant::now();
    let gateway = Node::start(gopts).await?;
    let model = worker
        .served_model()
        .context("worker serves nothing")?
        .id
        .clone();
    while gateway.resolve_model(Some(&model)).is_err()
        || !gateway.known_workers().iter().any(|a| a.peer_id == wpeer)
    {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "gateway never saw the worker"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let worker_known = t0.elapsed();

    let request = JobRequest {
        model: model.clone(),
        prompt: WirePrompt::Text("Hello".into()),
        max_tokens: 1,
        sampling: silk_inference::SamplingParams::default(),
        stop: Vec::new(),
        ignore_eos: true,
        payment: None,
        continuation: Vec::new(),
        logprobs: None,
        constraint: None,
        prompt_logprobs: None,
    };
    let engine = worker.engine().context("no engine")?;
    let (mut direct, mut routed) = (Vec::new(), Vec::new());
    for i in 0..args.jobs + 3 {
        let t = Instant::now();
        let mut s = engine.submit(request.to_generate())?;
        while let Some(e) = s.next().await {
            if matches!(e, Event::Done(_) | Event::Error(_)) {
                break;
            }
        }
        let d = t.elapsed();
        let t = Instant::now();
        let mut job = gateway.dispatch(request.clone(), None, None).await?;
        anyhow::ensure!(job.worker == wpeer, "routed to an unexpected worker");
        while let Some(e) = job.events.recv().await {
            match e {
                JobEvent::Done { .. } => break,
                JobEvent::Failed(e) => anyhow::bail!("job failed: {e}"),
                JobEvent::Token(_) => {}
            }
        }
        let r = t.elapsed();
        if i >= 3 {
            direct.push(d);
            routed.push(r);
        }
    }
    let mut overhead: Vec<Duration> = routed
        .iter()
        .zip(&direct)
        .map(|(r, d)| r.saturating_sub(*d))
        .collect();
    direct.sort();
    routed.sort();
    overhead.sort();
    gateway.shutdown();
    worker.shutdown();

    println!("| measurement | p50 | p99 |");
    println!("| --- | --- | --- |");
    println!(
        "| 1-token job on the worker's engine (reference) | {} | {} |",
        ms(percentile(&direct, 0.5)),
        ms(percentile(&direct, 0.99))
    );
    println!(
        "| same job via gateway → worker → gateway | {} | {} |",
        ms(percentile(&routed, 0.5)),
        ms(percentile(&routed, 0.99))
    );
    println!(
        "| routing overhead (paired difference) | {} | {} |",
        ms(percentile(&overhead, 0.5)),
        ms(percentile(&overhead, 0.99))
    );
    println!("\n{} jobs per route, TCP on loopback. A new gateway knew the worker {} after it started.\n", args.jobs, ms(worker_known));
    Ok(())
}

//! `silk bench mesh`: routing overhead, time until a new worker is known,
//! and gossip convergence of in-process overlays. Prints a markdown table.

use std::collections::HashSet;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use silk_inference::{backend::Device, Event};
use silk_overlay::testing;

use crate::jobs::{JobRequest, WirePrompt};
use crate::service::{JobEvent, Node, NodeOptions};

/// Arguments of `silk bench mesh`.
#[derive(Debug, Args)]
pub struct MeshBenchArgs {
    /// Model the in-process worker serves (name or path).
    #[arg(long, default_value = silk_inference::DEFAULT_MODEL)]
    pub model: String,
    /// Jobs per route for the overhead measurement.
    #[arg(long, default_value_t = 50)]
    pub jobs: usize,
    /// Mesh sizes for gossip convergence, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,50,200")]
    pub sizes: Vec<usize>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
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
        allow_insecure_workers: true,
        price_coefficient_milli: 1000,
        default_max_coefficient_milli: 2000,
        billing: None,
        max_jobs_per_worker: 8,
        mdns: false,
        fast_gossip: true,
        attestation_policy: None,
        pccs_url: None,
    }
}

/// Runs `silk bench mesh`.
pub fn run(args: MeshBenchArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(bench(args, data_dir))?;
    Ok(ExitCode::SUCCESS)
}

async fn bench(args: MeshBenchArgs, data_dir: &Path) -> anyhow::Result<()> {
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
    while gateway.resolve_model(Some(&model)).await.is_err()
        || !gateway
            .overlay()
            .announcements()
            .await?
            .iter()
            .any(|a| a.peer_id == wpeer)
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
        temperature: 0.0,
        top_p: 1.0,
        seed: None,
        stop: Vec::new(),
        ignore_eos: true,
        payment: None,
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
        let mut job = gateway.dispatch(request.clone(), None).await?;
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

    println!("## silk bench mesh\n");
    println!("machine: {}\n", super::bench::machine());
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
    println!("| in-process nodes | spawn | meshed | every node holds every announcement | a new worker known by all |");
    println!("| --- | --- | --- | --- | --- |");
    for &n in &args.sizes {
        eprintln!("gossip convergence with {n} in-process overlay nodes…");
        match testing::measure_convergence(n, 7, Duration::from_secs(120)).await {
            Ok(r) => {
                let join = new_worker_known(n).await.ok();
                println!(
                    "| {n} | {} | {} | {} | {} |",
                    ms(r.spawn),
                    ms(r.meshed),
                    ms(r.converged),
                    join.map(ms).unwrap_or_else(|| "timed out".into())
                );
            }
            Err(e) => println!("| {n} | failed: {e} | | | |"),
        }
    }
    Ok(())
}

/// Starts `n` nodes, waits until meshed, then starts one more node that
/// announces itself and measures until all `n` have accepted its
/// announcement (arrival times from their event streams, see
/// [`testing::measure_convergence`]).
async fn new_worker_known(n: usize) -> anyhow::Result<Duration> {
    let nodes = testing::spawn_mesh(n, 11).await?;
    let boot = nodes[0].addr.clone();
    let (handles, mut arrivals, mut watchers) = testing::watch_announcements(nodes);
    let result = async {
        testing::wait_until_meshed(
            &handles,
            n.saturating_sub(1).min(4),
            Duration::from_secs(120),
        )
        .await?;
        let config =
            testing::local_config(testing::seeded_keypair(1_000_000)).with_bootstrap(vec![boot]);
        let new = testing::spawn_local(config).await?;
        let peer_id = new.peer_id;
        let (new_handles, _, mut new_watcher) = testing::watch_announcements(vec![new]);
        let handle = &new_handles[0];
        // Announce as soon as it has a peer, as a starting worker does.
        testing::wait_until_meshed(std::slice::from_ref(handle), 1, Duration::from_secs(60))
            .await?;
        let start = Instant::now();
        handle
            .announce(testing::worker_announcement(peer_id, 1, &["bench-model"]))
            .await?;
        let mut seen = HashSet::new();
        let mut last = start;
        tokio::time::timeout(Duration::from_secs(120), async {
            while seen.len() < n {
                match arrivals.recv().await {
                    Some((i, peer, at)) if peer == peer_id => {
                        if seen.insert(i) {
                            last = last.max(at);
                        }
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        })
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{} of {n} nodes never got the new announcement",
                n - seen.len()
            )
        })?;
        anyhow::ensure!(seen.len() == n, "the nodes stopped before all got it");
        handle.shutdown();
        new_watcher.shutdown().await;
        anyhow::Ok(last.duration_since(start))
    }
    .await;
    for h in &handles {
        h.shutdown();
    }
    watchers.shutdown().await;
    result
}

//! Proximity routing over real delays.
//!
//! Three regions of the testnet's delay line (`silk_testnet::delay_line`:
//! network namespaces joined by TUN devices through a relay in this
//! process, which holds each packet for its link's delay): the gateway's,
//! a near worker's 5 ms away and a far worker's 150 ms away (RTTs; the two
//! workers are 150 ms apart). Every node runs inside its region's
//! namespace and listens on its address, where this process reaches its
//! API (the test's own region has no delay to any). Sequential jobs go to
//! the near worker; once the gateway has `max_jobs_per_worker` jobs on
//! it, a burst spills to the far worker.
//!
//! Needs root (namespaces, TUN devices) and iproute2; without root it says
//! so and passes. The delay line creates and removes its namespaces.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::{json, Value};
use silk_testnet::delay_line::{self, DelayLine, Link, Topology};
use silk_testnet::{NodeOptions, Testnet, TestnetConfig};

/// Regions in node order: gateway, near worker, far worker.
const REGIONS: [&str; 3] = ["gw", "near", "far"];
/// RTTs from the gateway's region, in ms.
///
/// The gateway ranks workers by RTT plus the job's tokens over the decode
/// speed each worker measured at startup. Debug builds on a busy machine
/// decode single-digit tokens/s and two workers' measurements can differ
/// by a fifth or more, worth tens of ms even for a one-token job, so the
/// RTT gap is large enough to outweigh that.
const NEAR_RTT_MS: u64 = 5;
const FAR_RTT_MS: u64 = 150;
const GATEWAY: usize = 0;
const NEAR: usize = 1;
const FAR: usize = 2;
/// Jobs in phase 1, one at a time, one token each.
const SEQUENTIAL: usize = 10;
/// The gateway's per-worker cap in phase 2.
const MAX_JOBS_PER_WORKER: usize = 2;
/// Concurrent jobs in phase 2: twice what the near worker may take.
const BURST: usize = 2 * MAX_JOBS_PER_WORKER;

fn topology() -> Topology {
    Topology::new()
        .link("gw", "near", Link::rtt_ms(NEAR_RTT_MS))
        .link("gw", "far", Link::rtt_ms(FAR_RTT_MS))
        .link("near", "far", Link::rtt_ms(FAR_RTT_MS))
}

/// How the testnet starts node `i`: inside its region, on its address.
fn node_options(line: &DelayLine, i: usize, config_toml: String) -> NodeOptions {
    NodeOptions {
        launcher: line.launcher(REGIONS[i]),
        host: line.address(REGIONS[i]).map(|a| a.to_string()),
        config_toml,
        ..Default::default()
    }
}

/// A non-streamed chat job through the gateway: (status, serving worker).
async fn chat(net: &Testnet, max_tokens: u32) -> anyhow::Result<(u16, Option<String>)> {
    let mut r = net.client().post(format!(
        "{}/v1/chat/completions",
        net.nodes[GATEWAY].api_url
    ));
    // The gateway's API is on a namespace address, not loopback: it needs a key.
    if let Some(key) = &net.nodes[GATEWAY].api_key {
        r = r.bearer_auth(key);
    }
    let r = r
        .json(&json!({
            "messages": [{"role": "user", "content": "Hi."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": true,
        }))
        .send()
        .await?;
    let status = r.status().as_u16();
    let worker = r
        .headers()
        .get("x-silk-worker")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Value = r.json().await?;
    ensure!(
        status == 200 || status == 429,
        "unexpected status {status}: {body}"
    );
    Ok((status, worker))
}

/// Waits until the gateway has measured an RTT to both workers; returns
/// its `/v1/mesh` entries for them (near, far).
async fn wait_for_rtts(net: &Testnet, near: &str, far: &str) -> anyhow::Result<(Value, Value)> {
    let start = Instant::now();
    loop {
        let mesh = net
            .get_json(&format!("{}/v1/mesh", net.nodes[GATEWAY].api_url))
            .await?;
        let measured = |peer: &str| {
            mesh["workers"]
                .as_array()?
                .iter()
                .find(|w| w["peer_id"] == peer && w["rtt_ms"].is_number())
                .cloned()
        };
        if let (Some(n), Some(f)) = (measured(near), measured(far)) {
            return Ok((n, f));
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the gateway measured no RTT to both workers within 30 s: {mesh}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Network coordinates on the line: every node's coordinate, and the RTT
/// that each pair's coordinates predict against the line's. Each node
/// moves its coordinate with every ping to a peer that announced one, so
/// by now the workers have announced theirs and the gateway has placed
/// itself. Prints the median relative error (the estimate's quality is
/// asserted on a simulated topology in `silk_overlay::vivaldi`); fails
/// only if coordinates do not make it from worker to gateway.
async fn report_coordinates(net: &Testnet, near: &str, far: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut pairs = Vec::new();
    loop {
        pairs.clear();
        for (from, to, to_region, rtt_ms) in [
            (GATEWAY, near, REGIONS[NEAR], NEAR_RTT_MS),
            (GATEWAY, far, REGIONS[FAR], FAR_RTT_MS),
            (NEAR, far, REGIONS[FAR], FAR_RTT_MS),
        ] {
            let mesh = net
                .get_json(&format!("{}/v1/mesh", net.nodes[from].api_url))
                .await?;
            let estimate = mesh["workers"].as_array().and_then(|ws| {
                ws.iter()
                    .find(|w| w["peer_id"] == to)
                    .and_then(|w| w["estimated_rtt_ms"].as_f64())
            });
            if let Some(e) = estimate {
                pairs.push((
                    Duration::from_secs_f64(e / 1e3),
                    Duration::from_millis(rtt_ms),
                ));
                println!(
                    "coordinates: {} to {to_region}: estimate {e:.1} ms, line {rtt_ms} ms",
                    REGIONS[from]
                );
            }
        }
        if pairs.len() == 3 {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the nodes hold no coordinate estimate for every pair after 30 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut errors: Vec<f64> = pairs
        .iter()
        .map(|(e, rtt)| (e.as_secs_f64() - rtt.as_secs_f64()).abs() / rtt.as_secs_f64())
        .collect();
    errors.sort_by(f64::total_cmp);
    let median = errors[errors.len() / 2];
    println!(
        "coordinates: median relative error {median:.3} over {} pairs",
        pairs.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_prefers_the_near_worker_and_spills_to_the_far_one() -> anyhow::Result<()> {
    let mut config = TestnetConfig::new(REGIONS.len(), 2)?;
    if !delay_line::is_root() {
        eprintln!(
            "skipping the proximity test: not root (network namespaces and TUN devices need it)"
        );
        return Ok(());
    }
    let line = DelayLine::start(topology())
        .map_err(anyhow::Error::msg)
        .context("the delay line did not start")?;
    // The devnet would listen on the root namespace's loopback, which
    // nodes inside namespaces cannot reach.
    config.payments = false;
    config.node_options = (0..REGIONS.len())
        .map(|i| {
            let toml = if i == GATEWAY {
                format!("max_jobs_per_worker = {MAX_JOBS_PER_WORKER}\n")
            } else {
                String::new()
            };
            node_options(&line, i, toml)
        })
        .collect();
    // Node 0 is the gateway, nodes 1 and 2 the workers: REGIONS order.
    let net = Testnet::spawn(config)
        .await
        .context("the mesh inside the namespaces did not start/converge")?;
    ensure!(!net.nodes[GATEWAY].worker && net.nodes[NEAR].worker && net.nodes[FAR].worker);
    let near = net.nodes[NEAR].peer_id.clone();
    let far = net.nodes[FAR].peer_id.clone();
    let (near_seen, far_seen) = wait_for_rtts(&net, &near, &far).await?;
    for (name, w) in [("near", &near_seen), ("far", &far_seen)] {
        let number = |key: &str| w[key].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name} worker: rtt {:.1} ms, decodes {:.1} tokens/s",
            number("rtt_ms"),
            number("decode_tokens_per_s")
        );
    }
    // The line holds every packet for its link's delay: no RTT is shorter.
    let far_rtt = far_seen["rtt_ms"].as_f64().unwrap_or(0.0);
    ensure!(
        far_rtt >= FAR_RTT_MS as f64 * 0.95,
        "the gateway measured {far_rtt} ms to the far worker, under the line's {FAR_RTT_MS} ms"
    );

    // Phase 1: one job at a time; the near worker has free slots throughout.
    let (mut to_near, mut to_far) = (0, 0);
    for _ in 0..SEQUENTIAL {
        let (status, worker) = chat(&net, 1).await?;
        ensure!(status == 200, "a sequential job was refused");
        match worker.context("no x-silk-worker header")? {
            w if w == near => to_near += 1,
            w if w == far => to_far += 1,
            w => anyhow::bail!("{w} is not one of the workers"),
        }
    }
    println!("phase 1 ({SEQUENTIAL} sequential jobs): near {to_near}, far {to_far}");
    ensure!(
        10 * to_near >= 9 * SEQUENTIAL,
        "expected at least 90% of the sequential jobs on the near worker, got near {to_near}, far {to_far}"
    );

    // Phase 2: more concurrent jobs than the gateway sends the near worker.
    let results = futures::future::join_all((0..BURST).map(|_| chat(&net, 48))).await;
    let (mut to_near, mut to_far, mut refused) = (0, 0, 0);
    for r in results {
        match r? {
            (429, _) => refused += 1,
            (_, Some(w)) if w == near => to_near += 1,
            (_, Some(w)) if w == far => to_far += 1,
            (_, w) => anyhow::bail!("job served by {w:?}, not one of the workers"),
        }
    }
    println!(
        "phase 2 ({BURST} concurrent jobs, max_jobs_per_worker = {MAX_JOBS_PER_WORKER}): \
         near {to_near}, far {to_far}, refused {refused}"
    );
    ensure!(to_near >= 1, "the near worker served none of the burst");
    ensure!(
        to_far >= 1,
        "the gateway did not spill to the far worker when the near one was saturated"
    );
    report_coordinates(&net, &near, &far).await?;
    println!("delay line: {:?}", line.carried());
    drop(net);
    drop(line);
    Ok(())
}

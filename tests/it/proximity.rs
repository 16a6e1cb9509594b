//! Proximity routing over emulated latency.
//!
//! Three network namespaces hang off a bridge in the root namespace: a
//! gateway, a near worker and a far worker. `tc netem` delays both ends of
//! each worker's veth, 1 ms each way for the near one (2 ms RTT) and 100 ms
//! for the far one (200 ms RTT); the gateway's link has none. Every node runs
//! inside its namespace and listens on its bridge address, where this
//! process reaches its API. Sequential jobs mostly go to the near worker;
//! once the gateway has `max_jobs_per_worker` jobs on it, a burst spills to
//! the far worker.
//!
//! Needs root with CAP_NET_ADMIN, iproute2, and a kernel with veth, bridge
//! and `sch_netem`; without them it says why and passes. Everything it
//! creates carries its pid in the name and is removed when it ends, failed
//! or not. No node has a route beyond the bridge.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::{json, Value};
use silk_testnet::{NodeOptions, Testnet, TestnetConfig};

/// Namespace tags in node order (gateway, near worker, far worker) with the
/// netem delay each way on their veth, in ms.
///
/// The gateway ranks workers by RTT plus the job's tokens over the decode
/// speed each worker measured at startup. Debug builds on a busy machine
/// decode single-digit tokens/s and two workers' measurements can differ
/// by a fifth or more, worth tens of ms even for a one-token job, so the
/// RTT gap is made large enough to outweigh that.
const NODES: [(&str, u32); 3] = [("gw", 0), ("near", 1), ("far", 100)];
const GATEWAY: usize = 0;
const NEAR: usize = 1;
const FAR: usize = 2;
/// Jobs in phase 1, one at a time, one token each (see [`NODES`]).
const SEQUENTIAL: usize = 8;
/// The gateway's per-worker cap in phase 2.
const MAX_JOBS_PER_WORKER: usize = 2;
/// Concurrent jobs in phase 2: twice what the near worker may take.
const BURST: usize = 2 * MAX_JOBS_PER_WORKER;

/// Runs a command; its stderr on failure.
fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let ids = s.lines().find_map(|l| l.strip_prefix("Uid:"))?;
            Some(ids.split_whitespace().nth(1)? == "0")
        })
        .unwrap_or(false)
}

/// The bridge, namespaces and veths; removed on drop.
struct Lab {
    /// First three octets of the bridge's /24.
    subnet: String,
    bridge: Option<String>,
    /// One per node, in node order.
    netns: Vec<String>,
    /// The root-namespace end of each node's veth.
    veths: Vec<String>,
}

impl Lab {
    /// Builds the topology, or says why it cannot.
    fn create() -> Result<Self, String> {
        if sh(&["ip", "-V"]).is_err() || sh(&["tc", "-V"]).is_err() {
            return Err("`ip` or `tc` is missing: install iproute2".into());
        }
        if !is_root() {
            return Err("not root: run as root (CAP_NET_ADMIN) to build network namespaces".into());
        }
        let pid = std::process::id();
        let mut lab = Lab {
            subnet: format!("10.77.{}", pid % 250 + 1),
            bridge: None,
            netns: Vec::new(),
            veths: Vec::new(),
        };
        let bridge = format!("silkbr{pid}");
        sh(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        lab.bridge = Some(bridge.clone());
        let bridge_addr = format!("{}.1/24", lab.subnet);
        sh(&["ip", "addr", "add", &bridge_addr, "dev", &bridge])?;
        sh(&["ip", "link", "set", &bridge, "up"])?;
        for (i, (tag, delay_ms)) in NODES.into_iter().enumerate() {
            let ns = format!("silk-{pid}-{tag}");
            sh(&["ip", "netns", "add", &ns])?;
            lab.netns.push(ns.clone());
            let veth = format!("sk{pid}{tag}");
            sh(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            lab.veths.push(veth.clone());
            sh(&["ip", "link", "set", &veth, "master", &bridge, "up"])?;
            let addr = format!("{}/24", lab.host(i));
            sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            if delay_ms > 0 {
                let delay = format!("{delay_ms}ms");
                sh(&[
                    "tc", "qdisc", "add", "dev", &veth, "root", "netem", "delay", &delay,
                ])
                .map_err(|e| format!("{e} (is the sch_netem module available?)"))?;
                sh(&[
                    "tc", "-n", &ns, "qdisc", "add", "dev", "eth0", "root", "netem", "delay",
                    &delay,
                ])?;
            }
        }
        Ok(lab)
    }

    /// Node `i`'s address on the bridge.
    fn host(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 2)
    }

    /// How the testnet starts node `i`: inside its namespace, on its address.
    fn node_options(&self, i: usize, config_toml: String) -> NodeOptions {
        NodeOptions {
            launcher: ["ip", "netns", "exec", &self.netns[i]]
                .map(String::from)
                .to_vec(),
            host: Some(self.host(i)),
            config_toml,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting one end of a veth deletes both; the namespaces are empty
        // by now because the testnet, declared later, is dropped first.
        for veth in &self.veths {
            let _ = sh(&["ip", "link", "del", veth]);
        }
        for ns in &self.netns {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        if let Some(bridge) = &self.bridge {
            let _ = sh(&["ip", "link", "del", bridge]);
        }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_prefers_the_near_worker_and_spills_to_the_far_one() -> anyhow::Result<()> {
    let mut config = TestnetConfig::new(NODES.len(), 2)?;
    let lab = match Lab::create() {
        Ok(lab) => lab,
        Err(why) => {
            eprintln!("skipping the proximity test: {why}");
            return Ok(());
        }
    };
    // The devnet would listen on the root namespace's loopback, which
    // nodes inside namespaces cannot reach.
    config.payments = false;
    config.node_options = (0..NODES.len())
        .map(|i| {
            let toml = if i == GATEWAY {
                format!("max_jobs_per_worker = {MAX_JOBS_PER_WORKER}\n")
            } else {
                String::new()
            };
            lab.node_options(i, toml)
        })
        .collect();
    // Node 0 is the gateway, nodes 1 and 2 the workers: NODES order.
    let net = Testnet::spawn(config)
        .await
        .context("the mesh inside the namespaces did not start/converge")?;
    ensure!(!net.nodes[GATEWAY].worker && net.nodes[NEAR].worker && net.nodes[FAR].worker);
    let near = net.nodes[NEAR].peer_id.clone();
    let far = net.nodes[FAR].peer_id.clone();
    let (near_seen, far_seen) = wait_for_rtts(&net, &near, &far).await?;
    for (name, w) in [("near", near_seen), ("far", far_seen)] {
        let number = |key: &str| w[key].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name} worker: rtt {:.1} ms, decodes {:.1} tokens/s",
            number("rtt_ms"),
            number("decode_tokens_per_s")
        );
    }

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
        4 * to_near >= 3 * SEQUENTIAL,
        "expected at least 3/4 of the sequential jobs on the near worker, got near {to_near}, far {to_far}"
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
    Ok(())
}

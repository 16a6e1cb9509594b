//! Pay-per-token jobs on a devnet: two gateways, two workers, real cheques.
//!
//! Nodes: 0 gateway (bootstrap), 1 and 2 workers, 3 gateway; all on a
//! `silk devnet` that runs the real wallet and settlement contract. Every
//! gateway opens lanes on chain on its first job to a worker, each job's
//! `silk.cost_nanoton` follows the price formula from the usage it reports,
//! and each worker ends up holding cheques for exactly what it was charged
//! for. The workers are then killed (SIGKILL) after acknowledging those
//! cheques, restarted from their stores with a redemption threshold of
//! 1 nanoTON, and redeem exactly that on chain.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::{json, Value};
use silk_testnet::{Testnet, TestnetConfig};

/// Default prices (`PaymentsConfig::default()`): 1000 nanoTON a token,
/// prompt ×1, completion ×3, worker coefficient ×1.
fn expected_cost(prompt_tokens: u64, completion_tokens: u64) -> u64 {
    1_000 * prompt_tokens + 3_000 * completion_tokens
}

async fn payments(net: &Testnet, node: usize) -> anyhow::Result<Value> {
    let mesh = net
        .get_json(&format!("{}/v1/mesh", net.nodes[node].api_url))
        .await?;
    ensure!(!mesh["payments"].is_null(), "node {node} has no payments");
    Ok(mesh["payments"].clone())
}

/// Polls `check` on node `node`'s payments until it holds or 60 s pass.
async fn wait_for(
    net: &Testnet,
    node: usize,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let p = payments(net, node).await?;
        if check(&p) {
            return Ok(p);
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "node {node}: {what} did not happen within 60 s: {p}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_paid_with_cheques_and_redeemed_on_chain() -> anyhow::Result<()> {
    let mut config = TestnetConfig::new(4, 2)?;
    // Nothing is redeemed while the jobs run: the threshold is out of reach.
    config.payments_toml =
        "lane_amount = 1000000000\nredeem_threshold = 1000000000000\nredeem_every_s = 1\n".into();
    let mut net = Testnet::spawn(config)
        .await
        .context("testnet did not start")?;
    let workers = net.worker_ids();
    ensure!(workers.len() == 2, "expected 2 workers, got {workers:?}");
    let gateways = [0usize, 3];

    // A caller that accepts no worker's price gets a clear 400.
    let r = net
        .client()
        .post(format!("{}/v1/chat/completions", net.nodes[0].api_url))
        .json(&json!({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "max_coefficient": 0.5,
        }))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await?;
    assert_eq!(
        body["error"]["code"], "price_above_max_coefficient",
        "{body}"
    );

    // (gateway, worker peer id) → what the gateway was charged.
    let mut charged: HashMap<(usize, String), u64> = HashMap::new();
    let prompts = [
        "Say hi.",
        "Name a colour.",
        "Count to three.",
        "What is 2+2?",
    ];
    for (i, prompt) in prompts.iter().cycle().take(10).enumerate() {
        let gw = gateways[i % 2];
        let r = net
            .client()
            .post(format!("{}/v1/chat/completions", net.nodes[gw].api_url))
            .json(&json!({
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 3 + (i as u32 % 3),
                "temperature": 0,
            }))
            .send()
            .await?;
        let status = r.status().as_u16();
        let body: Value = r.json().await?;
        ensure!(status == 200, "job {i} on node {gw}: {body}");
        let worker = body["silk"]["worker"]
            .as_str()
            .context("no worker")?
            .to_string();
        let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().context("usage")?;
        let completion = body["usage"]["completion_tokens"]
            .as_u64()
            .context("usage")?;
        let cost = body["silk"]["cost_nanoton"]
            .as_u64()
            .with_context(|| format!("no silk.cost_nanoton: {body}"))?;
        assert_eq!(cost, expected_cost(prompt_tokens, completion), "{body}");
        *charged.entry((gw, worker)).or_default() += cost;
    }

    // Gateways: what they signed is what they charged; nothing stays reserved.
    for gw in gateways {
        let total: u64 = charged
            .iter()
            .filter(|((g, _), _)| *g == gw)
            .map(|(_, c)| c)
            .sum();
        let p = payments(&net, gw).await?;
        assert_eq!(p["spent_nanoton"].as_u64(), Some(total), "node {gw}: {p}");
        assert_eq!(p["reserved_nanoton"].as_u64(), Some(0), "node {gw}: {p}");
        for lane in p["lanes"].as_array().context("lanes")? {
            assert_eq!(
                lane["deposited_nanoton"].as_u64(),
                Some(1_000_000_000),
                "{lane}"
            );
        }
    }

    // Workers: cheques for exactly their work and nothing uncovered; the
    // cheques reach them after the responses, so wait (bounded).
    let mut worker_nodes = Vec::new();
    for peer in &workers {
        let node = net
            .nodes
            .iter()
            .position(|n| &n.peer_id == peer)
            .context("worker node")?;
        let earned: u64 = charged
            .iter()
            .filter(|((_, p), _)| p == peer)
            .map(|(_, c)| c)
            .sum();
        let p = wait_for(&net, node, "every cheque acknowledged", |p| {
            p["earned_nanoton"].as_u64() == Some(earned)
        })
        .await?;
        assert_eq!(p["uncovered_nanoton"].as_u64(), Some(0), "{p}");
        assert_eq!(p["redeemed_nanoton"].as_u64(), Some(0), "{p}");
        let served: Vec<usize> = gateways
            .into_iter()
            .filter(|g| charged.contains_key(&(*g, peer.clone())))
            .collect();
        assert_eq!(
            p["clients"].as_array().map(Vec::len),
            Some(served.len()),
            "{p}"
        );
        worker_nodes.push((node, earned));
    }

    // Crash the workers, restart them from their stores with a threshold
    // they pass: each redeems exactly its cheques. The book's redeemed
    // amount is read back from the contract after each redemption.
    for &(node, _) in &worker_nodes {
        net.kill(node);
        let config = net.nodes[node].data_dir.join("config.toml");
        let text = std::fs::read_to_string(&config)?
            .replace("redeem_threshold = 1000000000000", "redeem_threshold = 1");
        std::fs::write(&config, text)?;
        net.restart(node).await?;
    }
    for &(node, earned) in &worker_nodes {
        let p = wait_for(&net, node, "redemption of every cheque", |p| {
            p["redeemed_nanoton"].as_u64() == Some(earned)
        })
        .await?;
        assert_eq!(p["earned_nanoton"].as_u64(), Some(earned), "{p}");
    }
    Ok(())
}

/// The audit's F4 on a paying testnet: a web page cannot make the gateway
/// pay, and an API key's daily spend cap holds to the nanoTON. Node 1 is
/// the worker; node 2, the gateway, bootstraps from node 0, so it rejoins
/// the mesh after its restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_cannot_spend_and_api_keys_hold_their_caps() -> anyhow::Result<()> {
    let mut net = Testnet::spawn(TestnetConfig::new(3, 1)?)
        .await
        .context("testnet did not start")?;
    let gw = 2;
    ensure!(!net.nodes[gw].worker, "node {gw} should be a gateway");
    let url = format!("{}/v1/chat/completions", net.nodes[gw].api_url);
    let body = json!({
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "temperature": 0,
    })
    .to_string();

    // What the audit reproduced: served and charged before the fix.
    let r = net
        .client()
        .post(&url)
        .header("Content-Type", "text/plain")
        .header("Origin", "https://evil.example")
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 403);
    let r = net
        .client()
        .post(&url)
        .header("Content-Type", "text/plain")
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 415);
    let p = payments(&net, gw).await?;
    assert_eq!(p["spent_nanoton"].as_u64(), Some(0), "{p}");
    assert_eq!(p["reserved_nanoton"].as_u64(), Some(0), "{p}");
    assert_eq!(
        p["lanes"].as_array().map(Vec::len),
        Some(0),
        "no lane opened: {p}"
    );

    // A key with a cap of 400 000 nanoTON a day. A job here costs about
    // 40 000 (its real prompt and 4 tokens at ×1) but holds its worst case
    // first: 67 prompt tokens (the byte bound) and 4 completion tokens at
    // the gateway's ×2 maximum, 158 000.
    const CAP: u64 = 400_000;
    net.kill(gw);
    let key = net
        .create_api_key(
            &net.nodes[gw].data_dir,
            "capped",
            &["--spend-cap", "0.0004"],
        )
        .await?;
    net.restart(gw).await?;
    net.wait_converged(Duration::from_secs(60)).await?;

    let mut paid = 0u64;
    let mut served = 0;
    let refusal = loop {
        let before = payments(&net, gw).await?["spent_nanoton"]
            .as_u64()
            .context("spent")?;
        let r = net
            .client()
            .post(&url)
            .bearer_auth(&key)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        let status = r.status().as_u16();
        let v: Value = r.json().await?;
        if status == 429 {
            // Refused before any money moved.
            let p = payments(&net, gw).await?;
            assert_eq!(p["spent_nanoton"].as_u64(), Some(before), "{p}");
            assert_eq!(p["reserved_nanoton"].as_u64(), Some(0), "{p}");
            break v;
        }
        ensure!(status == 200, "job {served}: HTTP {status}: {v}");
        paid += v["silk"]["cost_nanoton"].as_u64().context("cost")?;
        served += 1;
        ensure!(served < 20, "the cap never refused a job");
    };
    eprintln!("{served} jobs cost {paid} nanoTON before the cap refused: {refusal}");
    assert_eq!(refusal["error"]["code"], "insufficient_quota", "{refusal}");
    assert!(served >= 2, "only {served} jobs before the cap");
    assert!(paid <= CAP, "the key spent {paid} of a {CAP} cap");
    let spent = payments(&net, gw).await?["spent_nanoton"]
        .as_u64()
        .context("spent")?;
    assert_eq!(spent, paid, "the gateway paid for exactly the key's jobs");

    // The key's tally is durable: after a crash it reads what was paid.
    net.kill(gw);
    let out = tokio::process::Command::new(&net.config().silk_bin)
        .arg("--data-dir")
        .arg(&net.nodes[gw].data_dir)
        .args(["api-key", "list"])
        .output()
        .await?;
    let list = String::from_utf8(out.stdout)?;
    let expected = format!("({paid} nanoTON)");
    assert!(list.contains(&expected), "{list:?} should say {expected:?}");
    Ok(())
}

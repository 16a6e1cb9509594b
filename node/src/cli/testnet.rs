//! `silk testnet`: a local mesh of `silk run` processes (see `silk-testnet`).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use silk_chain::Coins;
use silk_testnet::{models_in, stream_chat, Testnet, TestnetConfig};

/// Arguments of `silk testnet`.
#[derive(Debug, Args)]
pub struct TestnetArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// How many of them serve the default model.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Send one chat request through a non-worker node, print the answer and exit.
    #[arg(long)]
    pub demo: bool,
    /// No devnet: nodes neither pay nor charge for jobs.
    #[arg(long)]
    pub free: bool,
}

/// Runs `silk testnet`.
pub fn run(args: TestnetArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let (models_dir, model) = models_in(data_dir)?;
    let config = TestnetConfig {
        silk_bin: std::env::current_exe()?,
        models_dir,
        model,
        payments: !args.free,
        ..TestnetConfig::new_without_model(args.nodes, args.workers)
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        eprintln!("starting {} nodes ({} workers)…", args.nodes, args.workers);
        let mut net = tokio::select! {
            r = Testnet::spawn(config) => r?,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        };
        println!("insecure workers are allowed on every node: outside TDX, worker operators can read prompts");
        match &net.devnet {
            Some(d) => println!(
                "devnet: {} (the real settlement contract in a local TVM); every node's wallet got {} TON",
                d.url,
                net.config().fund_ton
            ),
            None => println!("no devnet (--free): jobs are not charged"),
        }
        for n in &net.nodes {
            println!(
                "node {}: {}  peer {}{}",
                n.index,
                n.api_url,
                n.peer_id,
                if n.worker { "  (worker)" } else { "" }
            );
        }
        if args.demo {
            let gw = net.gateway().unwrap_or(0);
            let url = net.nodes[gw].api_url.clone();
            println!("\nasking node {gw} ({url}): \"What is the capital of France?\"\n");
            let body = json!({
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 48,
                "temperature": 0,
            });
            let answer = stream_chat(
                net.client(),
                &url,
                body,
                |_| {},
                |t| {
                    print!("{t}");
                    let _ = std::io::stdout().flush();
                },
            )
            .await?;
            println!();
            if let Some(e) = answer.error {
                anyhow::bail!("the demo request failed (HTTP {}): {e}", answer.status);
            }
            let worker = answer.worker.clone().unwrap_or_default();
            println!(
                "\nserved by worker {worker} (attestation: {})",
                answer.attestation.unwrap_or_default()
            );
            if net.devnet.is_some() {
                print_settlement(&mut net, gw, &worker, &answer.events).await?;
            }
            return anyhow::Ok(());
        }
        println!("\nCtrl-C stops every node.");
        tokio::signal::ctrl_c().await?;
        drop(net);
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Prints what the demo job cost, waits (up to 30 s) until the worker has
/// redeemed its cheque on the devnet, and prints every node's on-chain
/// balances.
async fn print_settlement(
    net: &mut Testnet,
    gateway: usize,
    worker: &str,
    events: &[Value],
) -> anyhow::Result<()> {
    let cost = events
        .iter()
        .rev()
        .find_map(|e| e["silk"]["cost_nanoton"].as_u64())
        .context("the final chunk carries no silk.cost_nanoton")?;
    println!(
        "cost: {cost} nanoTON ({} TON), paid with a cheque on node {gateway}'s lane to the worker",
        Coins(u128::from(cost))
    );
    let w = net
        .nodes
        .iter()
        .position(|n| n.peer_id == worker)
        .context("the serving worker is not a testnet node")?;
    let worker_url = net.nodes[w].api_url.clone();
    let start = Instant::now();
    let redeemed = loop {
        let mesh = net.get_json(&format!("{worker_url}/v1/mesh")).await?;
        let redeemed = mesh["payments"]["redeemed_nanoton"].as_u64().unwrap_or(0);
        if redeemed >= cost || start.elapsed() > Duration::from_secs(30) {
            break redeemed;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "worker {w} redeemed {} TON on chain{}",
        Coins(u128::from(redeemed)),
        if redeemed >= cost {
            String::new()
        } else {
            " (not yet: redemption waits for its threshold)".into()
        }
    );
    println!("\non-chain balances (devnet):");
    for i in 0..net.nodes.len() {
        let mesh = net
            .get_json(&format!("{}/v1/mesh", net.nodes[i].api_url))
            .await?;
        let p = &mesh["payments"];
        let (Some(wallet), Some(contract)) = (p["wallet"].as_str(), p["contract"].as_str()) else {
            continue;
        };
        let wallet_balance = net.devnet_balance(wallet).await?;
        let contract_balance = net.devnet_balance(contract).await?;
        let contract = if contract_balance > 0 {
            format!(", settlement contract {} TON", Coins(contract_balance))
        } else {
            String::new()
        };
        println!(
            "  node {i}{}: wallet {} TON{contract} (funded with {} TON; gas is paid from the wallet)",
            if net.nodes[i].worker { " (worker)" } else { "" },
            Coins(wallet_balance),
            net.config().fund_ton,
        );
    }
    Ok(())
}

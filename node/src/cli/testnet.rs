//! `silk testnet`: a local mesh of `silk run` processes (see `silk-testnet`).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use serde_json::json;
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
}

/// Runs `silk testnet`.
pub fn run(args: TestnetArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let (models_dir, model) = models_in(data_dir)?;
    let config = TestnetConfig {
        silk_bin: std::env::current_exe()?,
        models_dir,
        model,
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
            println!(
                "\nserved by worker {} (attestation: {})",
                answer.worker.unwrap_or_default(),
                answer.attestation.unwrap_or_default()
            );
            return anyhow::Ok(());
        }
        println!("\nCtrl-C stops every node.");
        tokio::signal::ctrl_c().await?;
        drop(net);
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

//! `silk run`: one node process (overlay, engine on workers, HTTP API).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use silk_inference::backend::Device;
use silk_inference::Precision;
use silk_overlay::Multiaddr;

use crate::billing::Billing;
use crate::cli::wallet::LedgerArgs;
use crate::config::NodeConfig;
use crate::node::{Node, NodeOptions};
use crate::payments::{load_or_create_keys, Payments};

/// Arguments of `silk run`; each overrides `config.toml`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Serve a model on this node.
    #[arg(long)]
    pub worker: bool,
    /// Model to serve (name from `silk model list` or a path).
    #[arg(long)]
    pub model: Option<String>,
    /// Directory with models (default `<data-dir>/models`).
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// libp2p listen multiaddr (repeatable).
    #[arg(long)]
    pub listen: Vec<String>,
    /// Bootstrap multiaddr ending in /p2p/<peer id> (repeatable).
    #[arg(long)]
    pub bootstrap: Vec<String>,
    /// HTTP API address.
    #[arg(long)]
    pub api: Option<String>,
    /// Route jobs to workers without TDX attestation (they can read prompts).
    #[arg(long)]
    pub allow_insecure_workers: bool,
    /// TOML attestation policy for TDX workers (see docs/OPERATOR.md).
    #[arg(long)]
    pub attestation_policy: Option<std::path::PathBuf>,
    /// PCCS base URL for DCAP collateral (cached under the data directory).
    #[arg(long)]
    pub pccs_url: Option<String>,
    /// Compute device of the engine: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Float type of the engine's weights and activations: f32, or bf16
    /// (for GPUs: half the memory traffic; on the CPU it runs unpacked and
    /// slower).
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
    /// Faster gossip heartbeats and pings (local testnets).
    #[arg(long, hide = true)]
    pub fast_gossip: bool,
    /// Settle jobs on this ledger (overrides `[ledger]` in config.toml).
    #[command(flatten)]
    pub ledger: LedgerArgs,
}

fn parse_addrs(list: &[String]) -> anyhow::Result<Vec<Multiaddr>> {
    list.iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .with_context(|| format!("bad multiaddr `{a}`"))
        })
        .collect()
}

/// Runs `silk run` until Ctrl-C.
pub fn run(args: RunArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let mut config = NodeConfig::load_or_default(data_dir)?;
    if args.worker {
        config.worker = true;
    }
    if let Some(m) = args.model {
        config.model = m;
    }
    if let Some(d) = args.models_dir {
        config.models_dir = Some(d);
    }
    if !args.listen.is_empty() {
        config.listen = args.listen;
    }
    if !args.bootstrap.is_empty() {
        config.bootstrap = args.bootstrap;
    }
    if let Some(a) = args.api {
        config.api = a;
    }
    if args.allow_insecure_workers {
        config.allow_insecure_workers = true;
    }
    if args.ledger.given() {
        config.ledger = Some(args.ledger.section(&config));
    }
    let payments = config.payments();
    let runtime = tokio::runtime::Runtime::new()?;
    let billing = match &config.ledger {
        Some(section) => {
            let (keys, created) = load_or_create_keys(data_dir)?;
            if created {
                println!(
                    "created a wallet; its mnemonic is in {}",
                    data_dir.join(crate::payments::MNEMONIC_FILE).display()
                );
            }
            let p = runtime.block_on(Payments::open(
                data_dir,
                payments.clone(),
                section.connect()?,
                keys,
            ))?;
            let stale = p.release_stale_reservations()?;
            if stale > 0 {
                println!("released {stale} reservations of jobs a restart interrupted");
            }
            Some(std::sync::Arc::new(Billing::new(p)))
        }
        None => None,
    };
    let options = NodeOptions {
        data_dir: data_dir.to_path_buf(),
        listen: parse_addrs(&config.listen)?,
        bootstrap: parse_addrs(&config.bootstrap)?,
        worker_model: config.worker.then(|| config.model.clone()),
        models_dir: config.models_dir(data_dir),
        device: args.device,
        dtype: args.dtype,
        allow_insecure_workers: config.allow_insecure_workers,
        price_coefficient_milli: u64::from(payments.coefficient_milli),
        default_max_coefficient_milli: payments.default_max_coefficient_milli,
        billing: billing.clone(),
        max_jobs_per_worker: config.max_jobs_per_worker,
        queue: crate::gateway::queue::QueueConfig {
            limit: config.queue_limit,
            timeout: std::time::Duration::from_secs(config.queue_timeout_s),
        },
        mdns: config.mdns,
        nat: crate::node::NatOptions {
            relay_server: config.relay_server,
            relay_limits: config.relay_limits().map_err(anyhow::Error::msg)?,
            relays: parse_addrs(&config.relays)?,
            private_network: config.private_network,
        },
        min_peers: config.min_peers,
        max_peers: config.max_peers,
        fast_gossip: args.fast_gossip,
        attestation_policy: args.attestation_policy.clone(),
        pccs_url: args.pccs_url.clone(),
        job_progress_timeout: crate::gateway::JOB_PROGRESS_TIMEOUT,
        pinned_models: {
            // The operator's first: a request naming no model goes there.
            let mut pinned = config.pinned_models.clone();
            pinned.extend(crate::gateway::default_pinned_models());
            pinned
        },
    };
    // Opened before the node starts: a second node on this data directory
    // fails here, and `silk api-key` says the store is in use.
    let keys = crate::api::keys::ApiKeys::open(&data_dir.join(crate::api::keys::KEYS_FILE))?;
    let key_count = keys.list()?.iter().filter(|k| !k.key.revoked).count();
    runtime.block_on(async move {
        let node = Node::start(options).await?;
        let cancel = node.cancellation();
        let api = crate::api::ApiOptions {
            addr: config.api.clone(),
            http: config.http(),
            keys,
        };
        let (addr, server) = crate::api::serve(node.clone(), api, cancel.clone()).await?;
        let listen = node.overlay().listen_addrs().await.unwrap_or_default();
        println!("peer id: {}", node.peer_id());
        for a in &listen {
            println!("listening on {a}/p2p/{}", node.peer_id());
        }
        if let Some(m) = node.served_model() {
            println!("serving {} (attestation: {})", m.id, mode(&node));
        }
        match &billing {
            Some(b) => println!(
                "payments: wallet {} contract {} ({} ledger)",
                b.payout(),
                b.payments().client_contract(),
                config
                    .ledger
                    .as_ref()
                    .and_then(|l| l.kind.as_deref())
                    .unwrap_or("devnet"),
            ),
            None => println!(
                "payments: off (no [ledger] in config.toml): this node neither pays nor charges"
            ),
        }
        if config.allow_insecure_workers {
            println!("insecure workers allowed: their operators can read prompts");
        }
        println!("api: http://{addr}");
        if crate::api::guard::key_required(addr.ip()) {
            let active = key_count;
            println!(
                "api keys: required on every request (this address is not loopback); {active} active{}",
                if active == 0 { ": create one with `silk api-key create --name NAME`" } else { "" }
            );
        }
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            () = cancel.cancelled() => {}
        }
        // Tasks that move money (a redemption pass, a cheque being stored)
        // finish before the process exits.
        let (_, _) = tokio::join!(
            node.shutdown_and_wait(std::time::Duration::from_secs(10)),
            tokio::time::timeout(std::time::Duration::from_secs(3), server)
        );
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn mode(node: &Node) -> &'static str {
    match node.attestation_mode() {
        silk_overlay::AttestationMode::Tdx => "tdx",
        silk_overlay::AttestationMode::Insecure => "insecure",
    }
}

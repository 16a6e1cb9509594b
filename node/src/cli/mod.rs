//! The `silk` command line (clap derive). One subcommand module per
//! subsystem; this file only holds the top-level parser and dispatch.

pub mod api_key;
pub mod attest;
pub mod bench;
pub mod bench_burst;
pub mod bench_fidelity;
pub mod bench_mesh;
pub mod client;
pub mod infer;
pub mod init;
pub mod mesh_shard;
pub mod model;
pub mod run;
pub mod service;
pub mod testnet;
pub mod wallet;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable text with the fields of the enclosing spans.
    Human,
    /// One JSON object a line: `timestamp`, `level`, `fields`, `target`,
    /// and `spans` (the request's `id`, a job's `gateway` and `job`, an
    /// attempt's `worker`).
    Json,
}

/// silk: confidential AI inference on a peer-to-peer network of GPUs.
#[derive(Debug, Parser)]
#[command(name = "silk", version, about)]
pub struct Cli {
    /// Data directory (identity key, caches, store). Default: ~/.silk
    #[arg(long, global = true, env = "SILK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// How log lines (stderr; `RUST_LOG` picks which) are written: `human`,
    /// or `json`, one object a line with the request's or job's fields, for
    /// log shippers.
    #[arg(long, global = true, env = "SILK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// TDX attestation: show this node's claims, verify quotes.
    #[command(subcommand)]
    Attest(attest::AttestCommand),
    /// Run one prompt through the local inference engine.
    Infer(infer::InferArgs),
    /// Manage local models: fetch the default model, list installed ones.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Benchmarks that print a table with a reference measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Create the identity key and config.toml in the data directory.
    Init(init::InitArgs),
    /// Run a node: overlay, HTTP API, and (with --worker) the engine.
    Run(run::RunArgs),
    /// Start a local mesh of N nodes (K workers on the default model).
    Testnet(testnet::TestnetArgs),
    /// Show a node's peers, RTTs, known workers and their load.
    Status(client::StatusArgs),
    /// Send one prompt to a node's API and stream the answer.
    Submit(client::SubmitArgs),
    /// Chat interactively through a node's API.
    Chat(client::ChatArgs),
    /// The node's TON wallet and settlement contract: address, balance,
    /// deposit, lanes, open-lane, redeem, withdraw.
    Wallet(wallet::WalletArgs),
    /// Run a local TON devnet (the real settlement contract in a TVM) for
    /// testnets, or mint to an address from its faucet.
    Devnet(wallet::DevnetArgs),
    /// API keys for this node's HTTP API: create, list, revoke.
    #[command(subcommand, name = "api-key")]
    ApiKey(api_key::ApiKeyCommand),
    /// Run the node as a systemd service: `silk service install [--user]`.
    #[command(subcommand)]
    Service(service::ServiceCommand),
}

impl Cli {
    /// The data directory: `--data-dir`, else `~/.silk`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".silk")
        })
    }
}

/// Parses the command line, sets up logging (`RUST_LOG`, default `warn`)
/// and runs the command.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().with_span_list(true).init(),
    }
    let data_dir = cli.data_dir();
    match cli.command {
        Command::Attest(cmd) => attest::run(cmd, &data_dir),
        Command::Infer(args) => infer::run(args, &data_dir),
        Command::Model(cmd) => model::run(cmd, &data_dir),
        Command::Bench(cmd) => bench::run(cmd, &data_dir),
        Command::Wallet(args) => wallet::run(args, &data_dir),
        Command::Devnet(args) => wallet::run_devnet(args),
        Command::Init(args) => init::run(args, &data_dir),
        Command::Run(args) => run::run(args, &data_dir),
        Command::Testnet(args) => testnet::run(args, &data_dir),
        Command::Status(args) => client::status(args),
        Command::Submit(args) => client::submit(args),
        Command::Chat(args) => client::chat(args),
        Command::ApiKey(cmd) => api_key::run(cmd, &data_dir),
        Command::Service(cmd) => service::run(cmd, &data_dir),
    }
}

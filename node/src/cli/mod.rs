//! The `silk` command line (clap derive). One subcommand module per
//! subsystem; this file only holds the top-level parser and dispatch.

pub mod attest;
pub mod bench;
pub mod infer;
pub mod model;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// silk: confidential AI inference on a peer-to-peer network of GPUs.
#[derive(Debug, Parser)]
#[command(name = "silk", version, about)]
pub struct Cli {
    /// Data directory (identity key, caches, store). Default: ~/.silk
    #[arg(long, global = true, env = "SILK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let data_dir = cli.data_dir();
    match cli.command {
        Command::Attest(cmd) => attest::run(cmd, &data_dir),
        Command::Infer(args) => infer::run(args, &data_dir),
        Command::Model(cmd) => model::run(cmd, &data_dir),
        Command::Bench(cmd) => bench::run(cmd, &data_dir),
    }
}

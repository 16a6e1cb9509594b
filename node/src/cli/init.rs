//! `silk init`: create the identity key and `config.toml`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::attest::{identity::identity_path, NodeIdentity};
use crate::config::NodeConfig;

/// Arguments of `silk init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Make this node a worker in the config.
    #[arg(long)]
    pub worker: bool,
    /// Overwrite an existing config.toml.
    #[arg(long)]
    pub force: bool,
}

/// Runs `silk init`.
pub fn run(args: InitArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let tdx = crate::attest::TsmReport::default().is_available();
    let identity = NodeIdentity::for_start(&identity_path(data_dir), tdx)
        .context("creating the identity key")?;
    let keypair = silk_overlay::keypair_from_secret(&identity.secret_bytes())
        .context("identity key is not a valid ed25519 secret")?;
    let path = NodeConfig::path(data_dir);
    if path.exists() && !args.force {
        println!("{} exists (pass --force to overwrite)", path.display());
    } else {
        let config = NodeConfig {
            worker: args.worker,
            ..NodeConfig::default()
        };
        config.save(data_dir)?;
        println!("wrote {}", path.display());
    }
    if tdx {
        println!("peer id: a new one at each start (TDX)");
        println!("identity: made inside the trust domain at each start, never stored");
    } else {
        println!("peer id: {}", keypair.public().to_peer_id());
        println!("identity: {}", identity_path(data_dir).display());
    }
    Ok(ExitCode::SUCCESS)
}

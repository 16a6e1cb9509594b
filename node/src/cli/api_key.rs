//! `silk api-key`: the keys callers send as `Authorization: Bearer` to this
//! node's API (required on every bind that is not loopback). Keys live in
//! `<data-dir>/api.redb`, hashed; a running node holds that file, so stop
//! it to change keys.

use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use silk_chain::Coins;

use crate::api::keys::{ApiKeys, KeyLimits, KEYS_FILE};

/// `silk api-key` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key. The key is printed once, alone on stdout, and never stored.
    Create(CreateArgs),
    /// List the keys with what each spent today (UTC).
    List,
    /// Revoke a key by id or name.
    Revoke {
        /// The key's id (the part after `sk-silk-` and before the `.`) or its name.
        id_or_name: String,
    },
}

/// Arguments of `silk api-key create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A name for the key (letters, digits, `-`, `_`, `.`).
    #[arg(long)]
    pub name: String,
    /// Most TON the key's requests may cost per UTC day, e.g. `0.5`.
    #[arg(long, value_name = "TON")]
    pub spend_cap: Option<Coins>,
    /// Most requests per minute.
    #[arg(long, value_name = "N")]
    pub rate: Option<u32>,
}

/// Runs `silk api-key`.
pub fn run(cmd: ApiKeyCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let keys = ApiKeys::open(&data_dir.join(KEYS_FILE))?;
    match cmd {
        ApiKeyCommand::Create(args) => {
            let limits = KeyLimits {
                spend_cap_per_day: args.spend_cap,
                rate_per_min: args.rate,
            };
            let (key, secret) = keys.create(&args.name, limits)?;
            println!("{secret}");
            eprintln!(
                "created API key `{}` (id {}; {}; {}). It is shown this once: keep it; \
                 callers send it as `Authorization: Bearer <key>` (the OpenAI clients' api_key).",
                key.name,
                key.id,
                describe_cap(key.spend_cap_nano_per_day),
                describe_rate(key.rate_per_min),
            );
        }
        ApiKeyCommand::List => {
            let list = keys.list()?;
            if list.is_empty() {
                println!("no API keys: create one with `silk api-key create --name NAME`");
            }
            for u in list {
                println!(
                    "{}  {:<20} {:<8} spent today {} TON ({} nanoTON); {}; {}",
                    u.key.id,
                    u.key.name,
                    if u.key.revoked { "revoked" } else { "active" },
                    u.spent_today,
                    u.spent_today.nano(),
                    describe_cap(u.key.spend_cap_nano_per_day),
                    describe_rate(u.key.rate_per_min),
                );
            }
        }
        ApiKeyCommand::Revoke { id_or_name } => {
            let key = keys.revoke(&id_or_name)?;
            println!("revoked API key `{}` (id {})", key.name, key.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_cap(cap: Option<u64>) -> String {
    match cap {
        Some(n) => format!("cap {} TON a day", Coins(u128::from(n))),
        None => "no spend cap".into(),
    }
}

fn describe_rate(rate: Option<u32>) -> String {
    match rate {
        Some(n) => format!("{n} requests a minute"),
        None => "no rate limit".into(),
    }
}

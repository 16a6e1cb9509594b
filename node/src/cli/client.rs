//! `silk status`, `silk submit` and `silk chat`: clients of a node's HTTP API.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use silk_testnet::stream_chat;

/// Default API address of a local node.
const DEFAULT_API: &str = "http://127.0.0.1:8080";

/// Arguments of `silk status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node's API.
    #[arg(long, default_value = DEFAULT_API)]
    pub api: String,
    /// API key, sent as `Authorization: Bearer` (needed by nodes whose API
    /// is not on loopback; see `silk api-key`).
    #[arg(long, env = "SILK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the raw `/v1/mesh` JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `silk submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The node's API.
    #[arg(long, default_value = DEFAULT_API)]
    pub api: String,
    /// API key, sent as `Authorization: Bearer` (needed by nodes whose API
    /// is not on loopback; see `silk api-key`).
    #[arg(long, env = "SILK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// Model id or name (default: the pinned model, see docs/OPERATOR.md).
    #[arg(long)]
    pub model: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Print the whole JSON response instead of streaming the text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `silk chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The node's API.
    #[arg(long, default_value = DEFAULT_API)]
    pub api: String,
    /// API key, sent as `Authorization: Bearer` (needed by nodes whose API
    /// is not on loopback; see `silk api-key`).
    #[arg(long, env = "SILK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model id or name (default: the pinned model, see docs/OPERATOR.md).
    #[arg(long)]
    pub model: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
}

/// An HTTP client that sends `key` with every request.
fn http_client(key: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = key {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key has characters a header cannot carry")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn base(api: &str) -> String {
    let api = api.trim_end_matches('/');
    if api.starts_with("http://") || api.starts_with("https://") {
        api.to_string()
    } else {
        format!("http://{api}")
    }
}

/// Runs `silk status`.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let url = format!("{}/v1/mesh", base(&args.api));
    let client = http_client(args.api_key.as_deref())?;
    let mesh: Value = runtime()?.block_on(async {
        let r = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("no node answers at {url}: is `silk run` running?"))?;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "HTTP {status}: {}",
                body["error"]["message"]
                    .as_str()
                    .unwrap_or("no error message")
            );
        }
        anyhow::Ok(body)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&mesh)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("peer id:      {}", mesh["peer_id"].as_str().unwrap_or("?"));
    println!(
        "attestation:  {}",
        mesh["attestation"].as_str().unwrap_or("?")
    );
    println!(
        "insecure workers allowed: {}",
        mesh["allow_insecure_workers"].as_bool().unwrap_or(false)
    );
    match mesh["worker"].get("model").and_then(Value::as_str) {
        Some(m) => println!("serving:      {m}"),
        None => println!("serving:      nothing (gateway only)"),
    }
    for a in mesh["listen_addrs"].as_array().into_iter().flatten() {
        println!("listening:    {}", a.as_str().unwrap_or("?"));
    }
    let peers = mesh["peers"].as_array().cloned().unwrap_or_default();
    println!("\npeers ({}):", peers.len());
    for p in &peers {
        println!(
            "  {}  rtt {}",
            p["peer_id"].as_str().unwrap_or("?"),
            p["rtt_ms"]
                .as_f64()
                .map(|r| format!("{r:.2} ms"))
                .unwrap_or_else(|| "?".into())
        );
    }
    let workers = mesh["workers"].as_array().cloned().unwrap_or_default();
    println!("\nworkers ({}):", workers.len());
    for w in &workers {
        println!(
            "  {}  {}  free {}  queue {}  {:.1} tok/s  price ×{:.3}  attestation {}  rtt {}",
            w["peer_id"].as_str().unwrap_or("?"),
            w["models"][0].as_str().unwrap_or("?"),
            w["free_slots"],
            w["queue_depth"],
            w["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            w["price_coefficient_milli"].as_f64().unwrap_or(0.0) / 1000.0,
            w["attestation"].as_str().unwrap_or("?"),
            w["rtt_ms"]
                .as_f64()
                .map(|r| format!("{r:.2} ms"))
                .unwrap_or_else(|| "?".into())
        );
    }
    print_payments(&mesh["payments"]);
    Ok(ExitCode::SUCCESS)
}

fn print_payments(p: &Value) {
    if p.is_null() {
        println!("\npayments:     off (no ledger configured)");
        return;
    }
    let ton = |v: &Value| {
        v.as_u64()
            .map(|n| silk_chain::Coins(u128::from(n)).to_string())
            .or_else(|| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "?".into())
    };
    println!("\npayments:");
    println!("  wallet      {}", p["wallet"].as_str().unwrap_or("?"));
    println!("  contract    {}", p["contract"].as_str().unwrap_or("?"));
    println!(
        "  spending    {} TON signed in cheques, {} TON reserved for jobs in flight",
        ton(&p["spent_nanoton"]),
        ton(&p["reserved_nanoton"])
    );
    for l in p["lanes"].as_array().into_iter().flatten() {
        println!(
            "    lane {} to {}: {} TON deposited, {} TON signed",
            l["lane_id"],
            l["worker"].as_str().unwrap_or("?"),
            ton(&l["deposited_nanoton"]),
            ton(&l["signed_nanoton"])
        );
    }
    println!(
        "  earnings    {} TON in cheques, {} TON redeemed, {} TON of work not covered",
        ton(&p["earned_nanoton"]),
        ton(&p["redeemed_nanoton"]),
        ton(&p["uncovered_nanoton"])
    );
}

/// Runs `silk submit`.
pub fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let url = base(&args.api);
    let mut body = json!({
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
    });
    if let Some(m) = &args.model {
        body["model"] = json!(m);
    }
    runtime()?.block_on(async {
        let client = http_client(args.api_key.as_deref())?;
        if args.json {
            let r = client
                .post(format!("{url}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .with_context(|| format!("no node answers at {url}"))?;
            let status = r.status();
            let v: Value = r.json().await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            if !status.is_success() {
                bail!("HTTP {status}");
            }
            return Ok(());
        }
        let out = stream_chat(
            &client,
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
        if let Some(e) = out.error {
            bail!("request failed (HTTP {}): {e}", out.status);
        }
        eprintln!(
            "[worker {} · attestation {}]",
            out.worker.unwrap_or_default(),
            out.attestation.unwrap_or_default()
        );
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `silk chat`: an interactive conversation, streamed.
pub fn chat(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let url = base(&args.api);
    let rt = runtime()?;
    let client = http_client(args.api_key.as_deref())?;
    let mut messages: Vec<Value> = Vec::new();
    let stdin = std::io::stdin();
    eprintln!("chatting through {url}; an empty line or Ctrl-D ends");
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(json!({"role": "user", "content": line.trim()}));
        let mut body = json!({ "messages": messages, "max_tokens": args.max_tokens });
        if let Some(m) = &args.model {
            body["model"] = json!(m);
        }
        let out = rt.block_on(stream_chat(
            &client,
            &url,
            body,
            |_| {},
            |t| {
                print!("{t}");
                let _ = std::io::stdout().flush();
            },
        ))?;
        println!();
        match out.error {
            Some(e) => {
                eprintln!("error (HTTP {}): {e}", out.status);
                messages.pop();
            }
            None => {
                eprintln!(
                    "[worker {} · attestation {}]",
                    out.worker.unwrap_or_default(),
                    out.attestation.unwrap_or_default()
                );
                messages.push(json!({"role": "assistant", "content": out.text}));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

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
    /// Print the raw `/v1/status` JSON.
    #[arg(long)]
    pub json: bool,
    /// How many recent jobs to list.
    #[arg(long, default_value_t = 10)]
    pub jobs: usize,
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

/// Runs `silk status`: reads the node's `/v1/status` (what its dashboard
/// shows) and prints it as tables.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let url = format!("{}/v1/status?jobs={}", base(&args.api), args.jobs);
    let client = http_client(args.api_key.as_deref())?;
    let status: Value = runtime()?.block_on(async {
        let r = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("no node answers at {url}: is `silk run` running?"))?;
        let code = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !code.is_success() {
            bail!(
                "HTTP {code}: {}",
                body["error"]["message"]
                    .as_str()
                    .unwrap_or("no error message")
            );
        }
        anyhow::Ok(body)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", status_tables(&status));
    Ok(ExitCode::SUCCESS)
}

/// nanoTON (a JSON number, or a string past u64) as TON.
fn ton(v: &Value) -> String {
    v.as_u64()
        .map(|n| silk_chain::Coins(u128::from(n)).to_string())
        .or_else(|| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "–".into())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "–".into(),
        other => other.to_string(),
    }
}

/// `name@sha256:<64 hex>` as `name@sha256:<first 8>…`.
fn short_model(id: &str) -> String {
    match id.find("@sha256:") {
        Some(at) if id.len() > at + 16 => format!("{}…", &id[..at + 16]),
        _ => id.to_string(),
    }
}

fn fixed(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    t
}

/// `/v1/status` as the tables `silk status` prints.
fn status_tables(s: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let n = &s["node"];
    let mut node = table(&["node", ""]);
    node.add_row(vec!["peer id".into(), text(&n["peer_id"])]);
    node.add_row(vec!["version".into(), text(&n["version"])]);
    node.add_row(vec![
        "uptime".into(),
        n["uptime_s"]
            .as_u64()
            .map(|t| format!("{}h {:02}m {:02}s", t / 3600, t / 60 % 60, t % 60))
            .unwrap_or_else(|| "–".into()),
    ]);
    node.add_row(vec!["attestation".into(), text(&n["attestation_words"])]);
    node.add_row(vec![
        "serving".into(),
        match n["worker"]["model"].as_str() {
            Some(m) => m.to_string(),
            None => "nothing (gateway only)".into(),
        },
    ]);
    if !n["wallet"].is_null() {
        node.add_row(vec!["wallet".into(), text(&n["wallet"])]);
        node.add_row(vec!["contract".into(), text(&n["contract"])]);
    }
    let _ = writeln!(out, "{node}");

    let mut money = table(&["money", "TON"]);
    let b = &s["balances"];
    if let Some(e) = b["error"].as_str() {
        money.add_row(vec!["balances".into(), format!("unavailable: {e}")]);
    } else if !b.is_null() {
        money.add_row(vec!["wallet balance".into(), ton(&b["wallet_nanoton"])]);
        money.add_row(vec!["contract balance".into(), ton(&b["contract_nanoton"])]);
        money.add_row(vec!["in open lanes".into(), ton(&b["committed_nanoton"])]);
    }
    let m = &s["money"];
    if m.is_null() {
        money.add_row(vec!["payments", "off on this node"]);
    } else {
        money.add_row(vec!["earned".into(), ton(&m["earned"])]);
        money.add_row(vec!["redeemed".into(), ton(&m["redeemed"])]);
        money.add_row(vec!["spent".into(), ton(&m["charged"])]);
        money.add_row(vec!["reserved now".into(), ton(&m["reserved"])]);
        let points = s["series"]["points"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let sum = |k: &str| -> u64 { points.iter().filter_map(|p| p[k].as_u64()).sum() };
        let span = text(&s["series"]["span"]);
        money.add_row(vec![
            format!("earned, last {span}"),
            ton(&json!(sum("earned_nanoton"))),
        ]);
        money.add_row(vec![
            format!("spent, last {span}"),
            ton(&json!(sum("charged_nanoton"))),
        ]);
    }
    let _ = writeln!(out, "{money}");

    let mut jobs = table(&["jobs", "outcome", "count"]);
    for role in ["gateway", "worker"] {
        let counts = s["jobs"][role].as_object().cloned().unwrap_or_default();
        if counts.is_empty() {
            jobs.add_row(vec![role.to_string(), "–".into(), "0".into()]);
        }
        for (outcome, count) in counts {
            jobs.add_row(vec![role.to_string(), outcome, text(&count)]);
        }
    }
    let _ = writeln!(out, "{jobs}");

    let e = &s["engine"];
    let mut engine = table(&["engine", ""]);
    if e.is_null() {
        engine.add_row(vec!["engine", "none (gateway only)"]);
    } else {
        engine.add_row(vec![
            "batch in use".into(),
            format!("{} of {}", text(&e["batch_in_use"]), text(&e["batch_size"])),
        ]);
        engine.add_row(vec!["queued".into(), text(&e["queued"])]);
        engine.add_row(vec![
            "decode".into(),
            format!("{} tok/s", fixed(&e["decode_tokens_per_s"], 1)),
        ]);
        engine.add_row(vec![
            "prefix cache".into(),
            format!(
                "{:.1} MiB, {} prompt tokens reused",
                e["prefix_cache_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
                text(&e["cached_prompt_tokens"])
            ),
        ]);
    }
    engine.add_row(vec!["gateway queue".into(), text(&s["gateway_queue"])]);
    let _ = writeln!(out, "{engine}");

    let mut recent = table(&[
        "recent jobs",
        "role",
        "model",
        "peer",
        "tokens",
        "first token",
        "tok/s",
        "cost TON",
        "outcome",
    ]);
    for j in s["recent_jobs"].as_array().into_iter().flatten() {
        let ended = j["at_ms"]
            .as_u64()
            .and_then(|ms| chrono::DateTime::from_timestamp_millis(i64::try_from(ms).ok()?))
            .map(|t| t.format("%H:%M:%S").to_string())
            .unwrap_or_else(|| "–".into());
        recent.add_row(vec![
            ended,
            text(&j["role"]),
            short_model(&text(&j["model"])),
            text(&j["peer"]),
            format!(
                "{} + {}",
                text(&j["prompt_tokens"]),
                text(&j["completion_tokens"])
            ),
            j["first_token_ms"]
                .as_u64()
                .map(|t| format!("{t} ms"))
                .unwrap_or_else(|| "–".into()),
            fixed(&j["tokens_per_s"], 1),
            if j["cost_nanoton"].is_null() {
                "–".into()
            } else {
                ton(&j["cost_nanoton"])
            },
            text(&j["outcome"]),
        ]);
    }
    let _ = writeln!(out, "{recent}");

    let mut workers = table(&[
        "worker",
        "model",
        "load",
        "decode tok/s",
        "price ×",
        "reputation",
        "attestation",
        "RTT ms",
    ]);
    for w in s["mesh"]["workers"].as_array().into_iter().flatten() {
        let rtt = if w["rtt_ms"].is_null() && !w["estimated_rtt_ms"].is_null() {
            format!("≈{}", fixed(&w["estimated_rtt_ms"], 1))
        } else {
            fixed(&w["rtt_ms"], 1)
        };
        workers.add_row(vec![
            format!(
                "{}{}",
                text(&w["peer_id"]),
                if w["local"].as_bool() == Some(true) {
                    " (this node)"
                } else {
                    ""
                }
            ),
            w["models"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .map(|m| short_model(&text(m)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
            format!(
                "{} free, {} queued",
                text(&w["free_slots"]),
                text(&w["queue_depth"])
            ),
            fixed(&w["decode_tokens_per_s"], 1),
            w["price_coefficient_milli"]
                .as_f64()
                .map(|p| format!("{:.3}", p / 1000.0))
                .unwrap_or_else(|| "–".into()),
            fixed(&w["reputation"], 2),
            text(&w["attestation"]),
            rtt,
        ]);
    }
    let _ = writeln!(out, "{workers}");

    let mut peers = table(&["peer", "RTT ms", "agent"]);
    for p in s["mesh"]["peers"].as_array().into_iter().flatten() {
        peers.add_row(vec![
            text(&p["peer_id"]),
            fixed(&p["rtt_ms"], 2),
            text(&p["agent_version"]),
        ]);
    }
    let _ = writeln!(out, "{peers}");
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_tables_show_the_status_numbers() {
        let status = json!({
            "node": {"peer_id": "12D3KooWPeer", "version": "0.1.0", "uptime_s": 3725,
                     "attestation_words": "insecure: no TDX", "worker": null,
                     "wallet": "EQWallet", "contract": "EQContract"},
            "balances": {"error": "the chain did not answer within 3 s"},
            "money": {"earned": 201000, "redeemed": 0, "charged": 1500000000, "reserved": 7},
            "jobs": {"gateway": {"ok": 3, "workers_saturated": 1}, "worker": {}},
            "engine": null,
            "gateway_queue": 2,
            "recent_jobs": [{"at_ms": 0, "role": "gateway",
                             "model": format!("SmolLM2@sha256:{}", "ab".repeat(32)),
                             "peer": "12D3KooWWorker", "prompt_tokens": 30, "completion_tokens": 7,
                             "first_token_ms": 410, "duration_ms": 900, "tokens_per_s": 12.25,
                             "cost_nanoton": 56000, "outcome": "ok"}],
            "series": {"span": "hour", "points": [
                {"earned_nanoton": 1000, "charged_nanoton": 0},
                {"earned_nanoton": 200000, "charged_nanoton": 5}]},
            "mesh": {"workers": [], "peers": [{"peer_id": "12D3KooWWorker", "rtt_ms": 0.5, "agent_version": "silk/0.1.0"}]},
        });
        let out = status_tables(&status);
        for want in [
            "│ uptime      ┆ 1h 02m 05s",
            "│ balances          ┆ unavailable: the chain did not answer within 3 s",
            "│ earned            ┆ 0.000201 ",
            "│ spent             ┆ 1.5 ",
            "│ earned, last hour ┆ 0.000201 ",
            "│ gateway ┆ ok                ┆ 3 ",
            "│ gateway ┆ workers_saturated ┆ 1 ",
            "│ worker  ┆ –                 ┆ 0 ",
            "│ gateway queue ┆ 2 ",
            "SmolLM2@sha256:abababab… ┆",
            "┆ 30 + 7 ┆ 410 ms      ┆ 12.2  ┆ 0.000056 ┆ ok ",
            "│ 12D3KooWWorker ┆ 0.50   ┆ silk/0.1.0 │",
        ] {
            assert!(out.contains(want), "missing `{want}` in\n{out}");
        }
    }
}

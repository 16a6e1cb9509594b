//! `silk bench burst`: many streamed chat requests at once through one
//! gateway of a local testnet, and the time to first token across them.
//! More requests than the workers have slots wait in the gateway's queue
//! (issue 13's burst: 64 requests on 2 workers); with a shared system
//! prompt, the workers' engines compute it once per worker and the rest of
//! the burst copies it (the prefix cache and running-sequence sharing).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use silk_testnet::{models_in, stream_chat, NodeOptions, Testnet, TestnetConfig};

/// Arguments of `silk bench burst`.
#[derive(Debug, Args)]
pub struct BurstBenchArgs {
    /// Requests sent at once.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Workers serving the default model (one more node is the gateway).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: u32,
    /// Sizes of the system prompt every request of a burst shares, about
    /// this many tokens each (0: the template's own); one burst per size,
    /// each with a system prompt no earlier burst sent.
    #[arg(long, value_delimiter = ',', default_value = "0,1000")]
    pub system_prompt_tokens: Vec<usize>,
}

/// What one burst came to.
struct BurstRow {
    system_tokens: usize,
    served: usize,
    /// Seconds from the burst's start to each request's first token, sorted.
    ttft: Vec<f64>,
    /// Seconds until the last request ended.
    all_done: f64,
    prompt_tokens: u64,
    cached_tokens: u64,
}

/// A system prompt of about `tokens` tokens (SmolLM2's tokenizer makes
/// about 16 of each sentence), its first words told apart by `burst`.
fn system_prompt(tokens: usize, burst: usize) -> Option<String> {
    const SENTENCE: &str =
        "Answer as a careful travel agent would, briefly, and never invent a price. ";
    (tokens > 0).then(|| format!("Burst {burst}. {}", SENTENCE.repeat(tokens.div_ceil(16))))
}

/// The `usage` of a streamed answer's last chunk that has one.
fn usage_of(events: &[Value]) -> Option<&Value> {
    events.iter().rev().find_map(|e| e.get("usage"))
}

async fn burst(
    net: &Testnet,
    gateway: usize,
    args: &BurstBenchArgs,
    index: usize,
    system_tokens: usize,
) -> anyhow::Result<BurstRow> {
    let url = net.nodes[gateway].api_url.clone();
    let system = system_prompt(system_tokens, index);
    let started = Instant::now();
    let answers = futures::future::join_all((0..args.requests).map(|i| {
        let (client, url) = (net.client().clone(), url.clone());
        let mut messages = Vec::new();
        if let Some(s) = &system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": format!("Say the number {i}.")}));
        let body = json!({
            "messages": messages,
            "max_tokens": args.max_tokens,
            "temperature": 0,
        });
        async move {
            let mut first: Option<Duration> = None;
            let answer = stream_chat(
                &client,
                &url,
                body,
                |_| {},
                |_| {
                    first.get_or_insert_with(|| started.elapsed());
                },
            )
            .await;
            (answer, first, started.elapsed())
        }
    }))
    .await;
    let mut row = BurstRow {
        system_tokens,
        served: 0,
        ttft: Vec::new(),
        all_done: 0.0,
        prompt_tokens: 0,
        cached_tokens: 0,
    };
    for (i, (answer, first, ended)) in answers.into_iter().enumerate() {
        let answer = answer.with_context(|| format!("request {i}"))?;
        row.all_done = row.all_done.max(ended.as_secs_f64());
        if answer.status != 200 || answer.error.is_some() || !answer.done {
            eprintln!(
                "request {i} was not served: HTTP {}, {:?}",
                answer.status, answer.error
            );
            continue;
        }
        row.served += 1;
        if let Some(t) = first {
            row.ttft.push(t.as_secs_f64());
        }
        if let Some(u) = usage_of(&answer.events) {
            row.prompt_tokens += u["prompt_tokens"].as_u64().unwrap_or(0);
            row.cached_tokens += u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
        }
    }
    row.ttft.sort_by(f64::total_cmp);
    Ok(row)
}

/// Runs `silk bench burst`.
pub fn run(args: BurstBenchArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    let (models_dir, model) = models_in(data_dir)?;
    let config = TestnetConfig {
        silk_bin: std::env::current_exe()?,
        models_dir,
        model,
        payments: false,
        // Node 0, the gateway, lets a burst wait as long as it takes.
        node_options: vec![NodeOptions {
            config_toml: "queue_timeout_s = 600\n".into(),
            ..Default::default()
        }],
        ..TestnetConfig::new_without_model(args.workers + 1, args.workers)
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let rows = runtime.block_on(async {
        eprintln!("starting 1 gateway and {} workers…", args.workers);
        let mut net = Testnet::spawn(config).await?;
        let gateway = net.gateway().context("the testnet has no gateway")?;
        let mut rows = Vec::new();
        for (index, &tokens) in args.system_prompt_tokens.iter().enumerate() {
            eprintln!(
                "burst {}: {} requests, system prompt of about {tokens} tokens",
                index + 1,
                args.requests
            );
            rows.push(burst(&net, gateway, &args, index, tokens).await?);
        }
        anyhow::Ok(rows)
    })?;
    println!("## silk bench burst\n");
    println!("- machine: {}", super::bench::machine());
    println!(
        "- {} streamed chat requests sent at once to one gateway, {} workers (engine batch 32; the gateway sends a worker at most its `max_jobs_per_worker`, the rest wait in its queue), {} tokens each, greedy; time to first token from the burst's start\n",
        args.requests, args.workers, args.max_tokens
    );
    println!("| shared system prompt | served | TTFT p50 | p90 | max | all done | prompt tokens computed / read |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let at = |q: f64| {
            r.ttft
                .get(((r.ttft.len().max(1) - 1) as f64 * q).round() as usize)
                .map_or("-".to_string(), |s| format!("{s:.2} s"))
        };
        println!(
            "| {} | {}/{} | {} | {} | {} | {:.2} s | {} / {} |",
            if r.system_tokens == 0 {
                "none (the template's)".to_string()
            } else {
                format!("about {} tokens", r.system_tokens)
            },
            r.served,
            args.requests,
            at(0.5),
            at(0.9),
            at(1.0),
            r.all_done,
            r.prompt_tokens - r.cached_tokens.min(r.prompt_tokens),
            r.prompt_tokens,
        );
    }
    let all = rows.iter().all(|r| r.served == args.requests);
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

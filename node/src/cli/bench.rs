//! `silk bench ...`: benchmarks that print a table, each with the machine
//! and a reference measured in the same run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use silk_inference::backend::{start_engine, Device};
use silk_inference::model::ModelFormat;
use silk_inference::Precision;
use silk_inference::{
    Constraint, CpuKernels, Engine, EngineConfig, Event, GenerateRequest, GenerationStream,
    ModelStore, Prompt,
};

/// `silk bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode speed of the local engine, against a reference engine.
    Inference(InferenceBenchArgs),
    /// The engine on a device and precision against the reference fixtures
    /// (logits, greedy tokens, teacher-forced KL divergence).
    Fidelity(super::bench_fidelity::FidelityArgs),
    /// On-chain messages per 10,000 jobs, cheque sign+verify time, devnet
    /// execution time per contract message.
    Settlement(super::wallet::SettlementBenchArgs),
    /// Routing overhead, time until a new worker is known, gossip convergence.
    Mesh(super::bench_mesh::MeshBenchArgs),
    /// Time to first token across a burst of requests through one gateway.
    Burst(super::bench_burst::BurstBenchArgs),
    /// One process's share of the mesh `silk bench mesh` measures.
    #[command(hide = true)]
    MeshShard(super::mesh_shard::MeshShardArgs),
}

/// Arguments of `silk bench inference`.
#[derive(Debug, Args)]
pub struct InferenceBenchArgs {
    /// Model name or path.
    #[arg(long, default_value = silk_inference::DEFAULT_MODEL)]
    pub model: String,
    /// Batch sizes (concurrent requests), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch: Vec<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated after the first.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Float type of weights and activations: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
    /// Python interpreter with llama-cpp-python or transformers for the
    /// reference (`inference/reference/setup-llama.sh` makes one); `none`
    /// skips the reference.
    #[arg(long, env = "SILK_REFERENCE_PYTHON")]
    pub reference_python: Option<String>,
    /// The reference script.
    #[arg(long, default_value = "inference/reference/bench_reference.py")]
    pub reference_script: PathBuf,
    /// Length of the shared prefix (a system prompt) for the prefix cache's
    /// time to first token, cold and warm; 0 skips it.
    #[arg(long, default_value_t = 1000)]
    pub shared_prefix_tokens: usize,
}

/// Runs `silk bench ...`.
pub fn run(cmd: BenchCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Inference(args) => inference(args, data_dir),
        BenchCommand::Fidelity(args) => super::bench_fidelity::run(args, data_dir),
        BenchCommand::Settlement(args) => super::wallet::bench_settlement(args),
        BenchCommand::Mesh(args) => super::bench_mesh::run(args, data_dir),
        BenchCommand::Burst(args) => super::bench_burst::run(args, data_dir),
        BenchCommand::MeshShard(args) => super::bench_mesh::run_shard(args),
    }
}

/// The text both engines take their prompt tokens from (the same as the
/// reference script's).
const PROMPT_TEXT: &str =
    "The quick brown fox jumps over the lazy dog. Once upon a time, there was a little robot \
who lived in a small house at the edge of a forest. Every morning the robot woke up, opened \
the window, and said hello to the birds in the trees. The birds sang back, and the robot \
wrote their songs down in a notebook with a blue pencil. ";

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Row {
    batch: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft_s: f64,
    peak_rss_bytes: u64,
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Reads every stream to its end, each on its own thread so no reader
/// holds the batch back; returns each one's first-token time, token count
/// and end time.
fn drain(streams: Vec<GenerationStream>) -> anyhow::Result<Vec<(Option<Instant>, usize, Instant)>> {
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let (mut first, mut tokens) = (None, 0usize);
                while let Some(event) = s.blocking_next() {
                    match event {
                        Event::Token { .. } => {
                            tokens += 1;
                            first.get_or_insert_with(Instant::now);
                        }
                        Event::Done(_) => break,
                        Event::Error(e) => return Err(anyhow::anyhow!(e)),
                        Event::PromptLogprobs(_) => {}
                    }
                }
                Ok((first, tokens, Instant::now()))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().map_err(|_| anyhow::anyhow!("reader panicked"))?)
        .collect()
}

fn measure(
    engine: &Engine,
    prompt: &[u32],
    batch: usize,
    gen_tokens: usize,
) -> anyhow::Result<Row> {
    let submitted = Instant::now();
    let mut streams = Vec::with_capacity(batch);
    for i in 0..batch {
        let prompt = own_prompt(engine, prompt, i);
        let mut request = GenerateRequest::new(Prompt::Tokens(prompt), gen_tokens + 1);
        request.ignore_eos = true;
        streams.push(engine.submit(request)?);
    }
    let mut firsts = Vec::new();
    let mut end = submitted;
    for (first, tokens, done) in drain(streams)? {
        anyhow::ensure!(
            tokens == gen_tokens + 1,
            "a request produced {tokens} tokens"
        );
        firsts.push(first.context("no token")?);
        end = end.max(done);
    }
    let first_all = firsts.iter().copied().max().unwrap_or(submitted);
    let first_any = firsts.iter().copied().min().unwrap_or(submitted);
    let prefill = first_all.duration_since(submitted).as_secs_f64();
    let decode = end.duration_since(first_all).as_secs_f64();
    Ok(Row {
        batch,
        prefill_tokens_per_s: (batch * prompt.len()) as f64 / prefill.max(1e-9),
        decode_tokens_per_s: (batch * gen_tokens) as f64 / decode.max(1e-9),
        ttft_s: first_any.duration_since(submitted).as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Request `i`'s copy of `prompt`, its first token another for each `i`:
/// the engine shares a prompt among requests that start alike (and forks
/// requests with one prompt from the first), so a batch of one prompt
/// would measure one prefill, not `batch`.
fn own_prompt(engine: &Engine, prompt: &[u32], i: usize) -> Vec<u32> {
    let vocab = engine.tokenizer().vocab_size().max(1) as u64;
    let mut own = prompt.to_vec();
    if let Some(first) = own.first_mut() {
        *first = ((u64::from(*first) + i as u64) % vocab) as u32;
    }
    own
}

/// Tokens of a request's own after the shared prefix.
const PREFIX_SUFFIX_TOKENS: usize = 16;
/// Prefixes measured (the median is reported).
const PREFIX_TRIALS: usize = 3;

/// Time to first token with the prefix cache, cold and warm.
struct PrefixRow {
    cold: std::time::Duration,
    warm: std::time::Duration,
    /// Prompt tokens the warm request took from the cache.
    cached_tokens: usize,
}

/// For each of a few prefixes of `prefix_tokens` tokens: one request
/// (cold: nothing cached), then one with the same prefix and another
/// suffix (warm). Each request generates one token.
fn measure_prefix(engine: &Engine, prefix_tokens: usize) -> anyhow::Result<PrefixRow> {
    let text = PROMPT_TEXT.repeat(2 + (prefix_tokens + 2 * PREFIX_SUFFIX_TOKENS) / 40);
    let base = engine.tokenizer().encode(&text, false)?;
    anyhow::ensure!(
        base.len() >= prefix_tokens + 2 * PREFIX_SUFFIX_TOKENS + PREFIX_TRIALS,
        "prompt text too short"
    );
    let one = |prompt: Vec<u32>| -> anyhow::Result<(std::time::Duration, usize)> {
        let started = Instant::now();
        let mut stream = engine.submit(GenerateRequest::new(Prompt::Tokens(prompt), 1))?;
        let mut first = None;
        while let Some(event) = stream.blocking_next() {
            match event {
                Event::Token { .. } => {
                    first.get_or_insert_with(|| started.elapsed());
                }
                Event::Done(usage) => {
                    return Ok((first.context("no token")?, usage.cached_tokens));
                }
                Event::Error(e) => anyhow::bail!(e),
                Event::PromptLogprobs(_) => {}
            }
        }
        anyhow::bail!("the stream ended without a result")
    };
    let (mut cold, mut warm, mut cached) = (Vec::new(), Vec::new(), 0);
    for trial in 0..PREFIX_TRIALS {
        // Each trial's prefix starts elsewhere in the text: a new prefix.
        let prefix = &base[trial..trial + prefix_tokens];
        let suffix = |k: usize| {
            &base[trial + prefix_tokens + k * PREFIX_SUFFIX_TOKENS..][..PREFIX_SUFFIX_TOKENS]
        };
        let (t, n) = one([prefix, suffix(0)].concat())?;
        anyhow::ensure!(n == 0, "the cold request found {n} tokens cached");
        cold.push(t);
        let (t, n) = one([prefix, suffix(1)].concat())?;
        warm.push(t);
        cached = n;
    }
    cold.sort();
    warm.sort();
    Ok(PrefixRow {
        cold: cold[PREFIX_TRIALS / 2],
        warm: warm[PREFIX_TRIALS / 2],
        cached_tokens: cached,
    })
}

/// Constrained decoding at `batch`: each request's answer must be a JSON
/// array of exactly `gen_tokens / 2` digits (about two tokens an item), so
/// every step computes a mask. Returns the aggregate decode tokens/s and
/// the grammar's cost per token (mask plus grammar step, from the engine's
/// own counters).
fn measure_constrained(
    engine: &Engine,
    prompt: &[u32],
    batch: usize,
    gen_tokens: usize,
) -> anyhow::Result<(f64, std::time::Duration)> {
    let items = (gen_tokens / 2).max(1);
    let schema = serde_json::json!({
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": items,
        "maxItems": items,
    });
    let (masks_before, time_before) = engine.mask_stats();
    let submitted = Instant::now();
    let mut streams = Vec::with_capacity(batch);
    for i in 0..batch {
        let prompt = own_prompt(engine, prompt, i);
        let mut request = GenerateRequest::new(Prompt::Tokens(prompt), 4 * items + 8);
        request.constraint = Some(Constraint::JsonSchema(schema.to_string()));
        streams.push(engine.submit(request)?);
    }
    let (mut first_all, mut end, mut after_first) = (submitted, submitted, 0usize);
    for (first, tokens, done) in drain(streams)? {
        first_all = first_all.max(first.context("no token")?);
        end = end.max(done);
        after_first += tokens.saturating_sub(1);
    }
    let (masks, time) = engine.mask_stats();
    let per_token = (time - time_before) / u32::try_from((masks - masks_before).max(1))?;
    let decode = end.duration_since(first_all).as_secs_f64();
    Ok((after_first as f64 / decode.max(1e-9), per_token))
}

/// The CPU model, core count, architecture, the vector extensions the
/// kernels care about and the kernel set in use, printed with every
/// benchmark.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let isa = if CpuKernels::Avx512.is_supported() {
        "AVX-512F and AVX2"
    } else if CpuKernels::Avx2.is_supported() {
        "AVX2, no AVX-512"
    } else {
        "neither AVX2 nor AVX-512"
    };
    let kernels = match CpuKernels::from_env() {
        Ok(k) => k.to_string(),
        Err(e) => format!("unusable ({e})"),
    };
    format!(
        "{cpu}, {cores} cores, {} ({isa}), silk kernels {kernels}",
        std::env::consts::ARCH
    )
}

/// The machine's memory read bandwidth in bytes per second: the best of a
/// few passes of one thread per core summing its share of a 512 MiB
/// buffer (far past any cache), the way a decode step streams weights.
fn read_bandwidth() -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Not zeros: the kernel maps untouched zero pages to one shared page.
    let buffer: Vec<u64> = (0..(512usize << 20) / 8).map(|i| i as u64 | 1).collect();
    let chunk = buffer.len().div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let total = std::thread::scope(|s| {
            let parts: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().fold(0u64, |a, &v| a.wrapping_add(v))))
                .collect();
            parts
                .into_iter()
                .map(|p| p.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((buffer.len() * 8) as f64 / start.elapsed().as_secs_f64());
    }
    best
}

/// Bytes of a GGUF file's tensors that a one-token forward pass reads as
/// llama.cpp stores them: every tensor, less the embedding table when the
/// file has its own output projection (then only a row of it is read).
fn gguf_decode_bytes(path: &Path) -> anyhow::Result<usize> {
    let file = silk_inference::gguf::GgufFile::open(path)?;
    let untied = file.tensors.contains_key("output.weight");
    let mut total = 0;
    for name in file.tensors.keys() {
        if untied && name == "token_embd.weight" {
            continue;
        }
        total += file.tensor_bytes(name)?.1.len();
    }
    Ok(total)
}

/// The reference engine on the same model: llama.cpp (or transformers) on
/// a GGUF file, transformers on a Hugging Face directory, on the same
/// device and in the same precision as silk.
fn reference(
    args: &InferenceBenchArgs,
    model: &ModelFormat,
) -> anyhow::Result<Option<(String, Vec<Row>)>> {
    let python = match args.reference_python.as_deref() {
        Some("none") => return Ok(None),
        Some(p) => p.to_string(),
        None if Path::new(".venv-llama/bin/python").exists() => ".venv-llama/bin/python".into(),
        None => {
            eprintln!("no reference engine: run inference/reference/setup-llama.sh or pass --reference-python");
            return Ok(None);
        }
    };
    let batches: Vec<String> = args.batch.iter().map(usize::to_string).collect();
    let (flag, path) = match model {
        ModelFormat::Gguf(p) => ("--gguf", p),
        ModelFormat::HfDir(p) => ("--hf-dir", p),
    };
    let device = match args.device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
    };
    let dtype = match args.dtype {
        Precision::F32 => "float32",
        Precision::Bf16 => "bfloat16",
    };
    let output = std::process::Command::new(&python)
        .arg(&args.reference_script)
        .arg(flag)
        .arg(path)
        .args(["--device", &device, "--dtype", dtype])
        .args(["--batch", &batches.join(",")])
        .args(["--prompt-tokens", &args.prompt_tokens.to_string()])
        .args(["--gen-tokens", &args.gen_tokens.to_string()])
        .output()
        .with_context(|| format!("running {python}"))?;
    anyhow::ensure!(
        output.status.success(),
        "reference benchmark failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("reference output")?;
    let engine = json["engine"].as_str().unwrap_or("reference").to_string();
    let mut rows = Vec::new();
    for run in json["runs"].as_array().into_iter().flatten() {
        if let Some(err) = run.get("error") {
            eprintln!("reference batch {}: {err}", run["batch"]);
            continue;
        }
        rows.push(Row {
            batch: run["batch"].as_u64().unwrap_or(0) as usize,
            prefill_tokens_per_s: run["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            decode_tokens_per_s: run["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            ttft_s: run["ttft_s"].as_f64().unwrap_or(0.0),
            peak_rss_bytes: run["peak_rss_bytes"].as_u64().unwrap_or(0),
        });
    }
    Ok(Some((engine, rows)))
}

fn inference(args: InferenceBenchArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.prompt_tokens > 0 && args.gen_tokens > 0,
        "--prompt-tokens and --gen-tokens must be positive"
    );
    anyhow::ensure!(
        !args.batch.is_empty() && !args.batch.contains(&0),
        "--batch takes positive sizes"
    );
    let store = ModelStore::new(data_dir.join("models"));
    let source = store.resolve(&args.model)?;
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    // The throughput runs send one prompt with another first token per
    // request (`own_prompt`), without the prefix cache: each computes its
    // prompt as a new one would.
    let engine = start_engine(
        source.clone(),
        args.device,
        args.dtype,
        EngineConfig {
            max_batch,
            prefix_cache_bytes: 0,
            ..EngineConfig::default()
        },
    )?;
    let text = PROMPT_TEXT.repeat(1 + args.prompt_tokens / 40);
    let mut prompt = engine.tokenizer().encode(&text, false)?;
    anyhow::ensure!(prompt.len() >= args.prompt_tokens, "prompt text too short");
    prompt.truncate(args.prompt_tokens);
    // Warm up allocations and caches once.
    measure(&engine, &prompt[..prompt.len().min(16)], 1, 4)?;
    let mut ours = Vec::new();
    for &b in &args.batch {
        let row = measure(&engine, &prompt, b, args.gen_tokens)?;
        eprintln!(
            "silk batch {b}: {:.1} decode tokens/s",
            row.decode_tokens_per_s
        );
        ours.push(row);
    }
    let mut constrained = Vec::new();
    for &b in &args.batch {
        let (tps, per_token) = measure_constrained(&engine, &prompt, b, args.gen_tokens)?;
        eprintln!(
            "silk batch {b}, JSON schema: {tps:.1} decode tokens/s, grammar {:.1} µs/token",
            per_token.as_secs_f64() * 1e6
        );
        constrained.push((b, tps, per_token));
    }
    let prefix = if args.shared_prefix_tokens > 0 {
        let cached = start_engine(
            source.clone(),
            args.device,
            args.dtype,
            EngineConfig::default(),
        )?;
        let r = measure_prefix(&cached, args.shared_prefix_tokens)?;
        eprintln!(
            "silk, {}-token shared prefix: TTFT cold {:.1} ms, warm {:.1} ms",
            args.shared_prefix_tokens,
            r.cold.as_secs_f64() * 1e3,
            r.warm.as_secs_f64() * 1e3
        );
        Some(r)
    } else {
        None
    };
    let reference = reference(&args, &source.format)?;
    let bandwidth = read_bandwidth();
    println!("# silk bench inference");
    println!();
    println!("- model: `{}`", engine.source().id);
    println!(
        "- machine: {}; device: {:?}; dtype: {}",
        machine(),
        args.device,
        args.dtype
    );
    println!(
        "- prompt {} tokens, {} generated tokens after the first, greedy, no EOS stop",
        args.prompt_tokens, args.gen_tokens
    );
    println!();
    println!(
        "| engine | batch | prefill tok/s | decode tok/s (aggregate) | TTFT ms | peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let print = |name: &str, rows: &[Row]| {
        for r in rows {
            println!(
                "| {name} | {} | {:.0} | {:.1} | {:.1} | {:.0} |",
                r.batch,
                r.prefill_tokens_per_s,
                r.decode_tokens_per_s,
                r.ttft_s * 1e3,
                r.peak_rss_bytes as f64 / (1 << 20) as f64
            );
        }
    };
    print("silk (burn)", &ours);
    if let Some((name, rows)) = &reference {
        print(name, rows);
        if let (Some(o1), Some(r1)) = (
            ours.iter().find(|r| r.batch == 1),
            rows.iter().find(|r| r.batch == 1),
        ) {
            println!();
            println!(
                "- batch 1 decode: silk / {name} = {:.2}",
                o1.decode_tokens_per_s / r1.decode_tokens_per_s.max(1e-9)
            );
            if let ModelFormat::Gguf(path) = &source.format {
                let bytes = gguf_decode_bytes(path)?;
                println!(
                    "- {name} reads {:.1} MB of weights per token (the file's blocks): \
                     batch 1 decode at {:.0}% of the memory roofline",
                    bytes as f64 / 1e6,
                    100.0 * r1.decode_tokens_per_s * bytes as f64 / bandwidth
                );
            }
        }
    } else {
        println!();
        println!("- no reference engine in this run");
    }
    let weights = engine.decode_weight_bytes() as f64;
    println!(
        "- memory read bandwidth, measured in this run: {:.1} GB/s ({} threads); \
         silk reads {:.1} MB of weights per token: roofline {:.0} tokens/s",
        bandwidth / 1e9,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        weights / 1e6,
        bandwidth / weights
    );
    if let Some(o1) = ours.iter().find(|r| r.batch == 1) {
        println!(
            "- silk batch 1 decode at {:.0}% of the memory roofline",
            100.0 * o1.decode_tokens_per_s * weights / bandwidth
        );
    }
    if let (Some(o1), Some(o32)) = (
        ours.iter().find(|r| r.batch == 1),
        ours.iter().max_by_key(|r| r.batch),
    ) {
        println!(
            "- silk batch {} aggregate decode / batch 1 = {:.2}",
            o32.batch,
            o32.decode_tokens_per_s / o1.decode_tokens_per_s.max(1e-9)
        );
    }
    if let Some(r) = &prefix {
        println!();
        println!(
            "Prefix cache: a {}-token shared prefix (a system prompt), then {} tokens of each request's own; one request at a time, median of {} prefixes:",
            args.shared_prefix_tokens, PREFIX_SUFFIX_TOKENS, PREFIX_TRIALS
        );
        println!();
        println!("| prefix | TTFT ms | prompt tokens computed |");
        println!("|---|---:|---:|");
        println!(
            "| cold (first request) | {:.1} | {} |",
            r.cold.as_secs_f64() * 1e3,
            args.shared_prefix_tokens + PREFIX_SUFFIX_TOKENS
        );
        println!(
            "| warm (same prefix, new suffix) | {:.1} | {} |",
            r.warm.as_secs_f64() * 1e3,
            args.shared_prefix_tokens + PREFIX_SUFFIX_TOKENS - r.cached_tokens
        );
    }
    println!();
    println!(
        "Constrained decoding (`response_format` JSON schema: an array of {} digits; llguidance mask and grammar step per token, on the engine thread):",
        (args.gen_tokens / 2).max(1)
    );
    println!();
    println!("| batch | decode tok/s (aggregate), constrained | same, free | grammar µs/token |");
    println!("|---:|---:|---:|---:|");
    for (b, tps, per_token) in &constrained {
        let free = ours
            .iter()
            .find(|r| r.batch == *b)
            .map_or(0.0, |r| r.decode_tokens_per_s);
        println!(
            "| {b} | {tps:.1} | {free:.1} | {:.1} |",
            per_token.as_secs_f64() * 1e6
        );
    }
    Ok(ExitCode::SUCCESS)
}

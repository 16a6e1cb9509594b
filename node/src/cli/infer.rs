//! `silk infer`: run one prompt through the local engine, without the mesh.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use silk_inference::backend::{start_engine, Device};
use silk_inference::Precision;
use silk_inference::{
    ChatMessage, EngineConfig, Event, GenerateRequest, ModelStore, Prompt, SamplingParams,
};

/// Arguments of `silk infer`.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model: a name from `silk model list`, a .gguf file or a Hugging Face directory.
    #[arg(long, default_value = silk_inference::DEFAULT_MODEL)]
    pub model: String,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Float type of weights and activations: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
}

/// Runs `silk infer`.
pub fn run(args: InferArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let store = ModelStore::new(data_dir.join("models"));
    let source = store.resolve(&args.model)?;
    let engine = start_engine(source, args.device, args.dtype, EngineConfig::default())
        .with_context(|| format!("loading {}", args.model))?;
    let prompt = if args.chat {
        Prompt::Chat {
            messages: vec![ChatMessage::new("user", args.prompt.clone())],
            tools: Vec::new(),
        }
    } else {
        Prompt::Text(args.prompt.clone())
    };
    let request = GenerateRequest {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..SamplingParams::default()
        },
        ..GenerateRequest::new(prompt, args.max_tokens)
    };
    let mut stream = engine.submit(request)?;
    let mut token_ids = Vec::new();
    let mut text = String::new();
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = stream.blocking_next() {
        match event {
            Event::Token {
                id, text: piece, ..
            } => {
                token_ids.push(id);
                if !args.json {
                    write!(stdout, "{piece}")?;
                    stdout.flush()?;
                }
                text.push_str(&piece);
            }
            Event::Done(usage) => {
                if args.json {
                    let out = serde_json::json!({
                        "model": engine.source().id,
                        "prompt_token_ids": stream.prompt_token_ids,
                        "token_ids": token_ids,
                        "text": text,
                        "finish_reason": usage.finish_reason,
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "prefill_ms": usage.prefill_ms,
                        "decode_tokens_per_s": usage.decode_tokens_per_s,
                    });
                    writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
                } else {
                    writeln!(stdout)?;
                    eprintln!(
                        "[{} prompt + {} completion tokens, prefill {:.0} ms, {:.1} tokens/s]",
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        usage.prefill_ms,
                        usage.decode_tokens_per_s
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            Event::Error(e) => anyhow::bail!("generation failed: {e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    anyhow::bail!("the engine stopped without finishing the request")
}

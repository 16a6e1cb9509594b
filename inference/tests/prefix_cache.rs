//! The prefix cache: a request whose prompt starts like a finished one's
//! reads the shared whole prefill chunks from the cache, says so in
//! `Usage::cached_tokens`, and gets exactly the answer (tokens and
//! log-probabilities, bit for bit) an engine without the cache gives. On
//! both layouts: `Dense` keeps the cache in Burn tensors, `Packed` in host
//! vectors (each kernel set this CPU runs). The default model's check of
//! the same is in `reference.rs`.

use std::path::{Path, PathBuf};

use silk_inference::backend::Cpu;
use silk_inference::cpu::CpuKernels;
use silk_inference::engine::{
    Engine, EngineConfig, Event, GenerateRequest, GenerationStream, Prompt, Usage,
};
use silk_inference::model::{LoadedModel, ModelSource};
use silk_inference::sampling::SamplingParams;
use silk_inference::transformer::WeightLayout;

fn engine(name: &str, layout: WeightLayout, kernels: CpuKernels, prefix_bytes: usize) -> Engine {
    engine_with(
        name,
        layout,
        kernels,
        EngineConfig {
            // Chunks that do not line up with the cached prefix.
            prefill_chunk: 7,
            prefix_cache_bytes: prefix_bytes,
            ..Default::default()
        },
    )
}

fn engine_with(
    name: &str,
    layout: WeightLayout,
    kernels: CpuKernels,
    config: EngineConfig,
) -> Engine {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let model = LoadedModel::<Cpu>::load_on(
        ModelSource::from_path(&dir).expect("source"),
        layout,
        kernels,
        &Default::default(),
    )
    .expect("load");
    Engine::start(model, config).expect("engine")
}

struct Answer {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    usage: Usage,
}

fn run(engine: &Engine, prompt: &[u32], max_tokens: usize) -> Answer {
    let mut r = GenerateRequest::new(Prompt::Tokens(prompt.to_vec()), max_tokens);
    r.ignore_eos = true;
    run_request(engine, r)
}

/// Reads one token of `stream`, then leaves it unread until `engine` holds
/// it in the batch without stepping it (stalled); returns that token.
fn stall_after_one_token(engine: &Engine, stream: &mut GenerationStream, what: &str) -> u32 {
    let first = match stream.blocking_next() {
        Some(Event::Token { id, .. }) => id,
        other => panic!("{what}: expected a first token, got {other:?}"),
    };
    let waited = std::time::Instant::now();
    while engine.load().stalled != 1 {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(120),
            "{what}: the unread request was never stalled: {:?}",
            engine.load()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    first
}

/// `first` and the rest of `stream`'s tokens, read to its end.
fn read_to_end(first: u32, stream: &mut GenerationStream, what: &str) -> Vec<u32> {
    let mut tokens = vec![first];
    while let Some(event) = stream.blocking_next() {
        match event {
            Event::Token { id, .. } => tokens.push(id),
            Event::Done(_) => break,
            other => panic!("{what}: {other:?}"),
        }
    }
    tokens
}

/// `max_tokens` sampled at temperature 0.9 with `seed`, past end-of-sequence.
fn seeded(prompt: &[u32], max_tokens: usize, seed: u64) -> GenerateRequest {
    let mut r = GenerateRequest::new(Prompt::Tokens(prompt.to_vec()), max_tokens);
    r.ignore_eos = true;
    r.sampling = SamplingParams {
        temperature: 0.9,
        seed: Some(seed),
        ..Default::default()
    };
    r
}

/// Runs `r` to its end with each token's log-probability.
fn run_request(engine: &Engine, mut r: GenerateRequest) -> Answer {
    r.logprobs = Some(0);
    let mut s = engine.submit(r).expect("submit");
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    while let Some(event) = s.blocking_next() {
        match event {
            Event::Token { id, logprob, .. } => {
                tokens.push(id);
                logprobs.push(logprob.expect("logprob").logprob);
            }
            Event::Done(usage) => {
                return Answer {
                    tokens,
                    logprobs,
                    usage,
                }
            }
            Event::Error(e) => panic!("engine error: {e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    panic!("the stream ended without a result")
}

/// The same answer, bit for bit: the cache only holds positions the
/// request would have computed in the same forward passes.
fn same_answer(what: &str, got: &Answer, want: &Answer) {
    assert_eq!(got.tokens, want.tokens, "{what}: tokens");
    let bits = |a: &Answer| a.logprobs.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(got), bits(want), "{what}: log-probabilities");
}

/// The dense layout, and the packed one with each kernel set this CPU runs.
fn layouts() -> Vec<(WeightLayout, CpuKernels)> {
    let mut layouts = vec![(WeightLayout::Dense, CpuKernels::best())];
    layouts.extend(
        CpuKernels::available()
            .into_iter()
            .map(|k| (WeightLayout::Packed, k)),
    );
    layouts
}

#[test]
fn a_shared_prefix_is_read_from_the_cache_and_changes_no_answer() {
    let layouts = layouts();
    for name in ["tiny-llama", "tiny-qwen3"] {
        for (layout, kernels) in layouts.clone() {
            let what = format!("{name} {layout:?} {kernels}");
            let cached = engine(name, layout, kernels, 64 << 20);
            let plain = engine(name, layout, kernels, 0);
            // A 40-token "system prompt".
            let system: Vec<u32> = (0..40).map(|i| 3 + (i * 37) % 200).collect();

            let first = run(&cached, &system, 6);
            assert_eq!(first.usage.cached_tokens, 0, "{what}: nothing cached yet");
            same_answer(&what, &first, &run(&plain, &system, 6));

            // The conversation's next turn: the prompt, the answer, more.
            // The prompt's whole prefill chunks come from the cache (35 of
            // 40 with chunks of 7); the answer's positions, computed one at
            // a time, are computed again.
            let mut next = system.clone();
            next.extend(&first.tokens);
            next.extend([17, 29, 31, 5]);
            let warm = run(&cached, &next, 8);
            assert_eq!(warm.usage.cached_tokens, 35, "{what}");
            assert_eq!(warm.usage.prompt_tokens, next.len(), "{what}");
            let cold = run(&plain, &next, 8);
            assert_eq!(cold.usage.cached_tokens, 0, "{what}: cache off");
            same_answer(&format!("{what}, next turn"), &warm, &cold);

            // The same prompt again: all of it, with the logits after it,
            // comes from the cache (before, only its whole chunks: 35).
            let again = run(&cached, &system, 6);
            assert_eq!(again.usage.cached_tokens, 40, "{what}");
            same_answer(&format!("{what}, same prompt"), &again, &first);

            // Another prompt sharing only the first 30 tokens: 28 of them.
            let mut other = system[..30].to_vec();
            other.extend([90, 91, 92, 93, 94, 95]);
            let warm = run(&cached, &other, 5);
            assert_eq!(warm.usage.cached_tokens, 28, "{what}");
            same_answer(
                &format!("{what}, 30 shared"),
                &warm,
                &run(&plain, &other, 5),
            );

            // Scoring a prompt computes every position.
            let mut r = GenerateRequest::new(Prompt::Tokens(system.clone()), 0);
            r.prompt_logprobs = Some(1);
            let mut s = cached.submit(r).expect("submit");
            let mut usage = None;
            while let Some(event) = s.blocking_next() {
                if let Event::Done(u) = event {
                    usage = Some(u);
                }
            }
            assert_eq!(usage.expect("usage").cached_tokens, 0, "{what}: scoring");
        }
    }
}

/// A request starting like one still being answered reads the prompt
/// chunks that sequence has computed, without waiting for it to finish
/// (before, it found nothing: only finished sequences were cached), and
/// gets the answer an engine without the cache gives, bit for bit. The
/// running request's reader reads one token and stops, so the engine
/// stalls it and the newcomer's forward passes are its own, as on the
/// plain engine.
#[test]
fn a_running_sequence_shares_its_prompt_with_a_newcomer() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        for (layout, kernels) in layouts() {
            let what = format!("{name} {layout:?} {kernels}");
            let cached = engine_with(
                name,
                layout,
                kernels,
                EngineConfig {
                    prefill_chunk: 7,
                    prefix_cache_bytes: 64 << 20,
                    stream_buffer: 1,
                    ..Default::default()
                },
            );
            let plain = engine(name, layout, kernels, 0);
            let system: Vec<u32> = (0..40).map(|i| 3 + (i * 37) % 200).collect();

            let mut r = GenerateRequest::new(Prompt::Tokens(system.clone()), 64);
            r.ignore_eos = true;
            let mut running = cached.submit(r).expect("submit");
            let first_token = stall_after_one_token(&cached, &mut running, &what);

            let mut next = system.clone();
            next.extend([17, 29, 31, 5]);
            let warm = run(&cached, &next, 8);
            assert_eq!(
                warm.usage.cached_tokens, 35,
                "{what}: 35 of the running prompt's 40 tokens are whole chunks of 7"
            );
            same_answer(&what, &warm, &run(&plain, &next, 8));

            // The first request, read to its end, lost nothing to the copy.
            let first_tokens = read_to_end(first_token, &mut running, &what);
            assert_eq!(
                first_tokens,
                run(&plain, &system, 64).tokens,
                "{what}: the running request's answer"
            );
        }
    }
}

/// The `n` choices of one request are requests with one prompt: while the
/// first is in the batch with its prompt read, the others copy its
/// prompt's keys and values and draw their first token from the logits it
/// computed there, reading none of the prompt themselves (before, they
/// read its last partial chunk again: 35 of 40 tokens cached). Each gets
/// the answer its own seed gives on an engine alone, bit for bit.
#[test]
fn the_choices_of_one_prompt_share_its_prefill() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        for (layout, kernels) in layouts() {
            let what = format!("{name} {layout:?} {kernels}");
            let shared = engine_with(
                name,
                layout,
                kernels,
                EngineConfig {
                    prefill_chunk: 7,
                    stream_buffer: 1,
                    ..Default::default()
                },
            );
            let alone = engine(name, layout, kernels, 0);
            let prompt: Vec<u32> = (0..40).map(|i| 3 + (i * 37) % 200).collect();
            let choice = |seed: u64| seeded(&prompt, 10, seed);

            // The first choice: read one token, then leave it unread so the
            // engine holds it in the batch (stalled).
            let mut first = shared.submit(choice(1)).expect("submit");
            let first_token = stall_after_one_token(&shared, &mut first, &what);

            for seed in 2..5 {
                let forked = run_request(&shared, choice(seed));
                assert_eq!(
                    forked.usage.cached_tokens,
                    prompt.len(),
                    "{what}, seed {seed}: the whole prompt came from the first choice"
                );
                assert_eq!(forked.usage.prompt_tokens, prompt.len(), "{what}");
                same_answer(
                    &format!("{what}, seed {seed}"),
                    &forked,
                    &run_request(&alone, choice(seed)),
                );
            }
            let seeds: Vec<Vec<u32>> = (2..5)
                .map(|seed| run_request(&alone, choice(seed)).tokens)
                .collect();
            assert!(
                seeds.windows(2).any(|w| w[0] != w[1]),
                "{what}: different seeds drew the same answers; the test shows nothing"
            );

            // The first choice lost nothing to the copies.
            let first_tokens = read_to_end(first_token, &mut first, &what);
            assert_eq!(
                first_tokens,
                run_request(&alone, choice(1)).tokens,
                "{what}: the first choice's answer"
            );
        }
    }
}

/// Requests sent together whose prompts start alike read the shared part
/// once: one that comes while another still reads its very prompt waits
/// and forks from it whole; one sharing only a start waits for those
/// chunks and copies them. Before, each read its prompt alongside the
/// first (the second got none of it, or the few chunks the first had
/// computed when it came). The first prompt is 200 tokens, 29 passes of
/// 7, so the others arrive long before it is read.
#[test]
fn requests_sent_together_read_their_shared_prompt_once() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        for (layout, kernels) in layouts() {
            let what = format!("{name} {layout:?} {kernels}");
            let engine = engine_with(
                name,
                layout,
                kernels,
                EngineConfig {
                    prefill_chunk: 7,
                    ..Default::default()
                },
            );
            let prompt: Vec<u32> = (0..200).map(|i| 3 + (i * 37) % 500).collect();
            let mut other = prompt[..150].to_vec();
            other.extend([7, 8, 9, 10, 11]);
            let streams: Vec<_> = [(&prompt, 1), (&prompt, 2), (&other, 3)]
                .into_iter()
                .map(|(p, seed)| engine.submit(seeded(p, 8, seed)).expect("submit"))
                .collect();
            let cached: Vec<usize> = streams
                .into_iter()
                .map(|mut s| loop {
                    match s.blocking_next() {
                        Some(Event::Done(u)) => break u.cached_tokens,
                        Some(Event::Error(e)) => panic!("{what}: {e}"),
                        Some(_) => {}
                        None => panic!("{what}: the stream ended without a result"),
                    }
                })
                .collect();
            assert_eq!(
                cached,
                vec![0, 200, 147],
                "{what}: the first reads its prompt, the second forks from it whole, \
                 the third copies the 21 whole chunks of 7 of the 150 tokens it shares"
            );
        }
    }
}

//! Scoring a prompt (completions' `echo` with `logprobs`, and `max_tokens:
//! 0`): the engine reports each prompt token's log-probability given the
//! tokens before it, from the same logits that would pick it. Checked
//! against the engine itself: a greedy answer's tokens, scored as part of a
//! prompt, get the log-probabilities the engine reported when it generated
//! them, across prefill chunks and next to other requests in the batch.

use std::path::{Path, PathBuf};

use silk_inference::backend::Cpu;
use silk_inference::cpu::CpuKernels;
use silk_inference::engine::{Engine, EngineConfig, Event, GenerateRequest, Prompt, Usage};
use silk_inference::model::{LoadedModel, ModelSource};
use silk_inference::transformer::WeightLayout;
use silk_inference::{InferenceError, TokenLogprob};

fn engine(name: &str, prefill_chunk: usize) -> Engine {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let model = LoadedModel::<Cpu>::load_on(
        ModelSource::from_path(&dir).expect("source"),
        WeightLayout::Dense,
        CpuKernels::best(),
        &Default::default(),
    )
    .expect("load");
    Engine::start(
        model,
        EngineConfig {
            prefill_chunk,
            ..Default::default()
        },
    )
    .expect("engine")
}

/// Everything one request sent: prompt scores, tokens with their
/// log-probabilities, and the usage.
#[derive(Debug, Default)]
struct Answer {
    scored: Option<Vec<TokenLogprob>>,
    tokens: Vec<(u32, Option<TokenLogprob>)>,
    usage: Option<Usage>,
}

fn drain(mut s: silk_inference::GenerationStream) -> Answer {
    let mut a = Answer::default();
    while let Some(event) = s.blocking_next() {
        match event {
            Event::PromptLogprobs(lps) => {
                assert!(
                    a.scored.is_none() && a.tokens.is_empty(),
                    "scores come once, first"
                );
                a.scored = Some(lps);
            }
            Event::Token { id, logprob, .. } => a.tokens.push((id, logprob)),
            Event::Done(u) => a.usage = Some(u),
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    a
}

fn greedy(prompt: &[u32], max_tokens: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(Prompt::Tokens(prompt.to_vec()), max_tokens);
    r.ignore_eos = true;
    r.logprobs = Some(3);
    r
}

fn score(prompt: &[u32]) -> GenerateRequest {
    let mut r = GenerateRequest::new(Prompt::Tokens(prompt.to_vec()), 0);
    r.prompt_logprobs = Some(3);
    r
}

#[test]
fn a_scored_prompt_gets_the_log_probabilities_its_tokens_were_generated_with() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        // Chunks of 4 make the 13-token prompt span four prefill steps.
        let engine = engine(name, 4);
        let prompt: Vec<u32> = vec![1, 45, 483, 310, 344, 38];
        let generated = drain(engine.submit(greedy(&prompt, 7)).expect("submit"));
        assert_eq!(generated.tokens.len(), 7, "{name}");
        let mut whole = prompt.clone();
        whole.extend(generated.tokens.iter().map(|(id, _)| *id));

        // Scored alone, and scored while another request decodes in the
        // same batch (whose answer must not change).
        let other = vec![1, 87, 226];
        let alone = drain(engine.submit(greedy(&other, 12)).expect("submit"));
        let scoring = engine.submit(score(&whole)).expect("submit");
        let beside = engine.submit(greedy(&other, 12)).expect("submit");
        let scored = drain(scoring);
        let beside = drain(beside);
        let ids = |a: &Answer| a.tokens.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        assert_eq!(
            ids(&beside),
            ids(&alone),
            "{name}: scoring changed a neighbour's answer"
        );

        let usage = scored.usage.expect("usage");
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (whole.len(), 0),
            "{name}"
        );
        assert!(
            scored.tokens.is_empty(),
            "{name}: max_tokens 0 generated tokens"
        );
        let lps = scored.scored.expect("prompt log-probabilities");
        assert_eq!(
            lps.len(),
            whole.len() - 1,
            "{name}: one per token after the first"
        );
        let mut worst = 0f32;
        for (j, (id, generated_lp)) in generated.tokens.iter().enumerate() {
            let want = generated_lp.as_ref().expect("logprob");
            let got = &lps[prompt.len() - 1 + j];
            assert_eq!(got.bytes, want.bytes, "{name} token {j} ({id})");
            worst = worst.max((got.logprob - want.logprob).abs());
            assert!(
                (got.logprob - want.logprob).abs() < 1e-3,
                "{name} token {j}: scored {} generated {}",
                got.logprob,
                want.logprob
            );
            let top = |t: &TokenLogprob| t.top.iter().map(|a| a.id).collect::<Vec<_>>();
            assert_eq!(top(got), top(want), "{name} token {j}: alternatives");
            // Greedy picked the best token: its score is the best one.
            assert_eq!(got.top[0].id, *id, "{name} token {j}");
        }
        println!("{name}: {} prompt tokens scored; generated tokens' log-probabilities agree within {worst:e}", lps.len());
    }
}

#[test]
fn nothing_to_generate_is_refused_unless_the_prompt_is_scored() {
    let engine = engine("tiny-llama", 64);
    let r = GenerateRequest::new(Prompt::Tokens(vec![1, 2, 3]), 0);
    match engine.submit(r) {
        Err(InferenceError::InvalidRequest { field, .. }) => assert_eq!(field, "max_tokens"),
        other => panic!("{other:?}"),
    }
    let mut r = score(&[1, 2, 3]);
    r.prompt_logprobs = Some(21);
    match engine.submit(r) {
        Err(InferenceError::InvalidRequest { field, .. }) => assert_eq!(field, "logprobs"),
        other => panic!("{other:?}"),
    }
    // Scoring and generating: the scores come first, then the answer.
    let mut r = score(&[1, 2, 3]);
    r.max_tokens = 2;
    r.ignore_eos = true;
    let a = drain(engine.submit(r).expect("submit"));
    assert_eq!(a.scored.map(|s| s.len()), Some(2));
    assert_eq!(a.tokens.len(), 2);
}

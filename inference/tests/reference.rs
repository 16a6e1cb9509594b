//! Our engine against an independent reference: Hugging Face transformers
//! on tiny random Llama and Qwen3 models (fixtures made by
//! `inference/reference/make_fixtures.py`), and on the default SmolLM2 GGUF.

use std::path::{Path, PathBuf};

use serde_json::Value;
use silk_inference::backend::Cpu;
use silk_inference::engine::{Engine, EngineConfig, Event, GenerateRequest, Prompt};
use silk_inference::model::{LoadedModel, ModelSource};
use silk_inference::sampling::argmax;
use silk_inference::tokenizer::ChatMessage;
use silk_inference::transformer::{Segment, WeightLayout};

const LOGIT_TOLERANCE: f32 = 1e-3;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("json")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("f") as f32)
        .collect()
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).expect("messages")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Both layouts: on these safetensors models `Packed` keeps dense weights
/// but attends in plain Rust over host caches, as a CPU worker does.
const LAYOUTS: [WeightLayout; 2] = [WeightLayout::Dense, WeightLayout::Packed];

fn load(dir: &Path, layout: WeightLayout) -> LoadedModel<Cpu> {
    let source = ModelSource::from_path(dir).expect("source");
    LoadedModel::<Cpu>::load(source, layout, &Default::default()).expect("load")
}

fn prompt_ids(model: &LoadedModel<Cpu>, case: &Value) -> Vec<u32> {
    match case["kind"].as_str() {
        Some("chat") => {
            let text = model
                .tokenizer
                .apply_chat_template(&messages(&case["messages"]), true)
                .expect("template");
            model.tokenizer.encode(&text, false).expect("encode")
        }
        _ => model
            .tokenizer
            .encode(
                case["prompt"].as_str().expect("prompt"),
                case["add_special_tokens"].as_bool().unwrap_or(true),
            )
            .expect("encode"),
    }
}

/// Prefill, then greedy decode with the cache, ignoring EOS.
fn greedy(model: &LoadedModel<Cpu>, prompt: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let t = &model.transformer;
    let mut cache = t.new_cache();
    let logits = t
        .forward(
            &mut [Segment {
                tokens: prompt,
                cache: &mut cache,
            }],
            false,
        )
        .into_data()
        .to_vec::<f32>()
        .expect("logits");
    let first_logits = logits.clone();
    let mut next = argmax(&logits);
    let mut out = vec![next];
    while out.len() < n {
        let l = t
            .forward(
                &mut [Segment {
                    tokens: &[next],
                    cache: &mut cache,
                }],
                false,
            )
            .into_data()
            .to_vec::<f32>()
            .expect("logits");
        next = argmax(&l);
        out.push(next);
    }
    (first_logits, out)
}

fn check_tiny(name: &str) {
    for layout in LAYOUTS {
        check_tiny_in(name, layout);
    }
}

fn check_tiny_in(name: &str, layout: WeightLayout) {
    let dir = fixture(name);
    let exp = expected(&dir);
    let model = load(&dir, layout);
    let name = &format!("{name} ({layout:?})");

    let sample = &exp["chat_template_sample"];
    let msgs = messages(&sample["messages"]);
    assert_eq!(
        model
            .tokenizer
            .apply_chat_template(&msgs, true)
            .expect("render"),
        sample["rendered_add_generation_prompt"]
            .as_str()
            .expect("s"),
        "{name}: chat template with generation prompt"
    );
    assert_eq!(
        model
            .tokenizer
            .apply_chat_template(&msgs, false)
            .expect("render"),
        sample["rendered_no_generation_prompt"].as_str().expect("s"),
        "{name}: chat template without generation prompt"
    );
    for case in exp["tokenizer_cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            model.tokenizer.encode(text, false).expect("enc"),
            ids(&case["ids"]),
            "{name}: {text:?}"
        );
        assert_eq!(
            model.tokenizer.encode(text, true).expect("enc"),
            ids(&case["ids_with_special_tokens"]),
            "{name}: {text:?} with special tokens"
        );
    }

    for case in exp["cases"].as_array().expect("cases") {
        let cname = case["name"].as_str().expect("name");
        let prompt = prompt_ids(&model, case);
        assert_eq!(
            prompt,
            ids(&case["prompt_token_ids"]),
            "{name}/{cname}: prompt ids"
        );
        let n = case["greedy_token_ids"].as_array().expect("g").len();
        let (logits, tokens) = greedy(&model, &prompt, n);
        let diff = max_abs_diff(&logits, &floats(&case["last_logits"]));
        assert!(
            diff <= LOGIT_TOLERANCE,
            "{name}/{cname}: max |Δlogit| = {diff}"
        );
        assert_eq!(
            tokens,
            ids(&case["greedy_token_ids"]),
            "{name}/{cname}: greedy tokens"
        );

        if let Some(all) = case.get("all_logits") {
            let mut cache = model.transformer.new_cache();
            let ours = model
                .transformer
                .forward(
                    &mut [Segment {
                        tokens: &prompt,
                        cache: &mut cache,
                    }],
                    true,
                )
                .into_data()
                .to_vec::<f32>()
                .expect("logits");
            let reference: Vec<f32> = all
                .as_array()
                .expect("rows")
                .iter()
                .flat_map(floats)
                .collect();
            let diff = max_abs_diff(&ours, &reference);
            assert!(
                diff <= LOGIT_TOLERANCE,
                "{name}/{cname}: all positions max |Δlogit| = {diff}"
            );
        }
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    check_tiny("tiny-llama");
}

#[test]
fn tiny_qwen3_matches_transformers() {
    check_tiny("tiny-qwen3");
}

/// Attention with a cache (one token at a time) equals attention over the
/// whole sequence at once.
#[test]
fn cached_decoding_equals_full_recomputation() {
    for (name, layout) in ["tiny-llama", "tiny-qwen3"]
        .into_iter()
        .flat_map(|name| LAYOUTS.map(|layout| (name, layout)))
    {
        let model = load(&fixture(name), layout);
        let t = &model.transformer;
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 500).collect();
        let mut full_cache = t.new_cache();
        let full = t
            .forward(
                &mut [Segment {
                    tokens: &tokens,
                    cache: &mut full_cache,
                }],
                true,
            )
            .into_data()
            .to_vec::<f32>()
            .expect("full");
        let vocab = t.config().vocab_size;
        let mut cache = t.new_cache();
        // A prefill of 10, then chunks of 1 and 3 through the cache.
        let mut start = 0;
        for len in [10, 1, 3, 1, 1, 3, 5] {
            let chunk = &tokens[start..start + len];
            let out = t
                .forward(
                    &mut [Segment {
                        tokens: chunk,
                        cache: &mut cache,
                    }],
                    true,
                )
                .into_data()
                .to_vec::<f32>()
                .expect("step");
            let diff = max_abs_diff(&out, &full[start * vocab..(start + len) * vocab]);
            assert!(
                diff < 1e-4,
                "{name}: positions {start}..{}: {diff}",
                start + len
            );
            start += len;
        }
        assert_eq!(start, tokens.len());
    }
}

/// Continuous batching gives each request exactly what it gets alone.
#[test]
fn batched_engine_matches_reference_greedy_tokens() {
    for layout in LAYOUTS {
        batched_engine_in(layout);
    }
}

fn batched_engine_in(layout: WeightLayout) {
    let dir = fixture("tiny-qwen3");
    let exp = expected(&dir);
    let engine = Engine::start(
        load(&dir, layout),
        EngineConfig {
            max_batch: 3,
            prefill_chunk: 5,
            ..Default::default()
        },
    )
    .expect("engine");
    let mut streams = Vec::new();
    for case in exp["cases"].as_array().expect("cases") {
        let want = ids(&case["greedy_token_ids"]);
        let mut request =
            GenerateRequest::new(Prompt::Tokens(ids(&case["prompt_token_ids"])), want.len());
        request.ignore_eos = true;
        streams.push((engine.submit(request).expect("submit"), want));
    }
    for (mut stream, want) in streams {
        let mut got = Vec::new();
        let mut done = None;
        while let Some(event) = stream.blocking_next() {
            match event {
                Event::Token { id, .. } => got.push(id),
                Event::Done(usage) => done = Some(usage),
                Event::Error(e) => panic!("engine error: {e}"),
            }
        }
        assert_eq!(got, want, "{layout:?}");
        let usage = done.expect("a final usage record");
        assert_eq!(usage.completion_tokens, want.len());
        assert_eq!(usage.prompt_tokens, stream.prompt_token_ids.len());
    }
}

/// The default model's path; `None` (the test skips) only where
/// `SILK_ALLOW_MISSING_MODEL` allows it to be missing.
fn smollm2_or_skip() -> Option<PathBuf> {
    let path = smollm2_path();
    if path.is_none() {
        assert!(
            std::env::var_os("SILK_ALLOW_MISSING_MODEL").is_some(),
            "the default model is not installed: run `silk model fetch` (or set SILK_SMOLLM2_GGUF)"
        );
        eprintln!("SKIPPED: default model not installed and SILK_ALLOW_MISSING_MODEL is set");
    }
    path
}

fn smollm2_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SILK_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p));
    }
    let store = silk_inference::store::default_data_dir().join("models");
    let p = store.join(format!("{}.gguf", silk_inference::DEFAULT_MODEL));
    p.exists().then_some(p)
}

/// The default model, against transformers reading the same GGUF.
#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(path) = smollm2_or_skip() else {
        return;
    };
    let exp = expected(&fixture("smollm2-q4_1"));
    let source = ModelSource::from_path(&path).expect("source");
    assert!(
        source.id.ends_with(exp["sha256"].as_str().expect("sha")),
        "{}",
        source.id
    );
    let model = LoadedModel::<Cpu>::load(source.clone(), WeightLayout::Dense, &Default::default())
        .expect("load");
    for case in exp["tokenizer_cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            model.tokenizer.encode(text, false).expect("enc"),
            ids(&case["ids"]),
            "{text:?}"
        );
        assert_eq!(
            model
                .tokenizer
                .decode(&ids(&case["ids"]), false)
                .expect("dec"),
            case["decoded"].as_str().expect("d")
        );
    }
    let sample = &exp["chat_template_sample"];
    assert_eq!(
        model
            .tokenizer
            .apply_chat_template(&messages(&sample["messages"]), true)
            .expect("render"),
        sample["rendered_add_generation_prompt"]
            .as_str()
            .expect("s")
    );
    for case in exp["cases"].as_array().expect("cases") {
        let cname = case["name"].as_str().expect("name");
        let prompt = prompt_ids(&model, case);
        assert_eq!(
            prompt,
            ids(&case["prompt_token_ids"]),
            "{cname}: prompt ids"
        );
        let want = ids(&case["greedy_token_ids"]);
        let (logits, got) = greedy(&model, &prompt, want.len());
        let agree = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!("{cname}: {agree}/{} greedy tokens agree", want.len());
        assert!(
            agree >= 16,
            "{cname}: only the first {agree} greedy tokens agree: {got:?} vs {want:?}"
        );
        // The reference's top logits, at the last prompt position.
        let top_ids = ids(&case["last_logits_top_ids"]);
        let top_vals = floats(&case["last_logits_top_values"]);
        let diff = top_ids
            .iter()
            .zip(&top_vals)
            .map(|(&i, &v)| (logits[i as usize] - v).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-2, "{cname}: top-20 logits differ by {diff}");
    }
}

/// Top-20 logits of `logits` against a reference's ids and values.
fn top_logit_diff(logits: &[f32], reference: &Value) -> f32 {
    ids(&reference["last_logits_top_ids"])
        .iter()
        .zip(floats(&reference["last_logits_top_values"]))
        .map(|(&i, v)| (logits[i as usize] - v).abs())
        .fold(0.0, f32::max)
}

/// The packed layout, what a CPU worker runs: at one row per product it
/// quantizes activations to 8 bits as llama.cpp does, so it is held to the
/// issue's bar (16 greedy tokens agree with transformers) and to
/// transformers' top logits within a bound that allows for that rounding.
/// Agreement with llama.cpp is printed, not asserted: llama.cpp itself
/// agrees with transformers on 5, 0 and 32 tokens of these three cases.
#[test]
fn smollm2_gguf_packed_matches_transformers_and_llama_cpp() {
    let Some(path) = smollm2_or_skip() else {
        return;
    };
    let exp = expected(&fixture("smollm2-q4_1"));
    let source = ModelSource::from_path(&path).expect("source");
    let model =
        LoadedModel::<Cpu>::load(source, WeightLayout::Packed, &Default::default()).expect("load");
    for case in exp["cases"].as_array().expect("cases") {
        let cname = case["name"].as_str().expect("name");
        let prompt = ids(&case["prompt_token_ids"]);
        let want = ids(&case["greedy_token_ids"]);
        let (logits, got) = greedy(&model, &prompt, want.len());
        let llama = &case["llama_cpp"];
        let agree = |other: &[u32]| got.iter().zip(other).take_while(|(a, b)| a == b).count();
        let (with_hf, with_llama) = (agree(&want), agree(&ids(&llama["greedy_token_ids"])));
        let (hf_diff, llama_diff) = (
            top_logit_diff(&logits, case),
            top_logit_diff(&logits, llama),
        );
        eprintln!(
            "{cname}: {with_hf}/{} greedy tokens agree with transformers, {with_llama} with llama.cpp; \
             top-20 logits differ by {hf_diff} and {llama_diff}",
            want.len()
        );
        assert!(
            with_hf >= 16,
            "{cname}: {with_hf} tokens agree with transformers: {got:?}"
        );
        assert!(
            hf_diff < 0.25,
            "{cname}: top-20 logits differ from transformers' by {hf_diff}"
        );
    }
}

/// The packed layout against the dense one on the default model. With many
/// rows per product (here every prompt position) both multiply in f32 and
/// agree up to summation order; one row per product (a decode step) takes
/// the 8-bit integer path, which may stray by the activations' rounding.
#[test]
fn smollm2_packed_and_dense_layouts_agree() {
    let Some(path) = smollm2_or_skip() else {
        return;
    };
    let source = ModelSource::from_path(&path).expect("source");
    let load = |layout| {
        LoadedModel::<Cpu>::load(source.clone(), layout, &Default::default()).expect("load")
    };
    let (packed, dense) = (load(WeightLayout::Packed), load(WeightLayout::Dense));
    let prompt = packed
        .tokenizer
        .encode("The three primary colours are red, yellow and blue. The three primary colours are red, yellow and", false)
        .expect("encode");
    assert!(prompt.len() > 4, "the prompt must take the f32 path");
    let run = |model: &LoadedModel<Cpu>| {
        let t = &model.transformer;
        let mut cache = t.new_cache();
        let mut step = |tokens: &[u32], all: bool| {
            t.forward(
                &mut [Segment {
                    tokens,
                    cache: &mut cache,
                }],
                all,
            )
            .into_data()
            .to_vec::<f32>()
            .expect("logits")
        };
        let prompt_logits = step(&prompt, true);
        let decode_logits = step(&[*prompt.last().expect("prompt")], false);
        (prompt_logits, decode_logits)
    };
    let ((p_prompt, p_decode), (d_prompt, d_decode)) = (run(&packed), run(&dense));
    let prompt_diff = max_abs_diff(&p_prompt, &d_prompt);
    let decode_diff = max_abs_diff(&p_decode, &d_decode);
    eprintln!("prompt logits differ by {prompt_diff}, a decode step's by {decode_diff}");
    assert!(prompt_diff < 1e-3, "prompt logits differ by {prompt_diff}");
    assert!(decode_diff < 2.0, "decode logits differ by {decode_diff}");
    assert!(
        decode_diff > 0.0,
        "the decode step did not take the integer path"
    );
    let (p_next, d_next) = (argmax(&p_decode), argmax(&d_decode));
    assert_eq!(p_next, d_next, "the decode step picks a different token");
}

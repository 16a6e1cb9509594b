//! How close a loaded model comes to an independent reference, on any
//! backend and in any precision.
//!
//! Two measures, both read from fixtures the reference scripts write:
//! - **Fixture cases** (`expected.json`, `inference/reference/make_fixtures.py`):
//!   for a prompt, transformers' logits at its last position (and, for some
//!   cases, at every position) and its greedy continuation. [`run_cases`]
//!   runs each case and reports the largest logit difference and the greedy
//!   tokens, with the reference's margins, so a caller can hold the tokens
//!   to the reference wherever the reference's top two are far apart.
//! - **Teacher-forced fidelity** (`fidelity.json`, `make_fidelity.py`): the
//!   next-token distribution at every position of a fixed text, scored as
//!   llama.cpp scores its own quantizations (mean KL divergence from the
//!   reference, share of the same top token, perplexity); [`teacher_forced`].
//!
//! The test suite holds every CPU path to these; `silk bench fidelity` runs
//! the same code on a GPU.

use std::path::Path;

use burn::prelude::Backend;
use serde::Deserialize;

use crate::error::{InferenceError, Result};
use crate::model::LoadedModel;
use crate::sampling::argmax;
use crate::tokenizer::ChatMessage;
use crate::transformer::{Precision, Segment};

/// `expected.json` of a fixture directory (the fields these checks read).
#[derive(Debug, Clone, Deserialize)]
pub struct Expected {
    /// One prompt each.
    pub cases: Vec<Case>,
}

/// One prompt and what the reference made of it.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    /// Short name.
    pub name: String,
    /// `chat` (rendered with the model's template) or `text`.
    pub kind: String,
    /// The text of a `text` case.
    #[serde(default)]
    pub prompt: Option<String>,
    /// The conversation of a `chat` case.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// Whether the tokenizer adds its special tokens (`text` cases).
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    /// The reference's token ids of the prompt.
    pub prompt_token_ids: Vec<u32>,
    /// The reference's logits at the prompt's last position.
    pub last_logits: Vec<f32>,
    /// The reference's logits at every prompt position, where recorded.
    #[serde(default)]
    pub all_logits: Option<Vec<Vec<f32>>>,
    /// The reference's greedy continuation (EOS ignored).
    pub greedy_token_ids: Vec<u32>,
    /// At each greedy step, how far the reference's top logit is above its
    /// second.
    pub greedy_margins: Vec<f32>,
}

fn yes() -> bool {
    true
}

impl Expected {
    /// Reads `dir/expected.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        read_json(&dir.join("expected.json"))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| InferenceError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| InferenceError::format(path, e.to_string()))
}

/// What one case gave on the model under test.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseReport {
    /// The case's name.
    pub name: String,
    /// Our tokenizer gave the reference's prompt ids.
    pub prompt_ids_match: bool,
    /// Largest |logit − reference| at the prompt's last position.
    pub last_logit_diff: f32,
    /// The same over every prompt position, where the reference has them.
    pub all_positions_diff: Option<f32>,
    /// Our greedy tokens, as many as the reference's.
    pub greedy: Vec<u32>,
    /// The reference's.
    pub expected: Vec<u32>,
    /// Greedy steps before the reference's first near-tie (top two closer
    /// than the `far_apart` given to [`run_cases`]): where any faithful
    /// implementation must pick the reference's tokens.
    pub decided: usize,
    /// Our logits at the prompt's last position.
    #[serde(skip)]
    pub last_logits: Vec<f32>,
}

impl CaseReport {
    /// Leading greedy tokens equal to the reference's.
    pub fn agreeing(&self) -> usize {
        self.greedy
            .iter()
            .zip(&self.expected)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Every decided step picks the reference's token.
    pub fn agrees_where_decided(&self) -> bool {
        self.agreeing() >= self.decided
    }
}

/// The prompt of `case` in token ids, by our tokenizer and chat template.
pub fn prompt_ids<B: Backend>(model: &LoadedModel<B>, case: &Case) -> Result<Vec<u32>> {
    let text = match (case.kind.as_str(), &case.messages) {
        ("chat", Some(messages)) => {
            let rendered = model.tokenizer.apply_chat_template(messages, true)?;
            return model.tokenizer.encode(&rendered, false);
        }
        _ => case.prompt.as_deref().ok_or_else(|| {
            InferenceError::format("expected.json", format!("case {}: no prompt", case.name))
        })?,
    };
    model.tokenizer.encode(text, case.add_special_tokens)
}

/// Prefill, then greedy decoding through the cache, EOS ignored: the
/// prompt's last logits and `n` tokens.
pub fn greedy<B: Backend>(
    model: &LoadedModel<B>,
    prompt: &[u32],
    n: usize,
) -> (Vec<f32>, Vec<u32>) {
    let t = &model.transformer;
    let mut cache = t.new_cache();
    let first = logits(t.forward(
        &mut [Segment {
            tokens: prompt,
            cache: &mut cache,
        }],
        false,
    ));
    let mut next = argmax(&first);
    let mut out = vec![next];
    while out.len() < n {
        let l = logits(t.forward(
            &mut [Segment {
                tokens: &[next],
                cache: &mut cache,
            }],
            false,
        ));
        next = argmax(&l);
        out.push(next);
    }
    (first, out)
}

/// A forward pass's logits on the host (f32 in every precision).
fn logits<B: Backend>(t: burn::tensor::Tensor<B, 2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32 just above")
}

/// Runs every case of `expected` on `model`. A greedy step is decided where
/// the reference's top two logits are at least `far_apart` apart.
pub fn run_cases<B: Backend>(
    model: &LoadedModel<B>,
    expected: &Expected,
    far_apart: f32,
) -> Result<Vec<CaseReport>> {
    let mut reports = Vec::with_capacity(expected.cases.len());
    for case in &expected.cases {
        let prompt = prompt_ids(model, case)?;
        let prompt_ids_match = prompt == case.prompt_token_ids;
        // The reference's prompt, so a tokenizer difference shows as such
        // and not also as every logit being off.
        let n = case.greedy_token_ids.len();
        let (last_logits, greedy) = greedy(model, &case.prompt_token_ids, n);
        let all_positions_diff = case.all_logits.as_ref().map(|all| {
            let mut cache = model.transformer.new_cache();
            let ours = logits(model.transformer.forward(
                &mut [Segment {
                    tokens: &case.prompt_token_ids,
                    cache: &mut cache,
                }],
                true,
            ));
            let reference: Vec<f32> = all.iter().flatten().copied().collect();
            max_abs_diff(&ours, &reference)
        });
        reports.push(CaseReport {
            name: case.name.clone(),
            prompt_ids_match,
            last_logit_diff: max_abs_diff(&last_logits, &case.last_logits),
            all_positions_diff,
            expected: case.greedy_token_ids.clone(),
            decided: case
                .greedy_margins
                .iter()
                .position(|&m| m < far_apart)
                .unwrap_or(n),
            greedy,
            last_logits,
        });
    }
    Ok(reports)
}

/// Largest |a − b| over two equally long vectors (infinite where the
/// lengths differ, so a shape mismatch never passes as agreement).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `fidelity.json` (written by `inference/reference/make_fidelity.py`).
#[derive(Debug, Deserialize)]
pub struct Fidelity {
    /// SHA-256 of the GGUF file it was measured on.
    pub sha256: String,
    /// How many of the reference's top tokens each position keeps.
    pub top_k: usize,
    /// Scored positions over all segments.
    pub positions: usize,
    /// The reference's own perplexity over the text.
    pub reference_ppl: f64,
    /// llama.cpp's path on the same file, measured the same way.
    pub llama_cpp: LlamaCpp,
    /// The text, in pieces.
    pub segments: Vec<FidelitySegment>,
}

impl Fidelity {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Self> {
        read_json(path)
    }
}

/// llama.cpp's agreement with the reference.
#[derive(Debug, Deserialize)]
pub struct LlamaCpp {
    /// The llama-cpp-python version measured.
    pub llama_cpp_python: String,
    /// Mean KL divergence over the reference's top K plus the rest.
    pub mean_kld: f64,
    /// The same over the whole vocabulary.
    pub mean_kld_full_vocab: f64,
    /// Share of positions whose top token is the reference's.
    pub same_top1: f64,
    /// Its perplexity over the text.
    pub ppl: f64,
}

/// One piece of the fidelity text.
#[derive(Debug, Deserialize)]
pub struct FidelitySegment {
    /// Short name.
    pub name: String,
    /// `chat` or `text`.
    pub kind: String,
    /// The text (a chat rendered with the template).
    pub text: String,
    /// The conversation of a `chat` segment.
    pub messages: Option<Vec<ChatMessage>>,
    /// Whether the tokenizer adds its special tokens.
    pub add_special_tokens: bool,
    /// The reference's token ids of the text.
    pub token_ids: Vec<u32>,
    /// The reference's prediction at each position.
    pub positions: Positions,
}

/// Per position `t`, the reference's prediction of `token_ids[t + 1]`.
#[derive(Debug, Deserialize)]
pub struct Positions {
    /// Its top-K token ids, most likely first, and their logits.
    pub top_ids: Vec<Vec<u32>>,
    /// The logits of `top_ids`.
    pub top_logits: Vec<Vec<f32>>,
    /// log Σ exp(logits) over the whole vocabulary.
    pub lse: Vec<f64>,
    /// log of the probability of every token outside the top K.
    pub tail_logprob: Vec<f64>,
}

/// A path's agreement with the reference over the fidelity text.
#[derive(Debug, Default)]
pub struct Tally {
    kl: f64,
    same_top1: usize,
    nll: f64,
    /// Positions scored.
    pub positions: usize,
    /// Largest |log p − reference log p| over each position's top K.
    pub max_logprob_err: f64,
    /// The path's top-1 token at every position.
    pub top1: Vec<u32>,
}

impl Tally {
    /// Scores one position: `logits` (the whole vocabulary) for the token
    /// after position `t` of `seg`. KL divergence is over K + 1 outcomes, the
    /// reference's top K and "any other token", as the fixture's script
    /// computes it for llama.cpp.
    pub fn score(&mut self, seg: &FidelitySegment, t: usize, logits: &[f32]) {
        let p = &seg.positions;
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let lse = f64::from(max)
            + logits
                .iter()
                .map(|&v| f64::from(v - max).exp())
                .sum::<f64>()
                .ln();
        let logq = |id: u32| f64::from(logits[id as usize]) - lse;
        let mut kl = 0.0;
        for (&id, &z) in p.top_ids[t].iter().zip(&p.top_logits[t]) {
            let logp = f64::from(z) - p.lse[t];
            let lq = logq(id);
            kl += logp.exp() * (logp - lq);
            self.max_logprob_err = self.max_logprob_err.max((logp - lq).abs());
        }
        // The path's tail, summed directly rather than as 1 − its top K.
        let mut in_top = vec![false; logits.len()];
        for &id in &p.top_ids[t] {
            in_top[id as usize] = true;
        }
        let q_tail: f64 = logits
            .iter()
            .zip(&in_top)
            .filter(|(_, &top)| !top)
            .map(|(&v, _)| (f64::from(v) - lse).exp())
            .sum();
        let tail = p.tail_logprob[t];
        if tail.is_finite() {
            kl += tail.exp() * (tail - q_tail.max(f64::MIN_POSITIVE).ln());
        }
        self.kl += kl;
        let top1 = argmax(logits);
        self.same_top1 += usize::from(top1 == p.top_ids[t][0]);
        self.top1.push(top1);
        self.nll -= logq(seg.token_ids[t + 1]);
        self.positions += 1;
    }

    /// Mean KL divergence from the reference.
    pub fn mean_kld(&self) -> f64 {
        self.kl / self.positions as f64
    }

    /// Share of positions whose top token is the reference's.
    pub fn same_top1(&self) -> f64 {
        self.same_top1 as f64 / self.positions as f64
    }

    /// Perplexity of the text.
    pub fn ppl(&self) -> f64 {
        (self.nll / self.positions as f64).exp()
    }
}

/// Feeds each segment through `model` `chunk` tokens per forward pass,
/// teacher-forced, and scores every position.
pub fn teacher_forced<B: Backend>(
    model: &LoadedModel<B>,
    fidelity: &Fidelity,
    chunk: usize,
) -> Tally {
    let t = &model.transformer;
    let vocab = t.config().vocab_size;
    let mut tally = Tally::default();
    for seg in &fidelity.segments {
        let mut cache = t.new_cache();
        let scored = seg.token_ids.len() - 1;
        let mut at = 0;
        while at < scored {
            let tokens = &seg.token_ids[at..(at + chunk).min(scored)];
            let rows = logits(t.forward(
                &mut [Segment {
                    tokens,
                    cache: &mut cache,
                }],
                true,
            ));
            for (i, row) in rows.chunks_exact(vocab).enumerate() {
                tally.score(seg, at + i, row);
            }
            at += tokens.len();
        }
    }
    tally
}

/// Checks that our tokenizer and chat template give the fixture's token ids
/// for every segment; the first mismatch is an error naming the segment.
pub fn check_fidelity_tokens<B: Backend>(
    model: &LoadedModel<B>,
    fidelity: &Fidelity,
) -> Result<()> {
    for seg in &fidelity.segments {
        let text = match (seg.kind.as_str(), &seg.messages) {
            ("chat", Some(messages)) => {
                let rendered = model.tokenizer.apply_chat_template(messages, false)?;
                if rendered != seg.text {
                    return Err(mismatch(&seg.name, "rendered chat"));
                }
                rendered
            }
            _ => seg.text.clone(),
        };
        if model.tokenizer.encode(&text, seg.add_special_tokens)? != seg.token_ids {
            return Err(mismatch(&seg.name, "token ids"));
        }
    }
    Ok(())
}

fn mismatch(segment: &str, what: &str) -> InferenceError {
    InferenceError::format(
        "fidelity.json",
        format!("segment {segment}: our {what} differ from the reference's"),
    )
}

/// How far f32 logits may be from the f32 reference.
pub const F32_LOGIT_TOLERANCE: f32 = 1e-3;

/// How far bf16 logits may be from the f32 reference, as a multiple of how
/// far transformers' own bf16 logits are on the same case
/// (`expected_bf16.json`, `inference/reference/make_bf16_reference.py`).
/// bf16 keeps 8 significant bits, so two bf16 implementations round in
/// different places (where a product rounds its output, whether attention
/// keeps f32) and land at errors of the same size, not the same values.
pub const BF16_ERROR_FACTOR: f32 = 2.0;

/// Where the reference's top two logits are at least this far apart, a
/// faithful f32 path on a quantized model picks the reference's token (the
/// packed CPU decode path's worst log-probability error was 0.62 when this
/// was set).
pub const FAR_APART: f32 = 2.0;

/// `expected_bf16.json`: transformers' own bf16 path on a tiny fixture.
#[derive(Debug, Deserialize)]
pub struct Bf16Reference {
    /// transformers' version.
    pub transformers: String,
    /// One per case of `expected.json`, in order.
    pub cases: Vec<Bf16Case>,
}

/// transformers' bf16 result for one case.
#[derive(Debug, Deserialize)]
pub struct Bf16Case {
    /// The case's name.
    pub name: String,
    /// Its last-position logits (as f32).
    pub last_logits: Vec<f32>,
    /// Largest |logit − f32 reference| of those.
    pub max_abs_diff_vs_f32: f32,
    /// The same over every prompt position, for the case whose f32
    /// reference has them.
    #[serde(default)]
    pub all_positions_max_abs_diff_vs_f32: Option<f32>,
}

impl Bf16Reference {
    /// Reads `dir/expected_bf16.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        read_json(&dir.join("expected_bf16.json"))
    }
}

/// One tiny fixture's cases in one precision, with the bound each was held to.
#[derive(Debug, serde::Serialize)]
pub struct FixtureReport {
    /// The fixture directory's name.
    pub fixture: String,
    /// The cases, each with its bound.
    pub cases: Vec<BoundedCase>,
}

/// A case and the logit bound it was held to.
#[derive(Debug, serde::Serialize)]
pub struct BoundedCase {
    /// What the case gave.
    #[serde(flatten)]
    pub report: CaseReport,
    /// Largest |logit − f32 reference| allowed at the last position.
    pub bound: f32,
    /// The same over every prompt position.
    pub all_positions_bound: f32,
    /// transformers' own bf16 distance on this case (bf16 runs only).
    pub transformers_bf16_diff: Option<f32>,
    /// Within the bound and agreeing wherever decided.
    pub pass: bool,
}

/// Runs the cases of the tiny fixture in `dir` on `model` (loaded in
/// `precision`) and holds each to the bound of its precision: f32 logits
/// within [`F32_LOGIT_TOLERANCE`], bf16 ones within [`BF16_ERROR_FACTOR`]
/// times transformers' own bf16 error; greedy tokens equal the reference's
/// up to its first step whose top two are closer than twice the bound.
pub fn check_fixture<B: Backend>(
    model: &LoadedModel<B>,
    dir: &Path,
    precision: Precision,
) -> Result<FixtureReport> {
    let expected = Expected::read(dir)?;
    let bf16 = match precision {
        Precision::F32 => None,
        Precision::Bf16 => Some(Bf16Reference::read(dir)?),
    };
    let mut cases = Vec::with_capacity(expected.cases.len());
    for (i, case) in expected.cases.iter().enumerate() {
        let hf =
            match &bf16 {
                Some(r) => Some(r.cases.get(i).filter(|c| c.name == case.name).ok_or_else(
                    || {
                        InferenceError::format(
                            dir.join("expected_bf16.json"),
                            format!("no entry for case {}", case.name),
                        )
                    },
                )?),
                None => None,
            };
        let reference_bf16 = hf.map(|c| c.max_abs_diff_vs_f32);
        let bound = reference_bf16.map_or(F32_LOGIT_TOLERANCE, |d| BF16_ERROR_FACTOR * d);
        let all_positions_bound = match hf {
            None => F32_LOGIT_TOLERANCE,
            Some(c) => BF16_ERROR_FACTOR * c.all_positions_max_abs_diff_vs_f32.unwrap_or(0.0),
        };
        let one = Expected {
            cases: vec![case.clone()],
        };
        let report = run_cases(model, &one, 2.0 * bound)?.remove(0);
        let pass = report.prompt_ids_match
            && report.last_logit_diff <= bound
            && report
                .all_positions_diff
                .is_none_or(|d| d <= all_positions_bound)
            && report.agrees_where_decided();
        cases.push(BoundedCase {
            report,
            bound,
            all_positions_bound,
            transformers_bf16_diff: reference_bf16,
            pass,
        });
    }
    Ok(FixtureReport {
        fixture: dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("fixture")
            .to_string(),
        cases,
    })
}

/// The teacher-forced measure of a GGUF model against its `fidelity.json`.
#[derive(Debug, serde::Serialize)]
pub struct FidelityReport {
    /// Positions scored.
    pub positions: usize,
    /// Mean KL divergence from the f32 reference.
    pub mean_kld: f64,
    /// Share of positions with the reference's top token.
    pub same_top1: f64,
    /// Perplexity of the text, and the reference's own.
    pub ppl: f64,
    /// The f32 reference's perplexity.
    pub reference_ppl: f64,
    /// llama.cpp's mean KLD and same-top-1 on the same file.
    pub llama_cpp_mean_kld: f64,
    /// llama.cpp's share of the reference's top token.
    pub llama_cpp_same_top1: f64,
    /// Largest |log p − reference log p| over each position's top K.
    pub max_logprob_err: f64,
    /// Positions whose reference top two are at least [`FAR_APART`] apart.
    pub decided: usize,
    /// Of those, positions where the path picks the reference's token.
    pub decided_agree: usize,
}

/// Scores `model` over `fidelity` in whole-segment passes (checking its
/// tokenizer first).
pub fn check_fidelity<B: Backend>(
    model: &LoadedModel<B>,
    fidelity: &Fidelity,
) -> Result<FidelityReport> {
    check_fidelity_tokens(model, fidelity)?;
    let tally = teacher_forced(model, fidelity, usize::MAX);
    let (mut decided, mut decided_agree, mut at) = (0, 0, 0);
    for seg in &fidelity.segments {
        let p = &seg.positions;
        for t in 0..seg.token_ids.len() - 1 {
            if p.top_logits[t][0] - p.top_logits[t][1] >= FAR_APART {
                decided += 1;
                decided_agree += usize::from(tally.top1[at] == p.top_ids[t][0]);
            }
            at += 1;
        }
    }
    Ok(FidelityReport {
        positions: tally.positions,
        mean_kld: tally.mean_kld(),
        same_top1: tally.same_top1(),
        ppl: tally.ppl(),
        reference_ppl: fidelity.reference_ppl,
        llama_cpp_mean_kld: fidelity.llama_cpp.mean_kld,
        llama_cpp_same_top1: fidelity.llama_cpp.same_top1,
        max_logprob_err: tally.max_logprob_err,
        decided,
        decided_agree,
    })
}

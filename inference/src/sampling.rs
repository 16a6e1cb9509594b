//! Choosing the next token from logits: greedy, or temperature with top-k,
//! min-p and top-p (nucleus) filtering, from a seeded generator so that a
//! request with a seed gets the same tokens every time. Before either, the
//! logits are adjusted as OpenAI and vLLM define: `logit_bias` added,
//! `repetition_penalty` (vLLM's) on every token of the prompt and the
//! answer, `frequency_penalty` and `presence_penalty` on the answer's.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{InferenceError, Result};

/// How to pick tokens. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature, 0 to 2; 0 is greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this (0, 1].
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Seed for reproducible sampling; random when absent.
    pub seed: Option<u64>,
    /// Subtracted from the logit of every token the answer already holds,
    /// once, -2 to 2 (OpenAI's).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time the answer holds it,
    /// -2 to 2 (OpenAI's).
    pub frequency_penalty: f32,
    /// Divides the positive logits (multiplies the negative ones) of every
    /// token in the prompt or the answer; 1 is off, (0, 2] (vLLM's).
    pub repetition_penalty: f32,
    /// Drops tokens less likely than this share of the most likely one,
    /// [0, 1]; 0 is off.
    pub min_p: f32,
    /// Added to a token's logit, -100 to 100, at most [`MAX_LOGIT_BIAS`]
    /// tokens (OpenAI's; -100 bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

/// Most tokens one request may bias (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            min_p: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(InferenceError::InvalidRequest {
                field: "temperature",
                reason: format!("is {}, must be between 0 and 2", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InferenceError::InvalidRequest {
                field: "top_p",
                reason: format!("is {}, must be in (0, 1]", self.top_p),
            });
        }
        let invalid = |field: &'static str, reason: String| {
            Err(InferenceError::InvalidRequest { field, reason })
        };
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return invalid(field, format!("is {v}, must be between -2 and 2"));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return invalid(
                "repetition_penalty",
                format!("is {}, must be in (0, 2]", self.repetition_penalty),
            );
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid(
                "min_p",
                format!("is {}, must be between 0 and 1", self.min_p),
            );
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return invalid(
                "logit_bias",
                format!(
                    "biases {} tokens, at most {MAX_LOGIT_BIAS} are allowed",
                    self.logit_bias.len()
                ),
            );
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return invalid(
                "logit_bias",
                format!("the bias of token {id} is {b}, must be between -100 and 100"),
            );
        }
        Ok(())
    }

    /// Whether the logits need adjusting before sampling.
    fn adjusts(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
    }
}

/// What the penalties look at: the prompt's tokens and how often the answer
/// (continuation included) holds each token.
#[derive(Debug, Default, Clone)]
pub struct History {
    prompt: HashSet<u32>,
    answer: HashMap<u32, u32>,
}

impl History {
    /// A history of `prompt` and an empty answer.
    pub fn new(prompt: &[u32]) -> Self {
        Self {
            prompt: prompt.iter().copied().collect(),
            answer: HashMap::new(),
        }
    }

    /// The answer got `token`.
    pub fn push(&mut self, token: u32) {
        *self.answer.entry(token).or_default() += 1;
    }
}

/// A sampler with its own random state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`, or from the OS when absent.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Picks the next token after `history`.
    pub fn sample(&mut self, logits: &[f32], history: &History) -> u32 {
        if !self.params.adjusts() {
            return self.pick(logits);
        }
        let mut adjusted = logits.to_vec();
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = adjusted.get_mut(id as usize) {
                *l += bias;
            }
        }
        let r = self.params.repetition_penalty;
        if r != 1.0 {
            for &id in history.prompt.iter().chain(history.answer.keys()) {
                if let Some(l) = adjusted.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
            // A token in both the prompt and the answer was penalised
            // twice: undo once.
            for id in history
                .answer
                .keys()
                .filter(|id| history.prompt.contains(id))
            {
                if let Some(l) = adjusted.get_mut(*id as usize) {
                    *l = if *l > 0.0 { *l * r } else { *l / r };
                }
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&id, &count) in &history.answer {
                if let Some(l) = adjusted.get_mut(id as usize) {
                    *l -= presence + frequency * count as f32;
                }
            }
        }
        self.pick(&adjusted)
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 1e-6 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        let k = self.params.top_k;
        if k > 0 && k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            candidates.truncate(k);
        }
        candidates.sort_unstable_by(by_logit_desc);
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.min_p > 0.0 {
            // Sorted by probability: keep the head above the floor.
            let floor = self.params.min_p * probs[0];
            let keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
            probs.truncate(keep);
        }
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let mass: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * mass;
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return candidates[i].0;
            }
            r -= p;
        }
        candidates[probs.len() - 1].0
    }
}

/// Most alternatives a request may ask log-probabilities for (OpenAI's
/// `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// A generated token's log-probability and the most likely alternatives
/// at its step, from the model's distribution (the raw logits, before
/// penalties, bias and temperature, as vLLM reports by default).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    /// The token's bytes (a token can hold part of a character).
    pub bytes: Vec<u8>,
    /// Its natural-log probability (≤ 0).
    pub logprob: f32,
    /// The most likely tokens at this step, best first.
    pub top: Vec<TopLogprob>,
}

/// One alternative in [`TokenLogprob::top`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TopLogprob {
    /// Token id.
    pub id: u32,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its natural-log probability (≤ 0).
    pub logprob: f32,
}

/// The log-probability of `token` under `logits` and the `k` most likely
/// tokens with theirs, best first (ties by lower id).
pub fn logprobs(logits: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return (f32::NEG_INFINITY, Vec::new());
    }
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |l: f32| {
        if l.is_finite() {
            (f64::from(l) - lse).min(0.0) as f32
        } else {
            f32::NEG_INFINITY
        }
    };
    let chosen = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| lp(l));
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut all: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = k.min(all.len());
        if k > 0 && k < all.len() {
            all.select_nth_unstable_by(k - 1, by_logit);
            all.truncate(k);
        }
        all.sort_unstable_by(by_logit);
        top = all.into_iter().map(|(i, l)| (i, lp(l))).collect();
    }
    (chosen, top)
}

/// Index of the largest logit (the first one on ties, as torch does).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.0, -1.0, 5.0], &History::default()), 2);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different_tokens() {
        let params = |seed| SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ..Default::default()
        };
        let none = History::default();
        let run = |seed| {
            let mut s = Sampler::new(params(seed));
            (0..64)
                .map(|_| s.sample(&logits(), &none))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_excludes_the_tail() {
        let l = logits();
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.5,
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        });
        let none = History::default();
        assert!((0..20).all(|_| s.sample(&l, &none) == argmax(&l)));

        // Two tokens hold nearly all the mass; top_p 0.5 keeps only the best.
        let l = [10.0, 9.9, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(3),
            ..Default::default()
        });
        assert!((0..50).all(|_| s.sample(&l, &none) == 0));
    }

    #[test]
    fn logprobs_are_a_normalised_log_softmax_with_the_best_first() {
        let l = [1.0f32, 3.0, 3.0, f32::NEG_INFINITY, 0.5];
        let (chosen, top) = logprobs(&l, 4, 3);
        let z: f64 = [1.0f64, 3.0, 3.0, 0.5].iter().map(|x| x.exp()).sum();
        assert!((f64::from(chosen) - (0.5 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        let mass: f64 = (0..5).map(|i| f64::from(logprobs(&l, i, 0).0).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-6, "{mass}");
        assert_eq!(logprobs(&l, 3, 0).0, f32::NEG_INFINITY);
        assert!(top.iter().all(|t| t.1 <= 0.0));
        // More alternatives than tokens: every finite one.
        assert_eq!(logprobs(&l, 0, 20).1.len(), 4);
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_best() {
        // Token 0 holds e^0 / (e^0 + e^-1 + 2 e^-5): tokens 2 and 3 are
        // under 1% of it, token 1 is 37% of it.
        let l = [5.0, 4.0, 0.0, 0.0];
        let none = History::default();
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.1,
            seed: Some(5),
            ..Default::default()
        });
        let drawn: HashSet<u32> = (0..400).map(|_| s.sample(&l, &none)).collect();
        assert_eq!(drawn, HashSet::from([0, 1]));
    }

    #[test]
    fn penalties_and_bias_move_greedy_choices_as_openai_and_vllm_define() {
        let l = [2.0, 1.5, 1.0, -1.0];
        let greedy = |p: SamplingParams, h: &History| Sampler::new(p).sample(&l, h);
        let mut h = History::new(&[3]);
        h.push(0);
        h.push(0);
        h.push(1);
        // Nothing set: the best logit.
        assert_eq!(greedy(SamplingParams::default(), &h), 0);
        // presence 0.6: 1.4, 0.9, 1.0 → token 0 still best.
        let p = |presence, frequency| SamplingParams {
            presence_penalty: presence,
            frequency_penalty: frequency,
            ..Default::default()
        };
        assert_eq!(greedy(p(0.6, 0.0), &h), 0);
        // frequency 0.4: 2 - 0.8 = 1.2, 1.5 - 0.4 = 1.1, 1.0 → 0 still.
        assert_eq!(greedy(p(0.0, 0.4), &h), 0);
        // Both: 2 - 0.5 - 0.8 = 0.7, 1.5 - 0.5 - 0.4 = 0.6, 1.0 → token 2.
        assert_eq!(greedy(p(0.5, 0.4), &h), 2);
        // A negative penalty rewards repeats.
        let mut once = History::default();
        once.push(1);
        assert_eq!(greedy(p(-1.0, 0.0), &once), 1);
        // Repetition 2: 1.0, 0.75 for answer tokens, 1.0; the prompt token 3
        // goes to -2. Ties go to the first: token 0.
        let r = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        assert_eq!(greedy(r.clone(), &h), 0);
        // Under it a token in both prompt and answer is penalised once.
        let mut both = History::new(&[0]);
        both.push(0);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            logit_bias: vec![(2, -0.4)],
            ..Default::default()
        });
        // 2 / 1.5 = 1.33 < 1.5: token 1.
        assert_eq!(s.sample(&l, &both), 1);
        // A bias of -100 bans a token; one past the vocabulary changes nothing.
        let ban = SamplingParams {
            logit_bias: vec![(0, -100.0), (99, 100.0)],
            ..Default::default()
        };
        assert_eq!(greedy(ban, &History::default()), 1);
    }

    #[test]
    fn out_of_range_parameters_are_rejected_by_name() {
        let p = SamplingParams {
            temperature: 3.0,
            ..Default::default()
        };
        assert!(p
            .validate()
            .expect_err("t")
            .to_string()
            .contains("temperature"));
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().expect_err("p").to_string().contains("top_p"));
        for (p, field) in [
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(1, 101.0)],
                    ..Default::default()
                },
                "logit_bias",
            ),
            (
                SamplingParams {
                    logit_bias: (0..301).map(|i| (i, 1.0)).collect(),
                    ..Default::default()
                },
                "logit_bias",
            ),
        ] {
            let e = p.validate().expect_err(field).to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}

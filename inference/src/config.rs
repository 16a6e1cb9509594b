//! Model hyper-parameters, read from a Hugging Face `config.json` or from
//! GGUF metadata, and checked before any weight is touched.

use serde_json::Value as Json;

use crate::error::{InferenceError, Result};
use crate::gguf::{GgufFile, Value};

/// The transformer variants this engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama family: SmolLM2, TinyLlama, Llama 3.x.
    Llama,
    /// Qwen3: Llama plus RMSNorm on queries and keys, explicit head size.
    Qwen3,
}

/// How rotary position frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by a factor.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// Everything the transformer needs to know about its shape.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Which variant.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Context window in tokens.
    pub max_position_embeddings: usize,
    /// Whether the output projection reuses the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(json: &Json) -> Result<Self> {
        let arch = json
            .get("model_type")
            .and_then(Json::as_str)
            .ok_or_else(|| InferenceError::config("model_type", "missing"))?;
        let architecture = match arch {
            "llama" => Architecture::Llama,
            "qwen3" => Architecture::Qwen3,
            other => return Err(InferenceError::UnsupportedArchitecture(other.to_string())),
        };
        let usize_field = |name: &str| -> Result<usize> {
            json.get(name)
                .and_then(Json::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| InferenceError::config(name, "missing or not a positive integer"))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_heads = usize_field("num_attention_heads")?;
        let num_kv_heads = match json.get("num_key_value_heads") {
            Some(Json::Null) | None => num_heads,
            Some(_) => usize_field("num_key_value_heads")?,
        };
        let head_dim = match json.get("head_dim") {
            Some(Json::Null) | None => hidden_size / num_heads.max(1),
            Some(_) => usize_field("head_dim")?,
        };
        let rope_theta = match (json.get("rope_theta"), json.get("rope_parameters")) {
            (Some(v), _) => v
                .as_f64()
                .ok_or_else(|| InferenceError::config("rope_theta", "not a number"))?,
            (None, Some(p)) => p
                .get("rope_theta")
                .and_then(Json::as_f64)
                .unwrap_or(10_000.0),
            (None, None) => 10_000.0,
        };
        // transformers 5 writes rope settings under `rope_parameters`; older
        // configs use `rope_scaling`.
        let scaling = json
            .get("rope_scaling")
            .filter(|v| !v.is_null())
            .or_else(|| json.get("rope_parameters"));
        let rope_scaling = rope_scaling_from_json(scaling)?;
        let config = Self {
            architecture,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers: usize_field("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: json
                .get("rms_norm_eps")
                .and_then(Json::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_field("max_position_embeddings")?,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the `{arch}.*` metadata of a GGUF file. `tie_word_embeddings`
    /// is decided by the caller from whether `output.weight` exists.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| InferenceError::config("general.architecture", "missing"))?;
        let architecture = match arch {
            "llama" => Architecture::Llama,
            "qwen3" => Architecture::Qwen3,
            other => return Err(InferenceError::UnsupportedArchitecture(other.to_string())),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let int = |k: &str| -> Result<usize> {
            let name = key(k);
            file.get(&name)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| InferenceError::config(name, "missing or not an integer"))
        };
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = int("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = int("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => file
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(<[Value]>::len)
                .ok_or_else(|| InferenceError::config(key("vocab_size"), "missing"))?,
        };
        let float = |k: &str| file.get(&key(k)).and_then(Value::as_f64);
        let rope_scaling = match file.get(&key("rope.scaling.type")).and_then(Value::as_str) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: float("rope.scaling.factor").unwrap_or(1.0),
            },
            Some(other) => {
                return Err(InferenceError::config(
                    key("rope.scaling.type"),
                    format!("`{other}` is not supported (none, linear)"),
                ))
            }
        };
        let config = Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: int("context_length")?,
            tie_word_embeddings: !file.tensors.contains_key("output.weight"),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(InferenceError::config(field, "must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(InferenceError::config(
                "num_key_value_heads",
                format!(
                    "{} query heads cannot be grouped over {} key/value heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(InferenceError::config("head_dim", "must be even for RoPE"));
        }
        if self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
            || self.rms_norm_eps.is_nan()
            || self.rms_norm_eps <= 0.0
        {
            return Err(InferenceError::config(
                "rope_theta / rms_norm_eps",
                "must be positive numbers",
            ));
        }
        Ok(())
    }

    /// The inverse frequencies of RoPE, one per pair of dimensions, with the
    /// configured scaling applied (as transformers computes them).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

fn rope_scaling_from_json(value: Option<&Json>) -> Result<RopeScaling> {
    let Some(obj) = value.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Json::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        obj.get(k)
            .and_then(Json::as_f64)
            .ok_or_else(|| InferenceError::config(format!("rope_scaling.{k}"), "missing"))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(InferenceError::config(
                "rope_scaling.rope_type",
                format!("`{other}` is not supported (default, linear, llama3)"),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Json {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 32
        })
    }

    #[test]
    fn unsupported_architecture_and_bad_fields_are_named() {
        let mut j = base();
        j["model_type"] = "mamba".into();
        let msg = ModelConfig::from_hf_json(&j).expect_err("arch").to_string();
        assert!(msg.contains("mamba"), "{msg}");

        let mut j = base();
        j["num_key_value_heads"] = 3.into();
        let msg = ModelConfig::from_hf_json(&j).expect_err("gqa").to_string();
        assert!(msg.contains("num_key_value_heads"), "{msg}");

        let mut j = base();
        j["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let msg = ModelConfig::from_hf_json(&j).expect_err("yarn").to_string();
        assert!(msg.contains("yarn"), "{msg}");
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut j = base();
        j["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64
        });
        let c = ModelConfig::from_hf_json(&j).expect("config");
        let plain = ModelConfig {
            rope_scaling: RopeScaling::None,
            ..c.clone()
        };
        let (scaled, base) = (c.rope_inv_freq(), plain.rope_inv_freq());
        assert_eq!(scaled[0], base[0]);
        // head_dim 4: wavelengths 2π (< 64/4, kept) and 200π (> 64, divided).
        assert!((scaled[1] - base[1] / 8.0).abs() < 1e-12);
    }
}

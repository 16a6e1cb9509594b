//! Where each weight lives in a Hugging Face checkpoint and in a GGUF file:
//! one table, and readers for both formats that hand out f32 tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::config::{Architecture, ModelConfig};
use crate::error::{InferenceError, Result};
use crate::gguf::GgufFile;
use crate::packed::{BlockFormat, PackedMatrix};

/// One weight of the model, named our way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightName {
    /// Token embedding, `[vocab, hidden]`.
    Embed,
    /// Final RMSNorm, `[hidden]`.
    FinalNorm,
    /// Output projection, `[vocab, hidden]` (absent when tied).
    LmHead,
    /// Per-layer weights.
    Layer(usize, LayerWeight),
}

/// A weight inside one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerWeight {
    /// RMSNorm before attention.
    AttnNorm,
    /// Query projection `[heads*head_dim, hidden]`.
    Q,
    /// Key projection `[kv_heads*head_dim, hidden]`.
    K,
    /// Value projection `[kv_heads*head_dim, hidden]`.
    V,
    /// Output projection `[hidden, heads*head_dim]`.
    O,
    /// Qwen3's per-head query RMSNorm `[head_dim]`.
    QNorm,
    /// Qwen3's per-head key RMSNorm `[head_dim]`.
    KNorm,
    /// RMSNorm before the MLP.
    MlpNorm,
    /// MLP gate `[intermediate, hidden]`.
    Gate,
    /// MLP up `[intermediate, hidden]`.
    Up,
    /// MLP down `[hidden, intermediate]`.
    Down,
}

impl WeightName {
    /// The name in a Hugging Face checkpoint.
    pub fn hf(self) -> String {
        match self {
            Self::Embed => "model.embed_tokens.weight".into(),
            Self::FinalNorm => "model.norm.weight".into(),
            Self::LmHead => "lm_head.weight".into(),
            Self::Layer(i, w) => {
                let suffix = match w {
                    LayerWeight::AttnNorm => "input_layernorm",
                    LayerWeight::Q => "self_attn.q_proj",
                    LayerWeight::K => "self_attn.k_proj",
                    LayerWeight::V => "self_attn.v_proj",
                    LayerWeight::O => "self_attn.o_proj",
                    LayerWeight::QNorm => "self_attn.q_norm",
                    LayerWeight::KNorm => "self_attn.k_norm",
                    LayerWeight::MlpNorm => "post_attention_layernorm",
                    LayerWeight::Gate => "mlp.gate_proj",
                    LayerWeight::Up => "mlp.up_proj",
                    LayerWeight::Down => "mlp.down_proj",
                };
                format!("model.layers.{i}.{suffix}.weight")
            }
        }
    }

    /// The name in a GGUF file.
    pub fn gguf(self) -> String {
        match self {
            Self::Embed => "token_embd.weight".into(),
            Self::FinalNorm => "output_norm.weight".into(),
            Self::LmHead => "output.weight".into(),
            Self::Layer(i, w) => {
                let suffix = match w {
                    LayerWeight::AttnNorm => "attn_norm",
                    LayerWeight::Q => "attn_q",
                    LayerWeight::K => "attn_k",
                    LayerWeight::V => "attn_v",
                    LayerWeight::O => "attn_output",
                    LayerWeight::QNorm => "attn_q_norm",
                    LayerWeight::KNorm => "attn_k_norm",
                    LayerWeight::MlpNorm => "ffn_norm",
                    LayerWeight::Gate => "ffn_gate",
                    LayerWeight::Up => "ffn_up",
                    LayerWeight::Down => "ffn_down",
                };
                format!("blk.{i}.{suffix}.weight")
            }
        }
    }

    /// The shape this weight must have, row-major.
    pub fn expected_shape(self, c: &ModelConfig) -> Vec<usize> {
        let (h, hd) = (c.hidden_size, c.head_dim);
        match self {
            Self::Embed | Self::LmHead => vec![c.vocab_size, h],
            Self::FinalNorm => vec![h],
            Self::Layer(_, w) => match w {
                LayerWeight::AttnNorm | LayerWeight::MlpNorm => vec![h],
                LayerWeight::Q => vec![c.num_heads * hd, h],
                LayerWeight::K | LayerWeight::V => vec![c.num_kv_heads * hd, h],
                LayerWeight::O => vec![h, c.num_heads * hd],
                LayerWeight::QNorm | LayerWeight::KNorm => vec![hd],
                LayerWeight::Gate | LayerWeight::Up => vec![c.intermediate_size, h],
                LayerWeight::Down => vec![h, c.intermediate_size],
            },
        }
    }

    /// Display name used in errors: the HF name.
    fn label(self) -> String {
        self.hf()
    }
}

/// The per-layer weights an architecture needs.
pub fn layer_weights(arch: Architecture) -> &'static [LayerWeight] {
    use LayerWeight::*;
    match arch {
        Architecture::Llama => &[AttnNorm, Q, K, V, O, MlpNorm, Gate, Up, Down],
        Architecture::Qwen3 => &[AttnNorm, Q, K, V, O, QNorm, KNorm, MlpNorm, Gate, Up, Down],
    }
}

/// A source of weights as f32.
pub trait WeightSource {
    /// Reads a weight, checks its shape, and returns its values row-major.
    fn load(&self, name: WeightName, config: &ModelConfig) -> Result<Vec<f32>>;
    /// Whether the source holds the weight at all.
    fn contains(&self, name: WeightName) -> bool;
    /// The weight as the file's own quantized blocks, when it is a matrix
    /// stored in a format [`PackedMatrix`] reads; `None` otherwise (the
    /// caller then loads it as f32). Shapes are checked as in `load`.
    fn load_packed(
        &self,
        _name: WeightName,
        _config: &ModelConfig,
    ) -> Result<Option<PackedMatrix>> {
        Ok(None)
    }
}

fn check_shape(name: WeightName, got: &[usize], config: &ModelConfig) -> Result<()> {
    let want = name.expected_shape(config);
    if got != want.as_slice() {
        return Err(InferenceError::weight(
            name.label(),
            format!("has shape {got:?}, the config implies {want:?}"),
        ));
    }
    Ok(())
}

/// Safetensors files of a Hugging Face checkpoint (one or several shards).
pub struct SafetensorsSource {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// Tensor name → index into `files`.
    index: BTreeMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens every `*.safetensors` shard of the directory.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| InferenceError::io(path, e))?;
            // SAFETY: read-only map of a file we do not modify; see gguf.rs.
            #[allow(unsafe_code)]
            let map =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| InferenceError::io(path, e))?;
            let names = SafeTensors::read_metadata(&map)
                .map_err(|e| InferenceError::format(path, format!("bad safetensors header: {e}")))?
                .1
                .tensors()
                .into_keys()
                .collect::<Vec<_>>();
            for name in names {
                index.insert(name, files.len());
            }
            files.push((path.clone(), map));
        }
        Ok(Self { files, index })
    }
}

impl WeightSource for SafetensorsSource {
    fn contains(&self, name: WeightName) -> bool {
        self.index.contains_key(&name.hf())
    }

    fn load(&self, name: WeightName, config: &ModelConfig) -> Result<Vec<f32>> {
        let key = name.hf();
        let &file = self
            .index
            .get(&key)
            .ok_or_else(|| InferenceError::weight(&key, "missing from the checkpoint"))?;
        let (path, map) = &self.files[file];
        let st = SafeTensors::deserialize(map)
            .map_err(|e| InferenceError::format(path, format!("bad safetensors file: {e}")))?;
        let view = st
            .tensor(&key)
            .map_err(|e| InferenceError::format(path, format!("tensor `{key}`: {e}")))?;
        check_shape(name, view.shape(), config)?;
        let bytes = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(InferenceError::UnsupportedQuantization {
                    tensor: key,
                    kind: format!("{other:?}"),
                })
            }
        })
    }
}

/// The tensors of a GGUF file.
pub struct GgufSource<'a> {
    file: &'a GgufFile,
}

impl<'a> GgufSource<'a> {
    /// Wraps an opened GGUF file.
    pub fn new(file: &'a GgufFile) -> Self {
        Self { file }
    }
}

impl WeightSource for GgufSource<'_> {
    fn contains(&self, name: WeightName) -> bool {
        self.file.tensors.contains_key(&name.gguf())
    }

    fn load(&self, name: WeightName, config: &ModelConfig) -> Result<Vec<f32>> {
        let (shape, values) = self.file.tensor_f32(&name.gguf())?;
        check_shape(name, &shape, config)?;
        Ok(match permuted_head_dim(name, config) {
            Some(head_dim) => unpermute_rows(&values, head_dim, shape[1]),
            None => values,
        })
    }

    fn load_packed(&self, name: WeightName, config: &ModelConfig) -> Result<Option<PackedMatrix>> {
        let key = name.gguf();
        let readable = |info: &crate::gguf::TensorInfo| BlockFormat::for_gguf(info.kind).is_some();
        if !self.file.tensors.get(&key).is_some_and(readable) {
            return Ok(None);
        }
        let (info, bytes) = self.file.tensor_bytes(&key)?;
        let shape = info.shape();
        check_shape(name, &shape, config)?;
        let &[rows, cols] = shape.as_slice() else {
            return Ok(None);
        };
        let matrix = PackedMatrix::from_gguf(info.kind, rows, cols, bytes).ok_or_else(|| {
            InferenceError::weight(&key, "its block data does not match its shape")
        })?;
        Ok(Some(match permuted_head_dim(name, config) {
            Some(head_dim) => matrix.permute_rows(|r| gguf_row(r, head_dim)),
            None => matrix,
        }))
    }
}

/// llama.cpp's converter permutes the rows of Llama's query and key
/// projections for its interleaved RoPE; for those weights, the head size
/// needed to undo it and get the Hugging Face (rotate-half) layout our RoPE
/// uses.
fn permuted_head_dim(name: WeightName, config: &ModelConfig) -> Option<usize> {
    let is_qk = matches!(name, WeightName::Layer(_, LayerWeight::Q | LayerWeight::K));
    (config.architecture == Architecture::Llama && is_qk).then_some(config.head_dim)
}

/// Where Hugging Face row `row` of a permuted projection lies in the GGUF
/// layout: within each head, HF row `j*half + i` is GGUF row `2*i + j`.
fn gguf_row(row: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, within) = (row / head_dim, row % head_dim);
    let (j, i) = (within / half, within % half);
    head * head_dim + 2 * i + j
}

/// Inverts llama.cpp's `permute` on f32 rows of `cols` values.
fn unpermute_rows(values: &[f32], head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(values.len());
    for row in 0..values.len() / cols {
        let src = gguf_row(row, head_dim) * cols;
        out.extend_from_slice(&values[src..src + cols]);
    }
    out
}

/// The safetensors shards of a Hugging Face directory: those named by
/// `model.safetensors.index.json`, or every `*.safetensors` file.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| InferenceError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| InferenceError::format(&index, format!("not JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| InferenceError::format(&index, "no `weight_map` object"))?;
        let mut names: Vec<&str> = map.values().filter_map(serde_json::Value::as_str).collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        let entries = std::fs::read_dir(dir).map_err(|e| InferenceError::io(dir, e))?;
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect()
    };
    files.sort();
    if files.is_empty() {
        return Err(InferenceError::format(
            dir,
            "no *.safetensors weight files in this directory",
        ));
    }
    for f in &files {
        if !f.exists() {
            return Err(InferenceError::format(
                f,
                "named in model.safetensors.index.json but missing",
            ));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(heads, 2, half, cols).swapaxes(1, 2)
        let (heads, hd, cols) = (2, 4, 3);
        let hf: Vec<f32> = (0..heads * hd * cols).map(|v| v as f32).collect();
        let half = hd / 2;
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = (h * hd + j * half + i) * cols;
                    let dst = (h * hd + 2 * i + j) * cols;
                    permuted[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_ne!(permuted, hf);
        assert_eq!(unpermute_rows(&permuted, hd, cols), hf);
    }
}

//! The decoder-only transformer shared by the Llama family and Qwen3.
//!
//! Each layer does three large matrix products over all tokens of a batch,
//! with the linear weights fused (q|k|v, gate|up). A weight matrix is either
//! a dense tensor on the device or, on the CPU, the GGUF file's quantized
//! blocks multiplied directly ([`WeightLayout`], [`crate::packed`]).
//! Attention runs per sequence against that sequence's own [`KvCache`],
//! which is what lets one forward pass mix a new request's prompt (prefill)
//! with other requests' single decode tokens.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, FloatDType, Int, TensorData};
use rayon::prelude::*;

use crate::cache::KvCache;
use crate::config::{Architecture, ModelConfig};
use crate::cpu::CpuKernels;
use crate::error::{InferenceError, Result};
use crate::packed::{matmul_into, Activations, PackedMatrix, View};
use crate::weights::{layer_weights, LayerWeight, WeightName, WeightSource};

/// How a loaded model holds its weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightLayout {
    /// Dense f32 tensors on the device; works on every backend.
    #[default]
    Dense,
    /// Matrices the file stores in a block format that [`crate::packed`]
    /// reads (Q4_0, Q4_1, Q8_0) keep their blocks in host memory and are
    /// multiplied directly; the rest are dense. For the CPU backend only: on
    /// a GPU every product would round-trip through host memory.
    Packed,
}

/// The float type of a model's dense weights, activations and caches.
///
/// `Bf16` is for GPUs, where a decode step is bound by reading the weights
/// and bf16 halves that; it follows transformers' bf16 arithmetic (products
/// and caches in bf16, RMSNorm in f32, logits returned as f32). On the CPU
/// it runs too (Burn's CPU backend multiplies bf16 through f32), which is
/// how the GPU path is rehearsed and tested without a GPU; a CPU worker
/// serves the packed f32 layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    Bf16,
}

impl Precision {
    /// The tensors' element type.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = InferenceError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(InferenceError::Backend(format!(
                "unknown dtype `{other}`: use f32 or bf16"
            ))),
        }
    }
}

/// A weight matrix applied as `x · Wᵀ` (x `[n, in]` → `[n, out]`).
enum Linear<B: Backend> {
    /// `[in, out]` (pre-transposed) on the device.
    Dense(Tensor<B, 2>),
    /// `[out, in]` quantized blocks in host memory, and how few-row
    /// products treat their inputs.
    Packed(Arc<PackedMatrix>, Activations),
}

impl<B: Backend> Linear<B> {
    /// Bytes of its weights, `element` bytes per dense value.
    fn bytes(&self, element: usize) -> usize {
        match self {
            Self::Dense(w) => w.shape().num_elements() * element,
            Self::Packed(m, _) => m.bytes(),
        }
    }

    fn forward(&self, x: Tensor<B, 2>, kernels: CpuKernels) -> Tensor<B, 2> {
        match self {
            Self::Dense(w) => x.matmul(w.clone()),
            Self::Packed(m, activations) => {
                let [n, _] = x.dims();
                let device = x.device();
                let values = host_values(x);
                let out = m.matmul(&values, n, *activations, kernels);
                Tensor::from_data(TensorData::new(out, [n, m.rows()]), &device)
            }
        }
    }
}

/// The token embedding table `[vocab, hidden]`.
enum Embedding<B: Backend> {
    Dense(Tensor<B, 2>),
    /// Rows expanded on lookup; shared with the output projection when the
    /// model ties them.
    Packed(Arc<PackedMatrix>),
}

impl<B: Backend> Embedding<B> {
    fn lookup(&self, ids: &[i64], device: &B::Device, kernels: CpuKernels) -> Tensor<B, 2> {
        match self {
            Self::Dense(table) => {
                let n = ids.len();
                let ids =
                    Tensor::<B, 1, Int>::from_data(TensorData::new(ids.to_vec(), [n]), device);
                table.clone().select(0, ids)
            }
            Self::Packed(m) => {
                let cols = m.cols();
                let mut out = vec![0f32; ids.len() * cols];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(cols)) {
                    m.dequantize_row(id as usize, row, kernels);
                }
                Tensor::from_data(TensorData::new(out, [ids.len(), cols]), device)
            }
        }
    }
}

struct Block<B: Backend> {
    attn_norm: Tensor<B, 1>,
    /// out `(heads + 2 * kv_heads) * head_dim`
    qkv: Linear<B>,
    /// out `hidden`
    o: Linear<B>,
    q_norm: Option<Tensor<B, 1>>,
    k_norm: Option<Tensor<B, 1>>,
    mlp_norm: Tensor<B, 1>,
    /// out `2 * intermediate`
    gate_up: Linear<B>,
    /// out `hidden`
    down: Linear<B>,
}

/// One sequence's share of a forward pass.
pub struct Segment<'a, B: Backend> {
    /// New tokens: the whole prompt at prefill, one token at decode.
    pub tokens: &'a [u32],
    /// The sequence's cache; the tokens take positions `cache.len()..`.
    pub cache: &'a mut KvCache<B>,
}

/// A loaded model on device `B`.
pub struct Transformer<B: Backend> {
    config: ModelConfig,
    embed: Embedding<B>,
    /// out `vocab`
    lm_head: Linear<B>,
    final_norm: Tensor<B, 1>,
    blocks: Vec<Block<B>>,
    /// `[max_positions, head_dim]`, each frequency's value repeated for both halves.
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    /// Attention in plain Rust over host caches (the packed layout, on the
    /// CPU) rather than as Burn operations per sequence.
    host_attention: bool,
    /// The CPU kernels of the packed products and host attention.
    kernels: CpuKernels,
    /// The element type of dense weights, activations and caches.
    precision: Precision,
    device: B::Device,
}

/// Transposes a row-major `[rows, cols]` matrix.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Concatenates row-major matrices with the same number of rows along columns.
fn concat_columns(parts: &[(Vec<f32>, usize)], rows: usize) -> (Vec<f32>, usize) {
    let total: usize = parts.iter().map(|(_, c)| c).sum();
    let mut out = Vec::with_capacity(rows * total);
    for r in 0..rows {
        for (values, cols) in parts {
            out.extend_from_slice(&values[r * cols..(r + 1) * cols]);
        }
    }
    (out, total)
}

impl<B: Backend> Transformer<B> {
    /// Loads every weight from `source` in `layout`, checking shapes against
    /// `config`, dense ones in `precision`. The packed layout's products and
    /// host attention run on `kernels` (see [`crate::cpu`]); the packed
    /// layout is f32 only.
    pub fn load(
        config: ModelConfig,
        source: &dyn WeightSource,
        layout: WeightLayout,
        kernels: CpuKernels,
        precision: Precision,
        device: &B::Device,
    ) -> Result<Self> {
        let kernels = kernels.require()?;
        if layout == WeightLayout::Packed && precision != Precision::F32 {
            return Err(InferenceError::Backend(format!(
                "the packed layout computes in f32; {precision} needs the dense layout"
            )));
        }
        let c = &config;
        let on = (device, precision.dtype());
        let vec1 = |values: Vec<f32>| {
            Tensor::<B, 1>::from_data(TensorData::new(values.clone(), [values.len()]), on)
        };
        let packed = |name: WeightName| -> Result<Option<PackedMatrix>> {
            match layout {
                WeightLayout::Packed => source.load_packed(name, c),
                WeightLayout::Dense => Ok(None),
            }
        };
        // The parts' output rows stacked into one matrix: packed when every
        // part is in a block format the kernels read (parts of different
        // formats are widened to one, see `PackedMatrix::stack`), dense
        // otherwise.
        let linear = |parts: &[WeightName], activations: Activations| -> Result<Linear<B>> {
            let blocks = parts
                .iter()
                .map(|&p| packed(p))
                .collect::<Result<Option<Vec<_>>>>()?;
            if let Some(stacked) = blocks.as_deref().and_then(PackedMatrix::stack) {
                return Ok(Linear::Packed(Arc::new(stacked), activations));
            }
            let inputs = parts[0].expected_shape(c)[1];
            let mut transposed = Vec::with_capacity(parts.len());
            for &p in parts {
                let outputs = p.expected_shape(c)[0];
                transposed.push((transpose(&source.load(p, c)?, outputs, inputs), outputs));
            }
            let (values, outputs) = concat_columns(&transposed, inputs);
            Ok(Linear::Dense(Tensor::from_data(
                TensorData::new(values, [inputs, outputs]),
                on,
            )))
        };

        let tied = c.tie_word_embeddings || !source.contains(WeightName::LmHead);
        let (embed, lm_head) = match packed(WeightName::Embed)? {
            Some(table) => {
                let table = Arc::new(table);
                let lm_head = if tied {
                    Linear::Packed(table.clone(), Activations::Int16)
                } else {
                    linear(&[WeightName::LmHead], Activations::Int16)?
                };
                (Embedding::Packed(table), lm_head)
            }
            None => {
                let table = source.load(WeightName::Embed, c)?;
                let lm_head = if tied {
                    let t = transpose(&table, c.vocab_size, c.hidden_size);
                    Linear::Dense(Tensor::from_data(
                        TensorData::new(t, [c.hidden_size, c.vocab_size]),
                        on,
                    ))
                } else {
                    linear(&[WeightName::LmHead], Activations::Int16)?
                };
                let table = TensorData::new(table, [c.vocab_size, c.hidden_size]);
                (Embedding::Dense(Tensor::from_data(table, on)), lm_head)
            }
        };
        let final_norm = vec1(source.load(WeightName::FinalNorm, c)?);

        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let w = |w: LayerWeight| WeightName::Layer(i, w);
            let load = |lw: LayerWeight| source.load(w(lw), c);
            let needed = layer_weights(c.architecture);
            let norm = |lw: LayerWeight| -> Result<Option<Tensor<B, 1>>> {
                Ok(if needed.contains(&lw) {
                    Some(vec1(load(lw)?))
                } else {
                    None
                })
            };
            use LayerWeight::{Down, Gate, Up, K, O, Q, V};
            blocks.push(Block {
                attn_norm: vec1(load(LayerWeight::AttnNorm)?),
                qkv: linear(&[w(Q), w(K), w(V)], Activations::Int8)?,
                o: linear(&[w(O)], Activations::Int16)?,
                q_norm: norm(LayerWeight::QNorm)?,
                k_norm: norm(LayerWeight::KNorm)?,
                mlp_norm: vec1(load(LayerWeight::MlpNorm)?),
                gate_up: linear(&[w(Gate), w(Up)], Activations::Int16)?,
                down: linear(&[w(Down)], Activations::Int16)?,
            });
        }

        let (cos, sin) = rope_tables(c);
        let positions = c.max_position_embeddings;
        // Computed in f32 and rounded to the model's precision, as
        // transformers does.
        let table = |values| {
            Tensor::<B, 2>::from_data(TensorData::new(values, [positions, c.head_dim]), on)
        };
        Ok(Self {
            cos: table(cos),
            sin: table(sin),
            config,
            embed,
            lm_head,
            final_norm,
            blocks,
            host_attention: layout == WeightLayout::Packed,
            kernels,
            precision,
            device: device.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of the weight matrices a one-token forward pass reads (every
    /// layer's projections and the output projection; the embedding row
    /// and the norms are left out, a few kilobytes): at batch 1 a decode
    /// step's memory traffic, so its tokens per second times this, over
    /// the machine's read bandwidth, is its share of the memory roofline.
    pub fn decode_weight_bytes(&self) -> usize {
        let element = match self.precision {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        };
        let layers: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.qkv, &b.o, &b.gate_up, &b.down]
                    .map(|l| l.bytes(element))
                    .iter()
                    .sum::<usize>()
            })
            .sum();
        layers + self.lm_head.bytes(element)
    }

    /// The CPU kernels its packed products and host attention run on.
    pub fn kernels(&self) -> CpuKernels {
        self.kernels
    }

    /// The element type of its dense weights, activations and caches.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// A fresh cache for one sequence of this model.
    pub fn new_cache(&self) -> KvCache<B> {
        let c = &self.config;
        if self.host_attention {
            KvCache::new_host(c.num_layers, c.num_kv_heads, c.head_dim)
        } else {
            KvCache::new(c.num_layers, c.num_kv_heads, c.head_dim)
        }
    }

    /// Runs the new tokens of every segment through the model, extending each
    /// segment's cache, and returns logits.
    ///
    /// With `all_positions` false, one row per segment (its last token);
    /// otherwise one row per input token, segments in order. Logits are f32
    /// in every precision.
    ///
    /// # Shapes
    /// - returns `[segments or total_tokens, vocab]`
    pub fn forward(&self, segments: &mut [Segment<'_, B>], all_positions: bool) -> Tensor<B, 2> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in segments.iter() {
            let start = s.cache.len();
            ids.extend(s.tokens.iter().map(|&t| i64::from(t)));
            positions.extend((start..start + s.tokens.len()).map(|p| p as i64));
        }
        let n = ids.len();
        let positions =
            Tensor::<B, 1, Int>::from_data(TensorData::new(positions, [n]), &self.device);
        // RoPE rows for every token of the batch, shared by all layers: [n, 1, hd]
        let cos = self
            .cos
            .clone()
            .select(0, positions.clone())
            .unsqueeze_dim::<3>(1);
        let sin = self.sin.clone().select(0, positions).unsqueeze_dim::<3>(1);
        // [n, hidden]
        let mut x = self.embed.lookup(&ids, &self.device, self.kernels);
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (q_out, kv_out) = (nh * hd, nkv * hd);

        for (layer, block) in self.blocks.iter().enumerate() {
            let h = rms_norm(x.clone(), &block.attn_norm, c.rms_norm_eps);
            // [n, q_out + 2 * kv_out]
            let qkv = block.qkv.forward(h, self.kernels);
            let mut q = qkv.clone().slice([0..n, 0..q_out]).reshape([n, nh, hd]);
            let mut k = qkv
                .clone()
                .slice([0..n, q_out..q_out + kv_out])
                .reshape([n, nkv, hd]);
            let v = qkv
                .slice([0..n, q_out + kv_out..q_out + 2 * kv_out])
                .reshape([n, nkv, hd]);
            if let (Some(qn), Some(kn)) = (&block.q_norm, &block.k_norm) {
                q = rms_norm(q, qn, c.rms_norm_eps);
                k = rms_norm(k, kn, c.rms_norm_eps);
            }
            let q = rope(q, &cos, &sin);
            let k = rope(k, &cos, &sin);
            let attn = if self.host_attention {
                self.host_attention(layer, segments, [q, k, v])
            } else {
                self.device_attention(layer, segments, [q, k, v])
            };
            x = x + block.o.forward(attn, self.kernels);

            let h = rms_norm(x.clone(), &block.mlp_norm, c.rms_norm_eps);
            x = x + self.mlp(block, h);
        }
        for seg in segments.iter_mut() {
            seg.cache.advance(seg.tokens.len());
        }

        if !all_positions {
            let mut last = Vec::with_capacity(segments.len());
            let mut end = 0i64;
            for seg in segments.iter() {
                end += seg.tokens.len() as i64;
                last.push(end - 1);
            }
            let k = last.len();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [k]), &self.device);
            x = x.select(0, idx);
        }
        self.lm_head
            .forward(rms_norm(x, &self.final_norm, c.rms_norm_eps), self.kernels)
            .cast(FloatDType::F32)
    }

    /// `down(silu(gate(h)) * up(h))`. With both matrices packed the
    /// activation is applied on the host between the two products, which
    /// spares two trips through tensors and three strided tensor operations.
    ///
    /// # Shapes
    /// - `h`: `[n, hidden]`; returns `[n, hidden]`
    fn mlp(&self, block: &Block<B>, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, _] = h.dims();
        let inter = self.config.intermediate_size;
        if let (Linear::Packed(gate_up, ga), Linear::Packed(down, da)) =
            (&block.gate_up, &block.down)
        {
            let gu = gate_up.matmul(&host_values(h), n, *ga, self.kernels);
            let mut act = Vec::with_capacity(n * inter);
            for row in gu.chunks_exact(2 * inter) {
                let (gate, up) = row.split_at(inter);
                act.extend(
                    gate.iter()
                        .zip(up)
                        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u),
                );
            }
            let out = down.matmul(&act, n, *da, self.kernels);
            return Tensor::from_data(TensorData::new(out, [n, down.rows()]), &self.device);
        }
        let gu = block.gate_up.forward(h, self.kernels);
        let gate = gu.clone().slice([0..n, 0..inter]);
        let up = gu.slice([0..n, inter..2 * inter]);
        block.down.forward(silu(gate) * up, self.kernels)
    }

    /// Attention of every segment's new tokens on Burn, one sequence at a
    /// time against its device cache.
    ///
    /// # Shapes
    /// - `q`: `[n, heads, head_dim]`; `k`, `v`: `[n, kv_heads, head_dim]`
    /// - returns `[n, heads * head_dim]`
    fn device_attention(
        &self,
        layer: usize,
        segments: &mut [Segment<'_, B>],
        [q, k, v]: [Tensor<B, 3>; 3],
    ) -> Tensor<B, 2> {
        let [n, nh, hd] = q.dims();
        let nkv = self.config.num_kv_heads;
        let mut outs = Vec::with_capacity(segments.len());
        let mut row = 0;
        for seg in segments.iter_mut() {
            let t = seg.tokens.len();
            let rows = row..row + t;
            row += t;
            // [heads, t, hd]
            let q = q
                .clone()
                .slice([rows.clone(), 0..nh, 0..hd])
                .swap_dims(0, 1);
            let k = k
                .clone()
                .slice([rows.clone(), 0..nkv, 0..hd])
                .swap_dims(0, 1);
            let v = v.clone().slice([rows, 0..nkv, 0..hd]).swap_dims(0, 1);
            outs.push(self.attention(layer, q, k, v, seg.cache));
        }
        if outs.len() == 1 {
            outs.pop().unwrap_or_else(|| {
                Tensor::zeros([n, nh * hd], (&self.device, self.precision.dtype()))
            })
        } else {
            Tensor::cat(outs, 0)
        }
    }

    /// Attention of every segment's new tokens on the host against host
    /// caches: appends the new keys and values, then runs one rayon task
    /// per (segment, key/value head), whose scores and weighted values are
    /// two small products with the `gemm` crate per new token. Causal
    /// within a segment's new tokens. On Burn a batch of decode steps was
    /// dozens of small tensor operations per sequence per layer.
    ///
    /// # Shapes
    /// - `q`: `[n, heads, head_dim]`; `k`, `v`: `[n, kv_heads, head_dim]`
    /// - returns `[n, heads * head_dim]`
    fn host_attention(
        &self,
        layer: usize,
        segments: &mut [Segment<'_, B>],
        [q, k, v]: [Tensor<B, 3>; 3],
    ) -> Tensor<B, 2> {
        let [n, nh, hd] = q.dims();
        let nkv = self.config.num_kv_heads;
        let (q, k, v) = (host_values(q), host_values(k), host_values(v));
        let kv_row = nkv * hd;
        // (cache, first row in the batch, new tokens, positions before them)
        let mut jobs = Vec::with_capacity(segments.len());
        let mut row = 0;
        for seg in segments.iter_mut() {
            let t = seg.tokens.len();
            let start = seg.cache.len();
            let Some(cache) = seg.cache.host_layer(layer) else {
                unreachable!("host attention runs only with host caches (new_cache)");
            };
            cache
                .keys
                .extend_from_slice(&k[row * kv_row..(row + t) * kv_row]);
            cache
                .values
                .extend_from_slice(&v[row * kv_row..(row + t) * kv_row]);
            jobs.push((&*cache, row, t, start));
            row += t;
        }
        // One task per (segment, key/value head), serving the query heads
        // that share it, so each cached key and value is read once.
        let tasks: Vec<(usize, usize)> = (0..jobs.len())
            .flat_map(|j| (0..nkv).map(move |g| (j, g)))
            .collect();
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let outs: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(j, g)| {
                let (cache, row, t, start) = jobs[j];
                let task = HeadTask {
                    keys: &cache.keys,
                    values: &cache.values,
                    queries: &q[row * nh * hd..(row + t) * nh * hd],
                    kv_head: g,
                    shape: (nh, nkv, hd),
                    start,
                    scale,
                    kernels: self.kernels,
                };
                task.attend()
            })
            .collect();
        let q_out = nh * hd;
        let mut attn = vec![0f32; n * q_out];
        for (&(j, g), out) in tasks.iter().zip(&outs) {
            let (_, row, _, _) = jobs[j];
            // `out` is [t, group, hd]; the group's heads are adjacent.
            for (i, values) in out.chunks_exact(group * hd).enumerate() {
                let at = (row + i) * q_out + g * group * hd;
                attn[at..at + group * hd].copy_from_slice(values);
            }
        }
        Tensor::from_data(TensorData::new(attn, [n, q_out]), &self.device)
    }

    /// Self-attention of one sequence's new tokens (already normed and
    /// rotated) against its cache.
    ///
    /// # Shapes
    /// - `q`: `[heads, t, head_dim]`; `k`, `v`: `[kv_heads, t, head_dim]`
    /// - returns `[t, heads * head_dim]`
    fn attention(
        &self,
        layer: usize,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 2> {
        let c = &self.config;
        let [nh, t, hd] = q.dims();
        let nkv = c.num_kv_heads;
        let group = nh / nkv;
        let (keys, values) = cache.append(layer, k, v);
        let len = cache.len() + t;
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: t > 1,
        };
        let out = if t == 1 {
            // One query per head: group the query heads that share a key/value
            // head so no key or value is copied. [1, kv, group, hd]
            let q = q.reshape([1, nkv, group, hd]);
            let keys = keys.unsqueeze_dim::<4>(0);
            let values = values.unsqueeze_dim::<4>(0);
            attention(q, keys, values, None, None, options).reshape([nh, 1, hd])
        } else {
            let expand = |x: Tensor<B, 3>| {
                x.unsqueeze_dim::<4>(1)
                    .expand([nkv, group, len, hd])
                    .reshape([1, nh, len, hd])
            };
            let q = q.unsqueeze_dim::<4>(0);
            attention(q, expand(keys), expand(values), None, None, options).reshape([nh, t, hd])
        };
        out.swap_dims(0, 1).reshape([t, nh * hd])
    }
}

/// A tensor's values on the host, row-major.
fn host_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32 just above")
}

/// Attention for one sequence's new tokens and one key/value head, over
/// the query heads that share it (host attention).
struct HeadTask<'a> {
    /// The sequence's cached keys and values, new tokens included:
    /// `[positions, kv_heads, head_dim]`.
    keys: &'a [f32],
    values: &'a [f32],
    /// The new tokens' queries, `[t, heads, head_dim]`.
    queries: &'a [f32],
    kv_head: usize,
    /// `(heads, kv_heads, head_dim)`
    shape: (usize, usize, usize),
    /// Positions cached before the new tokens.
    start: usize,
    scale: f32,
    kernels: CpuKernels,
}

impl HeadTask<'_> {
    /// `[t, group, head_dim]`: for new token `i` and each query head of the
    /// group, softmax over positions `0..=start + i` of `q·k * scale`,
    /// times the values.
    fn attend(&self) -> Vec<f32> {
        let (nh, nkv, hd) = self.shape;
        let group = nh / nkv;
        let t = self.queries.len() / (nh * hd);
        let positions = self.start + t;
        let mut out = vec![0f32; t * group * hd];
        // [group, positions]
        let mut weights = vec![0f32; group * positions];
        // This head's keys and values: [positions, hd], row stride nkv * hd.
        let first = self.kv_head * hd;
        let keys = &self.keys[first..];
        let values = &self.values[first..];
        for i in 0..t {
            let visible = self.start + i + 1;
            // The group's queries for token i: [group, hd], contiguous.
            let at = (i * nh + self.kv_head * group) * hd;
            let queries = View::new(&self.queries[at..at + group * hd], group, hd, hd, 1);
            // scores = queries · keysᵀ · scale: [group, visible]
            matmul_into(
                View::new(&mut weights[..], group, visible, positions, 1),
                queries,
                View::new(keys, hd, visible, 1, nkv * hd),
                self.scale,
                self.kernels,
            );
            for j in 0..group {
                let weights = &mut weights[j * positions..j * positions + visible];
                let mut max = f32::NEG_INFINITY;
                for &w in weights.iter() {
                    max = max.max(w);
                }
                let mut total = 0f32;
                for w in weights.iter_mut() {
                    *w = (*w - max).exp();
                    total += *w;
                }
                for w in weights.iter_mut() {
                    *w /= total;
                }
            }
            // out_i = weights · values: [group, hd]
            let out_i = &mut out[i * group * hd..(i + 1) * group * hd];
            matmul_into(
                View::new(out_i, group, hd, hd, 1),
                View::new(&weights[..], group, visible, positions, 1),
                View::new(values, visible, hd, nkv * hd, 1),
                1.0,
                self.kernels,
            );
        }
        out
    }
}

/// Rotary position embedding, rotate-half convention (as transformers).
///
/// # Shapes
/// - `x`: `[n, heads, head_dim]`; `cos`, `sin`: `[n, 1, head_dim]`, the
///   rows for each token's position
fn rope<B: Backend>(x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
    let [n, heads, hd] = x.dims();
    let half = hd / 2;
    let x1 = x.clone().slice([0..n, 0..heads, 0..half]);
    let x2 = x.clone().slice([0..n, 0..heads, half..hd]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    x * cos.clone() + rotated * sin.clone()
}

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension. Below f32
/// the normalisation runs in f32 and its result is rounded before the
/// weight multiplies it, as transformers does.
fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = if dtype == DType::F32 {
        x
    } else {
        x.cast(FloatDType::F32)
    };
    let ms = x.clone().square().mean_dim(D - 1);
    let mut normed = x * (ms.add_scalar(eps)).sqrt().recip();
    if dtype != DType::F32 {
        normed = normed.cast(FloatDType::from(dtype));
    }
    normed * weight.clone().unsqueeze::<D>()
}

/// cos and sin tables `[max_positions, head_dim]`, computed in f32 like
/// transformers so positions far into the context agree to the last bit
/// that matters.
fn rope_tables(c: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let inv: Vec<f32> = c.rope_inv_freq().into_iter().map(|f| f as f32).collect();
    let half = inv.len();
    let mut cos = Vec::with_capacity(c.max_position_embeddings * 2 * half);
    let mut sin = Vec::with_capacity(cos.capacity());
    for p in 0..c.max_position_embeddings {
        for _ in 0..2 {
            for &f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (cos, sin)
}

/// Which architecture-specific weights a config needs; used in errors.
pub fn describe(c: &ModelConfig) -> String {
    let arch = match c.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen3 => "qwen3",
    };
    format!(
        "{arch}: {} layers, hidden {}, {} heads ({} kv), head_dim {}, vocab {}",
        c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    )
}

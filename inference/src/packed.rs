//! Matrix products straight from a GGUF file's quantized blocks.
//!
//! Decoding one token reads every weight of the model once, so at small
//! batches the CPU waits on memory, not arithmetic. A Q4_1 weight is 0.625
//! bytes against 4 as f32: multiplying by the blocks as the file stores them
//! reads about a sixth of the bytes. [`PackedMatrix`] keeps a weight in its
//! block format (Q4_0, Q4_1, Q5_0 or Q8_0 as the file stores them, the
//! K-quants and Q5_1 rewritten into formats of the same kind, see
//! [`BlockFormat`]; 32 weights per block, blocks running along a row) and
//! multiplies by it two ways:
//!
//! - a few input rows (decode): the input rows are rounded to 8- or 16-bit
//!   integers per block ([`Activations`]) and each weight row is dotted
//!   with them in integer arithmetic straight from its blocks, with AVX2
//!   or portable code as the caller's [`CpuKernels`] say;
//! - many input rows (prefill, large batches): a band of weight rows is
//!   expanded to f32 once and multiplied by all input rows with the `gemm`
//!   crate, so the expansion is paid once per band, not once per row.
//!
//! Both split the weight rows into bands run in parallel on rayon's pool.
//!
//! Rounding the inputs is what llama.cpp does (at 8 bits); it makes a
//! decode step's numbers differ from the f32 path's in the last digits, and
//! which path runs depends on how many rows a forward pass carries (prompt
//! tokens plus the batch's decode tokens).
//! Only the CPU backend uses this (see [`crate::transformer::WeightLayout`]);
//! a GPU gets dense tensors.

use half::f16;
use rayon::prelude::*;

use crate::cpu::{gemm_f32, CpuKernels};
use crate::gguf::{nibbles, sub_blocks, SubBlock, TensorType};

/// Weights per block in every supported format.
pub const BLOCK: usize = 32;

/// Up to this many input rows, products are computed block by block; past
/// it, a band of weights is expanded to f32 and handed to `gemm`.
const DOT_MAX_ROWS: usize = 4;

/// Input rows the block-by-block kernel serves per pass over a weight row.
const GROUP: usize = 4;

/// A block format the kernels read.
///
/// The first four are GGUF's own blocks, multiplied as the file stores
/// them. The K-quants and Q5_1 are rewritten once, at load, into the
/// nearest of the others without changing any weight (each is
/// [`SubBlock`]'s form, `w = scale · q + min`, at 32 weights per block):
/// Q4_K into [`Q4_1F32`](Self::Q4_1F32), one block per 32-weight
/// sub-block with the sub-block's scale and minimum worked out in f32;
/// Q5_1, Q5_K and Q6_K into [`Q8F32`](Self::Q8F32), whose two scales
/// carry Q6_K's per-16 scales. The rewritten blocks take more bytes than
/// the file's (Q4_K 0.75 bytes a weight against 0.5625; Q6_K 1.38 against
/// 0.82), and far fewer than f32's 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 scale `d`, 16 bytes of 4-bit `q`: `w = d * (q - 8)`.
    Q4_0,
    /// f16 scale `d` and minimum `m`, 16 bytes of 4-bit `q`: `w = d * q + m`.
    Q4_1,
    /// f16 scale `d`, 32 signed bytes `q`: `w = d * q`.
    Q8_0,
    /// f16 scale `d`, 32 fifth bits (bit i for weight i), then Q4_0's 16
    /// bytes of low nibbles: `w = d * (q - 16)`.
    Q5_0,
    /// Q4_1's layout with an f32 scale `d` and minimum `m`: `w = d * q + m`
    /// (Q4_K's sub-blocks).
    Q4_1F32,
    /// f32 scale `d0`, f32 minimum `m`, f32 scale `d1`, 32 signed bytes
    /// `q`: `w = d0 * q + m` for weights 0..16, `d1 * q + m` for 16..32
    /// (Q5_1, Q5_K and Q6_K; any other format's blocks, to stack matrices
    /// of different formats).
    Q8F32,
}

impl BlockFormat {
    /// The format the kernels hold a GGUF tensor type in, if they read it.
    pub fn for_gguf(kind: TensorType) -> Option<Self> {
        match kind {
            TensorType::Q4_0 => Some(Self::Q4_0),
            TensorType::Q4_1 => Some(Self::Q4_1),
            TensorType::Q8_0 => Some(Self::Q8_0),
            TensorType::Q5_0 => Some(Self::Q5_0),
            TensorType::Q4K => Some(Self::Q4_1F32),
            TensorType::Q5_1 | TensorType::Q5K | TensorType::Q6K => Some(Self::Q8F32),
            TensorType::F32 | TensorType::F16 | TensorType::BF16 | TensorType::Other(_) => None,
        }
    }

    /// Whether the file's blocks are this format's, byte for byte.
    fn native(self, kind: TensorType) -> bool {
        matches!(
            (kind, self),
            (TensorType::Q4_0, Self::Q4_0)
                | (TensorType::Q4_1, Self::Q4_1)
                | (TensorType::Q8_0, Self::Q8_0)
                | (TensorType::Q5_0, Self::Q5_0)
        )
    }

    /// Bytes per block of [`BLOCK`] weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q5_0 => 22,
            Self::Q4_1F32 => 24,
            Self::Q8F32 => 44,
        }
    }

    /// Whether weights 0..16 and 16..32 have scales of their own.
    const fn split(self) -> bool {
        matches!(self, Self::Q8F32)
    }

    /// The format parts of these formats stack into: their own when they
    /// agree; Q8_0 when each is a single f16 scale without a minimum;
    /// [`Self::Q8F32`], which holds any block exactly, otherwise.
    fn common(formats: impl IntoIterator<Item = Self>) -> Option<Self> {
        let mut formats = formats.into_iter();
        let first = formats.next()?;
        let plain = |f: Self| matches!(f, Self::Q4_0 | Self::Q5_0 | Self::Q8_0);
        Some(formats.fold(first, |common, f| {
            if f == common {
                common
            } else if plain(f) && plain(common) {
                Self::Q8_0
            } else {
                Self::Q8F32
            }
        }))
    }

    /// Whether the integers are signed bytes (else unsigned, 4 or 5 bits).
    const fn signed_bytes(self) -> bool {
        matches!(self, Self::Q8_0 | Self::Q8F32)
    }

    /// Appends `b` in this format, when the format can hold it exactly
    /// (the caller picked the format with [`Self::for_gguf`] or is
    /// widening to [`Self::Q8F32`]).
    fn encode(self, b: &SubBlock, out: &mut Vec<u8>) {
        let [d0, d1] = b.scales;
        let nibbles = |out: &mut Vec<u8>| {
            out.extend((0..16).map(|i| (b.q[i] as u8 & 0x0F) | ((b.q[i + 16] as u8) << 4)));
        };
        match self {
            Self::Q8_0 => {
                debug_assert!(d0 == d1 && b.min == 0.0);
                out.extend_from_slice(&f16::from_f32(d0).to_le_bytes());
                out.extend(b.q.iter().map(|&q| q as u8));
            }
            Self::Q4_1F32 => {
                debug_assert!(d0 == d1 && b.q.iter().all(|q| (0..16).contains(q)));
                out.extend_from_slice(&d0.to_le_bytes());
                out.extend_from_slice(&b.min.to_le_bytes());
                nibbles(out);
            }
            Self::Q8F32 => {
                out.extend_from_slice(&d0.to_le_bytes());
                out.extend_from_slice(&b.min.to_le_bytes());
                out.extend_from_slice(&d1.to_le_bytes());
                out.extend(b.q.iter().map(|&q| q as u8));
            }
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 => {
                unreachable!("no block is rewritten into {self:?}")
            }
        }
    }

    /// One block of this format in [`SubBlock`]'s form.
    fn decode(self, block: &[u8]) -> SubBlock {
        let f = |at: usize| {
            f32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
        };
        let nibbles = |qs: &[u8], bias: i8| -> [i8; 32] {
            let n = nibbles(qs);
            std::array::from_fn(|i| n[i] as i8 - bias)
        };
        let even = |q, d: f32, min| SubBlock {
            q,
            scales: [d, d],
            min,
        };
        match self {
            Self::Q4_0 => even(nibbles(&block[2..18], 8), half_at(block, 0), 0.0),
            Self::Q4_1 => even(
                nibbles(&block[4..20], 0),
                half_at(block, 0),
                half_at(block, 2),
            ),
            Self::Q8_0 => even(
                std::array::from_fn(|i| block[2 + i] as i8),
                half_at(block, 0),
                0.0,
            ),
            Self::Q5_0 => {
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let mut q = nibbles(&block[6..22], 16);
                for (i, q) in q.iter_mut().enumerate() {
                    *q += (((qh >> i) & 1) << 4) as i8;
                }
                even(q, half_at(block, 0), 0.0)
            }
            Self::Q4_1F32 => even(nibbles(&block[8..24], 0), f(0), f(4)),
            Self::Q8F32 => SubBlock {
                q: std::array::from_fn(|i| block[12 + i] as i8),
                scales: [f(0), f(8)],
                min: f(4),
            },
        }
    }
}

/// How a product with few input rows rounds its inputs before the
/// integer kernels multiply them, per block of 32 values: a scale
/// `d = max|x| / M` and the integers `round(x / d)`, so each input is off by
/// at most `d / 2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// `M = 127`, one byte each, as llama.cpp does: fastest. The
    /// transformer uses it for q|k|v only.
    Int8,
    /// `M = 32767`, two bytes each: a rounding error a quarter of f16's,
    /// for every other product (gate|up, attention output, down, the
    /// output projection). With 8 bits on gate|up as well the SmolLM2
    /// decode path's teacher-forced KL divergence was 0.00146 and its
    /// same-top-1 0.968, two positions in 697 above llama.cpp's 0.966;
    /// with 16 bits there, 0.00070 and 0.986.
    Int16,
}

/// Input rows rounded for the integer kernels (see [`Activations`]), plus
/// each block's sum (for the formats with an offset: Q4_0's `-8`, Q4_1's
/// minimum).
struct QuantizedRows<T> {
    /// `[n, cols]`
    qs: Vec<T>,
    /// `[n, cols / 32]` of `(d, sum)`
    info: Vec<[f32; 2]>,
}

impl<T: Copy + Default + Into<i32>> QuantizedRows<T> {
    /// Rounds `x` with `d = max|x| / max`; `cast` turns a value already
    /// within `±max` into `T`.
    ///
    /// A block's sum is that of the rounded inputs, `d · Σ q`, not of the
    /// exact ones, so the offset term rounds as the rest of the product
    /// does: the result is then exactly `Σ w·x̂` and its error `Σ w·(x̂ − x)`
    /// meets the weights centred on their offset. With the exact sum the
    /// error is `Σ (w − offset)·(x̂ − x)`, whose weights run over the whole
    /// `0..15·d` range of the unsigned 4-bit values: for SmolLM2 that
    /// tripled the teacher-forced KL divergence of the decode path, to
    /// about 3.6× llama.cpp's (`smollm2_every_cpu_path_is_as_faithful_as_llama_cpp`).
    fn new(x: &[f32], max: f32, cast: impl Fn(f32) -> T) -> Self {
        let mut qs = vec![T::default(); x.len()];
        let mut info = Vec::with_capacity(x.len() / BLOCK);
        for (x, q) in x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK)) {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / max;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(x) {
                *q = cast((v * inv).round());
                sum += (*q).into();
            }
            info.push([d, d * sum as f32]);
        }
        Self { qs, info }
    }
}

/// Rows rounded to one of the two widths.
enum Inputs {
    Int8(QuantizedRows<i8>),
    Int16(QuantizedRows<i16>),
}

impl Inputs {
    fn new(x: &[f32], activations: Activations) -> Self {
        // The casts see values within ±max by construction (and `as`
        // saturates anyway).
        match activations {
            Activations::Int8 => Self::Int8(QuantizedRows::new(x, 127.0, |v| v as i8)),
            Activations::Int16 => Self::Int16(QuantizedRows::new(x, 32767.0, |v| v as i16)),
        }
    }
}

/// A `[rows, cols]` matrix of quantized blocks, row-major, each row
/// `cols / 32` blocks: the layout of a GGUF weight, one row per output
/// feature.
#[derive(Clone)]
pub struct PackedMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl PackedMatrix {
    /// Wraps `data`; `None` unless `cols` is a multiple of 32 and `data` is
    /// exactly `rows * cols / 32` blocks.
    pub fn new(format: BlockFormat, rows: usize, cols: usize, data: Vec<u8>) -> Option<Self> {
        let fits = cols.is_multiple_of(BLOCK)
            && rows
                .checked_mul(cols / BLOCK * format.block_bytes())
                .is_some_and(|len| len == data.len());
        fits.then_some(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    /// A GGUF tensor's `[rows, cols]` blocks (`bytes`, of type `kind`) in
    /// the format [`BlockFormat::for_gguf`] names: the bytes as they are
    /// where the kernels read `kind`, rewritten block by block otherwise
    /// (every weight unchanged). `None` when the kernels read no such
    /// type or the sizes do not match.
    pub fn from_gguf(kind: TensorType, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        let format = BlockFormat::for_gguf(kind)?;
        if format.native(kind) {
            return Self::new(format, rows, cols, bytes.to_vec());
        }
        let (weights, block_bytes) = kind.block()?;
        let fits = cols.is_multiple_of(weights)
            && rows
                .checked_mul(cols / weights * block_bytes)
                .is_some_and(|len| len == bytes.len());
        if !fits {
            return None;
        }
        let mut data = Vec::with_capacity(rows * (cols / BLOCK) * format.block_bytes());
        sub_blocks(kind, bytes, |b| format.encode(b, &mut data));
        Self::new(format, rows, cols, data)
    }

    /// Its block format.
    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// Bytes of its blocks.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    fn row(&self, r: usize) -> &[u8] {
        let len = self.row_bytes();
        &self.data[r * len..(r + 1) * len]
    }

    /// Reorders rows: row `i` of the result is row `source(i)` of `self`.
    /// `source` must be a permutation of `0..rows`.
    pub fn permute_rows(&self, source: impl Fn(usize) -> usize) -> Self {
        let mut data = Vec::with_capacity(self.data.len());
        for r in 0..self.rows {
            data.extend_from_slice(self.row(source(r)));
        }
        Self {
            data,
            ..self.clone()
        }
    }

    /// The rows of every part, in order, as one matrix; `None` when the
    /// parts differ in width. Parts of different formats are all rewritten,
    /// every weight unchanged, into one that holds them all (a Q4_K_M
    /// file's value projection is often Q8_0 or Q6_K beside Q5_0 query and
    /// key projections): Q8_0 where it can, else Q8F32.
    pub fn stack(parts: &[PackedMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.cols != first.cols) {
            return None;
        }
        let format = BlockFormat::common(parts.iter().map(|p| p.format))?;
        let rows = parts.iter().map(|p| p.rows).sum::<usize>();
        let mut data = Vec::with_capacity(rows * (first.cols / BLOCK) * format.block_bytes());
        for part in parts {
            if part.format == format {
                data.extend_from_slice(&part.data);
            } else {
                for block in part.data.chunks_exact(part.format.block_bytes()) {
                    format.encode(&part.format.decode(block), &mut data);
                }
            }
        }
        Some(Self {
            format,
            rows,
            cols: first.cols,
            data,
        })
    }

    /// Expands row `r` to f32 into `out` (`cols` long) with `kernels`.
    ///
    /// # Panics
    /// If this CPU cannot run `kernels` (see [`CpuKernels::require`]).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32], kernels: CpuKernels) {
        Kernels::of(kernels).dequantize(self.format, self.row(r), &mut out[..self.cols]);
    }

    /// `x · selfᵀ`: `x` is `[n, cols]` row-major; returns `[n, rows]`.
    /// With few rows, `x` is first rounded as `activations` says; with many,
    /// the product is in f32. `kernels` says which instructions compute it.
    ///
    /// # Panics
    /// If `x.len() != n * cols` (a caller's shape bug, not bad input), or
    /// if this CPU cannot run `kernels`.
    pub fn matmul(
        &self,
        x: &[f32],
        n: usize,
        activations: Activations,
        kernels: CpuKernels,
    ) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols, "input is not [n, cols]");
        if n == 0 || self.rows == 0 {
            return Vec::new();
        }
        let blocks = Kernels::of(kernels);
        let band = band_rows(self.rows);
        let bands: Vec<std::ops::Range<usize>> = (0..self.rows)
            .step_by(band)
            .map(|first| first..(first + band).min(self.rows))
            .collect();
        // Each band yields its outputs as `[n, band]`, copied into place at
        // the end (bands run in parallel and cannot share `out`).
        let parts: Vec<Vec<f32>> = if n <= DOT_MAX_ROWS {
            let x = Inputs::new(x, activations);
            bands
                .par_iter()
                .map(|rows| {
                    let mut part = vec![0f32; n * rows.len()];
                    let mut column = [0f32; DOT_MAX_ROWS];
                    for (k, r) in rows.clone().enumerate() {
                        blocks.dot(self.format, self.row(r), &x, self.cols, &mut column[..n]);
                        for (i, &v) in column[..n].iter().enumerate() {
                            part[i * rows.len() + k] = v;
                        }
                    }
                    part
                })
                .collect()
        } else {
            bands
                .par_iter()
                .map(|rows| {
                    SCRATCH.with_borrow_mut(|scratch| {
                        let need = rows.len() * self.cols;
                        if scratch.len() < need {
                            scratch.resize(need, 0.0);
                        }
                        // Every row of the band is written before gemm reads it.
                        let w = &mut scratch[..need];
                        for (k, r) in rows.clone().enumerate() {
                            let out = &mut w[k * self.cols..(k + 1) * self.cols];
                            blocks.dequantize(self.format, self.row(r), out);
                        }
                        gemm_band(w, x, rows.len(), n, self.cols, kernels)
                    })
                })
                .collect()
        };
        let mut out = vec![0f32; n * self.rows];
        for (rows, part) in bands.iter().zip(&parts) {
            for (i, values) in part.chunks_exact(rows.len()).enumerate() {
                out[i * self.rows + rows.start..i * self.rows + rows.end].copy_from_slice(values);
            }
        }
        out
    }
}

thread_local! {
    /// Each thread's buffer for a band of weights expanded to f32, kept
    /// across products (a fresh one per band cost page faults and zeroing).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows per parallel task: a few tasks per thread so the pool stays busy,
/// large enough that a task is worth scheduling.
fn band_rows(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (rows / (4 * threads)).clamp(16, 256)
}

/// `x[n, cols] · w[rows, cols]ᵀ` as `[n, rows]`, single-threaded (the
/// caller runs bands in parallel).
///
/// gemm is quickest writing `[rows, n]` for a few input rows (decode
/// batches), then transposed while in cache; for many (prefill) writing
/// `[n, rows]` directly wins (`packed_matvec` example at 32 rows: 39 ms
/// against 58 ms writing `[n, rows]`; `silk bench inference` prefill of
/// 128 tokens: ~540 against ~400 tok/s the other way round).
fn gemm_band(
    w: &[f32],
    x: &[f32],
    rows: usize,
    n: usize,
    cols: usize,
    kernels: CpuKernels,
) -> Vec<f32> {
    // xᵀ is x read with row stride 1 and column stride cols.
    let (w, xt) = (
        View::new(w, rows, cols, cols, 1),
        View::new(x, cols, n, 1, cols),
    );
    let mut out = vec![0f32; n * rows];
    if n >= 64 {
        matmul_into(
            View::new(&mut out[..], rows, n, 1, rows),
            w,
            xt,
            1.0,
            kernels,
        );
        return out;
    }
    let mut product = vec![0f32; rows * n];
    matmul_into(
        View::new(&mut product[..], rows, n, n, 1),
        w,
        xt,
        1.0,
        kernels,
    );
    for (r, values) in product.chunks_exact(n).enumerate() {
        for (i, &v) in values.iter().enumerate() {
            out[i * rows + r] = v;
        }
    }
    out
}

/// A strided `[rows, cols]` view of a slice: element `(r, c)` is
/// `data[r * row_stride + c * col_stride]`.
pub(crate) struct View<T> {
    data: T,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<T: AsRef<[f32]>> View<T> {
    /// # Panics
    /// If the view reaches past the end of `data` (a caller's shape bug).
    pub(crate) fn new(
        data: T,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            assert!(last < data.as_ref().len(), "a matrix view past its slice");
        }
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }
}

/// `dst = scale · lhs · rhs` with `gemm`'s microkernels for `kernels`,
/// single-threaded.
///
/// # Panics
/// If the shapes do not chain (`lhs` `[m, k]`, `rhs` `[k, n]`, `dst`
/// `[m, n]`), or if this CPU cannot run `kernels`.
pub(crate) fn matmul_into(
    dst: View<&mut [f32]>,
    lhs: View<&[f32]>,
    rhs: View<&[f32]>,
    scale: f32,
    kernels: CpuKernels,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(
        rhs.rows == k && dst.rows == m && dst.cols == n,
        "matrix shapes do not chain"
    );
    if m == 0 || n == 0 {
        return;
    }
    let stride = |v: usize| isize::try_from(v).expect("matrix stride fits isize");
    let View {
        data: dst_data,
        row_stride: dst_rs,
        col_stride: dst_cs,
        ..
    } = dst;
    // SAFETY: every view was bounds-checked against its slice in
    // `View::new`, so gemm reads and writes only inside the three slices;
    // dst is the only mutable one, so they cannot overlap. `gemm_f32`
    // checks that the CPU runs `kernels`.
    #[allow(unsafe_code)]
    unsafe {
        gemm_f32(
            kernels,
            (m, n, k),
            (dst_data.as_mut_ptr(), stride(dst_rs), stride(dst_cs)),
            (
                lhs.data.as_ptr(),
                stride(lhs.row_stride),
                stride(lhs.col_stride),
            ),
            (
                rhs.data.as_ptr(),
                stride(rhs.row_stride),
                stride(rhs.col_stride),
            ),
            scale,
        );
    }
}

/// The block kernels of a [`CpuKernels`] set, chosen once per call.
#[derive(Clone, Copy)]
enum Kernels {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernels {
    /// # Panics
    /// If this CPU cannot run `set`: the SIMD kernels would be undefined
    /// behaviour there (a caller's bug: sets come from
    /// [`CpuKernels::require`]).
    fn of(set: CpuKernels) -> Self {
        match set {
            CpuKernels::Portable => Self::Portable,
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx512 | CpuKernels::Avx2 => {
                assert!(
                    std::is_x86_feature_detected!("avx2")
                        && std::is_x86_feature_detected!("fma")
                        && std::is_x86_feature_detected!("f16c"),
                    "this CPU cannot run the {set} kernels"
                );
                Self::Avx2
            }
            #[cfg(not(target_arch = "x86_64"))]
            other => panic!("this CPU cannot run the {other} kernels"),
        }
    }

    /// The dot products of one weight row with each of the `out.len()`
    /// rounded input rows of `x`, into `out`.
    fn dot(self, format: BlockFormat, row: &[u8], x: &Inputs, cols: usize, out: &mut [f32]) {
        match (self, x) {
            (Self::Portable, Inputs::Int8(x)) => portable_rows(format, row, x, cols, out),
            (Self::Portable, Inputs::Int16(x)) => portable_rows(format, row, x, cols, out),
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Inputs::Int8(x)) => {
                let kernels: [Avx2Kernel<i8>; GROUP] = if format.split() {
                    [
                        avx2::dot::<1, true>,
                        avx2::dot::<2, true>,
                        avx2::dot::<3, true>,
                        avx2::dot::<GROUP, true>,
                    ]
                } else {
                    [
                        avx2::dot::<1, false>,
                        avx2::dot::<2, false>,
                        avx2::dot::<3, false>,
                        avx2::dot::<GROUP, false>,
                    ]
                };
                avx2_rows(kernels, format, row, x, cols, out);
            }
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, Inputs::Int16(x)) => {
                let kernels: [Avx2Kernel<i16>; GROUP] = if format.split() {
                    [
                        avx2::dot16::<1, true>,
                        avx2::dot16::<2, true>,
                        avx2::dot16::<3, true>,
                        avx2::dot16::<GROUP, true>,
                    ]
                } else {
                    [
                        avx2::dot16::<1, false>,
                        avx2::dot16::<2, false>,
                        avx2::dot16::<3, false>,
                        avx2::dot16::<GROUP, false>,
                    ]
                };
                avx2_rows(kernels, format, row, x, cols, out);
            }
        }
    }

    fn dequantize(self, format: BlockFormat, row: &[u8], out: &mut [f32]) {
        match self {
            Self::Portable => portable::dequantize(format, row, out),
            // SAFETY: as in `dot`.
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Self::Avx2 => unsafe { avx2::dequantize(format, row, out) },
        }
    }
}

/// [`Kernels::dot`] on the portable kernel, one input row at a time.
fn portable_rows<T: Copy + Into<i32>>(
    format: BlockFormat,
    row: &[u8],
    x: &QuantizedRows<T>,
    cols: usize,
    out: &mut [f32],
) {
    let blocks = cols / BLOCK;
    for (i, out) in out.iter_mut().enumerate() {
        let (qs, info) = (
            &x.qs[i * cols..(i + 1) * cols],
            &x.info[i * blocks..(i + 1) * blocks],
        );
        *out = portable::dot(format, row, qs, info);
    }
}

/// An AVX2 kernel serving `N` input rows at once.
#[cfg(target_arch = "x86_64")]
type Avx2Kernel<T> = unsafe fn(BlockFormat, &[u8], &[T], &[[f32; 2]], usize, &mut [f32]);

/// [`Kernels::dot`] on AVX2: input rows in groups of up to [`GROUP`], each
/// group by the kernel for its size (`kernels[size - 1]`).
#[cfg(target_arch = "x86_64")]
fn avx2_rows<T>(
    kernels: [Avx2Kernel<T>; GROUP],
    format: BlockFormat,
    row: &[u8],
    x: &QuantizedRows<T>,
    cols: usize,
    out: &mut [f32],
) {
    let blocks = cols / BLOCK;
    for (g, out) in out.chunks_mut(GROUP).enumerate() {
        let (qs, info) = (&x.qs[g * GROUP * cols..], &x.info[g * GROUP * blocks..]);
        // SAFETY: only `Kernels::Avx2` calls this, which `of` returned
        // after seeing avx2, fma and f16c; the kernels check their slices.
        #[allow(unsafe_code)]
        unsafe {
            kernels[out.len() - 1](format, row, qs, info, cols, out);
        }
    }
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Plain Rust kernels: the reference the SIMD ones are tested against, and
/// what other CPUs run.
mod portable {
    use super::{half_at, BlockFormat, BLOCK};

    /// One weight row against one quantized input row: the integer
    /// products of each block, scaled, plus the format's offset times the
    /// input block's sum.
    pub(super) fn dot<T: Copy + Into<i32>>(
        format: BlockFormat,
        row: &[u8],
        qs: &[T],
        info: &[[f32; 2]],
    ) -> f32 {
        let mut total = 0f32;
        for (b, block) in row.chunks_exact(format.block_bytes()).enumerate() {
            let x = &qs[b * BLOCK..(b + 1) * BLOCK];
            let [dx, sum] = info[b];
            total += match format {
                BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                    let (d, offset, q) = if format == BlockFormat::Q4_0 {
                        let d = half_at(block, 0);
                        (d, -8.0 * d, &block[2..18])
                    } else {
                        (half_at(block, 0), half_at(block, 2), &block[4..20])
                    };
                    let mut s = 0i32;
                    for (j, &q) in q.iter().enumerate() {
                        s += i32::from(q & 0x0F) * x[j].into()
                            + i32::from(q >> 4) * x[j + 16].into();
                    }
                    d * dx * s as f32 + offset * sum
                }
                BlockFormat::Q8_0 => {
                    let s: i32 = block[2..34]
                        .iter()
                        .zip(x)
                        .map(|(&q, &v)| i32::from(q as i8) * v.into())
                        .sum();
                    half_at(block, 0) * dx * s as f32
                }
                BlockFormat::Q5_0 | BlockFormat::Q4_1F32 | BlockFormat::Q8F32 => {
                    let b = format.decode(block);
                    let half = |h: usize| -> f32 {
                        let s: i32 = (16 * h..16 * h + 16)
                            .map(|j| i32::from(b.q[j]) * x[j].into())
                            .sum();
                        s as f32
                    };
                    dx * (b.scales[0] * half(0) + b.scales[1] * half(1)) + b.min * sum
                }
            };
        }
        total
    }

    pub(super) fn dequantize(format: BlockFormat, row: &[u8], out: &mut [f32]) {
        for (block, out) in row
            .chunks_exact(format.block_bytes())
            .zip(out.chunks_exact_mut(BLOCK))
        {
            match format {
                BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                    let (d, offset, qs) = if format == BlockFormat::Q4_0 {
                        let d = half_at(block, 0);
                        (d, -8.0 * d, &block[2..18])
                    } else {
                        (half_at(block, 0), half_at(block, 2), &block[4..20])
                    };
                    for (j, &q) in qs.iter().enumerate() {
                        out[j] = f32::from(q & 0x0F) * d + offset;
                        out[j + 16] = f32::from(q >> 4) * d + offset;
                    }
                }
                BlockFormat::Q8_0 => {
                    let d = half_at(block, 0);
                    for (o, &q) in out.iter_mut().zip(&block[2..34]) {
                        *o = f32::from(q as i8) * d;
                    }
                }
                BlockFormat::Q5_0 | BlockFormat::Q4_1F32 | BlockFormat::Q8F32 => {
                    let b = format.decode(block);
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = b.weight(i);
                    }
                }
            }
        }
    }
}

/// AVX2 + FMA + F16C kernels. Every function requires those features.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockFormat, BLOCK, GROUP};

    /// Eight unsigned bytes (the low half of `v`) as eight f32.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn u8x8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    /// Eight signed bytes at `p` as eight f32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn i8x8(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bytes at p.
        let v = unsafe { _mm_loadl_epi64(p.cast()) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
    }

    /// The f32 at `p`.
    #[inline]
    unsafe fn single(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees 4 readable bytes at p.
        unsafe { p.cast::<f32>().read_unaligned() }
    }

    /// The f16 at `p` as f32.
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn half(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees 2 readable bytes at p.
        let bits = unsafe { p.cast::<u16>().read_unaligned() };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The 32 four-bit values of a block's 16 bytes at `p`, as four vectors
    /// of eight f32: low nibbles 0..8, 8..16, then high nibbles 0..8, 8..16
    /// (weights 0..32 in order).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(p: *const u8) -> [__m256; 4] {
        // SAFETY: the caller guarantees 16 readable bytes at p.
        let qs = unsafe { _mm_loadu_si128(p.cast()) };
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
        [
            u8x8(lo),
            u8x8(_mm_srli_si128(lo, 8)),
            u8x8(hi),
            u8x8(_mm_srli_si128(hi, 8)),
        ]
    }

    /// The 32 signed bytes at `p` as four vectors of eight f32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn signed_bytes(p: *const u8) -> [__m256; 4] {
        // SAFETY: the caller guarantees 32 readable bytes at p.
        unsafe { [i8x8(p), i8x8(p.add(8)), i8x8(p.add(16)), i8x8(p.add(24))] }
    }

    /// The 32 weights of the block at `p`, expanded to f32 in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block(format: BlockFormat, p: *const u8) -> [__m256; 4] {
        // SAFETY: the caller guarantees a whole block of `format` at p.
        let ([d0, d1], offset, q) = unsafe {
            match format {
                BlockFormat::Q4_0 => {
                    let d = half(p);
                    ([d, d], -8.0 * d, nibbles(p.add(2)))
                }
                BlockFormat::Q4_1 => {
                    let d = half(p);
                    ([d, d], half(p.add(2)), nibbles(p.add(4)))
                }
                BlockFormat::Q8_0 => {
                    let d = half(p);
                    ([d, d], 0.0, signed_bytes(p.add(2)))
                }
                BlockFormat::Q5_0 => {
                    let (w, dm) = block_bytes(format, p);
                    let (lo, hi) = (_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
                    let d = _mm_cvtss_f32(dm);
                    (
                        [d, d],
                        -16.0 * d,
                        [
                            u8x8(lo),
                            u8x8(_mm_srli_si128(lo, 8)),
                            u8x8(hi),
                            u8x8(_mm_srli_si128(hi, 8)),
                        ],
                    )
                }
                BlockFormat::Q4_1F32 => {
                    let d = single(p);
                    ([d, d], single(p.add(4)), nibbles(p.add(8)))
                }
                BlockFormat::Q8F32 => (
                    [single(p), single(p.add(8))],
                    single(p.add(4)),
                    signed_bytes(p.add(12)),
                ),
            }
        };
        let (d0, d1, offset) = (
            _mm256_set1_ps(d0),
            _mm256_set1_ps(d1),
            _mm256_set1_ps(offset),
        );
        [
            _mm256_fmadd_ps(q[0], d0, offset),
            _mm256_fmadd_ps(q[1], d0, offset),
            _mm256_fmadd_ps(q[2], d1, offset),
            _mm256_fmadd_ps(q[3], d1, offset),
        ]
    }

    /// Byte i is 0xFF where bit i of `bits` is set, else 0 (ggml's
    /// `bytes_from_bits_32`): each byte gets the byte of `bits` its bit
    /// lies in, with every other bit set, and is compared with all ones.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn bit_bytes(bits: u32) -> __m256i {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
    }

    /// A block's weights as 32 bytes in order, and `[d, offset, d1, 0]`
    /// (Q4_0: offset `-8d`; Q5_0: `-16d`; Q4_1: its minimum; Q8_0: 0;
    /// `d1` is Q8F32's scale of weights 16..32, 0 for the others). The
    /// 8-bit formats' bytes are signed; the others' are 0..=15 or 0..=31.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn block_bytes(format: BlockFormat, p: *const u8) -> (__m256i, __m128) {
        // SAFETY: the caller guarantees a whole block of `format` at p.
        unsafe {
            let four_bit = |qs: *const u8| {
                let qs = _mm_loadu_si128(qs.cast());
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(qs, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                _mm256_set_m128i(hi, lo)
            };
            match format {
                BlockFormat::Q4_0 => {
                    let d = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                        p.cast::<u16>().read_unaligned(),
                    )));
                    let dm = _mm_mul_ps(_mm_moveldup_ps(d), _mm_setr_ps(1.0, -8.0, 0.0, 0.0));
                    (four_bit(p.add(2)), dm)
                }
                BlockFormat::Q4_1 => {
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
                    (four_bit(p.add(4)), dm)
                }
                BlockFormat::Q8_0 => {
                    let d = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                        p.cast::<u16>().read_unaligned(),
                    )));
                    (_mm256_loadu_si256(p.add(2).cast()), d)
                }
                BlockFormat::Q5_0 => {
                    let d = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                        p.cast::<u16>().read_unaligned(),
                    )));
                    let dm = _mm_mul_ps(_mm_moveldup_ps(d), _mm_setr_ps(1.0, -16.0, 0.0, 0.0));
                    let fifth = _mm256_and_si256(
                        bit_bytes(p.add(2).cast::<u32>().read_unaligned()),
                        _mm256_set1_epi8(0x10),
                    );
                    (_mm256_or_si256(four_bit(p.add(6)), fifth), dm)
                }
                BlockFormat::Q4_1F32 => (four_bit(p.add(8)), _mm_castpd_ps(_mm_load_sd(p.cast()))),
                BlockFormat::Q8F32 => (
                    _mm256_loadu_si256(p.add(12).cast()),
                    // The fourth lane read is the first quants: cleared, so
                    // no junk (a denormal, say) meets the arithmetic.
                    _mm_blend_ps::<0b1000>(_mm_loadu_ps(p.cast()), _mm_setzero_ps()),
                ),
            }
        }
    }

    /// Dot products of one weight row with `N` quantized input rows (`qs`
    /// and `info` hold them back to back, `cols` and `cols / 32` apart), into
    /// `out`. Each block's weights are loaded once for all `N`.
    ///
    /// Per block and input: integer products summed in pairs by
    /// `maddubs` (unsigned × signed bytes; the 4-bit weights are unsigned,
    /// Q8_0's signs move onto the input so its magnitudes can be), widened
    /// by `madd`, then scaled by `d_w · d_x` in f32. The offset term
    /// `offset_w · sum_x` goes to a second accumulator. With `SPLIT`
    /// (Q8F32), the first four sums, weights 0..16, take `d0 · d_x` and
    /// the last four `d1 · d_x`.
    ///
    /// Safety: the CPU has avx2, fma and f16c. Lengths are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot<const N: usize, const SPLIT: bool>(
        format: BlockFormat,
        row: &[u8],
        qs: &[i8],
        info: &[[f32; 2]],
        cols: usize,
        out: &mut [f32],
    ) {
        const { assert!(N >= 1 && N <= GROUP) };
        let blocks = row.len() / format.block_bytes();
        let per_row = cols / BLOCK;
        assert!(blocks <= per_row && qs.len() >= N * cols && info.len() >= N * per_row);
        assert!(out.len() >= N);
        let ones = _mm256_set1_epi16(1);
        let halves = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut offsets = [_mm_setzero_ps(); N];
        for b in 0..blocks {
            // SAFETY: block b lies within row (b < blocks); input i's 32
            // bytes and its info for block b lie within qs and info
            // (asserted above).
            unsafe {
                let p = row.as_ptr().add(b * format.block_bytes());
                // Hint the block eight ahead (past the row's end is harmless:
                // a prefetch never faults).
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(8 * format.block_bytes()).cast());
                let (w, dm) = block_bytes(format, p);
                for i in 0..N {
                    let x = _mm256_loadu_si256(qs.as_ptr().add(i * cols + b * BLOCK).cast());
                    let pairs = if format.signed_bytes() {
                        _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
                    } else {
                        _mm256_maddubs_epi16(w, x)
                    };
                    let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    // [d_x, sum_x] of this input's block.
                    let xi = _mm_castpd_ps(_mm_load_sd(info.as_ptr().add(i * per_row + b).cast()));
                    let scaled = if SPLIT {
                        // [d0 · d_x, offset_w · sum_x, d1 · d_x, 0]
                        let scaled = _mm_mul_ps(dm, _mm_movelh_ps(xi, xi));
                        let scale =
                            _mm256_permutevar8x32_ps(_mm256_castps128_ps256(scaled), halves);
                        acc[i] = _mm256_fmadd_ps(scale, dot, acc[i]);
                        scaled
                    } else {
                        // [d_w · d_x, offset_w · sum_x]
                        let scaled = _mm_mul_ps(dm, xi);
                        acc[i] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scaled), dot, acc[i]);
                        scaled
                    };
                    offsets[i] = _mm_add_ps(offsets[i], scaled);
                }
            }
        }
        for i in 0..N {
            let offset = _mm_cvtss_f32(_mm_movehdup_ps(offsets[i]));
            out[i] = sum(acc[i]) + offset;
        }
    }

    /// A block's weights as two vectors of sixteen 16-bit integers
    /// (weights 0..16, 16..32), and `[d, offset]` as in `block_bytes`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn block_words(format: BlockFormat, p: *const u8) -> ([__m256i; 2], __m128) {
        // SAFETY: the caller guarantees a whole block of `format` at p.
        unsafe {
            match format {
                BlockFormat::Q8_0 | BlockFormat::Q8F32 => {
                    let (w, dm) = block_bytes(format, p);
                    let lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
                    let hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(w));
                    ([lo, hi], dm)
                }
                BlockFormat::Q4_0
                | BlockFormat::Q4_1
                | BlockFormat::Q5_0
                | BlockFormat::Q4_1F32 => {
                    let (w, dm) = block_bytes(format, p);
                    let lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(w));
                    let hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(w));
                    ([lo, hi], dm)
                }
            }
        }
    }

    /// As [`dot`], with 16-bit inputs: products of 16-bit pairs summed by
    /// `madd` (the 8-bit formats' weights are simply sign-extended).
    ///
    /// Safety: the CPU has avx2, fma and f16c. Lengths are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot16<const N: usize, const SPLIT: bool>(
        format: BlockFormat,
        row: &[u8],
        qs: &[i16],
        info: &[[f32; 2]],
        cols: usize,
        out: &mut [f32],
    ) {
        const { assert!(N >= 1 && N <= GROUP) };
        let blocks = row.len() / format.block_bytes();
        let per_row = cols / BLOCK;
        assert!(blocks <= per_row && qs.len() >= N * cols && info.len() >= N * per_row);
        assert!(out.len() >= N);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut offsets = [_mm_setzero_ps(); N];
        for b in 0..blocks {
            // SAFETY: block b lies within row (b < blocks); input i's 32
            // values and its info for block b lie within qs and info
            // (asserted above).
            unsafe {
                let p = row.as_ptr().add(b * format.block_bytes());
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(8 * format.block_bytes()).cast());
                let ([w0, w1], dm) = block_words(format, p);
                for i in 0..N {
                    let xp = qs.as_ptr().add(i * cols + b * BLOCK);
                    let x0 = _mm256_loadu_si256(xp.cast());
                    let x1 = _mm256_loadu_si256(xp.add(16).cast());
                    let (lo, hi) = (_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                    let xi = _mm_castpd_ps(_mm_load_sd(info.as_ptr().add(i * per_row + b).cast()));
                    let scaled = if SPLIT {
                        // [d0 · d_x, offset_w · sum_x, d1 · d_x, 0]
                        let scaled = _mm_mul_ps(dm, _mm_movelh_ps(xi, xi));
                        let (d0, d1) = (
                            _mm256_broadcastss_ps(scaled),
                            _mm256_broadcastss_ps(_mm_movehl_ps(scaled, scaled)),
                        );
                        acc[i] = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(lo), acc[i]);
                        acc[i] = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(hi), acc[i]);
                        scaled
                    } else {
                        let dot = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
                        let scaled = _mm_mul_ps(dm, xi);
                        acc[i] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scaled), dot, acc[i]);
                        scaled
                    };
                    offsets[i] = _mm_add_ps(offsets[i], scaled);
                }
            }
        }
        for i in 0..N {
            let offset = _mm_cvtss_f32(_mm_movehdup_ps(offsets[i]));
            out[i] = sum(acc[i]) + offset;
        }
    }

    /// Safety: the CPU has avx2, fma and f16c. Lengths are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize(format: BlockFormat, row: &[u8], out: &mut [f32]) {
        let blocks = row.len() / format.block_bytes();
        assert!(out.len() >= blocks * BLOCK);
        for b in 0..blocks {
            // SAFETY: block b lies within row and its 32 outputs within out.
            unsafe {
                let w = block(format, row.as_ptr().add(b * format.block_bytes()));
                let op = out.as_mut_ptr().add(b * BLOCK);
                for (k, w) in w.into_iter().enumerate() {
                    _mm256_storeu_ps(op.add(8 * k), w);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequantize;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Every GGUF block type the kernels read.
    const KINDS: [TensorType; 8] = [
        TensorType::Q4_0,
        TensorType::Q4_1,
        TensorType::Q8_0,
        TensorType::Q5_0,
        TensorType::Q5_1,
        TensorType::Q4K,
        TensorType::Q5K,
        TensorType::Q6K,
    ];

    /// Random blocks of `kind` for a `[rows, cols]` matrix: random bytes,
    /// each f16 scale or minimum field a small finite number.
    fn random_matrix(kind: TensorType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
        let (weights, bytes) = kind.block().expect("a block type");
        let (fields, range): (&[usize], f32) = match kind {
            TensorType::Q4_0 | TensorType::Q8_0 | TensorType::Q5_0 => (&[0], 0.05),
            TensorType::Q4_1 | TensorType::Q5_1 => (&[0, 2], 0.05),
            // Times 6- or 8-bit sub-block scales.
            TensorType::Q4K | TensorType::Q5K => (&[0, 2], 0.002),
            TensorType::Q6K => (&[208], 0.002),
            other => panic!("{other:?} is not a block type"),
        };
        let mut data: Vec<u8> = (0..rows * cols / weights * bytes)
            .map(|_| rng.random())
            .collect();
        for block in data.chunks_exact_mut(bytes) {
            for &at in fields {
                let value = f16::from_f32(rng.random_range(-range..range));
                block[at..at + 2].copy_from_slice(&value.to_le_bytes());
            }
        }
        data
    }

    /// A random `[rows, cols]` matrix of `kind` as the kernels hold it,
    /// and its weights as `gguf::dequantize` reads the file's blocks.
    fn random_packed(
        kind: TensorType,
        rows: usize,
        cols: usize,
        rng: &mut StdRng,
    ) -> (PackedMatrix, Vec<f32>) {
        let data = random_matrix(kind, rows, cols, rng);
        let w = dequantize(kind, &data, rows * cols).expect("dequantize");
        let m = PackedMatrix::from_gguf(kind, rows, cols, &data).expect("shape");
        assert_eq!(Some(m.format()), BlockFormat::for_gguf(kind));
        (m, w)
    }

    /// `x · wᵀ` in f64 over the reference dequantization.
    fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * rows];
        for i in 0..n {
            for r in 0..rows {
                let s: f64 = (0..cols)
                    .map(|k| f64::from(w[r * cols + k]) * f64::from(x[i * cols + k]))
                    .sum();
                out[i * rows + r] = s as f32;
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f32], tolerance: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (k, ((g, w), t)) in got.iter().zip(want).zip(tolerance).enumerate() {
            assert!(
                (g - w).abs() <= *t,
                "{what}: element {k}: {g} vs {w} (tolerance {t})"
            );
        }
    }

    /// Per output, how far the integer kernels may stray from the exact
    /// product: each input rounded to its block's step `d_x = max|x| / max`
    /// errs by at most `d_x / 2`, times the weight it meets; plus f32
    /// rounding.
    fn quantization_bound(
        w: &[f32],
        x: &[f32],
        (rows, cols, n): (usize, usize, usize),
        max: f32,
    ) -> Vec<f32> {
        let mut out = vec![0f32; n * rows];
        for i in 0..n {
            let x = &x[i * cols..(i + 1) * cols];
            let steps: Vec<f32> = x
                .chunks_exact(BLOCK)
                .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())) / max)
                .collect();
            for r in 0..rows {
                let bound: f32 = (0..cols)
                    .map(|k| w[r * cols + k].abs() * steps[k / BLOCK] / 2.0)
                    .sum();
                out[i * rows + r] = bound * 1.001 + 1e-4;
            }
        }
        out
    }

    #[test]
    fn products_match_the_dequantized_reference_on_both_paths() {
        let mut rng = StdRng::seed_from_u64(7);
        for kind in KINDS {
            let (rows, cols) = (70, 256);
            let (m, w) = random_packed(kind, rows, cols, &mut rng);
            for n in [1, 2, 3, 4, 5, 9, 16, 17, 40, 70] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let want = reference(&w, &x, rows, cols, n);
                for (activations, max) in
                    [(Activations::Int8, 127.0), (Activations::Int16, 32767.0)]
                {
                    let tolerance = if n <= DOT_MAX_ROWS {
                        quantization_bound(&w, &x, (rows, cols, n), max)
                    } else {
                        want.iter().map(|w| 1e-4 * (1.0 + w.abs())).collect()
                    };
                    for kernels in CpuKernels::available() {
                        let what = format!("{kind:?} n={n} {activations:?} {kernels}");
                        let got = m.matmul(&x, n, activations, kernels);
                        assert_close(&got, &want, &tolerance, &what);
                    }
                }
            }
        }
    }

    /// The blocks the kernels hold, native or rewritten, expand to exactly
    /// the weights the file's blocks define, on every kernel set.
    #[test]
    fn every_block_type_keeps_every_weight() {
        let mut rng = StdRng::seed_from_u64(5);
        for kind in KINDS {
            let (rows, cols) = (3, 512);
            let (m, w) = random_packed(kind, rows, cols, &mut rng);
            for kernels in CpuKernels::available() {
                for r in 0..rows {
                    let mut row = vec![0f32; cols];
                    m.dequantize_row(r, &mut row, kernels);
                    for (k, (got, want)) in row.iter().zip(&w[r * cols..]).enumerate() {
                        assert!(
                            got == want,
                            "{kind:?} row {r} weight {k} {kernels}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The inputs rounded as the kernels round them, independently: per
    /// block of 32, `d = max|x| / max` and `d · round(x · (1 / d))` (the
    /// same f32 operations, so ties round alike).
    fn rounded(x: &[f32], max: f32) -> Vec<f32> {
        x.chunks_exact(BLOCK)
            .flat_map(|b| {
                let d = b.iter().fold(0f32, |m, v| m.max(v.abs())) / max;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                b.iter().map(move |&v| d * (v * inv).round())
            })
            .collect::<Vec<_>>()
    }

    /// The integer path computes exactly `Σ w · x̂`, the product of the
    /// weights with the rounded inputs, offset term included (up to f32
    /// summation). With the exact input sum in Q4_0's and Q4_1's offset
    /// term, it strayed from it by `offset · Σ (x − x̂)` per block.
    #[test]
    fn few_row_products_are_those_of_the_rounded_inputs() {
        let mut rng = StdRng::seed_from_u64(13);
        for kind in KINDS {
            let (rows, cols) = (24, 256);
            let (m, w) = random_packed(kind, rows, cols, &mut rng);
            for n in 1..=DOT_MAX_ROWS {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                for (activations, max) in
                    [(Activations::Int8, 127.0), (Activations::Int16, 32767.0)]
                {
                    let want = reference(&w, &rounded(&x, max), rows, cols, n);
                    let tolerance: Vec<f32> = want.iter().map(|w| 2e-5 * (1.0 + w.abs())).collect();
                    for kernels in CpuKernels::available() {
                        let what = format!("{kind:?} n={n} {activations:?} {kernels}");
                        let got = m.matmul(&x, n, activations, kernels);
                        assert_close(&got, &want, &tolerance, &what);
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_kernels_agree_with_the_portable_ones() {
        if !CpuKernels::Avx2.is_supported() {
            eprintln!("skipped: this CPU lacks avx2/fma/f16c");
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        for kind in KINDS {
            let cols = 256;
            let (m, _) = random_packed(kind, 1, cols, &mut rng);
            let (format, row) = (m.format(), m.row(0));
            for n in 1..=6 {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                for activations in [Activations::Int8, Activations::Int16] {
                    let x = Inputs::new(&x, activations);
                    let (mut portable, mut simd) = (vec![0f32; n], vec![0f32; n]);
                    Kernels::Portable.dot(format, row, &x, cols, &mut portable);
                    Kernels::Avx2.dot(format, row, &x, cols, &mut simd);
                    for (p, s) in portable.iter().zip(&simd) {
                        let what = format!("{kind:?} {activations:?}: {p} vs {s}");
                        assert!((p - s).abs() <= 1e-4 * (1.0 + p.abs()), "{what}");
                    }
                }
            }
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            Kernels::Portable.dequantize(format, row, &mut a);
            Kernels::Avx2.dequantize(format, row, &mut b);
            // The SIMD kernel fuses `q * d + offset` into one rounding.
            for (a, b) in a.iter().zip(&b) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + a.abs()),
                    "{kind:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn stack_and_permute_move_whole_rows() {
        let mut rng = StdRng::seed_from_u64(3);
        let cols = 256;
        let (a, _) = random_packed(TensorType::Q8_0, 2, cols, &mut rng);
        let (b, _) = random_packed(TensorType::Q8_0, 3, cols, &mut rng);
        let both = PackedMatrix::stack(&[a.clone(), b.clone()]).expect("same format");
        assert_eq!(both.format(), BlockFormat::Q8_0);
        assert_eq!(both.rows(), 5);
        assert_eq!(both.row(3), b.row(1));
        let reversed = both.permute_rows(|r| 4 - r);
        assert_eq!(reversed.row(0), b.row(2));
        assert_eq!(reversed.row(4), a.row(0));
        let narrow = PackedMatrix::new(BlockFormat::Q8_0, 1, 32, vec![0; 34]).expect("narrow");
        assert!(PackedMatrix::stack(&[a, narrow]).is_none());
    }

    /// Parts of different formats (a Q4_K_M file's q, k and v, say) stack
    /// with every weight unchanged: into Q8_0 when each part is one f16
    /// scale without a minimum, else into Q8F32.
    #[test]
    fn parts_of_different_formats_stack_exactly() {
        let mut rng = StdRng::seed_from_u64(4);
        let cols = 256;
        let plain = [TensorType::Q5_0, TensorType::Q4_0, TensorType::Q8_0];
        for (kinds, format) in [
            (&plain[..], BlockFormat::Q8_0),
            (&KINDS[..], BlockFormat::Q8F32),
        ] {
            let parts: Vec<(PackedMatrix, Vec<f32>)> = kinds
                .iter()
                .map(|&kind| random_packed(kind, 2, cols, &mut rng))
                .collect();
            let matrices: Vec<PackedMatrix> = parts.iter().map(|(m, _)| m.clone()).collect();
            let stacked = PackedMatrix::stack(&matrices).expect("same width");
            assert_eq!(stacked.format(), format);
            assert_eq!(stacked.rows(), 2 * kinds.len());
            let want: Vec<f32> = parts.iter().flat_map(|(_, w)| w.iter().copied()).collect();
            for kernels in CpuKernels::available() {
                for r in 0..stacked.rows() {
                    let mut row = vec![0f32; cols];
                    stacked.dequantize_row(r, &mut row, kernels);
                    assert!(
                        row.iter().zip(&want[r * cols..]).all(|(g, w)| g == w),
                        "row {r} ({:?}) in {format:?} on {kernels}",
                        kinds[r / 2]
                    );
                }
            }
        }
    }

    #[test]
    fn mismatched_sizes_are_refused() {
        assert!(PackedMatrix::new(BlockFormat::Q4_1, 2, 48, vec![0; 40]).is_none());
        assert!(PackedMatrix::new(BlockFormat::Q4_1, 2, 32, vec![0; 39]).is_none());
        assert!(PackedMatrix::new(BlockFormat::Q4_1, 2, 32, vec![0; 40]).is_some());
    }
}

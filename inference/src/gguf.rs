//! A reader for GGUF files (llama.cpp's model format) and dequantization of
//! its tensor types to f32.
//!
//! The file is memory-mapped; every offset and length read from it is checked
//! against the file's size, so a truncated or corrupt file gives an error that
//! names it instead of a panic. A hostile header cannot make the parser
//! allocate more than the file could hold: every count is checked against
//! the bytes left in the file before anything is reserved for it, and the
//! parsed header's memory is charged against [`MAX_HEADER_MEMORY`] as it
//! grows (an item of one byte in the file costs a whole [`Value`] in
//! memory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{InferenceError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Caps on counts read from the header, far above any real model, so a
/// corrupt header cannot make us allocate without bound.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 20;
const MAX_ARRAY: u64 = 1 << 26;
const MAX_STRING: u64 = 1 << 30;
/// The most memory the parsed header (metadata and tensor table) may take.
/// Real tokenizers are far below it: a 256k-token vocabulary with scores,
/// types and merges is about 40 MiB as [`Value`]s.
pub const MAX_HEADER_MEMORY: usize = 256 << 20;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of values.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The storage type of a tensor (ggml's `ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 32 weights per block: f16 scale, 4-bit values offset by 8.
    Q4_0,
    /// 32 weights per block: f16 scale and minimum, 4-bit values.
    Q4_1,
    /// 32 weights per block: f16 scale, 8-bit values.
    Q8_0,
    /// 32 weights per block: f16 scale, 5-bit values offset by 16.
    Q5_0,
    /// 32 weights per block: f16 scale and minimum, 5-bit values.
    Q5_1,
    /// 256-weight super-blocks with 6-bit sub-block scales and minimums, 4-bit values.
    Q4K,
    /// 256-weight super-blocks with 6-bit sub-block scales and minimums, 5-bit values.
    Q5K,
    /// 256-weight super-blocks with 8-bit sub-block scales, 6-bit values.
    Q6K,
    /// Any other type, kept so the error can name it.
    Other(u32),
}

impl TensorType {
    fn from_raw(raw: u32) -> Self {
        match raw {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    /// (weights per block, bytes per block), or `None` for unsupported types.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Other(_) => return None,
        })
    }

    /// The name llama.cpp uses for this type.
    pub fn name(self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::BF16 => "BF16".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Q5_0 => "Q5_0".into(),
            Self::Q5_1 => "Q5_1".into(),
            Self::Q4K => "Q4_K".into(),
            Self::Q5K => "Q5_K".into(),
            Self::Q6K => "Q6_K".into(),
            Self::Other(raw) => match raw {
                9 => "Q8_1".into(),
                10 => "Q2_K".into(),
                11 => "Q3_K".into(),
                15 => "Q8_K".into(),
                other => format!("ggml type {other}"),
            },
        }
    }
}

/// Where one tensor lies in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions in ggml order: `dims[0]` varies fastest (the row length).
    pub dims: Vec<u64>,
    /// Storage type.
    pub kind: TensorType,
    /// Byte offset from the start of the tensor data section.
    offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn len(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape in row-major (PyTorch) order: the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: FileBytes,
    /// Metadata key-value pairs.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// The bytes of a GGUF file: mapped from disk, or handed over in memory.
enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Header memory still allowed (see [`MAX_HEADER_MEMORY`]).
    budget: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let out = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            None => Err(InferenceError::format(
                self.path,
                format!(
                    "truncated GGUF header: needed {n} bytes for {what} at offset {}, file has {}",
                    self.pos,
                    self.bytes.len()
                ),
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(self.corrupt(format!("{what} claims a {len}-byte string")));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.corrupt(format!("{what} is not valid UTF-8")))
    }

    fn corrupt(&self, reason: String) -> InferenceError {
        InferenceError::format(self.path, format!("corrupt GGUF header: {reason}"))
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    /// Refuses `count` items of at least `min_bytes` each when the rest of
    /// the file cannot hold them, before anything is allocated for them.
    fn fits(&self, count: u64, min_bytes: u64, what: &str) -> Result<()> {
        if count.saturating_mul(min_bytes) > self.remaining() {
            return Err(self.corrupt(format!(
                "{what} claims {count} items of at least {min_bytes} bytes, but only {} bytes follow",
                self.remaining()
            )));
        }
        Ok(())
    }

    /// Takes `bytes` of header memory from the budget; `what` names the
    /// field in the error.
    fn charge(&mut self, bytes: usize, what: impl FnOnce() -> String) -> Result<()> {
        match self.budget.checked_sub(bytes) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => Err(self.corrupt(format!(
                "{} takes the parsed header past {} MiB of memory",
                what(),
                MAX_HEADER_MEMORY >> 20
            ))),
        }
    }

    fn value(&mut self, kind: u32, key: &str, depth: u8) -> Result<Value> {
        Ok(match kind {
            0 => Value::U64(u64::from(self.array::<1>(key)?[0])),
            1 => Value::I64(i64::from(i8::from_le_bytes(self.array(key)?))),
            2 => Value::U64(u64::from(u16::from_le_bytes(self.array(key)?))),
            3 => Value::I64(i64::from(i16::from_le_bytes(self.array(key)?))),
            4 => Value::U64(u64::from(self.u32(key)?)),
            5 => Value::I64(i64::from(i32::from_le_bytes(self.array(key)?))),
            6 => Value::F64(f64::from(f32::from_le_bytes(self.array(key)?))),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => {
                let s = self.string(key)?;
                self.charge(s.len(), || format!("`{key}`"))?;
                Value::Str(s)
            }
            9 => {
                if depth > 2 {
                    return Err(self.corrupt(format!("`{key}` nests arrays too deeply")));
                }
                let item_kind = self.u32(key)?;
                let count = self.u64(key)?;
                if count > MAX_ARRAY {
                    return Err(self.corrupt(format!("`{key}` claims {count} array items")));
                }
                let min_bytes = value_min_bytes(item_kind).ok_or_else(|| {
                    self.corrupt(format!("`{key}` has unknown value type {item_kind}"))
                })?;
                self.fits(count, min_bytes, &format!("`{key}`"))?;
                // `count` fits in the file, so it fits in usize.
                let count = count as usize;
                self.charge(count.saturating_mul(std::mem::size_of::<Value>()), || {
                    format!("`{key}` ({count} items)")
                })?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(item_kind, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.corrupt(format!("`{key}` has unknown value type {other}"))),
        })
    }
}

/// The fewest bytes a metadata value of type `kind` takes in the file
/// (`None` for an unknown type).
fn value_min_bytes(kind: u32) -> Option<u64> {
    Some(match kind {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        // A string's length; an array's item type and count.
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

/// The fewest bytes a tensor's entry takes in the table: name length, one
/// dimension, type, offset.
const TENSOR_INFO_MIN_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| InferenceError::io(path, e))?;
        // SAFETY: the map is read-only and the model files are not modified
        // while a node runs; a concurrent truncation would be a SIGBUS, the
        // same risk every mmap-based model loader accepts.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| InferenceError::io(path, e))?;
        Self::parse(path, FileBytes::Mapped(map))
    }

    /// Parses a whole GGUF file held in memory (header, then tensor data),
    /// with the same checks as [`GgufFile::open`]; `path` only names the
    /// bytes in errors. The fuzz targets (`fuzz/`) enter the parser here.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        Self::parse(path, FileBytes::Owned(bytes))
    }

    fn parse(path: &Path, map: FileBytes) -> Result<Self> {
        let mut r = Reader {
            bytes: &map,
            pos: 0,
            path,
            budget: MAX_HEADER_MEMORY,
        };
        if r.take(4, "the magic number")? != MAGIC {
            return Err(InferenceError::format(
                path,
                "not a GGUF file (the first four bytes are not `GGUF`)",
            ));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(InferenceError::format(
                path,
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        if n_tensors > MAX_TENSORS || n_kv > MAX_KV {
            return Err(r.corrupt(format!("{n_tensors} tensors and {n_kv} metadata entries")));
        }
        // A key's length, its type and the smallest value.
        r.fits(n_kv, 8 + 4 + 1, "the metadata count")?;
        r.fits(n_tensors, TENSOR_INFO_MIN_BYTES, "the tensor count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("a metadata key")?;
            let kind = r.u32(&key)?;
            r.charge(key.len() + std::mem::size_of::<(String, Value)>(), || {
                format!("`{key}`")
            })?;
            let value = r.value(kind, &key, 0)?;
            if metadata.contains_key(&key) {
                return Err(r.corrupt(format!("metadata key `{key}` appears twice")));
            }
            metadata.insert(key, value);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..n_tensors {
            let name = r.string("a tensor name")?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.corrupt(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            r.charge(
                name.len() + std::mem::size_of::<(String, TensorInfo)>() + 8 * n_dims as usize,
                || format!("tensor `{name}`"),
            )?;
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&name)?);
            }
            let kind = TensorType::from_raw(r.u32(&name)?);
            let offset = r.u64(&name)?;
            if tensors.contains_key(&name) {
                return Err(r.corrupt(format!("tensor `{name}` appears twice")));
            }
            tensors.insert(name, TensorInfo { dims, kind, offset });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(r.corrupt(format!("general.alignment is {alignment}")));
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = map.len() as u64;
        let out = Self {
            path: path.to_path_buf(),
            map,
            metadata,
            tensors,
            data_start,
        };
        for (name, info) in &out.tensors {
            let (start, len) = out.span(name, info)?;
            if start.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(InferenceError::format(
                    path,
                    format!(
                        "truncated: tensor `{name}` needs bytes {start}..{} but the file has {file_len}; download it again",
                        start.saturating_add(len)
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn span(&self, name: &str, info: &TensorInfo) -> Result<(u64, u64)> {
        let (per_block, block_bytes) =
            info.kind
                .block()
                .ok_or_else(|| InferenceError::UnsupportedQuantization {
                    tensor: name.to_string(),
                    kind: info.kind.name(),
                })?;
        let n = info
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                InferenceError::format(&self.path, format!("tensor `{name}` is impossibly large"))
            })?;
        if !info.dims[0].is_multiple_of(per_block as u64) {
            return Err(InferenceError::format(
                &self.path,
                format!(
                    "tensor `{name}` has rows of {} weights, not a multiple of the {}-weight block",
                    info.dims[0], per_block
                ),
            ));
        }
        let len = (n / per_block as u64)
            .checked_mul(block_bytes as u64)
            .ok_or_else(|| {
                InferenceError::format(&self.path, format!("tensor `{name}` is impossibly large"))
            })?;
        let start = self.data_start.checked_add(info.offset).ok_or_else(|| {
            InferenceError::format(
                &self.path,
                format!(
                    "corrupt GGUF header: tensor `{name}` has offset {} past any file",
                    info.offset
                ),
            )
        })?;
        Ok((start, len))
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A tensor's description and its bytes as stored (blocks for the
    /// quantized types).
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| InferenceError::weight(name, "missing from the GGUF file"))?;
        let (start, len) = self.span(name, info)?;
        Ok((info, &self.map[start as usize..(start + len) as usize]))
    }

    /// Reads and dequantizes a tensor to f32, in row-major order of
    /// [`TensorInfo::shape`].
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (info, bytes) = self.tensor_bytes(name)?;
        let n = info.len() as usize;
        let values = dequantize(info.kind, bytes, n).ok_or_else(|| {
            InferenceError::UnsupportedQuantization {
                tensor: name.to_string(),
                kind: info.kind.name(),
            }
        })?;
        Ok((info.shape(), values))
    }
}

/// Dequantizes `n` weights stored as `kind` in `bytes` (whose length the
/// caller checked). Returns `None` for unsupported types.
pub fn dequantize(kind: TensorType, bytes: &[u8], n: usize) -> Option<Vec<f32>> {
    let mut out = Vec::with_capacity(n);
    match kind {
        TensorType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        TensorType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        TensorType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        _ => {
            let block = |b: &SubBlock| out.extend((0..32).map(|i| b.weight(i)));
            if !sub_blocks(kind, bytes, block) {
                return None;
            }
        }
    }
    (out.len() == n).then_some(out)
}

/// 32 consecutive weights of a quantized tensor in one common form:
/// `w[i] = scales[i / 16] · q[i] + min`. Every block type is this with
/// its own integers and factors: Q4_0 is `q = nibble − 8`, one scale, no
/// minimum; Q4_K's sub-block has the super-block's f16 scale times its
/// 6-bit scale, and minus its f16 minimum times its 6-bit minimum; Q6_K's
/// 32 weights have two 8-bit scales, one per 16. The factors are exact in
/// f32 (an f16 times an integer of at most 8 bits), so the weights come
/// out as the format defines them, with one rounding where there is a
/// minimum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubBlock {
    /// The integers, as they multiply their scale.
    pub q: [i8; 32],
    /// The scale of weights 0..16 and of weights 16..32.
    pub scales: [f32; 2],
    /// Added to every weight.
    pub min: f32,
}

impl SubBlock {
    /// Weight `i` (0..32) as f32.
    pub fn weight(&self, i: usize) -> f32 {
        self.scales[i / 16] * f32::from(self.q[i]) + self.min
    }

    /// A block with one scale for all 32 weights.
    fn even(q: [i8; 32], d: f32, min: f32) -> Self {
        Self {
            q,
            scales: [d, d],
            min,
        }
    }
}

/// Calls `f` with each 32 weights of `bytes`, a whole number of `kind`'s
/// blocks, in order; `false` (and no call) when `kind` is not a block type
/// silk reads. The layouts are ggml's (`ggml-quants.c`,
/// `dequantize_row_*`); `inference/tests/quant.rs` checks them against
/// gguf-py's dequantization.
pub fn sub_blocks(kind: TensorType, bytes: &[u8], mut f: impl FnMut(&SubBlock)) -> bool {
    let h = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let Some((_, block_bytes)) = kind.block() else {
        return false;
    };
    let blocks = bytes.chunks_exact(block_bytes);
    match kind {
        TensorType::F32 | TensorType::F16 | TensorType::BF16 | TensorType::Other(_) => {
            return false
        }
        TensorType::Q4_0 | TensorType::Q4_1 => {
            for b in blocks {
                let (min, qs, bias) = if kind == TensorType::Q4_0 {
                    (0.0, &b[2..18], 8)
                } else {
                    (h(b, 2), &b[4..20], 0)
                };
                let nibbles = nibbles(qs);
                let q = std::array::from_fn(|i| nibbles[i] as i8 - bias);
                f(&SubBlock::even(q, h(b, 0), min));
            }
        }
        TensorType::Q8_0 => {
            for b in blocks {
                f(&SubBlock::even(
                    std::array::from_fn(|i| b[2 + i] as i8),
                    h(b, 0),
                    0.0,
                ));
            }
        }
        TensorType::Q5_0 | TensorType::Q5_1 => {
            for b in blocks {
                let (min, at, bias) = if kind == TensorType::Q5_0 {
                    (0.0, 2, 16)
                } else {
                    (h(b, 2), 4, 0)
                };
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                let qs = &b[at + 4..at + 20];
                // The fifth bit of weight i is bit i of qh.
                let nibbles = nibbles(qs);
                let q = std::array::from_fn(|i| {
                    let high = ((qh >> i) & 1) as u8;
                    (nibbles[i] | (high << 4)) as i8 - bias
                });
                f(&SubBlock::even(q, h(b, 0), min));
            }
        }
        TensorType::Q4K | TensorType::Q5K => {
            for b in blocks {
                let (d, dmin) = (h(b, 0), h(b, 2));
                let scales = &b[4..16];
                // Q5_K: 32 bytes of fifth bits, two bits per weight
                // position (one per sub-block pair), then the nibbles.
                let (qh, qs) = if kind == TensorType::Q5K {
                    (Some(&b[16..48]), &b[48..176])
                } else {
                    (None, &b[16..144])
                };
                for (j, chunk) in qs.chunks_exact(32).enumerate() {
                    for (half, shift) in [(0, 0), (1, 4)] {
                        let s = 2 * j + half;
                        let (sc, m) = scale_min_k4(s, scales);
                        let q = std::array::from_fn(|l| {
                            let nibble = (chunk[l] >> shift) & 0x0F;
                            let high = qh.map_or(0, |qh| (qh[l] >> s) & 1);
                            (nibble | (high << 4)) as i8
                        });
                        f(&SubBlock::even(
                            q,
                            d * f32::from(sc),
                            -(dmin * f32::from(m)),
                        ));
                    }
                }
            }
        }
        TensorType::Q6K => {
            for b in blocks {
                let (ql_all, rest) = b.split_at(128);
                let (qh_all, rest) = rest.split_at(64);
                let (sc_all, d) = rest.split_at(16);
                let d = h(d, 0);
                for half in 0..2 {
                    let ql = &ql_all[64 * half..64 * half + 64];
                    let qh = &qh_all[32 * half..32 * half + 32];
                    let sc = &sc_all[8 * half..8 * half + 8];
                    // Sub-block k of this half: low or high nibbles of the
                    // first or second 32 bytes of ql, and bits 2k, 2k+1 of qh.
                    for k in 0..4 {
                        let (low, shift) = (&ql[32 * (k % 2)..32 * (k % 2) + 32], 4 * (k / 2));
                        let q = std::array::from_fn(|l| {
                            let nibble = (low[l] >> shift) & 0x0F;
                            let high = (qh[l] >> (2 * k)) & 3;
                            (nibble | (high << 4)) as i8 - 32
                        });
                        let scale = |i: usize| d * f32::from(sc[i] as i8);
                        f(&SubBlock {
                            q,
                            scales: [scale(2 * k), scale(2 * k + 1)],
                            min: 0.0,
                        });
                    }
                }
            }
        }
    }
    true
}

/// The 32 four-bit values of a 32-weight block's 16 bytes, in weight
/// order: the low nibbles are weights 0..16, the high ones 16..32.
pub(crate) fn nibbles(qs: &[u8]) -> [u8; 32] {
    std::array::from_fn(|i| {
        if i < 16 {
            qs[i] & 0x0F
        } else {
            qs[i - 16] >> 4
        }
    })
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_dequantizes_with_scale_and_minimum() {
        let mut block = Vec::new();
        block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let out = dequantize(TensorType::Q4_1, &block, 32).expect("supported");
        assert_eq!(out[0], -1.0);
        assert_eq!(out[15], 15.0 * 0.5 - 1.0);
        assert_eq!(out[16], 15.0 * 0.5 - 1.0);
        assert_eq!(out[31], -1.0);
    }

    #[test]
    fn q8_0_and_q4_0_blocks_dequantize() {
        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let out = dequantize(TensorType::Q8_0, &block, 32).expect("supported");
        assert_eq!(out[0], -4.0);
        assert_eq!(out[31], 15.0 * 0.25);

        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend(std::iter::repeat_n(0x9Fu8, 16));
        let out = dequantize(TensorType::Q4_0, &block, 32).expect("supported");
        assert_eq!(out[0], (15.0 - 8.0) * 2.0);
        assert_eq!(out[16], (9.0 - 8.0) * 2.0);
    }

    /// A GGUF file built by hand, for hostile headers.
    #[derive(Default)]
    struct Builder {
        kv: Vec<u8>,
        n_kv: u64,
        tensors: Vec<u8>,
        n_tensors: u64,
        data: Vec<u8>,
    }

    impl Builder {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }

        fn kv_str(mut self, key: &str, value: &str) -> Self {
            Self::string(&mut self.kv, key);
            self.kv.extend_from_slice(&8u32.to_le_bytes());
            Self::string(&mut self.kv, value);
            self.n_kv += 1;
            self
        }

        /// An array of `count` u8 items, of which `present` are written.
        fn kv_u8_array(mut self, key: &str, count: u64, present: usize) -> Self {
            Self::string(&mut self.kv, key);
            self.kv.extend_from_slice(&9u32.to_le_bytes());
            self.kv.extend_from_slice(&0u32.to_le_bytes());
            self.kv.extend_from_slice(&count.to_le_bytes());
            self.kv.resize(self.kv.len() + present, 7);
            self.n_kv += 1;
            self
        }

        fn tensor(self, name: &str, dims: &[u64], offset: u64) -> Self {
            self.typed_tensor(name, dims, 0, offset) // F32
        }

        /// A tensor of ggml type `raw`.
        fn typed_tensor(mut self, name: &str, dims: &[u64], raw: u32, offset: u64) -> Self {
            Self::string(&mut self.tensors, name);
            self.tensors
                .extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                self.tensors.extend_from_slice(&d.to_le_bytes());
            }
            self.tensors.extend_from_slice(&raw.to_le_bytes());
            self.tensors.extend_from_slice(&offset.to_le_bytes());
            self.n_tensors += 1;
            self
        }

        fn data(mut self, bytes: usize) -> Self {
            self.data.resize(bytes, 0);
            self
        }

        fn bytes(&self, n_tensors: u64, n_kv: u64) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&n_tensors.to_le_bytes());
            out.extend_from_slice(&n_kv.to_le_bytes());
            out.extend_from_slice(&self.kv);
            out.extend_from_slice(&self.tensors);
            out.resize(out.len().div_ceil(32) * 32, 0);
            out.extend_from_slice(&self.data);
            out
        }

        /// Writes the file and opens it.
        fn open_with_counts(&self, n_tensors: u64, n_kv: u64) -> Result<GgufFile> {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("hostile.gguf");
            std::fs::write(&path, self.bytes(n_tensors, n_kv)).expect("write");
            GgufFile::open(&path)
        }

        fn open(&self) -> Result<GgufFile> {
            self.open_with_counts(self.n_tensors, self.n_kv)
        }
    }

    fn refused(result: Result<GgufFile>) -> String {
        match result {
            Ok(_) => panic!("a hostile file was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_well_formed_file_opens() {
        let file = Builder::default()
            .kv_str("general.architecture", "llama")
            .tensor("t", &[4], 0)
            .data(16)
            .open()
            .expect("valid");
        assert_eq!(
            file.get("general.architecture").and_then(Value::as_str),
            Some("llama")
        );
        let (_, values) = file.tensor_f32("t").expect("tensor");
        assert_eq!(values, vec![0.0; 4]);
    }

    /// A file holding a block type silk does not read (Q2_K here) is
    /// refused as it opens, naming the tensor and the type; no layout
    /// reads the type either.
    #[test]
    fn an_unread_block_type_is_refused_by_tensor_and_type() {
        let err = refused(
            Builder::default()
                .typed_tensor("blk.0.ffn_down.weight", &[256], 10, 0)
                .data(84)
                .open(),
        );
        assert!(
            err.contains("blk.0.ffn_down.weight") && err.contains("Q2_K"),
            "{err}"
        );
        let kind = TensorType::from_raw(10);
        assert_eq!(kind.name(), "Q2_K");
        assert!(dequantize(kind, &[0; 84], 256).is_none());
        assert!(crate::packed::BlockFormat::for_gguf(kind).is_none());
        assert!(crate::packed::PackedMatrix::from_gguf(kind, 1, 256, &[0; 84]).is_none());
    }

    /// One-byte items cost a whole `Value` each: 9 Mi of them in a 9 MB
    /// file would be 288 MiB of memory, past the cap.
    #[test]
    fn metadata_memory_is_capped_whatever_the_file_holds() {
        let count = 9usize << 20;
        let msg = refused(
            Builder::default()
                .kv_u8_array("tokenizer.ggml.token_type", count as u64, count)
                .open(),
        );
        assert!(
            msg.contains("tokenizer.ggml.token_type") && msg.contains("256 MiB"),
            "{msg}"
        );
    }

    /// A count the rest of the file cannot hold is refused before anything
    /// is reserved for it.
    #[test]
    fn counts_past_the_end_of_the_file_are_refused_by_field() {
        let msg = refused(
            Builder::default()
                .kv_u8_array("general.tags", 1 << 25, 10)
                .open(),
        );
        assert!(
            msg.contains("`general.tags` claims 33554432 items") && msg.contains("bytes follow"),
            "{msg}"
        );
        let msg = refused(
            Builder::default()
                .kv_str("general.architecture", "llama")
                .open_with_counts(1 << 19, 1),
        );
        assert!(
            msg.contains("the tensor count claims 524288 items"),
            "{msg}"
        );
        let msg = refused(Builder::default().open_with_counts(0, 1 << 19));
        assert!(
            msg.contains("the metadata count claims 524288 items"),
            "{msg}"
        );
    }

    #[test]
    fn a_tensor_offset_that_would_wrap_is_refused_by_name() {
        let msg = refused(
            Builder::default()
                .tensor("blk.0.attn_q.weight", &[4], u64::MAX - 8)
                .data(16)
                .open(),
        );
        assert!(
            msg.contains("tensor `blk.0.attn_q.weight` has offset 18446744073709551607"),
            "{msg}"
        );
    }

    #[test]
    fn a_tensor_past_the_end_or_impossibly_large_is_refused_by_name() {
        let msg = refused(
            Builder::default()
                .tensor("output.weight", &[4], 64)
                .data(16)
                .open(),
        );
        assert!(
            msg.contains("tensor `output.weight` needs bytes") && msg.contains("truncated"),
            "{msg}"
        );
        let msg = refused(
            Builder::default()
                .tensor("huge", &[1 << 62, 2], 0)
                .data(16)
                .open(),
        );
        assert!(msg.contains("tensor `huge` is impossibly large"), "{msg}");
        let msg = refused(
            Builder::default()
                .tensor("huge", &[1 << 62], 0)
                .data(16)
                .open(),
        );
        assert!(msg.contains("tensor `huge` is impossibly large"), "{msg}");
    }

    #[test]
    fn duplicate_keys_and_tensor_names_are_refused() {
        let msg = refused(
            Builder::default()
                .kv_str("general.architecture", "llama")
                .kv_str("general.architecture", "qwen3")
                .open(),
        );
        assert!(
            msg.contains("metadata key `general.architecture` appears twice"),
            "{msg}"
        );
        let msg = refused(
            Builder::default()
                .tensor("t", &[4], 0)
                .tensor("t", &[4], 0)
                .data(16)
                .open(),
        );
        assert!(msg.contains("tensor `t` appears twice"), "{msg}");
    }

    proptest::proptest! {
        /// Any corruption of a valid header is an error or a file, never a
        /// panic.
        #[test]
        fn corrupted_headers_never_panic(
            edits in proptest::collection::vec((0usize..200, proptest::prelude::any::<u8>()), 1..8),
            cut in 0usize..260,
        ) {
            let mut bytes = Builder::default()
                .kv_str("general.architecture", "llama")
                .kv_u8_array("general.tags", 3, 3)
                .tensor("t", &[4], 0)
                .tensor("u", &[2, 2], 32)
                .data(64)
                .bytes(2, 2);
            for (at, value) in edits {
                if at < bytes.len() {
                    bytes[at] = value;
                }
            }
            bytes.truncate(cut.max(4));
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("fuzzed.gguf");
            std::fs::write(&path, &bytes).expect("write");
            if let Ok(file) = GgufFile::open(&path) {
                for name in file.tensors.keys() {
                    let _ = file.tensor_f32(name);
                }
            }
        }
    }

    #[test]
    fn truncated_and_foreign_files_are_rejected_with_their_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.gguf");
        std::fs::write(&path, b"GGUF\x03\x00").expect("write");
        let err = GgufFile::open(&path).expect_err("truncated");
        let msg = err.to_string();
        assert!(
            msg.contains("bad.gguf") && msg.contains("truncated"),
            "{msg}"
        );

        std::fs::write(&path, b"PK\x03\x04 not a model").expect("write");
        let msg = GgufFile::open(&path).expect_err("foreign").to_string();
        assert!(msg.contains("not a GGUF file"), "{msg}");
    }
}

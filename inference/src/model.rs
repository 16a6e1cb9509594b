//! Finding and loading a model: a GGUF file or a Hugging Face directory,
//! its identity (name plus SHA-256 of its weight files), tokenizer and
//! transformer.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::prelude::Backend;
use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::cpu::CpuKernels;
use crate::error::{InferenceError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::transformer::{Precision, Transformer, WeightLayout};
use crate::weights::{safetensors_files, GgufSource, SafetensorsSource};

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// One GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face directory with `config.json` and safetensors.
    HfDir(PathBuf),
}

/// A model on disk, identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    /// Human name (the file or directory name without extension).
    pub name: String,
    /// `name@sha256:<hex>`: the hash covers every weight file, so two nodes
    /// with the same id serve the same weights.
    pub id: String,
    /// The files.
    pub format: ModelFormat,
}

impl ModelSource {
    /// Identifies the model at `path` (a `.gguf` file or a directory).
    pub fn from_path(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| InferenceError::io(path, e))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string();
        if meta.is_dir() {
            if !path.join("config.json").exists() {
                return Err(InferenceError::format(
                    path,
                    "a model directory needs config.json",
                ));
            }
            let files = safetensors_files(path)?;
            let mut outer = Sha256::new();
            for f in &files {
                outer.update(file_sha256(f)?);
            }
            let hash = if files.len() == 1 {
                file_sha256(&files[0])?
            } else {
                outer.finalize().into()
            };
            let name = path
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("model")
                .to_string();
            Ok(Self {
                id: format!("{name}@sha256:{}", hex::encode(hash)),
                name,
                format: ModelFormat::HfDir(path.to_path_buf()),
            })
        } else {
            let hash = cached_sha256(path)?;
            Ok(Self {
                id: format!("{stem}@sha256:{hash}"),
                name: stem,
                format: ModelFormat::Gguf(path.to_path_buf()),
            })
        }
    }
}

impl ModelSource {
    /// Only the model's tokenizer (with its chat template), without the
    /// weights: what a gateway needs to count a prompt's tokens.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.format {
            ModelFormat::Gguf(path) => Tokenizer::from_gguf(&GgufFile::open(path)?),
            ModelFormat::HfDir(dir) => Tokenizer::from_hf_dir(dir),
        }
    }
}

/// SHA-256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<[u8; 32]> {
    let mut file = std::fs::File::open(path).map_err(|e| InferenceError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| InferenceError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// The hex SHA-256 of a file, remembered in a `<file>.sha256` sidecar that
/// is trusted only while the file's size and modification time match.
pub fn cached_sha256(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| InferenceError::io(path, e))?;
    let stamp = format!(
        "{} {}",
        meta.len(),
        meta.modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let sidecar = PathBuf::from(format!("{}.sha256", path.display()));
    if let Ok(text) = std::fs::read_to_string(&sidecar) {
        if let Some((hash, rest)) = text.trim().split_once(' ') {
            if rest == stamp && hash.len() == 64 {
                return Ok(hash.to_string());
            }
        }
    }
    let hash = hex::encode(file_sha256(path)?);
    // A read-only model directory is fine: the sidecar is only a cache.
    let _ = std::fs::write(&sidecar, format!("{hash} {stamp}\n"));
    Ok(hash)
}

/// A model ready to run: tokenizer and weights on a device.
pub struct LoadedModel<B: Backend> {
    /// Where it came from and its id.
    pub source: ModelSource,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its weights.
    pub transformer: Transformer<B>,
}

impl<B: Backend> LoadedModel<B> {
    /// Reads config, tokenizer and weights, holding the weights in `layout`,
    /// on the CPU kernels `SILK_CPU_KERNELS` asks for (the widest this CPU
    /// runs by default; see [`crate::cpu`]).
    pub fn load(source: ModelSource, layout: WeightLayout, device: &B::Device) -> Result<Self> {
        Self::load_on(source, layout, CpuKernels::from_env()?, device)
    }

    /// As [`Self::load`], on the CPU kernels `kernels` (an error if this CPU
    /// cannot run them).
    pub fn load_on(
        source: ModelSource,
        layout: WeightLayout,
        kernels: CpuKernels,
        device: &B::Device,
    ) -> Result<Self> {
        Self::load_with(source, layout, kernels, Precision::F32, device)
    }

    /// As [`Self::load_on`], dense weights in `precision` (the packed
    /// layout takes only f32).
    pub fn load_with(
        source: ModelSource,
        layout: WeightLayout,
        kernels: CpuKernels,
        precision: Precision,
        device: &B::Device,
    ) -> Result<Self> {
        let (tokenizer, transformer) = match &source.format {
            ModelFormat::Gguf(path) => {
                let file = GgufFile::open(path)?;
                let config = ModelConfig::from_gguf(&file)?;
                let tokenizer = Tokenizer::from_gguf(&file)?;
                let transformer = Transformer::load(
                    config,
                    &GgufSource::new(&file),
                    layout,
                    kernels,
                    precision,
                    device,
                )?;
                (tokenizer, transformer)
            }
            ModelFormat::HfDir(dir) => {
                let config_path = dir.join("config.json");
                let text = std::fs::read_to_string(&config_path)
                    .map_err(|e| InferenceError::io(&config_path, e))?;
                let json: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| InferenceError::format(&config_path, format!("not JSON: {e}")))?;
                let config = ModelConfig::from_hf_json(&json)?;
                let tokenizer = Tokenizer::from_hf_dir(dir)?;
                let weights = SafetensorsSource::open(&safetensors_files(dir)?)?;
                (
                    tokenizer,
                    Transformer::load(config, &weights, layout, kernels, precision, device)?,
                )
            }
        };
        Ok(Self {
            source,
            tokenizer,
            transformer,
        })
    }
}

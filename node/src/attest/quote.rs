//! Quote generation on a TDX guest through the kernel's configfs-tsm
//! interface.
//!
//! Linux (6.7 and later) exposes attestation reports as plain files under
//! `/sys/kernel/config/tsm/report` (see the kernel's
//! `Documentation/ABI/testing/configfs-tsm`). One report is:
//!
//! 1. `mkdir <root>/<name>`: the kernel populates the entry with attribute
//!    files;
//! 2. write 64 bytes of report data to `inblob`;
//! 3. read the quote from `outblob`;
//! 4. read `generation` (also read before step 2): it counts writes to the
//!    entry, so a value other than one more than before means another process
//!    wrote to the same entry between our write and our read, and the quote
//!    cannot be trusted to hold our data;
//! 5. `rmdir` the entry.
//!
//! No crate is used: the interface is five file operations.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::debug;

use super::AttestError;

/// Where the kernel mounts the configfs-tsm report interface.
pub const DEFAULT_TSM_REPORT_DIR: &str = "/sys/kernel/config/tsm/report";

/// Provider name the TDX guest driver reports in `provider`.
pub const TDX_PROVIDER: &str = "tdx_guest";

static ENTRY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A handle on the configfs-tsm report directory.
#[derive(Debug, Clone)]
pub struct TsmReport {
    root: PathBuf,
}

impl Default for TsmReport {
    fn default() -> Self {
        Self::new(DEFAULT_TSM_REPORT_DIR)
    }
}

impl TsmReport {
    /// A handle on the report interface mounted at `root` (normally
    /// [`DEFAULT_TSM_REPORT_DIR`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory this handle uses.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the report interface exists, i.e. whether this looks like a
    /// confidential guest with configfs-tsm mounted.
    pub fn is_available(&self) -> bool {
        self.root.is_dir()
    }

    /// Asks the TDX module for a quote whose `report_data` is `report_data`.
    ///
    /// Returns [`AttestError::TsmUnavailable`] when the interface is absent
    /// (not a TDX guest, or configfs not mounted): the caller should then run
    /// in `insecure` mode.
    pub fn generate(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, AttestError> {
        if !self.is_available() {
            return Err(AttestError::TsmUnavailable {
                path: self.root.clone(),
            });
        }
        let name = format!(
            "silk-{}-{}",
            std::process::id(),
            ENTRY_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let entry = self.root.join(name);
        fs::create_dir(&entry).map_err(|e| tsm_io("create report entry", &entry, e))?;
        let guard = EntryGuard(entry.clone());

        let provider_path = entry.join("provider");
        let provider = fs::read_to_string(&provider_path)
            .map_err(|e| tsm_io("read provider", &provider_path, e))?;
        let provider = provider.trim();
        if provider != TDX_PROVIDER {
            return Err(AttestError::UnsupportedTsmProvider {
                provider: provider.to_string(),
            });
        }

        let generation_path = entry.join("generation");
        let before = read_generation(&generation_path)?;

        let inblob = entry.join("inblob");
        fs::write(&inblob, report_data).map_err(|e| tsm_io("write inblob", &inblob, e))?;
        let outblob = entry.join("outblob");
        let quote = fs::read(&outblob).map_err(|e| tsm_io("read outblob", &outblob, e))?;

        let generation = read_generation(&generation_path)?;
        if generation != before.wrapping_add(1) {
            return Err(AttestError::TsmRace { generation });
        }
        if quote.is_empty() {
            return Err(AttestError::Tsm {
                action: "read outblob",
                path: outblob,
                source: std::io::Error::new(ErrorKind::UnexpectedEof, "empty quote"),
            });
        }
        drop(guard);
        debug!(bytes = quote.len(), "generated TDX quote via configfs-tsm");
        Ok(quote)
    }
}

fn read_generation(path: &Path) -> Result<u64, AttestError> {
    let text = fs::read_to_string(path).map_err(|e| tsm_io("read generation", path, e))?;
    text.trim().parse().map_err(|_| AttestError::Tsm {
        action: "parse generation",
        path: path.to_path_buf(),
        source: std::io::Error::new(ErrorKind::InvalidData, text.trim().to_string()),
    })
}

fn tsm_io(action: &'static str, path: &Path, source: std::io::Error) -> AttestError {
    AttestError::Tsm {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Removes the report entry however `generate` ends.
struct EntryGuard(PathBuf);

impl Drop for EntryGuard {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.0) {
            debug!(path = %self.0.display(), error = %e, "could not remove configfs-tsm entry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_interface_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tsm = TsmReport::new(dir.path().join("no-such-tsm"));
        assert!(!tsm.is_available());
        let err = tsm.generate(&[0u8; 64]).expect_err("no interface");
        assert!(matches!(err, AttestError::TsmUnavailable { .. }));
        assert!(err.to_string().contains("insecure"), "{err}");
    }

    #[test]
    fn a_plain_directory_without_kernel_attributes_fails_and_cleans_up() {
        // A real configfs entry gets its attribute files from the kernel; a
        // plain directory does not, so reading `provider` fails. The entry we
        // created must be removed again.
        let dir = tempfile::tempdir().expect("tempdir");
        let tsm = TsmReport::new(dir.path());
        let err = tsm.generate(&[1u8; 64]).expect_err("not configfs");
        assert!(
            matches!(
                err,
                AttestError::Tsm {
                    action: "read provider",
                    ..
                }
            ),
            "{err}"
        );
        let left: Vec<_> = fs::read_dir(dir.path()).expect("read_dir").collect();
        assert!(left.is_empty(), "entry left behind: {left:?}");
    }
}

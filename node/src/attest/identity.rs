//! The node's identity key file: a raw 32-byte ed25519 secret, the same
//! bytes `libp2p::identity::ed25519::SecretKey::try_from_bytes` takes, so the
//! overlay can build its libp2p keypair from the same file. On a TDX worker
//! the file is created inside the trust domain and never leaves it.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use super::AttestError;

/// File name of the identity key inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// The path of the identity key in `data_dir`.
pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_FILE)
}

/// The node's ed25519 identity.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    key: SigningKey,
}

impl NodeIdentity {
    /// Reads the key at `path`. A missing file is
    /// [`AttestError::IdentityMissing`].
    pub fn load(path: &Path) -> Result<Self, AttestError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AttestError::IdentityMissing {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(AttestError::Io {
                    action: "read identity key",
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let secret: [u8; 32] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| AttestError::InvalidIdentity {
                    path: path.to_path_buf(),
                    len: bytes.len(),
                })?;
        Ok(Self {
            key: SigningKey::from_bytes(&secret),
        })
    }

    /// Creates a fresh key at `path` (mode 0600 on Unix). Fails if the file
    /// already exists, so an identity is never overwritten.
    pub fn generate(path: &Path) -> Result<Self, AttestError> {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        let io = |action| {
            let path = path.to_path_buf();
            move |source| AttestError::Io {
                action,
                path,
                source,
            }
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("create data directory"))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io("create identity key"))?;
        file.write_all(key.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io("write identity key"))?;
        Ok(Self { key })
    }

    /// Loads the key at `path`, creating it first if it does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self, AttestError> {
        match Self::load(path) {
            Err(AttestError::IdentityMissing { .. }) => Self::generate(path),
            other => other,
        }
    }

    /// The raw 32-byte ed25519 public key (what [`Claims`](super::Claims)
    /// carry).
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The raw 32-byte secret, for building the libp2p keypair.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_load_and_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = identity_path(dir.path());
        assert!(matches!(
            NodeIdentity::load(&path),
            Err(AttestError::IdentityMissing { .. })
        ));
        let a = NodeIdentity::generate(&path).expect("generate");
        let b = NodeIdentity::load(&path).expect("load");
        assert_eq!(a.public_key(), b.public_key());
        assert!(NodeIdentity::generate(&path).is_err(), "must not overwrite");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, [1u8; 31]).expect("write");
        assert!(matches!(
            NodeIdentity::load(&path),
            Err(AttestError::InvalidIdentity { len: 31, .. })
        ));
    }
}

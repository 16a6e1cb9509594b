//! The node's identity key file: a raw 32-byte ed25519 secret, the same
//! bytes `libp2p::identity::ed25519::SecretKey::try_from_bytes` takes, so the
//! overlay can build its libp2p keypair from the same file. On a TDX worker
//! there is no file: [`NodeIdentity::for_start`] makes the key inside the
//! trust domain at each start and keeps it in memory, and refuses a key
//! file found on the data disk.

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

    /// A fresh key that lives in memory only.
    pub fn ephemeral() -> Self {
        Self {
            key: SigningKey::generate(&mut rand_core::OsRng),
        }
    }

    /// The identity of a node about to start. Outside TDX: the key at
    /// `path`, created on first start. In TDX mode (`tdx`): a fresh key made
    /// here, inside the trust domain, kept in memory and never written to
    /// the data disk; a key file that is already at `path` is refused,
    /// since the host could have placed it there or could read it, and
    /// would then hold the key its quotes bind (audit F9).
    pub fn for_start(path: &Path, tdx: bool) -> Result<Self, AttestError> {
        if !tdx {
            return Self::load_or_generate(path);
        }
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::ephemeral()),
            Ok(_) => Err(AttestError::PreexistingIdentity {
                path: path.to_path_buf(),
            }),
            Err(source) => Err(AttestError::Io {
                action: "look for an identity key",
                path: path.to_path_buf(),
                source,
            }),
        }
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

    /// Audit F9: in TDX mode the key is made in memory at each start and a
    /// key file found on the data disk is refused. Before, the file was
    /// loaded (or created on the data disk), so a host that placed a key
    /// there ran a non-TD node with the key the TD's quotes bind.
    #[test]
    fn in_tdx_mode_the_key_is_made_at_start_and_a_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = identity_path(dir.path());
        let a = NodeIdentity::for_start(&path, true).expect("fresh key");
        let b = NodeIdentity::for_start(&path, true).expect("fresh key");
        assert_ne!(a.public_key(), b.public_key(), "a new key at each start");
        assert!(!path.exists(), "nothing written to the data disk");

        // The host places a key it knows.
        let planted = NodeIdentity::generate(&path).expect("planted");
        match NodeIdentity::for_start(&path, true) {
            Err(AttestError::PreexistingIdentity { path: p }) => assert_eq!(p, path),
            other => panic!("expected the planted key to be refused, got {other:?}"),
        }
        // Outside TDX the file is the node's identity, as before.
        let loaded = NodeIdentity::for_start(&path, false).expect("load");
        assert_eq!(loaded.public_key(), planted.public_key());
    }
}

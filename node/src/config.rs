//! The node's `config.toml`: what `silk init` writes and `silk run` reads.
//! Command-line flags override each value.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::MeshError;

/// File name of the node configuration inside the data directory.
pub const CONFIG_FILE: &str = "config.toml";

/// Settings of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// libp2p listen multiaddrs.
    pub listen: Vec<String>,
    /// Bootstrap multiaddrs, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<String>,
    /// Address of the OpenAI-compatible HTTP API.
    pub api: String,
    /// Serve a model on this node.
    pub worker: bool,
    /// Model to serve (a name from `silk model list` or a path).
    pub model: String,
    /// Where models live; default `<data_dir>/models`.
    pub models_dir: Option<PathBuf>,
    /// Route jobs to workers in `insecure` attestation mode.
    pub allow_insecure_workers: bool,
    /// The price coefficient this worker asks, × 1000.
    pub price_coefficient_milli: u64,
    /// Jobs this gateway sends to one worker at once.
    pub max_jobs_per_worker: u32,
    /// Enable mDNS discovery on the LAN.
    pub mdns: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001".into(),
                "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
            ],
            bootstrap: Vec::new(),
            api: "127.0.0.1:8080".into(),
            worker: false,
            model: silk_inference::DEFAULT_MODEL.into(),
            models_dir: None,
            allow_insecure_workers: false,
            price_coefficient_milli: 1000,
            max_jobs_per_worker: 8,
            mdns: false,
        }
    }
}

impl NodeConfig {
    /// The path of the config file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(CONFIG_FILE)
    }

    /// Reads `<data_dir>/config.toml`, or the defaults when it is absent.
    pub fn load_or_default(data_dir: &Path) -> Result<Self, MeshError> {
        let path = Self::path(data_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| MeshError::Config {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(MeshError::Config {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Writes the config to `<data_dir>/config.toml`.
    pub fn save(&self, data_dir: &Path) -> Result<PathBuf, MeshError> {
        let path = Self::path(data_dir);
        let text = toml::to_string_pretty(self).map_err(|e| MeshError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::create_dir_all(data_dir)
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|e| MeshError::Config {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(path)
    }

    /// The models directory: `models_dir`, else `<data_dir>/models`.
    pub fn models_dir(&self, data_dir: &Path) -> PathBuf {
        self.models_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("models"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = NodeConfig {
            worker: true,
            bootstrap: vec!["/ip4/127.0.0.1/tcp/1/p2p/x".into()],
            ..NodeConfig::default()
        };
        config.save(dir.path()).expect("save");
        assert_eq!(
            NodeConfig::load_or_default(dir.path()).expect("load"),
            config
        );
        std::fs::write(NodeConfig::path(dir.path()), "nonsense = 1\n").expect("write");
        assert!(NodeConfig::load_or_default(dir.path()).is_err());
    }
}

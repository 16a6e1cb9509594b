//! The node's `config.toml`: what `silk init` writes and `silk run` reads.
//! Command-line flags override each value.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use silk_chain::{Ledger, TonHttp, TonHttpConfig};

use crate::api::guard::HttpConfig;
use crate::payments::PaymentsConfig;
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
    /// Jobs this gateway sends to one worker at once.
    pub max_jobs_per_worker: u32,
    /// Most requests waiting for a free worker slot at once (0: none wait;
    /// a request that finds no slot gets a 429 at once).
    pub queue_limit: usize,
    /// Longest a request waits for a free worker slot, in seconds.
    pub queue_timeout_s: u64,
    /// Enable mDNS discovery on the LAN.
    pub mdns: bool,
    /// Relay circuits for peers behind NAT (bounded: see
    /// docs/OPERATOR.md). Jobs to and from such peers run over the relay
    /// when hole punching fails.
    pub relay_server: bool,
    /// Relays to listen through from the start, each ending in
    /// `/p2p/<peer id>`. Without any, a node that finds itself unreachable
    /// picks relays among its peers.
    pub relays: Vec<String>,
    /// Peers reach each other on private addresses (a LAN, a lab, a VPN):
    /// autonat probes those too when it checks whether this node can be
    /// dialled.
    pub private_network: bool,
    /// Fewest connected peers the node looks for (it walks the DHT for
    /// more when under it).
    pub min_peers: u32,
    /// Most connected peers the node keeps (it closes the surplus, never
    /// a peer it runs jobs with).
    pub max_peers: u32,
    /// Model ids (`name@sha256:…`) a request naming the model resolves to
    /// first, besides the default model pinned by its hash.
    pub pinned_models: Vec<String>,
    /// Where jobs are settled. Without it the node neither pays as a
    /// gateway nor charges as a worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ledger: Option<LedgerSection>,
    /// Prices, lanes, credit and redemption (defaults when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payments: Option<PaymentsConfig>,
    /// Who may call the HTTP API, and the server's limits (defaults when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpConfig>,
}

/// The `[ledger]` section: which chain settles jobs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSection {
    /// `devnet` (a `silk devnet` on this machine) or `ton` (a TON network).
    pub kind: Option<String>,
    /// Devnet URL (`http://127.0.0.1:PORT`) or the TON JSON-RPC endpoint.
    pub url: Option<String>,
    /// API key of a TON endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

/// Default URL of a local `silk devnet`.
pub const DEFAULT_DEVNET_URL: &str = "http://127.0.0.1:8099";

/// The JSON-RPC endpoint under a devnet or toncenter-style base URL.
pub fn json_rpc(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/jsonRPC") {
        u.to_string()
    } else {
        format!("{u}/api/v2/jsonRPC")
    }
}

impl LedgerSection {
    /// `self` with `kind` and `url` replaced where given (command-line flags).
    pub fn overridden(&self, kind: Option<&str>, url: Option<&str>) -> Self {
        LedgerSection {
            kind: kind.map(str::to_string).or_else(|| self.kind.clone()),
            url: url.map(str::to_string).or_else(|| self.url.clone()),
            api_key: self.api_key.clone(),
        }
    }

    /// A client of the ledger this section names.
    pub fn connect(&self) -> Result<Arc<dyn Ledger>, MeshError> {
        let bad = |reason: String| MeshError::Config {
            path: PathBuf::from(CONFIG_FILE),
            reason,
        };
        let http = |config: TonHttpConfig| -> Result<Arc<dyn Ledger>, MeshError> {
            Ok(Arc::new(
                TonHttp::new(config).map_err(|e| bad(format!("[ledger]: {e}")))?,
            ))
        };
        match self.kind.as_deref().unwrap_or("devnet") {
            "devnet" => http(TonHttpConfig::new(json_rpc(
                self.url.as_deref().unwrap_or(DEFAULT_DEVNET_URL),
            ))),
            "ton" => {
                let url = self.url.as_deref().ok_or_else(|| {
                    bad("[ledger] kind = \"ton\" needs url = the JSON-RPC endpoint (or --ledger-url)".into())
                })?;
                let mut c = TonHttpConfig::new(url.to_string());
                c.api_key = self.api_key.clone();
                http(c)
            }
            other => Err(bad(format!(
                "[ledger] kind {other:?} is unknown; use \"devnet\" or \"ton\""
            ))),
        }
    }
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
            max_jobs_per_worker: 8,
            queue_limit: 256,
            queue_timeout_s: 30,
            mdns: false,
            relay_server: true,
            relays: Vec::new(),
            private_network: false,
            min_peers: 25,
            max_peers: 50,
            pinned_models: Vec::new(),
            ledger: None,
            payments: None,
            http: None,
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

    /// The payments config, defaults filled in.
    pub fn payments(&self) -> PaymentsConfig {
        self.payments.clone().unwrap_or_default()
    }

    /// The `[http]` section, defaults filled in.
    pub fn http(&self) -> HttpConfig {
        self.http.clone().unwrap_or_default()
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

        // Ledger and payments sections, nanoTON amounts as integers.
        std::fs::write(
            NodeConfig::path(dir.path()),
            "worker = true\n[ledger]\nkind = \"devnet\"\nurl = \"http://127.0.0.1:9\"\n\
             [payments]\nlane_amount = 2000000000\nredeem_every_s = 5\n",
        )
        .expect("write");
        let c = NodeConfig::load_or_default(dir.path()).expect("load");
        assert_eq!(
            c.ledger.as_ref().and_then(|l| l.url.as_deref()),
            Some("http://127.0.0.1:9")
        );
        let p = c.payments();
        assert_eq!(p.lane_amount, silk_chain::Coins(2_000_000_000));
        assert_eq!(p.redeem_every_s, 5);
        assert_eq!(p.credit, PaymentsConfig::default().credit);
        assert_eq!(c.http(), HttpConfig::default());
        c.save(dir.path()).expect("save with sections");
        assert_eq!(NodeConfig::load_or_default(dir.path()).expect("reload"), c);
        std::fs::write(NodeConfig::path(dir.path()), "[ledger]\nkind = \"moon\"\n").expect("write");
        let c = NodeConfig::load_or_default(dir.path()).expect("load");
        let e = c
            .ledger
            .expect("ledger")
            .connect()
            .err()
            .expect("unknown kind");
        assert!(e.to_string().contains("moon"), "{e}");
    }
}

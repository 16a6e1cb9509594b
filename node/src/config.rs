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
    /// What the relay server grants others (defaults when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_limits: Option<RelayLimitsSection>,
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

/// The `[relay_limits]` section: what this node's relay server grants peers
/// behind NAT. Each reservation is a peer listening through this node;
/// each circuit a connection relayed for one, carrying its jobs when hole
/// punching fails, so these bound the memory, connections and traffic a
/// relay spends on others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayLimitsSection {
    /// Peers listening through this node at once (0: none).
    pub max_reservations: usize,
    /// Circuits relayed at once, in all.
    pub max_circuits: usize,
    /// Circuits relayed at once for one peer.
    pub max_circuits_per_peer: usize,
    /// A circuit is closed after this many seconds.
    pub circuit_duration_s: u64,
    /// A circuit is closed after carrying this many MiB (both ways).
    pub circuit_mib: u64,
}

impl Default for RelayLimitsSection {
    fn default() -> Self {
        let l = silk_overlay::RELAY_LIMITS;
        Self {
            max_reservations: l.max_reservations,
            max_circuits: l.max_circuits,
            max_circuits_per_peer: l.max_circuits_per_peer,
            circuit_duration_s: l.circuit_duration.as_secs(),
            circuit_mib: l.circuit_bytes >> 20,
        }
    }
}

/// Upper bounds of `[relay_limits]`: past them a relay's favours would
/// cost it more than a node should give strangers (a circuit holds a
/// connection on both sides and buffers in each direction).
const MAX_RESERVATIONS: usize = 4096;
const MAX_CIRCUITS: usize = 1024;
const MAX_CIRCUIT_DURATION_S: u64 = 24 * 60 * 60;
const MAX_CIRCUIT_MIB: u64 = 4096;

impl RelayLimitsSection {
    /// The limits, or what is wrong with them (naming the field).
    pub fn limits(&self) -> Result<silk_overlay::RelayLimits, String> {
        let field = |name: &str, why: String| Err(format!("[relay_limits] {name}: {why}"));
        if self.max_reservations > MAX_RESERVATIONS {
            return field(
                "max_reservations",
                format!("{} is above {MAX_RESERVATIONS}", self.max_reservations),
            );
        }
        if self.max_circuits > MAX_CIRCUITS {
            return field(
                "max_circuits",
                format!("{} is above {MAX_CIRCUITS}", self.max_circuits),
            );
        }
        if self.max_circuits_per_peer > self.max_circuits {
            return field(
                "max_circuits_per_peer",
                format!(
                    "{} is above max_circuits ({})",
                    self.max_circuits_per_peer, self.max_circuits
                ),
            );
        }
        if !(1..=MAX_CIRCUIT_DURATION_S).contains(&self.circuit_duration_s) {
            return field(
                "circuit_duration_s",
                format!(
                    "{} is not in 1..={MAX_CIRCUIT_DURATION_S}",
                    self.circuit_duration_s
                ),
            );
        }
        if !(1..=MAX_CIRCUIT_MIB).contains(&self.circuit_mib) {
            return field(
                "circuit_mib",
                format!("{} is not in 1..={MAX_CIRCUIT_MIB}", self.circuit_mib),
            );
        }
        Ok(silk_overlay::RelayLimits {
            max_reservations: self.max_reservations,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            circuit_duration: std::time::Duration::from_secs(self.circuit_duration_s),
            circuit_bytes: self.circuit_mib << 20,
        })
    }
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
            relay_limits: None,
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
            Ok(text) => {
                let config: Self = toml::from_str(&text).map_err(|e| MeshError::Config {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                // Refused at load, so `silk run` stops before it starts.
                config
                    .relay_limits()
                    .map_err(|reason| MeshError::Config { path, reason })?;
                Ok(config)
            }
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

    /// The relay server's limits: `[relay_limits]` with defaults filled in,
    /// or what is wrong with them.
    pub fn relay_limits(&self) -> Result<silk_overlay::RelayLimits, String> {
        self.relay_limits.clone().unwrap_or_default().limits()
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

    /// `[relay_limits]`: absent means silk's defaults; a partial section
    /// keeps the defaults of the fields it leaves out; a value past its
    /// bound stops the load with the field's name, an unknown key too.
    #[test]
    fn relay_limits_are_read_bounded_and_named_when_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let load = |text: &str| {
            std::fs::write(NodeConfig::path(dir.path()), text).expect("write");
            NodeConfig::load_or_default(dir.path())
        };
        let defaults = load("").expect("load").relay_limits().expect("limits");
        assert_eq!(defaults, silk_overlay::RELAY_LIMITS);

        let c = load("[relay_limits]\nmax_reservations = 0\ncircuit_mib = 64\n").expect("load");
        let limits = c.relay_limits().expect("limits");
        assert_eq!(limits.max_reservations, 0);
        assert_eq!(limits.circuit_bytes, 64 << 20);
        assert_eq!(limits.max_circuits, silk_overlay::RELAY_LIMITS.max_circuits);
        // Saved and read back the same.
        c.save(dir.path()).expect("save");
        assert_eq!(NodeConfig::load_or_default(dir.path()).expect("load"), c);

        for (text, field) in [
            ("max_reservations = 5000", "max_reservations"),
            ("max_circuits = 2000", "max_circuits"),
            (
                "max_circuits = 2\nmax_circuits_per_peer = 3",
                "max_circuits_per_peer",
            ),
            ("circuit_duration_s = 0", "circuit_duration_s"),
            ("circuit_mib = 0", "circuit_mib"),
            ("circuit_mib = 5000", "circuit_mib"),
            ("circuits = 3", "circuits"),
        ] {
            let err = load(&format!("[relay_limits]\n{text}\n"))
                .err()
                .unwrap_or_else(|| panic!("{text}: accepted"))
                .to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

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

//! A local silk testnet: N `silk run` processes on 127.0.0.1.
//!
//! # Bird's-eye view
//!
//! [`Testnet::spawn`] starts node 0 (the bootstrap node), reads its libp2p
//! address from `GET /v1/mesh`, starts the other nodes bootstrapped from it
//! (the first `workers` of them serve the model), and waits until every
//! node's `/v1/mesh` lists every worker. Each node gets its own data
//! directory (identity, log) under one temporary directory; all share the
//! model file through `--models-dir`/`--model`, nothing is copied. Every
//! gateway runs with `--allow-insecure-workers` unless told otherwise,
//! because nodes outside TDX are `insecure`. [`Testnet::kill`] and
//! [`Testnet::restart`] play failures; dropping the [`Testnet`] kills every
//! process it started. [`NodeOptions`] start single nodes elsewhere: through
//! a launcher such as `ip netns exec`, on another address, with extra
//! config.toml lines. A node whose API is not on loopback gets an API key
//! (`silk api-key create`) before it first starts, kept in
//! [`NodeHandle::api_key`] and sent by [`Testnet::get_json`].
//!
//! With `payments` (the default) it first starts a `silk devnet` (a local
//! TON chain running the real wallet and settlement contract code), gives
//! every node a `[ledger]` pointing at it, and funds each node's wallet
//! from the devnet faucet once the node is up: gateways then open lanes to
//! the workers they use on their first job and pay with cheques, and
//! workers redeem them on chain.
//!
//! The same library backs `silk testnet` and the end-to-end tests.
//! [`delay_line`] puts nodes in network namespaces joined through a relay
//! that holds packets for each link's delay (this kernel has no
//! `sch_netem`); [`nat`] puts them behind nftables masquerade NATs.

pub mod delay_line;
pub mod nat;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::Value;

/// Name of the default model file's stem.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// What to start.
#[derive(Debug, Clone)]
pub struct TestnetConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// How many of them (after the bootstrap node when `nodes > workers`) serve the model.
    pub workers: usize,
    /// The `silk` binary.
    pub silk_bin: PathBuf,
    /// The model: a `.gguf` path, or a name inside `models_dir`.
    pub model: String,
    /// Where the models live.
    pub models_dir: PathBuf,
    /// Node indices that start *without* `--allow-insecure-workers`.
    pub strict_nodes: Vec<usize>,
    /// How long to wait for the mesh to converge.
    pub converge_timeout: Duration,
    /// `RUST_LOG` of the nodes.
    pub log_filter: String,
    /// Start a devnet and settle jobs on it.
    pub payments: bool,
    /// TON the faucet gives each node's wallet.
    pub fund_ton: u64,
    /// Extra lines for every node's `[payments]` section of config.toml.
    pub payments_toml: String,
    /// Per-node overrides, by node index; nodes past its end use the defaults.
    pub node_options: Vec<NodeOptions>,
}

/// How one node is started where it differs from the others, e.g. inside
/// a network namespace.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// A command that runs `silk` for this node, e.g.
    /// `["ip", "netns", "exec", "silk-ns"]`; empty runs it directly.
    pub launcher: Vec<String>,
    /// The IPv4 address its libp2p and HTTP listeners bind (default 127.0.0.1).
    pub host: Option<String>,
    /// Top-level lines of its config.toml, e.g. `max_jobs_per_worker = 2`.
    pub config_toml: String,
    /// More environment for its process, e.g. `SILK_LOG_FORMAT=json`.
    pub env: Vec<(String, String)>,
}

/// The `[payments]` settings of testnet nodes: 1 TON lanes, redemption
/// once a worker holds 0.00001 TON in cheques (so a single demo job is
/// redeemed), checked every 2 s.
pub const TESTNET_PAYMENTS_TOML: &str =
    "lane_amount = 1000000000\nredeem_threshold = 10000\nredeem_every_s = 2\ntimeout_s = 30\n";

impl TestnetConfig {
    /// `nodes` nodes, `workers` of them workers, on the model found by
    /// [`locate_model`], with the `silk` binary found by [`locate_silk`].
    pub fn new(nodes: usize, workers: usize) -> anyhow::Result<Self> {
        let (models_dir, model) = locate_model()?;
        Ok(Self {
            silk_bin: locate_silk()?,
            model,
            models_dir,
            ..Self::new_without_model(nodes, workers)
        })
    }

    /// Like [`TestnetConfig::new`] with the binary and model left empty, for
    /// callers that set them.
    pub fn new_without_model(nodes: usize, workers: usize) -> Self {
        Self {
            nodes,
            workers,
            silk_bin: PathBuf::new(),
            model: String::new(),
            models_dir: PathBuf::new(),
            strict_nodes: Vec::new(),
            converge_timeout: Duration::from_secs(60),
            log_filter: "warn,silk_node=info".into(),
            payments: true,
            fund_ton: 100,
            payments_toml: TESTNET_PAYMENTS_TOML.into(),
            node_options: Vec::new(),
        }
    }
}

/// Finds the default model: `SILK_SMOLLM2_GGUF`, else
/// `$SILK_DATA_DIR/models` or `~/.silk/models`. Returns (models dir, model).
pub fn locate_model() -> anyhow::Result<(PathBuf, String)> {
    if let Some(path) = std::env::var_os("SILK_SMOLLM2_GGUF").map(PathBuf::from) {
        if path.is_file() {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            return Ok((dir, path.display().to_string()));
        }
        bail!("SILK_SMOLLM2_GGUF={} is not a file", path.display());
    }
    let data_dir = std::env::var_os("SILK_DATA_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".silk")))
        .context("no HOME: set SILK_SMOLLM2_GGUF to the model file")?;
    models_in(&data_dir)
}

/// The default model inside `<data_dir>/models`, or an error saying to fetch it.
pub fn models_in(data_dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let dir = data_dir.join("models");
    let file = dir.join(format!("{DEFAULT_MODEL}.gguf"));
    if file.is_file() {
        return Ok((dir, file.display().to_string()));
    }
    bail!(
        "the default model is not at {}: run `silk model fetch` first (or set SILK_SMOLLM2_GGUF to the .gguf file)",
        file.display()
    )
}

/// Finds the `silk` binary: `SILK_BIN`, else a `silk` next to the running
/// executable or one directory up (`target/debug/deps/..` for tests).
pub fn locate_silk() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SILK_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("silk");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no `silk` binary near {}: run `cargo build -p silk-node` first or set SILK_BIN",
        exe.display()
    )
}

/// One node process.
#[derive(Debug)]
pub struct NodeHandle {
    /// Index in the testnet.
    pub index: usize,
    /// Base URL of its HTTP API, e.g. `http://127.0.0.1:40123`.
    pub api_url: String,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Whether it serves the model.
    pub worker: bool,
    /// Whether it routes to insecure workers.
    pub allows_insecure: bool,
    /// Its data directory (identity, `node.log`).
    pub data_dir: PathBuf,
    /// Its wallet address, when the testnet settles payments.
    pub wallet: Option<String>,
    /// The API key the harness created for it: nodes whose API is not on
    /// loopback answer only requests that carry a key.
    pub api_key: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NodeHandle {
    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// The node's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("node.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The testnet's `silk devnet` process.
#[derive(Debug)]
pub struct DevnetHandle {
    /// Its base URL, e.g. `http://127.0.0.1:40124`.
    pub url: String,
    child: Child,
}

impl Drop for DevnetHandle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running local mesh.
#[derive(Debug)]
pub struct Testnet {
    /// The nodes, bootstrap node first.
    pub nodes: Vec<NodeHandle>,
    /// The devnet, when the testnet settles payments.
    pub devnet: Option<DevnetHandle>,
    config: TestnetConfig,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// Tries at starting a node, each on a fresh API port when the last one
/// was taken.
const API_PORT_TRIES: u32 = 4;

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

impl Testnet {
    /// Starts the nodes and waits until every node knows every worker.
    pub async fn spawn(config: TestnetConfig) -> anyhow::Result<Self> {
        if config.nodes == 0 || config.workers > config.nodes {
            bail!(
                "need 1 ≤ nodes and workers ≤ nodes (got {} nodes, {} workers)",
                config.nodes,
                config.workers
            );
        }
        if !config.silk_bin.is_file() {
            bail!(
                "{} does not exist: run `cargo build -p silk-node`",
                config.silk_bin.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("silk-testnet").tempdir()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let mut net = Self {
            nodes: Vec::with_capacity(config.nodes),
            devnet: None,
            config,
            client,
            _dir: dir,
        };
        if net.config.payments {
            net.devnet = Some(net.start_devnet().await?);
        }
        // With spare nodes, keep node 0 a plain gateway/bootstrap node.
        let first_worker = usize::from(net.config.nodes > net.config.workers);
        let mut bootstrap: Option<String> = None;
        for i in 0..net.config.nodes {
            let worker = i >= first_worker && i < first_worker + net.config.workers;
            let node = net.start_node(i, worker, bootstrap.as_deref()).await?;
            if bootstrap.is_none() {
                // Not in `net.nodes` yet: its key is passed by hand.
                let mesh = net
                    .get_json_with(
                        &format!("{}/v1/mesh", node.api_url),
                        node.api_key.as_deref(),
                    )
                    .await?;
                bootstrap = mesh["listen_addrs"]
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .find(|a| a.contains("/tcp/"))
                    })
                    .map(str::to_string);
                if bootstrap.is_none() {
                    bail!("node 0 reports no TCP listen address: {mesh}");
                }
            }
            net.nodes.push(node);
        }
        net.wait_converged(net.config.converge_timeout).await?;
        Ok(net)
    }

    async fn start_devnet(&self) -> anyhow::Result<DevnetHandle> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let log = std::fs::File::create(self._dir.path().join("devnet.log"))?;
        let child = Command::new(&self.config.silk_bin)
            .args(["devnet", "--listen", &listen, "--block-ms", "100"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} devnet", self.config.silk_bin.display()))?;
        let mut devnet = DevnetHandle {
            url: format!("http://{listen}"),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if devnet.child.try_wait()?.is_some() {
                bail!(
                    "the devnet exited during startup; its log:\n{}",
                    std::fs::read_to_string(self._dir.path().join("devnet.log"))
                        .unwrap_or_default()
                );
            }
            if self
                .balance(&devnet.url, DEVNET_PROBE_ADDRESS)
                .await
                .is_ok()
            {
                return Ok(devnet);
            }
            if Instant::now() > deadline {
                bail!("the devnet did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The balance of `address` on the devnet at `url`, in nanoTON.
    pub async fn balance(&self, url: &str, address: &str) -> anyhow::Result<u128> {
        let r: Value = self
            .client
            .post(format!("{url}/api/v2/jsonRPC"))
            .json(&serde_json::json!({
                "jsonrpc": "2.0", "id": 1, "method": "getAddressInformation",
                "params": { "address": address },
            }))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let balance = r["result"]["balance"]
            .as_str()
            .with_context(|| format!("no balance in {r}"))?;
        Ok(balance.parse()?)
    }

    /// The on-chain balance of `address` on this testnet's devnet.
    pub async fn devnet_balance(&self, address: &str) -> anyhow::Result<u128> {
        let devnet = self.devnet.as_ref().context("this testnet has no devnet")?;
        self.balance(&devnet.url, address).await
    }

    /// Lane `lane_id` of the settlement contract `contract` as the devnet's
    /// `get_lane` reports it: `(deposited, redeemed)` in nanoTON, `None`
    /// when there is no such lane.
    pub async fn lane_on_chain(
        &self,
        contract: &str,
        lane_id: u32,
    ) -> anyhow::Result<Option<(u128, u128)>> {
        let devnet = self.devnet.as_ref().context("this testnet has no devnet")?;
        let r: Value = self
            .client
            .post(format!("{}/api/v2/jsonRPC", devnet.url))
            .json(&serde_json::json!({
                "jsonrpc": "2.0", "id": 1, "method": "runGetMethod",
                "params": { "address": contract, "method": "get_lane",
                            "stack": [["num", lane_id.to_string()]] },
            }))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let stack = r["result"]["stack"]
            .as_array()
            .with_context(|| format!("no stack in {r}"))?;
        // TVM integers as toncenter writes them: "0x1f", "-0x1" or decimal.
        let num = |i: usize| -> anyhow::Result<i128> {
            let s = stack
                .get(i)
                .and_then(|e| e.get(1))
                .and_then(Value::as_str)
                .with_context(|| format!("no number at {i} in {r}"))?;
            let (neg, digits) = s.strip_prefix('-').map_or((false, s), |d| (true, d));
            let v = match digits.strip_prefix("0x") {
                Some(hex) => i128::from_str_radix(hex, 16)?,
                None => digits.parse()?,
            };
            Ok(if neg { -v } else { v })
        };
        if num(0)? == 0 {
            return Ok(None);
        }
        Ok(Some((u128::try_from(num(2)?)?, u128::try_from(num(3)?)?)))
    }

    /// Sends `ton` TON from the devnet faucet to `address` and waits for it.
    pub async fn fund(&self, address: &str, ton: u64) -> anyhow::Result<()> {
        let devnet = self.devnet.as_ref().context("this testnet has no devnet")?;
        let mut cmd = Command::new(&self.config.silk_bin);
        cmd.args([
            "devnet",
            "mint",
            address,
            &ton.to_string(),
            "--url",
            &devnet.url,
        ])
        .stdin(Stdio::null());
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await?
            .context("running silk devnet mint")?;
        if !out.status.success() {
            bail!(
                "funding {address} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    async fn start_node(
        &self,
        index: usize,
        worker: bool,
        bootstrap: Option<&str>,
    ) -> anyhow::Result<NodeHandle> {
        let data_dir = self._dir.path().join(format!("node-{index}"));
        std::fs::create_dir_all(&data_dir)?;
        let options = self.node_options(index);
        let host = options.host.as_deref().unwrap_or("127.0.0.1");
        let mut api = format!("{host}:{}", free_port()?);
        let allows_insecure = !self.config.strict_nodes.contains(&index);
        let mut args = vec![
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "run".into(),
            "--listen".into(),
            format!("/ip4/{host}/tcp/0"),
            "--api".into(),
            api.clone(),
            "--models-dir".into(),
            self.config.models_dir.display().to_string(),
            "--fast-gossip".into(),
        ];
        if allows_insecure {
            args.push("--allow-insecure-workers".into());
        }
        if worker {
            args.extend([
                "--worker".into(),
                "--model".into(),
                self.config.model.clone(),
            ]);
        }
        if let Some(b) = bootstrap {
            args.extend(["--bootstrap".into(), b.to_string()]);
        }
        let mut toml = options.config_toml.clone();
        if let Some(devnet) = &self.devnet {
            toml.push_str(&format!(
                "\n[ledger]\nkind = \"devnet\"\nurl = \"{}\"\n\n[payments]\n{}",
                devnet.url, self.config.payments_toml
            ));
        }
        if !toml.is_empty() {
            std::fs::write(data_dir.join("config.toml"), toml)?;
        }
        let loopback = host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
        let api_key = if loopback {
            None
        } else {
            Some(self.create_api_key(&data_dir, "testnet", &[]).await?)
        };
        let mut node = NodeHandle {
            index,
            api_url: format!("http://{api}"),
            peer_id: String::new(),
            worker,
            allows_insecure,
            data_dir,
            wallet: None,
            api_key,
            args,
            env: options.env.clone(),
            child: None,
        };
        // A port found free can be taken (by another process's listener or
        // an outgoing connection) before the node binds it: pick another.
        let mut tries = 1;
        while let Err(e) = self.launch(&mut node).await {
            let taken = node
                .log()
                .contains(&format!("cannot listen on {api}: Address already in use"));
            if !taken || tries == API_PORT_TRIES {
                return Err(e);
            }
            tries += 1;
            let _ = std::fs::remove_file(node.data_dir.join("node.log"));
            let fresh = format!("{host}:{}", free_port()?);
            for arg in node.args.iter_mut().filter(|a| **a == api) {
                arg.clone_from(&fresh);
            }
            node.api_url = format!("http://{fresh}");
            api = fresh;
        }
        if let Some(wallet) = node.wallet.clone() {
            self.fund(&wallet, self.config.fund_ton).await?;
        }
        Ok(node)
    }

    /// Runs `silk api-key create --name NAME EXTRA…` on a data directory
    /// (its node must be stopped) and returns the key.
    pub async fn create_api_key(
        &self,
        data_dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let mut cmd = tokio::process::Command::new(&self.config.silk_bin);
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["api-key", "create", "--name", name])
            .args(extra)
            .stdin(Stdio::null());
        let out = cmd.output().await.context("running silk api-key create")?;
        if !out.status.success() {
            bail!(
                "silk api-key create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let key = String::from_utf8(out.stdout)?.trim().to_string();
        if !key.starts_with("sk-silk-") {
            bail!("silk api-key create printed {key:?}, not a key");
        }
        Ok(key)
    }

    /// The API key of the node whose API `url` is on, if it has one.
    pub fn api_key_for(&self, url: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| !n.api_url.is_empty() && url.starts_with(&n.api_url))
            .and_then(|n| n.api_key.as_deref())
    }

    async fn launch(&self, node: &mut NodeHandle) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.data_dir.join("node.log"))?;
        let mut command = match self.node_options(node.index).launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.config.silk_bin);
                c
            }
            None => Command::new(&self.config.silk_bin),
        };
        let child = command
            .args(&node.args)
            .env("RUST_LOG", &self.config.log_filter)
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.config.silk_bin.display()))?;
        node.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if !node.is_running() {
                bail!(
                    "node {} exited during startup; its log:\n{}",
                    node.index,
                    node.log()
                );
            }
            if let Ok(h) = self
                .get_json_with(&format!("{}/health", node.api_url), node.api_key.as_deref())
                .await
            {
                node.peer_id = h["peer_id"].as_str().unwrap_or_default().to_string();
                node.wallet = h["wallet"].as_str().map(str::to_string);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} did not answer /health within 60 s; its log:\n{}",
                    node.index,
                    node.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn node_options(&self, index: usize) -> NodeOptions {
        self.config
            .node_options
            .get(index)
            .cloned()
            .unwrap_or_default()
    }

    /// `GET url` as JSON, with the API key of the node it is on.
    pub async fn get_json(&self, url: &str) -> anyhow::Result<Value> {
        self.get_json_with(url, self.api_key_for(url)).await
    }

    async fn get_json_with(&self, url: &str, key: Option<&str>) -> anyhow::Result<Value> {
        let mut r = self.client.get(url).timeout(Duration::from_secs(5));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        Ok(r.send().await?.error_for_status()?.json().await?)
    }

    /// Peer ids of the running workers.
    pub fn worker_ids(&mut self) -> Vec<String> {
        self.nodes
            .iter_mut()
            .filter(|n| n.worker)
            .filter_map(|n| n.is_running().then(|| n.peer_id.clone()))
            .collect()
    }

    /// The workers `node`'s `/v1/mesh` lists.
    pub async fn known_workers(&self, node: usize) -> anyhow::Result<Vec<String>> {
        let mesh = self
            .get_json(&format!("{}/v1/mesh", self.nodes[node].api_url))
            .await?;
        Ok(mesh["workers"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|w| w["peer_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until every running node's `/v1/mesh` lists every running worker.
    pub async fn wait_converged(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let workers = self.worker_ids();
        loop {
            let mut missing = Vec::new();
            for i in 0..self.nodes.len() {
                if !self.nodes[i].is_running() {
                    continue;
                }
                let known = self.known_workers(i).await.unwrap_or_default();
                for w in &workers {
                    if !known.contains(w) {
                        missing.push(format!("node {i} does not know worker {w}"));
                    }
                }
            }
            if missing.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the mesh did not converge within {timeout:?}: {}",
                    missing.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Kills the node with peer id `peer`; returns its index.
    pub fn kill_peer(&mut self, peer: &str) -> Option<usize> {
        let i = self.nodes.iter().position(|n| n.peer_id == peer)?;
        self.kill(i);
        Some(i)
    }

    /// Restarts node `i` with its data directory (same identity and API port).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.restart_with_env(i, &[]).await
    }

    /// Restarts node `i` like [`Testnet::restart`], with `env` added to its
    /// environment (for example `FAILPOINTS`, which binaries built by
    /// `cargo test` read).
    pub async fn restart_with_env(&mut self, i: usize, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.nodes[i].kill();
        let mut node = std::mem::replace(
            &mut self.nodes[i],
            NodeHandle {
                index: i,
                api_url: String::new(),
                peer_id: String::new(),
                worker: false,
                allows_insecure: false,
                data_dir: PathBuf::new(),
                wallet: None,
                api_key: None,
                args: Vec::new(),
                env: Vec::new(),
                child: None,
            },
        );
        node.env = self.node_options(i).env;
        node.env.extend(
            env.iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string())),
        );
        let r = self.launch(&mut node).await;
        self.nodes[i] = node;
        r
    }

    /// Waits up to `timeout` for node `i`'s process to end on its own (a
    /// fail point, a crash); returns its exit status.
    pub async fn wait_exit(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.nodes[i]
                .child
                .as_mut()
                .with_context(|| format!("node {i} is not running"))?;
            if let Some(status) = child.try_wait()? {
                self.nodes[i].child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("node {i} was still running after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Index of a running node that is not a worker (a pure gateway).
    pub fn gateway(&mut self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| !self.nodes[i].worker && self.nodes[i].is_running())
    }

    /// What the testnet was started with.
    pub fn config(&self) -> &TestnetConfig {
        &self.config
    }

    /// The HTTP client the testnet uses.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// Any valid address, to see whether the devnet answers.
const DEVNET_PROBE_ADDRESS: &str =
    "0:0000000000000000000000000000000000000000000000000000000000000000";

/// A streamed chat completion as the caller saw it.
#[derive(Debug, Clone, Default)]
pub struct StreamedChat {
    /// HTTP status.
    pub status: u16,
    /// `x-silk-worker`.
    pub worker: Option<String>,
    /// `x-silk-attestation`.
    pub attestation: Option<String>,
    /// The text.
    pub text: String,
    /// SSE data payloads, in order.
    pub events: Vec<Value>,
    /// Whether `data: [DONE]` arrived.
    pub done: bool,
    /// An `{"error":…}` event or error body.
    pub error: Option<Value>,
}

/// Sends a streaming chat request to `api_url`; calls `on_token` with each
/// piece of text and `on_start` once the headers (worker) are known.
pub async fn stream_chat(
    client: &reqwest::Client,
    api_url: &str,
    body: Value,
    mut on_start: impl FnMut(&StreamedChat),
    mut on_token: impl FnMut(&str),
) -> anyhow::Result<StreamedChat> {
    let mut body = body;
    body["stream"] = Value::Bool(true);
    let resp = client
        .post(format!("{api_url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await?;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut out = StreamedChat {
        status: resp.status().as_u16(),
        worker: header("x-silk-worker"),
        attestation: header("x-silk-attestation"),
        ..Default::default()
    };
    if !resp.status().is_success() {
        out.error = resp.json().await.ok();
        return Ok(out);
    }
    on_start(&out);
    let mut bytes = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    out.done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data)
                    .with_context(|| format!("undecodable SSE data: {data}"))?;
                if v.get("error").is_some() {
                    out.error = Some(v.clone());
                } else if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                    on_token(t);
                    out.text.push_str(t);
                }
                out.events.push(v);
            }
        }
    }
    Ok(out)
}

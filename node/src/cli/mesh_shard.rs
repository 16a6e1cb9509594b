//! Gossip convergence of a mesh spread over several processes, for
//! `silk bench mesh`.
//!
//! Every node of a mesh holds a socket per connection, and a mesh of
//! in-process nodes holds both ends of each. So one process cannot run a
//! mesh of a few hundred nodes under a usual open-files limit. The benchmark
//! starts the mesh as shards instead: child processes (`silk bench
//! mesh-shard`, hidden) of at most `--nodes-per-process` in-process nodes
//! each, all bootstrapping from node 0 in the first shard.
//!
//! A shard talks JSON lines: it reports on stdout ([`ShardReport`]) and
//! takes commands on stdin (`announce`: every node of the shard announces
//! itself once; end of input: stop). Arrival times are Unix microseconds,
//! the one clock the processes of a machine share.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use silk_overlay::{testing, Multiaddr, PeerId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// Identities of mesh node `i` come from `testing::seeded_keypair(SEED + i)`,
/// so the parent knows every node's peer id without asking.
const SEED: u64 = 7;
/// Seed of the node that joins an existing mesh.
const NEW_WORKER_SEED: u64 = 1_000_000;
/// Bound on each phase (start, mesh, announcement spread).
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
/// The mesh counts as settled once its connection count stayed within
/// [`STEADY_BAND`] for this long...
pub const STEADY_FOR: Duration = Duration::from_secs(10);
/// ...as a fraction of the count.
const STEADY_BAND: f64 = 0.01;
/// The longest wait for a steady mesh; measured as it is after that.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(300);
/// The model name the benchmark nodes announce.
const BENCH_MODEL: &str = "bench-model";

/// Arguments of `silk bench mesh-shard` (started by `silk bench mesh`).
#[derive(Debug, Args)]
pub struct MeshShardArgs {
    /// Index of this shard's first node in the whole mesh.
    #[arg(long)]
    pub first: usize,
    /// Nodes in this shard.
    #[arg(long)]
    pub count: usize,
    /// Connections every node of the shard needs before it reports `meshed`.
    #[arg(long)]
    pub meshed_at: usize,
    /// The nodes' peer budget, `MIN,MAX` (see `silk_overlay::peers`).
    #[arg(long, value_delimiter = ',')]
    pub peer_budget: Vec<u32>,
    /// Nodes listen on QUIC only.
    #[arg(long)]
    pub quic: bool,
    /// Node 0's address; absent for the first shard, which runs node 0.
    #[arg(long)]
    pub bootstrap: Option<Multiaddr>,
}

/// One line a shard writes on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ShardReport {
    /// Every node of the shard is listening.
    Started {
        /// The shard's first node's address (with its peer id).
        addr: String,
    },
    /// Every node of the shard has `meshed_at` connections.
    Meshed,
    /// Connections the shard's nodes hold (every second once meshed).
    Connections {
        /// The sum over the shard's nodes.
        total: usize,
        /// The fewest one node holds.
        fewest: usize,
        /// The most one node holds.
        most: usize,
    },
    /// A node accepted an announcement.
    Arrival {
        /// The node's index in the mesh.
        node: usize,
        /// The announcing peer.
        peer: String,
        /// When, in Unix microseconds.
        at_us: u64,
    },
    /// The shard gave up.
    Failed {
        /// Why.
        error: String,
    },
}

fn unix_us(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// How the benchmark's nodes run.
#[derive(Debug, Clone, Copy)]
pub struct NodeSetup {
    /// The peer budget: fewest and most connections.
    pub peer_budget: (u32, u32),
    /// QUIC instead of TCP: a node then costs one UDP socket, not one
    /// descriptor per connection.
    pub quic: bool,
}

/// A benchmark node: on 127.0.0.1 with the production gossip, ping and
/// republication periods (not the fast ones of `testing::local_config`,
/// which load a large mesh on a small machine far more than a real one).
fn bench_config(seed: u64, setup: NodeSetup) -> silk_overlay::OverlayConfig {
    let listen = if setup.quic {
        "/ip4/127.0.0.1/udp/0/quic-v1"
    } else {
        "/ip4/127.0.0.1/tcp/0"
    };
    let listen = listen.parse().expect("static multiaddr");
    let mut config = silk_overlay::OverlayConfig::new(testing::seeded_keypair(seed), vec![listen]);
    (config.min_peers, config.max_peers) = setup.peer_budget;
    // Every benchmark node dials in from 127.0.0.1.
    config.max_inbound_connections_per_ip = config.max_inbound_connections;
    config
}

/// The peer id of mesh node `i`.
fn mesh_peer(i: usize) -> PeerId {
    testing::seeded_keypair(SEED + i as u64)
        .public()
        .to_peer_id()
}

/// Runs `silk bench mesh-shard`: the child side.
pub async fn run_shard(args: MeshShardArgs) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<ShardReport>();
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(report) = rx.recv().await {
            let mut line = serde_json::to_vec(&report)?;
            line.push(b'\n');
            out.write_all(&line).await?;
            out.flush().await?;
        }
        anyhow::Ok(())
    });
    let result = shard(&args, &tx).await;
    if let Err(e) = &result {
        let _ = tx.send(ShardReport::Failed {
            error: format!("{e:#}"),
        });
    }
    drop(tx);
    writer.await??;
    result
}

async fn shard(
    args: &MeshShardArgs,
    reports: &mpsc::UnboundedSender<ShardReport>,
) -> anyhow::Result<()> {
    let mut nodes = Vec::with_capacity(args.count);
    // The shard's first node bootstraps from node 0, the others from it: a
    // network has more than one way in, and node 0 alone cannot take a
    // thousand inbound connections (it refuses past
    // `max_inbound_connections`).
    let mut bootstrap = args.bootstrap.clone();
    for i in args.first..args.first + args.count {
        let peer_budget = match args.peer_budget[..] {
            [min, max] => (min, max),
            _ => bail!("--peer-budget takes MIN,MAX"),
        };
        let setup = NodeSetup {
            peer_budget,
            quic: args.quic,
        };
        let config = bench_config(SEED + i as u64, setup)
            .with_bootstrap(bootstrap.iter().cloned().collect());
        let node = testing::spawn_local(config).await?;
        if i == args.first {
            bootstrap = Some(node.addr.clone());
        }
        nodes.push(node);
    }
    let addr = nodes
        .first()
        .context("a shard needs nodes")?
        .addr
        .to_string();
    reports.send(ShardReport::Started { addr })?;

    // Announcement arrivals go out as they happen, stamped with the wall
    // clock (an `Instant` means nothing to another process).
    let (handles, mut arrivals, mut watchers) = testing::watch_announcements(nodes);
    let (base_instant, base_wall) = (Instant::now(), SystemTime::now());
    let first = args.first;
    let _forward = AbortOnDrop({
        let reports = reports.clone();
        tokio::spawn(async move {
            while let Some((i, peer, at)) = arrivals.recv().await {
                let wall = if at >= base_instant {
                    base_wall + at.duration_since(base_instant)
                } else {
                    base_wall - base_instant.duration_since(at)
                };
                let report = ShardReport::Arrival {
                    node: first + i,
                    peer: peer.to_string(),
                    at_us: unix_us(wall),
                };
                if reports.send(report).is_err() {
                    break;
                }
            }
        })
    });

    let result = async {
        testing::wait_until_meshed(&handles, args.meshed_at, PHASE_TIMEOUT).await?;
        reports.send(ShardReport::Meshed)?;
        let counter = {
            let (handles, reports) = (handles.clone(), reports.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    let (mut total, mut fewest, mut most) = (0, usize::MAX, 0);
                    for handle in &handles {
                        let n = handle.peers().await.map_or(0, |p| p.len());
                        total += n;
                        fewest = fewest.min(n);
                        most = most.max(n);
                    }
                    let report = ShardReport::Connections {
                        total,
                        fewest,
                        most,
                    };
                    if reports.send(report).is_err() {
                        break;
                    }
                }
            })
        };
        let _stop_counter = AbortOnDrop(counter);
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = stdin.next_line().await? {
            match line.trim() {
                "announce" => {
                    for handle in &handles {
                        let peer = handle.local_peer_id();
                        handle
                            .announce(testing::worker_announcement(peer, 1, &[BENCH_MODEL]))
                            .await?;
                    }
                }
                other => bail!("unknown shard command {other:?}"),
            }
        }
        anyhow::Ok(())
    }
    .await;
    for handle in &handles {
        handle.shutdown();
    }
    watchers.shutdown().await;
    result
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What [`measure`] found for one mesh.
#[derive(Debug)]
pub struct MeshReport {
    /// Processes the mesh ran in.
    pub processes: usize,
    /// Until every node of every shard listened.
    pub spawn: Duration,
    /// Until every node had `min(n - 1, 4)` connections.
    pub meshed: Duration,
    /// Until the mesh's connection count had been steady for
    /// [`STEADY_FOR`] (or [`SETTLE_LIMIT`] passed).
    pub settled: Duration,
    /// Connections per node once settled.
    pub connections_per_node: f64,
    /// The fewest and the most connections one node held once settled.
    pub connections_range: (usize, usize),
    /// CPU per node once settled, as a share of one core, over
    /// [`CPU_WINDOW`] (`None` where `/proc` cannot tell).
    pub cpu_per_node: Option<f64>,
    /// Open file descriptors per node once settled (`None` where `/proc`
    /// cannot tell).
    pub descriptors_per_node: Option<f64>,
    /// From one new node's announcement until all `n` nodes accepted it.
    pub new_worker_known: anyhow::Result<Duration>,
    /// From every node announcing at once until every node held every
    /// other node's announcement.
    pub converged: anyhow::Result<Duration>,
}

/// A running shard process.
struct Shard {
    child: Child,
    stdin: ChildStdin,
}

/// Reports from all shards, tagged with the shard index.
type Reports = mpsc::UnboundedReceiver<(usize, ShardReport)>;

/// Starts a mesh of `n` nodes over processes of at most `per_process`
/// nodes, lets it run until its connection count is steady, then measures
/// how fast a new worker's announcement reaches every node, and how fast `n`
/// simultaneous announcements reach every node.
pub async fn measure(n: usize, per_process: usize, setup: NodeSetup) -> anyhow::Result<MeshReport> {
    ensure!(n >= 2, "a mesh needs at least 2 nodes");
    ensure!(per_process >= 1, "--nodes-per-process must be at least 1");
    let exe = std::env::current_exe().context("finding the silk binary")?;
    let meshed_at = (n - 1).min(4);
    let (tx, mut reports) = mpsc::unbounded_channel();
    let mut shards = Vec::new();
    let start = Instant::now();

    // The first shard runs node 0, the others bootstrap from it.
    let mut bootstrap: Option<String> = None;
    for (s, first) in (0..n).step_by(per_process).enumerate() {
        let count = per_process.min(n - first);
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "mesh-shard", "--first", &first.to_string()])
            .args(["--count", &count.to_string()])
            .args(["--meshed-at", &meshed_at.to_string()])
            .args([
                "--peer-budget",
                &format!("{},{}", setup.peer_budget.0, setup.peer_budget.1),
            ]);
        if setup.quic {
            cmd.arg("--quic");
        }
        if let Some(addr) = &bootstrap {
            cmd.args(["--bootstrap", addr]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdin = child.stdin.take().context("shard stdin")?;
        let stdout = child.stdout.take().context("shard stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let report = serde_json::from_str(&line).unwrap_or_else(|e| ShardReport::Failed {
                    error: format!("unreadable report {line:?}: {e}"),
                });
                if tx.send((s, report)).is_err() {
                    break;
                }
            }
        });
        shards.push(Shard { child, stdin });
        if s == 0 {
            match next_report(&mut reports).await? {
                (_, ShardReport::Started { addr }) => bootstrap = Some(addr),
                (_, other) => bail!("the first shard did not start: {other:?}"),
            }
        }
    }
    drop(tx);
    let bootstrap: Multiaddr = bootstrap
        .context("no shard started")?
        .parse()
        .context("the first shard's address")?;
    let result = drive(n, bootstrap, setup, &mut shards, &mut reports, start).await;
    for shard in &mut shards {
        // End of input stops a shard; kill it if it does not stop in time.
        let _ = shard.stdin.shutdown().await;
    }
    for shard in &mut shards {
        if tokio::time::timeout(Duration::from_secs(10), shard.child.wait())
            .await
            .is_err()
        {
            let _ = shard.child.kill().await;
        }
    }
    result
}

async fn next_report(reports: &mut Reports) -> anyhow::Result<(usize, ShardReport)> {
    match tokio::time::timeout(PHASE_TIMEOUT, reports.recv()).await {
        Err(_) => bail!("no word from the shards in {PHASE_TIMEOUT:?}"),
        Ok(None) => bail!("every shard exited"),
        Ok(Some((s, ShardReport::Failed { error }))) => bail!("shard {s} failed: {error}"),
        Ok(Some(report)) => Ok(report),
    }
}

/// Waits until `pending` is empty, feeding it every arrival; returns the
/// latest arrival time taken off it (Unix µs). Other reports are ignored.
async fn arrivals(
    reports: &mut Reports,
    mut pending: HashMap<usize, HashSet<String>>,
    what: &str,
) -> anyhow::Result<u64> {
    let mut last = 0;
    let mut left: usize = pending.values().map(HashSet::len).sum();
    let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
    while left > 0 {
        let report = tokio::time::timeout_at(deadline, next_report(reports))
            .await
            .map_err(|_| {
                anyhow::anyhow!("{left} {what} still missing after {PHASE_TIMEOUT:?}")
            })??;
        if let (_, ShardReport::Arrival { node, peer, at_us }) = report {
            if pending.get_mut(&node).is_some_and(|p| p.remove(&peer)) {
                left -= 1;
                last = last.max(at_us);
            }
        }
    }
    Ok(last)
}

async fn drive(
    n: usize,
    bootstrap: Multiaddr,
    setup: NodeSetup,
    shards: &mut [Shard],
    reports: &mut Reports,
    start: Instant,
) -> anyhow::Result<MeshReport> {
    let mut started = 1; // the first shard, before the others were launched
    let mut meshed = 0;
    let mut spawn = (started == shards.len()).then(|| start.elapsed());
    while meshed < shards.len() {
        match next_report(reports).await? {
            (_, ShardReport::Started { .. }) => started += 1,
            (_, ShardReport::Meshed) => meshed += 1,
            _ => {}
        }
        if started == shards.len() && spawn.is_none() {
            spawn = Some(start.elapsed());
        }
    }
    let spawn = spawn.unwrap_or_else(|| start.elapsed());
    let meshed = start.elapsed();

    // Right after start every node is still walking the DHT and dialling
    // most of the others; a worker joins a mesh that has been running.
    let connections = settle(reports, shards.len()).await?;
    let settled = start.elapsed();
    let pids: Vec<u32> = shards.iter().filter_map(|s| s.child.id()).collect();
    let (cpu_per_node, descriptors_per_node) = if pids.len() == shards.len() {
        let load = settled_load(&pids, reports).await;
        (
            load.cpu_share.map(|c| c / n as f64),
            load.descriptors.map(|d| d as f64 / n as f64),
        )
    } else {
        (None, None)
    };
    let new_worker_known = new_worker(n, bootstrap, setup, reports).await;
    let converged = everyone_announces(n, shards, reports).await;
    Ok(MeshReport {
        processes: shards.len(),
        spawn,
        meshed,
        settled,
        connections_per_node: connections.total as f64 / n as f64,
        connections_range: (connections.fewest, connections.most),
        cpu_per_node,
        descriptors_per_node,
        new_worker_known,
        converged,
    })
}

/// Waits until the total connection count of the mesh has stayed within
/// [`STEADY_BAND`] for [`STEADY_FOR`], at most [`SETTLE_LIMIT`]; returns
/// the count.
async fn settle(reports: &mut Reports, shards: usize) -> anyhow::Result<Connections> {
    let started = Instant::now();
    let mut latest: HashMap<usize, Connections> = HashMap::new();
    let (mut reference, mut steady_since) = (0usize, Instant::now());
    loop {
        if let (
            s,
            ShardReport::Connections {
                total,
                fewest,
                most,
            },
        ) = next_report(reports).await?
        {
            latest.insert(
                s,
                Connections {
                    total,
                    fewest,
                    most,
                },
            );
        }
        if latest.len() < shards {
            continue;
        }
        let total: usize = latest.values().map(|c| c.total).sum();
        if total.abs_diff(reference) as f64 > STEADY_BAND * reference as f64 {
            (reference, steady_since) = (total, Instant::now());
        }
        if steady_since.elapsed() >= STEADY_FOR || started.elapsed() >= SETTLE_LIMIT {
            return Ok(Connections {
                total,
                fewest: latest.values().map(|c| c.fewest).min().unwrap_or(0),
                most: latest.values().map(|c| c.most).max().unwrap_or(0),
            });
        }
    }
}

/// The mesh's connections at one moment.
#[derive(Debug, Clone, Copy)]
struct Connections {
    total: usize,
    fewest: usize,
    most: usize,
}

/// How long the settled mesh's CPU time is measured.
pub const CPU_WINDOW: Duration = Duration::from_secs(10);
/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on
/// every Linux architecture silk builds for).
const USER_HZ: f64 = 100.0;

/// What the shard processes use once the mesh is settled.
struct Load {
    /// CPU time over [`CPU_WINDOW`], in cores.
    cpu_share: Option<f64>,
    /// Open file descriptors, summed.
    descriptors: Option<usize>,
}

/// Measures the shards' CPU over [`CPU_WINDOW`] and their descriptors,
/// reading (and dropping) their reports meanwhile so none blocks.
async fn settled_load(pids: &[u32], reports: &mut Reports) -> Load {
    let cpu = |pids: &[u32]| -> Option<u64> { pids.iter().map(|p| cpu_ticks(*p)).sum() };
    let before = cpu(pids);
    let window = tokio::time::sleep(CPU_WINDOW);
    tokio::pin!(window);
    loop {
        tokio::select! {
            () = &mut window => break,
            r = reports.recv() => if r.is_none() { break },
        }
    }
    let after = cpu(pids);
    let descriptors = pids
        .iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/fd"))
                .ok()
                .map(Iterator::count)
        })
        .sum();
    Load {
        cpu_share: before
            .zip(after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / USER_HZ / CPU_WINDOW.as_secs_f64()),
        descriptors,
    }
}

/// User plus system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields
    // count from after its closing one (utime and stime are the 14th
    // and 15th fields of the line, the 12th and 13th after it).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A new worker joins the quiet mesh and announces itself once: how long
/// until all `n` nodes accepted the announcement.
async fn new_worker(
    n: usize,
    bootstrap: Multiaddr,
    setup: NodeSetup,
    reports: &mut Reports,
) -> anyhow::Result<Duration> {
    let config = bench_config(NEW_WORKER_SEED, setup).with_bootstrap(vec![bootstrap]);
    let new = testing::spawn_local(config).await?;
    let new_peer = new.peer_id;
    let result = async {
        testing::wait_until_meshed(std::slice::from_ref(&new.handle), 1, PHASE_TIMEOUT).await?;
        let announced = unix_us(SystemTime::now());
        new.handle
            .announce(testing::worker_announcement(new_peer, 1, &[BENCH_MODEL]))
            .await?;
        let everyone = (0..n)
            .map(|i| (i, HashSet::from([new_peer.to_string()])))
            .collect();
        let last = arrivals(reports, everyone, "nodes without the new worker").await?;
        Ok(Duration::from_micros(last.saturating_sub(announced)))
    }
    .await;
    new.handle.shutdown();
    result
}

/// Every mesh node announces itself at once: how long until every node
/// held every other node's announcement.
async fn everyone_announces(
    n: usize,
    shards: &mut [Shard],
    reports: &mut Reports,
) -> anyhow::Result<Duration> {
    let peers: Vec<String> = (0..n).map(|i| mesh_peer(i).to_string()).collect();
    let announced = unix_us(SystemTime::now());
    for shard in shards.iter_mut() {
        shard.stdin.write_all(b"announce\n").await?;
        shard.stdin.flush().await?;
    }
    let pending = (0..n)
        .map(|i| {
            let others = peers
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, p)| p.clone())
                .collect();
            (i, others)
        })
        .collect();
    let last = arrivals(reports, pending, "announcements").await?;
    Ok(Duration::from_micros(last.saturating_sub(announced)))
}

//! `silk wallet ...` (the node's TON wallet and settlement contract) and
//! `silk devnet ...` (a local chain for testnets).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use sha2::Digest;
use silk_chain::devnet::{Clock, Devnet, DevnetConfig};
use silk_chain::ledger::{self, Ledger};
use silk_chain::message::OutMessage;
use silk_chain::{Address, Coins, Keys, TonHttp, TonHttpConfig, Wallet, WalletVersion};
use tokio_util::sync::CancellationToken;

use crate::config::{json_rpc, LedgerSection, NodeConfig};
use crate::payments::{load_or_create_keys, Payments, PaymentsConfig};

/// Where the ledger is; flags override `<data-dir>/config.toml`.
#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// `devnet` or `ton`.
    #[arg(long, global = true)]
    pub ledger: Option<String>,
    /// Devnet URL (`http://127.0.0.1:PORT`) or TON JSON-RPC endpoint.
    #[arg(long, global = true)]
    pub ledger_url: Option<String>,
}

/// `silk wallet ...`
#[derive(Debug, Args)]
pub struct WalletArgs {
    /// Ledger selection.
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: WalletCommand,
}

/// Wallet subcommands.
#[derive(Debug, Subcommand)]
pub enum WalletCommand {
    /// Print the wallet and settlement contract addresses (creates the wallet on first use).
    Address,
    /// Wallet and contract balances, and what this node is owed as a worker.
    Balance,
    /// Deposit AMOUNT TON into the settlement contract (deploys it on first use).
    Deposit {
        /// TON, e.g. `1.5`.
        amount: Coins,
    },
    /// Lanes: the gateway's book against the chain, and cheques held as a worker.
    Lanes,
    /// Open (or top up) a lane to WORKER with AMOUNT TON.
    OpenLane {
        /// The worker's wallet address.
        worker: Address,
        /// TON, e.g. `1.5`.
        amount: Coins,
    },
    /// Redeem every cheque held as a worker that is not redeemed yet.
    Redeem,
    /// Withdraw the contract's free balance (or AMOUNT TON) to the wallet.
    Withdraw {
        /// TON; all free balance when left out.
        amount: Option<Coins>,
    },
}

/// `silk devnet ...`
#[derive(Debug, Args)]
pub struct DevnetArgs {
    /// Address to serve the TON HTTP API on.
    #[arg(long, default_value = "127.0.0.1:8099")]
    pub listen: SocketAddr,
    /// redb state file; in memory when left out.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Milliseconds between blocks.
    #[arg(long, default_value_t = 200)]
    pub block_ms: u64,
    /// Optional subcommand; without one, runs the devnet.
    #[command(subcommand)]
    pub command: Option<DevnetCommand>,
}

/// Devnet subcommands.
#[derive(Debug, Subcommand)]
pub enum DevnetCommand {
    /// Send AMOUNT TON from the devnet faucet to ADDRESS.
    Mint {
        /// Recipient.
        address: Address,
        /// TON.
        amount: Coins,
        /// The devnet, e.g. `http://127.0.0.1:8099`.
        #[arg(long, default_value = "http://127.0.0.1:8099")]
        url: String,
    },
}

/// The devnet faucet's keys: public by design (a devnet has no real money).
pub fn faucet_keys() -> Keys {
    let seed: [u8; 32] = sha2::Sha256::digest(b"silk devnet faucet").into();
    Keys::from_seed(seed)
}

/// What the faucet is minted at devnet start.
const FAUCET_SUPPLY_TON: u64 = 1_000_000_000;

impl LedgerArgs {
    /// The ledger of `config` with these flags applied (the devnet on
    /// this machine when neither says otherwise).
    pub fn section(&self, config: &NodeConfig) -> LedgerSection {
        config
            .ledger
            .clone()
            .unwrap_or_default()
            .overridden(self.ledger.as_deref(), self.ledger_url.as_deref())
    }

    /// Whether a flag names a ledger.
    pub fn given(&self) -> bool {
        self.ledger.is_some() || self.ledger_url.is_some()
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?)
}

/// Runs `silk wallet ...`.
pub fn run(args: WalletArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load_or_default(data_dir)?;
    let ledger = args.ledger.section(&config).connect()?;
    let (keys, created) = load_or_create_keys(data_dir)?;
    if created {
        eprintln!(
            "created a new wallet; its mnemonic is in {}",
            data_dir.join(crate::payments::MNEMONIC_FILE).display()
        );
    }
    let runtime = runtime()?;
    let p = runtime.block_on(Payments::open(data_dir, config.payments(), ledger, keys))?;
    runtime.block_on(wallet(args.command, &p))?;
    Ok(ExitCode::SUCCESS)
}

async fn wallet(cmd: WalletCommand, p: &Payments) -> anyhow::Result<()> {
    match cmd {
        WalletCommand::Address => {
            let w = p.wallet_address();
            println!("wallet    {}  ({})", w.to_friendly(false, true), w.to_raw());
            let c = p.client_contract();
            println!("contract  {}  ({})", c.to_friendly(true, true), c.to_raw());
        }
        WalletCommand::Balance => {
            let b = p.balances().await?;
            println!("wallet     {} TON", b.wallet);
            println!("contract   {} TON", b.contract);
            println!("in lanes   {} TON", b.committed);
            println!("free       {} nanoTON", b.free_nano);
            println!(
                "owed to me {} TON (cheques not redeemed)",
                p.worker_book().owed()?
            );
        }
        WalletCommand::Deposit { amount } => {
            p.deposit(amount).await?;
            println!("deposited {amount} TON into {}", p.client_contract());
        }
        WalletCommand::Lanes => {
            let lanes = p.sync_lanes().await?;
            println!("| lane | worker | deposited | signed | reserved | available |");
            println!("| --- | --- | --- | --- | --- | --- |");
            for l in lanes {
                println!(
                    "| {} | {} | {} | {} | {} | {} |",
                    l.lane_id,
                    l.worker,
                    l.deposited,
                    l.signed,
                    l.reserved,
                    l.available()
                );
            }
            let held = p.worker_book().lanes()?;
            if !held.is_empty() {
                println!("\n| client contract | lane | cheques | redeemed | uncovered work |");
                println!("| --- | --- | --- | --- | --- |");
                for l in held {
                    println!(
                        "| {} | {} | {} | {} | {} |",
                        l.contract,
                        l.lane_id,
                        l.cheque_total(),
                        l.redeemed,
                        l.outstanding()
                    );
                }
            }
        }
        WalletCommand::OpenLane { worker, amount } => {
            let l = p.open_lane(&worker, amount).await?;
            println!(
                "lane {} to {} holds {} TON ({} signed)",
                l.lane_id, l.worker, l.deposited, l.signed
            );
        }
        WalletCommand::Redeem => {
            let done = p.redeem_with_threshold(Coins(1)).await?;
            if done.is_empty() {
                println!("nothing to redeem");
            }
            for r in done {
                println!(
                    "lane {} of {}: paid {} TON (redeemed total {} TON)",
                    r.lane_id,
                    r.contract,
                    r.after.saturating_sub(r.before),
                    r.after
                );
            }
        }
        WalletCommand::Withdraw { amount } => {
            p.withdraw(amount).await?;
            println!("withdrawn to {}", p.wallet_address());
        }
    }
    Ok(())
}

/// Runs `silk devnet ...`.
pub fn run_devnet(args: DevnetArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    match args.command {
        Some(DevnetCommand::Mint {
            address,
            amount,
            url,
        }) => {
            rt.block_on(mint(&url, &address, amount))?;
            println!("sent {amount} TON to {address}");
        }
        None => rt.block_on(serve(args))?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn mint(url: &str, address: &Address, amount: Coins) -> anyhow::Result<()> {
    let ledger = TonHttp::new(TonHttpConfig::new(json_rpc(url)))?;
    let faucet = Wallet::new(WalletVersion::V4R2, &faucet_keys())?;
    let msg = OutMessage {
        dest: address.clone(),
        value: amount,
        bounce: false,
        body: None,
        state_init: None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    ledger::send_transfer(
        &ledger,
        &faucet,
        &[msg],
        u32::try_from(now)?,
        Duration::from_secs(30),
    )
    .await
    .context("faucet transfer")?;
    Ok(())
}

async fn serve(args: DevnetArgs) -> anyhow::Result<()> {
    let config = DevnetConfig {
        block_interval: Duration::from_millis(args.block_ms),
        clock: Clock::System,
    };
    let devnet = match &args.state {
        Some(path) => Devnet::open(path, config)?,
        None => Devnet::in_memory(config)?,
    };
    let faucet = Wallet::new(WalletVersion::V4R2, &faucet_keys())?.address();
    let supply = Coins::from_ton(FAUCET_SUPPLY_TON)?;
    if devnet.account(&faucet).await?.balance < supply {
        devnet.mint(&faucet, supply)?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    println!(
        "devnet on http://{} (faucet {}); mint with `silk devnet mint ADDRESS AMOUNT --url http://{}`",
        args.listen,
        faucet.to_raw(),
        args.listen
    );
    let server = tokio::spawn(silk_chain::devnet_http::serve(
        devnet,
        listener,
        cancel.clone(),
    ));
    tokio::signal::ctrl_c().await?;
    cancel.cancel();
    producer.await?;
    server.await??;
    Ok(())
}

/// Arguments of `silk bench settlement`.
#[derive(Debug, Args)]
pub struct SettlementBenchArgs {
    /// Simulated jobs for the on-chain message count.
    #[arg(long, default_value_t = 10_000)]
    pub jobs: u64,
    /// Cheque sign+verify iterations.
    #[arg(long, default_value_t = 10_000)]
    pub iterations: usize,
    /// Redemptions executed on the devnet for the per-message timing.
    #[arg(long, default_value_t = 50)]
    pub messages: u32,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `silk bench settlement`.
pub fn bench_settlement(args: SettlementBenchArgs) -> anyhow::Result<ExitCode> {
    use silk_chain::Cheque;

    // 1. Cheque sign + verify.
    let keys = Keys::from_seed([42; 32]);
    let contract = Address::new(0, [1; 32]);
    let worker = Address::new(0, [2; 32]);
    let pk = keys.public_key();
    let mut times = Vec::with_capacity(args.iterations);
    for i in 0..args.iterations {
        let t = std::time::Instant::now();
        let signed = Cheque {
            contract: contract.clone(),
            worker: worker.clone(),
            lane_id: 1,
            cumulative: Coins(i as u128 + 1),
        }
        .sign(&keys)?;
        signed.verify(&pk)?;
        times.push(t.elapsed());
    }
    times.sort();
    let mean = times.iter().sum::<Duration>() / u32::try_from(times.len().max(1))?;

    // 2. On-chain messages per `jobs` jobs under the redemption threshold
    //    policy, through the real books (redb, every change committed).
    let dir = tempfile_dir()?;
    let config = PaymentsConfig::default();
    let price = config.price;
    let store = crate::payments::Store::open(&dir.join("bench.redb"))?;
    let client_keys = Keys::from_seed([7; 32]);
    let client = crate::payments::ClientBook::new(store.clone(), contract.clone());
    let workers: Vec<Address> = (0..4u8).map(|i| Address::new(0, [10 + i; 32])).collect();
    let books: Vec<_> = workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            crate::payments::Store::open(&dir.join(format!("w{i}.redb")))
                .map(|s| crate::payments::WorkerBook::new(s, w.clone()))
        })
        .collect::<Result<_, _>>()?;
    let lane_amount = Coins::from_ton(1_000)?;
    let mut messages = 1u64; // the deposit that deploys the contract
    for (i, w) in workers.iter().enumerate() {
        client.record_lane(w, i as u32 + 1, lane_amount, Coins::ZERO)?;
    }
    messages += 1; // all four lanes open in one OpenLanes message
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut charged = 0u128;
    let mut redemptions = 0u64;
    let t_jobs = std::time::Instant::now();
    for _ in 0..args.jobs {
        let wi = next(4) as usize;
        let prompt = 1 + next(1_000);
        let max = 1 + next(500);
        let completion = next(max + 1);
        let r = client.reserve(&workers[wi], price.worst_case(1_000, prompt, max)?)?;
        let cost = price.cost(1_000, prompt, completion)?;
        let cheque = client.settle(&client_keys, &r, cost)?;
        books[wi].accept(&contract, &client_keys.public_key(), &cheque, cost)?;
        charged += cost.nano();
        for due in books[wi].due_for_redemption(config.redeem_threshold)? {
            redemptions += 1;
            books[wi].mark_redeemed(&due.contract, due.lane_id, due.cheque_total())?;
        }
    }
    let per_job = t_jobs.elapsed() / u32::try_from(args.jobs.max(1))?;
    // Whatever is left is redeemed once at the end.
    for b in &books {
        redemptions += b.due_for_redemption(Coins(1))?.len() as u64;
    }
    messages += redemptions;
    std::fs::remove_dir_all(&dir).ok();

    // 3. Devnet execution time per contract message (real contract in the TVM).
    let devnet_us = runtime()?.block_on(devnet_message_time(args.messages))?;

    println!("## silk bench settlement\n");
    println!("- machine: {}", super::bench::machine());
    println!(
        "- price: {} nanoTON/token base, prompt ×{}‰, completion ×{}‰, coefficient 1000‰; redemption threshold {} TON",
        price.base_nano_per_token, price.prompt_mult_milli, price.completion_mult_milli, config.redeem_threshold
    );
    println!("\n| metric | value | goal |");
    println!("| --- | --- | --- |");
    println!(
        "| on-chain messages for {} jobs (1 deploy+deposit, 1 open-lanes, {} redemptions; {} TON charged) | {} ({:.2} per 100 jobs) | < 1 per 100 jobs |",
        args.jobs,
        redemptions,
        Coins(charged),
        messages,
        messages as f64 * 100.0 / args.jobs.max(1) as f64
    );
    println!(
        "| cheque sign + verify, {} iterations | mean {:.1} µs, p50 {:.1} µs, p99 {:.1} µs | < 100 µs |",
        times.len(),
        mean.as_secs_f64() * 1e6,
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "| gateway reserve + settle + worker accept (redb, committed) per job | {:.1} µs | — |",
        per_job.as_secs_f64() * 1e6
    );
    println!(
        "| devnet execution per transaction, redeem chain (wallet → contract → worker), {} redemptions | mean {:.0} µs, p50 {:.0} µs, p99 {:.0} µs | — |",
        args.messages, devnet_us.0, devnet_us.1, devnet_us.2
    );
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("silk-bench-settlement-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Deploys a contract with one lane on an in-memory devnet, then times
/// `n` redemptions block by block: returns mean, p50 and p99 microseconds
/// per executed transaction.
async fn devnet_message_time(n: u32) -> anyhow::Result<(f64, f64, f64)> {
    use silk_chain::message::{to_boc, wallet_transfer};
    use silk_chain::settlement;
    use silk_chain::Cheque;

    let devnet = Devnet::in_memory(DevnetConfig::new(Duration::from_millis(5)))?;
    let ledger: Arc<dyn Ledger> = Arc::new(devnet.clone());
    let dir = tempfile_dir()?.join("devnet");
    let client_keys = Keys::from_seed([3; 32]);
    let client = Payments::open(
        &dir.join("c"),
        PaymentsConfig::default(),
        ledger.clone(),
        client_keys.clone(),
    )
    .await?;
    let worker_keys = Keys::from_seed([4; 32]);
    let worker = Wallet::new(WalletVersion::V4R2, &worker_keys)?;
    devnet.mint(&client.wallet_address(), Coins::from_ton(100)?)?;
    devnet.mint(&worker.address(), Coins::from_ton(100)?)?;
    let cancel = CancellationToken::new();
    let producer = devnet.spawn_block_producer(cancel.clone());
    let lane = client
        .open_lane(&worker.address(), Coins::from_ton(10)?)
        .await;
    cancel.cancel();
    producer.await?;
    let lane = lane?;
    let mut per_tx = Vec::with_capacity(n as usize);
    let now = devnet.now()?;
    for i in 0..n {
        let cheque = Cheque {
            contract: client.client_contract().clone(),
            worker: worker.address(),
            lane_id: lane.lane_id,
            cumulative: Coins(u128::from(i + 1) * 1_000_000),
        }
        .sign(&client_keys)?;
        let msg = OutMessage {
            dest: client.client_contract().clone(),
            value: Coins(50_000_000),
            bounce: true,
            body: Some(settlement::redeem_body(u64::from(i), &cheque)?),
            state_init: None,
        };
        let seqno = ledger::wallet_seqno(&*ledger, &worker.address()).await?;
        let cell = wallet_transfer(&worker, seqno, now.saturating_add(3_600), &[msg])?;
        ledger.send_message(&to_boc(&cell)?).await?;
        let mut txs = 0usize;
        let t = std::time::Instant::now();
        for _ in 0..10 {
            txs += devnet.produce_block()?;
            if txs >= 3 {
                break;
            }
        }
        let elapsed = t.elapsed();
        if txs > 0 {
            per_tx.push(elapsed / u32::try_from(txs)?);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    let redeemed = ledger::settlement_lane(&*ledger, client.client_contract(), lane.lane_id)
        .await?
        .map(|l| l.redeemed)
        .unwrap_or_default();
    anyhow::ensure!(
        redeemed == Coins(u128::from(n) * 1_000_000),
        "the timed redemptions did not all pay out (redeemed {redeemed})"
    );
    per_tx.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = per_tx.iter().sum::<Duration>() / u32::try_from(per_tx.len().max(1))?;
    Ok((
        us(mean),
        us(percentile(&per_tx, 0.5)),
        us(percentile(&per_tx, 0.99)),
    ))
}

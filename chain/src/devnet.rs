//! A local TON chain for tests and testnets: executes real wallet and
//! settlement code with tycho-executor (a TVM in Rust), keeps accounts and
//! transactions in redb, and makes a block at a fixed interval.
//!
//! # How it works
//!
//! [`Devnet::send_message`] queues an external message. A block
//! ([`Devnet::produce_block`], called by the task from
//! [`Devnet::spawn_block_producer`] or directly in tests) advances the clock,
//! then executes queued messages one by one (each a transaction of its
//! destination account) until the queue is empty or the block is full; the
//! internal messages a transaction sends join the queue and usually execute
//! in the same block. Money enters only through [`Devnet::mint`] (a faucet,
//! for funding wallets) and leaves only as fees, so
//! `minted = Σ balances + Σ fees + value in flight` holds at all times
//! ([`Devnet::audit`]).
//!
//! The blockchain config (gas and storage prices, size limits) is the one
//! tycho-executor ships for its tests (`devnet/config.boc`), with signature
//! domains off so TON wallets verify as on TON.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use num_bigint::BigInt;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tycho_executor::{Executor, ExecutorParams, ParsedConfig, TxError};
use tycho_types::boc::{Boc, BocRepr};
use tycho_types::cell::{Cell as TCell, CellBuilder as TBuilder, HashBytes, Lazy};
use tycho_types::models::{
    Account, AccountState, BlockchainConfig, ComputePhase, CurrencyCollection, IntAddr, Message,
    MsgInfo, OptionalAccount, ShardAccount, StdAddr, StorageInfo, StorageUsed, Transaction,
    TxInfo as TTxInfo,
};
use tycho_types::num::Tokens;
use tycho_vm::{OwnedCellSlice, RcStackValue, SafeRc, Stack, VmCaller, VmGetterArgs};

use crate::address::Address;
use crate::coins::Coins;
use crate::error::{Error, Result};
use crate::ledger::{
    AccountInfo, AccountStatus, GetMethodOutput, Ledger, OutMsgInfo, StackValue, TxInfo,
};
use crate::message::{from_boc, to_boc};

const CONFIG_BOC: &[u8] = include_bytes!("../devnet/config.boc");

/// Account states by account id.
const ACCOUNTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("accounts");
/// Transactions by (account id, lt).
const TXS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("transactions");
/// Transaction location by inbound message hash.
const BY_MSG: TableDefinition<&[u8], (&[u8], u64)> = TableDefinition::new("tx_by_message");
/// External messages the destination refused, by hash.
const REJECTED: TableDefinition<&[u8], ()> = TableDefinition::new("rejected");
/// Messages waiting for a block, in order.
const QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("queue");
/// Chain counters.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Most messages one block executes; the rest wait for the next block.
const MAX_MSGS_PER_BLOCK: usize = 10_000;

/// How the devnet's clock moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// Blocks take the system time (never going backwards).
    System,
    /// Time moves only by [`Devnet::advance_time`]; for tests.
    Manual {
        /// Unix time of the first block.
        start: u32,
    },
}

/// The devnet's global id (configuration parameter 19). Neither the TON
/// mainnet's (-239) nor its testnet's (-3), so a contract made on a devnet
/// never has the address of one made on a real network (audit F18).
pub const DEVNET_GLOBAL_ID: i32 = 0x5e1c;

/// Devnet settings.
#[derive(Clone, Debug)]
pub struct DevnetConfig {
    /// How often [`Devnet::spawn_block_producer`] makes a block.
    pub block_interval: Duration,
    /// Where time comes from.
    pub clock: Clock,
}

impl DevnetConfig {
    /// A devnet making a block every `block_interval` on the system clock.
    pub fn new(block_interval: Duration) -> Self {
        DevnetConfig {
            block_interval,
            clock: Clock::System,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    now: u32,
    lt: u64,
    seqno: u64,
    minted: u128,
    fees: u128,
    queue_head: u64,
    queue_tail: u64,
}

impl Counters {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + 8 * 4 + 32);
        v.extend_from_slice(&self.now.to_be_bytes());
        v.extend_from_slice(&self.lt.to_be_bytes());
        v.extend_from_slice(&self.seqno.to_be_bytes());
        v.extend_from_slice(&self.minted.to_be_bytes());
        v.extend_from_slice(&self.fees.to_be_bytes());
        v.extend_from_slice(&self.queue_head.to_be_bytes());
        v.extend_from_slice(&self.queue_tail.to_be_bytes());
        v
    }

    fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != 68 {
            return Err(Error::Store(format!(
                "counters record has {} bytes",
                b.len()
            )));
        }
        let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u128_at = |i: usize| u128::from_be_bytes(b[i..i + 16].try_into().unwrap_or_default());
        Ok(Counters {
            now: u32_at(0),
            lt: u64_at(4),
            seqno: u64_at(12),
            minted: u128_at(20),
            fees: u128_at(36),
            queue_head: u64_at(52),
            queue_tail: u64_at(60),
        })
    }
}

/// Totals for checking that no money appears or disappears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Audit {
    /// Everything [`Devnet::mint`] created.
    pub minted: u128,
    /// Sum of all account balances.
    pub balances: u128,
    /// Sum of all fees transactions paid.
    pub fees: u128,
    /// Value carried by queued internal messages, with the forward fees
    /// prepaid into them.
    pub in_flight: u128,
}

impl Audit {
    /// Whether `minted == balances + fees + in_flight`.
    pub fn balanced(&self) -> bool {
        self.balances
            .checked_add(self.fees)
            .and_then(|v| v.checked_add(self.in_flight))
            == Some(self.minted)
    }
}

struct Inner {
    db: Database,
    config: ParsedConfig,
    clock: Clock,
}

/// A local chain; cheap to clone (handles share one state).
#[derive(Clone)]
pub struct Devnet {
    inner: Arc<Mutex<Inner>>,
    blocks: watch::Sender<u64>,
    block_interval: Duration,
}

fn store_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

fn tycho_err(e: impl std::fmt::Display) -> Error {
    Error::Ledger(format!("devnet: {e}"))
}

fn to_tycho(cell: &tonlib_core::cell::Cell) -> Result<TCell> {
    Boc::decode(to_boc(cell)?).map_err(tycho_err)
}

fn from_tycho(cell: &TCell) -> Result<tonlib_core::cell::ArcCell> {
    from_boc(&Boc::encode(cell))
}

fn std_addr(a: &Address) -> StdAddr {
    StdAddr::new(a.workchain() as i8, HashBytes(a.hash()))
}

fn addr_from_int(a: &IntAddr) -> Option<Address> {
    match a {
        IntAddr::Std(s) => Some(Address::new(s.workchain as i32, s.address.0)),
        IntAddr::Var(_) => None,
    }
}

fn empty_shard_account() -> Result<ShardAccount> {
    Ok(ShardAccount {
        account: Lazy::new(&OptionalAccount::EMPTY).map_err(tycho_err)?,
        last_trans_hash: HashBytes::ZERO,
        last_trans_lt: 0,
    })
}

fn system_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

fn parsed_config() -> Result<ParsedConfig> {
    let mut config: BlockchainConfig = BocRepr::decode(CONFIG_BOC).map_err(tycho_err)?;
    config
        .params
        .set_global_id(DEVNET_GLOBAL_ID)
        .map_err(tycho_err)?;
    config
        .params
        .set_size_limits(&ParsedConfig::DEFAULT_SIZE_LIMITS_CONFIG)
        .map_err(tycho_err)?;
    let mut global = config.params.get_global_version().map_err(tycho_err)?;
    global.capabilities = global
        .capabilities
        .iter()
        .filter(|c| *c != tycho_types::models::GlobalCapability::CapSignatureWithId)
        .collect();
    config
        .params
        .set_global_version(&global)
        .map_err(tycho_err)?;
    ParsedConfig::parse(config, u32::MAX).map_err(tycho_err)
}

impl Devnet {
    /// Opens (or creates) a devnet stored at `path`.
    pub fn open(path: &Path, config: DevnetConfig) -> Result<Self> {
        let db = Database::create(path).map_err(store_err)?;
        Self::with_db(db, config)
    }

    /// A devnet kept in memory, for tests.
    pub fn in_memory(config: DevnetConfig) -> Result<Self> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(store_err)?;
        Self::with_db(db, config)
    }

    fn with_db(db: Database, config: DevnetConfig) -> Result<Self> {
        let start = match config.clock {
            Clock::System => system_now(),
            Clock::Manual { start } => start,
        };
        let tx = db.begin_write().map_err(store_err)?;
        {
            let mut meta = tx.open_table(META).map_err(store_err)?;
            if meta.get("counters").map_err(store_err)?.is_none() {
                let c = Counters {
                    now: start,
                    lt: 1_000_000,
                    ..Default::default()
                };
                meta.insert("counters", c.encode().as_slice())
                    .map_err(store_err)?;
            }
            tx.open_table(ACCOUNTS).map_err(store_err)?;
            tx.open_table(TXS).map_err(store_err)?;
            tx.open_table(BY_MSG).map_err(store_err)?;
            tx.open_table(REJECTED).map_err(store_err)?;
            tx.open_table(QUEUE).map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        let inner = Inner {
            db,
            config: parsed_config()?,
            clock: config.clock,
        };
        let (blocks, _) = watch::channel(0);
        Ok(Devnet {
            inner: Arc::new(Mutex::new(inner)),
            blocks,
            block_interval: config.block_interval,
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| Error::Store("devnet state lock poisoned by a panic".into()))
    }

    /// Current block time.
    pub fn now(&self) -> Result<u32> {
        Ok(self.lock()?.counters()?.now)
    }

    /// Moves a [`Clock::Manual`] clock forward (the next block uses it).
    pub fn advance_time(&self, seconds: u32) -> Result<()> {
        let inner = self.lock()?;
        let tx = inner.db.begin_write().map_err(store_err)?;
        {
            let mut meta = tx.open_table(META).map_err(store_err)?;
            let mut c = read_counters(&meta)?;
            c.now = c.now.saturating_add(seconds);
            meta.insert("counters", c.encode().as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    /// Credits `amount` to `address` out of nothing (the devnet's faucet).
    pub fn mint(&self, address: &Address, amount: Coins) -> Result<()> {
        let inner = self.lock()?;
        let tx = inner.db.begin_write().map_err(store_err)?;
        {
            let mut meta = tx.open_table(META).map_err(store_err)?;
            let mut accounts = tx.open_table(ACCOUNTS).map_err(store_err)?;
            let mut c = read_counters(&meta)?;
            let key = address.hash();
            let shard = match accounts.get(key.as_slice()).map_err(store_err)? {
                Some(v) => BocRepr::decode::<ShardAccount, _>(v.value()).map_err(tycho_err)?,
                None => empty_shard_account()?,
            };
            let amount_tokens = Tokens::new(amount.nano());
            let account = match shard.load_account().map_err(tycho_err)? {
                Some(mut acc) => {
                    acc.balance.tokens = acc
                        .balance
                        .tokens
                        .checked_add(amount_tokens)
                        .ok_or(Error::Overflow("Devnet::mint"))?;
                    acc
                }
                None => Account {
                    address: IntAddr::Std(std_addr(address)),
                    storage_stat: StorageInfo {
                        used: StorageUsed::ZERO,
                        storage_extra: Default::default(),
                        last_paid: c.now,
                        due_payment: None,
                    },
                    last_trans_lt: 0,
                    balance: CurrencyCollection::new(amount.nano()),
                    state: AccountState::Uninit,
                },
            };
            let new = ShardAccount {
                account: Lazy::new(&OptionalAccount(Some(account))).map_err(tycho_err)?,
                last_trans_hash: shard.last_trans_hash,
                last_trans_lt: shard.last_trans_lt,
            };
            let bytes = BocRepr::encode(&new).map_err(tycho_err)?;
            accounts
                .insert(key.as_slice(), bytes.as_slice())
                .map_err(store_err)?;
            c.minted = c
                .minted
                .checked_add(amount.nano())
                .ok_or(Error::Overflow("Devnet::mint"))?;
            meta.insert("counters", c.encode().as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    /// Makes one block: advances the clock, executes queued messages.
    /// Returns how many transactions it executed.
    pub fn produce_block(&self) -> Result<usize> {
        let executed = self.lock()?.produce_block()?;
        self.blocks.send_modify(|n| *n += 1);
        Ok(executed)
    }

    /// Makes blocks until no message is queued (at most `max_blocks`).
    pub fn run_until_idle(&self, max_blocks: usize) -> Result<()> {
        for _ in 0..max_blocks {
            self.produce_block()?;
            if self.lock()?.queue_len()? == 0 {
                return Ok(());
            }
        }
        Err(Error::Ledger(format!(
            "devnet still busy after {max_blocks} blocks"
        )))
    }

    /// Starts a task making a block every `block_interval` until `cancel`.
    pub fn spawn_block_producer(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let devnet = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(devnet.block_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {
                        let d = devnet.clone();
                        match tokio::task::spawn_blocking(move || d.produce_block()).await {
                            Ok(Ok(n)) if n > 0 => tracing::debug!(transactions = n, "devnet block"),
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => tracing::error!(error = %e, "devnet block failed"),
                            Err(e) => tracing::error!(error = %e, "devnet block task failed"),
                        }
                    }
                }
            }
        })
    }

    /// Money totals: see [`Audit::balanced`].
    pub fn audit(&self) -> Result<Audit> {
        self.lock()?.audit()
    }

    /// The account's latest transactions as BOCs, newest first (what TON's
    /// HTTP API returns in `data`).
    pub fn transaction_bocs(&self, address: &Address, limit: usize) -> Result<Vec<Vec<u8>>> {
        let inner = self.lock()?;
        let tx = inner.db.begin_read().map_err(store_err)?;
        let txs = tx.open_table(TXS).map_err(store_err)?;
        let key = address.hash();
        let mut out = Vec::new();
        for entry in txs
            .range((key.as_slice(), 0u64)..=(key.as_slice(), u64::MAX))
            .map_err(store_err)?
            .rev()
        {
            if out.len() >= limit {
                break;
            }
            let (_, v) = entry.map_err(store_err)?;
            out.push(v.value().to_vec());
        }
        Ok(out)
    }

    fn send_message_sync(&self, boc: &[u8]) -> Result<[u8; 32]> {
        let cell: TCell = Boc::decode(boc).map_err(|e| Error::Ledger(format!("not a BOC: {e}")))?;
        let msg: Message<'_> = cell
            .parse()
            .map_err(|e| Error::Ledger(format!("not a message: {e}")))?;
        if !matches!(msg.info, MsgInfo::ExtIn(_)) {
            return Err(Error::Ledger(
                "only external inbound messages can be sent to the devnet".into(),
            ));
        }
        let hash = cell.repr_hash().0;
        self.lock()?.enqueue(&[boc.to_vec()])?;
        Ok(hash)
    }
}

fn read_counters(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Counters> {
    let v = meta
        .get("counters")
        .map_err(store_err)?
        .ok_or_else(|| Error::Store("counters missing".into()))?;
    Counters::decode(v.value())
}

impl Inner {
    fn counters(&self) -> Result<Counters> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let meta = tx.open_table(META).map_err(store_err)?;
        read_counters(&meta)
    }

    fn queue_len(&self) -> Result<u64> {
        let c = self.counters()?;
        Ok(c.queue_tail - c.queue_head)
    }

    fn enqueue(&self, msgs: &[Vec<u8>]) -> Result<()> {
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut meta = tx.open_table(META).map_err(store_err)?;
            let mut queue = tx.open_table(QUEUE).map_err(store_err)?;
            let mut c = read_counters(&meta)?;
            for m in msgs {
                queue
                    .insert(c.queue_tail, m.as_slice())
                    .map_err(store_err)?;
                c.queue_tail += 1;
            }
            meta.insert("counters", c.encode().as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }

    fn shard_account(&self, id: &[u8; 32]) -> Result<Option<ShardAccount>> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let accounts = tx.open_table(ACCOUNTS).map_err(store_err)?;
        match accounts.get(id.as_slice()).map_err(store_err)? {
            Some(v) => Ok(Some(BocRepr::decode(v.value()).map_err(tycho_err)?)),
            None => Ok(None),
        }
    }

    fn produce_block(&mut self) -> Result<usize> {
        let tx = self.db.begin_write().map_err(store_err)?;
        let executed;
        {
            let mut meta = tx.open_table(META).map_err(store_err)?;
            let mut queue = tx.open_table(QUEUE).map_err(store_err)?;
            let mut accounts = tx.open_table(ACCOUNTS).map_err(store_err)?;
            let mut txs = tx.open_table(TXS).map_err(store_err)?;
            let mut by_msg = tx.open_table(BY_MSG).map_err(store_err)?;
            let mut rejected = tx.open_table(REJECTED).map_err(store_err)?;
            let mut c = read_counters(&meta)?;
            if self.clock == Clock::System {
                c.now = c.now.max(system_now());
            }
            c.seqno += 1;
            c.lt = c.lt.saturating_add(1_000_000) / 1_000_000 * 1_000_000;
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&c.seqno.to_be_bytes());
            let params = ExecutorParams {
                block_unixtime: c.now,
                block_lt: c.lt,
                rand_seed: HashBytes(seed),
                strict_extra_currency: true,
                ..Default::default()
            };
            let mut count = 0;
            while c.queue_head < c.queue_tail && count < MAX_MSGS_PER_BLOCK {
                let bytes = queue
                    .remove(c.queue_head)
                    .map_err(store_err)?
                    .map(|v| v.value().to_vec())
                    .ok_or_else(|| Error::Store("queued message missing".into()))?;
                c.queue_head += 1;
                let cell: TCell = Boc::decode(&bytes).map_err(tycho_err)?;
                let msg: Message<'_> = cell.parse().map_err(tycho_err)?;
                let (dest, is_external) = match &msg.info {
                    MsgInfo::Int(i) => {
                        // The part of the forward fee the sender prepaid
                        // into the message is collected where it arrives.
                        c.fees = c
                            .fees
                            .checked_add(i.fwd_fee.into_inner())
                            .ok_or(Error::Overflow("devnet fees"))?;
                        (i.dst.clone(), false)
                    }
                    MsgInfo::ExtIn(i) => (i.dst.clone(), true),
                    MsgInfo::ExtOut(_) => continue,
                };
                let IntAddr::Std(dest) = dest else {
                    tracing::warn!("devnet drops a message to a var address");
                    continue;
                };
                let key = dest.address.0;
                let shard = match accounts.get(key.as_slice()).map_err(store_err)? {
                    Some(v) => BocRepr::decode::<ShardAccount, _>(v.value()).map_err(tycho_err)?,
                    None => empty_shard_account()?,
                };
                let executor = Executor::new(&params, &self.config).with_min_lt(c.lt);
                let out = match executor.begin_ordinary(&dest, is_external, cell.clone(), &shard) {
                    Ok(uncommitted) => uncommitted.commit().map_err(tycho_err)?,
                    Err(TxError::Skipped) => {
                        tracing::debug!(msg = %cell.repr_hash(), "devnet: external message not accepted");
                        rejected
                            .insert(cell.repr_hash().0.as_slice(), ())
                            .map_err(store_err)?;
                        continue;
                    }
                    Err(TxError::Fatal(e)) => {
                        return Err(Error::Ledger(format!("devnet executor failed: {e}")));
                    }
                };
                count += 1;
                let tx_cell = out.transaction.inner().clone();
                let tx_lt = out.transaction.load().map_err(tycho_err)?.lt;
                txs.insert((key.as_slice(), tx_lt), Boc::encode(&tx_cell).as_slice())
                    .map_err(store_err)?;
                by_msg
                    .insert(cell.repr_hash().0.as_slice(), (key.as_slice(), tx_lt))
                    .map_err(store_err)?;
                accounts
                    .insert(
                        key.as_slice(),
                        BocRepr::encode(&out.new_state)
                            .map_err(tycho_err)?
                            .as_slice(),
                    )
                    .map_err(store_err)?;
                c.fees = c
                    .fees
                    .checked_add(out.transaction_meta.total_fees.into_inner())
                    .and_then(|f| f.checked_add(out.burned.into_inner()))
                    .ok_or(Error::Overflow("devnet fees"))?;
                for m in &out.transaction_meta.out_msgs {
                    let parsed: Message<'_> = m.inner().parse().map_err(tycho_err)?;
                    if matches!(parsed.info, MsgInfo::Int(_)) {
                        queue
                            .insert(c.queue_tail, Boc::encode(m.inner()).as_slice())
                            .map_err(store_err)?;
                        c.queue_tail += 1;
                    }
                }
                c.lt = c.lt.max(out.transaction_meta.next_lt);
            }
            executed = count;
            meta.insert("counters", c.encode().as_slice())
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        Ok(executed)
    }

    fn audit(&self) -> Result<Audit> {
        let c = self.counters()?;
        let tx = self.db.begin_read().map_err(store_err)?;
        let accounts = tx.open_table(ACCOUNTS).map_err(store_err)?;
        let mut balances: u128 = 0;
        for entry in accounts.iter().map_err(store_err)? {
            let (_, v) = entry.map_err(store_err)?;
            let shard: ShardAccount = BocRepr::decode(v.value()).map_err(tycho_err)?;
            if let Some(acc) = shard.load_account().map_err(tycho_err)? {
                balances += acc.balance.tokens.into_inner();
            }
        }
        let queue = tx.open_table(QUEUE).map_err(store_err)?;
        let mut in_flight: u128 = 0;
        for entry in queue.iter().map_err(store_err)? {
            let (_, v) = entry.map_err(store_err)?;
            let cell: TCell = Boc::decode(v.value()).map_err(tycho_err)?;
            let msg: Message<'_> = cell.parse().map_err(tycho_err)?;
            if let MsgInfo::Int(i) = msg.info {
                in_flight += i.value.tokens.into_inner() + i.fwd_fee.into_inner();
            }
        }
        Ok(Audit {
            minted: c.minted,
            balances,
            fees: c.fees,
            in_flight,
        })
    }
}

/// Reads a transaction BOC (as the devnet stores it and TON's HTTP API
/// returns it in `data`) into a [`TxInfo`].
pub(crate) fn tx_info_from_boc(bytes: &[u8]) -> Result<TxInfo> {
    let cell: TCell = Boc::decode(bytes).map_err(tycho_err)?;
    let t: Transaction = cell.parse().map_err(tycho_err)?;
    let (in_msg_hash, in_from, in_value) = match &t.in_msg {
        Some(m) => {
            let msg: Message<'_> = m.parse().map_err(tycho_err)?;
            match msg.info {
                MsgInfo::Int(i) => (
                    Some(m.repr_hash().0),
                    addr_from_int(&i.src),
                    Coins(i.value.tokens.into_inner()),
                ),
                _ => (Some(m.repr_hash().0), None, Coins::ZERO),
            }
        }
        None => (None, None, Coins::ZERO),
    };
    let mut out_msgs = Vec::new();
    for m in t.out_msgs.values() {
        let m = m.map_err(tycho_err)?;
        let msg: Message<'_> = m.parse().map_err(tycho_err)?;
        match msg.info {
            MsgInfo::Int(i) => out_msgs.push(OutMsgInfo {
                dest: addr_from_int(&i.dst),
                value: Coins(i.value.tokens.into_inner()),
            }),
            _ => out_msgs.push(OutMsgInfo {
                dest: None,
                value: Coins::ZERO,
            }),
        }
    }
    let (exit_code, aborted) = match t.load_info().map_err(tycho_err)? {
        TTxInfo::Ordinary(o) => (
            match o.compute_phase {
                ComputePhase::Executed(e) => Some(e.exit_code),
                ComputePhase::Skipped(_) => None,
            },
            o.aborted,
        ),
        TTxInfo::TickTock(t) => (None, t.aborted),
    };
    Ok(TxInfo {
        lt: t.lt,
        hash: cell.repr_hash().0,
        now: t.now,
        in_msg_hash,
        in_from,
        in_value,
        out_msgs,
        exit_code,
        aborted,
        total_fees: Coins(t.total_fees.tokens.into_inner()),
    })
}

fn to_vm_value(v: &StackValue) -> Result<RcStackValue> {
    Ok(match v {
        StackValue::Null => Stack::make_null(),
        StackValue::Int(i) => SafeRc::new_dyn_value(i.clone()),
        StackValue::Cell(c) => SafeRc::new_dyn_value(to_tycho(c)?),
        StackValue::Slice(c) => {
            SafeRc::new_dyn_value(OwnedCellSlice::new_allow_exotic(to_tycho(c)?))
        }
        StackValue::Tuple(items) => {
            let items = items.iter().map(to_vm_value).collect::<Result<Vec<_>>>()?;
            SafeRc::new_dyn_value(items)
        }
    })
}

fn from_vm_value(v: &RcStackValue) -> Result<StackValue> {
    if v.is_null() {
        return Ok(StackValue::Null);
    }
    if let Some(i) = v.as_int() {
        return Ok(StackValue::Int(BigInt::clone(i)));
    }
    if let Some(c) = v.as_cell() {
        return Ok(StackValue::Cell(from_tycho(c)?));
    }
    if let Some(s) = v.as_cell_slice() {
        let mut b = TBuilder::new();
        b.store_slice(s.apply()).map_err(tycho_err)?;
        return Ok(StackValue::Slice(from_tycho(
            &b.build().map_err(tycho_err)?,
        )?));
    }
    if let Some(t) = v.as_tuple() {
        return Ok(StackValue::Tuple(
            t.iter().map(from_vm_value).collect::<Result<_>>()?,
        ));
    }
    Err(Error::Ledger(format!(
        "devnet: unsupported stack value {v:?}"
    )))
}

#[async_trait::async_trait]
impl Ledger for Devnet {
    async fn send_message(&self, boc: &[u8]) -> Result<[u8; 32]> {
        self.send_message_sync(boc)
    }

    async fn global_id(&self) -> Result<i32> {
        Ok(DEVNET_GLOBAL_ID)
    }

    async fn run_get_method(
        &self,
        address: &Address,
        method: &str,
        stack: &[StackValue],
    ) -> Result<GetMethodOutput> {
        let inner = self.lock()?;
        let now = inner.counters()?.now;
        let account = inner
            .shard_account(&address.hash())?
            .and_then(|s| s.load_account().ok().flatten())
            .ok_or_else(|| Error::Ledger(format!("devnet: account {address} does not exist")))?;
        let caller = VmCaller {
            libraries: Default::default(),
            behaviour_modifiers: Default::default(),
            config: inner.config.raw.params.clone(),
        };
        let args_stack = stack.iter().map(to_vm_value).collect::<Result<Vec<_>>>()?;
        let mut args = VmGetterArgs::default();
        args.now = now;
        let out = caller
            .call_getter_ext(&account, method, args_stack, &args, None)
            .map_err(|e| Error::Ledger(format!("devnet get-method {method}: {e}")))?;
        Ok(GetMethodOutput {
            exit_code: out.exit_code,
            stack: out.stack.iter().map(from_vm_value).collect::<Result<_>>()?,
        })
    }

    async fn account(&self, address: &Address) -> Result<AccountInfo> {
        let inner = self.lock()?;
        let Some(shard) = inner.shard_account(&address.hash())? else {
            return Ok(AccountInfo {
                balance: Coins::ZERO,
                status: AccountStatus::NonExist,
                last_lt: 0,
                last_hash: [0; 32],
            });
        };
        let account = shard.load_account().map_err(tycho_err)?;
        let (balance, status) = match &account {
            None => (Coins::ZERO, AccountStatus::NonExist),
            Some(a) => (
                Coins(a.balance.tokens.into_inner()),
                match a.state {
                    AccountState::Uninit => AccountStatus::Uninit,
                    AccountState::Active(_) => AccountStatus::Active,
                    AccountState::Frozen(_) => AccountStatus::Frozen,
                },
            ),
        };
        Ok(AccountInfo {
            balance,
            status,
            last_lt: shard.last_trans_lt,
            last_hash: shard.last_trans_hash.0,
        })
    }

    async fn transactions(&self, address: &Address, limit: usize) -> Result<Vec<TxInfo>> {
        let inner = self.lock()?;
        let tx = inner.db.begin_read().map_err(store_err)?;
        let txs = tx.open_table(TXS).map_err(store_err)?;
        let key = address.hash();
        let mut out = Vec::new();
        for entry in txs
            .range((key.as_slice(), 0u64)..=(key.as_slice(), u64::MAX))
            .map_err(store_err)?
            .rev()
        {
            if out.len() >= limit {
                break;
            }
            let (_, v) = entry.map_err(store_err)?;
            out.push(tx_info_from_boc(v.value())?);
        }
        Ok(out)
    }

    async fn wait_for_message(
        &self,
        address: &Address,
        msg_hash: [u8; 32],
        timeout: Duration,
    ) -> Result<TxInfo> {
        let mut blocks = self.blocks.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let inner = self.lock()?;
                let tx = inner.db.begin_read().map_err(store_err)?;
                let by_msg = tx.open_table(BY_MSG).map_err(store_err)?;
                if let Some(v) = by_msg.get(msg_hash.as_slice()).map_err(store_err)? {
                    let (acc, lt) = v.value();
                    if acc != address.hash().as_slice() {
                        return Err(Error::Ledger(format!(
                            "message {} went to another account",
                            hex::encode(msg_hash)
                        )));
                    }
                    let txs = tx.open_table(TXS).map_err(store_err)?;
                    let bytes = txs
                        .get((acc, lt))
                        .map_err(store_err)?
                        .ok_or_else(|| Error::Store("indexed transaction missing".into()))?;
                    return tx_info_from_boc(bytes.value());
                }
                let rejected = tx.open_table(REJECTED).map_err(store_err)?;
                if rejected
                    .get(msg_hash.as_slice())
                    .map_err(store_err)?
                    .is_some()
                {
                    return Err(Error::Ledger(format!(
                        "{address} refused external message {} (bad signature, seqno or expiry?)",
                        hex::encode(msg_hash)
                    )));
                }
            }
            match tokio::time::timeout_at(deadline, blocks.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("message {} at {address}", hex::encode(msg_hash)),
                        after: timeout,
                    })
                }
            }
        }
    }
}

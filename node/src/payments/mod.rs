//! The money side of a job: lanes, reservations and cheques on the gateway,
//! cheque checks, credit and redemption on the worker, and the on-chain
//! operations of the settlement contract (deploy, deposit, open lanes,
//! redeem, withdraw). Knows prices and cheques; knows nothing of routing.
//!
//! # Facade for the job path
//!
//! ```text
//! let p = Payments::open(&data_dir, PaymentsConfig::default(), ledger, keys).await?;
//!
//! // Gateway, before dispatching a job to `worker` (its wallet address and
//! // its announced coefficient, per mille):
//! let r: Reservation = p.before_dispatch(&worker, coefficient_milli,
//!                                        max_coefficient_milli /* Option<u32> */,
//!                                        prompt_tokens, max_tokens)?;
//! // ... job runs; on failure: p.release(&r)?;
//! let (cheque, cost): (SignedCheque, Coins) = p.after_job(&r, coefficient_milli,
//!                                     prompt_tokens, cached_tokens, completion_tokens)?;
//! // put `cost.nano()` in the completion JSON as `silk.cost_nanoton`,
//! // send `cheque` (serde JSON) and `p.client_contract()` / `p.public_key()`
//! // to the worker.
//!
//! // Worker, when the cheque arrives (before acknowledging it):
//! let ack: Acceptance = p.on_cheque(&client_contract, &client_public_key, &cheque,
//!                                   prompt_tokens, completion_tokens)?;
//! // and before serving a client: p.should_serve(&client_contract)?
//! // from time to time (or `silk wallet redeem`): p.redeem_due().await?
//!
//! // Client, once per worker (deploys the contract on first use):
//! p.open_lane(&worker, amount).await?;
//! ```
//!
//! Every change of money state is committed to redb (`payments.redb` in the
//! data directory) before the call returns. All amounts are integer nanoTON
//! ([`Coins`]); prices are [`Price`] with per-mille multipliers.

mod client_book;
mod error;
mod lane_watch;
mod store;
mod worker_book;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use silk_chain::ledger::{self, AccountStatus, Ledger, TxInfo};
use silk_chain::message::OutMessage;
use silk_chain::settlement::{self, LaneTopUp, SettlementParams};
use silk_chain::{Address, Coins, Keys, Price, SignedCheque, Wallet, WalletVersion};

pub use client_book::{ClientBook, ClientLane, Reservation, UndeliveredCheque};
pub use error::{PaymentsError, Result};
pub use store::Store;
pub use worker_book::{
    Acceptance, CostOf, JobTokens, WorkerBook, WorkerJob, WorkerLane, MAX_OPEN_JOBS_PER_CLIENT,
};

/// File name of the payments database inside the data directory.
pub const STORE_FILE: &str = "payments.redb";
/// File name of the wallet mnemonic inside the data directory.
pub const MNEMONIC_FILE: &str = "wallet.mnemonic";

/// The highest coefficient a job may pay: the caller's `requested`, but
/// never above the operator's `cap` (a caller cannot raise what the
/// operator's wallet pays, audit F4).
pub fn capped_coefficient(requested: Option<u32>, cap: u32) -> u32 {
    requested.map_or(cap, |r| r.min(cap))
}

/// Prices, credit and redemption policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PaymentsConfig {
    /// Base price and multipliers.
    pub price: Price,
    /// Coefficient this node announces as a worker, per mille.
    pub coefficient_milli: u32,
    /// Highest worker coefficient this gateway pays, per mille. A request's
    /// `max_coefficient` can lower it, never raise it.
    pub default_max_coefficient_milli: u32,
    /// Uncovered work a worker tolerates from one client before refusing it.
    #[serde(with = "nano_u64")]
    pub credit: Coins,
    /// A worker redeems a lane once its unredeemed cheques reach this.
    #[serde(with = "nano_u64")]
    pub redeem_threshold: Coins,
    /// Close delay of this client's settlement contract.
    pub close_delay_s: u32,
    /// Nonce of this client's settlement contract (the network's global id
    /// is added above it, see [`settlement::network_nonce`]).
    pub contract_nonce: u32,
    /// Value attached to each contract message to pay its gas; the rest comes back.
    #[serde(with = "nano_u64")]
    pub gas: Coins,
    /// How long to wait for a message to be processed.
    pub timeout_s: u64,
    /// A gateway opens (or tops up) a lane with this much when a job needs
    /// one; zero means lanes are only opened by hand (`silk wallet open-lane`).
    #[serde(with = "nano_u64")]
    pub lane_amount: Coins,
    /// How often a worker looks for lanes due for redemption.
    pub redeem_every_s: u64,
    /// Shortest close delay a worker accepts in a client's contract: the
    /// time it has to redeem once the client starts closing a lane. The
    /// worker polls lanes below the redemption threshold for a close every
    /// quarter of it (audit F6).
    pub min_close_delay_s: u32,
    /// How long a worker trusts its last on-chain read of a lane before
    /// admission reads it again (audit F6).
    pub lane_check_ttl_s: u64,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig {
            price: Price {
                base_nano_per_token: 1_000,
                prompt_mult_milli: 1_000,
                completion_mult_milli: 3_000,
                cached_mult_milli: silk_chain::DEFAULT_CACHED_MULT_MILLI,
            },
            coefficient_milli: 1_000,
            default_max_coefficient_milli: 2_000,
            credit: Coins(10_000_000),
            redeem_threshold: Coins(1_000_000_000),
            close_delay_s: 86_400,
            contract_nonce: 1,
            gas: Coins(50_000_000),
            timeout_s: 60,
            lane_amount: Coins(1_000_000_000),
            redeem_every_s: 60,
            min_close_delay_s: 3_600,
            lane_check_ttl_s: 30,
        }
    }
}

/// Config amounts are written as plain nanoTON integers; TOML has no
/// 128-bit integers, so they are read and written as `u64`.
mod nano_u64 {
    use serde::{Deserialize, Deserializer, Serializer};
    use silk_chain::Coins;

    pub(super) fn serialize<S: Serializer>(c: &Coins, s: S) -> Result<S::Ok, S::Error> {
        let n = u64::try_from(c.nano())
            .map_err(|_| serde::ser::Error::custom("amount above u64 nanoTON"))?;
        s.serialize_u64(n)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Coins, D::Error> {
        Ok(Coins(u128::from(u64::deserialize(d)?)))
    }
}

/// Loads the wallet keys from `data_dir/wallet.mnemonic`, creating a new
/// 24-word mnemonic (file mode 0600) on first use. Returns the keys and
/// whether they were just created.
pub fn load_or_create_keys(data_dir: &Path) -> Result<(Keys, bool)> {
    let path = data_dir.join(MNEMONIC_FILE);
    match std::fs::read_to_string(&path) {
        Ok(words) => Ok((Keys::from_mnemonic(words.trim())?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(|e| {
                PaymentsError::Config(format!("cannot create {}: {e}", data_dir.display()))
            })?;
            let (words, keys) = Keys::generate_mnemonic()?;
            write_secret(&path, &words)?;
            Ok((keys, true))
        }
        Err(e) => Err(PaymentsError::Config(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

fn write_secret(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| PaymentsError::Config(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| PaymentsError::Config(format!("cannot write {}: {e}", path.display())))
}

/// Balances as the chain reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balances {
    /// The wallet's balance.
    pub wallet: Coins,
    /// The settlement contract's balance (0 if not deployed).
    pub contract: Coins,
    /// What the contract's lanes still hold.
    pub committed: Coins,
    /// The contract's free balance (may be negative after storage fees).
    pub free_nano: i128,
}

/// One redemption [`Payments::redeem_due`] made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redemption {
    /// The client's contract.
    pub contract: Address,
    /// The lane.
    pub lane_id: u32,
    /// What the lane had paid out before.
    pub before: Coins,
    /// What it has paid out now.
    pub after: Coins,
}

/// The node's payments: its wallet, its settlement contract as a client,
/// and both books. See the module docs.
#[derive(Clone)]
pub struct Payments {
    config: PaymentsConfig,
    ledger: Arc<dyn Ledger>,
    keys: Arc<Keys>,
    wallet: Wallet,
    params: SettlementParams,
    contract: Address,
    client: ClientBook,
    worker: WorkerBook,
    /// Held while a lane is opened or topped up, so concurrent jobs to one
    /// worker send one on-chain message, not one each.
    lane_lock: Arc<tokio::sync::Mutex<()>>,
    /// Worker: what it last read about its clients' lanes.
    watch: Arc<lane_watch::LaneWatch>,
    /// The network's global id.
    network: i32,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payments")
            .field("wallet", &self.wallet.address())
            .field("contract", &self.contract)
            .finish()
    }
}

impl Payments {
    /// Opens the payments store in `data_dir` for the wallet of `keys`
    /// (wallet v4r2) on the network `ledger` serves; the settlement
    /// contract is derived from the wallet, the key, the config's close
    /// delay and nonce, and the network's global id (audit F18).
    ///
    /// The store remembers its network: opening it on a ledger of another
    /// network is refused (its lanes and cheques belong to the first), and
    /// a ledger that cannot be reached at start falls back to it.
    pub async fn open(
        data_dir: &Path,
        config: PaymentsConfig,
        ledger: Arc<dyn Ledger>,
        keys: Keys,
    ) -> Result<Self> {
        let store = Store::open(&data_dir.join(STORE_FILE))?;
        let network = store.network(&*ledger).await?;
        let wallet = Wallet::new(WalletVersion::V4R2, &keys)?;
        let params = SettlementParams {
            owner: wallet.address(),
            public_key: keys.public_key(),
            close_delay_s: config.close_delay_s,
            nonce: settlement::network_nonce(network, config.contract_nonce),
        };
        let contract = params.address()?;
        Ok(Payments {
            client: ClientBook::new(store.clone(), contract.clone()),
            worker: WorkerBook::new(store, wallet.address()),
            lane_lock: Arc::default(),
            watch: Arc::default(),
            network,
            config,
            ledger,
            keys: Arc::new(keys),
            wallet,
            params,
            contract,
        })
    }

    /// The global id of the network this node settles on.
    pub fn network(&self) -> i32 {
        self.network
    }

    /// The config.
    pub fn config(&self) -> &PaymentsConfig {
        &self.config
    }

    /// This node's wallet address (where workers are paid).
    pub fn wallet_address(&self) -> Address {
        self.wallet.address()
    }

    /// This node's settlement contract (cheques it signs are drawn on it).
    pub fn client_contract(&self) -> &Address {
        &self.contract
    }

    /// The key cheques are checked against.
    pub fn public_key(&self) -> [u8; 32] {
        self.keys.public_key()
    }

    /// The gateway's book.
    pub fn client_book(&self) -> &ClientBook {
        &self.client
    }

    /// The worker's book.
    pub fn worker_book(&self) -> &WorkerBook {
        &self.worker
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_s)
    }

    /// Gateway: reserves the worst case of a job (`prompt_tokens` plus
    /// `max_tokens` at the worker's coefficient) on the lane to `worker`.
    /// Refused when the coefficient is above the config's
    /// `default_max_coefficient_milli`, or above `max_coefficient_milli`
    /// (the request's `max_coefficient`) when that is lower.
    pub fn before_dispatch(
        &self,
        worker: &Address,
        coefficient_milli: u32,
        max_coefficient_milli: Option<u32>,
        prompt_tokens: u64,
        max_tokens: u64,
    ) -> Result<Reservation> {
        let max = capped_coefficient(
            max_coefficient_milli,
            self.config.default_max_coefficient_milli,
        );
        if !silk_chain::pricing::coefficient_acceptable(coefficient_milli, max) {
            return Err(PaymentsError::CoefficientTooHigh {
                worker_milli: coefficient_milli,
                max_milli: max,
            });
        }
        let worst = self
            .config
            .price
            .worst_case(coefficient_milli, prompt_tokens, max_tokens)?;
        self.client.reserve(worker, worst)
    }

    /// Gateway: like [`Payments::before_dispatch`], but when the lane to
    /// `worker` is missing or too low it first opens or tops it up on chain
    /// with `lane_amount` (or the job's worst case, if larger). With a zero
    /// `lane_amount` it only reserves.
    pub async fn reserve_with_lane(
        &self,
        worker: &Address,
        coefficient_milli: u32,
        max_coefficient_milli: Option<u32>,
        prompt_tokens: u64,
        max_tokens: u64,
    ) -> Result<Reservation> {
        let reserve = || {
            self.before_dispatch(
                worker,
                coefficient_milli,
                max_coefficient_milli,
                prompt_tokens,
                max_tokens,
            )
        };
        match reserve() {
            Err(PaymentsError::NoLane { .. } | PaymentsError::InsufficientLane { .. })
                if self.config.lane_amount > Coins::ZERO => {}
            other => return other,
        }
        let _guard = self.lane_lock.lock().await;
        // Another job may have topped the lane up while this one waited.
        match reserve() {
            Err(PaymentsError::NoLane { .. } | PaymentsError::InsufficientLane { .. }) => {}
            other => return other,
        }
        let worst = self
            .config
            .price
            .worst_case(coefficient_milli, prompt_tokens, max_tokens)?;
        let amount = self.config.lane_amount.max(worst);
        tracing::info!(%worker, amount = amount.nano(), "opening or topping up a lane");
        self.open_lane(worker, amount).await?;
        reserve()
    }

    /// Gateway: releases reservations a crash left open (their jobs died
    /// with the process). Returns how many.
    pub fn release_stale_reservations(&self) -> Result<usize> {
        let open = self.client.open_reservations()?;
        for r in &open {
            self.client.release(r)?;
        }
        Ok(open.len())
    }

    /// Worker: decides whether to serve a job paid on lane `lane_id` of
    /// `contract` with cheques signed by `public_key`. A lane it has not
    /// booked, has not read from the chain for `lane_check_ttl_s`, or that
    /// looks used up is read from the chain first (see
    /// [`Payments::check_lane_on_chain`]). Then the work must stay within
    /// what the lane holds, and the client's uncovered work within the
    /// configured credit.
    pub async fn admit_client(
        &self,
        contract: &Address,
        public_key: &[u8; 32],
        lane_id: u32,
    ) -> Result<()> {
        let booked = self.worker.lane(contract, lane_id)?;
        let ttl = Duration::from_secs(self.config.lane_check_ttl_s);
        let lane = match booked {
            Some(l) if l.computed < l.deposited && self.watch.fresh(contract, lane_id, ttl) => l,
            _ => {
                self.check_lane_on_chain(contract, public_key, lane_id)
                    .await?
            }
        };
        let behind = |reason: String| PaymentsError::ClientBehind {
            contract: contract.clone(),
            lane_id,
            reason,
        };
        if &lane.public_key != public_key {
            return Err(PaymentsError::BadClient {
                contract: contract.clone(),
                lane_id,
                reason: "cheque key differs from the one booked for this lane".into(),
            });
        }
        if lane.computed >= lane.deposited {
            return Err(behind(format!(
                "the lane holds {} nanoTON and {} nanoTON of work was done on it",
                lane.deposited.nano(),
                lane.computed.nano()
            )));
        }
        let outstanding = self.worker.outstanding(contract)?;
        if outstanding > self.config.credit {
            return Err(behind(format!(
                "{} nanoTON of work is not covered by cheques (credit {} nanoTON)",
                outstanding.nano(),
                self.config.credit.nano()
            )));
        }
        Ok(())
    }

    /// Worker: reads lane `lane_id` of `contract` from the chain and books
    /// it. Refused unless:
    /// - the contract is silk's settlement code with honest initial data:
    ///   its address is the one its owner, key, close delay and nonce give
    ///   (audit F2; a forged storage or other code gives another address,
    ///   and every later state came from the genuine code's own rules);
    /// - its key is `public_key` and its close delay is at least
    ///   `min_close_delay_s` (audit F6);
    /// - its balance covers what its lanes hold (audit F2);
    /// - the lane pays this worker and is neither closing nor finished. A
    ///   closing lane with cheques not yet redeemed is redeemed on the next
    ///   pass, whatever the threshold (audit F6).
    ///
    /// Faults that cannot change (forged contract, short delay, a lane of
    /// another worker, a finished lane) are remembered for ten minutes, so
    /// a peer naming such a lane again costs no chain read (audit F13).
    async fn check_lane_on_chain(
        &self,
        contract: &Address,
        public_key: &[u8; 32],
        lane_id: u32,
    ) -> Result<WorkerLane> {
        let bad = |reason: String| PaymentsError::BadClient {
            contract: contract.clone(),
            lane_id,
            reason,
        };
        if let Some(why) = self.watch.refused(contract, lane_id) {
            return Err(bad(why));
        }
        let refuse = |lane: Option<u32>, why: String| {
            self.watch.refuse(contract, lane, &why);
            bad(why)
        };
        let state = ledger::settlement_state(&*self.ledger, contract)
            .await
            .map_err(|e| bad(format!("not a settlement contract on this ledger: {e}")))?;
        let genuine = SettlementParams {
            owner: state.owner.clone(),
            public_key: state.public_key,
            close_delay_s: state.close_delay_s,
            nonce: state.nonce,
        }
        .address()?;
        if &genuine != contract {
            return Err(refuse(
                None,
                format!(
                    "not silk's settlement contract: its owner, key, close delay and nonce give {genuine}, so its code or initial data are not the genuine ones"
                ),
            ));
        }
        let network = settlement::nonce_network(state.nonce);
        if network != self.network {
            return Err(refuse(
                None,
                format!(
                    "the contract was made for network {network}; this worker settles on network {}",
                    self.network
                ),
            ));
        }
        if &state.public_key != public_key {
            return Err(bad(
                "the contract's key is not the one the cheques use".into()
            ));
        }
        if state.close_delay_s < self.config.min_close_delay_s {
            return Err(refuse(
                None,
                format!(
                    "the contract's close delay is {} s; this worker needs at least {} s to redeem before a lane can be reclaimed",
                    state.close_delay_s, self.config.min_close_delay_s
                ),
            ));
        }
        if state.balance < state.committed {
            return Err(bad(format!(
                "the contract holds {} nanoTON but its lanes hold {} nanoTON",
                state.balance.nano(),
                state.committed.nano()
            )));
        }
        let lane = ledger::settlement_lane(&*self.ledger, contract, lane_id)
            .await?
            .ok_or_else(|| bad("no such lane".into()))?;
        if lane.worker != self.wallet.address() {
            return Err(refuse(
                Some(lane_id),
                format!("the lane pays {}, not this worker", lane.worker),
            ));
        }
        if lane.finished {
            return Err(refuse(Some(lane_id), "the lane is closed".into()));
        }
        if lane.closing_at != 0 {
            self.watch.closing(contract, lane_id);
            return Err(bad(format!(
                "the lane is closing (the client may reclaim it at unix time {})",
                lane.closing_at
            )));
        }
        let booked = self
            .worker
            .register(contract, public_key, lane_id, lane.deposited)?;
        self.watch.checked(contract, lane_id);
        Ok(booked)
    }

    /// Worker: a job on `lane_id` of `contract` that cost `prompt_tokens`
    /// and `completion_tokens` at this worker's price got no cheque in time;
    /// the client falls behind by its cost.
    pub fn record_unpaid(
        &self,
        contract: &Address,
        lane_id: u32,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Result<Coins> {
        let cost = self.own_cost(prompt_tokens, 0, completion_tokens)?;
        self.worker.record_work(contract, lane_id, cost)?;
        Ok(cost)
    }

    /// What a job costs at this worker's own price.
    fn own_cost(
        &self,
        prompt_tokens: u64,
        cached_tokens: u64,
        completion_tokens: u64,
    ) -> Result<Coins> {
        Ok(self.config.price.cost_cached(
            self.config.coefficient_milli,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
        )?)
    }

    /// What a booked job costs at this worker's own price.
    fn job_cost(&self, job: &WorkerJob) -> Result<Coins> {
        self.own_cost(job.prompt_tokens, job.cached_tokens, job.completion_tokens)
    }

    /// Gateway: the job behind `reservation` used `prompt_tokens` (of
    /// which the worker read `cached_tokens` from a cache) and
    /// `completion_tokens`; signs the new cumulative cheque. Returns it and
    /// the job's cost (the completion's `silk.cost_nanoton`).
    pub fn after_job(
        &self,
        reservation: &Reservation,
        coefficient_milli: u32,
        prompt_tokens: u64,
        cached_tokens: u64,
        completion_tokens: u64,
    ) -> Result<(SignedCheque, Coins)> {
        let cost = self.config.price.cost_cached(
            coefficient_milli,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
        )?;
        let cheque = self.client.settle(&self.keys, reservation, cost)?;
        Ok((cheque, cost))
    }

    /// Gateway: the job behind `reservation` failed; frees its worst case.
    pub fn release(&self, reservation: &Reservation) -> Result<()> {
        self.client.release(reservation)
    }

    /// Worker: checks and stores a cheque for a job this worker ran at its
    /// own coefficient; acknowledge the job only after this returns `Ok`.
    pub fn on_cheque(
        &self,
        client_contract: &Address,
        client_public_key: &[u8; 32],
        cheque: &SignedCheque,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Result<Acceptance> {
        let expected = self.own_cost(prompt_tokens, 0, completion_tokens)?;
        self.worker
            .accept(client_contract, client_public_key, cheque, expected)
    }

    /// Worker: opens job `job` of `client_contract` on `lane_id` before it
    /// runs; refused while that job id is open.
    pub fn start_job(&self, client_contract: &Address, lane_id: u32, job: u64) -> Result<()> {
        self.worker.start_job(client_contract, lane_id, job)
    }

    /// Worker: job `job` ended at `now_ms` having produced
    /// `completion_tokens` (after a prompt of `prompt_tokens`, of which it
    /// read `cached_tokens` from a cache).
    pub fn end_job(
        &self,
        client_contract: &Address,
        job: u64,
        prompt_tokens: u64,
        cached_tokens: u64,
        completion_tokens: u64,
        now_ms: u64,
    ) -> Result<()> {
        let tokens = JobTokens {
            prompt: prompt_tokens,
            cached: cached_tokens,
            completion: completion_tokens,
        };
        self.worker
            .end_job(client_contract, job, tokens, now_ms, &|j| self.job_cost(j))
    }

    /// Worker: checks and stores the cheque for job `job`, settling the
    /// job in the same transaction; acknowledge only after this returns `Ok`.
    pub fn on_job_cheque(
        &self,
        client_contract: &Address,
        client_public_key: &[u8; 32],
        cheque: &SignedCheque,
        job: u64,
    ) -> Result<Acceptance> {
        self.worker
            .accept_for_job(client_contract, client_public_key, cheque, job, &|j| {
                self.job_cost(j)
            })
    }

    /// Worker: books jobs that ended at or before `ended_before_ms` without
    /// a cheque as unpaid work; returns them with their cost.
    pub fn book_overdue(&self, ended_before_ms: u64) -> Result<Vec<(WorkerJob, Coins)>> {
        self.worker
            .book_overdue(ended_before_ms, &|j| self.job_cost(j))
    }

    /// Worker: whether the client behind `client_contract` is within credit.
    pub fn should_serve(&self, client_contract: &Address) -> Result<bool> {
        self.worker
            .should_serve(client_contract, self.config.credit)
    }

    /// Sends `messages` from this wallet and waits until the wallet has
    /// processed them.
    async fn transfer(&self, messages: &[OutMessage]) -> Result<TxInfo> {
        let now = now_unix();
        Ok(
            ledger::send_transfer(&*self.ledger, &self.wallet, messages, now, self.timeout())
                .await?,
        )
    }

    /// Waits for the transaction in which `at` processed a message from
    /// this wallet later than `after_lt`, and fails if it was refused.
    async fn contract_result(
        &self,
        at: &Address,
        after_lt: u64,
        what: &'static str,
    ) -> Result<TxInfo> {
        let me = self.wallet.address();
        let deadline = tokio::time::Instant::now() + self.timeout();
        loop {
            let txs = self.ledger.transactions(at, 16).await.unwrap_or_default();
            if let Some(tx) = txs
                .into_iter()
                .find(|t| t.lt > after_lt && t.in_from.as_ref() == Some(&me))
            {
                return match tx.exit_code {
                    Some(0) | Some(1) if !tx.aborted => Ok(tx),
                    code => Err(PaymentsError::Refused {
                        contract: at.clone(),
                        what,
                        exit_code: code.unwrap_or(-1),
                    }),
                };
            }
            if tokio::time::Instant::now() > deadline {
                return Err(silk_chain::Error::Timeout {
                    what: what.to_string(),
                    after: self.timeout(),
                }
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn deployed(&self) -> Result<bool> {
        Ok(self.ledger.account(&self.contract).await?.status == AccountStatus::Active)
    }

    /// Client: deposits `amount` into the settlement contract, deploying it
    /// on first use.
    pub async fn deposit(&self, amount: Coins) -> Result<()> {
        let state_init = if self.deployed().await? {
            None
        } else {
            Some(self.params.state_init()?)
        };
        let msg = OutMessage {
            dest: self.contract.clone(),
            value: amount.checked_add(self.config.gas)?,
            bounce: state_init.is_none(),
            body: Some(settlement::deposit_body(query_id())?),
            state_init,
        };
        let tx = self.transfer(&[msg]).await?;
        self.contract_result(&self.contract.clone(), tx.lt, "deposit")
            .await?;
        Ok(())
    }

    /// Reads the contract's lanes and brings the gateway's book up to them.
    pub async fn sync_lanes(&self) -> Result<Vec<ClientLane>> {
        if !self.deployed().await? {
            return self.client.lanes();
        }
        for (id, lane) in ledger::settlement_lanes(&*self.ledger, &self.contract).await? {
            if lane.finished {
                continue;
            }
            let ours = self.client.lane(&lane.worker)?;
            if ours.as_ref().is_none_or(|l| l.lane_id <= id) {
                self.client
                    .record_lane(&lane.worker, id, lane.deposited, lane.redeemed)?;
            }
        }
        self.client.lanes()
    }

    /// Client: opens a lane to `worker` with `amount` (or tops up the
    /// existing one), attaching `amount` to the message so no separate
    /// deposit is needed; deploys the contract on first use. Returns the
    /// lane as booked after the contract confirmed it.
    pub async fn open_lane(&self, worker: &Address, amount: Coins) -> Result<ClientLane> {
        let deployed = self.deployed().await?;
        let chain_lanes = if deployed {
            ledger::settlement_lanes(&*self.ledger, &self.contract).await?
        } else {
            Vec::new()
        };
        let existing = chain_lanes
            .iter()
            .filter(|(_, l)| &l.worker == worker && !l.finished)
            .map(|(id, _)| *id)
            .max();
        let lane_id = match existing {
            Some(id) => id,
            None => chain_lanes
                .iter()
                .map(|(id, _)| *id)
                .chain(self.client.lanes()?.iter().map(|l| l.lane_id))
                .max()
                .map_or(1, |m| m.saturating_add(1)),
        };
        let msg = OutMessage {
            dest: self.contract.clone(),
            value: amount.checked_add(self.config.gas)?,
            bounce: deployed,
            body: Some(settlement::open_lanes_body(
                query_id(),
                &[LaneTopUp {
                    lane_id,
                    worker: worker.clone(),
                    amount,
                }],
            )?),
            state_init: if deployed {
                None
            } else {
                Some(self.params.state_init()?)
            },
        };
        let tx = self.transfer(&[msg]).await?;
        self.contract_result(&self.contract.clone(), tx.lt, "open-lane")
            .await?;
        let lane = ledger::settlement_lane(&*self.ledger, &self.contract, lane_id)
            .await?
            .ok_or_else(|| {
                PaymentsError::Config(format!("lane {lane_id} missing after it was opened"))
            })?;
        self.client
            .record_lane(worker, lane_id, lane.deposited, lane.redeemed)
    }

    /// Client: withdraws `amount` (all free balance when `None`) to the wallet.
    pub async fn withdraw(&self, amount: Option<Coins>) -> Result<()> {
        let msg = OutMessage {
            dest: self.contract.clone(),
            value: self.config.gas,
            bounce: true,
            body: Some(settlement::withdraw_body(query_id(), amount)?),
            state_init: None,
        };
        let tx = self.transfer(&[msg]).await?;
        self.contract_result(&self.contract.clone(), tx.lt, "withdraw")
            .await?;
        Ok(())
    }

    /// Worker: redeems every lane whose unredeemed cheques reach
    /// `threshold`, and every lane with unredeemed cheques that is closing,
    /// whatever they amount to (audit F6): lanes seen closing at admission,
    /// and lanes below the threshold polled for a close every quarter of
    /// `min_close_delay_s`. Idempotent after a crash: a lane the contract
    /// already paid is only marked, not sent again. Each lane stands alone:
    /// one whose redemption fails (a lane the client reclaimed, a contract
    /// that is gone or aborts) is logged and left for the next pass, and
    /// the others are still redeemed (audit F5). Returns the redemptions
    /// that succeeded.
    pub async fn redeem_with_threshold(&self, threshold: Coins) -> Result<Vec<Redemption>> {
        let mut due = self.worker.due_for_redemption(threshold)?;
        let poll_every = Duration::from_secs(u64::from(self.config.min_close_delay_s / 4).max(1));
        for lane in self.worker.due_for_redemption(Coins(1))? {
            if lane.unredeemed() >= threshold {
                continue;
            }
            let (c, id) = (&lane.contract, lane.lane_id);
            let closing = if self.watch.is_closing(c, id) {
                true
            } else if self.watch.poll_due(c, id, poll_every) {
                self.watch.polled(c, id);
                match ledger::settlement_lane(&*self.ledger, c, id).await {
                    Ok(Some(l)) if l.closing_at != 0 && !l.finished => {
                        self.watch.closing(c, id);
                        true
                    }
                    Ok(_) => false,
                    Err(e) => {
                        tracing::warn!(contract = %c, lane = id, error = %e, "cannot read a lane's close state");
                        false
                    }
                }
            } else {
                false
            };
            if closing {
                tracing::info!(contract = %c, lane = id, unredeemed = lane.unredeemed().nano(), "the client is closing this lane; redeeming below the threshold");
                due.push(lane);
            }
        }
        let mut done = Vec::new();
        for lane in due {
            match self.redeem_lane(&lane).await {
                Ok(Some(r)) => done.push(r),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    contract = %lane.contract,
                    lane = lane.lane_id,
                    error = %e,
                    "redemption failed; the other lanes go on"
                ),
            }
        }
        Ok(done)
    }

    /// Redeems one lane's best cheque (see [`Payments::redeem_with_threshold`]).
    async fn redeem_lane(&self, lane: &WorkerLane) -> Result<Option<Redemption>> {
        let Some(cheque) = lane.best.clone() else {
            return Ok(None);
        };
        let before = ledger::settlement_lane(&*self.ledger, &lane.contract, lane.lane_id)
            .await?
            .map(|l| l.redeemed)
            .unwrap_or(Coins::ZERO);
        if before < cheque.cheque.cumulative {
            let msg = OutMessage {
                dest: lane.contract.clone(),
                value: self.config.gas,
                bounce: true,
                body: Some(settlement::redeem_body(query_id(), &cheque)?),
                state_init: None,
            };
            let tx = self.transfer(&[msg]).await?;
            // Crash test: dead with the redemption on its way to the chain
            // and not in the book; the restart must only mark it.
            fail::fail_point!("worker-redemption-sent", |_| std::process::abort());
            self.contract_result(&lane.contract, tx.lt, "redeem")
                .await?;
        }
        let after = ledger::settlement_lane(&*self.ledger, &lane.contract, lane.lane_id)
            .await?
            .map(|l| l.redeemed)
            .unwrap_or(before);
        self.worker
            .mark_redeemed(&lane.contract, lane.lane_id, after)?;
        tracing::info!(contract = %lane.contract, lane = lane.lane_id, before = before.nano(), after = after.nano(), "redeemed");
        Ok(Some(Redemption {
            contract: lane.contract.clone(),
            lane_id: lane.lane_id,
            before,
            after,
        }))
    }

    /// Worker: redeems lanes past the configured threshold.
    pub async fn redeem_due(&self) -> Result<Vec<Redemption>> {
        self.redeem_with_threshold(self.config.redeem_threshold)
            .await
    }

    /// Wallet and contract balances.
    pub async fn balances(&self) -> Result<Balances> {
        let wallet = self.ledger.account(&self.wallet.address()).await?.balance;
        if !self.deployed().await? {
            return Ok(Balances {
                wallet,
                contract: Coins::ZERO,
                committed: Coins::ZERO,
                free_nano: 0,
            });
        }
        let st = ledger::settlement_state(&*self.ledger, &self.contract).await?;
        Ok(Balances {
            wallet,
            contract: st.balance,
            committed: st.committed,
            free_nano: st.free_nano,
        })
    }
}

fn now_unix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

fn query_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

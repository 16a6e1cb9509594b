//! What silk needs from a TON chain, and the settlement-specific reads built
//! on top of it. Two implementations: [`crate::devnet::Devnet`] (a local
//! chain running the real contract code in a TVM) and the HTTP API of a real
//! TON network.

use std::time::Duration;

use num_bigint::{BigInt, BigUint};
use tonlib_core::cell::dict::predefined_readers::key_reader_u32;
use tonlib_core::cell::{ArcCell, CellParser, TonCellError};

use crate::address::Address;
use crate::coins::Coins;
use crate::error::{Error, Result};
use crate::keys::Wallet;
use crate::message::{cell_hash, to_boc, wallet_transfer, OutMessage};
use crate::settlement::{ContractState, LaneState};

/// A value on the TVM stack, as get-methods take and return them.
#[derive(Clone, Debug, PartialEq)]
pub enum StackValue {
    /// `null`.
    Null,
    /// A 257-bit integer.
    Int(BigInt),
    /// A cell.
    Cell(ArcCell),
    /// A slice, as the cell holding exactly its remaining bits and refs.
    Slice(ArcCell),
    /// A tuple.
    Tuple(Vec<StackValue>),
}

impl StackValue {
    fn int(&self, method: &str) -> Result<&BigInt> {
        match self {
            StackValue::Int(i) => Ok(i),
            other => Err(bad(method, format!("expected an integer, got {other:?}"))),
        }
    }

    fn address(&self, method: &str) -> Result<Address> {
        match self {
            StackValue::Slice(c) | StackValue::Cell(c) => {
                let mut p = c.parser();
                Ok(Address(
                    p.load_address().map_err(|e| bad(method, e.to_string()))?,
                ))
            }
            other => Err(bad(
                method,
                format!("expected an address slice, got {other:?}"),
            )),
        }
    }
}

fn bad(method: &str, reason: String) -> Error {
    Error::GetMethod {
        method: method.to_string(),
        reason,
    }
}

fn to_u128(v: &BigInt, method: &str) -> Result<u128> {
    u128::try_from(v).map_err(|_| bad(method, format!("{v} is out of range")))
}

/// The answer of a get-method.
#[derive(Clone, Debug, PartialEq)]
pub struct GetMethodOutput {
    /// TVM exit code; 0 or 1 is success.
    pub exit_code: i32,
    /// The stack, bottom first.
    pub stack: Vec<StackValue>,
}

impl GetMethodOutput {
    /// The stack if the method succeeded.
    pub fn ok(self, method: &str) -> Result<Vec<StackValue>> {
        if self.exit_code == 0 || self.exit_code == 1 {
            Ok(self.stack)
        } else {
            Err(bad(method, format!("exit code {}", self.exit_code)))
        }
    }
}

/// An account's life stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AccountStatus {
    /// Never seen a message.
    NonExist,
    /// Has a balance but no code yet (a wallet before its first transfer).
    Uninit,
    /// Has code and data.
    Active,
    /// Frozen for unpaid storage.
    Frozen,
}

/// Balance and status of an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountInfo {
    /// Balance.
    pub balance: Coins,
    /// Status.
    pub status: AccountStatus,
    /// Logical time of the last transaction (0 if none).
    pub last_lt: u64,
    /// Hash of the last transaction (zero if none).
    pub last_hash: [u8; 32],
}

/// An outgoing message of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutMsgInfo {
    /// Destination (`None` for external outgoing messages).
    pub dest: Option<Address>,
    /// Value carried.
    pub value: Coins,
}

/// What silk needs to know about a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxInfo {
    /// Logical time.
    pub lt: u64,
    /// Transaction hash.
    pub hash: [u8; 32],
    /// Unix time of its block.
    pub now: u32,
    /// Hash of the inbound message cell.
    pub in_msg_hash: Option<[u8; 32]>,
    /// Sender of the inbound message (`None` for external messages).
    pub in_from: Option<Address>,
    /// Value of the inbound message.
    pub in_value: Coins,
    /// Outgoing messages.
    pub out_msgs: Vec<OutMsgInfo>,
    /// Compute-phase exit code (`None` if the compute phase was skipped).
    pub exit_code: Option<i32>,
    /// Whether the transaction was aborted (state rolled back).
    pub aborted: bool,
    /// Fees taken by the chain.
    pub total_fees: Coins,
}

/// A TON chain as silk uses it.
#[async_trait::async_trait]
pub trait Ledger: Send + Sync {
    /// Submits an external message (a signed wallet transfer) as a BOC;
    /// returns the hash of the message cell, to wait for with
    /// [`Ledger::wait_for_message`].
    async fn send_message(&self, boc: &[u8]) -> Result<[u8; 32]>;

    /// Runs a get-method of `address` with `stack` as arguments.
    async fn run_get_method(
        &self,
        address: &Address,
        method: &str,
        stack: &[StackValue],
    ) -> Result<GetMethodOutput>;

    /// Balance and status of an account.
    async fn account(&self, address: &Address) -> Result<AccountInfo>;

    /// The account's latest transactions, newest first, at most `limit`.
    async fn transactions(&self, address: &Address, limit: usize) -> Result<Vec<TxInfo>>;

    /// The network's global id (configuration parameter 19): -239 on the
    /// TON mainnet, -3 on its testnet, [`crate::devnet::DEVNET_GLOBAL_ID`]
    /// on a devnet. Settlement contracts carry it in their nonce, so a
    /// cheque on one network is worthless on another (audit F18).
    async fn global_id(&self) -> Result<i32>;

    /// Waits until `address` has processed the message whose cell hash is
    /// `msg_hash`, and returns that transaction. Polls
    /// [`Ledger::transactions`] by default.
    async fn wait_for_message(
        &self,
        address: &Address,
        msg_hash: [u8; 32],
        timeout: Duration,
    ) -> Result<TxInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for tx in self.transactions(address, 32).await? {
                if tx.in_msg_hash == Some(msg_hash) {
                    return Ok(tx);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("message {} at {address}", hex::encode(msg_hash)),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The wallet's current seqno (0 if it is not deployed yet).
pub async fn wallet_seqno(ledger: &dyn Ledger, wallet: &Address) -> Result<u32> {
    if ledger.account(wallet).await?.status != AccountStatus::Active {
        return Ok(0);
    }
    let stack = ledger
        .run_get_method(wallet, "seqno", &[])
        .await?
        .ok("seqno")?;
    let v = stack
        .first()
        .ok_or_else(|| bad("seqno", "empty stack".into()))?
        .int("seqno")?;
    u32::try_from(v).map_err(|_| bad("seqno", format!("{v} is not a seqno")))
}

/// Signs a transfer of `messages` from `wallet` with its current seqno,
/// sends it and waits until the wallet has processed it. Returns the
/// wallet's transaction; the messages it sent are processed after it.
pub async fn send_transfer(
    ledger: &dyn Ledger,
    wallet: &Wallet,
    messages: &[OutMessage],
    now: u32,
    timeout: Duration,
) -> Result<TxInfo> {
    let seqno = wallet_seqno(ledger, &wallet.address()).await?;
    let cell = wallet_transfer(wallet, seqno, now.saturating_add(600), messages)?;
    let boc = to_boc(&cell)?;
    let hash = ledger.send_message(&boc).await?;
    debug_assert_eq!(hash, cell_hash(&cell));
    ledger
        .wait_for_message(&wallet.address(), hash, timeout)
        .await
}

/// Reads `get_state` of a settlement contract.
pub async fn settlement_state(ledger: &dyn Ledger, contract: &Address) -> Result<ContractState> {
    const M: &str = "get_state";
    let s = ledger.run_get_method(contract, M, &[]).await?.ok(M)?;
    if s.len() != 7 {
        return Err(bad(M, format!("expected 7 values, got {}", s.len())));
    }
    let mut public_key = [0u8; 32];
    let (_, pk) = s[1].int(M)?.to_bytes_be();
    if pk.len() > 32 {
        return Err(bad(M, "public key longer than 32 bytes".into()));
    }
    public_key[32 - pk.len()..].copy_from_slice(&pk);
    Ok(ContractState {
        owner: s[0].address(M)?,
        public_key,
        close_delay_s: u32::try_from(s[2].int(M)?).map_err(|_| bad(M, "close delay".into()))?,
        nonce: u64::try_from(s[3].int(M)?).map_err(|_| bad(M, "nonce".into()))?,
        balance: Coins(to_u128(s[4].int(M)?, M)?),
        committed: Coins(to_u128(s[5].int(M)?, M)?),
        free_nano: i128::try_from(s[6].int(M)?).map_err(|_| bad(M, "free".into()))?,
    })
}

/// Reads `get_lane` of a settlement contract; `None` if there is no such lane.
pub async fn settlement_lane(
    ledger: &dyn Ledger,
    contract: &Address,
    lane_id: u32,
) -> Result<Option<LaneState>> {
    const M: &str = "get_lane";
    let s = ledger
        .run_get_method(contract, M, &[StackValue::Int(BigInt::from(lane_id))])
        .await?
        .ok(M)?;
    if s.len() != 6 {
        return Err(bad(M, format!("expected 6 values, got {}", s.len())));
    }
    let truthy = |v: &StackValue| -> Result<bool> { Ok(*v.int(M)? != BigInt::from(0)) };
    if !truthy(&s[0])? {
        return Ok(None);
    }
    Ok(Some(LaneState {
        worker: s[1].address(M)?,
        deposited: Coins(to_u128(s[2].int(M)?, M)?),
        redeemed: Coins(to_u128(s[3].int(M)?, M)?),
        closing_at: u32::try_from(s[4].int(M)?).map_err(|_| bad(M, "closing_at".into()))?,
        finished: truthy(&s[5])?,
    }))
}

fn read_lane(p: &mut CellParser) -> std::result::Result<LaneState, TonCellError> {
    let worker = Address(p.load_address()?);
    let coins = |v: BigUint| {
        u128::try_from(v)
            .map(Coins)
            .map_err(|_| TonCellError::InternalError("lane amount above u128".into()))
    };
    let deposited = coins(p.load_coins()?)?;
    let redeemed = coins(p.load_coins()?)?;
    let closing_at = p.load_u32(32)?;
    let finished = p.load_bit()?;
    Ok(LaneState {
        worker,
        deposited,
        redeemed,
        closing_at,
        finished,
    })
}

/// Reads every lane of a settlement contract (`get_lanes`), sorted by lane id.
pub async fn settlement_lanes(
    ledger: &dyn Ledger,
    contract: &Address,
) -> Result<Vec<(u32, LaneState)>> {
    const M: &str = "get_lanes";
    let s = ledger.run_get_method(contract, M, &[]).await?.ok(M)?;
    let root = match s.first() {
        Some(StackValue::Null) => return Ok(Vec::new()),
        Some(StackValue::Cell(c)) | Some(StackValue::Slice(c)) => c.clone(),
        other => {
            return Err(bad(
                M,
                format!("expected a dictionary cell or null, got {other:?}"),
            ))
        }
    };
    let map = root
        .parser()
        .load_dict_data(32, key_reader_u32, read_lane)
        .map_err(|e| bad(M, e.to_string()))?;
    let mut lanes: Vec<(u32, LaneState)> = map.into_iter().collect();
    lanes.sort_by_key(|(id, _)| *id);
    Ok(lanes)
}

/// Reads configuration parameter 19 (`_ global_id:int32 = ConfigParam 19`)
/// from its cell.
pub fn global_id_from_param(cell: &ArcCell) -> Result<i32> {
    cell.parser()
        .load_i32(32)
        .map_err(|e| Error::Ledger(format!("config parameter 19 is not a global id: {e}")))
}

/// The cell of configuration parameter 19 for `global_id`.
pub fn global_id_param(global_id: i32) -> Result<ArcCell> {
    Ok(tonlib_core::cell::CellBuilder::new()
        .store_i32(32, global_id)?
        .build()?
        .to_arc())
}

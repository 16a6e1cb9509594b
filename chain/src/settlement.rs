//! The settlement contract as the Rust side sees it: its compiled code, its
//! initial data and address, and the bodies of the messages it accepts.
//! Layouts: `contracts/README.md`.

use std::collections::HashMap;

use num_bigint::BigUint;
use tonlib_core::cell::{ArcCell, CellBuilder, TonCellError};
use tonlib_core::TonAddress;

use crate::address::Address;
use crate::cheque::SignedCheque;
use crate::coins::Coins;
use crate::error::{Error, Result};
use crate::message::{from_boc, StateInit};

/// The compiled contract (a BOC with the code cell), built by
/// `contracts/scripts/compile.mjs` and checked in CI against the source.
pub const SETTLEMENT_CODE_BOC: &[u8] = include_bytes!("../contracts/build/settlement.boc");

/// Hex hash of the code cell, as the compile script recorded it.
pub fn settlement_code_hash_hex() -> &'static str {
    include_str!("../contracts/build/settlement.hash").trim()
}

/// The code cell.
pub fn settlement_code() -> Result<ArcCell> {
    from_boc(SETTLEMENT_CODE_BOC)
}

/// Kept on the contract's balance on top of the lanes, for storage fees.
pub const MIN_RESERVE: Coins = Coins(10_000_000);

/// Message opcodes (first 32 bits of a body).
pub mod op {
    /// Deposit (anyone).
    pub const DEPOSIT: u32 = 0x5e1c_0001;
    /// Open or top up lanes (owner).
    pub const OPEN_LANES: u32 = 0x5e1c_0002;
    /// Redeem a cheque (the lane's worker).
    pub const REDEEM: u32 = 0x5e1c_0003;
    /// Start closing a lane (owner).
    pub const CLOSE_LANE: u32 = 0x5e1c_0004;
    /// Take back a closed lane's rest after the delay (owner).
    pub const RECLAIM_LANE: u32 = 0x5e1c_0005;
    /// Withdraw free balance (owner).
    pub const WITHDRAW: u32 = 0x5e1c_0006;
    /// Payout notification sent to a worker.
    pub const PAID: u32 = 0x5e1c_0103;
    /// Withdrawal notification sent to the owner.
    pub const WITHDRAWN: u32 = 0x5e1c_0106;
}

/// Compute-phase exit codes the contract throws.
pub mod exit_code {
    /// Sender is not the owner.
    pub const NOT_OWNER: i32 = 100;
    /// No such lane.
    pub const NO_LANE: i32 = 101;
    /// The lane belongs to another worker.
    pub const WRONG_WORKER: i32 = 102;
    /// The lane was reclaimed.
    pub const LANE_FINISHED: i32 = 103;
    /// The cheque's signature does not verify.
    pub const BAD_SIGNATURE: i32 = 104;
    /// The cheque is not above the last redemption (or the lane is exhausted).
    pub const NOTHING_TO_REDEEM: i32 = 105;
    /// Not enough free balance.
    pub const INSUFFICIENT_FREE: i32 = 106;
    /// The lane is not closing.
    pub const NOT_CLOSING: i32 = 107;
    /// The close delay has not elapsed.
    pub const DELAY_NOT_ELAPSED: i32 = 108;
    /// A zero amount.
    pub const ZERO_AMOUNT: i32 = 109;
    /// Malformed body.
    pub const MALFORMED: i32 = 9;
    /// Unknown opcode.
    pub const UNKNOWN_OP: i32 = 0xffff;
}

/// What makes one client's contract: it is deployed with these as initial
/// data, so they also determine its address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SettlementParams {
    /// The client's wallet, the only sender of owner messages.
    pub owner: Address,
    /// The client's ed25519 key that signs cheques.
    pub public_key: [u8; 32],
    /// Seconds a worker has to redeem after the client starts closing its lane.
    pub close_delay_s: u32,
    /// Distinguishes several contracts of one owner.
    pub nonce: u64,
}

impl SettlementParams {
    /// The initial data cell: `owner public_key close_delay nonce committed:0 lanes:empty`.
    pub fn initial_data(&self) -> Result<ArcCell> {
        Ok(CellBuilder::new()
            .store_raw_address(self.owner.as_ton())?
            .store_slice(&self.public_key)?
            .store_u32(32, self.close_delay_s)?
            .store_u64(64, self.nonce)?
            .store_coins(&BigUint::ZERO)?
            .store_bit(false)?
            .build()?
            .to_arc())
    }

    /// Code and initial data.
    pub fn state_init(&self) -> Result<StateInit> {
        Ok(StateInit {
            code: settlement_code()?,
            data: self.initial_data()?,
        })
    }

    /// The contract's basechain address.
    pub fn address(&self) -> Result<Address> {
        self.state_init()?.address(0)
    }
}

/// The nonce of a client's contract on the network `global_id`: the
/// network in the high 32 bits, the client's own `nonce` in the low ones.
/// The contract's address, which every cheque names, then differs from one
/// network to another, so a cheque signed on a devnet or the testnet is
/// worthless on the mainnet even for the same keys (audit F18).
pub fn network_nonce(global_id: i32, nonce: u32) -> u64 {
    (u64::from(global_id as u32) << 32) | u64::from(nonce)
}

/// The network a [`network_nonce`] names.
pub fn nonce_network(nonce: u64) -> i32 {
    (nonce >> 32) as u32 as i32
}

/// One entry of an OpenLanes message: allocate `amount` more to lane
/// `lane_id`, which pays `worker`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LaneTopUp {
    /// Lane id (the client picks it; never reused after a reclaim).
    pub lane_id: u32,
    /// The worker the lane pays.
    pub worker: Address,
    /// How much to add.
    pub amount: Coins,
}

fn header(op: u32, query_id: u64) -> Result<CellBuilder> {
    let mut b = CellBuilder::new();
    b.store_u32(32, op)?.store_u64(64, query_id)?;
    Ok(b)
}

/// `Deposit query_id`.
pub fn deposit_body(query_id: u64) -> Result<ArcCell> {
    Ok(header(op::DEPOSIT, query_id)?.build()?.to_arc())
}

fn write_top_up(b: &mut CellBuilder, v: (TonAddress, BigUint)) -> Result<(), TonCellError> {
    b.store_raw_address(&v.0)?.store_coins(&v.1)?;
    Ok(())
}

/// `OpenLanes query_id lanes:(HashmapE 32 LaneTopUp)`. Lane ids must be distinct.
pub fn open_lanes_body(query_id: u64, lanes: &[LaneTopUp]) -> Result<ArcCell> {
    let mut map = HashMap::with_capacity(lanes.len());
    for l in lanes {
        if map
            .insert(
                l.lane_id,
                (l.worker.as_ton().clone(), l.amount.to_biguint()?),
            )
            .is_some()
        {
            return Err(Error::Cell(format!(
                "lane {} appears twice in one OpenLanes message",
                l.lane_id
            )));
        }
    }
    let mut b = header(op::OPEN_LANES, query_id)?;
    b.store_dict(32, write_top_up, map)?;
    Ok(b.build()?.to_arc())
}

/// `Redeem query_id lane_id cumulative signature`.
pub fn redeem_body(query_id: u64, cheque: &SignedCheque) -> Result<ArcCell> {
    let mut b = header(op::REDEEM, query_id)?;
    b.store_u32(32, cheque.cheque.lane_id)?
        .store_coins(&cheque.cheque.cumulative.to_biguint()?)?
        .store_slice(&cheque.signature)?;
    Ok(b.build()?.to_arc())
}

/// `CloseLane query_id lane_id`.
pub fn close_lane_body(query_id: u64, lane_id: u32) -> Result<ArcCell> {
    let mut b = header(op::CLOSE_LANE, query_id)?;
    b.store_u32(32, lane_id)?;
    Ok(b.build()?.to_arc())
}

/// `ReclaimLane query_id lane_id`.
pub fn reclaim_lane_body(query_id: u64, lane_id: u32) -> Result<ArcCell> {
    let mut b = header(op::RECLAIM_LANE, query_id)?;
    b.store_u32(32, lane_id)?;
    Ok(b.build()?.to_arc())
}

/// `Withdraw query_id amount`; `None` withdraws everything free.
pub fn withdraw_body(query_id: u64, amount: Option<Coins>) -> Result<ArcCell> {
    let mut b = header(op::WITHDRAW, query_id)?;
    b.store_coins(&amount.unwrap_or(Coins::ZERO).to_biguint()?)?;
    Ok(b.build()?.to_arc())
}

/// What `get_state` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContractState {
    /// The owner's wallet.
    pub owner: Address,
    /// The key that signs cheques.
    pub public_key: [u8; 32],
    /// Close delay in seconds.
    pub close_delay_s: u32,
    /// The contract's nonce.
    pub nonce: u64,
    /// The contract's balance.
    pub balance: Coins,
    /// What the lanes still hold.
    pub committed: Coins,
    /// `balance - committed - MIN_RESERVE`; negative after storage fees ate the reserve.
    pub free_nano: i128,
}

/// What `get_lane` reports for an existing lane.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LaneState {
    /// The worker the lane pays.
    pub worker: Address,
    /// Everything ever allocated to the lane.
    pub deposited: Coins,
    /// Everything paid out so far (the last redeemed cumulative amount).
    pub redeemed: Coins,
    /// 0 while open, else the unix time after which the owner may reclaim.
    pub closing_at: u32,
    /// Reclaimed; the lane id is spent.
    pub finished: bool,
}

impl LaneState {
    /// What the lane still holds for its worker.
    pub fn remaining(&self) -> Coins {
        if self.finished {
            Coins::ZERO
        } else {
            self.deposited.saturating_sub(self.redeemed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::cell_hash;

    #[test]
    fn embedded_code_matches_its_recorded_hash() {
        let code = settlement_code().unwrap();
        assert_eq!(hex::encode(cell_hash(&code)), settlement_code_hash_hex());
    }

    #[test]
    fn the_network_goes_into_the_nonce_and_the_address() {
        for id in [-239, -3, 0x5e1c, 0, i32::MIN, i32::MAX] {
            let n = network_nonce(id, 7);
            assert_eq!(nonce_network(n), id);
            assert_eq!(n & 0xffff_ffff, 7);
        }
        let params = |global_id| SettlementParams {
            owner: Address::new(0, [1; 32]),
            public_key: [2; 32],
            close_delay_s: 86_400,
            nonce: network_nonce(global_id, 1),
        };
        assert_ne!(
            params(-239).address().unwrap(),
            params(-3).address().unwrap()
        );
    }

    #[test]
    fn open_lanes_refuses_duplicate_ids() {
        let w = Address::new(0, [9; 32]);
        let l = LaneTopUp {
            lane_id: 1,
            worker: w,
            amount: Coins(1),
        };
        assert!(open_lanes_body(0, &[l.clone(), l]).is_err());
    }
}

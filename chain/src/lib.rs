//! silk's TON side: keys, addresses, cells, the settlement contract, cheques,
//! prices and ledgers. It knows TON and nothing about peers, models or jobs.
//!
//! # Bird's-eye view
//!
//! A client deploys one settlement contract ([`settlement`]; Tolk source,
//! compiled code and sandbox tests under `contracts/`), deposits TON into it
//! and opens *lanes*, one per worker. For every job the client's gateway
//! signs a cumulative [`Cheque`] (what the lane owes the worker so far) with
//! the key derived from its mnemonic ([`Keys`]); the worker keeps the highest
//! cheque and redeems it from time to time; the contract pays the difference
//! to the last redemption. Only deposits, lane changes and redemptions become
//! on-chain messages, never single jobs.
//!
//! - [`coins`]: [`Coins`], integer nanoTON with checked arithmetic.
//! - [`pricing`]: [`Price`], per-token cost in nanoTON, multipliers in parts per thousand.
//! - [`address`], [`keys`]: addresses, mnemonic keys, wallet v4r2/v5r1 addresses.
//! - [`cheque`]: the signed cheque, byte for byte what the contract checks.
//! - [`settlement`]: contract code, initial data, address, message bodies.
//! - [`message`]: internal messages, signed wallet transfers and BOCs, laid
//!   out as `@ton/core` lays them out.
//! - [`ledger`]: the [`Ledger`] trait (send, get-methods, accounts,
//!   transactions, wait for inclusion) and settlement reads on top of it.
//! - [`devnet`]: a local chain executing the real compiled code in a TVM
//!   (tycho-executor), state in redb, one block per interval;
//!   [`devnet_http`] serves it over the TON HTTP API so other processes share it.
//! - [`ton_http`]: [`TonHttp`], a real TON network through its HTTP API.
//!
//! Data flows one way: callers build cells with [`settlement`] and
//! [`message`], hand BOCs to a [`Ledger`], and read state back through
//! [`ledger::settlement_state`] and friends. Cells come from tonlib-core,
//! re-exported as [`tonlib_core`]; tycho types stay inside [`devnet`].

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod address;
pub mod cheque;
pub mod coins;
pub mod devnet;
pub mod devnet_http;
pub mod error;
pub mod keys;
pub mod ledger;
pub mod message;
pub mod pricing;
pub mod settlement;
pub mod ton_http;

pub use address::Address;
pub use cheque::{Cheque, SignedCheque};
pub use coins::Coins;
pub use devnet::{Devnet, DevnetConfig};
pub use error::{Error, Result};
pub use keys::{Keys, Wallet, WalletVersion};
pub use ledger::Ledger;
pub use pricing::{Price, DEFAULT_CACHED_MULT_MILLI};
pub use settlement::{LaneState, LaneTopUp, SettlementParams};
pub use ton_http::{TonHttp, TonHttpConfig};
pub use tonlib_core;

//! Messages as TON cells: internal messages, state inits, signed wallet
//! transfers, and BOC (de)serialisation.
//!
//! Layout choices follow `@ton/core` (`storeMessage`, `storeMessageRelaxed`),
//! so a transfer built here is the same cell tree, and the same BOC bytes, as
//! one `@ton/ton` builds for the same inputs: a body or state init is inlined
//! when it fits in the message cell, and put in its own cell otherwise.

use std::sync::Arc;

use tonlib_core::cell::{ArcCell, BagOfCells, Cell, CellBuilder};
use tonlib_core::TonAddress;

use crate::address::Address;
use crate::coins::Coins;
use crate::error::{Error, Result};
use crate::keys::{Wallet, WalletVersion};

/// Send mode our wallet transfers use: pay forward fees separately (+1) and
/// ignore action errors (+2), the mode wallets use by default.
pub const WALLET_SEND_MODE: u8 = 3;

/// Code and data of a contract to deploy; its hash is the contract's address.
#[derive(Clone, Debug, PartialEq)]
pub struct StateInit {
    /// Code cell.
    pub code: ArcCell,
    /// Initial data cell.
    pub data: ArcCell,
}

impl StateInit {
    /// `_ split_depth:(Maybe ..) special:(Maybe ..) code:(Maybe ^Cell) data:(Maybe ^Cell) library:(Maybe ^Cell)`
    pub fn to_cell(&self) -> Result<Cell> {
        Ok(CellBuilder::new()
            .store_bit(false)?
            .store_bit(false)?
            .store_bit(true)?
            .store_reference(&self.code)?
            .store_bit(true)?
            .store_reference(&self.data)?
            .store_bit(false)?
            .build()?)
    }

    /// The address a contract with this state init gets in `workchain`.
    pub fn address(&self, workchain: i32) -> Result<Address> {
        Ok(Address(TonAddress::derive(
            workchain,
            self.code.clone(),
            self.data.clone(),
        )?))
    }
}

/// An internal message for a wallet to send.
#[derive(Clone, Debug, PartialEq)]
pub struct OutMessage {
    /// Destination.
    pub dest: Address,
    /// Value attached.
    pub value: Coins,
    /// Whether the message bounces back if the destination fails. Set it
    /// explicitly: bounceable to contracts, non-bounceable to undeployed wallets.
    pub bounce: bool,
    /// Body; `None` for a plain transfer.
    pub body: Option<ArcCell>,
    /// State init to deploy the destination with.
    pub state_init: Option<StateInit>,
}

/// Builder plus the number of references stored, which tonlib-core's builder
/// does not expose.
struct Msg {
    b: CellBuilder,
    refs: usize,
}

impl Msg {
    /// `init:(Maybe (Either StateInit ^StateInit))`. `extra_bits` is what
    /// must also fit inline for the init to be inlined (`@ton/core`'s
    /// `storeMessage` counts the body; the relaxed variant does not).
    fn store_init(&mut self, init: Option<&StateInit>, extra_bits: usize) -> Result<()> {
        match init {
            None => {
                self.b.store_bit(false)?;
            }
            Some(init) => {
                let cell = init.to_cell()?;
                self.b.store_bit(true)?;
                let available = self.b.remaining_bits().saturating_sub(2);
                if available >= cell.bit_len() + extra_bits {
                    self.b.store_bit(false)?;
                    self.b.store_cell(&cell)?;
                    self.refs += cell.references().len();
                } else {
                    self.b.store_bit(true)?;
                    self.b.store_child(cell)?;
                    self.refs += 1;
                }
            }
        }
        Ok(())
    }

    /// `body:(Either X ^X)`; an absent body is an empty inline one.
    fn store_body(&mut self, body: Option<&ArcCell>) -> Result<()> {
        let empty = Arc::new(Cell::default());
        let body = body.unwrap_or(&empty);
        let fits = self.b.remaining_bits().saturating_sub(1) >= body.bit_len()
            && self.refs + body.references().len() <= 4
            && !body.is_exotic();
        if fits {
            self.b.store_bit(false)?;
            self.b.store_cell(body)?;
        } else {
            self.b.store_bit(true)?;
            self.b.store_reference(body)?;
        }
        Ok(())
    }
}

/// The `MessageRelaxed` cell a wallet sends: `int_msg_info$0 ihr_disabled:1
/// bounce bounced:0 src:addr_none dest value ihr_fee:0 fwd_fee:0 created_lt:0
/// created_at:0`, then init and body.
pub fn internal_message_cell(msg: &OutMessage) -> Result<Cell> {
    let mut m = Msg {
        b: CellBuilder::new(),
        refs: 0,
    };
    m.b.store_bit(false)? // int_msg_info$0
        .store_bit(true)? // ihr_disabled
        .store_bit(msg.bounce)?
        .store_bit(false)? // bounced
        .store_u8(2, 0)? // src: addr_none
        .store_raw_address(msg.dest.as_ton())?
        .store_coins(&msg.value.to_biguint()?)?
        .store_bit(false)? // no extra currencies
        .store_coins(&Coins::ZERO.to_biguint()?)? // ihr_fee
        .store_coins(&Coins::ZERO.to_biguint()?)? // fwd_fee
        .store_u64(64, 0)?
        .store_u32(32, 0)?;
    m.store_init(msg.state_init.as_ref(), 0)?;
    m.store_body(msg.body.as_ref())?;
    Ok(m.b.build()?)
}

/// An external message to `dest` (`ext_in_msg_info$10 src:addr_none dest import_fee:0`).
pub fn external_message_cell(
    dest: &Address,
    state_init: Option<&StateInit>,
    body: &ArcCell,
) -> Result<Cell> {
    let mut m = Msg {
        b: CellBuilder::new(),
        refs: 0,
    };
    m.b.store_u8(2, 0b10)?
        .store_u8(2, 0)?
        .store_raw_address(dest.as_ton())?
        .store_coins(&Coins::ZERO.to_biguint()?)?;
    m.store_init(state_init, body.bit_len())?;
    m.store_body(Some(body))?;
    Ok(m.b.build()?)
}

/// A signed external message that makes `wallet` send `messages` (at most 4
/// for v4r2, 255 for v5r1), with [`WALLET_SEND_MODE`]. With `seqno == 0` the
/// wallet's state init is attached so the first transfer also deploys it.
/// `valid_until` is a unix time after which the wallet refuses the message.
pub fn wallet_transfer(
    wallet: &Wallet,
    seqno: u32,
    valid_until: u32,
    messages: &[OutMessage],
) -> Result<Cell> {
    let mut internals = messages
        .iter()
        .map(|m| internal_message_cell(m).map(Cell::to_arc))
        .collect::<Result<Vec<_>>>()?;
    if wallet.version() == WalletVersion::V5R1 {
        // tonlib-core puts the first message at the head of the v5 out-list,
        // which TVM executes last; `@ton/core` (and the order callers mean)
        // has the first message deepest, sent first.
        internals.reverse();
    }
    let tw = wallet.tonlib();
    let body = tw.create_external_body(valid_until, seqno, &internals)?;
    let signed = tw.sign_external_body(&body)?.to_arc();
    let init = if seqno == 0 {
        Some(StateInit {
            code: wallet.code()?,
            data: wallet.initial_data()?,
        })
    } else {
        None
    };
    external_message_cell(&wallet.address(), init.as_ref(), &signed)
}

/// Serialises a cell as a BOC with a CRC32C, without an index (what `@ton/core`'s `toBoc()` writes).
pub fn to_boc(cell: &Cell) -> Result<Vec<u8>> {
    Ok(BagOfCells::from_root(cell.clone()).serialize(true)?)
}

/// Parses a single-root BOC.
pub fn from_boc(bytes: &[u8]) -> Result<ArcCell> {
    let boc = BagOfCells::parse(bytes)?;
    boc.single_root()
        .map_err(|e| Error::Cell(format!("BOC with one root expected: {e}")))
}

/// The 32-byte representation hash of a cell (for messages: the hash explorers show).
pub fn cell_hash(cell: &Cell) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(cell.cell_hash().as_slice());
    out
}

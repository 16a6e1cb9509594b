//! The crate's one error type.

/// Everything that can go wrong in `silk-chain`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mnemonic that TON wallets would not accept.
    #[error("invalid TON mnemonic: {0}; pass the 24 words of a TON wallet, separated by spaces")]
    Mnemonic(String),
    /// An address that is neither `workchain:hex` nor a 48-character user-friendly form.
    #[error("invalid TON address {input:?}: {reason}; use the raw form `0:<64 hex>` or the 48-character form a wallet shows")]
    Address {
        /// What was given.
        input: String,
        /// Why it was refused.
        reason: String,
    },
    /// An amount string that is not a TON amount.
    #[error("invalid TON amount {input:?}: {reason}; write it in TON with at most 9 decimals, e.g. `1.5`")]
    Amount {
        /// What was given.
        input: String,
        /// Why it was refused.
        reason: String,
    },
    /// Money arithmetic would overflow or go negative.
    #[error(
        "amount arithmetic overflowed in {0}; the values involved are too large for TON coins"
    )]
    Overflow(&'static str),
    /// Money that does not fit the 120 bits TON coins allow.
    #[error("{0} nanoTON exceeds what a TON message can carry (2^120 - 1)")]
    CoinsTooLarge(u128),
    /// A signature that does not verify.
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
    /// A public or secret key of the wrong shape.
    #[error("invalid ed25519 key: {0}")]
    Key(String),
    /// Building, parsing or serialising cells failed.
    #[error("cell error: {0}")]
    Cell(String),
    /// Waiting for the chain took too long.
    #[error("timed out after {after:?} waiting for {what}; is the ledger producing blocks?")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long.
        after: std::time::Duration,
    },
    /// The ledger refused or failed a request.
    #[error("ledger: {0}")]
    Ledger(String),
    /// The devnet's store failed.
    #[error(
        "devnet store: {0}; check the data directory is writable and not used by another process"
    )]
    Store(String),
    /// A get-method answered with a stack we do not understand.
    #[error("unexpected answer from get-method {method}: {reason}")]
    GetMethod {
        /// Which method.
        method: String,
        /// What was wrong with it.
        reason: String,
    },
}

impl From<tonlib_core::cell::TonCellError> for Error {
    fn from(e: tonlib_core::cell::TonCellError) -> Self {
        Error::Cell(e.to_string())
    }
}

impl From<tonlib_core::message::TonMessageError> for Error {
    fn from(e: tonlib_core::message::TonMessageError) -> Self {
        Error::Cell(e.to_string())
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

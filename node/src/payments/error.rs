//! The payments error type.

use silk_chain::{Address, Coins};

/// Everything that can go wrong with lanes, reservations, cheques and redemption.
#[derive(Debug, thiserror::Error)]
pub enum PaymentsError {
    /// The payments store (redb) failed.
    #[error("payments store: {0}; check the data directory is writable and not opened by another silk process")]
    Store(String),
    /// A TON-side operation failed (cells, signatures, ledger I/O).
    #[error(transparent)]
    Chain(#[from] silk_chain::Error),
    /// No lane to this worker in the gateway's book.
    #[error("no lane to worker {worker}; open one with `silk wallet open-lane {worker} AMOUNT`")]
    NoLane {
        /// The worker's wallet.
        worker: Address,
    },
    /// The lane cannot cover a job's worst case.
    #[error("lane {lane_id} to worker {worker} has {available} nanoTON free but the job may cost up to {needed} nanoTON; top it up with `silk wallet open-lane {worker} AMOUNT`")]
    InsufficientLane {
        /// The worker's wallet.
        worker: Address,
        /// The lane.
        lane_id: u32,
        /// Deposited minus signed minus reserved.
        available: Coins,
        /// The worst case asked for.
        needed: Coins,
    },
    /// The reservation was already settled or released (or never existed).
    #[error("reservation {0} is unknown or already settled/released; a reservation is spent once")]
    UnknownReservation(u64),
    /// A job cost more than its reservation.
    #[error("actual cost {actual} nanoTON exceeds the reserved worst case {reserved} nanoTON")]
    CostAboveReservation {
        /// The cost asked to settle.
        actual: Coins,
        /// What was reserved.
        reserved: Coins,
    },
    /// The worker's coefficient is above what the caller accepts.
    #[error(
        "worker coefficient {worker_milli}‰ is above the caller's max_coefficient {max_milli}‰"
    )]
    CoefficientTooHigh {
        /// Announced by the worker.
        worker_milli: u32,
        /// Accepted by the caller.
        max_milli: u32,
    },
    /// A cheque was rejected by the worker.
    #[error("cheque rejected: {0}")]
    BadCheque(String),
    /// The contract refused a message.
    #[error("settlement contract {contract} refused {what} with exit code {exit_code}")]
    Refused {
        /// The contract.
        contract: Address,
        /// The message.
        what: &'static str,
        /// Its compute-phase exit code.
        exit_code: i32,
    },
    /// A client's payment terms do not match the chain (key, lane, worker).
    #[error("client {contract} lane {lane_id}: {reason}")]
    BadClient {
        /// The client's settlement contract.
        contract: Address,
        /// The lane the client named.
        lane_id: u32,
        /// What does not match.
        reason: String,
    },
    /// The client's lane cannot pay for more work, or its cheques are behind.
    #[error(
        "client {contract} lane {lane_id}: {reason}; top the lane up or send the cheques owed"
    )]
    ClientBehind {
        /// The client's settlement contract.
        contract: Address,
        /// The lane.
        lane_id: u32,
        /// Why service stops.
        reason: String,
    },
    /// Something the user passed or configured is unusable.
    #[error("{0}")]
    Config(String),
    /// A job id the client already used is still open on this worker.
    #[error("job {job} of {contract} is still open on this worker: every job needs a new id")]
    JobOpen {
        /// The client's contract.
        contract: Address,
        /// The job id.
        job: u64,
    },
    /// The client has too many jobs waiting for their cheques.
    #[error("{contract} has {open} jobs waiting for cheques on this worker; pay for them first")]
    TooManyOpenJobs {
        /// The client's contract.
        contract: Address,
        /// How many.
        open: usize,
    },
}

/// Result with [`PaymentsError`].
pub type Result<T, E = PaymentsError> = std::result::Result<T, E>;

pub(crate) fn store_err(e: impl std::fmt::Display) -> PaymentsError {
    PaymentsError::Store(e.to_string())
}

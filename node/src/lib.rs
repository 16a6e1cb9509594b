//! The silk node: composition of the overlay, inference and chain crates,
//! the `silk` CLI, attestation, payments, the HTTP API and the job lifecycle.
//!
//! # Layout
//!
//! - [`attest`]: TDX attestation. Claims bound into quotes, quote generation
//!   through configfs-tsm, DCAP verification with a policy, collateral from
//!   a PCCS with an on-disk cache, the attestation document served on
//!   `/silk/attest/1.0.0`, and a verdict cache. Pure library code: no tasks,
//!   no network except the blocking PCCS client.
//! - [`payments`]: the money side of a job: lanes, reservations and
//!   cheques (gateway), cheque checks and redemption (worker), on-chain
//!   lane opening through the settlement contract; all in redb.
//! - [`billing`]: payments inside the job lifecycle: the gateway reserves
//!   before dispatch (opening lanes on chain when needed), settles after
//!   the job and sends the cheque; the worker checks the client's lane on
//!   chain before serving, stores cheques before acknowledging them, books
//!   jobs whose cheques never came, and redeems in the background.
//! - [`cli`]: the clap-derived `silk` command line; `main.rs` only calls
//!   [`cli::run`].
//! - The mesh: [`config`] (`config.toml`), [`node`] ([`node::Node`]: the
//!   supervisor that starts the overlay and the services below under one
//!   `JoinSet` and one cancellation token, and routes overlay events to
//!   them), [`gateway`] (the worker table each request reads, selection,
//!   forwarding with retries and failover, paying, the context-window
//!   check), [`worker`] (engine, announcer, the worker's side of a job
//!   stream, this node's attestation document), [`reputation`] (job
//!   outcomes seen here plus gossiped reports weighted by the reporter's
//!   standing, owned by one task), [`protocol`] (the postcard job messages
//!   inside the overlay's `/silk/job/1.0.0` frames), [`api`] (the
//!   OpenAI-compatible HTTP API on axum over hyper, behind a guard: Host,
//!   Origin and JSON checks, API keys with rate limits and daily spend
//!   caps, header, body and request timeouts, connection caps; the
//!   operator's dashboard at `/`).
//! - The operator's view: [`metrics`] (`/metrics`: job counters and
//!   histograms, the books' totals and the engine's load read at scrape
//!   time, the overlay's and libp2p's metrics) and [`activity`] (each
//!   job's record and the money over time, in redb, for the dashboard and
//!   `silk status`).
//!
//! # Data flow of a job
//!
//! HTTP request → [`api`] guards and validates, and holds the job's worst
//! case against the caller's key → [`gateway::Gateway::dispatch`] ranks
//! workers from gossiped announcements (DHT providers when gossip knows too
//! few), filtered by the attestation policy → job stream to the worker →
//! [`worker::serve_stream`] runs the engine and streams tokens → the
//! gateway's forwarding task settles the job (cheque to the worker) → SSE
//! or one JSON body with `silk.cost_nanoton`.

pub mod activity;
pub mod api;
pub mod attest;
pub mod billing;
pub mod cli;
pub mod config;
mod error;
pub mod gateway;
pub mod metrics;
pub mod node;
pub mod payments;
pub mod protocol;
pub mod reputation;
pub mod worker;

pub use error::MeshError;

/// Unix time now in milliseconds (0 before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

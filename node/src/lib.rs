//! The silk node: composition of the overlay, inference and chain crates,
//! the `silk` CLI, and (so far) attestation.
//!
//! # Layout
//!
//! - [`attest`]: TDX attestation. Claims bound into quotes, quote generation
//!   through configfs-tsm, DCAP verification with a policy, collateral from
//!   a PCCS with an on-disk cache, the attestation document served on
//!   `/silk/attest/1.0.0`, and a verdict cache. Pure library code: no tasks,
//!   no network except the blocking PCCS client.
//! - [`cli`]: the clap-derived `silk` command line; `main.rs` only calls
//!   [`cli::run`].

pub mod attest;
pub mod cli;

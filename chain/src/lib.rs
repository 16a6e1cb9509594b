//! silk's TON side.
//!
//! # Bird's-eye view
//!
//! This crate knows TON and nothing about peers or models. It is being built
//! under issue 4; see `docs/ARCHITECTURE.md`.

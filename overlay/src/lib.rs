//! silk's peer-to-peer overlay.
//!
//! # Bird's-eye view
//!
//! This crate knows libp2p and nothing about money, models or HTTP. It is
//! being built under issue 3; see `docs/ARCHITECTURE.md`.

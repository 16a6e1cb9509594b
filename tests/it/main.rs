//! End-to-end tests across several silk nodes, compiled as one binary.
//!
//! They start real `silk run` processes through `silk-testnet`, so build
//! the binary first: `cargo build -p silk-node && cargo test -p silk-tests`.
//! The default model is located like the inference tests do
//! (`SILK_SMOLLM2_GGUF`, else `~/.silk/models`).

mod mesh;
mod nat;
mod payments;
mod proximity;

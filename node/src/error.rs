//! The mesh's error type (config, startup, dispatch).

use std::path::PathBuf;

/// What can go wrong while starting or running a node.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The config file could not be read or written.
    #[error("config file {path}: {reason} (fix or delete it, then run `silk init`)")]
    Config {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A multiaddr or socket address did not parse.
    #[error("bad address `{addr}`: {reason}")]
    Address {
        /// The text.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The model to serve is not installed.
    #[error(
        "model `{model}` is not in {dir}: run `silk model fetch` first (or pass --models-dir)"
    )]
    ModelMissing {
        /// Name asked for.
        model: String,
        /// Directory searched.
        dir: PathBuf,
    },
    /// The overlay failed.
    #[error(transparent)]
    Overlay(#[from] silk_overlay::OverlayError),
    /// The engine failed.
    #[error(transparent)]
    Inference(#[from] silk_inference::InferenceError),
    /// Attestation failed.
    #[error(transparent)]
    Attest(#[from] crate::attest::AttestError),
    /// The HTTP API could not bind.
    #[error("cannot listen on {addr}: {source} (pass --api with another port)")]
    ApiBind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

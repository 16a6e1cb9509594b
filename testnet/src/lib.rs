//! A local silk testnet.
//!
//! # Bird's-eye view
//!
//! Starts N nodes on one machine for tests and demos. Built under issue 3.

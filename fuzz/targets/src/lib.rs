//! Fuzz target bodies, shared by the cargo-fuzz binaries in `fuzz/fuzz_targets/`
//! (nightly, libFuzzer) and by `tests/replay.rs`, which runs every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through the same
//! function on stable, so CI replays the corpora as regression tests.
//!
//! # Layout
//!
//! One `pub fn <target>(data: &[u8])` per decoder that reads bytes from a
//! peer or a file, listed in [`TARGETS`]. Each drives the real decoder and
//! what the node does next with a decoded value (signature checks,
//! appraisal, scoring). None of them may panic on any input: a panic is a
//! bug in the decoder, fixed there, and the input that found it is kept in
//! `fuzz/regressions/<target>/`. The few `assert!`s check properties the
//! decoders promise (a decoded value encodes back to itself, a score stays
//! in `[0, 1]`); a failing one is a bug too.
//!
//! Seeds come from the crates' own encoders: `cargo run -p silk-fuzz
//! --example write_seeds` writes them into `fuzz/corpus/`.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use silk_chain::devnet::Clock;
use silk_chain::{Address, Coins, Devnet, DevnetConfig, Keys, SignedCheque, Wallet, WalletVersion};
use silk_inference::gguf::GgufFile;
use silk_node::attest::{
    appraise_document, appraise_quote, verify_quote, AttestationDocument, CollateralKey, Policy,
};
use silk_node::protocol::{ChequeAck, ChequeDelivery, JobMessage, JobUsage, TokenChunk};
use silk_node::reputation::{Report, Reputation};
use silk_overlay::{Announcement, PeerId, SignedEnvelope};

/// A fuzz target body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory and cargo-fuzz binary.
pub const TARGETS: &[(&str, Target)] = &[
    ("job_frame", job_frame),
    ("job_message", job_message),
    ("gossip_envelope", gossip_envelope),
    ("reputation_report", reputation_report),
    ("attestation_document", attestation_document),
    ("tdx_quote", tdx_quote),
    ("cheque", cheque),
    ("gguf", gguf),
    ("devnet_http", devnet_http),
];

/// Job-stream frames as the overlay's limit allows them (`OverlayConfig`'s default).
pub const MAX_FRAME_SIZE: usize = 1024 * 1024;

/// Time the attestation targets verify at: 2025-06-20T00:00:00Z, inside the
/// validity window of the sample collateral (node/tests/fixtures/attest).
pub const ATTEST_AT: u64 = 1_750_377_600;

/// The unix time the devnet target's chain starts at.
pub const DEVNET_START: u32 = 1_750_000_000;

/// The keys of the wallet the devnet target funds: seed `[7; 32]`.
pub fn devnet_keys() -> Keys {
    Keys::from_seed([7; 32])
}

/// The v4r2 wallet of [`devnet_keys`], which the devnet target funds so a
/// request can read it or deploy it (`None` if the wallet cannot be built).
pub fn devnet_wallet() -> Option<&'static Wallet> {
    static WALLET: OnceLock<Option<Wallet>> = OnceLock::new();
    WALLET
        .get_or_init(|| Wallet::new(WalletVersion::V4R2, &devnet_keys()).ok())
        .as_ref()
}

/// The reporter whose reports [`reputation_report`] absorbs: seed 1 of
/// [`silk_overlay::testing::seeded_keypair`].
pub fn reporter() -> PeerId {
    silk_overlay::testing::seeded_keypair(1)
        .public()
        .to_peer_id()
}

/// Bytes a peer writes on a `/silk/job/1.0.0` stream (length-prefixed
/// postcard wire frames), decoded by the overlay's frame reader.
pub fn job_frame(data: &[u8]) {
    let _ = silk_overlay::job::decode_stream(data, MAX_FRAME_SIZE);
}

/// The node's payloads inside job frames: the first frame's [`JobMessage`]
/// (worker side) and the [`TokenChunk`], [`JobUsage`] and [`ChequeAck`]
/// frames a gateway reads back, then what each side does with them.
pub fn job_message(data: &[u8]) {
    if let Ok(message) = postcard::from_bytes::<JobMessage>(data) {
        match &message {
            JobMessage::Generate(request) => {
                let _ = request.to_generate();
                let _ = request.estimated_prompt_tokens();
                let _ = request.prompt_tokens_bound();
            }
            JobMessage::Cheque(delivery) => {
                let _ = delivery.cheque.verify(&delivery.public_key);
            }
        }
        // Compared as bytes: a peer may send NaN sampling parameters.
        let bytes = silk_node::protocol::encode(&message);
        assert!(
            matches!(postcard::from_bytes::<JobMessage>(&bytes), Ok(back) if silk_node::protocol::encode(&back) == bytes),
            "a decoded job message must encode back to itself"
        );
    }
    let _ = postcard::from_bytes::<TokenChunk>(data);
    let _ = postcard::from_bytes::<JobUsage>(data);
    let _ = postcard::from_bytes::<ChequeAck>(data);
}

/// A gossip message on either topic: the [`SignedEnvelope`], the claimed
/// announcement the overlay reads before checking the signature, both
/// signature checks, and the payout address a gateway parses.
pub fn gossip_envelope(data: &[u8]) {
    let Ok(envelope) = SignedEnvelope::from_bytes(data) else {
        return;
    };
    if let Ok(claimed) = postcard::from_bytes::<Announcement>(&envelope.payload) {
        if let Some(payout) = &claimed.payout {
            let _ = payout.parse::<Address>();
        }
    }
    let _ = envelope.verify_announcement();
    let _ = envelope.verify_reputation();
    if let Ok(bytes) = envelope.to_bytes() {
        assert_eq!(
            SignedEnvelope::from_bytes(&bytes).as_ref(),
            Ok(&envelope),
            "a decoded envelope must encode back to itself"
        );
    }
}

/// A reputation report's payload, absorbed from a reporter with full
/// standing (so it is kept), then the scores it moves.
pub fn reputation_report(data: &[u8]) {
    let reporter = reporter();
    let mut book = Reputation::default();
    for _ in 0..12 {
        book.record(reporter, true);
    }
    let taken = book.absorb(reporter, data);
    if taken.is_ok() {
        assert!(
            book.absorb(reporter, data).is_err(),
            "the same report twice must be refused as stale"
        );
    }
    let Ok(report) = postcard::from_bytes::<Report>(data) else {
        return;
    };
    for entry in report.entries.iter().take(16) {
        if let Ok(worker) = PeerId::from_bytes(&entry.worker) {
            for _ in 0..2 {
                let score = book.score(&worker);
                assert!(
                    (0.0..=1.0).contains(&score),
                    "score {score} is outside [0, 1]"
                );
                book.decay();
            }
        }
    }
}

/// The sample DCAP collateral (node/tests/fixtures/attest), parsed once.
fn sample_collateral() -> Option<&'static dcap_qvl::QuoteCollateralV3> {
    static COLLATERAL: OnceLock<Option<dcap_qvl::QuoteCollateralV3>> = OnceLock::new();
    COLLATERAL
        .get_or_init(|| {
            serde_json::from_str(include_str!(
                "../../../node/tests/fixtures/attest/tdx_quote_collateral.json"
            ))
            .ok()
        })
        .as_ref()
}

/// A policy that lets a quote past the image check, so appraisal goes as
/// deep as the bytes allow.
fn open_policy() -> Policy {
    Policy {
        accept_any_image: true,
        ..Policy::default()
    }
}

/// A peer's attestation document (`/silk/attest/1.0.0`): decode, digest,
/// re-encode, and appraisal with the document's own collateral and with the
/// verifier's.
pub fn attestation_document(data: &[u8]) {
    let Ok(doc) = AttestationDocument::decode(data) else {
        return;
    };
    let _ = doc.digest();
    if let Ok(bytes) = doc.encode() {
        assert!(
            matches!(AttestationDocument::decode(&bytes), Ok(back) if back == doc),
            "a decoded attestation document must encode back to itself"
        );
    }
    let policy = open_policy();
    let key = doc.claims.peer_public_key.0;
    let _ = appraise_document(&doc, &key, None, &policy, true, ATTEST_AT);
    let _ = appraise_document(&doc, &key, sample_collateral(), &policy, false, ATTEST_AT);
}

/// Raw TDX quote bytes (what a document's `quote` holds): the collateral
/// key lookup, DCAP verification and appraisal against the sample
/// collateral.
pub fn tdx_quote(data: &[u8]) {
    let _ = CollateralKey::from_quote(data);
    let Some(collateral) = sample_collateral() else {
        return;
    };
    let _ = verify_quote(data, collateral, ATTEST_AT);
    let _ = appraise_quote(data, collateral, &open_policy(), None, ATTEST_AT);
}

/// A cheque as it arrives: postcard [`ChequeDelivery`] (in a job message),
/// and the JSON of [`SignedCheque`] and [`ChequeDelivery`] (the stores),
/// then the signature check and the cheque cell hash.
pub fn cheque(data: &[u8]) {
    if let Ok(delivery) = postcard::from_bytes::<ChequeDelivery>(data) {
        let _ = delivery.cheque.verify(&delivery.public_key);
        let _ = delivery.cheque.cheque.hash();
        let back = postcard::from_bytes::<ChequeDelivery>(&silk_node::protocol::encode(&delivery));
        assert!(
            matches!(&back, Ok(b) if *b == delivery),
            "a decoded cheque delivery must encode back to itself"
        );
    }
    if let Ok(signed) = serde_json::from_slice::<SignedCheque>(data) {
        let _ = signed.cheque.hash();
        let _ = signed.verify(&[0x11; 32]);
        let _ = signed.cheque.cumulative.checked_add(Coins(1));
    }
    if let Ok(delivery) = serde_json::from_slice::<ChequeDelivery>(data) {
        let _ = delivery.cheque.verify(&delivery.public_key);
    }
}

/// A GGUF model file: header, tensor table, and every tensor read back as
/// f32 (dequantized).
pub fn gguf(data: &[u8]) {
    let Ok(file) = GgufFile::from_bytes(data.to_vec(), Path::new("fuzz.gguf")) else {
        return;
    };
    for (key, _) in file.metadata.iter().take(64) {
        let _ = file.get(key);
    }
    for name in file.tensors.keys().take(16) {
        let _ = file.tensor_f32(name);
    }
}

/// One HTTP request to the devnet's JSON-RPC server (head and body as a
/// client writes them), answered in process by a fresh in-memory devnet,
/// which then makes a block (running any message the request queued).
pub fn devnet_http(data: &[u8]) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let config = DevnetConfig {
        block_interval: Duration::from_secs(1),
        clock: Clock::Manual {
            start: DEVNET_START,
        },
    };
    let Ok(devnet) = Devnet::in_memory(config) else {
        return;
    };
    let Some(wallet) = devnet_wallet() else {
        return;
    };
    if devnet
        .mint(&wallet.address(), Coins(5_000_000_000))
        .is_err()
    {
        return;
    }
    let answered = runtime.block_on(silk_chain::devnet_http::answer(&devnet, data));
    if let Ok(response) = answered {
        assert!(
            response.starts_with(b"HTTP/1.1 "),
            "the devnet answered without a status line"
        );
    }
    let _ = devnet.produce_block();
}

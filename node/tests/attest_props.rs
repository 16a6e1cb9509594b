//! Property tests for what a peer controls: attestation documents from the
//! wire and the quote bytes inside them.

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use silk_node::attest::{
    appraise_quote, verify_quote, AttestationDocument, AttestationMode, Claims, Hex, Policy,
};

/// Inside the sample collateral's window (2025-06-20T00:00:00Z).
const INSIDE_WINDOW: u64 = 1_750_377_600;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/attest")
}

fn sample() -> &'static (Vec<u8>, dcap_qvl::QuoteCollateralV3) {
    static SAMPLE: OnceLock<(Vec<u8>, dcap_qvl::QuoteCollateralV3)> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let quote = std::fs::read(fixtures().join("tdx_quote")).expect("quote");
        let c = std::fs::read(fixtures().join("tdx_quote_collateral.json")).expect("collateral");
        (quote, serde_json::from_slice(&c).expect("collateral JSON"))
    })
}

fn claims_strategy() -> impl Strategy<Value = Claims> {
    (
        any::<[u8; 32]>(),
        proptest::collection::vec("[a-z0-9.-]{1,24}", 0..8),
        "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}",
        any::<u64>(),
    )
        .prop_map(|(key, models, version, ts)| {
            Claims::new(Hex(key), models, version, ts).expect("within bounds")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = AttestationDocument::decode(&bytes);
    }

    #[test]
    fn documents_round_trip(claims in claims_strategy(), quote in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..512))) {
        let doc = AttestationDocument {
            mode: if quote.is_some() { AttestationMode::Tdx } else { AttestationMode::Insecure },
            claims,
            quote,
            collateral: None,
        };
        let bytes = doc.encode().expect("encode");
        let back = AttestationDocument::decode(&bytes).expect("decode");
        prop_assert_eq!(back.digest(), doc.digest());
        prop_assert_eq!(back, doc);
    }

    #[test]
    fn claims_encoding_is_injective_on_models(a in claims_strategy(), extra in "[a-z]{1,8}") {
        let mut models = a.models.clone();
        models.push(format!("zz-{extra}"));
        let b = Claims::new(a.peer_public_key, models, a.node_version.clone(), a.timestamp).expect("claims");
        prop_assert_ne!(a.report_data(), b.report_data());
    }
}

proptest! {
    // Each case runs a full DCAP verification; keep the count modest.
    #![proptest_config(ProptestConfig::with_cases(128))]

    // The signed or hashed parts of the sample quote: header and TD report
    // (0..632), the ECDSA signature and attestation key (636..764), the QE
    // report and its signature (770..1218) and the QE authentication data
    // (1220..1252). Length fields between them are framing, and the PEM
    // chain that follows tolerates whitespace and carries an unused copy of
    // Intel's root certificate, so flips there may legitimately be ignored.
    #[test]
    fn a_corrupted_quote_is_never_accepted(
        index in prop_oneof![0usize..632, 636usize..764, 770usize..1218, 1220usize..1252],
        bit in 0u8..8,
    ) {
        let (quote, collateral) = sample();
        let mut q = quote.clone();
        q[index] ^= 1 << bit;
        let policy = Policy { accept_any_image: true, allow_debug: true, ..Policy::default() };
        let appraisal = appraise_quote(&q, collateral, &policy, None, INSIDE_WINDOW);
        prop_assert!(!appraisal.verdict.is_accepted(), "byte {} bit {} accepted", index, bit);
        prop_assert!(appraisal.verdict.reason().is_some());
    }

    // The sample's signature data ends at byte 4936 (48-byte header, 584-byte
    // TD report, u32 length 4300, then the signature data); the 70 bytes
    // after that are zero padding that quote generation left in the buffer,
    // which a parser may ignore. Cutting into the declared data must fail.
    #[test]
    fn truncated_quotes_are_rejected_without_panic(len in 0usize..4936) {
        let (quote, collateral) = sample();
        prop_assert!(verify_quote(&quote[..len], collateral, INSIDE_WINDOW).is_err());
    }
}

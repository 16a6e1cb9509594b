//! Attestation end to end with a real TDX quote and its DCAP collateral
//! (the samples shipped in the dcap-qvl crate; see fixtures/attest/README.md).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use silk_node::attest::{
    appraise_document, appraise_quote, now_unix, verify_quote, Appraiser, AttestationDocument,
    AttestationMode, Claims, CollateralCache, CollateralKey, CollateralSource, Hex, ImagePolicy,
    PccsClient, Policy, RejectReason, ReportDataCheck, TsmReport, Verdict, VerdictCache,
};

/// 2025-06-20T00:00:00Z: inside the sample collateral's validity window
/// (TCB info and QE identity issued 2025-06-19, next update 2025-07-19).
const INSIDE_WINDOW: u64 = 1_750_377_600;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/attest")
}

fn quote() -> Vec<u8> {
    std::fs::read(fixtures().join("tdx_quote")).expect("fixture quote")
}

fn collateral() -> dcap_qvl::QuoteCollateralV3 {
    let bytes = std::fs::read(fixtures().join("tdx_quote_collateral.json")).expect("fixture");
    serde_json::from_slice(&bytes).expect("collateral JSON")
}

/// Reads a 48-byte register straight out of the quote bytes, independently
/// of dcap-qvl's parser. A v4 TDX quote is a 48-byte header followed by the
/// TD report: TEE_TCB_SVN (16), MRSEAM (48), MRSIGNERSEAM (48),
/// SEAMATTRIBUTES (8), TDATTRIBUTES (8), XFAM (8), MRTD (48), MRCONFIGID,
/// MROWNER, MROWNERCONFIG (48 each), RTMR0..3 (48 each), REPORTDATA (64).
fn raw_register(quote: &[u8], offset_in_body: usize) -> [u8; 48] {
    quote[48 + offset_in_body..48 + offset_in_body + 48]
        .try_into()
        .expect("48 bytes")
}
const MRTD_OFFSET: usize = 136;
const RTMR0_OFFSET: usize = 328;
const REPORT_DATA_OFFSET: usize = 520;
const TD_ATTRIBUTES_OFFSET: usize = 120;

/// A policy that accepts exactly the sample quote's image.
fn sample_policy() -> Policy {
    let q = quote();
    let rtmr = |i: usize| Some(Hex(raw_register(&q, RTMR0_OFFSET + 48 * i)));
    Policy {
        images: vec![ImagePolicy {
            name: "dcap-qvl sample".into(),
            mrtd: Some(Hex(raw_register(&q, MRTD_OFFSET))),
            rtmr0: rtmr(0),
            rtmr1: rtmr(1),
            rtmr2: rtmr(2),
            rtmr3: rtmr(3),
            image_hash: None,
        }],
        ..Policy::default()
    }
}

fn some_claims() -> Claims {
    Claims::new(
        Hex([42u8; 32]),
        vec!["smollm2-135m".to_string()],
        "0.1.0",
        INSIDE_WINDOW,
    )
    .expect("claims")
}

fn reason(verdict: &Verdict) -> &RejectReason {
    verdict
        .reason()
        .unwrap_or_else(|| panic!("expected a rejection, got {verdict:?}"))
}

#[test]
fn sample_quote_is_accepted_inside_the_collateral_window() {
    let q = quote();
    let verified = verify_quote(&q, &collateral(), INSIDE_WINDOW).expect("verifies");
    assert_eq!(verified.tcb_status.to_string(), "UpToDate");
    assert!(verified.advisory_ids.is_empty());
    let m = &verified.measurements;
    assert_eq!(m.mrtd.0, raw_register(&q, MRTD_OFFSET));
    assert!(m.mrtd.to_string().starts_with("91eb2b44d141d4ece09f0c75"));
    for i in 0..4 {
        assert_eq!(
            m.rtmr[i].0,
            raw_register(&q, RTMR0_OFFSET + 48 * i),
            "RTMR{i}"
        );
    }
    assert_eq!(
        &m.report_data.0[..],
        &q[48 + REPORT_DATA_OFFSET..48 + REPORT_DATA_OFFSET + 64]
    );
    assert!(!m.debug);
    // 2025-07-19T10:16:03Z, the TCB info's nextUpdate (QE identity's is later).
    assert_eq!(verified.collateral_next_update, 1_752_920_163);

    let appraisal = appraise_quote(&q, &collateral(), &sample_policy(), None, INSIDE_WINDOW);
    assert_eq!(
        appraisal.verdict,
        Verdict::Accepted,
        "{:?}",
        appraisal.verdict
    );
    assert_eq!(appraisal.report_data, ReportDataCheck::NotChecked);
    assert_eq!(appraisal.valid_until, 1_752_920_163);

    // The same image, pinned by its image hash instead of registers.
    let by_hash = Policy {
        images: vec![ImagePolicy {
            name: "hash".into(),
            mrtd: None,
            rtmr0: None,
            rtmr1: None,
            rtmr2: None,
            rtmr3: None,
            image_hash: Some(m.image_hash()),
        }],
        ..Policy::default()
    };
    let appraisal = appraise_quote(&q, &collateral(), &by_hash, None, INSIDE_WINDOW);
    assert_eq!(appraisal.verdict, Verdict::Accepted);
}

#[test]
fn flipped_bit_in_the_quote_body_is_a_signature_failure() {
    for offset in [MRTD_OFFSET + 5, RTMR0_OFFSET + 100, REPORT_DATA_OFFSET + 63] {
        let mut q = quote();
        q[48 + offset] ^= 0x01;
        let appraisal = appraise_quote(&q, &collateral(), &sample_policy(), None, INSIDE_WINDOW);
        assert!(
            matches!(
                reason(&appraisal.verdict),
                RejectReason::SignatureInvalid { .. }
            ),
            "offset {offset}: {:?}",
            appraisal.verdict
        );
        assert!(appraisal.quote.is_none());
        assert!(appraisal.verdict.to_string().contains("signature"));
    }
}

#[test]
fn wrong_report_data_for_given_claims_is_rejected() {
    let q = quote();
    let claims = some_claims();
    let appraisal = appraise_quote(
        &q,
        &collateral(),
        &sample_policy(),
        Some(&claims),
        INSIDE_WINDOW,
    );
    let expected = Hex(claims.report_data()).to_string();
    let actual = hex::encode(&q[48 + REPORT_DATA_OFFSET..48 + REPORT_DATA_OFFSET + 64]);
    assert_eq!(
        reason(&appraisal.verdict),
        &RejectReason::ReportDataMismatch { expected, actual }
    );
    assert!(matches!(
        appraisal.report_data,
        ReportDataCheck::Mismatch { .. }
    ));
    // Signature and measurements were still established.
    assert!(appraisal.quote.is_some());
}

#[test]
fn mrtd_missing_from_the_policy_is_rejected() {
    let q = quote();
    let mut policy = sample_policy();
    policy.images[0].mrtd = Some(Hex([0xab; 48]));
    let appraisal = appraise_quote(&q, &collateral(), &policy, None, INSIDE_WINDOW);
    assert_eq!(
        reason(&appraisal.verdict),
        &RejectReason::MrtdNotAccepted {
            mrtd: hex::encode(raw_register(&q, MRTD_OFFSET))
        }
    );

    let mut policy = sample_policy();
    policy.images[0].rtmr3 = Some(Hex([0x11; 48]));
    let appraisal = appraise_quote(&q, &collateral(), &policy, None, INSIDE_WINDOW);
    assert!(matches!(
        reason(&appraisal.verdict),
        RejectReason::RtmrNotAccepted { index: 3, .. }
    ));

    let appraisal = appraise_quote(&q, &collateral(), &Policy::default(), None, INSIDE_WINDOW);
    assert_eq!(reason(&appraisal.verdict), &RejectReason::NoImagesAccepted);
}

#[test]
fn debug_td_is_rejected_when_the_policy_forbids_it() {
    // The sample quote comes from a production (non-debug) TD, and a debug
    // quote cannot be forged, so the debug rule is shown on the verified
    // report of the real quote with its TUD flag set, as a debug TD's report
    // would read.
    let q = quote();
    let mut verified = verify_quote(&q, &collateral(), INSIDE_WINDOW).expect("verifies");
    verified.measurements.debug = true;
    let policy = sample_policy();
    assert_eq!(
        policy.evaluate(&verified),
        Err(RejectReason::DebugNotAllowed)
    );
    let permissive = Policy {
        allow_debug: true,
        ..sample_policy()
    };
    assert_eq!(permissive.evaluate(&verified), Ok(()));

    // And a host cannot flip the debug bit of a real quote either way.
    let mut flipped = q.clone();
    flipped[48 + TD_ATTRIBUTES_OFFSET] ^= 0x01;
    let appraisal = appraise_quote(&flipped, &collateral(), &permissive, None, INSIDE_WINDOW);
    assert!(matches!(
        reason(&appraisal.verdict),
        RejectReason::SignatureInvalid { .. }
    ));
}

#[test]
fn expired_collateral_is_rejected_today() {
    let now = now_unix();
    let appraisal = appraise_quote(&quote(), &collateral(), &sample_policy(), None, now);
    match reason(&appraisal.verdict) {
        RejectReason::CollateralExpired {
            item, next_update, ..
        } => {
            assert_eq!(item, "TCB info");
            assert_eq!(next_update.as_deref(), Some("2025-07-19T10:16:03Z"));
        }
        other => panic!("expected CollateralExpired, got {other:?}"),
    }
    assert!(appraisal.verdict.to_string().contains("collateral expired"));

    // Before the collateral was issued it is not valid either.
    let early = INSIDE_WINDOW - 10 * 24 * 3600;
    let appraisal = appraise_quote(&quote(), &collateral(), &sample_policy(), None, early);
    assert!(matches!(
        reason(&appraisal.verdict),
        RejectReason::CollateralNotYetValid { .. }
    ));
}

#[test]
fn tcb_status_outside_the_policy_is_rejected() {
    let policy = Policy {
        accepted_tcb_statuses: vec!["SWHardeningNeeded".into()],
        ..sample_policy()
    };
    let appraisal = appraise_quote(&quote(), &collateral(), &policy, None, INSIDE_WINDOW);
    assert_eq!(
        reason(&appraisal.verdict),
        &RejectReason::TcbStatusNotAccepted {
            status: "UpToDate".into(),
            accepted: vec!["SWHardeningNeeded".into()]
        }
    );
}

#[test]
fn tampered_collateral_is_rejected() {
    // A signed field changed: the TCB info signature no longer verifies.
    let mut c = collateral();
    c.tcb_info = c.tcb_info.replace("\"version\":3", "\"version\":4");
    let appraisal = appraise_quote(&quote(), &c, &sample_policy(), None, INSIDE_WINDOW);
    assert!(
        matches!(
            reason(&appraisal.verdict),
            RejectReason::SignatureInvalid { .. }
        ),
        "{:?}",
        appraisal.verdict
    );
    // A TCB status that does not exist: the TCB info does not even parse.
    let mut c = collateral();
    c.tcb_info = c.tcb_info.replace("UpToDate", "UpToDatf");
    let appraisal = appraise_quote(&quote(), &c, &sample_policy(), None, INSIDE_WINDOW);
    assert!(
        matches!(
            reason(&appraisal.verdict),
            RejectReason::CollateralInvalid { .. }
        ),
        "{:?}",
        appraisal.verdict
    );
}

#[test]
fn documents_round_trip_and_are_appraised() {
    let claims = some_claims();
    let key = claims.peer_public_key.0;

    // Outside TDX, produce() falls back to insecure mode.
    let dir = tempfile::tempdir().expect("tempdir");
    let tsm = TsmReport::new(dir.path().join("absent"));
    let doc = AttestationDocument::produce(claims.clone(), &tsm).expect("produce");
    assert_eq!(doc.mode, AttestationMode::Insecure);
    assert!(doc.quote.is_none());
    let policy = sample_policy();
    let refused = appraise_document(&doc, &key, None, &policy, false, INSIDE_WINDOW);
    assert_eq!(reason(&refused.verdict), &RejectReason::InsecureNotAllowed);
    assert!(refused
        .verdict
        .to_string()
        .contains("--allow-insecure-workers"));
    let allowed = appraise_document(&doc, &key, None, &policy, true, INSIDE_WINDOW);
    assert_eq!(allowed.verdict, Verdict::AcceptedInsecure);
    let other = appraise_document(&doc, &[1u8; 32], None, &policy, true, INSIDE_WINDOW);
    assert_eq!(reason(&other.verdict), &RejectReason::PeerKeyMismatch);

    // A tdx document carrying the real quote and collateral survives the wire
    // encoding; its quote was not made over these claims, so it is refused
    // for report_data, after the signature chain checked out.
    let tdx = AttestationDocument {
        mode: AttestationMode::Tdx,
        claims: claims.clone(),
        quote: Some(quote()),
        collateral: Some(collateral()),
    };
    let bytes = tdx.encode().expect("encode");
    let back = AttestationDocument::decode(&bytes).expect("decode");
    assert_eq!(back, tdx);
    assert_eq!(back.digest(), tdx.digest());
    assert_ne!(tdx.digest(), doc.digest());
    let json = serde_json::to_string(&tdx).expect("json");
    let from_json: AttestationDocument = serde_json::from_str(&json).expect("json back");
    assert_eq!(from_json, tdx);
    let appraisal = appraise_document(&back, &key, None, &policy, false, INSIDE_WINDOW);
    assert!(matches!(
        reason(&appraisal.verdict),
        RejectReason::ReportDataMismatch { .. }
    ));
    assert!(appraisal.quote.is_some());

    // The digest covers the quote and the claims but not the collateral.
    let mut no_collateral = tdx.clone();
    no_collateral.collateral = None;
    assert_eq!(no_collateral.digest(), tdx.digest());
    let missing = appraise_document(&no_collateral, &key, None, &policy, false, INSIDE_WINDOW);
    assert!(matches!(
        reason(&missing.verdict),
        RejectReason::MissingCollateral { .. }
    ));
    let mut flipped = tdx.clone();
    if let Some(q) = flipped.quote.as_mut() {
        q[100] ^= 1;
    }
    assert_ne!(flipped.digest(), tdx.digest());

    // Stale claims are refused before any quote work.
    let stale = appraise_document(
        &tdx,
        &key,
        None,
        &policy,
        false,
        INSIDE_WINDOW + policy.max_claims_age_secs + 1,
    );
    assert!(matches!(
        reason(&stale.verdict),
        RejectReason::ClaimsNotFresh { .. }
    ));

    // Garbage and oversized input is an error, not a panic.
    assert!(AttestationDocument::decode(&bytes[..bytes.len() / 2]).is_err());
    assert!(AttestationDocument::decode(&vec![0u8; 300 * 1024]).is_err());

    // Verdicts are cached by peer key and digest until valid_until.
    let mut cache = VerdictCache::default();
    let peer = tdx.claims.peer_public_key.0;
    cache.insert(
        (peer, tdx.digest()),
        appraisal.verdict.clone(),
        appraisal.valid_until,
        INSIDE_WINDOW,
    );
    assert_eq!(
        cache.get(&(peer, tdx.digest()), INSIDE_WINDOW),
        Some(&appraisal.verdict)
    );
    assert_eq!(
        cache.get(&(peer, tdx.digest()), appraisal.valid_until),
        None
    );
    assert_eq!(cache.get(&([0; 32], tdx.digest()), INSIDE_WINDOW), None);
}

/// A minimal PCCS on 127.0.0.1 serving the sample collateral the way a PCCS
/// does (v4 API: DER PCK CRL, JSON TCB info / QE identity with signatures,
/// hex root CA CRL, issuer chains in URL-encoded headers).
fn spawn_pccs(c: dcap_qvl::QuoteCollateralV3) -> (String, Arc<AtomicUsize>) {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
            let (header, body): (Option<(&str, String)>, Vec<u8>) =
                if path.starts_with("/sgx/certification/v4/pckcrl") {
                    (
                        Some(("SGX-PCK-CRL-Issuer-Chain", enc(&c.pck_crl_issuer_chain))),
                        c.pck_crl.clone(),
                    )
                } else if path.starts_with("/tdx/certification/v4/tcb?fmspc=") {
                    (
                        Some(("TCB-Info-Issuer-Chain", enc(&c.tcb_info_issuer_chain))),
                        format!(
                            "{{\"tcbInfo\":{},\"signature\":\"{}\"}}",
                            c.tcb_info,
                            hex::encode(&c.tcb_info_signature)
                        )
                        .into_bytes(),
                    )
                } else if path.starts_with("/tdx/certification/v4/qe/identity") {
                    (
                        Some((
                            "SGX-Enclave-Identity-Issuer-Chain",
                            enc(&c.qe_identity_issuer_chain),
                        )),
                        format!(
                            "{{\"enclaveIdentity\":{},\"signature\":\"{}\"}}",
                            c.qe_identity,
                            hex::encode(&c.qe_identity_signature)
                        )
                        .into_bytes(),
                    )
                } else if path.starts_with("/sgx/certification/v4/rootcacrl") {
                    (None, hex::encode(&c.root_ca_crl).into_bytes())
                } else {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                };
            let mut head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            if let Some((name, value)) = header {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (url, hits)
}

#[test]
fn collateral_is_fetched_from_a_pccs_cached_and_used_offline() {
    let q = quote();
    let sample = collateral();
    let key = CollateralKey::from_quote(&q).expect("key");
    assert_eq!(key.fmspc.len(), 12);
    assert!(key.ca == "processor" || key.ca == "platform", "{}", key.ca);

    let dir = tempfile::tempdir().expect("tempdir");
    let cache = CollateralCache::new(dir.path().join("collateral"));

    // Offline with an empty cache: a clear error.
    let offline = CollateralSource::offline(cache.clone());
    let err = offline.get(&q, INSIDE_WINDOW).expect_err("empty cache");
    assert!(err.to_string().contains("PCCS"), "{err}");

    let (url, hits) = spawn_pccs(sample.clone());
    let online = CollateralSource::with_pccs(cache.clone(), PccsClient::new(&url));
    let fetched = online.get(&q, INSIDE_WINDOW).expect("fetch");
    assert_eq!(fetched, sample, "fetched collateral equals the sample");
    assert_eq!(hits.load(Ordering::SeqCst), 4);

    // A second get at a time inside the window is served from the cache.
    let again = online.get(&q, INSIDE_WINDOW).expect("cached");
    assert_eq!(again, sample);
    assert_eq!(hits.load(Ordering::SeqCst), 4, "no new PCCS requests");

    // Offline verification from the cache.
    let from_cache = offline.get(&q, INSIDE_WINDOW).expect("cached offline");
    let appraisal = appraise_quote(&q, &from_cache, &sample_policy(), None, INSIDE_WINDOW);
    assert_eq!(appraisal.verdict, Verdict::Accepted);

    // A PCCS that is down: stale cached collateral is still returned, and
    // verification then says it expired.
    let down = CollateralSource::with_pccs(cache, PccsClient::new("http://127.0.0.1:9"));
    let stale = down.get(&q, now_unix()).expect("stale copy");
    let appraisal = appraise_quote(&q, &stale, &sample_policy(), None, now_unix());
    assert!(matches!(
        reason(&appraisal.verdict),
        RejectReason::CollateralExpired { .. }
    ));
}

fn silk(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_silk"))
        .args(args)
        .env_remove("SILK_PCCS_URL")
        .env_remove("SILK_DATA_DIR")
        .output()
        .expect("run silk");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_verify_prints_measurements_and_verdict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, sample_policy().to_toml().expect("toml")).expect("write");
    let quote_path = fixtures().join("tdx_quote");
    let collateral_path = fixtures().join("tdx_quote_collateral.json");
    let data_dir = dir.path().join("data");
    let base = [
        "--data-dir",
        data_dir.to_str().expect("utf8"),
        "attest",
        "verify",
        quote_path.to_str().expect("utf8"),
        "--collateral",
        collateral_path.to_str().expect("utf8"),
        "--policy",
        policy_path.to_str().expect("utf8"),
    ];

    let mut args = base.to_vec();
    args.extend(["--at", "2025-06-20T00:00:00Z"]);
    let (ok, stdout, stderr) = silk(&args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("TCB status:        UpToDate"), "{stdout}");
    assert!(
        stdout.contains("MRTD:              91eb2b44d141d4ece09f0c75"),
        "{stdout}"
    );
    assert!(stdout.contains("RTMR3:"), "{stdout}");
    assert!(
        stdout.contains("report_data check: not checked"),
        "{stdout}"
    );
    assert!(stdout.contains("verdict:           accepted"), "{stdout}");

    // With claims the quote was not made for.
    let claims_path = dir.path().join("claims.json");
    std::fs::write(
        &claims_path,
        serde_json::to_vec(&some_claims()).expect("json"),
    )
    .expect("w");
    let mut args = base.to_vec();
    args.extend([
        "--at",
        "2025-06-20T00:00:00Z",
        "--claims",
        claims_path.to_str().expect("utf8"),
    ]);
    let (ok, stdout, _) = silk(&args);
    assert!(!ok);
    assert!(stdout.contains("report_data check: MISMATCH"), "{stdout}");
    assert!(stdout.contains("REJECTED: report_data"), "{stdout}");

    // Today: the sample collateral has expired.
    let (ok, stdout, _) = silk(&base);
    assert!(!ok);
    assert!(stdout.contains("REJECTED: collateral expired"), "{stdout}");

    // JSON output carries the same verdict.
    let mut args = base.to_vec();
    args.extend(["--at", "2025-06-20T00:00:00Z", "--json"]);
    let (ok, stdout, _) = silk(&args);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(v["verdict"]["verdict"], "accepted");
    assert_eq!(v["quote"]["tcb_status"], "UpToDate");

    // No collateral file and nothing cached: says what to do.
    let (ok, _, stderr) = silk(&[
        "--data-dir",
        data_dir.to_str().expect("utf8"),
        "attest",
        "verify",
        quote_path.to_str().expect("utf8"),
    ]);
    assert!(!ok);
    assert!(stderr.contains("no PCCS configured"), "{stderr}");
}

#[test]
fn cli_show_reports_missing_identity_then_claims_and_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let d = data_dir.to_str().expect("utf8");
    let (ok, _, stderr) = silk(&["--data-dir", d, "attest", "show"]);
    assert!(!ok);
    assert!(stderr.contains("No node identity yet"), "{stderr}");
    assert!(stderr.contains("identity.key"), "{stderr}");

    let claims_path = dir.path().join("claims.json");
    let (ok, stdout, stderr) = silk(&[
        "--data-dir",
        d,
        "attest",
        "show",
        "--create-identity",
        "--model",
        "smollm2-135m",
        "--claims-out",
        claims_path.to_str().expect("utf8"),
    ]);
    assert!(ok, "{stderr}");
    let expected_mode = if TsmReport::default().is_available() {
        "tdx"
    } else {
        "insecure"
    };
    assert!(
        stdout.contains(&format!("attestation mode: {expected_mode}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("models:           smollm2-135m"),
        "{stdout}"
    );
    let claims: Claims =
        serde_json::from_slice(&std::fs::read(&claims_path).expect("claims")).expect("json");
    assert!(stdout.contains(&claims.peer_public_key.to_string()));
    assert!(stdout.contains(&Hex(claims.report_data()).to_string()));

    // The key is stable across runs.
    let (ok, stdout2, _) = silk(&["--data-dir", d, "attest", "show", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stdout2).expect("json");
    assert_eq!(
        v["claims"]["peer_public_key"],
        claims.peer_public_key.to_string()
    );
}

#[test]
fn appraiser_caches_verdicts_and_prefers_its_own_collateral() {
    let claims = some_claims();
    let key = claims.peer_public_key.0;
    let insecure = AttestationDocument::insecure(claims.clone());

    let mut strict = Appraiser::new(sample_policy(), false);
    assert_eq!(strict.cached(&key, &insecure.digest(), INSIDE_WINDOW), None);
    let v = strict.appraise(&insecure, &key, INSIDE_WINDOW);
    assert_eq!(v.reason(), Some(&RejectReason::InsecureNotAllowed));
    assert_eq!(
        strict.cached(&key, &insecure.digest(), INSIDE_WINDOW),
        Some(v)
    );

    // A document that is not the announced one is refused outright.
    let v = strict.appraise_announced(&insecure, &key, &Hex([0; 32]), INSIDE_WINDOW);
    assert!(
        matches!(v.reason(), Some(RejectReason::DigestMismatch { .. })),
        "{v:?}"
    );

    let mut testnet = Appraiser::new(Policy::default(), true);
    assert_eq!(
        testnet.appraise_announced(&insecure, &key, &insecure.digest(), INSIDE_WINDOW),
        Verdict::AcceptedInsecure
    );
    assert_eq!(
        testnet.appraise(&insecure, &key, INSIDE_WINDOW),
        Verdict::AcceptedInsecure
    );

    // A tdx document without collateral: the appraiser's own cache supplies
    // it, so verification gets as far as the report_data binding.
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = CollateralCache::new(dir.path());
    let key_c = CollateralKey::from_quote(&quote()).expect("key");
    cache.store(&key_c, &collateral()).expect("store");
    let doc = AttestationDocument {
        mode: AttestationMode::Tdx,
        claims,
        quote: Some(quote()),
        collateral: None,
    };
    let mut with_source = Appraiser::new(sample_policy(), false)
        .with_collateral_source(CollateralSource::offline(cache));
    let v = with_source.appraise(&doc, &key, INSIDE_WINDOW);
    assert!(
        matches!(v.reason(), Some(RejectReason::ReportDataMismatch { .. })),
        "{v:?}"
    );
    let mut without = Appraiser::new(sample_policy(), false);
    let v = without.appraise(&doc, &key, INSIDE_WINDOW);
    assert!(
        matches!(v.reason(), Some(RejectReason::MissingCollateral { .. })),
        "{v:?}"
    );
}

/// Audit F1: a digest is public (workers gossip it), so a verdict must only
/// answer for the peer whose document was appraised. Before the fix the
/// cache was keyed by digest alone: `cached(digest)` answered `Accepted` to
/// an attacker announcing an honest worker's digest, and the attacker's
/// key-mismatch rejection was stored under the honest worker's digest.
#[test]
fn a_verdict_answers_only_for_the_peer_whose_document_was_appraised() {
    let claims = some_claims();
    let honest = claims.peer_public_key.0;
    let attacker = [7u8; 32];
    let doc = AttestationDocument::insecure(claims);
    let digest = doc.digest();
    let mut gateway = Appraiser::new(Policy::default(), true);

    assert_eq!(
        gateway.appraise_announced(&doc, &honest, &digest, INSIDE_WINDOW),
        Verdict::AcceptedInsecure
    );
    assert_eq!(
        gateway.cached(&honest, &digest, INSIDE_WINDOW),
        Some(Verdict::AcceptedInsecure)
    );
    // The attacker announces the honest worker's digest: nothing cached
    // answers for it, so the gateway must fetch and appraise its document.
    assert_eq!(gateway.cached(&attacker, &digest, INSIDE_WINDOW), None);
    // It relays the honest worker's document: refused for the key...
    let v = gateway.appraise_announced(&doc, &attacker, &digest, INSIDE_WINDOW);
    assert_eq!(v.reason(), Some(&RejectReason::PeerKeyMismatch));
    assert_eq!(
        gateway
            .cached(&attacker, &digest, INSIDE_WINDOW)
            .as_ref()
            .and_then(Verdict::reason),
        Some(&RejectReason::PeerKeyMismatch)
    );
    // ...and that rejection does not poison the honest worker's verdict.
    assert_eq!(
        gateway.cached(&honest, &digest, INSIDE_WINDOW),
        Some(Verdict::AcceptedInsecure)
    );
    assert_eq!(
        gateway.appraise(&doc, &honest, INSIDE_WINDOW),
        Verdict::AcceptedInsecure
    );
}

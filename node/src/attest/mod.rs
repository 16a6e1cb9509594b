//! Attestation: proving that a worker runs inside an Intel TDX trust domain
//! with an expected image, bound to the libp2p key that ends its encrypted
//! channels.
//!
//! # Layout
//!
//! - [`claims`]: what a node asserts ([`Claims`]: libp2p public key, models,
//!   version, timestamp), its canonical encoding, and `report_data` =
//!   SHA-512 of it.
//! - [`quote`]: quote generation on a TDX guest via configfs-tsm
//!   ([`TsmReport`]); its absence means `insecure` mode.
//! - [`verify`]: DCAP verification of a quote at a given time with
//!   `dcap-qvl` ([`verify_quote`]), the measured registers
//!   ([`Measurements`]), and the [`Verdict`] / [`RejectReason`] types.
//! - [`policy`]: the TOML [`Policy`] (accepted images, TCB statuses, debug).
//! - [`collateral`]: DCAP collateral from a PCCS with an on-disk cache
//!   ([`CollateralSource`]).
//! - [`cache`]: verdicts per attestation digest until they expire
//!   ([`VerdictCache`]).
//! - [`appraiser`]: the gateway side in one struct ([`Appraiser`]: policy,
//!   insecure opt-in, collateral source, verdict cache).
//! - [`identity`]: the node's ed25519 identity key file.
//!
//! # Data flow
//!
//! A worker builds [`Claims`] from its identity key and served models, calls
//! [`AttestationDocument::produce`] (a TDX quote over the claims, or an
//! `insecure` document outside TDX) and attaches collateral from its
//! [`CollateralSource`]. It gossips [`AttestationDocument::digest`] and
//! [`AttestationDocument::mode`] in its announcements and serves the document
//! on `/silk/attest/1.0.0` ([`AttestationDocument::encode`] /
//! [`AttestationDocument::decode`]), refreshing it every
//! [`QUOTE_REFRESH_INTERVAL`]. A gateway that sees an unknown digest fetches
//! the document, calls [`appraise_document`] with the peer's key, its policy
//! and the current time, and stores the verdict in a [`VerdictCache`] until
//! [`Appraisal::valid_until`]; [`Appraiser`] does those steps in one call.

pub mod appraiser;
pub mod cache;
pub mod claims;
pub mod collateral;
pub mod hex;
pub mod identity;
pub mod policy;
pub mod quote;
pub mod verify;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dcap_qvl::QuoteCollateralV3;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tracing::warn;

pub use appraiser::{AppraisalJob, Appraiser, JobOutcome};
pub use cache::{VerdictCache, VerdictKey};
pub use claims::Claims;
pub use collateral::{CollateralCache, CollateralKey, CollateralSource, PccsClient};
pub use hex::Hex;
pub use identity::NodeIdentity;
pub use policy::{ImagePolicy, Policy};
pub use quote::TsmReport;
pub use verify::{verify_quote, Measurements, RejectReason, Verdict, VerifiedQuote};

/// The request-response protocol that serves attestation documents.
pub const ATTEST_PROTOCOL: &str = "/silk/attest/1.0.0";

/// How often a worker should make a new quote (and so a new digest).
pub const QUOTE_REFRESH_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// How long a rejection is remembered before the document is appraised
/// again (collateral may have been refreshed meanwhile).
pub const REJECTION_TTL_SECS: u64 = 10 * 60;

/// Largest encoded attestation document accepted from a peer.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// The node version put into [`Claims`].
pub const NODE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// SHA-256 digest of an attestation document.
pub type Digest = Hex<32>;

/// Everything that can go wrong in the attestation module (as opposed to a
/// quote being refused, which is a [`Verdict`]).
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// configfs-tsm is absent: not a TDX guest.
    #[error("no TDX quote interface at {path}: this is not a TDX guest (or configfs is not mounted), so the node runs in insecure attestation mode")]
    TsmUnavailable {
        /// The directory that was looked for.
        path: PathBuf,
    },
    /// A configfs-tsm file operation failed.
    #[error("configfs-tsm: cannot {action} at {path}: {source}")]
    Tsm {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// configfs-tsm is backed by another TEE than TDX.
    #[error("configfs-tsm provider is {provider:?}, not tdx_guest: only Intel TDX is supported")]
    UnsupportedTsmProvider {
        /// The provider the kernel reported.
        provider: String,
    },
    /// Another process wrote to our report entry.
    #[error("configfs-tsm report entry was written concurrently (generation {generation}); retry")]
    TsmRace {
        /// The generation counter read back.
        generation: u64,
    },
    /// Claims break a size or ordering rule.
    #[error("invalid claims: {0}")]
    InvalidClaims(String),
    /// A hex string has the wrong length or characters.
    #[error("invalid hex (expected {expected_bytes} bytes): {detail}")]
    InvalidHex {
        /// Expected length in bytes.
        expected_bytes: usize,
        /// What is wrong.
        detail: String,
    },
    /// The policy file is malformed.
    #[error("invalid attestation policy: {0}")]
    InvalidPolicy(String),
    /// A file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The node has no identity key yet.
    #[error(
        "no node identity yet: {path} does not exist (it is created when the node first starts)"
    )]
    IdentityMissing {
        /// Where it was expected.
        path: PathBuf,
    },
    /// In TDX mode a key file existed before the node started: the host
    /// could have put it there, or could read it (audit F9).
    #[error(
        "{path} exists, but in TDX mode the identity key is made inside the trust domain at each \
         start and never stored on the data disk, where the host could have placed or read it; \
         remove the file (this node will get a new peer id)"
    )]
    PreexistingIdentity {
        /// The refused file.
        path: PathBuf,
    },
    /// The identity key file has the wrong size.
    #[error(
        "{path} is not an identity key: expected a 32-byte raw ed25519 secret, found {len} bytes"
    )]
    InvalidIdentity {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The quote cannot be parsed.
    #[error("invalid quote: {0}")]
    InvalidQuote(String),
    /// The collateral cannot be parsed.
    #[error("invalid collateral: {0}")]
    InvalidCollateral(String),
    /// A PCCS request failed.
    #[error("PCCS request to {url} failed: {detail} (check the PCCS URL, or verify offline with cached collateral)")]
    Pccs {
        /// The URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// No collateral in the cache and no PCCS configured.
    #[error("no collateral for FMSPC {fmspc} in {cache} and no PCCS configured: pass a PCCS URL or a collateral file")]
    NoCollateral {
        /// The platform's FMSPC.
        fmspc: String,
        /// The cache directory.
        cache: PathBuf,
    },
    /// A peer's document does not decode.
    #[error("attestation document does not decode: {0}")]
    Decode(String),
    /// A peer's document is too large.
    #[error("attestation document of {len} bytes exceeds the {MAX_DOCUMENT_BYTES}-byte limit")]
    DocumentTooLarge {
        /// Its size.
        len: usize,
    },
}

/// Whether a node's attestation is backed by TDX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttestationMode {
    /// A TDX quote binds the node's key.
    Tdx,
    /// No hardware attestation: the operator can read prompts.
    Insecure,
}

impl AttestationMode {
    /// `"tdx"` or `"insecure"`, as used in the `x-silk-attestation` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tdx => "tdx",
            Self::Insecure => "insecure",
        }
    }
}

impl fmt::Display for AttestationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a worker serves on [`ATTEST_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationDocument {
    /// `tdx` or `insecure`.
    pub mode: AttestationMode,
    /// The claims; in `tdx` mode the quote's report_data is their SHA-512.
    pub claims: Claims,
    /// The raw TDX quote (`tdx` mode only).
    #[serde(default, with = "opt_bytes")]
    pub quote: Option<Vec<u8>>,
    /// DCAP collateral for the quote, so verifiers without a PCCS can check
    /// it; it is signed by Intel, so a verifier need not trust the worker for
    /// it. Not covered by the digest (it is refreshed independently).
    #[serde(default, with = "opt_collateral")]
    pub collateral: Option<QuoteCollateralV3>,
}

impl AttestationDocument {
    /// An `insecure` document: claims without a quote.
    pub fn insecure(claims: Claims) -> Self {
        Self {
            mode: AttestationMode::Insecure,
            claims,
            quote: None,
            collateral: None,
        }
    }

    /// Makes a document for `claims`: a TDX quote over them when configfs-tsm
    /// is present, otherwise an `insecure` document (with a warning in the
    /// log). Other quote failures on a TDX guest are errors: a TDX machine
    /// must not silently fall back to insecure mode.
    pub fn produce(claims: Claims, tsm: &TsmReport) -> Result<Self, AttestError> {
        match tsm.generate(&claims.report_data()) {
            Ok(quote) => Ok(Self {
                mode: AttestationMode::Tdx,
                claims,
                quote: Some(quote),
                collateral: None,
            }),
            Err(e @ AttestError::TsmUnavailable { .. }) => {
                warn!("{e}");
                Ok(Self::insecure(claims))
            }
            Err(e) => Err(e),
        }
    }

    /// Attaches collateral for the document's quote from `source` (cache
    /// first, then its PCCS), so verifiers without a PCCS can check it.
    /// Does nothing for an `insecure` document. Blocking: call it from
    /// `tokio::task::spawn_blocking` in async code.
    pub fn attach_collateral(
        &mut self,
        source: &CollateralSource,
        at: u64,
    ) -> Result<(), AttestError> {
        if let Some(quote) = &self.quote {
            self.collateral = Some(source.get(quote, at)?);
        }
        Ok(())
    }

    /// The digest gossiped in announcements: SHA-256 over
    /// `b"silk/attest/document/v1\0"`, the mode (1 byte: 1 = tdx,
    /// 0 = insecure), the canonical claims with a u32 big-endian length, and
    /// the quote with a u32 big-endian length (0 when absent).
    pub fn digest(&self) -> Digest {
        let mut h = sha2::Sha256::new();
        h.update(b"silk/attest/document/v1\0");
        h.update([u8::from(self.mode == AttestationMode::Tdx)]);
        let claims = self.claims.canonical_bytes();
        h.update(
            u32::try_from(claims.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        h.update(&claims);
        let quote = self.quote.as_deref().unwrap_or_default();
        h.update(u32::try_from(quote.len()).unwrap_or(u32::MAX).to_be_bytes());
        h.update(quote);
        Hex(h.finalize().into())
    }

    /// Encodes the document for the wire (postcard).
    pub fn encode(&self) -> Result<Vec<u8>, AttestError> {
        let bytes = postcard::to_stdvec(self).map_err(|e| AttestError::Decode(e.to_string()))?;
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(AttestError::DocumentTooLarge { len: bytes.len() });
        }
        Ok(bytes)
    }

    /// Decodes a document received from a peer, refusing oversized input.
    pub fn decode(bytes: &[u8]) -> Result<Self, AttestError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(AttestError::DocumentTooLarge { len: bytes.len() });
        }
        postcard::from_bytes(bytes).map_err(|e| AttestError::Decode(e.to_string()))
    }
}

/// Outcome of comparing a quote's report_data with claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "check", rename_all = "snake_case")]
pub enum ReportDataCheck {
    /// No claims were given.
    NotChecked,
    /// report_data is the SHA-512 of the claims.
    Match,
    /// It is not.
    Mismatch {
        /// SHA-512 of the claims.
        expected: Hex<64>,
        /// report_data in the quote.
        actual: Hex<64>,
    },
}

/// Compares the quote's report_data with SHA-512 of `claims`.
pub fn check_report_data(measurements: &Measurements, claims: &Claims) -> ReportDataCheck {
    let expected = Hex(claims.report_data());
    if expected == measurements.report_data {
        ReportDataCheck::Match
    } else {
        ReportDataCheck::Mismatch {
            expected,
            actual: measurements.report_data,
        }
    }
}

/// Everything learned while appraising a quote or document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appraisal {
    /// The attestation mode the peer claims.
    pub mode: AttestationMode,
    /// The verified quote, when signature and collateral checks passed.
    pub quote: Option<VerifiedQuote>,
    /// The report_data check.
    pub report_data: ReportDataCheck,
    /// The verdict.
    pub verdict: Verdict,
    /// Until when (Unix seconds) the verdict may be cached.
    pub valid_until: u64,
}

/// Appraises a raw quote: DCAP verification at `at` (Unix seconds), then the
/// report_data check against `claims` (if given), then the policy (TCB
/// status, debug, measurements). The verdict names the first failing check;
/// the other fields show everything that could be established.
pub fn appraise_quote(
    quote: &[u8],
    collateral: &QuoteCollateralV3,
    policy: &Policy,
    claims: Option<&Claims>,
    at: u64,
) -> Appraisal {
    let rejected = |reason: RejectReason, quote, report_data| Appraisal {
        mode: AttestationMode::Tdx,
        quote,
        report_data,
        verdict: reason.into(),
        valid_until: at.saturating_add(REJECTION_TTL_SECS),
    };
    let verified = match verify_quote(quote, collateral, at) {
        Ok(v) => v,
        Err(reason) => return rejected(reason, None, ReportDataCheck::NotChecked),
    };
    let report_data = match claims {
        Some(c) => check_report_data(&verified.measurements, c),
        None => ReportDataCheck::NotChecked,
    };
    if let ReportDataCheck::Mismatch { expected, actual } = &report_data {
        let reason = RejectReason::ReportDataMismatch {
            expected: expected.to_string(),
            actual: actual.to_string(),
        };
        return rejected(reason, Some(verified), report_data);
    }
    if let Err(reason) = policy.evaluate(&verified) {
        return rejected(reason, Some(verified), report_data);
    }
    let mut valid_until = verified.collateral_next_update;
    if let Some(c) = claims {
        valid_until = valid_until.min(c.timestamp.saturating_add(policy.max_claims_age_secs));
    }
    Appraisal {
        mode: AttestationMode::Tdx,
        quote: Some(verified),
        report_data,
        verdict: Verdict::Accepted,
        valid_until,
    }
}

/// Appraises a peer's attestation document.
///
/// `peer_public_key` is the raw ed25519 key of the peer the document came
/// from (its libp2p identity); `collateral` is the verifier's own (e.g. from
/// a [`CollateralSource`]) and takes precedence over the document's;
/// `allow_insecure` is the gateway's `--allow-insecure-workers`.
pub fn appraise_document(
    doc: &AttestationDocument,
    peer_public_key: &[u8; 32],
    collateral: Option<&QuoteCollateralV3>,
    policy: &Policy,
    allow_insecure: bool,
    at: u64,
) -> Appraisal {
    let rejected = |reason: RejectReason| Appraisal {
        mode: doc.mode,
        quote: None,
        report_data: ReportDataCheck::NotChecked,
        verdict: reason.into(),
        valid_until: at.saturating_add(REJECTION_TTL_SECS),
    };
    if let Err(e) = doc.claims.check_bounds() {
        return rejected(RejectReason::InvalidClaims {
            detail: e.to_string(),
        });
    }
    if doc.claims.peer_public_key.0 != *peer_public_key {
        return rejected(RejectReason::PeerKeyMismatch);
    }
    match doc.mode {
        AttestationMode::Insecure => {
            if !allow_insecure {
                return rejected(RejectReason::InsecureNotAllowed);
            }
            Appraisal {
                mode: AttestationMode::Insecure,
                quote: None,
                report_data: ReportDataCheck::NotChecked,
                verdict: Verdict::AcceptedInsecure,
                valid_until: at.saturating_add(QUOTE_REFRESH_INTERVAL.as_secs()),
            }
        }
        AttestationMode::Tdx => {
            let Some(quote) = doc.quote.as_deref() else {
                return rejected(RejectReason::MissingQuote);
            };
            let Some(collateral) = collateral.or(doc.collateral.as_ref()) else {
                return rejected(RejectReason::MissingCollateral {
                    detail: "the document carries none and the verifier has none cached".into(),
                });
            };
            if let Err(reason) = policy.check_claims_age(doc.claims.timestamp, at) {
                return rejected(reason);
            }
            appraise_quote(quote, collateral, policy, Some(&doc.claims), at)
        }
    }
}

/// The current time in Unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serde for `Option<Vec<u8>>` via [`hex::hex_bytes`].
mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Wrap(#[serde(with = "super::hex::hex_bytes")] Vec<u8>);

    pub(super) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref().map(|b| Wrap(b.clone())).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

/// Serde for `Option<QuoteCollateralV3>` that works in non-self-describing
/// formats: dcap-qvl's own derive skips `pck_certificate_chain` when absent,
/// which postcard cannot read back, so this mirror always writes it.
mod opt_collateral {
    use dcap_qvl::QuoteCollateralV3;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Mirror {
        pck_crl_issuer_chain: String,
        #[serde(with = "super::hex::hex_bytes")]
        root_ca_crl: Vec<u8>,
        #[serde(with = "super::hex::hex_bytes")]
        pck_crl: Vec<u8>,
        tcb_info_issuer_chain: String,
        tcb_info: String,
        #[serde(with = "super::hex::hex_bytes")]
        tcb_info_signature: Vec<u8>,
        qe_identity_issuer_chain: String,
        qe_identity: String,
        #[serde(with = "super::hex::hex_bytes")]
        qe_identity_signature: Vec<u8>,
        pck_certificate_chain: Option<String>,
    }

    pub(super) fn serialize<S: Serializer>(
        v: &Option<QuoteCollateralV3>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.as_ref()
            .map(|c| Mirror {
                pck_crl_issuer_chain: c.pck_crl_issuer_chain.clone(),
                root_ca_crl: c.root_ca_crl.clone(),
                pck_crl: c.pck_crl.clone(),
                tcb_info_issuer_chain: c.tcb_info_issuer_chain.clone(),
                tcb_info: c.tcb_info.clone(),
                tcb_info_signature: c.tcb_info_signature.clone(),
                qe_identity_issuer_chain: c.qe_identity_issuer_chain.clone(),
                qe_identity: c.qe_identity.clone(),
                qe_identity_signature: c.qe_identity_signature.clone(),
                pck_certificate_chain: c.pck_certificate_chain.clone(),
            })
            .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<QuoteCollateralV3>, D::Error> {
        Ok(
            Option::<Mirror>::deserialize(d)?.map(|m| QuoteCollateralV3 {
                pck_crl_issuer_chain: m.pck_crl_issuer_chain,
                root_ca_crl: m.root_ca_crl,
                pck_crl: m.pck_crl,
                tcb_info_issuer_chain: m.tcb_info_issuer_chain,
                tcb_info: m.tcb_info,
                tcb_info_signature: m.tcb_info_signature,
                qe_identity_issuer_chain: m.qe_identity_issuer_chain,
                qe_identity: m.qe_identity,
                qe_identity_signature: m.qe_identity_signature,
                pck_certificate_chain: m.pck_certificate_chain,
            }),
        )
    }
}

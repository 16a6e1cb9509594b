//! Cryptographic verification of a TDX quote with DCAP collateral
//! (`dcap-qvl`, pure Rust, RustCrypto backend, Intel's production root CA),
//! and the verdict types the rest of the node sees.
//!
//! [`verify_quote`] checks, at a given time, the collateral's validity
//! window, the PCK certificate chain and CRLs up to Intel's root, the TCB
//! info and QE identity signatures, the QE report, and the quote's own
//! signature over header and TD report; it then reads the TCB status and the
//! measured registers out. It does not judge measurements or TCB status:
//! that is the [`Policy`](super::Policy)'s job, so one verification can be
//! evaluated against several policies and the CLI can print what it saw.

use std::fmt;

use chrono::{DateTime, Utc};
use dcap_qvl::quote::Report;
use dcap_qvl::verify::QuoteVerifier;
use dcap_qvl::{QuoteCollateralV3, TcbStatus};
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::hex::Hex;

/// A 48-byte TDX measurement register (SHA-384 sized).
pub type Register = Hex<48>;

/// The registers and attributes of a TD report that a policy looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurements {
    /// MRTD: the initial contents of the trust domain (the virtual firmware,
    /// TDVF/OVMF) as measured by the TDX module at build time.
    pub mrtd: Register,
    /// RTMR0..RTMR3, the run-time extendable registers (see docs/OPERATOR.md
    /// for what each one measures).
    pub rtmr: [Register; 4],
    /// MRCONFIGID: 48 bytes the host set at TD creation (often zero).
    pub mr_config_id: Register,
    /// MROWNER: the TD owner's identity set at TD creation (often zero).
    pub mr_owner: Register,
    /// MROWNERCONFIG: owner-defined configuration set at TD creation.
    pub mr_owner_config: Register,
    /// MRSEAM: the measurement of the TDX module.
    pub mr_seam: Register,
    /// TDATTRIBUTES, little-endian as in the report.
    pub td_attributes: Hex<8>,
    /// XFAM: the extended features the TD may use.
    pub xfam: Hex<8>,
    /// TEE_TCB_SVN of the TDX module.
    pub tee_tcb_svn: Hex<16>,
    /// The 64 bytes of report data the guest asked the TDX module to sign.
    pub report_data: Hex<64>,
    /// Whether the TD is debuggable (any bit of the TUD byte of TDATTRIBUTES:
    /// DEBUG or performance profiling), which lets the host read its memory.
    pub debug: bool,
}

impl Measurements {
    fn from_report(report: &Report) -> Option<Self> {
        let td = report.as_td10()?;
        Some(Self {
            mrtd: Hex(td.mr_td),
            rtmr: [
                Hex(td.rt_mr0),
                Hex(td.rt_mr1),
                Hex(td.rt_mr2),
                Hex(td.rt_mr3),
            ],
            mr_config_id: Hex(td.mr_config_id),
            mr_owner: Hex(td.mr_owner),
            mr_owner_config: Hex(td.mr_owner_config),
            mr_seam: Hex(td.mr_seam),
            td_attributes: Hex(td.td_attributes),
            xfam: Hex(td.xfam),
            tee_tcb_svn: Hex(td.tee_tcb_svn),
            report_data: Hex(td.report_data),
            debug: td.td_attributes[0] != 0,
        })
    }

    /// The image hash: SHA-384 over MRTD ‖ RTMR0 ‖ RTMR1 ‖ RTMR2 ‖ RTMR3 ‖
    /// MRCONFIGID ‖ MROWNER ‖ MROWNERCONFIG (8 × 48 bytes). One value that
    /// pins the firmware, the boot chain, the kernel command line, the
    /// application measurements and the host-set configuration together.
    pub fn image_hash(&self) -> Register {
        use sha2::{Digest, Sha384};
        let mut h = Sha384::new();
        h.update(self.mrtd.0);
        for r in &self.rtmr {
            h.update(r.0);
        }
        h.update(self.mr_config_id.0);
        h.update(self.mr_owner.0);
        h.update(self.mr_owner_config.0);
        Hex(h.finalize().into())
    }
}

/// What [`verify_quote`] established about a quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedQuote {
    /// The measured registers.
    pub measurements: Measurements,
    /// Intel's TCB status for the platform and QE, merged (`UpToDate`,
    /// `SWHardeningNeeded`, `OutOfDate`, ...).
    pub tcb_status: TcbStatus,
    /// Intel security advisories that apply (`INTEL-SA-xxxxx`).
    pub advisory_ids: Vec<String>,
    /// The earliest `nextUpdate` of the TCB info and QE identity: after this
    /// instant the collateral is stale and the verdict must be redone with
    /// fresh collateral (seconds since the Unix epoch).
    pub collateral_next_update: u64,
}

/// Why an attestation was refused. Each variant names one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum RejectReason {
    /// The peer runs in `insecure` mode and this verifier does not accept
    /// insecure workers.
    InsecureNotAllowed,
    /// The document claims `tdx` but carries no quote.
    MissingQuote,
    /// No collateral was supplied and none could be fetched or read from the
    /// cache.
    MissingCollateral {
        /// Why it could not be had.
        detail: String,
    },
    /// The quote bytes do not parse as a TDX quote.
    MalformedQuote {
        /// The parser's message.
        detail: String,
    },
    /// The quote is an SGX quote, not a TDX one.
    NotTdx,
    /// The collateral's TCB info or QE identity expired before the
    /// verification time.
    CollateralExpired {
        /// Which part (`TCB info`, `QE identity`, `CRL or certificate`).
        item: String,
        /// Its `nextUpdate`, RFC 3339, when known.
        next_update: Option<String>,
        /// The verification time, RFC 3339.
        at: String,
    },
    /// The collateral was issued after the verification time.
    CollateralNotYetValid {
        /// Which part.
        item: String,
        /// Its `issueDate`, RFC 3339.
        issue_date: String,
        /// The verification time, RFC 3339.
        at: String,
    },
    /// A signature or certificate chain did not verify: the quote or the
    /// collateral was altered, or was not produced by genuine Intel TDX.
    SignatureInvalid {
        /// The verifier's message.
        detail: String,
    },
    /// The collateral is malformed or does not belong to this quote.
    CollateralInvalid {
        /// The verifier's message.
        detail: String,
    },
    /// The platform's TCB is revoked.
    TcbRevoked,
    /// The TCB status is not in the policy's accepted list.
    TcbStatusNotAccepted {
        /// The status Intel's collateral gives this platform.
        status: String,
        /// The statuses the policy accepts.
        accepted: Vec<String>,
    },
    /// The TD is debuggable and the policy forbids debug TDs.
    DebugNotAllowed,
    /// The MRTD is not in any of the policy's accepted images.
    MrtdNotAccepted {
        /// The MRTD from the quote, hex.
        mrtd: String,
    },
    /// An image with this MRTD is in the policy, but an RTMR differs.
    RtmrNotAccepted {
        /// Which RTMR (0..=3).
        index: usize,
        /// Its value from the quote, hex.
        value: String,
    },
    /// The policy lists no accepted images.
    NoImagesAccepted,
    /// The report_data in the quote is not the SHA-512 of the claims.
    ReportDataMismatch {
        /// SHA-512 of the claims, hex.
        expected: String,
        /// report_data from the quote, hex.
        actual: String,
    },
    /// The claims name another libp2p key than the peer we talk to.
    PeerKeyMismatch,
    /// The fetched document's digest is not the one the peer announced.
    DigestMismatch {
        /// The digest from the announcement, hex.
        announced: String,
        /// The digest of the fetched document, hex.
        actual: String,
    },
    /// The claims are older than the policy allows or from the future.
    ClaimsNotFresh {
        /// Claims timestamp (Unix seconds).
        timestamp: u64,
        /// Verification time (Unix seconds).
        at: u64,
    },
    /// The claims break a size or ordering rule.
    InvalidClaims {
        /// What is wrong.
        detail: String,
    },
    /// Verification failed for a reason not listed above.
    VerificationFailed {
        /// The verifier's message.
        detail: String,
    },
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InsecureNotAllowed => write!(
                f,
                "the worker runs in insecure mode (no TDX quote) and insecure workers are not allowed (start the gateway with --allow-insecure-workers to accept them)"
            ),
            Self::MissingQuote => write!(f, "the document claims tdx mode but has no quote"),
            Self::MissingCollateral { detail } => write!(f, "no DCAP collateral: {detail}"),
            Self::MalformedQuote { detail } => write!(f, "the quote does not parse: {detail}"),
            Self::NotTdx => write!(f, "the quote is not a TDX quote"),
            Self::CollateralExpired {
                item,
                next_update,
                at,
            } => match next_update {
                Some(n) => write!(
                    f,
                    "collateral expired: the {item} was valid until {n}, verification time is {at}; fetch fresh collateral"
                ),
                None => write!(
                    f,
                    "collateral expired: a {item} is not valid at {at}; fetch fresh collateral"
                ),
            },
            Self::CollateralNotYetValid {
                item,
                issue_date,
                at,
            } => write!(
                f,
                "collateral not yet valid: the {item} was issued {issue_date}, after the verification time {at}"
            ),
            Self::SignatureInvalid { detail } => {
                write!(f, "signature check failed (quote or collateral altered): {detail}")
            }
            Self::CollateralInvalid { detail } => write!(f, "collateral invalid: {detail}"),
            Self::TcbRevoked => write!(f, "the platform's TCB is revoked"),
            Self::TcbStatusNotAccepted { status, accepted } => write!(
                f,
                "TCB status {status} is not accepted by the policy (accepted: {})",
                accepted.join(", ")
            ),
            Self::DebugNotAllowed => write!(
                f,
                "the TD is debuggable (the host can read its memory) and the policy forbids debug TDs"
            ),
            Self::MrtdNotAccepted { mrtd } => {
                write!(f, "MRTD {mrtd} is not in the policy's accepted images")
            }
            Self::RtmrNotAccepted { index, value } => write!(
                f,
                "RTMR{index} {value} does not match the policy's image with this MRTD"
            ),
            Self::NoImagesAccepted => write!(
                f,
                "the policy lists no accepted images (add [[image]] entries, or set accept_any_image = true)"
            ),
            Self::ReportDataMismatch { expected, actual } => write!(
                f,
                "report_data {actual} is not the SHA-512 of the claims ({expected}): the quote was not made for these claims"
            ),
            Self::PeerKeyMismatch => write!(
                f,
                "the claims are bound to another libp2p key than the peer's"
            ),
            Self::DigestMismatch { announced, actual } => write!(
                f,
                "the attestation document's digest {actual} is not the announced {announced}"
            ),
            Self::ClaimsNotFresh { timestamp, at } => write!(
                f,
                "the claims timestamp {timestamp} is too old or in the future for verification time {at}"
            ),
            Self::InvalidClaims { detail } => write!(f, "invalid claims: {detail}"),
            Self::VerificationFailed { detail } => write!(f, "quote verification failed: {detail}"),
        }
    }
}

/// The outcome of appraising an attestation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// A genuine TDX quote, accepted by the policy, bound to the claims.
    Accepted,
    /// The peer runs in insecure mode and the verifier opted in to accept it.
    AcceptedInsecure,
    /// Refused, with the reason.
    Rejected {
        /// Why.
        #[serde(flatten)]
        reason: RejectReason,
    },
}

impl Verdict {
    /// Whether the peer may be used.
    pub fn is_accepted(&self) -> bool {
        !matches!(self, Self::Rejected { .. })
    }

    /// The rejection reason, if any.
    pub fn reason(&self) -> Option<&RejectReason> {
        match self {
            Self::Rejected { reason } => Some(reason),
            _ => None,
        }
    }
}

impl From<RejectReason> for Verdict {
    fn from(reason: RejectReason) -> Self {
        Self::Rejected { reason }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Accepted => write!(f, "accepted"),
            Self::AcceptedInsecure => write!(f, "accepted (insecure mode, opted in)"),
            Self::Rejected { reason } => write!(f, "rejected: {reason}"),
        }
    }
}

pub(crate) fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("@{unix}"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Validity {
    issue_date: String,
    next_update: String,
}

fn parse_time(s: &str) -> Option<u64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .and_then(|d| u64::try_from(d.timestamp()).ok())
}

/// Checks the validity window of the TCB info and QE identity, and returns
/// the earliest `nextUpdate`.
fn check_collateral_window(collateral: &QuoteCollateralV3, at: u64) -> Result<u64, RejectReason> {
    let mut earliest = u64::MAX;
    for (item, json) in [
        ("TCB info", &collateral.tcb_info),
        ("QE identity", &collateral.qe_identity),
    ] {
        let v: Validity =
            serde_json::from_str(json).map_err(|e| RejectReason::CollateralInvalid {
                detail: format!("{item} JSON: {e}"),
            })?;
        let (Some(issue), Some(next)) = (parse_time(&v.issue_date), parse_time(&v.next_update))
        else {
            return Err(RejectReason::CollateralInvalid {
                detail: format!("{item} has unreadable issueDate/nextUpdate"),
            });
        };
        if at < issue {
            return Err(RejectReason::CollateralNotYetValid {
                item: item.into(),
                issue_date: v.issue_date,
                at: rfc3339(at),
            });
        }
        if at > next {
            return Err(RejectReason::CollateralExpired {
                item: item.into(),
                next_update: Some(v.next_update),
                at: rfc3339(at),
            });
        }
        earliest = earliest.min(next);
    }
    Ok(earliest)
}

/// Sorts an error from `dcap-qvl` into a reason. dcap-qvl reports errors as
/// `anyhow` chains of messages, so this matches on their wording; anything
/// unrecognised becomes [`RejectReason::VerificationFailed`] with the full
/// chain.
fn classify(err: &anyhow::Error, at: u64) -> RejectReason {
    let detail = format!("{err:#}");
    let lower = detail.to_ascii_lowercase();
    if lower.contains("tcb status is invalid: revoked") {
        RejectReason::TcbRevoked
    } else if lower.contains("signature") {
        RejectReason::SignatureInvalid { detail }
    } else if lower.contains("expired") || lower.contains("not valid yet") {
        RejectReason::CollateralExpired {
            item: "CRL or certificate".into(),
            next_update: None,
            at: rfc3339(at),
        }
    } else if lower.contains("decode quote")
        || lower.contains("quote version")
        || lower.contains("body size")
        || lower.contains("tee type")
    {
        RejectReason::MalformedQuote { detail }
    } else if lower.contains("crl")
        || lower.contains("tcb info")
        || lower.contains("tcbinfo")
        || lower.contains("qe identity")
        || lower.contains("qeidentity")
        || lower.contains("collateral")
        || lower.contains("fmspc")
        || lower.contains("certificate")
    {
        RejectReason::CollateralInvalid { detail }
    } else {
        RejectReason::VerificationFailed { detail }
    }
}

/// Verifies a TDX quote against DCAP collateral at time `at` (seconds since
/// the Unix epoch) and reads out its measurements and TCB status.
///
/// Debug TDs pass this step (their debug flag is reported in
/// [`Measurements::debug`]); the policy decides whether to accept them.
pub fn verify_quote(
    quote: &[u8],
    collateral: &QuoteCollateralV3,
    at: u64,
) -> Result<VerifiedQuote, RejectReason> {
    let parsed =
        dcap_qvl::quote::Quote::parse(quote).map_err(|e| RejectReason::MalformedQuote {
            detail: format!("{e:#}"),
        })?;
    if parsed.header.is_sgx() {
        return Err(RejectReason::NotTdx);
    }
    let collateral_next_update = check_collateral_window(collateral, at)?;
    let verifier = QuoteVerifier::new_prod()
        .with_config::<dcap_qvl::configs::RustCryptoConfig>()
        .allow_debug(true);
    let report = verifier
        .verify(quote, collateral, at)
        .map_err(|e| classify(&e, at))?;
    let measurements = Measurements::from_report(&report.report).ok_or(RejectReason::NotTdx)?;
    let tcb_status =
        parse_tcb_status(&report.status).ok_or_else(|| RejectReason::VerificationFailed {
            detail: format!("unknown TCB status {:?}", report.status),
        })?;
    debug!(status = %report.status, "quote verified");
    Ok(VerifiedQuote {
        measurements,
        tcb_status,
        advisory_ids: report.advisory_ids,
        collateral_next_update,
    })
}

/// Parses a TCB status name as Intel spells it (`UpToDate`, ...).
pub fn parse_tcb_status(name: &str) -> Option<TcbStatus> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}

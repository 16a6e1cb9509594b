//! DCAP collateral: fetched from a PCCS (Intel's Provisioning Certificate
//! Caching Service, or any service with its v4 API), cached on disk, and
//! read back offline.
//!
//! For a TDX quote the collateral is the PCK CRL, Intel's root CA CRL, the
//! TCB info for the platform's FMSPC and the TD quoting enclave's identity,
//! each with its issuer chain. It is the same for every quote from platforms
//! with the same FMSPC and PCK CA, so the cache is keyed by those two, and
//! one fetch serves every worker on that kind of machine until the TCB info
//! or QE identity reaches its `nextUpdate`.
//!
//! The HTTP client is blocking (`ureq`); from async code call
//! [`CollateralSource::get`] inside `tokio::task::spawn_blocking`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dcap_qvl::quote::Quote;
use dcap_qvl::QuoteCollateralV3;
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::{debug, info, warn};

use super::AttestError;

/// How long one PCCS request may take.
pub const PCCS_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest PCCS response body accepted, in bytes.
pub const MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// Which collateral a quote needs: its platform's FMSPC and PCK CA.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CollateralKey {
    /// FMSPC, upper-case hex (12 characters).
    pub fmspc: String,
    /// `processor` or `platform`.
    pub ca: String,
}

impl CollateralKey {
    /// Reads FMSPC and PCK CA from the PCK certificate embedded in a TDX
    /// quote (certification data type 5, which TDX quoting enclaves emit).
    pub fn from_quote(quote: &[u8]) -> Result<Self, AttestError> {
        let parsed =
            Quote::parse(quote).map_err(|e| AttestError::InvalidQuote(format!("{e:#}")))?;
        if parsed.header.is_sgx() {
            return Err(AttestError::InvalidQuote(
                "an SGX quote, not a TDX quote".into(),
            ));
        }
        let fmspc = dcap_qvl::intel::quote_fmspc(&parsed).map_err(|e| {
            AttestError::InvalidQuote(format!(
                "cannot read the FMSPC from the PCK certificate: {e:#}"
            ))
        })?;
        let ca = dcap_qvl::intel::quote_ca(&parsed).map_err(|e| {
            AttestError::InvalidQuote(format!(
                "cannot read the PCK CA from the PCK certificate: {e:#}"
            ))
        })?;
        Ok(Self {
            fmspc: hex::encode_upper(fmspc),
            ca: ca.as_id_str().to_string(),
        })
    }

    fn file_name(&self) -> String {
        format!("tdx-{}-{}.json", self.fmspc, self.ca)
    }
}

/// A PCCS client (v4 API).
#[derive(Debug, Clone)]
pub struct PccsClient {
    base_url: String,
    agent: ureq::Agent,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TcbInfoResponse<'a> {
    #[serde(borrow)]
    tcb_info: &'a RawValue,
    signature: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QeIdentityResponse<'a> {
    #[serde(borrow)]
    enclave_identity: &'a RawValue,
    signature: String,
}

struct Fetched {
    body: Vec<u8>,
    issuer_chain: Option<String>,
}

impl PccsClient {
    /// A client for the PCCS at `base_url` (e.g. `https://pccs.example:8081`;
    /// a trailing `/sgx/certification/v4` or `/tdx/certification/v4` is
    /// accepted and stripped).
    pub fn new(base_url: &str) -> Self {
        let base_url = base_url
            .trim_end_matches('/')
            .trim_end_matches("/sgx/certification/v4")
            .trim_end_matches("/tdx/certification/v4")
            .to_string();
        let agent = ureq::AgentBuilder::new().timeout(PCCS_TIMEOUT).build();
        Self { base_url, agent }
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn get(&self, path: &str, chain_headers: &[&str]) -> Result<Fetched, AttestError> {
        let url = format!("{}{}", self.base_url, path);
        debug!(%url, "fetching collateral");
        let response = match self.agent.get(&url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(status, _)) => {
                return Err(AttestError::Pccs {
                    url,
                    detail: format!("HTTP {status}"),
                })
            }
            Err(e) => {
                return Err(AttestError::Pccs {
                    url,
                    detail: e.to_string(),
                })
            }
        };
        let issuer_chain = chain_headers
            .iter()
            .find_map(|h| response.header(h))
            .map(|v| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            });
        let mut body = Vec::new();
        response
            .into_reader()
            .take(MAX_RESPONSE_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|e| AttestError::Pccs {
                url: url.clone(),
                detail: format!("reading the body: {e}"),
            })?;
        if body.len() as u64 > MAX_RESPONSE_BYTES {
            return Err(AttestError::Pccs {
                url,
                detail: format!("response larger than {MAX_RESPONSE_BYTES} bytes"),
            });
        }
        if !chain_headers.is_empty() && issuer_chain.is_none() {
            return Err(AttestError::Pccs {
                url,
                detail: format!("missing {} header", chain_headers.join(" / ")),
            });
        }
        Ok(Fetched { body, issuer_chain })
    }

    /// Fetches the collateral for a TDX platform.
    pub fn fetch(&self, key: &CollateralKey) -> Result<QuoteCollateralV3, AttestError> {
        let pck = self.get(
            &format!("/sgx/certification/v4/pckcrl?ca={}&encoding=der", key.ca),
            &["SGX-PCK-CRL-Issuer-Chain"],
        )?;
        let tcb = self.get(
            &format!("/tdx/certification/v4/tcb?fmspc={}", key.fmspc),
            &["TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"],
        )?;
        let qe = self.get(
            "/tdx/certification/v4/qe/identity",
            &["SGX-Enclave-Identity-Issuer-Chain"],
        )?;
        let root = self.get("/sgx/certification/v4/rootcacrl", &[])?;

        let bad = |what: &str, detail: String| AttestError::Pccs {
            url: self.base_url.clone(),
            detail: format!("{what}: {detail}"),
        };
        let tcb_resp: TcbInfoResponse<'_> =
            serde_json::from_slice(&tcb.body).map_err(|e| bad("TCB info JSON", e.to_string()))?;
        let qe_resp: QeIdentityResponse<'_> =
            serde_json::from_slice(&qe.body).map_err(|e| bad("QE identity JSON", e.to_string()))?;
        // A PCCS returns the root CA CRL hex-encoded, Intel's PCS as DER.
        let root_ca_crl = match std::str::from_utf8(&root.body)
            .ok()
            .and_then(|s| hex::decode(s.trim()).ok())
        {
            Some(der) => der,
            None => root.body,
        };
        Ok(QuoteCollateralV3 {
            pck_crl_issuer_chain: pck.issuer_chain.unwrap_or_default(),
            root_ca_crl,
            pck_crl: pck.body,
            tcb_info_issuer_chain: tcb.issuer_chain.unwrap_or_default(),
            // The signature covers these exact bytes, so keep them verbatim.
            tcb_info: tcb_resp.tcb_info.get().to_string(),
            tcb_info_signature: hex::decode(&tcb_resp.signature)
                .map_err(|e| bad("TCB info signature", e.to_string()))?,
            qe_identity_issuer_chain: qe.issuer_chain.unwrap_or_default(),
            qe_identity: qe_resp.enclave_identity.get().to_string(),
            qe_identity_signature: hex::decode(&qe_resp.signature)
                .map_err(|e| bad("QE identity signature", e.to_string()))?,
            pck_certificate_chain: None,
        })
    }
}

/// Collateral files on disk, one per [`CollateralKey`].
#[derive(Debug, Clone)]
pub struct CollateralCache {
    dir: PathBuf,
}

impl CollateralCache {
    /// A cache in `dir` (created on first store), normally
    /// `<data_dir>/attest/collateral`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cached collateral for `key`, if any.
    pub fn load(&self, key: &CollateralKey) -> Result<Option<QuoteCollateralV3>, AttestError> {
        let path = self.dir.join(key.file_name());
        match std::fs::read(&path) {
            Ok(bytes) => read_collateral_json(&bytes, &path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AttestError::Io {
                action: "read cached collateral",
                path,
                source,
            }),
        }
    }

    /// Stores collateral for `key` (write to a temporary file, then rename).
    pub fn store(
        &self,
        key: &CollateralKey,
        collateral: &QuoteCollateralV3,
    ) -> Result<(), AttestError> {
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| AttestError::Io {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&self.dir).map_err(io("create cache directory", &self.dir))?;
        let path = self.dir.join(key.file_name());
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(collateral)
            .map_err(|e| AttestError::InvalidCollateral(e.to_string()))?;
        std::fs::write(&tmp, json).map_err(io("write cached collateral", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename cached collateral", &path))?;
        Ok(())
    }
}

/// Parses collateral as `dcap_qvl::QuoteCollateralV3` JSON (the format of
/// the cache files and of `silk attest verify --collateral`).
pub fn read_collateral_json(bytes: &[u8], path: &Path) -> Result<QuoteCollateralV3, AttestError> {
    serde_json::from_slice(bytes)
        .map_err(|e| AttestError::InvalidCollateral(format!("{}: {e}", path.display())))
}

/// The latest `nextUpdate` of the TCB info and QE identity, as Unix seconds;
/// `None` if unreadable.
fn next_update(collateral: &QuoteCollateralV3) -> Option<u64> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct NextUpdate {
        next_update: String,
    }
    let parse = |json: &str| {
        let n: NextUpdate = serde_json::from_str(json).ok()?;
        let t = chrono::DateTime::parse_from_rfc3339(&n.next_update).ok()?;
        u64::try_from(t.timestamp()).ok()
    };
    Some(parse(&collateral.tcb_info)?.min(parse(&collateral.qe_identity)?))
}

/// Where a verifier gets collateral: the on-disk cache first, then the PCCS
/// when the cached copy is missing or stale.
#[derive(Debug, Clone)]
pub struct CollateralSource {
    cache: CollateralCache,
    pccs: Option<PccsClient>,
}

impl CollateralSource {
    /// Cache only: verification works offline until the cached collateral
    /// expires.
    pub fn offline(cache: CollateralCache) -> Self {
        Self { cache, pccs: None }
    }

    /// Cache backed by a PCCS.
    pub fn with_pccs(cache: CollateralCache, pccs: PccsClient) -> Self {
        Self {
            cache,
            pccs: Some(pccs),
        }
    }

    /// The cache.
    pub fn cache(&self) -> &CollateralCache {
        &self.cache
    }

    /// Collateral for `quote`, fresh at `at` (Unix seconds) when possible.
    ///
    /// Order: cached and fresh → cached; otherwise fetch from the PCCS (if
    /// configured) and cache; if that fails or no PCCS is configured, a stale
    /// cached copy is returned (verification will then say it expired).
    pub fn get(&self, quote: &[u8], at: u64) -> Result<QuoteCollateralV3, AttestError> {
        let key = CollateralKey::from_quote(quote)?;
        let cached = self.cache.load(&key)?;
        if let Some(c) = &cached {
            if next_update(c).is_some_and(|n| n >= at) {
                debug!(fmspc = %key.fmspc, "collateral from cache");
                return Ok(c.clone());
            }
        }
        let Some(pccs) = &self.pccs else {
            return cached.ok_or_else(|| AttestError::NoCollateral {
                fmspc: key.fmspc.clone(),
                cache: self.cache.dir.clone(),
            });
        };
        match pccs.fetch(&key) {
            Ok(fresh) => {
                info!(fmspc = %key.fmspc, pccs = %pccs.base_url, "fetched collateral");
                if let Err(e) = self.cache.store(&key, &fresh) {
                    warn!(error = %e, "could not cache collateral");
                }
                Ok(fresh)
            }
            Err(e) => match cached {
                Some(stale) => {
                    warn!(error = %e, "PCCS fetch failed; using stale cached collateral");
                    Ok(stale)
                }
                None => Err(e),
            },
        }
    }
}

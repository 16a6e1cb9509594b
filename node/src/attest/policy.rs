//! The attestation policy: which TDX images, TCB statuses and debug settings
//! a verifier accepts. Read from TOML:
//!
//! ```toml
//! # TCB statuses accepted (Intel's names). Default: ["UpToDate"].
//! accepted_tcb_statuses = ["UpToDate", "SWHardeningNeeded"]
//! # Debug TDs let the host read guest memory. Default: false.
//! allow_debug = false
//! # How old the claims inside a quote may be, in seconds. Default: 86400.
//! max_claims_age_secs = 86400
//! # Accept any measurements (testing only). Default: false.
//! accept_any_image = false
//!
//! # A TD passes when it matches one [[image]] entry. An entry pins an MRTD
//! # and, optionally, RTMR0..RTMR3 (a missing RTMR is not checked) ...
//! [[image]]
//! name = "silk-worker 0.1.0, gpu"
//! mrtd = "91eb2b44..."
//! rtmr0 = "..."
//! rtmr1 = "..."
//! rtmr2 = "..."
//!
//! # ... or an image hash (see `Measurements::image_hash`).
//! [[image]]
//! name = "silk-worker 0.1.0, gpu (image hash)"
//! image_hash = "..."
//! ```

use std::path::Path;

use dcap_qvl::TcbStatus;
use serde::{Deserialize, Serialize};

use super::verify::{parse_tcb_status, Measurements, Register, RejectReason, VerifiedQuote};
use super::AttestError;

/// Default for [`Policy::max_claims_age_secs`]: one day.
pub const DEFAULT_MAX_CLAIMS_AGE_SECS: u64 = 24 * 60 * 60;

/// How far in the future a claims timestamp may be (clock skew), in seconds.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// One accepted image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePolicy {
    /// A label for humans (shown in logs).
    #[serde(default)]
    pub name: String,
    /// The accepted MRTD.
    #[serde(default)]
    pub mrtd: Option<Register>,
    /// Accepted RTMR0; `None` = not checked.
    #[serde(default)]
    pub rtmr0: Option<Register>,
    /// Accepted RTMR1; `None` = not checked.
    #[serde(default)]
    pub rtmr1: Option<Register>,
    /// Accepted RTMR2; `None` = not checked.
    #[serde(default)]
    pub rtmr2: Option<Register>,
    /// Accepted RTMR3; `None` = not checked.
    #[serde(default)]
    pub rtmr3: Option<Register>,
    /// Accepted image hash ([`Measurements::image_hash`]); when set, it is
    /// checked instead of the individual registers.
    #[serde(default)]
    pub image_hash: Option<Register>,
}

impl ImagePolicy {
    fn rtmrs(&self) -> [Option<&Register>; 4] {
        [
            self.rtmr0.as_ref(),
            self.rtmr1.as_ref(),
            self.rtmr2.as_ref(),
            self.rtmr3.as_ref(),
        ]
    }
}

/// What a verifier accepts. See the module docs for the TOML form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Accepted TCB statuses, by Intel's names.
    #[serde(default = "default_statuses")]
    pub accepted_tcb_statuses: Vec<String>,
    /// Whether debuggable TDs are accepted.
    #[serde(default)]
    pub allow_debug: bool,
    /// Maximum age of the claims' timestamp, in seconds.
    #[serde(default = "default_max_age")]
    pub max_claims_age_secs: u64,
    /// Accept any measurements. For testing and for measuring a new image;
    /// never for production gateways.
    #[serde(default)]
    pub accept_any_image: bool,
    /// Accepted images.
    #[serde(default, rename = "image")]
    pub images: Vec<ImagePolicy>,
}

fn default_statuses() -> Vec<String> {
    vec!["UpToDate".to_string()]
}

fn default_max_age() -> u64 {
    DEFAULT_MAX_CLAIMS_AGE_SECS
}

impl Default for Policy {
    /// Accepts `UpToDate` only, no debug TDs, and no image: a gateway with the
    /// default policy refuses every worker until images are listed.
    fn default() -> Self {
        Self {
            accepted_tcb_statuses: default_statuses(),
            allow_debug: false,
            max_claims_age_secs: DEFAULT_MAX_CLAIMS_AGE_SECS,
            accept_any_image: false,
            images: Vec::new(),
        }
    }
}

impl Policy {
    /// Parses a policy from TOML and checks the TCB status names.
    pub fn from_toml(text: &str) -> Result<Self, AttestError> {
        let policy: Self =
            toml::from_str(text).map_err(|e| AttestError::InvalidPolicy(e.to_string()))?;
        policy.check()?;
        Ok(policy)
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Self, AttestError> {
        let text = std::fs::read_to_string(path).map_err(|source| AttestError::Io {
            action: "read policy file",
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            AttestError::InvalidPolicy(m) => {
                AttestError::InvalidPolicy(format!("{}: {m}", path.display()))
            }
            other => other,
        })
    }

    /// Serializes the policy to TOML.
    pub fn to_toml(&self) -> Result<String, AttestError> {
        toml::to_string_pretty(self).map_err(|e| AttestError::InvalidPolicy(e.to_string()))
    }

    fn check(&self) -> Result<(), AttestError> {
        for s in &self.accepted_tcb_statuses {
            if parse_tcb_status(s).is_none() {
                return Err(AttestError::InvalidPolicy(format!(
                    "unknown TCB status {s:?} (use Intel's names: UpToDate, SWHardeningNeeded, ConfigurationNeeded, ConfigurationAndSWHardeningNeeded, OutOfDate, OutOfDateConfigurationNeeded, TDRelaunchAdvised, TDRelaunchAdvisedConfigurationNeeded)"
                )));
            }
        }
        for (i, image) in self.images.iter().enumerate() {
            if image.mrtd.is_none() && image.image_hash.is_none() {
                return Err(AttestError::InvalidPolicy(format!(
                    "image #{} ({:?}) needs an mrtd or an image_hash",
                    i + 1,
                    image.name
                )));
            }
        }
        Ok(())
    }

    /// Whether `status` is accepted.
    pub fn accepts_tcb_status(&self, status: TcbStatus) -> bool {
        self.accepted_tcb_statuses
            .iter()
            .any(|s| parse_tcb_status(s) == Some(status))
    }

    /// Applies the policy to a verified quote: TCB status, debug flag, then
    /// measurements. Does not look at report_data (see
    /// [`check_report_data`](super::check_report_data)).
    pub fn evaluate(&self, quote: &VerifiedQuote) -> Result<(), RejectReason> {
        if !self.accepts_tcb_status(quote.tcb_status) {
            return Err(RejectReason::TcbStatusNotAccepted {
                status: quote.tcb_status.to_string(),
                accepted: self.accepted_tcb_statuses.clone(),
            });
        }
        if quote.measurements.debug && !self.allow_debug {
            return Err(RejectReason::DebugNotAllowed);
        }
        self.evaluate_measurements(&quote.measurements)
    }

    /// Checks the measured registers against the accepted images.
    pub fn evaluate_measurements(&self, m: &Measurements) -> Result<(), RejectReason> {
        if self.accept_any_image {
            return Ok(());
        }
        if self.images.is_empty() {
            return Err(RejectReason::NoImagesAccepted);
        }
        let image_hash = m.image_hash();
        let mut rtmr_miss = None;
        for image in &self.images {
            if let Some(expected) = &image.image_hash {
                if *expected == image_hash {
                    return Ok(());
                }
                continue;
            }
            if image.mrtd.as_ref() != Some(&m.mrtd) {
                continue;
            }
            let miss = image
                .rtmrs()
                .iter()
                .enumerate()
                .find(|(i, want)| want.is_some_and(|w| *w != m.rtmr[*i]))
                .map(|(i, _)| i);
            match miss {
                None => return Ok(()),
                Some(i) => {
                    rtmr_miss.get_or_insert(i);
                }
            }
        }
        Err(match rtmr_miss {
            Some(index) => RejectReason::RtmrNotAccepted {
                index,
                value: m.rtmr[index].to_string(),
            },
            None => RejectReason::MrtdNotAccepted {
                mrtd: m.mrtd.to_string(),
            },
        })
    }

    /// Checks that a claims timestamp is neither older than
    /// `max_claims_age_secs` nor more than [`MAX_CLOCK_SKEW_SECS`] ahead of `at`.
    pub fn check_claims_age(&self, timestamp: u64, at: u64) -> Result<(), RejectReason> {
        let too_old = at.saturating_sub(timestamp) > self.max_claims_age_secs;
        let in_future = timestamp > at.saturating_add(MAX_CLOCK_SKEW_SECS);
        if too_old || in_future {
            return Err(RejectReason::ClaimsNotFresh { timestamp, at });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::hex::Hex;

    fn measurements() -> Measurements {
        Measurements {
            mrtd: Hex([1; 48]),
            rtmr: [Hex([2; 48]), Hex([3; 48]), Hex([4; 48]), Hex([5; 48])],
            mr_config_id: Hex([0; 48]),
            mr_owner: Hex([0; 48]),
            mr_owner_config: Hex([0; 48]),
            mr_seam: Hex([9; 48]),
            td_attributes: Hex([0; 8]),
            xfam: Hex([0; 8]),
            tee_tcb_svn: Hex([0; 16]),
            report_data: Hex([0; 64]),
            debug: false,
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let text = format!(
            r#"
accepted_tcb_statuses = ["UpToDate", "SWHardeningNeeded"]
allow_debug = false
[[image]]
name = "worker"
mrtd = "{}"
rtmr1 = "{}"
[[image]]
name = "by hash"
image_hash = "{}"
"#,
            Hex([1u8; 48]),
            Hex([3u8; 48]),
            measurements().image_hash()
        );
        let p = Policy::from_toml(&text).expect("policy");
        assert_eq!(p.images.len(), 2);
        assert!(p.accepts_tcb_status(TcbStatus::SWHardeningNeeded));
        assert!(!p.accepts_tcb_status(TcbStatus::OutOfDate));
        assert_eq!(p.evaluate_measurements(&measurements()), Ok(()));
        let round = Policy::from_toml(&p.to_toml().expect("toml")).expect("reparse");
        assert_eq!(round, p);
    }

    #[test]
    fn rejects_bad_policy_files() {
        assert!(matches!(
            Policy::from_toml(r#"accepted_tcb_statuses = ["Fine"]"#),
            Err(AttestError::InvalidPolicy(_))
        ));
        assert!(matches!(
            Policy::from_toml("[[image]]\nname = \"x\"\n"),
            Err(AttestError::InvalidPolicy(_))
        ));
        assert!(matches!(
            Policy::from_toml("allow_debgu = true"),
            Err(AttestError::InvalidPolicy(_))
        ));
    }

    #[test]
    fn measurement_rules() {
        let m = measurements();
        assert_eq!(
            Policy::default().evaluate_measurements(&m),
            Err(RejectReason::NoImagesAccepted)
        );
        let rtmr_wrong = Policy {
            images: vec![ImagePolicy {
                name: "w".into(),
                mrtd: Some(Hex([1; 48])),
                rtmr0: None,
                rtmr1: None,
                rtmr2: Some(Hex([7; 48])),
                rtmr3: None,
                image_hash: None,
            }],
            ..Policy::default()
        };
        assert_eq!(
            rtmr_wrong.evaluate_measurements(&m),
            Err(RejectReason::RtmrNotAccepted {
                index: 2,
                value: Hex([4u8; 48]).to_string()
            })
        );
        let hash_wrong = Policy {
            images: vec![ImagePolicy {
                name: "h".into(),
                mrtd: None,
                rtmr0: None,
                rtmr1: None,
                rtmr2: None,
                rtmr3: None,
                image_hash: Some(Hex([0; 48])),
            }],
            ..Policy::default()
        };
        assert_eq!(
            hash_wrong.evaluate_measurements(&m),
            Err(RejectReason::MrtdNotAccepted {
                mrtd: m.mrtd.to_string()
            })
        );
        let any = Policy {
            accept_any_image: true,
            ..Policy::default()
        };
        assert_eq!(any.evaluate_measurements(&m), Ok(()));
    }

    #[test]
    fn claims_age() {
        let p = Policy::default();
        assert_eq!(p.check_claims_age(1000, 1000), Ok(()));
        assert!(p
            .check_claims_age(1000, 1000 + DEFAULT_MAX_CLAIMS_AGE_SECS + 1)
            .is_err());
        assert!(p
            .check_claims_age(1000 + MAX_CLOCK_SKEW_SECS + 1, 1000)
            .is_err());
    }
}

//! The claims a node binds into its TDX quote.
//!
//! A quote carries 64 bytes of caller-chosen `report_data`. silk puts the
//! SHA-512 of a canonical encoding of [`Claims`] there, so a verifier who
//! holds the claims (they travel next to the quote in the
//! [`AttestationDocument`](super::AttestationDocument)) can check that the
//! trust domain vouched for exactly this libp2p key, these models and this
//! node version.
//!
//! # Canonical encoding (version 1)
//!
//! All integers are big-endian; every variable-length field is preceded by
//! its length as a `u32`:
//!
//! ```text
//! b"silk/attest/claims/v1\0"           domain tag, 22 bytes
//! u32 len ‖ peer public key            raw ed25519 key, 32 bytes
//! u32 count ‖ (u32 len ‖ model id)*    sorted, de-duplicated, UTF-8
//! u32 len ‖ node version               UTF-8
//! u64 timestamp                        seconds since the Unix epoch
//! ```
//!
//! Model ids are sorted and de-duplicated when the claims are built, so the
//! same set of models always gives the same bytes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

use super::hex::Hex;
use super::AttestError;

/// Domain separation tag at the start of the canonical encoding.
pub const CLAIMS_DOMAIN_TAG: &[u8] = b"silk/attest/claims/v1\0";

/// Length of a raw ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Upper bound on the number of model ids in one claims structure; keeps a
/// peer from making us hash megabytes.
pub const MAX_MODELS: usize = 256;

/// Upper bound on the length of one model id or the node version, in bytes.
pub const MAX_STRING_LEN: usize = 256;

/// What a node asserts about itself inside its quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The node's libp2p ed25519 public key: the 32 raw bytes
    /// (`libp2p::identity::ed25519::PublicKey::to_bytes`). Hex in JSON.
    pub peer_public_key: Hex<PUBLIC_KEY_LEN>,
    /// Ids of the models the node serves, sorted and de-duplicated.
    pub models: Vec<String>,
    /// The silk version the node runs (`CARGO_PKG_VERSION`).
    pub node_version: String,
    /// When the claims were made, in seconds since the Unix epoch.
    pub timestamp: u64,
}

impl Claims {
    /// Builds claims, sorting and de-duplicating the model ids.
    ///
    /// Fails when there are more than [`MAX_MODELS`] models or a string is
    /// longer than [`MAX_STRING_LEN`] bytes.
    pub fn new(
        peer_public_key: Hex<PUBLIC_KEY_LEN>,
        models: impl IntoIterator<Item = String>,
        node_version: impl Into<String>,
        timestamp: u64,
    ) -> Result<Self, AttestError> {
        let mut models: Vec<String> = models.into_iter().collect();
        models.sort();
        models.dedup();
        let claims = Self {
            peer_public_key,
            models,
            node_version: node_version.into(),
            timestamp,
        };
        claims.check_bounds()?;
        Ok(claims)
    }

    /// Checks the size limits and that the model ids are sorted and unique,
    /// as a peer could send claims that were not built with [`Claims::new`].
    pub fn check_bounds(&self) -> Result<(), AttestError> {
        if self.models.len() > MAX_MODELS {
            return Err(AttestError::InvalidClaims(format!(
                "{} model ids, at most {MAX_MODELS} are allowed",
                self.models.len()
            )));
        }
        for s in self
            .models
            .iter()
            .chain(std::iter::once(&self.node_version))
        {
            if s.len() > MAX_STRING_LEN {
                return Err(AttestError::InvalidClaims(format!(
                    "a string of {} bytes, at most {MAX_STRING_LEN} are allowed",
                    s.len()
                )));
            }
        }
        if self.models.windows(2).any(|w| w[0] >= w[1]) {
            return Err(AttestError::InvalidClaims(
                "model ids must be sorted and unique".into(),
            ));
        }
        Ok(())
    }

    /// The canonical byte encoding described in the module documentation.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            CLAIMS_DOMAIN_TAG.len()
                + 4
                + PUBLIC_KEY_LEN
                + 4
                + self.models.iter().map(|m| 4 + m.len()).sum::<usize>()
                + 4
                + self.node_version.len()
                + 8,
        );
        out.extend_from_slice(CLAIMS_DOMAIN_TAG);
        put_bytes(&mut out, &self.peer_public_key.0);
        put_len(&mut out, self.models.len());
        for model in &self.models {
            put_bytes(&mut out, model.as_bytes());
        }
        put_bytes(&mut out, self.node_version.as_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out
    }

    /// The value that goes into the quote's `report_data`: SHA-512 of
    /// [`Claims::canonical_bytes`].
    pub fn report_data(&self) -> [u8; 64] {
        Sha512::digest(self.canonical_bytes()).into()
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Bounded by MAX_MODELS / MAX_STRING_LEN / PUBLIC_KEY_LEN, far below u32::MAX.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Claims {
        Claims::new(
            Hex([7u8; 32]),
            vec!["qwen3-0.6b".to_string(), "smollm2-135m".to_string()],
            "0.1.0",
            1_750_400_000,
        )
        .expect("valid claims")
    }

    #[test]
    fn model_order_does_not_change_the_encoding() {
        let a = sample();
        let b = Claims::new(
            Hex([7u8; 32]),
            vec![
                "smollm2-135m".to_string(),
                "qwen3-0.6b".to_string(),
                "smollm2-135m".to_string(),
            ],
            "0.1.0",
            1_750_400_000,
        )
        .expect("valid claims");
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(a.report_data(), b.report_data());
    }

    #[test]
    fn encoding_layout_is_as_documented() {
        let c = sample();
        let bytes = c.canonical_bytes();
        let mut expected = Vec::new();
        expected.extend_from_slice(b"silk/attest/claims/v1\0");
        expected.extend_from_slice(&32u32.to_be_bytes());
        expected.extend_from_slice(&[7u8; 32]);
        expected.extend_from_slice(&2u32.to_be_bytes());
        expected.extend_from_slice(&10u32.to_be_bytes());
        expected.extend_from_slice(b"qwen3-0.6b");
        expected.extend_from_slice(&12u32.to_be_bytes());
        expected.extend_from_slice(b"smollm2-135m");
        expected.extend_from_slice(&5u32.to_be_bytes());
        expected.extend_from_slice(b"0.1.0");
        expected.extend_from_slice(&1_750_400_000u64.to_be_bytes());
        assert_eq!(bytes, expected);
        let digest: [u8; 64] = Sha512::digest(&expected).into();
        assert_eq!(c.report_data(), digest);
    }

    #[test]
    fn every_field_changes_report_data() {
        let base = sample().report_data();
        let mut c = sample();
        c.peer_public_key.0[0] ^= 1;
        assert_ne!(c.report_data(), base);
        let mut c = sample();
        c.models.pop();
        assert_ne!(c.report_data(), base);
        let mut c = sample();
        c.node_version = "0.1.1".into();
        assert_ne!(c.report_data(), base);
        let mut c = sample();
        c.timestamp += 1;
        assert_ne!(c.report_data(), base);
    }

    #[test]
    fn json_round_trip_and_bounds() {
        let c = sample();
        let json = serde_json::to_string(&c).expect("serialize");
        assert!(json.contains(&hex::encode([7u8; 32])));
        let back: Claims = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, c);

        let unsorted = Claims {
            models: vec!["b".into(), "a".into()],
            ..sample()
        };
        assert!(matches!(
            unsorted.check_bounds(),
            Err(AttestError::InvalidClaims(_))
        ));
        let too_many = Claims::new(Hex([0; 32]), (0..300).map(|i| format!("m{i}")), "0.1.0", 0);
        assert!(matches!(too_many, Err(AttestError::InvalidClaims(_))));
    }
}

//! TON addresses: parsing and printing in raw and user-friendly forms.

use std::fmt;
use std::str::FromStr;

use tonlib_core::TonAddress;

use crate::error::{Error, Result};

/// An internal (`addr_std`) TON address: a workchain and a 256-bit account id.
///
/// Parses the raw form (`0:83df…`) and the 48-character user-friendly forms
/// (url-safe or standard base64, bounceable or not, any network tag).
/// `Display` prints the bounceable url-safe mainnet form, as wallets do.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Address(pub(crate) TonAddress);

impl Address {
    /// The address with the given workchain and account id.
    pub fn new(workchain: i32, hash: [u8; 32]) -> Self {
        Address(TonAddress::new(workchain, hash.into()))
    }

    /// The workchain (0 for the basechain).
    pub fn workchain(&self) -> i32 {
        self.0.workchain
    }

    /// The 256-bit account id.
    pub fn hash(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.hash_part.as_slice());
        out
    }

    /// The raw form, `workchain:hex`.
    pub fn to_raw(&self) -> String {
        self.0.to_hex()
    }

    /// The user-friendly (url-safe base64) form.
    pub fn to_friendly(&self, bounceable: bool, testnet: bool) -> String {
        self.0.to_base64_url_flags(!bounceable, testnet)
    }

    /// The tonlib-core address, for building cells.
    pub fn as_ton(&self) -> &TonAddress {
        &self.0
    }
}

impl From<TonAddress> for Address {
    fn from(a: TonAddress) -> Self {
        Address(a)
    }
}

impl FromStr for Address {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        TonAddress::from_str(s)
            .map(Address)
            .map_err(|e| Error::Address {
                input: s.to_string(),
                reason: e.to_string(),
            })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_friendly(true, false))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_raw())
    }
}

impl serde::Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_raw())
    }
}

impl<'de> serde::Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_friendly_forms_round_trip() {
        let a: Address = "0:83dfd552e63729b472fcbcc8c45ebcc6691702558b68ec7527e1ba403a0f31a8"
            .parse()
            .unwrap();
        assert_eq!(a.workchain(), 0);
        let bounceable = a.to_friendly(true, false);
        let plain = a.to_friendly(false, false);
        let testnet = a.to_friendly(true, true);
        assert_ne!(bounceable, plain);
        assert_ne!(bounceable, testnet);
        for form in [bounceable, plain, testnet, a.to_raw()] {
            assert_eq!(form.parse::<Address>().unwrap(), a, "{form}");
        }
        // The forms @ton/core prints for this address.
        assert_eq!(
            a.to_string(),
            "EQCD39VS5jcptHL8vMjEXrzGaRcCVYto7HUn4bpAOg8xqB2N"
        );
        assert_eq!(
            a.to_friendly(false, false),
            "UQCD39VS5jcptHL8vMjEXrzGaRcCVYto7HUn4bpAOg8xqEBI"
        );
        assert_eq!(
            a.to_friendly(true, true),
            "kQCD39VS5jcptHL8vMjEXrzGaRcCVYto7HUn4bpAOg8xqKYH"
        );
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "0:12",
            "EQCD39VS5jcptHL8vMjEXrzGaRcCVYto7HUn4bpAOg8xqB2M",
            "hello",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad:?}");
        }
    }
}

//! Amounts of TON as integer nanoTON.

use std::fmt;
use std::str::FromStr;

use num_bigint::BigUint;

use crate::error::{Error, Result};

/// Nanotons in one TON.
pub const NANO_PER_TON: u128 = 1_000_000_000;

/// The largest amount a TON `Coins` field can hold: 2^120 - 1 nanoTON.
pub const MAX_COINS: u128 = (1u128 << 120) - 1;

/// An amount of TON in nanoTON. Never a float.
///
/// Arithmetic is checked: [`Coins::checked_add`] and friends return
/// [`Error::Overflow`] instead of wrapping. `Display` prints TON with up to 9
/// decimals (`1.5`), `FromStr` reads the same form.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Coins(pub u128);

impl Coins {
    /// Zero.
    pub const ZERO: Coins = Coins(0);

    /// `nano` nanoTON.
    pub const fn from_nano(nano: u128) -> Self {
        Coins(nano)
    }

    /// `ton` whole TON, if that fits.
    pub fn from_ton(ton: u64) -> Result<Self> {
        (ton as u128)
            .checked_mul(NANO_PER_TON)
            .map(Coins)
            .ok_or(Error::Overflow("Coins::from_ton"))
    }

    /// The amount in nanoTON.
    pub const fn nano(self) -> u128 {
        self.0
    }

    /// `self + other`, or [`Error::Overflow`].
    pub fn checked_add(self, other: Coins) -> Result<Coins> {
        self.0
            .checked_add(other.0)
            .map(Coins)
            .ok_or(Error::Overflow("Coins::checked_add"))
    }

    /// `self - other`, or [`Error::Overflow`] if it would go negative.
    pub fn checked_sub(self, other: Coins) -> Result<Coins> {
        self.0
            .checked_sub(other.0)
            .map(Coins)
            .ok_or(Error::Overflow("Coins::checked_sub"))
    }

    /// `self - other`, or zero.
    pub fn saturating_sub(self, other: Coins) -> Coins {
        Coins(self.0.saturating_sub(other.0))
    }

    /// The value as the big integer tonlib-core's cell builder wants, checking
    /// it fits the 120 bits of a `Coins` field.
    pub(crate) fn to_biguint(self) -> Result<BigUint> {
        if self.0 > MAX_COINS {
            return Err(Error::CoinsTooLarge(self.0));
        }
        Ok(BigUint::from(self.0))
    }
}

impl fmt::Display for Coins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / NANO_PER_TON;
        let frac = self.0 % NANO_PER_TON;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

impl FromStr for Coins {
    type Err = Error;

    /// Parses TON with up to 9 decimals: `2`, `0.5`, `1.000000001`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Amount {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (whole, frac) = match s.split_once('.') {
            Some((w, f)) => (w, f),
            None => (s, ""),
        };
        if whole.is_empty() && frac.is_empty() {
            return Err(bad("empty"));
        }
        if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("only digits and one '.' are allowed"));
        }
        if frac.len() > 9 {
            return Err(bad("more than 9 decimals (1 nanoTON is 0.000000001)"));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad("too large"))?
        };
        let frac_nano: u128 = if frac.is_empty() {
            0
        } else {
            let padded = format!("{frac:0<9}");
            padded.parse().map_err(|_| bad("bad decimals"))?
        };
        let nano = whole
            .checked_mul(NANO_PER_TON)
            .and_then(|n| n.checked_add(frac_nano))
            .ok_or_else(|| bad("too large"))?;
        if nano > MAX_COINS {
            return Err(bad("too large for TON coins"));
        }
        Ok(Coins(nano))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_ton() {
        assert_eq!("1.5".parse::<Coins>().unwrap(), Coins(1_500_000_000));
        assert_eq!("0.000000001".parse::<Coins>().unwrap(), Coins(1));
        assert_eq!(".25".parse::<Coins>().unwrap(), Coins(250_000_000));
        assert_eq!(Coins(1_500_000_000).to_string(), "1.5");
        assert_eq!(Coins(2_000_000_000).to_string(), "2");
        assert_eq!(Coins(1).to_string(), "0.000000001");
        for bad in ["", ".", "1.0000000001", "-1", "1e9", "1.2.3", "abc"] {
            assert!(bad.parse::<Coins>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn checked_arithmetic_refuses_overflow_and_underflow() {
        assert!(Coins(u128::MAX).checked_add(Coins(1)).is_err());
        assert!(Coins(1).checked_sub(Coins(2)).is_err());
        assert!(Coins(MAX_COINS + 1).to_biguint().is_err());
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(n in 0u128..=MAX_COINS) {
            let c = Coins(n);
            prop_assert_eq!(c.to_string().parse::<Coins>().unwrap(), c);
        }

        #[test]
        fn add_then_sub_is_identity(a in 0u128..=MAX_COINS, b in 0u128..=MAX_COINS) {
            let sum = Coins(a).checked_add(Coins(b)).unwrap();
            prop_assert_eq!(sum.checked_sub(Coins(b)).unwrap(), Coins(a));
        }
    }
}

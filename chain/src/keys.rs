//! Keys from a TON mnemonic, and the wallet addresses they control.

use ed25519_dalek::{SigningKey, VerifyingKey};
use tonlib_core::cell::ArcCell;
use tonlib_core::wallet::mnemonic::{KeyPair, Mnemonic, WORDLIST_EN_SET};
use tonlib_core::wallet::ton_wallet::TonWallet;
use tonlib_core::wallet::version_helper::VersionHelper;
use tonlib_core::wallet::wallet_version::WalletVersion as TonlibWalletVersion;

use crate::address::Address;
use crate::error::{Error, Result};

/// An ed25519 key pair as TON wallets derive it from a 24-word mnemonic.
#[derive(Clone)]
pub struct Keys {
    signing: SigningKey,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("public", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Keys from a TON mnemonic (24 words, no password), as TON wallets derive them.
    pub fn from_mnemonic(words: &str) -> Result<Self> {
        let words: Vec<&str> = words.split_whitespace().collect();
        let m = Mnemonic::new(words, &None).map_err(|e| Error::Mnemonic(e.to_string()))?;
        let kp = m
            .to_key_pair()
            .map_err(|e| Error::Mnemonic(e.to_string()))?;
        let seed: [u8; 32] = kp
            .secret_key
            .get(..32)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| Error::Key("tonlib-core returned a short secret key".into()))?;
        Ok(Self::from_seed(seed))
    }

    /// A fresh 24-word TON mnemonic (no password) and its keys, drawn from
    /// the thread's cryptographically secure RNG. Like TON wallets, it draws
    /// word lists until one is a valid passwordless TON mnemonic (about 1
    /// in 256), so this takes tens of milliseconds.
    pub fn generate_mnemonic() -> Result<(String, Self)> {
        use rand::Rng as _;
        let mut words: Vec<(&str, usize)> = WORDLIST_EN_SET.iter().map(|(w, i)| (*w, *i)).collect();
        words.sort_by_key(|(_, i)| *i);
        if words.len() != 2048 {
            return Err(Error::Mnemonic(format!(
                "tonlib-core's word list has {} words, expected 2048",
                words.len()
            )));
        }
        let mut rng = rand::rng();
        for _ in 0..100_000 {
            let phrase: Vec<&str> = (0..24)
                .map(|_| words[rng.random_range(0..words.len())].0)
                .collect();
            if Mnemonic::new(phrase.clone(), &None).is_ok() {
                let phrase = phrase.join(" ");
                let keys = Self::from_mnemonic(&phrase)?;
                return Ok((phrase, keys));
            }
        }
        Err(Error::Mnemonic(
            "no valid mnemonic after 100000 draws; the RNG is broken".into(),
        ))
    }

    /// Keys from a 32-byte ed25519 seed (the first half of a TON secret key).
    /// Tests and local testnets use this; people use mnemonics.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Keys {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The 32-byte ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The verifying half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The key pair in the 64-byte NaCl layout tonlib-core uses.
    pub(crate) fn tonlib_key_pair(&self) -> KeyPair {
        let mut secret = self.signing.to_bytes().to_vec();
        secret.extend_from_slice(&self.public_key());
        KeyPair {
            public_key: self.public_key().to_vec(),
            secret_key: secret,
        }
    }
}

/// The wallet contracts we can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum WalletVersion {
    /// Wallet v4r2, default wallet id 698983191.
    V4R2,
    /// Wallet v5r1 (W5), default mainnet wallet id.
    V5R1,
}

impl WalletVersion {
    fn tonlib(self) -> TonlibWalletVersion {
        match self {
            WalletVersion::V4R2 => TonlibWalletVersion::V4R2,
            WalletVersion::V5R1 => TonlibWalletVersion::V5R1,
        }
    }
}

/// A wallet contract controlled by [`Keys`]: its version, id and address.
#[derive(Clone, Debug)]
pub struct Wallet {
    inner: TonWallet,
}

impl Wallet {
    /// The standard basechain wallet of `version` for `keys`, with the default wallet id.
    pub fn new(version: WalletVersion, keys: &Keys) -> Result<Self> {
        let inner = TonWallet::new(version.tonlib(), keys.tonlib_key_pair())?;
        Ok(Wallet { inner })
    }

    /// The wallet's address.
    pub fn address(&self) -> Address {
        Address(self.inner.address.clone())
    }

    /// Which wallet contract this is.
    pub fn version(&self) -> WalletVersion {
        match self.inner.version {
            TonlibWalletVersion::V5R1 => WalletVersion::V5R1,
            _ => WalletVersion::V4R2,
        }
    }

    /// The wallet's code cell.
    pub fn code(&self) -> Result<ArcCell> {
        Ok(VersionHelper::get_code(self.inner.version)?.clone())
    }

    /// The wallet's initial data cell (seqno 0).
    pub fn initial_data(&self) -> Result<ArcCell> {
        Ok(VersionHelper::get_data(
            self.inner.version,
            &self.inner.key_pair,
            self.inner.wallet_id,
        )?
        .to_arc())
    }

    pub(crate) fn tonlib(&self) -> &TonWallet {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Mnemonics and addresses from tonlib-core's own tests, which match @ton/ton.
    const M4: &str = "fancy carpet hello mandate penalty trial consider property top vicious exit rebuild tragic profit urban major total month holiday sudden rib gather media vicious";
    const M5: &str = "section garden tomato dinner season dice renew length useful spin trade intact use universe what post spike keen mandate behind concert egg doll rug";

    #[test]
    fn wallet_addresses_from_mnemonics() {
        let k4 = Keys::from_mnemonic(M4).unwrap();
        let w4 = Wallet::new(WalletVersion::V4R2, &k4).unwrap();
        assert_eq!(
            w4.address().to_string(),
            "EQCDM_QGggZ3qMa_f3lRPk4_qLDnLTqdi6OkMAV2NB9r5TG3"
        );
        let k5 = Keys::from_mnemonic(M5).unwrap();
        let w5 = Wallet::new(WalletVersion::V5R1, &k5).unwrap();
        assert_eq!(
            w5.address().to_friendly(false, false),
            "UQDv2YSmlrlLH3hLNOVxC8FcQf4F9eGNs4vb2zKma4txo6i3"
        );
    }

    #[test]
    fn generated_mnemonics_are_valid_and_reproduce_their_keys() {
        let (phrase, keys) = Keys::generate_mnemonic().unwrap();
        assert_eq!(phrase.split(' ').count(), 24);
        assert_eq!(
            Keys::from_mnemonic(&phrase).unwrap().public_key(),
            keys.public_key()
        );
        let (other, _) = Keys::generate_mnemonic().unwrap();
        assert_ne!(phrase, other);
    }

    #[test]
    fn refuses_a_bad_mnemonic() {
        assert!(Keys::from_mnemonic("fancy carpet hello").is_err());
        assert!(Keys::from_mnemonic(&M4.replace("fancy", "fanci")).is_err());
    }
}

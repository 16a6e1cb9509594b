//! Cumulative cheques: what a client signs and a worker redeems.
//!
//! The signed value is the representation hash of one cell laid out exactly as
//! the contract rebuilds it (`contracts/README.md`, "Cheque"):
//! `0x5e1cc4e9 contract:MsgAddressInt worker:MsgAddressInt lane_id:uint32 cumulative:Coins`.

use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use tonlib_core::cell::CellBuilder;

use crate::address::Address;
use crate::coins::Coins;
use crate::error::{Error, Result};
use crate::keys::Keys;

/// Prefix of the cheque cell.
pub const CHEQUE_TAG: u32 = 0x5e1c_c4e9;

/// What a cheque says: on `contract`'s lane `lane_id` to `worker`, the client
/// owes `cumulative` in total so far.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Cheque {
    /// The client's settlement contract.
    pub contract: Address,
    /// The worker the lane pays.
    pub worker: Address,
    /// The lane id within the contract.
    pub lane_id: u32,
    /// Everything owed on this lane so far.
    pub cumulative: Coins,
}

impl Cheque {
    /// The 32 bytes that get signed: the hash of the cheque cell.
    pub fn hash(&self) -> Result<[u8; 32]> {
        let cell = CellBuilder::new()
            .store_u32(32, CHEQUE_TAG)?
            .store_raw_address(self.contract.as_ton())?
            .store_raw_address(self.worker.as_ton())?
            .store_u32(32, self.lane_id)?
            .store_coins(&self.cumulative.to_biguint()?)?
            .build()?;
        let mut out = [0u8; 32];
        out.copy_from_slice(cell.cell_hash().as_slice());
        Ok(out)
    }

    /// Signs the cheque with the client's keys.
    pub fn sign(self, keys: &Keys) -> Result<SignedCheque> {
        let signature = keys.signing_key().sign(&self.hash()?).to_bytes();
        Ok(SignedCheque {
            cheque: self,
            signature,
        })
    }
}

/// A cheque with the client's ed25519 signature, as a worker stores and redeems it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SignedCheque {
    /// What is signed.
    pub cheque: Cheque,
    /// ed25519 signature over [`Cheque::hash`].
    #[serde(with = "signature_hex")]
    pub signature: [u8; 64],
}

impl SignedCheque {
    /// Checks the signature against the client's public key (the one stored
    /// in the contract).
    pub fn verify(&self, public_key: &[u8; 32]) -> Result<()> {
        let key = VerifyingKey::from_bytes(public_key).map_err(|e| Error::Key(e.to_string()))?;
        let sig = Signature::from_bytes(&self.signature);
        key.verify(&self.cheque.hash()?, &sig)
            .map_err(|_| Error::BadSignature("cheque"))
    }
}

mod signature_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(sig))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("a signature is 64 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cheque(cumulative: u128) -> Cheque {
        Cheque {
            contract: Address::new(0, [1; 32]),
            worker: Address::new(0, [2; 32]),
            lane_id: 7,
            cumulative: Coins(cumulative),
        }
    }

    #[test]
    fn sign_then_verify_and_reject_tampering() {
        let keys = Keys::from_seed([7; 32]);
        let signed = cheque(1_000).sign(&keys).unwrap();
        signed.verify(&keys.public_key()).unwrap();
        let other = Keys::from_seed([8; 32]);
        assert!(signed.verify(&other.public_key()).is_err());
        for tampered in [
            Cheque {
                cumulative: Coins(1_001),
                ..signed.cheque.clone()
            },
            Cheque {
                lane_id: 8,
                ..signed.cheque.clone()
            },
            Cheque {
                worker: Address::new(0, [3; 32]),
                ..signed.cheque.clone()
            },
            Cheque {
                contract: Address::new(0, [4; 32]),
                ..signed.cheque.clone()
            },
        ] {
            let forged = SignedCheque {
                cheque: tampered,
                signature: signed.signature,
            };
            assert!(forged.verify(&keys.public_key()).is_err());
        }
        let json = serde_json::to_string(&signed).unwrap();
        assert_eq!(serde_json::from_str::<SignedCheque>(&json).unwrap(), signed);
    }

    proptest! {
        #[test]
        fn distinct_amounts_hash_differently(a in 0u128..(1 << 120), b in 0u128..(1 << 120)) {
            prop_assume!(a != b);
            prop_assert_ne!(cheque(a).hash().unwrap(), cheque(b).hash().unwrap());
        }
    }
}

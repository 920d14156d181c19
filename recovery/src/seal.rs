//! The hybrid recovery key (X25519 + ML-KEM-768) and sealing to it.
//!
//! ```text
//! eph = fresh X25519 pair;  dh = X25519(eph, recovery.x25519)
//! (ct_kem, ss_kem) = ML-KEM-768.encapsulate(recovery.mlkem)
//! k = HKDF-SHA256(ikm = dh || ss_kem, salt = "sovereign-kms/hybrid-seal-v1",
//!                 info = eph.public || ct_kem || recovery.x25519 || recovery.mlkem
//!                        || purpose || 0x00 || aad)
//! sealed = 0x01 || eph.public(32) || ct_kem(1088) || nonce(12) || AES-256-GCM(k, nonce, pt, purpose || 0x00 || aad)
//! ```

use std::fmt;

use crate::Random;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
use aws_lc_rs::kem::{Ciphertext, DecapsulationKey, EncapsulationKey, ML_KEM_768};
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox, SecretSlice};
use serde::{Deserialize, Serialize};

use crate::secret::{Derive, RecoverySecret};
use crate::{CeremonyId, Epoch, Error};

/// Format byte of a hybrid seal.
const SEAL_V1: u8 = 1;
/// Length of an X25519 public key.
const X25519_LEN: usize = 32;
/// Length of an ML-KEM-768 ciphertext.
const MLKEM_CT_LEN: usize = 1088;
/// Length of an ML-KEM-768 encapsulation key.
const MLKEM_EK_LEN: usize = 1184;
/// Fixed part of a seal before the ciphertext.
const SEAL_HEADER_LEN: usize = 1 + X25519_LEN + MLKEM_CT_LEN + NONCE_LEN;
/// AES-GCM tag length.
const TAG_LEN: usize = 16;

/// What a seal holds; part of its key derivation and AAD, so a seal made for one purpose does
/// not open as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Purpose {
    /// The audit log's context-digest key.
    ContextDigestKey,
    /// The value of the token's trusted escrow key.
    EscrowKey,
    /// The grant MAC key.
    GrantMacKey,
    /// The material of a `software` key version.
    SoftwareVersion,
}

impl Purpose {
    /// The name bound into the seal.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::ContextDigestKey => "context-digest-key",
            Purpose::EscrowKey => "escrow-key",
            Purpose::GrantMacKey => "grant-mac-key",
            Purpose::SoftwareVersion => "software-version",
        }
    }
}

/// The recovery public key: what the running server holds, and all it needs to escrow.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryPublicKey {
    /// X25519 public key, hex.
    #[serde(with = "hexs")]
    pub x25519: Vec<u8>,
    /// ML-KEM-768 encapsulation key, base64.
    #[serde(with = "b64")]
    pub ml_kem_768: Vec<u8>,
}

impl fmt::Debug for RecoveryPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveryPublicKey")
            .field("x25519", &hex::encode(&self.x25519))
            .field("ml_kem_768_len", &self.ml_kem_768.len())
            .finish()
    }
}

impl RecoveryPublicKey {
    /// Seals `plaintext` for `purpose`, bound to `aad`. Only the recovery private key opens
    /// it, and only with both its X25519 and its ML-KEM secret.
    pub fn seal(
        &self,
        rng: &dyn Random,
        purpose: Purpose,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let eph = PrivateKey::generate(&X25519).map_err(|_| Error::Random)?;
        let eph_public = eph
            .compute_public_key()
            .map_err(|_| Error::Internal("x25519 public key"))?;
        let ek =
            EncapsulationKey::new(&ML_KEM_768, &self.ml_kem_768).map_err(|_| Error::Record {
                fault: "ML-KEM-768 public key is damaged",
            })?;
        let (ct_kem, ss_kem) = ek
            .encapsulate()
            .map_err(|_| Error::Internal("ml-kem encapsulate"))?;
        let peer = UnparsedPublicKey::new(&X25519, &self.x25519);
        let key = agreement::agree(
            &eph,
            peer,
            Error::Record {
                fault: "X25519 public key is damaged",
            },
            |dh| {
                self.seal_key(
                    dh,
                    ss_kem.as_ref(),
                    eph_public.as_ref(),
                    ct_kem.as_ref(),
                    purpose,
                    aad,
                )
            },
        )?;
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce).map_err(|_| Error::Random)?;
        let mut out = Vec::with_capacity(SEAL_HEADER_LEN + plaintext.len() + TAG_LEN);
        out.push(SEAL_V1);
        out.extend_from_slice(eph_public.as_ref());
        out.extend_from_slice(ct_kem.as_ref());
        out.extend_from_slice(&nonce);
        // Sealed in place: the buffer holds the plaintext until it is overwritten with the
        // ciphertext.
        let mut body = plaintext.to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(bound_aad(purpose, aad)),
                &mut body,
            )
            .map_err(|_| Error::Internal("aes-gcm seal"))?;
        out.extend_from_slice(&body);
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// HKDF over both shared secrets, binding both ciphertexts, both public keys, the purpose
    /// and the associated data.
    fn seal_key(
        &self,
        dh: &[u8],
        ss_kem: &[u8],
        eph_public: &[u8],
        ct_kem: &[u8],
        purpose: Purpose,
        aad: &[u8],
    ) -> Result<LessSafeKey, Error> {
        let mut ikm = SecretBox::new(Box::new([0u8; 64]));
        let (a, b) = ikm.expose_secret_mut().split_at_mut(32);
        a.copy_from_slice(dh.get(..32).ok_or(Error::Unseal)?);
        b.copy_from_slice(ss_kem.get(..32).ok_or(Error::Unseal)?);
        let prk =
            Salt::new(HKDF_SHA256, b"sovereign-kms/hybrid-seal-v1").extract(ikm.expose_secret());
        let bound = bound_aad(purpose, aad);
        let info: [&[u8]; 5] = [eph_public, ct_kem, &self.x25519, &self.ml_kem_768, &bound];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .map_err(|_| Error::Internal("hkdf expand"))?;
        Ok(LessSafeKey::new(UnboundKey::from(okm)))
    }
}

fn bound_aad(purpose: Purpose, aad: &[u8]) -> Vec<u8> {
    let mut bound = purpose.as_str().as_bytes().to_vec();
    bound.push(0);
    bound.extend_from_slice(aad);
    bound
}

/// What is stored of the recovery key: both public halves and the ML-KEM decapsulation key
/// sealed under a key derived from the recovery secret. Nothing here opens a seal.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RecoveryKeyRecord {
    /// The ceremony that made it.
    pub ceremony_id: CeremonyId,
    /// Its epoch (1 at init; each reshare adds one).
    pub epoch: Epoch,
    /// The public key.
    pub public: RecoveryPublicKey,
    /// Nonce and AES-256-GCM of the ML-KEM-768 decapsulation key, base64.
    #[serde(with = "b64")]
    pub sealed_ml_kem_768: Vec<u8>,
}

impl RecoveryKeyRecord {
    /// Parses a stored record and checks the public key's lengths.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let record: Self = serde_json::from_slice(bytes).map_err(|_| Error::Record {
            fault: "not a recovery key record",
        })?;
        check_public(&record.public)?;
        Ok(record)
    }

    /// The record as stored.
    pub fn to_json(&self) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(self).map_err(|_| Error::Internal("record encoding"))
    }

    /// Makes the recovery key pair for `secret`: X25519 derived from it, ML-KEM-768 generated
    /// and sealed under a key derived from it.
    pub fn create(
        secret: &RecoverySecret,
        ceremony_id: CeremonyId,
        epoch: Epoch,
        rng: &dyn Random,
    ) -> Result<Self, Error> {
        let x = x25519_private(secret, ceremony_id)?;
        let x_public = x
            .compute_public_key()
            .map_err(|_| Error::Internal("x25519 public key"))?;
        let dk = DecapsulationKey::generate(&ML_KEM_768).map_err(|_| Error::Random)?;
        let ek = dk
            .encapsulation_key()
            .and_then(|ek| ek.key_bytes())
            .map_err(|_| Error::Internal("ml-kem public key"))?;
        let dk_bytes = dk
            .key_bytes()
            .map_err(|_| Error::Internal("ml-kem private key"))?;
        let seal_key = mlkem_seal_key(secret, ceremony_id)?;
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce).map_err(|_| Error::Random)?;
        let mut body = dk_bytes.as_ref().to_vec();
        let sealed = seal_key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(mlkem_aad(ceremony_id, epoch, ek.as_ref())),
            &mut body,
        );
        let mut out = nonce.to_vec();
        out.extend_from_slice(&body);
        zeroize::Zeroize::zeroize(&mut body);
        sealed.map_err(|_| Error::Internal("aes-gcm seal"))?;
        Ok(Self {
            ceremony_id,
            epoch,
            public: RecoveryPublicKey {
                x25519: x_public.as_ref().to_vec(),
                ml_kem_768: ek.as_ref().to_vec(),
            },
            sealed_ml_kem_768: out,
        })
    }

    /// Rebuilds the private key from the secret. Fails (opaquely) if the secret is not this
    /// record's, or the record was changed.
    pub fn private_key(&self, secret: &RecoverySecret) -> Result<RecoveryPrivateKey, Error> {
        let x = x25519_private(secret, self.ceremony_id)?;
        let x_public = x.compute_public_key().map_err(|_| Error::Unseal)?;
        if x_public.as_ref() != self.public.x25519.as_slice() {
            return Err(Error::Unseal);
        }
        let (nonce, sealed) = self
            .sealed_ml_kem_768
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(Error::Record {
                fault: "sealed ML-KEM key is truncated",
            })?;
        let mut body = sealed.to_vec();
        let key = mlkem_seal_key(secret, self.ceremony_id)?;
        let opened = key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(mlkem_aad(
                    self.ceremony_id,
                    self.epoch,
                    &self.public.ml_kem_768,
                )),
                &mut body,
            )
            .map(|plain| DecapsulationKey::new(&ML_KEM_768, plain));
        zeroize::Zeroize::zeroize(&mut body);
        // The seal's AAD binds the public key, so a record whose ML-KEM public key was
        // swapped does not open (a decapsulation key made from bytes cannot say its public
        // key).
        let dk = opened
            .map_err(|_| Error::Unseal)?
            .map_err(|_| Error::Unseal)?;
        Ok(RecoveryPrivateKey {
            x25519: x,
            ml_kem: dk,
            public: self.public.clone(),
        })
    }
}

fn x25519_private(secret: &RecoverySecret, ceremony_id: CeremonyId) -> Result<PrivateKey, Error> {
    let derived = secret.derive(ceremony_id, Derive::X25519)?;
    PrivateKey::from_private_key(&X25519, derived.expose_secret())
        .map_err(|_| Error::Internal("x25519 private key"))
}

fn mlkem_seal_key(secret: &RecoverySecret, ceremony_id: CeremonyId) -> Result<LessSafeKey, Error> {
    let derived = secret.derive(ceremony_id, Derive::MlKemSeal)?;
    UnboundKey::new(&AES_256_GCM, derived.expose_secret())
        .map(LessSafeKey::new)
        .map_err(|_| Error::Internal("aes-gcm key"))
}

fn mlkem_aad(ceremony_id: CeremonyId, epoch: Epoch, public: &[u8]) -> Vec<u8> {
    let mut aad = b"sovereign-kms/recovery-mlkem-seal-v1".to_vec();
    aad.extend_from_slice(ceremony_id.as_bytes());
    aad.extend_from_slice(&epoch.get().to_be_bytes());
    aad.extend_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, public).as_ref());
    aad
}

/// The recovery private key, rebuilt from k shares. Only a recovery ceremony holds one.
pub struct RecoveryPrivateKey {
    x25519: PrivateKey,
    ml_kem: DecapsulationKey,
    public: RecoveryPublicKey,
}

impl RecoveryPrivateKey {
    /// Opens a seal made for `purpose` and `aad`.
    pub fn open(
        &self,
        purpose: Purpose,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<SecretSlice<u8>, Error> {
        if sealed.len() < SEAL_HEADER_LEN + TAG_LEN {
            return Err(Error::Unseal);
        }
        let (version, rest) = sealed.split_first().ok_or(Error::Unseal)?;
        if *version != SEAL_V1 {
            return Err(Error::Unseal);
        }
        let (eph_public, rest) = rest.split_at_checked(X25519_LEN).ok_or(Error::Unseal)?;
        let (ct_kem, rest) = rest.split_at_checked(MLKEM_CT_LEN).ok_or(Error::Unseal)?;
        let (nonce, body) = rest.split_first_chunk::<NONCE_LEN>().ok_or(Error::Unseal)?;
        let ss_kem = self
            .ml_kem
            .decapsulate(Ciphertext::from(ct_kem))
            .map_err(|_| Error::Unseal)?;
        let peer = UnparsedPublicKey::new(&X25519, eph_public);
        let key = agreement::agree(&self.x25519, peer, Error::Unseal, |dh| {
            self.public
                .seal_key(dh, ss_kem.as_ref(), eph_public, ct_kem, purpose, aad)
        })?;
        let mut buf = body.to_vec();
        let opened = key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(bound_aad(purpose, aad)),
                &mut buf,
            )
            .map(|plain| SecretSlice::from(plain.to_vec()));
        zeroize::Zeroize::zeroize(&mut buf);
        opened.map_err(|_| Error::Unseal)
    }

    /// The public half.
    pub fn public(&self) -> &RecoveryPublicKey {
        &self.public
    }
}

impl fmt::Debug for RecoveryPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoveryPrivateKey(<redacted>)")
    }
}

/// Length checks of the stored public key.
fn check_public(public: &RecoveryPublicKey) -> Result<(), Error> {
    if public.x25519.len() != X25519_LEN || public.ml_kem_768.len() != MLKEM_EK_LEN {
        return Err(Error::Record {
            fault: "recovery public key has the wrong length",
        });
    }
    Ok(())
}

pub(crate) mod b64 {
    use base64::Engine as _;

    use super::B64;

    pub(crate) fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        B64.decode(text).map_err(serde::de::Error::custom)
    }
}

pub(crate) mod hexs {
    pub(crate) fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::rand::SystemRandom;

    use super::*;

    fn pair() -> (RecoveryKeyRecord, RecoveryPrivateKey) {
        let rng = SystemRandom::new();
        let secret = RecoverySecret::generate(&rng).unwrap();
        let record = RecoveryKeyRecord::create(
            &secret,
            CeremonyId::new_v4_from(&rng).unwrap(),
            Epoch::FIRST,
            &rng,
        )
        .unwrap();
        let private = record.private_key(&secret).unwrap();
        (record, private)
    }

    #[test]
    fn seal_opens_with_the_private_key_and_binds_purpose_and_aad() {
        let rng = SystemRandom::new();
        let (record, private) = pair();
        let sealed = record
            .public
            .seal(
                &rng,
                Purpose::SoftwareVersion,
                b"key-1",
                b"thirty-two bytes of key material",
            )
            .unwrap();
        let opened = private
            .open(Purpose::SoftwareVersion, b"key-1", &sealed)
            .unwrap();
        assert_eq!(opened.expose_secret(), b"thirty-two bytes of key material");
        assert!(matches!(
            private.open(Purpose::SoftwareVersion, b"key-2", &sealed),
            Err(Error::Unseal)
        ));
        assert!(matches!(
            private.open(Purpose::EscrowKey, b"key-1", &sealed),
            Err(Error::Unseal)
        ));
        for at in [0, 5, 40, SEAL_HEADER_LEN - 3, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(
                private
                    .open(Purpose::SoftwareVersion, b"key-1", &bad)
                    .is_err(),
                "flip at {at}"
            );
        }
    }

    #[test]
    fn opening_needs_both_the_x25519_and_the_ml_kem_secret() {
        let rng = SystemRandom::new();
        let secret = RecoverySecret::generate(&rng).unwrap();
        let id = CeremonyId::new_v4_from(&rng).unwrap();
        let record = RecoveryKeyRecord::create(&secret, id, Epoch::FIRST, &rng).unwrap();
        let sealed = record
            .public
            .seal(&rng, Purpose::GrantMacKey, b"", b"secret")
            .unwrap();
        let (_, other) = pair();
        // The right X25519 secret with another ML-KEM secret, then the other way round.
        let right = record.private_key(&secret).unwrap();
        let x_only = RecoveryPrivateKey {
            x25519: right.x25519,
            ml_kem: other.ml_kem,
            public: record.public.clone(),
        };
        assert!(matches!(
            x_only.open(Purpose::GrantMacKey, b"", &sealed),
            Err(Error::Unseal)
        ));
        let right = record.private_key(&secret).unwrap();
        let kem_only = RecoveryPrivateKey {
            x25519: other.x25519,
            ml_kem: right.ml_kem,
            public: record.public.clone(),
        };
        assert!(matches!(
            kem_only.open(Purpose::GrantMacKey, b"", &sealed),
            Err(Error::Unseal)
        ));
        let right = record.private_key(&secret).unwrap();
        assert_eq!(
            right
                .open(Purpose::GrantMacKey, b"", &sealed)
                .unwrap()
                .expose_secret(),
            b"secret"
        );
    }

    #[test]
    fn a_wrong_secret_does_not_rebuild_the_private_key() {
        let rng = SystemRandom::new();
        let (record, _) = pair();
        let other = RecoverySecret::generate(&rng).unwrap();
        assert!(matches!(record.private_key(&other), Err(Error::Unseal)));
        // A record whose ML-KEM public key was swapped does not rebuild either.
        let secret = RecoverySecret::generate(&rng).unwrap();
        let id = CeremonyId::new_v4_from(&rng).unwrap();
        let mut record = RecoveryKeyRecord::create(&secret, id, Epoch::FIRST, &rng).unwrap();
        assert!(record.private_key(&secret).is_ok());
        record.public.ml_kem_768 = pair().0.public.ml_kem_768;
        assert!(matches!(record.private_key(&secret), Err(Error::Unseal)));
        let parsed = RecoveryKeyRecord::parse(&record.to_json().unwrap()).unwrap();
        assert_eq!(parsed, record);
    }
}

//! The recovery secret and the keys derived from it.

use std::fmt;

use crate::Random;
use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};

use crate::{CeremonyId, Error};

/// Length of the recovery secret (the input size of `shamirsecretsharing::create_shares`).
pub const SECRET_LEN: usize = shamirsecretsharing::DATA_SIZE;

/// Length of every derived key.
pub(crate) const DERIVED_LEN: usize = 32;

/// What a derived key is for; each is its own HKDF `info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Derive {
    /// The AES-256-GCM key sealing the ML-KEM-768 decapsulation key.
    MlKemSeal,
    /// The transcript's HMAC-SHA256 key.
    TranscriptMac,
    /// The X25519 private key.
    X25519,
}

impl Derive {
    fn info(self) -> &'static [u8] {
        match self {
            Derive::MlKemSeal => b"sovereign-kms/recovery-mlkem-seal-v1",
            Derive::TranscriptMac => b"sovereign-kms/transcript-mac-v1",
            Derive::X25519 => b"sovereign-kms/recovery-x25519-v1",
        }
    }
}

/// The 64-byte recovery secret. It exists only in the memory of a ceremony: made at init and
/// split into shares, or rebuilt from k shares at recovery. Wiped when dropped.
pub struct RecoverySecret(SecretBox<[u8; SECRET_LEN]>);

impl RecoverySecret {
    /// A fresh secret from `rng`.
    pub fn generate(rng: &dyn Random) -> Result<Self, Error> {
        let mut secret = SecretBox::new(Box::new([0u8; SECRET_LEN]));
        rng.fill(secret.expose_secret_mut())
            .map_err(|_| Error::Random)?;
        Ok(Self(secret))
    }

    /// Takes the bytes of a combined secret, wiping `bytes`.
    pub(crate) fn take(bytes: &mut [u8]) -> Result<Self, Error> {
        let mut secret = SecretBox::new(Box::new([0u8; SECRET_LEN]));
        let fits = <&[u8; SECRET_LEN]>::try_from(&*bytes)
            .map(|b| secret.expose_secret_mut().copy_from_slice(b))
            .is_ok();
        zeroize::Zeroize::zeroize(bytes);
        if !fits {
            return Err(Error::Combine);
        }
        Ok(Self(secret))
    }

    /// The secret's bytes.
    pub(crate) fn expose_secret(&self) -> &[u8; SECRET_LEN] {
        self.0.expose_secret()
    }

    /// A 32-byte key for `what`, bound to the ceremony (HKDF-SHA256, salt = ceremony id).
    pub(crate) fn derive(&self, ceremony: CeremonyId, what: Derive) -> Result<DerivedKey, Error> {
        let prk = Salt::new(HKDF_SHA256, ceremony.as_bytes()).extract(self.expose_secret());
        let info = [what.info()];
        let okm = prk
            .expand(&info, HKDF_SHA256)
            .map_err(|_| Error::Internal("hkdf expand"))?;
        let mut failed = false;
        let key = SecretBox::init_with_mut(|buf: &mut [u8; DERIVED_LEN]| {
            failed = okm.fill(buf).is_err();
        });
        if failed {
            return Err(Error::Internal("hkdf fill"));
        }
        Ok(DerivedKey(key))
    }
}

impl fmt::Debug for RecoverySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoverySecret(<redacted>)")
    }
}

/// A key derived from the recovery secret. Wiped when dropped.
pub(crate) struct DerivedKey(SecretBox<[u8; DERIVED_LEN]>);

impl DerivedKey {
    pub(crate) fn expose_secret(&self) -> &[u8; DERIVED_LEN] {
        self.0.expose_secret()
    }
}

impl fmt::Debug for DerivedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DerivedKey(<redacted>)")
    }
}

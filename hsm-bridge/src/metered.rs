//! An [`Hsm`] that tells a meter of every operation: which, how it ended and how long it took.
//! The key service runs on a metered HSM when the node serves metrics; the meter (Prometheus
//! counters in the server) lives outside this crate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretSlice;

use crate::escrow::{EscrowPin, EscrowedKey, ObjectId};
use crate::{
    CheckValue, Error, Hsm, IdentifiedKey, KeyAttributes, Result, SigningKey, TokenFacts, TokenKey,
    GCM_NONCE_LEN,
};

/// An HSM operation, as a meter counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HsmOp {
    /// `C_GenerateRandom`.
    Random,
    /// An AES key generated (with its escrow wrap, for `hsm` versions).
    GenerateKey,
    /// An object search.
    FindKey,
    /// An object destroyed.
    DestroyKey,
    /// The escrow self-test.
    SelfTest,
    /// AES-256-GCM encryption.
    Encrypt,
    /// AES-256-GCM decryption.
    Decrypt,
    /// Attributes read back.
    ReadAttributes,
    /// The signing key pair found or generated.
    SigningKey,
    /// An ECDSA P-256 signature.
    Sign,
    /// Token facts read.
    Describe,
}

impl HsmOp {
    /// Every operation, in the order of [`HsmOp::index`].
    pub const ALL: [HsmOp; 11] = [
        Self::Random,
        Self::GenerateKey,
        Self::FindKey,
        Self::DestroyKey,
        Self::SelfTest,
        Self::Encrypt,
        Self::Decrypt,
        Self::ReadAttributes,
        Self::SigningKey,
        Self::Sign,
        Self::Describe,
    ];

    /// Its place in [`HsmOp::ALL`], for a meter that keeps one slot per operation.
    pub fn index(self) -> usize {
        match self {
            Self::Random => 0,
            Self::GenerateKey => 1,
            Self::FindKey => 2,
            Self::DestroyKey => 3,
            Self::SelfTest => 4,
            Self::Encrypt => 5,
            Self::Decrypt => 6,
            Self::ReadAttributes => 7,
            Self::SigningKey => 8,
            Self::Sign => 9,
            Self::Describe => 10,
        }
    }

    /// The operation's name, as a label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::GenerateKey => "generate_key",
            Self::FindKey => "find_key",
            Self::DestroyKey => "destroy_key",
            Self::SelfTest => "self_test",
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::ReadAttributes => "read_attributes",
            Self::SigningKey => "signing_key",
            Self::Sign => "sign",
            Self::Describe => "describe",
        }
    }

    /// The PKCS#11 mechanism it runs, as a label (`none` for object management).
    pub fn mechanism(self) -> &'static str {
        match self {
            Self::Random => "rng",
            Self::GenerateKey => "aes_key_gen",
            Self::Encrypt | Self::Decrypt => "aes_gcm",
            Self::SigningKey | Self::Sign => "ecdsa_p256",
            Self::FindKey
            | Self::DestroyKey
            | Self::SelfTest
            | Self::ReadAttributes
            | Self::Describe => "none",
        }
    }
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HsmOutcome {
    /// It succeeded.
    Ok,
    /// A wrong key, nonce, AAD or tag: the caller's input, not the device.
    DecryptFailed,
    /// Any other failure: the token, the session, the module.
    Error,
}

impl HsmOutcome {
    /// How `result` ended.
    pub fn of<T>(result: &Result<T>) -> Self {
        match result {
            Ok(_) => Self::Ok,
            Err(Error::DecryptFailed) => Self::DecryptFailed,
            Err(_) => Self::Error,
        }
    }

    /// Its name, as a label: `ok`, `decrypt_failed`, `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::DecryptFailed => "decrypt_failed",
            Self::Error => "error",
        }
    }

    /// 0, 1 or 2, for a meter that keeps one slot per outcome.
    pub fn index(self) -> usize {
        match self {
            Self::Ok => 0,
            Self::DecryptFailed => 1,
            Self::Error => 2,
        }
    }
}

/// What is told of each operation. Called on the thread that ran it: keep it quick.
pub trait HsmMeter: Send + Sync {
    /// `op` ended with `outcome` after `took`.
    fn observe(&self, op: HsmOp, outcome: HsmOutcome, took: Duration);
}

/// `inner`, with every operation told to `meter`.
pub struct Metered {
    inner: Arc<dyn Hsm>,
    meter: Arc<dyn HsmMeter>,
}

impl Metered {
    /// Meters `inner`.
    pub fn new(inner: Arc<dyn Hsm>, meter: Arc<dyn HsmMeter>) -> Self {
        Self { inner, meter }
    }

    fn timed<T>(&self, op: HsmOp, f: impl FnOnce(&dyn Hsm) -> Result<T>) -> Result<T> {
        let started = stopwatch();
        let result = f(self.inner.as_ref());
        self.meter
            .observe(op, HsmOutcome::of(&result), started.elapsed());
        result
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "an HSM operation's duration is measured wall time"
)]
fn stopwatch() -> Instant {
    Instant::now()
}

impl Hsm for Metered {
    fn random(&self, out: &mut [u8]) -> Result<()> {
        self.timed(HsmOp::Random, |h| h.random(out))
    }

    fn root_key(&self) -> TokenKey {
        self.inner.root_key()
    }

    fn generate_aes_key(&self, label: &str, id: &ObjectId) -> Result<TokenKey> {
        self.timed(HsmOp::GenerateKey, |h| h.generate_aes_key(label, id))
    }

    fn generate_escrowed_key(
        &self,
        label: &str,
        id: &ObjectId,
        escrow: &EscrowPin,
    ) -> Result<EscrowedKey> {
        self.timed(HsmOp::GenerateKey, |h| {
            h.generate_escrowed_key(label, id, escrow)
        })
    }

    fn find_aes_key(&self, label: &str) -> Result<TokenKey> {
        self.timed(HsmOp::FindKey, |h| h.find_aes_key(label))
    }

    fn find_key_by_id(&self, id: &ObjectId, check_value: &CheckValue) -> Result<TokenKey> {
        self.timed(HsmOp::FindKey, |h| h.find_key_by_id(id, check_value))
    }

    fn aes_keys_by_id(&self) -> Result<Vec<IdentifiedKey>> {
        self.timed(HsmOp::FindKey, |h| h.aes_keys_by_id())
    }

    fn destroy_key(&self, key: TokenKey) -> Result<()> {
        self.timed(HsmOp::DestroyKey, |h| h.destroy_key(key))
    }

    fn escrow_self_test(&self, escrow: Option<&EscrowPin>) -> Result<()> {
        self.timed(HsmOp::SelfTest, |h| h.escrow_self_test(escrow))
    }

    fn aes_gcm_encrypt(
        &self,
        key: TokenKey,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        self.timed(HsmOp::Encrypt, |h| {
            h.aes_gcm_encrypt(key, nonce, aad, plaintext)
        })
    }

    fn aes_gcm_decrypt(
        &self,
        key: TokenKey,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<SecretSlice<u8>> {
        self.timed(HsmOp::Decrypt, |h| {
            h.aes_gcm_decrypt(key, nonce, aad, ciphertext)
        })
    }

    fn key_attributes(&self, key: TokenKey) -> Result<KeyAttributes> {
        self.timed(HsmOp::ReadAttributes, |h| h.key_attributes(key))
    }

    fn p256_signing_key(&self, label: &str) -> Result<SigningKey> {
        self.timed(HsmOp::SigningKey, |h| h.p256_signing_key(label))
    }

    fn ecdsa_sign_digest(&self, key: &SigningKey, digest: &[u8; 32]) -> Result<Vec<u8>> {
        self.timed(HsmOp::Sign, |h| h.ecdsa_sign_digest(key, digest))
    }

    fn describe(&self) -> Result<(TokenFacts, std::path::PathBuf)> {
        self.timed(HsmOp::Describe, |h| h.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_its_own_slot() {
        for (i, op) in HsmOp::ALL.iter().enumerate() {
            assert_eq!(op.index(), i, "{op:?}");
        }
        let names: std::collections::HashSet<_> = HsmOp::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(names.len(), HsmOp::ALL.len());
        let outcomes = [HsmOutcome::Ok, HsmOutcome::DecryptFailed, HsmOutcome::Error];
        for (i, o) in outcomes.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
        assert_eq!(
            HsmOutcome::of::<()>(&Err(Error::DecryptFailed)),
            HsmOutcome::DecryptFailed
        );
    }
}

//! # Design overview
//!
//! `hsm-bridge` is the only road from sovereign-kms to its hardware security module. It speaks
//! PKCS#11 through the `cryptoki` crate, with no `unsafe` of its own.
//!
//! What it does:
//! - loads a module, finds the token by label, logs in once and keeps the login alive;
//! - hands out sessions from a bounded pool *by move* (one operation per session at a time);
//! - finds or creates the root wrapping key (AES-256, sensitive, non-extractable) by label;
//! - wraps and unwraps key material under the root key (AES-256-GCM inside the token);
//! - generates token-resident AES-256 keys and runs AES-256-GCM with them;
//! - draws random bytes from the token;
//! - classifies errors: session loss and device faults are retried once on a fresh session,
//!   wrong PINs and missing tokens are fatal and name the token and module.
//!
//! What it does not do: it never reads `CKA_VALUE`, never holds key bytes except in the
//! zeroizing buffers it hands back, and never runs on an async worker: every method blocks,
//! and async callers run it under `spawn_blocking`.
//!
//! ```text
//!   kms-core ──(&dyn Hsm, blocking)──▶ Pkcs11Hsm ──▶ SessionPool ──▶ cryptoki ──▶ token
//!                                          │
//!                                          └── root key handle, cached at open
//! ```

mod config;
mod error;
mod escrow;
mod metered;
mod pool;
mod slot;
pub mod softhsm;
#[cfg(feature = "test-support")]
pub mod test_support;
mod token;

use secrecy::SecretSlice;

pub use config::{
    find_softhsm2_module, HsmConfig, DEFAULT_MAX_SESSIONS, DEFAULT_ROOT_KEY_LABEL,
    SOFTHSM2_MODULE_PATHS,
};
pub use cryptoki::context::Function;
pub use cryptoki::error::RvError;
pub use error::{Error, Result};
pub use escrow::{
    import_trusted_escrow_key, CheckValue, EscrowPin, EscrowedKey, ObjectId, ObjectReport,
    CHECK_VALUE_LEN, OBJECT_ID_LEN,
};
pub use metered::{HsmMeter, HsmOp, HsmOutcome, Metered};
pub use pool::PoolStats;
pub use token::{token_objects, Pkcs11Hsm, TokenFacts};

/// Length of an AES-GCM nonce in bytes (96 bits, SP 800-38D §8.2.1 deterministic IV length).
pub const GCM_NONCE_LEN: usize = 12;
/// Length of an AES-GCM tag in bytes.
pub const GCM_TAG_LEN: usize = 16;

/// A handle to a key object on the token. It names the key; it holds no key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenKey(pub(crate) cryptoki::object::ObjectHandle);

/// Length of an ECDSA P-256 signature as the fixed-width pair r ‖ s.
pub const ECDSA_P256_SIG_LEN: usize = 64;
/// Length of an uncompressed SEC1 P-256 public point (0x04 ‖ x ‖ y).
pub const P256_POINT_LEN: usize = 65;

/// An ECDSA P-256 key pair on the token: a sensitive, non-extractable private key that only
/// signs, and its public point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigningKey {
    private: cryptoki::object::ObjectHandle,
    public_point: [u8; P256_POINT_LEN],
}

impl SigningKey {
    /// The public key as an uncompressed SEC1 point, for export and verification.
    pub fn public_point(&self) -> &[u8; P256_POINT_LEN] {
        &self.public_point
    }
}

/// Something the audit log should know about the token's health.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HsmEvent {
    /// A session was lost or the device failed; the operation is retried once on a fresh
    /// session.
    Retry {
        /// What failed.
        error: String,
    },
}

/// A function told about [`HsmEvent`]s (the server points it at the audit log).
pub type HsmObserver = Box<dyn Fn(&HsmEvent) + Send + Sync>;

/// Security attributes read back from a token key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyAttributes {
    /// `CKA_TOKEN`: the object persists on the token.
    pub token: bool,
    /// `CKA_SENSITIVE`: the value can never be read in the clear.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`: the value can be wrapped out of the token.
    pub extractable: bool,
    /// `CKA_NEVER_EXTRACTABLE`: the value has never been extractable.
    pub never_extractable: bool,
    /// `CKA_VALUE_LEN` in bytes.
    pub value_len: u64,
}

/// An AES token key found by [`Hsm::aes_keys_by_id`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentifiedKey {
    /// Its `CKA_ID`.
    pub id: ObjectId,
    /// Its `CKA_CHECK_VALUE`.
    pub check_value: CheckValue,
    /// The handle.
    pub key: TokenKey,
    /// Whether it can wrap, unwrap or derive (`CKA_WRAP`, `CKA_UNWRAP`, `CKA_DERIVE`), which a
    /// key version never may.
    pub widened: bool,
}

/// The operations the KMS needs from an HSM. Every method blocks.
pub trait Hsm: Send + Sync {
    /// Fills `out` with random bytes from the token's generator.
    fn random(&self, out: &mut [u8]) -> Result<()>;

    /// The root wrapping key.
    fn root_key(&self) -> TokenKey;

    /// Generates a token-resident, sensitive, non-extractable AES-256 key that only encrypts
    /// and decrypts, labelled `label` with `CKA_ID` `id`. It is not escrowed: `hsm` key
    /// versions use [`Hsm::generate_escrowed_key`].
    fn generate_aes_key(&self, label: &str, id: &ObjectId) -> Result<TokenKey>;

    /// Generates an AES-256 key in the token, wraps it once under the trusted escrow key
    /// `escrow` names (`CKM_AES_KEY_WRAP_PAD`), records its check value, locks it
    /// non-extractable and reads its attributes back, all in one session. Any failed step
    /// destroys the object; the generate is never retried.
    fn generate_escrowed_key(
        &self,
        label: &str,
        id: &ObjectId,
        escrow: &EscrowPin,
    ) -> Result<EscrowedKey>;

    /// Finds a token-resident AES key by label; more than one with the label is refused.
    fn find_aes_key(&self, label: &str) -> Result<TokenKey>;

    /// Finds the one AES key with `CKA_ID` `id` and checks its check value, so a planted
    /// object cannot stand in for it.
    fn find_key_by_id(&self, id: &ObjectId, check_value: &CheckValue) -> Result<TokenKey>;

    /// Every AES secret key on the token that has a 16-byte `CKA_ID` and a check value, in one
    /// pass (for loading many versions at start without one search each).
    fn aes_keys_by_id(&self) -> Result<Vec<IdentifiedKey>>;

    /// Destroys a token key (one whose creation could not be recorded).
    fn destroy_key(&self, key: TokenKey) -> Result<()>;

    /// The token self-test `hsm` escrow relies on: a `CKA_WRAP_WITH_TRUSTED` key does not wrap
    /// under an untrusted key, the user cannot make a key trusted, and, when `escrow` is
    /// given, the pinned escrow key is present with the expected attributes and check value.
    fn escrow_self_test(&self, escrow: Option<&EscrowPin>) -> Result<()>;

    /// AES-256-GCM encryption inside the token; returns ciphertext with the 16-byte tag.
    fn aes_gcm_encrypt(
        &self,
        key: TokenKey,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>>;

    /// AES-256-GCM decryption inside the token. A wrong key, nonce, AAD or tag gives the
    /// opaque [`Error::DecryptFailed`].
    fn aes_gcm_decrypt(
        &self,
        key: TokenKey,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<SecretSlice<u8>>;

    /// Reads back a key's security attributes.
    fn key_attributes(&self, key: TokenKey) -> Result<KeyAttributes>;

    /// Finds the ECDSA P-256 key pair labelled `label`, generating it in the token on first
    /// use (private key sensitive, non-extractable, sign only).
    fn p256_signing_key(&self, label: &str) -> Result<SigningKey>;

    /// Signs a SHA-256 digest with ECDSA inside the token; returns r ‖ s (64 bytes).
    fn ecdsa_sign_digest(&self, key: &SigningKey, digest: &[u8; 32]) -> Result<Vec<u8>>;

    /// Where the keys live: what `C_GetTokenInfo` says of the token, and the PKCS#11 module
    /// it was loaded from (for attestations).
    fn describe(&self) -> Result<(TokenFacts, std::path::PathBuf)>;
}

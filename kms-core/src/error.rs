//! The one error type of the core.

use crate::blob::BlobError;
use crate::ids::{Alias, KeyId, KeyRef, KeyVersion};
use crate::key::KeyState;

/// Everything a core operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another key already has this alias.
    #[error("alias {alias} is already in use")]
    AliasTaken {
        /// The alias.
        alias: Alias,
    },
    /// The ciphertext is malformed; refused before any key was touched.
    #[error("malformed ciphertext: {0}")]
    Blob(#[from] BlobError),
    /// Authenticated decryption failed. No reason and no key identity, by design.
    #[error("decryption failed")]
    DecryptFailed,
    /// The authorizer refused the request.
    #[error("request denied")]
    Denied {
        /// The determining policies (empty: nothing allowed it).
        policies: Vec<String>,
    },
    /// A presented grant does not cover this request.
    #[error("grant refused: {reason}")]
    GrantRefused {
        /// Stable reason, e.g. `grant.context_mismatch`.
        reason: &'static str,
    },
    /// A grant's time to live is zero or above the maximum.
    #[error("grant ttl must be 1 to {max_secs} seconds")]
    GrantTtl {
        /// The maximum.
        max_secs: u64,
    },
    /// A registration would outlive the configured maximum.
    #[error("expiry is too far away: at most {max_secs} seconds from now")]
    ExpiryTooFar {
        /// The maximum lifetime.
        max_secs: u64,
    },
    /// A policy text does not parse or does not validate against the schema.
    #[error("policy {id} is invalid: {message}")]
    PolicyInvalid {
        /// The offending policy (or statement) id.
        id: String,
        /// What Cedar reported.
        message: String,
    },
    /// No current policy with this id (or no such version).
    #[error("policy {id} not found")]
    PolicyNotFound {
        /// The id.
        id: String,
    },
    /// A workload with this selector is already registered.
    #[error("workload {selector} is already registered")]
    WorkloadExists {
        /// The selector.
        selector: String,
    },
    /// No workload with this selector is registered.
    #[error("workload {selector} is not registered")]
    WorkloadNotFound {
        /// The selector.
        selector: String,
    },
    /// The HSM failed.
    #[error("hsm")]
    Hsm(#[source] hsm_bridge::Error),
    /// A state the code rules out was reached.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// Caller input failed validation.
    #[error("invalid {0}")]
    Invalid(InvalidInput),
    /// No key with this id or alias.
    #[error("key {key} not found")]
    KeyNotFound {
        /// How the caller named it.
        key: KeyRef,
    },
    /// The key's state forbids the operation.
    #[error("key {id} is {state:?}; {op:?} refused")]
    KeyState {
        /// The key.
        id: KeyId,
        /// Its state.
        state: KeyState,
        /// What was attempted.
        op: Op,
    },
    /// The audit log's stored chain is damaged at this sequence number.
    #[error("audit log is damaged at record {seq}; run `kms audit verify`")]
    AuditCorrupt {
        /// Where.
        seq: u64,
    },
    /// A stored record could not be decoded.
    #[error("stored {table} record is corrupt")]
    Record {
        /// Which table.
        table: &'static str,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The random generator failed.
    #[error("random generator failed")]
    Rng,
    /// The store failed.
    #[error("storage: {op}")]
    Store {
        /// What the store was doing.
        op: &'static str,
        /// The store's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An input is larger than the operation accepts.
    #[error("{what} too large: {len}, at most {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A blob names a key version that does not exist.
    #[error("key {id} has no version {version}")]
    VersionNotFound {
        /// The key.
        id: KeyId,
        /// The missing version.
        version: KeyVersion,
    },
}

/// Which caller input was invalid.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInput {
    /// Alias syntax.
    #[error("alias (1-64 of A-Z a-z 0-9 / _ - ., not a UUID)")]
    Alias,
    /// Encryption context bounds or duplicates.
    #[error("encryption context (at most 64 unique keys of 1-128 bytes, values up to 1024 bytes)")]
    Context,
    /// Key id syntax.
    #[error("key id (a UUID)")]
    KeyId,
    /// Key reference syntax.
    #[error("key reference (a key id or an alias)")]
    KeyRef,
    /// Label syntax.
    #[error("label (keys 1-64 of a-z 0-9 _ - ., values up to 256 printable characters)")]
    Label,
    /// Paging token.
    #[error("page token")]
    PageToken,
    /// Workload selector syntax.
    #[error(
        "workload selector (a SPIFFE ID, or a SPIFFE ID followed by /* for every ID under it)"
    )]
    Selector,
    /// Owner or purpose text.
    #[error("owner or purpose (1-512 characters, no control characters)")]
    WorkloadText,
    /// Grant parameters.
    #[error("grant (at least one operation; max uses at least 1)")]
    Grant,
    /// Policy id syntax.
    #[error("policy id (1-64 of a-z 0-9 _ -, starting with a letter or digit)")]
    PolicyId,
    /// Trust domain syntax.
    #[error("trust domain (lower-case letters, digits, . - _)")]
    TrustDomain,
    /// An expiry in the past.
    #[error("expiry (must be in the future)")]
    Expiry,
}

/// Key operations, named in errors and decisions.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Op {
    /// Decrypt a blob.
    Decrypt,
    /// Encrypt a small secret.
    Encrypt,
    /// Generate a data key.
    GenerateDataKey,
    /// Re-encrypt a blob.
    ReEncrypt,
    /// Rotate a key.
    Rotate,
    /// Mint a task grant on a key.
    CreateGrant,
}

impl From<hsm_bridge::Error> for Error {
    fn from(e: hsm_bridge::Error) -> Self {
        match e {
            hsm_bridge::Error::DecryptFailed => Error::DecryptFailed,
            other => Error::Hsm(other),
        }
    }
}

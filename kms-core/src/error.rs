//! The one error type of the core.

use crate::blob::BlobError;
use crate::governance::approvals::ApprovalError;
use crate::governance::inventory::Selector;
use crate::governance::policy::{PolicyName, PolicyProblem};
use crate::ids::{Alias, KeyId, KeyRef, KeyVersion};
use crate::key::KeyState;
use crate::op::Op;

/// Everything a core operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another key already has this alias, or one that differs from it only in case.
    #[error("alias {alias} is already in use (aliases must differ in more than case)")]
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
    /// A grant was presented to create a grant: grants cannot be delegated further.
    #[error("a grant cannot be used to create grants")]
    GrantDelegation,
    /// A grant would allow an operation its creator may not do itself.
    #[error("the grant would allow more than you may do: {op}")]
    GrantExceedsCreator {
        /// The first operation the creator may not do.
        op: Op,
    },
    /// A policy text does not parse or does not validate against the schema.
    #[error("policy {id} is invalid: {problem}")]
    PolicyInvalid {
        /// The offending policy (or statement) id.
        id: cedar_policy::PolicyId,
        /// What Cedar reported (boxed: Cedar's errors are large, and every `Result` of the
        /// core carries this type).
        problem: Box<PolicyProblem>,
    },
    /// No current policy with this id (or no such version).
    #[error("policy {id} not found")]
    PolicyNotFound {
        /// The id.
        id: PolicyName,
    },
    /// A workload with this selector is already registered.
    #[error("workload {selector} is already registered")]
    WorkloadExists {
        /// The selector.
        selector: Selector,
    },
    /// An operator with this name or identity is already registered.
    #[error("operator {name} is already registered (names and identities are unique)")]
    OperatorExists {
        /// The registered operator's name.
        name: String,
    },
    /// No operator with this name is registered.
    #[error("operator {name} is not registered")]
    OperatorNotFound {
        /// The name asked for.
        name: String,
    },
    /// A step on an approval request was refused.
    #[error(transparent)]
    Approval(#[from] crate::governance::approvals::ApprovalError),
    /// No workload with this selector is registered.
    #[error("workload {selector} is not registered")]
    WorkloadNotFound {
        /// The selector.
        selector: Selector,
    },
    /// Custody is already initialised on this deployment.
    #[error("custody is already initialised (ceremony {ceremony}); a reshare replaces it")]
    CustodyInitialised {
        /// The ceremony on record.
        ceremony: String,
    },
    /// The operation needs custody, which is not initialised.
    #[error("custody is not initialised: run `kms ceremony init` first")]
    CustodyMissing,
    /// An `hsm` key version was asked for before custody exists: such versions are escrowed
    /// under the trusted escrow key that the init ceremony imports.
    #[error("hsm keys are escrowed when they are created and custody is not initialised: run `kms ceremony init` first (software keys work without it)")]
    HsmNeedsCustody,
    /// `hsm` protection cannot escrow on this token (why); software protection still works.
    #[error("hsm protection is unavailable: {reason}")]
    HsmEscrowUnavailable {
        /// What the token or the records lack.
        reason: String,
    },
    /// The recovery authority refused (a share, a transcript, a seal).
    #[error(transparent)]
    Recovery(#[from] recovery::Error),
    /// The service is sealed: no key is used until it is unsealed (with approvals).
    #[error("service sealed")]
    Sealed,
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
    /// The key's lifecycle state forbids an admin change.
    #[error("key {id} is {}: cannot {action}", .state.as_str())]
    KeyLifecycle {
        /// The key.
        id: KeyId,
        /// Its state.
        state: KeyState,
        /// What was asked.
        action: &'static str,
    },
    /// A backup cannot be made as the deployment stands.
    #[error("backup refused: {reason}")]
    BackupRefused {
        /// Why, and what to do.
        reason: String,
    },
    /// A destruction's waiting period is out of bounds.
    #[error("the waiting period must be {min} to {max} days, not {asked}")]
    WaitingPeriod {
        /// Days asked.
        asked: u32,
        /// The configured least.
        min: u32,
        /// The most.
        max: u32,
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
    /// An admin action name that is not one.
    #[error("action (an admin action such as admin.PutPolicy)")]
    Action,
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
    /// Operator name syntax.
    #[error("operator name (1-64 of a-z 0-9 _ - ., starting with a letter or digit)")]
    OperatorName,
    /// Operator identity syntax.
    #[error("operator identity (a URI such as spiffe://operators.example.org/alice, or x509-sha256:<64 hex digits>)")]
    OperatorIdentity,
    /// Operator roles.
    #[error("operator roles (one or more of operator, auditor)")]
    OperatorRoles,
    /// Approval rules.
    #[error("approval rules (required 1-16, expiry 1m-30d, gated actions among the gatable ones and always admin.SetApprovalRules)")]
    ApprovalRules,
    /// Seal reason.
    #[error("seal reason (1-1024 characters, no control characters)")]
    SealReason,
    /// Approval state name.
    #[error(
        "approval state (pending, approved, executed, failed, rejected, cancelled or expired)"
    )]
    ApprovalState,
    /// Operation name.
    #[error("operation (GenerateDataKey, Decrypt, Encrypt, ReEncrypt or CreateGrant)")]
    Operation,
}

/// What kind of failure an [`Error`] is, for the two planes' status mappers and the audit
/// record's decision. Every error has exactly one class, decided in [`Error::class`] without a
/// wildcard, so a new error cannot silently become "internal" on the wire or "allowed" in the
/// audit log.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[expect(
    clippy::exhaustive_enums,
    reason = "the planes map every class without a wildcard: a new class must fail their build"
)]
pub enum ErrorClass {
    /// The caller's input is malformed or out of bounds; refused before any decision.
    BadInput,
    /// Authenticated decryption failed: a wrong blob or context. Carries no reason.
    DecryptFailed,
    /// The object exists and the request was allowed, but its state forbids the operation.
    Precondition,
    /// Something the server relies on failed or was damaged; not the caller's doing.
    Internal,
    /// The thing asked for is absent, or the caller may not have it: the data plane answers
    /// both alike.
    NotFoundOrDenied,
    /// A name the request would create is taken.
    Conflict,
    /// A dependency is briefly unavailable; the caller may retry.
    Unavailable,
}

impl Error {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::AliasTaken { .. }
            | Error::CustodyInitialised { .. }
            | Error::OperatorExists { .. }
            | Error::WorkloadExists { .. } => ErrorClass::Conflict,
            Error::Approval(a) => match a {
                ApprovalError::NotFound { .. }
                | ApprovalError::NotRequester { .. }
                | ApprovalError::OwnRequest { .. } => ErrorClass::NotFoundOrDenied,
                ApprovalError::AlreadyApproved { .. } | ApprovalError::NotPending { .. } => {
                    ErrorClass::Precondition
                }
            },
            Error::CustodyMissing | Error::HsmNeedsCustody | Error::HsmEscrowUnavailable { .. } => {
                ErrorClass::Precondition
            }
            // A custodian's share or claim that does not match the ceremony on record.
            Error::Recovery(recovery::Error::Transcript { .. }) => ErrorClass::Precondition,
            Error::Recovery(_) => ErrorClass::Internal,
            Error::Blob(_)
            | Error::GrantTtl { .. }
            | Error::ExpiryTooFar { .. }
            | Error::Invalid(_)
            | Error::PolicyInvalid { .. }
            | Error::TooLarge { .. } => ErrorClass::BadInput,
            Error::DecryptFailed | Error::VersionNotFound { .. } => ErrorClass::DecryptFailed,
            Error::Denied { .. }
            | Error::GrantDelegation
            | Error::GrantExceedsCreator { .. }
            | Error::GrantRefused { .. }
            | Error::KeyNotFound { .. }
            | Error::OperatorNotFound { .. }
            | Error::PolicyNotFound { .. }
            | Error::WorkloadNotFound { .. } => ErrorClass::NotFoundOrDenied,
            Error::Hsm(h) if h.is_retryable() => ErrorClass::Unavailable,
            Error::Sealed => ErrorClass::Unavailable,
            Error::Hsm(_)
            | Error::Internal(_)
            | Error::AuditCorrupt { .. }
            | Error::Record { .. }
            | Error::Rng
            | Error::Store { .. } => ErrorClass::Internal,
            Error::KeyState { .. } | Error::KeyLifecycle { .. } | Error::BackupRefused { .. } => {
                ErrorClass::Precondition
            }
            Error::WaitingPeriod { .. } => ErrorClass::BadInput,
        }
    }
}

impl From<hsm_bridge::Error> for Error {
    fn from(e: hsm_bridge::Error) -> Self {
        match e {
            hsm_bridge::Error::DecryptFailed => Error::DecryptFailed,
            other => Error::Hsm(other),
        }
    }
}

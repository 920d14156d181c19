//! Destruction receipts (docs/APPROVALS.md): what a key's destruction deleted, who asked and
//! who approved, signed in the HSM with the audit signing key, and checkable offline with
//! only the signer's public key.
//!
//! The file is one JSON document in one canonical form (what [`Receipt::to_text`] writes);
//! [`verify`] refuses any other form, so no byte of a receipt can change unnoticed, not even
//! whitespace the signature does not cover.

use hsm_bridge::Hsm;
use serde::{Deserialize, Serialize};

use crate::audit::{sign_with_audit_key, signer_id};
use crate::error::Error;
use crate::key::{DeletedVersion, Protection};

/// The `format` of every receipt this code writes.
pub const FORMAT: &str = "sovereign-kms/destruction-receipt/v1";

/// The signature algorithm: ECDSA over P-256 with SHA-256, the signature as r ‖ s in hex.
pub const ALGORITHM: &str = "ECDSA-P256-SHA256";

/// What the signature covers before the statement's compact JSON.
const DOMAIN: &[u8] = b"sovereign-kms destruction receipt v1\n";

/// What a destruction deletes, as every receipt states it.
pub const DELETED: [&str; 4] = [
    "the store rows of every version: the material wrapped under the root key",
    "the escrow copies kept in those rows: software versions sealed to the recovery key, hsm versions wrapped under the escrow key",
    "the token object of every hsm version (C_DestroyObject)",
    "the versions' unwrapped material in the server's memory",
];

/// What no receipt can cover, as every receipt states it.
pub const NOT_COVERED: [&str; 3] = [
    "copies of the material in backups or exports made before destroyed_at",
    "snapshots of the disk, the store or the token taken outside this service",
    "blocks a filesystem or storage device keeps after the store deletes its files",
];

/// The signed statement.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// The destroyed key.
    pub key_id: String,
    /// Its alias at the time, if any.
    pub alias: Option<String>,
    /// Its protection level.
    pub protection: Protection,
    /// Every version destroyed, with its token object for `hsm` versions.
    pub versions: Vec<DeletedVersion>,
    /// When the destruction was scheduled, Unix seconds.
    pub scheduled_at: u64,
    /// When it was due, Unix seconds.
    pub destroy_at: u64,
    /// When the key was committed to `destroyed`, Unix seconds.
    pub destroyed_at: u64,
    /// The operator who asked.
    pub requested_by: String,
    /// The operators who approved.
    pub approvers: Vec<String>,
    /// The approval request that scheduled it.
    pub approval_id: Option<String>,
    /// What was deleted ([`DELETED`]).
    pub deleted: Vec<String>,
    /// What this receipt cannot cover ([`NOT_COVERED`]).
    pub not_covered: Vec<String>,
}

impl Statement {
    /// The bytes the signature is over: a domain line, then the compact JSON.
    pub fn message(&self) -> Result<Vec<u8>, Error> {
        document_message(DOMAIN, self)
    }
}

/// The signature of a receipt.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptSignature {
    /// [`ALGORITHM`].
    pub algorithm: String,
    /// The signer's id (as audit checkpoints name it): hex of the first 16 bytes of SHA-256
    /// of its public point.
    pub key_id: String,
    /// r ‖ s, hex.
    pub value: String,
}

/// A signed destruction receipt.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// [`FORMAT`].
    pub format: String,
    /// What is stated.
    pub statement: Statement,
    /// The signature over [`Statement::message`].
    pub signature: ReceiptSignature,
}

/// Why a receipt does not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    /// Not a receipt document.
    #[error("not a destruction receipt: {0}")]
    Malformed(String),
    /// A receipt of a format this build does not know.
    #[error("unknown receipt format {0:?}")]
    Format(String),
    /// Parsed, but not byte for byte as written: it was edited.
    #[error("the receipt is not in its canonical form: it was edited after it was written")]
    NotCanonical,
    /// Signed by another key than the one given.
    #[error("the receipt names signer {found}, but the public key given is signer {expected}")]
    OtherSigner {
        /// The id of the key given.
        expected: String,
        /// The id the receipt names.
        found: String,
    },
    /// The signature does not verify.
    #[error("the receipt's signature does not verify under the public key given")]
    BadSignature,
}

impl Receipt {
    /// Signs `statement` with the audit signing key in `hsm`.
    pub fn sign(statement: Statement, hsm: &dyn Hsm) -> Result<Self, Error> {
        let signature = sign_document(hsm, &statement.message()?)?;
        Ok(Self {
            format: FORMAT.into(),
            statement,
            signature,
        })
    }

    /// The receipt's file text, in its one canonical form.
    pub fn to_text(&self) -> Result<String, Error> {
        document_text(self)
    }
}

/// Checks a receipt file against the signer's public point (65-byte uncompressed P-256): the
/// format, the canonical form, the signer's id and the signature. Returns the receipt.
pub fn verify(file: &[u8], public_point: &[u8]) -> Result<Receipt, ReceiptError> {
    let receipt: Receipt = parse_document(file).map_err(|fault| match fault {
        DocumentFault::Malformed(m) => ReceiptError::Malformed(m),
        DocumentFault::NotCanonical => ReceiptError::NotCanonical,
    })?;
    if receipt.format != FORMAT {
        return Err(ReceiptError::Format(receipt.format));
    }
    let message = receipt
        .statement
        .message()
        .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
    check_signature(&receipt.signature, &message, public_point)?;
    Ok(receipt)
}

/// What a signed document's signature covers: its domain line, then the statement's compact
/// JSON.
pub(crate) fn document_message<T: Serialize>(
    domain: &[u8],
    statement: &T,
) -> Result<Vec<u8>, Error> {
    let mut m = domain.to_vec();
    m.extend(serde_json::to_vec(statement).map_err(|_| Error::Internal("statement encoding"))?);
    Ok(m)
}

/// A signed document's file text, in its one canonical form: pretty JSON and a newline.
pub(crate) fn document_text<T: Serialize>(document: &T) -> Result<String, Error> {
    let mut text =
        serde_json::to_string_pretty(document).map_err(|_| Error::Internal("document encoding"))?;
    text.push('\n');
    Ok(text)
}

/// Why a signed document's file does not parse as written.
pub(crate) enum DocumentFault {
    /// Not JSON of the document's shape.
    Malformed(String),
    /// Parsed, but not byte for byte its canonical form: it was edited.
    NotCanonical,
}

/// Parses a signed document's file and checks that it is in its one canonical form.
pub(crate) fn parse_document<T: Serialize + for<'de> Deserialize<'de>>(
    file: &[u8],
) -> Result<T, DocumentFault> {
    let document: T =
        serde_json::from_slice(file).map_err(|e| DocumentFault::Malformed(e.to_string()))?;
    let canonical =
        document_text(&document).map_err(|e| DocumentFault::Malformed(e.to_string()))?;
    if canonical.as_bytes() != file {
        return Err(DocumentFault::NotCanonical);
    }
    Ok(document)
}

/// Signs `message` with the audit signing key in `hsm`, as receipts, attestations and drill
/// reports carry it.
pub(crate) fn sign_document(hsm: &dyn Hsm, message: &[u8]) -> Result<ReceiptSignature, Error> {
    let (signature, key_id) = sign_with_audit_key(hsm, message)?;
    Ok(ReceiptSignature {
        algorithm: ALGORITHM.into(),
        key_id,
        value: hex::encode(signature),
    })
}

/// Checks a document's signature over `message`: the algorithm, the signer's id against
/// `public_point`, and the signature.
pub(crate) fn check_signature(
    signature: &ReceiptSignature,
    message: &[u8],
    public_point: &[u8],
) -> Result<(), ReceiptError> {
    if signature.algorithm != ALGORITHM {
        return Err(ReceiptError::Malformed(format!(
            "unknown signature algorithm {:?}",
            signature.algorithm
        )));
    }
    let expected = signer_id(public_point);
    if signature.key_id != expected {
        return Err(ReceiptError::OtherSigner {
            expected,
            found: signature.key_id.clone(),
        });
    }
    let value = hex::decode(&signature.value).map_err(|_| ReceiptError::BadSignature)?;
    if crate::signature::p256_verifies(public_point, message, &value) {
        Ok(())
    } else {
        Err(ReceiptError::BadSignature)
    }
}

//! The sovereignty attestation (docs/DRILL.md, "The attestation"): where custody stands, as
//! one statement signed in the HSM with the audit signing key, checkable offline with only the
//! signer's public key. Like a destruction receipt, the file has one canonical form, so no
//! byte of it can change unnoticed.

use std::collections::BTreeMap;

use hsm_bridge::Hsm;
use serde::{Deserialize, Serialize};

use crate::audit::Checkpoint;
use crate::error::Error;
use crate::key::{KeyRecord, VersionRecord};
use crate::receipt::{
    check_signature, document_message, document_text, parse_document, sign_document, DocumentFault,
    ReceiptError, ReceiptSignature,
};
use crate::store::{table_sha256, Row, SnapshotView, Store, Table};

/// The `format` of every attestation this code writes.
pub const FORMAT: &str = "sovereign-kms/attestation/v1";

/// What the signature covers before the statement's compact JSON.
const DOMAIN: &[u8] = b"sovereign-kms attestation v1\n";

/// Where the root key lives.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootOfTrust {
    /// The PKCS#11 module the server loaded.
    pub library: String,
    /// `C_GetTokenInfo`: label.
    pub label: String,
    /// Manufacturer id.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Serial number.
    pub serial: String,
}

/// Keys and versions of one protection level in one state.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCount {
    /// `software` or `hsm`.
    pub protection: String,
    /// `enabled`, `disabled`, `pending_destruction`, `destroyed`.
    pub state: String,
    /// How many keys.
    pub keys: u64,
    /// How many stored versions they have (none for destroyed keys).
    pub versions: u64,
}

/// How much of the key material the recovery authority can bring back.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscrowCoverage {
    /// Stored versions.
    pub versions: u64,
    /// Of which escrowed (sealed to the recovery key or wrapped under the escrow key).
    pub escrowed: u64,
    /// The others, as `KEY_ID/VERSION`: they exist only in this deployment.
    pub unescrowed: Vec<String>,
}

/// The recovery authority on record.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustodyState {
    /// The ceremony.
    pub ceremony_id: String,
    /// Its epoch (1 at init, one more per reshare).
    pub epoch: u32,
    /// k.
    pub threshold: u8,
    /// The n custodians, in share-index order.
    pub custodians: Vec<String>,
    /// SHA-256 of the transcript on record, hex.
    pub transcript_sha256: String,
}

/// Who must agree to a sensitive change.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalQuorum {
    /// M: approvals needed from operators other than the requester.
    pub required: u32,
    /// The gated actions.
    pub gated: Vec<String>,
}

/// Hashes of governance state, hex SHA-256.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateHashes {
    /// The active policy set (see [`crate::governance::policy::active_set_sha256`]).
    pub policies: String,
    /// The trust bundles table (see [`crate::store::table_sha256`]).
    pub trust_bundles: String,
    /// The operator inventory table (see [`crate::store::table_sha256`]).
    pub operators: String,
}

/// The latest signed audit checkpoint.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRef {
    /// The last record it covers.
    pub seq: u64,
    /// That record's hash, hex.
    pub head: String,
    /// When it was signed, Unix milliseconds.
    pub time_ms: u64,
    /// Its signer's id.
    pub key_id: String,
}

/// The signed statement. Every field is named in docs/DRILL.md.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// When it was made, Unix seconds.
    pub issued_at: u64,
    /// The server's version.
    pub software_version: String,
    /// Where the root key lives.
    pub root_of_trust: RootOfTrust,
    /// Keys per protection level and state.
    pub keys: Vec<KeyCount>,
    /// Escrow coverage.
    pub escrow: EscrowCoverage,
    /// The recovery authority, once initialised.
    pub custody: Option<CustodyState>,
    /// The approval quorum and the gated actions.
    pub approvals: ApprovalQuorum,
    /// The last recorded provider-exit drill: none until drills can be recorded (issue 18).
    pub last_drill: Option<serde_json::Value>,
    /// Hashes of the policy set, trust bundles and operator inventory.
    pub hashes: StateHashes,
    /// The latest signed audit checkpoint, if any.
    pub audit_checkpoint: Option<CheckpointRef>,
}

impl Statement {
    fn message(&self) -> Result<Vec<u8>, Error> {
        document_message(DOMAIN, self)
    }
}

/// A signed attestation.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    /// [`FORMAT`].
    pub format: String,
    /// What is stated.
    pub statement: Statement,
    /// The signature over the domain line and the statement's compact JSON.
    pub signature: ReceiptSignature,
}

/// The tables a statement is gathered from.
const TABLES: [Table; 9] = [
    Table::Keys,
    Table::Versions,
    Table::Custody,
    Table::Approvals,
    Table::Policies,
    Table::TrustBundles,
    Table::Operators,
    Table::AuditCheckpoints,
    Table::ServiceState,
];

/// Gathers the statement from the token and from one snapshot of the store, so that every
/// count and hash in it is of the same point in time.
// long: one statement filled field by field from one snapshot of the store.
pub fn gather(
    store: &dyn Store,
    hsm: &dyn Hsm,
    issued_at: u64,
    software_version: &str,
) -> Result<Statement, Error> {
    let (token, library) = hsm.describe()?;
    let snapshot = SnapshotView::read(store, &TABLES)?;
    let store: &dyn Store = &snapshot;
    fn decode<T: for<'de> Deserialize<'de>>(table: Table, row: &Row) -> Result<T, Error> {
        serde_json::from_slice(&row.value).map_err(|source| Error::Record {
            table: table.name(),
            source,
        })
    }
    let mut counts: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let mut of_key = BTreeMap::new();
    for row in store.scan(Table::Keys)? {
        let k: KeyRecord = decode(Table::Keys, &row)?;
        let slot = (
            k.protection.as_str().to_owned(),
            k.state.as_str().to_owned(),
        );
        counts.entry(slot.clone()).or_default().0 += 1;
        of_key.insert(k.id, slot);
    }
    let mut escrow = EscrowCoverage {
        versions: 0,
        escrowed: 0,
        unescrowed: Vec::new(),
    };
    for row in store.scan(Table::Versions)? {
        let v: VersionRecord = decode(Table::Versions, &row)?;
        if let Some(slot) = of_key.get(&v.key_id) {
            counts.entry(slot.clone()).or_default().1 += 1;
        }
        escrow.versions += 1;
        if v.escrow.is_some() {
            escrow.escrowed += 1;
        } else {
            escrow
                .unescrowed
                .push(format!("{}/{}", v.key_id, v.version.get()));
        }
    }
    let keys = counts
        .into_iter()
        .map(|((protection, state), (keys, versions))| KeyCount {
            protection,
            state,
            keys,
            versions,
        })
        .collect();
    let custody = crate::custody::load(store)?
        .map(|c| -> Result<CustodyState, Error> {
            Ok(CustodyState {
                ceremony_id: c.record.ceremony_id.to_string(),
                epoch: c.record.epoch.get(),
                threshold: c.transcript.threshold,
                custodians: c
                    .transcript
                    .custodians
                    .iter()
                    .map(|t| t.name.clone())
                    .collect(),
                transcript_sha256: hex::encode(c.transcript.sha256()?),
            })
        })
        .transpose()?;
    let rules = crate::governance::approvals::stored_rules(store)?;
    let audit_checkpoint = match store.last(Table::AuditCheckpoints)? {
        Some(row) => {
            let c: Checkpoint = decode(Table::AuditCheckpoints, &row)?;
            Some(CheckpointRef {
                seq: c.seq,
                head: c.head,
                time_ms: c.time_ms,
                key_id: c.key_id,
            })
        }
        None => None,
    };
    Ok(Statement {
        issued_at,
        software_version: software_version.to_owned(),
        root_of_trust: RootOfTrust {
            library: library.display().to_string(),
            label: token.label,
            manufacturer: token.manufacturer,
            model: token.model,
            serial: token.serial,
        },
        keys,
        escrow,
        custody,
        approvals: ApprovalQuorum {
            required: rules.required,
            gated: rules.gated.iter().map(|a| a.as_str().to_owned()).collect(),
        },
        last_drill: crate::drill::last_recorded(store)?
            .map(|d| serde_json::to_value(d).map_err(|_| Error::Internal("drill encoding")))
            .transpose()?,
        hashes: StateHashes {
            policies: crate::governance::policy::active_set_sha256(store)?,
            trust_bundles: table_sha256(&store.scan(Table::TrustBundles)?),
            operators: table_sha256(&store.scan(Table::Operators)?),
        },
        audit_checkpoint,
    })
}

impl Attestation {
    /// Signs `statement` with the audit signing key in `hsm`.
    pub fn sign(statement: Statement, hsm: &dyn Hsm) -> Result<Self, Error> {
        let signature = sign_document(hsm, &statement.message()?)?;
        Ok(Self {
            format: FORMAT.into(),
            statement,
            signature,
        })
    }

    /// The file text, in its one canonical form.
    pub fn to_text(&self) -> Result<String, Error> {
        document_text(self)
    }
}

/// Why an attestation does not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// Not an attestation document.
    #[error("not a sovereignty attestation: {0}")]
    Malformed(String),
    /// An attestation of a format this build does not know.
    #[error("unknown attestation format {0:?}")]
    Format(String),
    /// Parsed, but not byte for byte as written: it was edited.
    #[error("the attestation is not in its canonical form: it was edited after it was signed")]
    NotCanonical,
    /// Signed by another key than the one given.
    #[error("the attestation names signer {found}, but the public key given is signer {expected}")]
    OtherSigner {
        /// The id of the key given.
        expected: String,
        /// The id the attestation names.
        found: String,
    },
    /// The signature does not verify.
    #[error("the attestation's signature does not verify under the public key given")]
    BadSignature,
}

/// Checks an attestation file against the signer's public point (65-byte uncompressed
/// P-256): the format, the canonical form, the signer's id and the signature.
pub fn verify(file: &[u8], public_point: &[u8]) -> Result<Attestation, AttestError> {
    let a: Attestation = parse_document(file).map_err(|fault| match fault {
        DocumentFault::Malformed(m) => AttestError::Malformed(m),
        DocumentFault::NotCanonical => AttestError::NotCanonical,
    })?;
    if a.format != FORMAT {
        return Err(AttestError::Format(a.format));
    }
    let message = a
        .statement
        .message()
        .map_err(|e| AttestError::Malformed(e.to_string()))?;
    check_signature(&a.signature, &message, public_point).map_err(|e| match e {
        ReceiptError::OtherSigner { expected, found } => {
            AttestError::OtherSigner { expected, found }
        }
        ReceiptError::Malformed(m) => AttestError::Malformed(m),
        _ => AttestError::BadSignature,
    })?;
    Ok(a)
}

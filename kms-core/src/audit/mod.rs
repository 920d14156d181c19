//! The tamper-evident audit log.
//!
//! ```text
//!  request ─▶ server builds an AuditEvent ─▶ AuditLog::submit ─▶ writer thread
//!                                                                 │ seq, prev hash, hash
//!                                                                 │ one synced batch for all
//!                                                                 ▼ waiting records
//!                                  audit_records CF: seq → hash ‖ body
//!  every N records / T seconds / at close:
//!     HSM signs {seq, head, time} (ECDSA P-256) ─▶ audit_checkpoints CF: seq → checkpoint
//! ```
//!
//! A response is sent only after its record is durable ([`Pending::wait`]). If the store
//! refuses the write, the request is refused. [`Verifier`] checks a stored or exported log and
//! names the first sequence number where it breaks. Anyone with the disk can drop records
//! written after the last checkpoint; each checkpoint (and an exported copy of it held
//! elsewhere) fixes everything before it.
//!
//! Export format, one JSON object per line (JSON Lines): a `signer` line per checkpoint
//! signing key, then `record` lines in sequence order with each `checkpoint` line after the
//! record it covers. The record body is embedded byte for byte, as it was hashed.

mod chain;
mod log;
mod observe;
mod query;
mod verify;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use chain::{
    checkpoint_message, key_seq, object_hash, public_key_from_pem, public_key_pem, record_hash,
    recovered_record, seq_key, sha256_hex, signer_id, split_record, AuditEvent, Checkpoint, Hash,
    RecordBody, GENESIS, HASH_LEN, PRUNED_ACTION, RECOVERED_ACTION,
};
pub use log::{AuditConfig, AuditError, AuditLog, Pending, SIGNING_KEY_LABEL};
pub(crate) use log::{CONTEXT_KEY, CONTEXT_KEY_AAD, SIGNER_PREFIX};
pub use observe::AuditObserver;
pub use query::{query, AuditPage, AuditQuery, FoundRecord, MAX_PAGE, MAX_SCAN};
pub use verify::{
    BreakKind, CheckpointSeen, ExpectedHead, RecoverySeen, Report, Signers, Verifier,
};

use crate::error::Error;
use crate::store::{Row, Store, Table};

/// Signs a statement (a destruction receipt) with the audit signing key in the token: SHA-256
/// of `message`, signed inside the token. Returns r ‖ s and the signer's id, so that anyone
/// holding the public key (`kms audit public-key`) can check it offline.
pub fn sign_with_audit_key(
    hsm: &dyn hsm_bridge::Hsm,
    message: &[u8],
) -> Result<(Vec<u8>, String), Error> {
    let mut hashed = [0u8; 32];
    hashed.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message).as_ref());
    sign_digest_with_audit_key(hsm, &hashed)
}

/// [`sign_with_audit_key`] for a digest already computed (a backup bundle is hashed in place).
pub fn sign_digest_with_audit_key(
    hsm: &dyn hsm_bridge::Hsm,
    hashed: &[u8; 32],
) -> Result<(Vec<u8>, String), Error> {
    let key = hsm.p256_signing_key(SIGNING_KEY_LABEL)?;
    let signature = hsm.ecdsa_sign_digest(&key, hashed)?;
    Ok((signature, signer_id(key.public_point())))
}

/// The checkpoint signers recorded in a store.
pub fn stored_signers(store: &dyn Store) -> Result<Signers, Error> {
    Ok(store
        .scan(Table::AuditMeta)?
        .into_iter()
        .filter_map(|Row { key, value }| {
            let id = key.strip_prefix(log::SIGNER_PREFIX)?;
            Some((String::from_utf8_lossy(id).into_owned(), value))
        })
        .collect())
}

/// Every checkpoint in a store, in sequence order; unreadable ones are reported by their
/// sequence number.
pub fn stored_checkpoints(store: &dyn Store) -> Result<Vec<Result<Checkpoint, u64>>, Error> {
    Ok(store
        .scan(Table::AuditCheckpoints)?
        .into_iter()
        .map(|r| serde_json::from_slice(&r.value).map_err(|_| key_seq(&r.key).unwrap_or(0)))
        .collect())
}

/// What `verify_store` checks beyond the log itself.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct VerifyOptions {
    /// Start at this sequence number (the first record otherwise).
    pub from: Option<u64>,
    /// A head known from elsewhere that the log must hold.
    pub expected: Option<ExpectedHead>,
    /// Checkpoints kept elsewhere, checked with the stored ones.
    pub extra_checkpoints: Vec<Checkpoint>,
}

impl VerifyOptions {
    /// Options from their parts.
    pub fn new(
        from: Option<u64>,
        expected: Option<ExpectedHead>,
        extra_checkpoints: Vec<Checkpoint>,
    ) -> Self {
        Self {
            from,
            expected,
            extra_checkpoints,
        }
    }
}

/// Calls `f` with each stored audit record from sequence number `from` on, in order, read a
/// page of 4,096 at a time; the sequence number is `None` for a row whose key is not one.
pub fn for_each_record<E: From<Error>>(
    store: &dyn Store,
    from: u64,
    mut f: impl FnMut(Option<u64>, &Row) -> Result<(), E>,
) -> Result<(), E> {
    let mut next = seq_key(from).to_vec();
    loop {
        let page = store.scan_from(Table::AuditRecords, &next, 4096)?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        next = last.key.clone();
        next.push(0);
        for row in &page {
            f(key_seq(&row.key), row)?;
        }
    }
}

/// Verifies the log in `store` (see [`VerifyOptions`]), page by page.
/// `signers` are the trusted public keys; `None` trusts the ones recorded in the store.
pub fn verify_store(
    store: &dyn Store,
    signers: Option<&Signers>,
    options: VerifyOptions,
) -> Result<Report, Error> {
    let VerifyOptions {
        from,
        expected,
        extra_checkpoints,
    } = options;
    let recorded;
    let signers = match signers {
        Some(s) => s,
        None => {
            recorded = stored_signers(store)?;
            &recorded
        }
    };
    let mut unreadable = Vec::new();
    let mut checkpoints: Vec<Checkpoint> = stored_checkpoints(store)?
        .into_iter()
        .filter_map(|c| c.map_err(|seq| unreadable.push(seq)).ok())
        .collect();
    checkpoints.extend(extra_checkpoints);
    let mut verifier = Verifier::new(signers, checkpoints, from);
    if let Some(head) = expected {
        verifier = verifier.expect_head(head);
    }
    for_each_record(store, from.unwrap_or(0), |seq, row| match seq {
        Some(seq) => {
            verifier.record(seq, &row.value);
            Ok(())
        }
        None => Err(Error::AuditCorrupt { seq: 0 }),
    })?;
    let mut report = verifier.finish();
    if let Some(&seq) = unreadable.iter().min() {
        if report.first_bad_seq.is_none_or(|s| seq < s) {
            report.ok = false;
            report.first_bad_seq = Some(seq);
            report.kind = Some(BreakKind::Unreadable);
            report.problem = Some(format!("checkpoint {seq} is unreadable"));
        }
    }
    Ok(report)
}

/// One line of an export file: `type` is `signer`, `record` or `checkpoint`, and the fields
/// of that kind are set. (A flat struct rather than a tagged enum, so that the record body is
/// read back byte for byte.)
#[derive(Debug, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExportLine {
    /// `signer`, `record` or `checkpoint`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Record or checkpoint sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Record hash (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Record body, exactly as hashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Box<RawValue>>,
    /// Checkpoint head (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// Checkpoint time, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    /// Signer id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Checkpoint signature (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Signer public key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

impl ExportLine {
    /// The line of a stored record; `None` if it is too damaged to embed (the verifier of
    /// the export then finds it missing).
    pub fn record(seq: u64, value: &[u8]) -> Option<Self> {
        let (hash, body) = split_record(value)?;
        let body = std::str::from_utf8(body).ok()?;
        Some(Self {
            kind: "record".into(),
            seq: Some(seq),
            hash: Some(hex::encode(hash)),
            record: Some(RawValue::from_string(body.to_owned()).ok()?),
            ..Self::default()
        })
    }

    /// The line of a checkpoint.
    pub fn checkpoint(cp: &Checkpoint) -> Self {
        Self {
            kind: "checkpoint".into(),
            seq: Some(cp.seq),
            head: Some(cp.head.clone()),
            time_ms: Some(cp.time_ms),
            key_id: Some(cp.key_id.clone()),
            signature: Some(cp.signature.clone()),
            ..Self::default()
        }
    }

    /// The line of a signer.
    pub fn signer(key_id: &str, point: &[u8]) -> Self {
        Self {
            kind: "signer".into(),
            key_id: Some(key_id.to_owned()),
            public_key: Some(public_key_pem(point)),
            ..Self::default()
        }
    }

    /// For a record line: its sequence number and stored form (hash ‖ body).
    pub fn as_record(&self) -> Option<(u64, Vec<u8>)> {
        let mut value = hex::decode(self.hash.as_deref()?).ok()?;
        if value.len() != HASH_LEN {
            return None;
        }
        value.extend_from_slice(self.record.as_deref()?.get().as_bytes());
        Some((self.seq?, value))
    }

    /// For a checkpoint line: the checkpoint.
    pub fn as_checkpoint(&self) -> Option<Checkpoint> {
        Some(Checkpoint {
            seq: self.seq?,
            head: self.head.clone()?,
            time_ms: self.time_ms?,
            key_id: self.key_id.clone()?,
            signature: self.signature.clone()?,
        })
    }

    /// For a signer line: its id and public point.
    pub fn as_signer(&self) -> Option<(String, Vec<u8>)> {
        Some((
            self.key_id.clone()?,
            public_key_from_pem(self.public_key.as_deref()?)?,
        ))
    }
}

/// The hash of record `seq` as stored, if it is there and intact.
pub fn stored_hash(store: &dyn Store, seq: u64) -> Result<Option<Hash>, Error> {
    let Some(value) = store.get(Table::AuditRecords, &seq_key(seq))? else {
        return Ok(None);
    };
    let (hash, body) = split_record(&value).ok_or(Error::AuditCorrupt { seq })?;
    if record_hash(body) != hash {
        return Err(Error::AuditCorrupt { seq });
    }
    Ok(Some(hash))
}

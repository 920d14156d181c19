//! What a backup bundle holds (docs/RECOVERY.md, "The bundle"): the store's tables, from one
//! snapshot, with every secret either sealed to the recovery public key or left out. The
//! format is [`crate::bundle`]; the gated export RPC and the recovery ceremony build on this.

use std::collections::BTreeMap;

use hsm_bridge::Hsm;

use crate::audit::{sign_digest_with_audit_key, signer_id, SIGNING_KEY_LABEL};
use crate::bundle::{encode, AuditHead, BundleSigner, Header, Record};
use crate::error::Error;
use crate::key::{StoredMaterial, VersionRecord};
use crate::store::{Row, Store, Table};

/// Whether a bundle carries `table`. Every table is named, so a new one cannot be added
/// without deciding (and [`carried`] saying what of it is secret). The audit log's records and
/// checkpoints stay where they are: the bundle holds the chain's head.
fn in_bundle(table: Table) -> bool {
    match table {
        Table::AuditRecords | Table::AuditCheckpoints => false,
        Table::Aliases
        | Table::Keys
        | Table::Versions
        | Table::AuditMeta
        | Table::TrustBundles
        | Table::Workloads
        | Table::WorkloadUsage
        | Table::Policies
        | Table::Grants
        | Table::Custody
        | Table::Operators
        | Table::Approvals
        | Table::ServiceState => true,
    }
}

/// Who asked for the export, and what else the header records.
#[derive(Clone, Debug)]
pub struct ExportRequest {
    /// A random id, hex.
    pub bundle_id: String,
    /// Unix seconds.
    pub exported_at: u64,
    /// The operator who asked.
    pub exported_by: String,
    /// The approval that allowed it.
    pub approval_id: Option<String>,
    /// The audit head (after the checkpoint the export forced).
    pub audit_head: AuditHead,
    /// The non-secret configuration a recovered deployment starts from.
    pub config: serde_json::Value,
}

/// A written bundle and what its header says.
#[derive(Debug)]
pub struct Exported {
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// Its header.
    pub header: Header,
    /// Key versions in it.
    pub key_versions: u64,
}

/// Writes a bundle of the store as it is now, signed with the audit key in `hsm`. Refuses
/// when custody is not initialised (nothing could open the bundle) or when a version has no
/// escrow (the bundle could not restore it).
pub fn export(store: &dyn Store, hsm: &dyn Hsm, req: ExportRequest) -> Result<Exported, Error> {
    let custody = crate::custody::load(store)?.ok_or(Error::BackupRefused {
        reason: "custody is not initialised: nothing could open a bundle (run `kms ceremony init`)"
            .into(),
    })?;
    let mut records = Vec::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut key_versions = 0u64;
    let mut unescrowed = 0u64;
    let tables: Vec<Table> = Table::ALL.into_iter().filter(|t| in_bundle(*t)).collect();
    for (table, rows) in store.snapshot_scan(&tables)? {
        for Row { key, value } in rows {
            let Some(value) = carried(table, &key, value, &mut counts, &mut unescrowed)? else {
                continue;
            };
            if table == Table::Versions {
                key_versions = key_versions.saturating_add(1);
            }
            *counts.entry(table.name().to_owned()).or_default() += 1;
            records.push(Record { table, key, value });
        }
    }
    if unescrowed > 0 {
        return Err(Error::BackupRefused {
            reason: format!(
                "{unescrowed} key version(s) have no escrow and could not be restored; \
                 `kms ceremony status` lists them"
            ),
        });
    }
    let signing = hsm.p256_signing_key(SIGNING_KEY_LABEL)?;
    let point = signing.public_point();
    let header = Header {
        format: String::new(),
        bundle_id: req.bundle_id,
        exported_at: req.exported_at,
        exported_by: req.exported_by,
        approval_id: req.approval_id,
        ceremony_id: custody.record.ceremony_id.to_string(),
        epoch: custody.record.epoch.get(),
        transcript_sha256: hex::encode(custody.transcript.sha256()?),
        audit_head: req.audit_head,
        signer: BundleSigner {
            id: signer_id(point),
            public_point: hex::encode(point),
        },
        counts,
        config: req.config,
        body_len: 0,
        body_sha256: String::new(),
    };
    let bytes = encode(header, &records, |d| {
        sign_digest_with_audit_key(hsm, d).map(|(signature, _)| signature)
    })?;
    let header = crate::bundle::parse(&bytes)
        .map_err(|_| Error::Internal("a bundle just written does not parse"))?
        .header;
    Ok(Exported {
        bytes,
        header,
        key_versions,
    })
}

/// The value a row carries into the bundle, or `None` to leave it out.
fn carried(
    table: Table,
    key: &[u8],
    value: Vec<u8>,
    counts: &mut BTreeMap<String, u64>,
    unescrowed: &mut u64,
) -> Result<Option<Vec<u8>>, Error> {
    Ok(match table {
        // Material wrapped under this token's root key is useless elsewhere and a secret of
        // it: the escrow in the same row is what a recovery opens.
        Table::Versions => {
            let mut v: VersionRecord =
                serde_json::from_slice(&value).map_err(|source| Error::Record {
                    table: table.name(),
                    source,
                })?;
            if v.escrow.is_none() {
                *unescrowed = unescrowed.saturating_add(1);
            }
            let level = match &mut v.material {
                StoredMaterial::Software { wrapped } => {
                    wrapped.clear();
                    "versions.software"
                }
                StoredMaterial::Hsm { .. } => "versions.hsm",
            };
            *counts.entry(level.to_owned()).or_default() += 1;
            Some(serde_json::to_vec(&v).map_err(|_| Error::Internal("version encoding"))?)
        }
        // The grant MAC key and the context-digest key are wrapped under the root key; their
        // seals to the recovery key are in the custody table.
        Table::Grants if key == crate::governance::grants::MAC_KEY => None,
        Table::AuditMeta if key == crate::audit::CONTEXT_KEY => None,
        // Pending requests do not survive a recovery; the rules do.
        Table::Approvals if key != crate::governance::approvals::RULES_KEY => None,
        _ => Some(value),
    })
}

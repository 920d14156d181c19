//! The last step of a recovery: [`Prepared::restore`] writes the token and the store.

use std::collections::BTreeMap;

use hsm_bridge::{CheckValue, Hsm, ObjectId, Pkcs11Hsm, TokenKey, GCM_NONCE_LEN};
use recovery::{CeremonyKind, RecoverySecret, TokenInfo};
use secrecy::{ExposeSecret, SecretBox};

use super::{Checked, Opened, Prepared, RestoreError, BATCH};
use crate::audit::{recovered_record, seq_key, signer_id, AuditEvent, Hash, RECOVERED_ACTION};
use crate::custody::RECOVER_TRANSCRIPT_PREFIX;
use crate::key::{kek_wrap_aad, StoredMaterial, VersionRecord};
use crate::store::{Change, Store, Table};

/// What the host tells the restore about the new deployment.
#[derive(Clone, Debug)]
pub struct Facts {
    /// Now, Unix milliseconds.
    pub time_ms: u64,
    /// The new token, as `C_GetTokenInfo` says.
    pub token: TokenInfo,
}

/// What a recovery restored.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Recovered {
    /// Key versions restored.
    pub key_versions_restored: u64,
    /// Of which `software`.
    pub software: u64,
    /// Of which `hsm`, imported from their escrow copies.
    pub hsm: u64,
    /// The `custody.recovered` record: the new chain's first.
    pub audit_head: crate::bundle::AuditHead,
    /// The new audit signer's id.
    pub signer: String,
    /// The id of the signer whose signature on the bundle the quorum's transcript vouched for.
    pub bundle_signer: String,
    /// SHA-256 of the bundle, hex.
    pub bundle_sha256: String,
}

impl Prepared {
    /// The trusted escrow key the host imports as the new token's Security Officer before
    /// [`Prepared::restore`] (same value, label and `CKA_ID`, so every escrow copy stays valid).
    pub fn escrow_key(&self) -> Option<(&hsm_bridge::EscrowPin, &SecretBox<[u8; 32]>)> {
        self.escrow.as_ref().map(|(p, v)| (p, v))
    }

    /// Key versions the bundle holds.
    pub fn versions(&self) -> usize {
        self.versions.len()
    }

    /// Writes the token and the store: each `hsm` version imported (its check value checked
    /// against the record), each software version wrapped under the new root key, the
    /// deployment keys likewise, every other record as it is, a recovery transcript pinning
    /// the new audit signer, and `custody.recovered` chained to the bundle's head. `phase` is
    /// called as each phase starts (`token`, `store`, `audit`, `write`), for timing. On failure the
    /// token objects this call made are destroyed; the store is the host's to discard.
    pub fn restore(
        self,
        hsm: &Pkcs11Hsm,
        store: &dyn Store,
        facts: Facts,
        phase: &mut dyn FnMut(&'static str),
    ) -> Result<Recovered, RestoreError> {
        let mut imported: Vec<TokenKey> = Vec::new();
        let result = self.restore_inner(hsm, store, facts, phase, &mut imported);
        if result.is_err() {
            for key in imported {
                if let Err(e) = hsm.destroy_key(key) {
                    tracing::error!(error = %e, "could not destroy a key imported by a failed recovery");
                }
            }
        }
        result
    }

    // long: one state-machine step: the token phase, then every store change in one batch.
    fn restore_inner(
        self,
        hsm: &Pkcs11Hsm,
        store: &dyn Store,
        facts: Facts,
        phase: &mut dyn FnMut(&'static str),
        imported: &mut Vec<TokenKey>,
    ) -> Result<Recovered, RestoreError> {
        let Prepared {
            checked,
            secret,
            versions,
            escrow,
            deployment_keys,
        } = self;
        drop(escrow);
        phase("token");
        let root = hsm.root_key();
        let mut imports = Imports::default();
        for (at, v, opened) in versions {
            imports.import(hsm, &checked, at, v, opened, imported)?;
        }
        let signing = hsm
            .p256_signing_key(crate::audit::SIGNING_KEY_LABEL)
            .map_err(token)?;
        let point = *signing.public_point();
        let new_signer = signer_id(&point);

        phase("store");
        let mut changes: Vec<Change> = Vec::with_capacity(checked.bundle.records.len() + 8);
        let mut recoveries = 0usize;
        for (at, r) in checked.bundle.records.iter().enumerate() {
            if r.table == Table::Custody && r.key.starts_with(RECOVER_TRANSCRIPT_PREFIX) {
                recoveries += 1;
            }
            let value = imports
                .replaced
                .remove(&at)
                .unwrap_or_else(|| r.value.clone());
            changes.push(Change::Put {
                table: r.table,
                key: r.key.clone(),
                value,
            });
        }
        for (dk, raw) in &deployment_keys {
            changes.push(Change::Put {
                table: dk.table,
                key: dk.key.to_vec(),
                value: wrap_under(hsm, root, dk.wrap_aad, raw.expose_secret()).map_err(token)?,
            });
        }
        drop(deployment_keys);
        changes.push(Change::Put {
            table: Table::AuditMeta,
            key: [crate::audit::SIGNER_PREFIX, new_signer.as_bytes()].concat(),
            value: point.to_vec(),
        });
        let successor_bytes = successor(hsm, &checked, &facts, &new_signer, secret)?;
        changes.push(Change::Put {
            table: Table::Custody,
            key: [
                RECOVER_TRANSCRIPT_PREFIX,
                format!("{:04}", recoveries + 1).as_bytes(),
            ]
            .concat(),
            value: successor_bytes.clone(),
        });

        phase("audit");
        let h = &checked.bundle.header;
        let head_hash: Hash = hex::decode(&h.audit_head.hash)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| RestoreError::BundleContent {
                file: checked.file.clone(),
                what: "the header's audit head is malformed".into(),
            })?;
        let event = recovered_event(&checked, &facts, &successor_bytes, &new_signer, &imports);
        let seq = h.audit_head.seq.saturating_add(1);
        let (hash, value) = recovered_record(h.audit_head.seq, &head_hash, facts.time_ms, &event)
            .map_err(|e| RestoreError::Store(e.to_string()))?;
        changes.push(Change::Put {
            table: Table::AuditRecords,
            key: seq_key(seq).to_vec(),
            value,
        });
        phase("write");
        store
            .write_in_batches(changes, BATCH)
            .map_err(|e| RestoreError::Store(e.to_string()))?;
        Ok(Recovered {
            key_versions_restored: imports.software + imports.hsm,
            software: imports.software,
            hsm: imports.hsm,
            audit_head: crate::bundle::AuditHead {
                seq,
                hash: hex::encode(hash),
            },
            signer: new_signer,
            bundle_signer: h.signer.id.clone(),
            bundle_sha256: hex::encode(checked.sha256),
        })
    }
}

fn token(e: hsm_bridge::Error) -> RestoreError {
    RestoreError::Token(e.to_string())
}

/// The versions made usable on the new token so far: their re-encoded records by position in
/// the bundle, and how many of each level.
#[derive(Default)]
struct Imports {
    replaced: BTreeMap<usize, Vec<u8>>,
    software: u64,
    hsm: u64,
}

impl Imports {
    /// Makes version `v` (the bundle's record `at`) usable on the new token: an `hsm` version
    /// imported (its check value checked against the record), a software version wrapped
    /// under the new root key.
    fn import(
        &mut self,
        hsm: &Pkcs11Hsm,
        checked: &Checked,
        at: usize,
        mut v: VersionRecord,
        opened: Opened,
        imported: &mut Vec<TokenKey>,
    ) -> Result<(), RestoreError> {
        match (opened, &mut v.material) {
            (
                Opened::Hsm(value),
                StoredMaterial::Hsm {
                    label,
                    id,
                    check_value,
                },
            ) => {
                let bad = || RestoreError::BundleContent {
                    file: checked.file.clone(),
                    what: format!(
                        "key {} version {} names no token object",
                        v.key_id, v.version
                    ),
                };
                let oid = id
                    .as_deref()
                    .and_then(|i| ObjectId::from_hex(i).ok())
                    .ok_or_else(bad)?;
                let (key, cv) = hsm.import_aes_key(label, &oid, &value).map_err(token)?;
                imported.push(key);
                let recorded = check_value
                    .as_deref()
                    .and_then(|c| CheckValue::from_hex(c).ok());
                if recorded != Some(cv) {
                    return Err(RestoreError::BundleContent {
                        file: checked.file.clone(),
                        what: format!(
                            "key {} version {}: the escrowed key's check value is not the recorded one",
                            v.key_id, v.version
                        ),
                    });
                }
                self.hsm += 1;
            }
            (Opened::Software(kek), StoredMaterial::Software { wrapped }) => {
                let aad = kek_wrap_aad(v.key_id, v.version);
                *wrapped =
                    wrap_under(hsm, hsm.root_key(), &aad, kek.expose_secret()).map_err(token)?;
                self.software += 1;
            }
            _ => return Err(RestoreError::Store("version material mismatch".into())),
        }
        self.replaced.insert(
            at,
            serde_json::to_vec(&v).map_err(|_| RestoreError::Store("version encoding".into()))?,
        );
        Ok(())
    }
}

/// The recovery transcript, canonical: the transcript on record, as a recovery onto the new
/// token with the new audit signer, MACed with the recovery secret (wiped here).
fn successor(
    hsm: &Pkcs11Hsm,
    checked: &Checked,
    facts: &Facts,
    new_signer: &str,
    secret: RecoverySecret,
) -> Result<Vec<u8>, RestoreError> {
    let mut successor = checked.transcript.clone();
    successor.kind = CeremonyKind::Recover;
    // It follows the transcript on record (which may itself be a reshare's, naming its own
    // predecessor): name that one, not the predecessor the clone carried.
    successor.previous_sha256 = Some(hex::encode(
        checked
            .transcript
            .sha256()
            .map_err(|e| RestoreError::Store(e.to_string()))?,
    ));
    successor.token = facts.token.clone();
    successor.audit_signer = new_signer.to_owned();
    successor.time = facts.time_ms / 1000;
    let mut nonce = [0u8; 32];
    hsm.random(&mut nonce).map_err(token)?;
    successor.nonce = hex::encode(nonce);
    successor.mac = String::new();
    successor
        .mac_with(&secret)
        .map_err(|e| RestoreError::Secret(e.to_string()))?;
    drop(secret);
    successor
        .canonical()
        .map_err(|e| RestoreError::Store(e.to_string()))
}

/// The `custody.recovered` event: the bundle, the transcripts, both signers, the new token
/// and how many versions of each level were restored.
fn recovered_event(
    checked: &Checked,
    facts: &Facts,
    successor_bytes: &[u8],
    new_signer: &str,
    imports: &Imports,
) -> AuditEvent {
    let h = &checked.bundle.header;
    let mut event = AuditEvent::new(RECOVERED_ACTION, "ok");
    let facts_t = &facts.token;
    for (k, v) in [
        ("bundle_sha256", hex::encode(checked.sha256)),
        ("bundle_id", h.bundle_id.clone()),
        ("bundle_head_seq", h.audit_head.seq.to_string()),
        ("bundle_head_hash", h.audit_head.hash.clone()),
        ("exported_at", h.exported_at.to_string()),
        ("ceremony_id", h.ceremony_id.clone()),
        ("epoch", h.epoch.to_string()),
        ("transcript_sha256", h.transcript_sha256.clone()),
        (
            "recover_transcript_sha256",
            crate::audit::sha256_hex(successor_bytes),
        ),
        ("previous_signer", h.signer.id.clone()),
        ("signer", new_signer.to_owned()),
        ("token_label", facts_t.label.clone()),
        ("token_serial", facts_t.serial.clone()),
        ("token_manufacturer", facts_t.manufacturer.clone()),
        ("token_model", facts_t.model.clone()),
        ("software_versions", imports.software.to_string()),
        (
            "hsm_versions",
            format!(
                "{} restored from escrow (imported into the new token)",
                imports.hsm
            ),
        ),
    ] {
        event.detail.insert(k.into(), v);
    }
    event
}

/// `nonce ‖ AES-256-GCM(root, aad, value)`, the layout every root-wrapped value has.
pub(super) fn wrap_under(
    hsm: &Pkcs11Hsm,
    root: TokenKey,
    aad: &[u8],
    value: &[u8],
) -> Result<Vec<u8>, hsm_bridge::Error> {
    let mut nonce = [0u8; GCM_NONCE_LEN];
    hsm.random(&mut nonce)?;
    let mut out = nonce.to_vec();
    out.extend(hsm.aes_gcm_encrypt(root, &nonce, aad, value)?);
    Ok(out)
}

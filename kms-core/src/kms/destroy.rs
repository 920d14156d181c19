//! Key destruction (docs/APPROVALS.md): schedule, cancel, and on the due date delete every
//! version's material in three repeatable steps, then sign the receipt.
//!
//! The states are `enabled | disabled → pending_destruction → destroyed` (and back to
//! `disabled` on cancel). The step to `destroyed` is written first, with the list of what is
//! to go; deleting token objects and store rows follows, and both may be repeated after a
//! crash, so a restart finishes what a stop interrupted.

use std::collections::BTreeMap;

use hsm_bridge::{CheckValue, ObjectId};

use super::material::{decode, put_key};
use super::Kms;
use crate::error::Error;
use crate::ids::{KeyId, KeyRef};
use crate::key::{
    version_key, DeletedVersion, Destruction, DestructionAuthority, KeyRecord, KeyState,
    StoredMaterial, TokenObject, VersionRecord,
};
use crate::receipt::{Receipt, Statement, DELETED, NOT_COVERED};
use crate::store::{Change, Table};

/// The longest waiting period a destruction may be scheduled with, in days.
pub const MAX_DESTROY_WAITING_DAYS: u32 = 365;

const DAY_SECS: u64 = 86_400;

/// Refuses a waiting period outside `min_days ..= MAX_DESTROY_WAITING_DAYS`.
fn check_waiting(waiting_days: u32, min_days: u32) -> Result<(), Error> {
    if waiting_days < min_days || waiting_days > MAX_DESTROY_WAITING_DAYS {
        return Err(Error::WaitingPeriod {
            asked: waiting_days,
            min: min_days,
            max: MAX_DESTROY_WAITING_DAYS,
        });
    }
    Ok(())
}

/// Refuses to schedule the destruction of a key that is not enabled or disabled.
fn schedulable(record: &KeyRecord) -> Result<(), Error> {
    match record.state {
        KeyState::Enabled | KeyState::Disabled => Ok(()),
        state => Err(Error::KeyLifecycle {
            id: record.id,
            state,
            action: "schedule its destruction",
        }),
    }
}

impl Kms {
    /// Checks that `key`'s destruction could be scheduled now with `waiting_days` (at least
    /// `min_days`), changing nothing: a gated request is checked when it is made.
    pub fn check_destruction(
        &self,
        key: &KeyRef,
        waiting_days: u32,
        min_days: u32,
    ) -> Result<KeyRecord, Error> {
        check_waiting(waiting_days, min_days)?;
        let entry = self.entry(key)?;
        schedulable(&entry.record)?;
        Ok(entry.record.clone())
    }

    /// Schedules `key`'s destruction `waiting_days` from now: the key refuses every
    /// cryptographic operation from now on, and its material goes when the day comes.
    pub fn schedule_destruction(
        &self,
        key: &KeyRef,
        waiting_days: u32,
        min_days: u32,
        authority: DestructionAuthority,
    ) -> Result<KeyRecord, Error> {
        let _admin = self.admin.lock();
        check_waiting(waiting_days, min_days)?;
        let mut updated = self.entry(key)?.as_ref().clone();
        schedulable(&updated.record)?;
        let now = self.deps.clock.now_unix();
        updated.record.state = KeyState::PendingDestruction;
        updated.record.updated_at = now;
        updated.record.destruction = Some(Destruction {
            scheduled_at: now,
            destroy_at: now.saturating_add(u64::from(waiting_days).saturating_mul(DAY_SECS)),
            authority,
            destroyed_at: None,
            deleted: Vec::new(),
            receipt: None,
        });
        self.deps.store.write(vec![put_key(&updated.record)?])?;
        let record = updated.record.clone();
        self.install(updated, None);
        tracing::warn!(key_id = %record.id, waiting_days, "key destruction scheduled");
        Ok(record)
    }

    /// Cancels a scheduled destruction: the key returns to `disabled`, its material intact.
    pub fn cancel_destruction(&self, key: &KeyRef) -> Result<KeyRecord, Error> {
        let _admin = self.admin.lock();
        let mut updated = self.entry(key)?.as_ref().clone();
        if updated.record.state != KeyState::PendingDestruction {
            return Err(Error::KeyLifecycle {
                id: updated.record.id,
                state: updated.record.state,
                action: "cancel a destruction (none is scheduled)",
            });
        }
        updated.record.state = KeyState::Disabled;
        updated.record.updated_at = self.deps.clock.now_unix();
        updated.record.destruction = None;
        self.deps.store.write(vec![put_key(&updated.record)?])?;
        let record = updated.record.clone();
        self.install(updated, None);
        tracing::warn!(key_id = %record.id, "key destruction cancelled; the key is disabled");
        Ok(record)
    }

    /// The keys with destruction work to do at `now`: due ones, and destroyed ones whose
    /// receipt is not yet recorded (a stop came between the steps). Nothing while sealed.
    pub fn destructions_due(&self, now: u64) -> Vec<KeyId> {
        if self.is_sealed() {
            return Vec::new();
        }
        self.cache
            .read()
            .keys
            .values()
            .filter(|e| match (&e.record.state, &e.record.destruction) {
                (KeyState::PendingDestruction, Some(d)) => d.destroy_at <= now,
                (KeyState::Destroyed, Some(d)) => d.receipt.is_none(),
                _ => false,
            })
            .map(|e| e.record.id)
            .collect()
    }

    /// Carries out `id`'s destruction if it is due at `now` (or finishes one a stop
    /// interrupted): commits the key to `destroyed`, destroys its token objects, deletes its
    /// version rows, and returns the signed receipt for the caller to record in the audit log
    /// and then hand to [`Self::record_receipt`]. `None` when there is nothing to do.
    pub fn destroy_if_due(&self, id: KeyId, now: u64) -> Result<Option<Receipt>, Error> {
        let _admin = self.admin.lock();
        if self.is_sealed() {
            return Ok(None);
        }
        let entry = self.entry(&KeyRef::Id(id))?;
        let commit = match (&entry.record.state, &entry.record.destruction) {
            (KeyState::PendingDestruction, Some(d)) if d.destroy_at <= now => true,
            (KeyState::Destroyed, Some(d)) if d.receipt.is_none() => false,
            _ => return Ok(None),
        };
        let rows = self.version_rows(id)?;
        let record = if commit {
            self.commit_destroyed(&entry.record, &rows, now)?
        } else {
            entry.record.clone()
        };
        self.delete_token_objects(&rows)?;
        self.delete_version_rows(id, &rows)?;
        let statement = statement(&record)?;
        let receipt = Receipt::sign(statement, self.deps.hsm.as_ref())?;
        tracing::warn!(key_id = %id, versions = rows.len(), "key destroyed");
        Ok(Some(receipt))
    }

    /// Stores a destroyed key's receipt (its file text) once it is in the audit log.
    pub fn record_receipt(&self, id: KeyId, text: String) -> Result<KeyRecord, Error> {
        let _admin = self.admin.lock();
        let mut updated = self.entry(&KeyRef::Id(id))?.as_ref().clone();
        let Some(destruction) = updated.record.destruction.as_mut() else {
            return Err(Error::Internal("receipt for a key with no destruction"));
        };
        if updated.record.state != KeyState::Destroyed {
            return Err(Error::Internal("receipt for a key that is not destroyed"));
        }
        destruction.receipt = Some(text);
        self.deps.store.write(vec![put_key(&updated.record)?])?;
        let record = updated.record.clone();
        self.install(updated, None);
        Ok(record)
    }

    /// The stored versions of `id`, in version order.
    fn version_rows(&self, id: KeyId) -> Result<Vec<VersionRecord>, Error> {
        let prefix = id.to_bytes();
        let mut rows = Vec::new();
        let mut from = prefix.to_vec();
        loop {
            let page = self.deps.store.scan_from(Table::Versions, &from, 256)?;
            let done = page.len() < 256;
            for row in &page {
                if !row.key.starts_with(prefix.as_slice()) {
                    return Ok(rows);
                }
                rows.push(decode::<VersionRecord>(Table::Versions, &row.value)?);
            }
            match page.last() {
                Some(last) if !done => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => return Ok(rows),
            }
        }
    }

    /// Step 1: the key is `destroyed` from this write on, with the list of what goes; its
    /// versions leave memory.
    fn commit_destroyed(
        &self,
        record: &KeyRecord,
        rows: &[VersionRecord],
        now: u64,
    ) -> Result<KeyRecord, Error> {
        let mut updated = record.clone();
        updated.state = KeyState::Destroyed;
        updated.updated_at = now;
        let destruction = updated
            .destruction
            .as_mut()
            .ok_or(Error::Internal("pending destruction without its schedule"))?;
        destruction.destroyed_at = Some(now);
        destruction.deleted = rows.iter().map(deleted_version).collect();
        self.deps.store.write(vec![put_key(&updated)?])?;
        self.install(
            super::KeyEntry {
                record: updated.clone(),
                versions: BTreeMap::new(),
            },
            None,
        );
        Ok(updated)
    }

    /// Step 2: `C_DestroyObject` on each `hsm` version's token object; one already gone
    /// counts as destroyed.
    fn delete_token_objects(&self, rows: &[VersionRecord]) -> Result<(), Error> {
        let hsm = self.deps.hsm.as_ref();
        for row in rows {
            let StoredMaterial::Hsm {
                label,
                id,
                check_value,
            } = &row.material
            else {
                continue;
            };
            let found = match (id, check_value) {
                (Some(id), Some(cv)) => {
                    let bad = |_| Error::Internal("malformed token object id or check value");
                    hsm.find_key_by_id(
                        &ObjectId::from_hex(id).map_err(bad)?,
                        &CheckValue::from_hex(cv).map_err(bad)?,
                    )
                }
                _ => hsm.find_aes_key(label),
            };
            match found {
                Ok(key) => {
                    hsm.destroy_key(key)?;
                    tracing::info!(key_id = %row.key_id, version = %row.version, label = %label, "token object destroyed");
                }
                // Destroyed by an earlier run that a stop interrupted.
                Err(
                    hsm_bridge::Error::ObjectMissing { .. } | hsm_bridge::Error::KeyNotFound { .. },
                ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Step 3: the version rows (wrapped material and escrow copies) are deleted, and the
    /// store drops them from its files.
    fn delete_version_rows(&self, id: KeyId, rows: &[VersionRecord]) -> Result<(), Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let changes = rows
            .iter()
            .map(|r| Change::Delete {
                table: Table::Versions,
                key: version_key(id, r.version),
            })
            .collect();
        self.deps.store.write(changes)?;
        self.deps.store.purge(Table::Versions)
    }
}

fn deleted_version(row: &VersionRecord) -> DeletedVersion {
    let (protection, token_object) = match &row.material {
        StoredMaterial::Hsm { label, id, .. } => (
            crate::key::Protection::Hsm,
            Some(TokenObject {
                label: label.clone(),
                cka_id: id.clone(),
            }),
        ),
        StoredMaterial::Software { .. } => (crate::key::Protection::Software, None),
    };
    DeletedVersion {
        version: row.version,
        protection,
        token_object,
        escrowed: row.escrow.is_some(),
    }
}

/// The receipt's statement, from the record committed in step 1.
fn statement(record: &KeyRecord) -> Result<Statement, Error> {
    let d = record.destruction.as_ref().ok_or(Error::Internal(
        "destroyed key without its destruction record",
    ))?;
    Ok(Statement {
        key_id: record.id.to_string(),
        alias: record.alias.as_ref().map(ToString::to_string),
        protection: record.protection,
        versions: d.deleted.clone(),
        scheduled_at: d.scheduled_at,
        destroy_at: d.destroy_at,
        destroyed_at: d.destroyed_at.unwrap_or(record.updated_at),
        requested_by: d.authority.requested_by.clone(),
        approvers: d.authority.approvers.clone(),
        approval_id: d.authority.approval_id.clone(),
        deleted: DELETED.iter().map(|s| (*s).to_owned()).collect(),
        not_covered: NOT_COVERED.iter().map(|s| (*s).to_owned()).collect(),
    })
}

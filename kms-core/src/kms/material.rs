//! Store records of keys, versions and aliases, and how a stored version becomes usable.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use aws_lc_rs::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use hsm_bridge::{CheckValue, Hsm, IdentifiedKey, ObjectId};

use super::{Cache, Deps, KeyEntry, VersionKey};
use crate::error::Error;
use crate::ids::{Alias, KeyId, KeyVersion};
use crate::key::{
    encode, put_version, unwrap_software, KeyRecord, KeyState, StoredMaterial, VersionRecord,
};
use crate::secret::Kek;
use crate::store::{Change, Table};

/// Store writes per batch when canaries are made at load.
const CANARY_BATCH: usize = 2000;

/// Every key from the store; with `sealed`, no version is made usable (nothing is unwrapped
/// and no token object looked up): each is [`VersionKey::Sealed`]. A destroyed key's versions
/// are never made usable (rows a stop left behind are deleted by the destruction timer).
pub(super) fn load(deps: &Deps, sealed: bool) -> Result<Cache, Error> {
    let mut cache = Cache::default();
    let mut records = BTreeMap::new();
    for row in deps.store.scan(Table::Keys)? {
        let record: KeyRecord = decode(Table::Keys, &row.value)?;
        records.insert(record.id, record);
    }
    let mut versions: BTreeMap<KeyId, BTreeMap<KeyVersion, Arc<VersionKey>>> = BTreeMap::new();
    let mut index = None;
    let mut canaries = Vec::new();
    for row in deps.store.scan(Table::Versions)? {
        let mut record: VersionRecord = decode(Table::Versions, &row.value)?;
        let destroyed = records
            .get(&record.key_id)
            .is_some_and(|k| k.state == KeyState::Destroyed);
        if destroyed {
            continue;
        }
        let key = if sealed {
            VersionKey::Sealed
        } else {
            materialize(deps.hsm.as_ref(), &record, &mut index)?
        };
        if record.canary.is_none() && !sealed {
            record.canary = Some(super::envelope::make_canary(
                deps.hsm.as_ref(),
                deps.rng.as_ref(),
                record.key_id,
                record.version,
                &key,
            )?);
            canaries.push(put_version(&record)?);
        }
        versions
            .entry(record.key_id)
            .or_default()
            .insert(record.version, Arc::new(key));
    }
    // Versions made before canaries existed get theirs now (docs/DRILL.md), synced in batches.
    if !canaries.is_empty() {
        let made = canaries.len();
        deps.store.write_in_batches(canaries, CANARY_BATCH)?;
        tracing::info!(
            versions = made,
            "canaries made for key versions that had none"
        );
    }
    for (id, record) in records {
        let versions = versions.remove(&id).unwrap_or_default();
        if record.state != KeyState::Destroyed && !versions.contains_key(&record.current_version) {
            tracing::error!(key_id = %record.id, version = %record.current_version, "current key version missing from store");
            return Err(Error::Internal("key record without its current version"));
        }
        if let Some(alias) = &record.alias {
            cache.aliases.insert(alias.clone(), record.id);
        }
        cache
            .keys
            .insert(id, Arc::new(KeyEntry { record, versions }));
    }
    Ok(cache)
}

/// The token's AES keys by `CKA_ID`, read once at load.
type TokenIndex = HashMap<ObjectId, Vec<IdentifiedKey>>;

/// Turns a stored version into a usable one: find the token object (by id and check value,
/// through `index`, which is read from the token on first need), or unwrap the material.
pub(super) fn materialize(
    hsm: &dyn Hsm,
    record: &VersionRecord,
    index: &mut Option<TokenIndex>,
) -> Result<VersionKey, Error> {
    match &record.material {
        StoredMaterial::Hsm {
            id: Some(id),
            check_value: Some(check_value),
            ..
        } => {
            let bad = |_| Error::Internal("malformed token object id or check value on record");
            let id = ObjectId::from_hex(id).map_err(bad)?;
            let check_value = CheckValue::from_hex(check_value).map_err(bad)?;
            let index = match index {
                Some(index) => index,
                None => {
                    let mut built = TokenIndex::new();
                    for k in hsm.aes_keys_by_id()? {
                        built.entry(k.id).or_default().push(k);
                    }
                    index.insert(built)
                }
            };
            // The same rule as a single lookup: exactly one key with the id, and its check
            // value is the recorded one.
            match index.get(&id).map(Vec::as_slice) {
                Some([k]) if k.check_value == check_value && k.widened => {
                    Err(Error::from(hsm_bridge::Error::KeyWidened {
                        id: id.to_hex(),
                    }))
                }
                Some([k]) if k.check_value == check_value => Ok(VersionKey::Hsm(k.key)),
                None | Some([]) => Err(Error::from(hsm_bridge::Error::ObjectMissing {
                    id: id.to_hex(),
                })),
                Some(_) => Err(Error::from(hsm_bridge::Error::ObjectAmbiguous {
                    what: format!("CKA_ID {id}: more than one key, or another check value"),
                })),
            }
        }
        StoredMaterial::Hsm { label, .. } => Ok(VersionKey::Hsm(hsm.find_aes_key(label)?)),
        StoredMaterial::Software { .. } => Ok(VersionKey::Software(aead_key(&unwrap_software(
            hsm, record,
        )?)?)),
    }
}

pub(super) fn aead_key(kek: &Kek) -> Result<LessSafeKey, Error> {
    UnboundKey::new(&AES_256_GCM, kek.expose_secret())
        .map(LessSafeKey::new)
        .map_err(|_| Error::Internal("aes-256-gcm key setup"))
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    table: Table,
    bytes: &[u8],
) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::Record {
        table: table.name(),
        source,
    })
}

pub(super) fn put_key(record: &KeyRecord) -> Result<Change, Error> {
    Ok(Change::Put {
        table: Table::Keys,
        key: record.id.to_bytes().to_vec(),
        value: encode(record)?,
    })
}

pub(super) fn put_alias(alias: &Alias, id: KeyId) -> Change {
    Change::Put {
        table: Table::Aliases,
        key: alias.as_str().as_bytes().to_vec(),
        value: id.to_bytes().to_vec(),
    }
}

//! Custody in the store: the recovery authority's records, what the init ceremony escrows, and
//! which custodians have verified their shares (protocol: `docs/CUSTODY.md`).
//!
//! The ceremony itself (secret, shares, seals, transcript) is the `recovery` crate's; this
//! module gives it what the deployment holds and commits what it made in one synced write.

use std::collections::BTreeMap;

use hsm_bridge::{Hsm, GCM_NONCE_LEN};
use recovery::ceremony::Sealed;
use recovery::{Purpose, RecoveryKeyRecord, Transcript};
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ids::{KeyId, KeyVersion};
use crate::key::{kek_wrap_aad, Escrow, Protection, StoredMaterial, VersionRecord};
use crate::kms::{put_version, unwrap_software};
use crate::store::{Change, Store, Table};
use crate::Rng;

const RECORD: &[u8] = b"recovery";
const TRANSCRIPT: &[u8] = b"transcript";
const SEAL_PREFIX: &[u8] = b"seal/";
const VERIFIED_PREFIX: &[u8] = b"verified/";

/// The recovery authority on record.
#[derive(Debug)]
pub struct Custody {
    /// The recovery key record (public halves and the sealed ML-KEM key).
    pub record: RecoveryKeyRecord,
    /// The init transcript.
    pub transcript: Transcript,
    /// Custodians who have verified their share, by name.
    pub verified: BTreeMap<String, Verified>,
}

/// A custodian's verification of their share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// Their share's index.
    pub index: u8,
    /// When, Unix seconds.
    pub at: u64,
}

/// Reads the recovery authority, if custody is initialised.
pub fn load(store: &dyn Store) -> Result<Option<Custody>, Error> {
    let Some(bytes) = store.get(Table::Custody, RECORD)? else {
        return Ok(None);
    };
    let record = RecoveryKeyRecord::parse(&bytes)?;
    let transcript = store
        .get(Table::Custody, TRANSCRIPT)?
        .ok_or(Error::Internal("custody record without its transcript"))?;
    let transcript = Transcript::parse(&transcript)?;
    let mut verified = BTreeMap::new();
    for row in store.scan(Table::Custody)? {
        let Some(name) = row.key.strip_prefix(VERIFIED_PREFIX) else {
            continue;
        };
        let v: Verified = serde_json::from_slice(&row.value).map_err(|source| Error::Record {
            table: Table::Custody.name(),
            source,
        })?;
        verified.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    Ok(Some(Custody {
        record,
        transcript,
        verified,
    }))
}

/// Something that exists before init and must be escrowed by it.
pub struct Escrowable {
    /// What it is.
    pub purpose: Purpose,
    /// What its seal is bound to.
    pub aad: Vec<u8>,
    material: SecretSlice<u8>,
    target: Target,
}

enum Target {
    /// A software version: its record gains the escrow.
    Version(VersionRecord),
    /// A deployment key: its seal is stored under this name.
    Named(&'static str),
}

impl Escrowable {
    /// The material to seal.
    pub fn material(&self) -> &[u8] {
        self.material.expose_secret()
    }
}

impl std::fmt::Debug for Escrowable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Escrowable")
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

/// Everything init must escrow: every unescrowed software version (unwrapped under the root
/// key), the grant MAC key and the audit context-digest key.
pub fn escrowable(store: &dyn Store, hsm: &dyn Hsm) -> Result<Vec<Escrowable>, Error> {
    let mut out = Vec::new();
    for record in versions(store)? {
        if record.escrow.is_some() || !matches!(record.material, StoredMaterial::Software { .. }) {
            continue;
        }
        let kek = unwrap_software(hsm, &record)?;
        out.push(Escrowable {
            purpose: Purpose::SoftwareVersion,
            aad: kek_wrap_aad(record.key_id, record.version),
            material: SecretSlice::from(kek.expose_secret().to_vec()),
            target: Target::Version(record),
        });
    }
    let named = [
        (
            Purpose::GrantMacKey,
            "grant-mac-key",
            Table::Grants,
            crate::governance::grants::MAC_KEY,
            crate::governance::grants::MAC_KEY_AAD,
        ),
        (
            Purpose::ContextDigestKey,
            "context-digest-key",
            Table::AuditMeta,
            crate::audit::CONTEXT_KEY,
            crate::audit::CONTEXT_KEY_AAD,
        ),
    ];
    for (purpose, name, table, key, aad) in named {
        let Some(wrapped) = store.get(table, key)? else {
            continue;
        };
        let (nonce, sealed) = wrapped
            .split_first_chunk::<GCM_NONCE_LEN>()
            .ok_or(Error::Internal("wrapped deployment key is truncated"))?;
        let raw = hsm.aes_gcm_decrypt(hsm.root_key(), nonce, aad, sealed)?;
        out.push(Escrowable {
            purpose,
            aad: name.as_bytes().to_vec(),
            material: raw,
            target: Target::Named(name),
        });
    }
    Ok(out)
}

/// Every version without escrow, and its protection level.
pub fn unescrowed(store: &dyn Store) -> Result<Vec<(KeyId, KeyVersion, Protection)>, Error> {
    Ok(versions(store)?
        .into_iter()
        .filter(|v| v.escrow.is_none())
        .map(|v| {
            let protection = match v.material {
                StoredMaterial::Hsm { .. } => Protection::Hsm,
                StoredMaterial::Software { .. } => Protection::Software,
            };
            (v.key_id, v.version, protection)
        })
        .collect())
}

fn versions(store: &dyn Store) -> Result<Vec<VersionRecord>, Error> {
    store
        .scan(Table::Versions)?
        .into_iter()
        .map(|row| {
            serde_json::from_slice(&row.value).map_err(|source| Error::Record {
                table: Table::Versions.name(),
                source,
            })
        })
        .collect()
}

/// The one synced write that makes init take effect: the recovery key record, the
/// transcript, and every seal `sealed` made for `items` (in order). Refused if custody exists.
pub fn commit_init(
    store: &dyn Store,
    sealed: &Sealed,
    items: Vec<Escrowable>,
) -> Result<(), Error> {
    if let Some(existing) = load(store)? {
        return Err(Error::CustodyInitialised {
            ceremony: existing.record.ceremony_id.to_string(),
        });
    }
    if sealed.seals.len() != items.len() {
        return Err(Error::Internal("one seal per escrowed item"));
    }
    let ceremony = sealed.record.ceremony_id;
    let mut changes = vec![
        Change::Put {
            table: Table::Custody,
            key: RECORD.to_vec(),
            value: sealed.record.to_json()?,
        },
        Change::Put {
            table: Table::Custody,
            key: TRANSCRIPT.to_vec(),
            value: sealed.transcript.canonical()?,
        },
    ];
    for (item, seal) in items.into_iter().zip(&sealed.seals) {
        match item.target {
            Target::Version(mut record) => {
                record.escrow = Some(Escrow::Sealed {
                    ceremony,
                    sealed: seal.clone(),
                });
                changes.push(put_version(&record)?);
            }
            Target::Named(name) => {
                let mut key = SEAL_PREFIX.to_vec();
                key.extend_from_slice(name.as_bytes());
                changes.push(Change::Put {
                    table: Table::Custody,
                    key,
                    value: seal.clone(),
                });
            }
        }
    }
    store.write(changes)
}

/// The seal of a deployment key (`grant-mac-key`, `context-digest-key`).
pub fn named_seal(store: &dyn Store, name: &str) -> Result<Option<Vec<u8>>, Error> {
    let mut key = SEAL_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    store.get(Table::Custody, &key)
}

/// Records that a custodian verified their share.
pub fn record_verified(store: &dyn Store, name: &str, verified: &Verified) -> Result<(), Error> {
    let mut key = VERIFIED_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    let value = serde_json::to_vec(verified).map_err(|_| Error::Internal("record encoding"))?;
    store.write(vec![Change::Put {
        table: Table::Custody,
        key,
        value,
    }])
}

/// The KMS's generator, as the recovery crate takes one.
pub(crate) struct RecoveryRng<'a>(pub(crate) &'a dyn Rng);

impl recovery::Random for RecoveryRng<'_> {
    fn fill(&self, out: &mut [u8]) -> Result<(), recovery::Error> {
        self.0.fill(out).map_err(|_| recovery::Error::Random)
    }
}

/// Base64 for sealed bytes in JSON records.
pub(crate) mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;

    pub(crate) fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

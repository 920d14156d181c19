//! The key service: key lifecycle and envelope operations over an HSM and a store.
//!
//! All methods block (they may call the HSM or write the store); async callers run them
//! under `spawn_blocking`. Key metadata and version handles are cached in memory at open and
//! on every change; software-protection versions are unwrapped once, at load or creation.
//!
//! `envelope` holds the data-plane operations (authorise, then seal or open); `material` the
//! store records and how a stored version becomes usable.

mod destroy;
mod envelope;
mod material;

pub use self::destroy::MAX_DESTROY_WAITING_DAYS;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aws_lc_rs::aead::LessSafeKey;
use hsm_bridge::{Hsm, TokenKey};
use parking_lot::{Mutex, RwLock};

use self::material::{aead_key, load, put_alias, put_key};
use crate::blob::NONCE_LEN;
use crate::clock::{Clock, Rng};
use crate::custody::RecoveryRng;
use crate::error::Error;
use crate::governance::authz::Authorizer;
use crate::ids::{Alias, KeyId, KeyRef, KeyVersion};
use crate::key::put_version;
use crate::key::{
    kek_wrap_aad, Escrow, KeyRecord, KeyState, Labels, Protection, StoredMaterial, VersionRecord,
};
use crate::op::Op;
use crate::seal::SealRecord;
use crate::secret::{Dek, Kek, Plaintext};
use crate::store::{Change, Store, Table};

/// What the service runs on. Every dependency is injected.
pub struct Deps {
    /// The HSM holding the root key.
    pub hsm: Arc<dyn Hsm>,
    /// Durable storage.
    pub store: Arc<dyn Store>,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Randomness for DEKs, nonces and ids.
    pub rng: Arc<dyn Rng>,
    /// Data-plane authorisation.
    pub authorizer: Arc<dyn Authorizer>,
}

/// Parameters of a new key.
#[derive(Clone, Debug)]
pub struct NewKey {
    /// Optional unique alias.
    pub alias: Option<Alias>,
    /// Labels.
    pub labels: Labels,
    /// Protection level.
    pub protection: Protection,
}

/// A freshly generated data key: plaintext once, and its blob.
#[derive(Debug)]
pub struct DataKey {
    /// The key that wrapped it.
    pub key_id: KeyId,
    /// The version that wrapped it.
    pub key_version: KeyVersion,
    /// The plaintext DEK.
    pub plaintext: Dek,
    /// The blob to store beside the data.
    pub ciphertext: Vec<u8>,
    /// The policies that allowed it.
    pub policies: Vec<String>,
}

/// A blob and the key version that sealed it.
#[derive(Debug)]
pub struct Sealed {
    /// The key.
    pub key_id: KeyId,
    /// The version.
    pub key_version: KeyVersion,
    /// The blob.
    pub ciphertext: Vec<u8>,
    /// The policies that allowed it.
    pub policies: Vec<String>,
}

/// A blob sealed again by [`Kms::re_encrypt`], and the key version that had sealed it.
#[derive(Debug)]
pub struct ReEncrypted {
    /// The key that had sealed the source blob.
    pub source_key_id: KeyId,
    /// The version that had sealed the source blob.
    pub source_key_version: KeyVersion,
    /// The new blob.
    pub sealed: Sealed,
}

/// An opened blob.
#[derive(Debug)]
pub struct Opened {
    /// The key that had sealed it.
    pub key_id: KeyId,
    /// The version that had sealed it.
    pub key_version: KeyVersion,
    /// The plaintext.
    pub plaintext: Plaintext,
    /// The policies that allowed it.
    pub policies: Vec<String>,
}

/// The key service.
pub struct Kms {
    deps: Deps,
    /// The recovery public key every new software version is sealed to, once custody is
    /// initialised (it is read at open: init runs with the server stopped).
    recovery: Option<(recovery::CeremonyId, recovery::RecoveryPublicKey)>,
    /// Whether new `hsm` versions can be made: they are escrowed under the pinned trusted
    /// key, which needs custody and a token that passed the self-test at open.
    hsm_escrow: HsmEscrow,
    cache: RwLock<Cache>,
    /// Serialises read-modify-write changes to key records.
    admin: Mutex<()>,
    /// Set while the service is sealed.
    sealed: Arc<AtomicBool>,
}

/// Whether `hsm` versions can be created, decided once at open.
#[derive(Clone, Debug)]
enum HsmEscrow {
    /// Custody and the pinned escrow key are in place and the token passed its self-test.
    Ready {
        ceremony: recovery::CeremonyId,
        pin: hsm_bridge::EscrowPin,
    },
    /// Custody is not initialised.
    NoCustody,
    /// Custody exists but pins no escrow key, or the token failed its self-test (the reason).
    Unavailable(String),
}

/// Keys of one state and protection level, counted ([`Kms::census`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyCensus {
    /// The state.
    pub state: KeyState,
    /// The protection level.
    pub protection: Protection,
    /// How many keys.
    pub keys: u64,
    /// How many versions they hold in memory.
    pub versions: u64,
}

#[derive(Default)]
struct Cache {
    keys: BTreeMap<KeyId, Arc<KeyEntry>>,
    aliases: HashMap<Alias, KeyId>,
}

impl Cache {
    /// The alias that `alias` would clash with, and its key: the same alias, or one that
    /// differs only in case (`Demo` and `demo` are too alike to name two keys). A scan, but
    /// only on admin changes.
    fn alias_owner(&self, alias: &Alias) -> Option<(Alias, KeyId)> {
        if let Some(id) = self.aliases.get(alias) {
            return Some((alias.clone(), *id));
        }
        self.aliases
            .iter()
            .find(|(a, _)| a.as_str().eq_ignore_ascii_case(alias.as_str()))
            .map(|(a, id)| (a.clone(), *id))
    }
}

#[derive(Clone)]
struct KeyEntry {
    record: KeyRecord,
    versions: BTreeMap<KeyVersion, Arc<VersionKey>>,
}

/// A usable key version.
enum VersionKey {
    /// A token object.
    Hsm(TokenKey),
    /// Unwrapped material in aws-lc's key schedule, wiped by aws-lc when dropped.
    Software(LessSafeKey),
    /// Not usable: the service is sealed.
    Sealed,
}

impl Kms {
    /// Loads every key from the store and makes each version usable.
    pub fn open(deps: Deps) -> Result<Self, Error> {
        let seal = crate::seal::load(deps.store.as_ref())?;
        if let Some(s) = &seal {
            tracing::warn!(sealed_by = %s.sealed_by, reason = %s.reason, "the service is sealed: no key is usable until `kms unseal` is approved");
        }
        let cache = load(&deps, seal.is_some())?;
        let custody = crate::custody::load(deps.store.as_ref())?;
        let hsm_escrow = match &custody {
            None => HsmEscrow::NoCustody,
            Some(c) => match crate::custody::escrow_pin(&c.transcript)? {
                None => HsmEscrow::Unavailable(
                    "the ceremony on record pins no trusted escrow key".into(),
                ),
                // A lost session or a device fault says nothing of the token's rules: once
                // more before `hsm` protection is refused for this run.
                Some(pin) => match deps.hsm.escrow_self_test(Some(&pin)).or_else(|e| {
                    if e.is_retryable() {
                        deps.hsm.escrow_self_test(Some(&pin))
                    } else {
                        Err(e)
                    }
                }) {
                    Ok(()) => HsmEscrow::Ready {
                        ceremony: c.record.ceremony_id,
                        pin,
                    },
                    Err(e) => {
                        tracing::error!(error = %e, "hsm protection is unavailable: the token failed its escrow self-test");
                        HsmEscrow::Unavailable(e.to_string())
                    }
                },
            },
        };
        let recovery = custody.map(|c| (c.record.ceremony_id, c.record.public));
        tracing::info!(
            keys = cache.keys.len(),
            custody = recovery.is_some(),
            hsm_escrow = matches!(hsm_escrow, HsmEscrow::Ready { .. }),
            "key store loaded"
        );
        Ok(Self {
            deps,
            recovery,
            hsm_escrow,
            cache: RwLock::new(cache),
            admin: Mutex::new(()),
            sealed: Arc::new(AtomicBool::new(seal.is_some())),
        })
    }

    /// A signed sovereignty attestation of the deployment as it is now (see
    /// [`crate::attest`]).
    pub fn attest(&self, software_version: &str) -> Result<crate::attest::Attestation, Error> {
        let statement = crate::attest::gather(
            self.deps.store.as_ref(),
            self.deps.hsm.as_ref(),
            self.deps.clock.now_unix(),
            software_version,
        )?;
        crate::attest::Attestation::sign(statement, self.deps.hsm.as_ref())
    }

    /// A backup bundle of the store as it is now, from one snapshot, signed with the audit
    /// key (see [`crate::backup::export`]).
    pub fn export_backup(
        &self,
        req: crate::backup::ExportRequest,
    ) -> Result<crate::backup::Exported, Error> {
        crate::backup::export(self.deps.store.as_ref(), self.deps.hsm.as_ref(), req)
    }

    /// The flag that says the service is sealed, for the data plane's gate to refuse every
    /// request before it is read.
    pub fn sealed_flag(&self) -> Arc<AtomicBool> {
        self.sealed.clone()
    }

    /// True while the service is sealed.
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::SeqCst)
    }

    /// Seals the service: the seal is written (synced) first, then every key version is
    /// dropped from memory (software material is wiped as aws-lc drops it). Key metadata
    /// stays, for admin reads. Sealing a sealed service keeps the first record.
    pub fn seal_service(&self, record: &SealRecord) -> Result<SealRecord, Error> {
        let _admin = self.admin.lock();
        if let Some(existing) = crate::seal::load(self.deps.store.as_ref())? {
            self.drop_material();
            return Ok(existing);
        }
        self.deps.store.write(vec![crate::seal::put(record)?])?;
        self.drop_material();
        tracing::warn!(sealed_by = %record.sealed_by, reason = %record.reason, "service sealed");
        Ok(record.clone())
    }

    fn drop_material(&self) {
        self.sealed.store(true, Ordering::SeqCst);
        let mut cache = self.cache.write();
        for entry in cache.keys.values_mut() {
            let mut sealed = entry.as_ref().clone();
            for key in sealed.versions.values_mut() {
                *key = Arc::new(VersionKey::Sealed);
            }
            *entry = Arc::new(sealed);
        }
    }

    /// Unseals: every version is made usable again from the store and the token, and only
    /// then is the seal removed. Returns the seal that was lifted (`None` if not sealed).
    pub fn unseal_service(&self) -> Result<Option<SealRecord>, Error> {
        let _admin = self.admin.lock();
        let Some(record) = crate::seal::load(self.deps.store.as_ref())? else {
            self.sealed.store(false, Ordering::SeqCst);
            return Ok(None);
        };
        let cache = load(&self.deps, false)?;
        self.deps.store.write(vec![crate::seal::remove()])?;
        *self.cache.write() = cache;
        self.sealed.store(false, Ordering::SeqCst);
        tracing::warn!("service unsealed");
        Ok(Some(record))
    }

    fn refuse_if_sealed(&self) -> Result<(), Error> {
        if self.is_sealed() {
            return Err(Error::Sealed);
        }
        Ok(())
    }

    /// Creates a key with its first version.
    pub fn create_key(&self, spec: NewKey) -> Result<KeyRecord, Error> {
        let _admin = self.admin.lock();
        self.refuse_if_sealed()?;
        if let Some(alias) = &spec.alias {
            if let Some((taken, _)) = self.cache.read().alias_owner(alias) {
                return Err(Error::AliasTaken { alias: taken });
            }
        }
        let mut id_bytes = [0u8; 16];
        self.deps.rng.fill(&mut id_bytes)?;
        let id = KeyId::from_random_bytes(id_bytes);
        let now = self.deps.clock.now_unix();
        let record = KeyRecord {
            id,
            alias: spec.alias,
            labels: spec.labels,
            protection: spec.protection,
            state: KeyState::Enabled,
            current_version: KeyVersion::FIRST,
            created_at: now,
            updated_at: now,
            destruction: None,
        };
        let (version, key) = self.new_version(&record, KeyVersion::FIRST)?;
        let mut changes = vec![put_key(&record)?, put_version(&version)?];
        if let Some(alias) = &record.alias {
            changes.push(put_alias(alias, id));
        }
        self.write_version(changes, &key)?;
        let entry = KeyEntry {
            record: record.clone(),
            versions: BTreeMap::from([(KeyVersion::FIRST, Arc::new(key))]),
        };
        self.install(entry, None);
        tracing::info!(key_id = %id, protection = ?record.protection, "key created");
        Ok(record)
    }

    /// A key's metadata.
    pub fn describe_key(&self, key: &KeyRef) -> Result<KeyRecord, Error> {
        Ok(self.entry(key)?.record.clone())
    }

    /// How many keys there are in each (state, protection), every pair listed (zero
    /// included), and how many usable versions they hold in memory (none while sealed): for a
    /// node's metrics. Counted under the cache's read lock, without copying a record.
    pub fn census(&self) -> Vec<KeyCensus> {
        let mut counts: Vec<KeyCensus> = KeyState::ALL
            .iter()
            .flat_map(|&state| {
                Protection::ALL.iter().map(move |&protection| KeyCensus {
                    state,
                    protection,
                    keys: 0,
                    versions: 0,
                })
            })
            .collect();
        for entry in self.cache.read().keys.values() {
            let r = &entry.record;
            let Some(slot) = counts
                .iter_mut()
                .find(|c| c.state == r.state && c.protection == r.protection)
            else {
                continue;
            };
            let usable = entry
                .versions
                .values()
                .filter(|v| !matches!(v.as_ref(), VersionKey::Sealed))
                .count();
            slot.keys += 1;
            slot.versions += u64::try_from(usable).unwrap_or(u64::MAX);
        }
        counts
    }

    /// Up to `limit` keys after `after`, in id order, and the id to continue from.
    pub fn list_keys(&self, after: Option<KeyId>, limit: usize) -> (Vec<KeyRecord>, Option<KeyId>) {
        let cache = self.cache.read();
        let range = match after {
            Some(id) => cache
                .keys
                .range((std::ops::Bound::Excluded(id), std::ops::Bound::Unbounded)),
            None => cache.keys.range(..),
        };
        let page: Vec<KeyRecord> = range
            .take(limit.max(1))
            .map(|(_, e)| e.record.clone())
            .collect();
        let next = match page.last() {
            Some(last) if cache.keys.range(last.id..).nth(1).is_some() => Some(last.id),
            _ => None,
        };
        (page, next)
    }

    /// Adds a version; new encryptions use it, older versions still decrypt.
    pub fn rotate_key(&self, key: &KeyRef) -> Result<KeyRecord, Error> {
        let _admin = self.admin.lock();
        self.refuse_if_sealed()?;
        let entry = self.entry(key)?;
        if entry.record.state != KeyState::Enabled {
            return Err(Error::KeyState {
                id: entry.record.id,
                state: entry.record.state,
                op: Op::Rotate,
            });
        }
        let next = entry.record.current_version.next()?;
        let mut updated = entry.as_ref().clone();
        updated.record.current_version = next;
        updated.record.updated_at = self.deps.clock.now_unix();
        let (version, key) = self.new_version(&updated.record, next)?;
        self.write_version(
            vec![put_version(&version)?, put_key(&updated.record)?],
            &key,
        )?;
        updated.versions.insert(next, Arc::new(key));
        let record = updated.record.clone();
        self.install(updated, None);
        tracing::info!(key_id = %record.id, version = %next, "key rotated");
        Ok(record)
    }

    /// Enables or disables a key. A key pending destruction or destroyed is neither:
    /// `cancel-destroy` is the way back from the first, and there is none from the second.
    pub fn set_key_state(&self, key: &KeyRef, state: KeyState) -> Result<KeyRecord, Error> {
        let _admin = self.admin.lock();
        let mut updated = self.entry(key)?.as_ref().clone();
        let movable = |s| matches!(s, KeyState::Enabled | KeyState::Disabled);
        if !movable(updated.record.state) || !movable(state) {
            return Err(Error::KeyLifecycle {
                id: updated.record.id,
                state: updated.record.state,
                action: match state {
                    KeyState::Enabled => "enable it",
                    _ => "disable it",
                },
            });
        }
        updated.record.state = state;
        updated.record.updated_at = self.deps.clock.now_unix();
        self.deps.store.write(vec![put_key(&updated.record)?])?;
        let record = updated.record.clone();
        self.install(updated, None);
        tracing::info!(key_id = %record.id, ?state, "key state changed");
        Ok(record)
    }

    /// Gives a key an alias, replacing the alias it had.
    pub fn set_alias(&self, alias: Alias, key: &KeyRef) -> Result<KeyRecord, Error> {
        let _admin = self.admin.lock();
        let mut updated = self.entry(key)?.as_ref().clone();
        if let Some((taken, owner)) = self.cache.read().alias_owner(&alias) {
            if owner != updated.record.id {
                return Err(Error::AliasTaken { alias: taken });
            }
        }
        let old = updated.record.alias.replace(alias.clone());
        updated.record.updated_at = self.deps.clock.now_unix();
        let mut changes = vec![
            put_key(&updated.record)?,
            put_alias(&alias, updated.record.id),
        ];
        if let Some(old) = old.as_ref().filter(|o| **o != alias) {
            changes.push(Change::Delete {
                table: Table::Aliases,
                key: old.as_str().as_bytes().to_vec(),
            });
        }
        self.deps.store.write(changes)?;
        let record = updated.record.clone();
        self.install(updated, old);
        tracing::info!(key_id = %record.id, %alias, "alias set");
        Ok(record)
    }

    fn entry(&self, key: &KeyRef) -> Result<Arc<KeyEntry>, Error> {
        let cache = self.cache.read();
        let id = match key {
            KeyRef::Id(id) => Some(*id),
            KeyRef::Alias(alias) => cache.aliases.get(alias).copied(),
        };
        id.and_then(|id| cache.keys.get(&id).cloned())
            .ok_or_else(|| Error::KeyNotFound { key: key.clone() })
    }

    /// Makes new material for `version` of `record`'s key.
    // long: both protection levels' material, escrow and canary, made in one place.
    fn new_version(
        &self,
        record: &KeyRecord,
        version: KeyVersion,
    ) -> Result<(VersionRecord, VersionKey), Error> {
        let hsm = self.deps.hsm.as_ref();
        let mut escrow = None;
        let (material, key) = match record.protection {
            Protection::Hsm => {
                let (ceremony, pin) = match &self.hsm_escrow {
                    HsmEscrow::Ready { ceremony, pin } => (*ceremony, pin),
                    HsmEscrow::NoCustody => return Err(Error::HsmNeedsCustody),
                    HsmEscrow::Unavailable(reason) => {
                        return Err(Error::HsmEscrowUnavailable {
                            reason: reason.clone(),
                        })
                    }
                };
                let label = format!("sovereign-kms/kek/{}/v{}", record.id, version);
                let mut id = [0u8; hsm_bridge::OBJECT_ID_LEN];
                self.deps.rng.fill(&mut id)?;
                let made = hsm.generate_escrowed_key(&label, &hsm_bridge::ObjectId(id), pin)?;
                escrow = Some(Escrow::Wrapped {
                    ceremony,
                    escrow_key_id: pin.id.to_hex(),
                    wrapped: made.wrapped,
                });
                (
                    StoredMaterial::Hsm {
                        label,
                        id: Some(made.id.to_hex()),
                        check_value: Some(made.check_value.to_hex()),
                    },
                    VersionKey::Hsm(made.key),
                )
            }
            Protection::Software => {
                let kek = Kek::init_with(|buf| hsm.random(buf).map_err(Error::from))?;
                let mut nonce = [0u8; NONCE_LEN];
                self.deps.rng.fill(&mut nonce)?;
                let aad = kek_wrap_aad(record.id, version);
                let mut wrapped = nonce.to_vec();
                wrapped.extend(hsm.aes_gcm_encrypt(
                    hsm.root_key(),
                    &nonce,
                    &aad,
                    kek.expose_secret(),
                )?);
                // Escrow in the same record, so the version and its escrow are one write; a
                // failed seal creates no version.
                if let Some((ceremony, public)) = &self.recovery {
                    let sealed = public.seal(
                        &RecoveryRng(self.deps.rng.as_ref()),
                        recovery::Purpose::SoftwareVersion,
                        &aad,
                        kek.expose_secret(),
                    )?;
                    escrow = Some(Escrow::Sealed {
                        ceremony: *ceremony,
                        sealed,
                    });
                }
                (
                    StoredMaterial::Software { wrapped },
                    VersionKey::Software(aead_key(&kek)?),
                )
            }
        };
        // The canary is made before the version is written, in the same record: a version
        // without one would be a gap a drill reports.
        let canary = envelope::make_canary(hsm, self.deps.rng.as_ref(), record.id, version, &key);
        let canary = match canary {
            Ok(c) => c,
            Err(e) => {
                if let VersionKey::Hsm(handle) = &key {
                    if let Err(d) = hsm.destroy_key(*handle) {
                        tracing::error!(error = %d, "could not destroy the token key of a version whose canary failed");
                    }
                }
                return Err(e);
            }
        };
        let record = VersionRecord {
            key_id: record.id,
            version,
            created_at: self.deps.clock.now_unix(),
            material,
            escrow,
            canary: Some(canary),
        };
        Ok((record, key))
    }

    /// Writes a new version's records; if the write fails, a token object made for it is
    /// destroyed, so no key exists that the store does not know.
    fn write_version(&self, changes: Vec<Change>, key: &VersionKey) -> Result<(), Error> {
        let written = self.deps.store.write(changes);
        if written.is_err() {
            if let VersionKey::Hsm(handle) = key {
                if let Err(e) = self.deps.hsm.destroy_key(*handle) {
                    tracing::error!(error = %e, "could not destroy the token key of a version that was not written");
                }
            }
        }
        written
    }

    fn install(&self, entry: KeyEntry, removed_alias: Option<Alias>) {
        let mut cache = self.cache.write();
        if let Some(old) = removed_alias {
            cache.aliases.remove(&old);
        }
        if let Some(alias) = &entry.record.alias {
            cache.aliases.insert(alias.clone(), entry.record.id);
        }
        cache.keys.insert(entry.record.id, Arc::new(entry));
    }
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kms")
            .field("keys", &self.cache.read().keys.len())
            .finish_non_exhaustive()
    }
}

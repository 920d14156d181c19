//! The key service: key lifecycle and envelope operations over an HSM and a store.
//!
//! All methods block (they may call the HSM or write the store); async callers run them
//! under `spawn_blocking`. Key metadata and version handles are cached in memory at open and
//! on every change; software-protection versions are unwrapped once, at load or creation.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use hsm_bridge::{Hsm, TokenKey};
use parking_lot::{Mutex, RwLock};
use secrecy::ExposeSecret;
use zeroize::Zeroize;

use crate::authz::{authorize, AccessRequest, Authorizer, Caller, PolicyDecision};
use crate::blob::{Algorithm, Blob, Header, MAX_PLAINTEXT_LEN, NONCE_LEN};
use crate::clock::{Clock, Rng};
use crate::context::EncryptionContext;
use crate::error::{Error, Op};
use crate::ids::{Alias, KeyId, KeyRef, KeyVersion, PrincipalId};
use crate::key::{
    kek_wrap_aad, KeyRecord, KeyState, Labels, Protection, StoredMaterial, VersionRecord,
};
use crate::secret::{Dek, Kek, Plaintext, KEK_LEN};
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
    cache: RwLock<Cache>,
    /// Serialises read-modify-write changes to key records.
    admin: Mutex<()>,
}

#[derive(Default)]
struct Cache {
    keys: BTreeMap<KeyId, Arc<KeyEntry>>,
    aliases: HashMap<Alias, KeyId>,
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
}

impl Kms {
    /// Loads every key from the store and makes each version usable.
    pub fn open(deps: Deps) -> Result<Self, Error> {
        let cache = load(&deps)?;
        tracing::info!(keys = cache.keys.len(), "key store loaded");
        Ok(Self {
            deps,
            cache: RwLock::new(cache),
            admin: Mutex::new(()),
        })
    }

    /// Creates a key with its first version.
    pub fn create_key(&self, spec: NewKey) -> Result<KeyRecord, Error> {
        let _admin = self.admin.lock();
        if let Some(alias) = &spec.alias {
            if self.cache.read().aliases.contains_key(alias) {
                return Err(Error::AliasTaken {
                    alias: alias.clone(),
                });
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
        };
        let (version, key) = self.new_version(&record, KeyVersion::FIRST)?;
        let mut changes = vec![put_key(&record)?, put_version(&version)?];
        if let Some(alias) = &record.alias {
            changes.push(put_alias(alias, id));
        }
        self.deps.store.write(changes)?;
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
        self.deps
            .store
            .write(vec![put_version(&version)?, put_key(&updated.record)?])?;
        updated.versions.insert(next, Arc::new(key));
        let record = updated.record.clone();
        self.install(updated, None);
        tracing::info!(key_id = %record.id, version = %next, "key rotated");
        Ok(record)
    }

    /// Enables or disables a key.
    pub fn set_key_state(&self, key: &KeyRef, state: KeyState) -> Result<KeyRecord, Error> {
        let _admin = self.admin.lock();
        let mut updated = self.entry(key)?.as_ref().clone();
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
        if let Some(owner) = self.cache.read().aliases.get(&alias) {
            if *owner != updated.record.id {
                return Err(Error::AliasTaken { alias });
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

    /// A new data key under the key's current version.
    pub fn generate_data_key(
        &self,
        caller: &Caller,
        key: &KeyRef,
        context: &EncryptionContext,
    ) -> Result<DataKey, Error> {
        let entry = self.entry(key)?;
        let ok = self.permit(caller, &entry, Op::GenerateDataKey, context)?;
        let rng = &self.deps.rng;
        let dek = Dek::init_with(|buf| rng.fill(buf))?;
        let sealed = self.seal(&entry, dek.expose_secret(), context, ok)?;
        Ok(DataKey {
            key_id: sealed.key_id,
            key_version: sealed.key_version,
            plaintext: dek,
            ciphertext: sealed.ciphertext,
            policies: sealed.policies,
        })
    }

    /// Encrypts a small secret (at most 4096 bytes).
    pub fn encrypt(
        &self,
        caller: &Caller,
        key: &KeyRef,
        plaintext: &Plaintext,
        context: &EncryptionContext,
    ) -> Result<Sealed, Error> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(Error::TooLarge {
                what: "plaintext",
                len: plaintext.len(),
                max: MAX_PLAINTEXT_LEN,
            });
        }
        let entry = self.entry(key)?;
        let ok = self.permit(caller, &entry, Op::Encrypt, context)?;
        self.seal(&entry, plaintext.expose_secret(), context, ok)
    }

    /// Opens a blob with the same encryption context it was sealed with.
    pub fn decrypt(
        &self,
        caller: &Caller,
        ciphertext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Opened, Error> {
        let blob = Blob::parse(ciphertext)?;
        let entry = self.entry(&KeyRef::Id(blob.header.key_id))?;
        let ok = self.permit(caller, &entry, Op::Decrypt, context)?;
        let plaintext = self.open_blob(&entry, &blob, context, &ok)?;
        Ok(Opened {
            key_id: blob.header.key_id,
            key_version: blob.header.key_version,
            plaintext,
            policies: ok.into_policies(),
        })
    }

    /// Opens a blob and seals its plaintext again under `destination` (its current version)
    /// and `destination_context`, without returning the plaintext.
    pub fn re_encrypt(
        &self,
        caller: &Caller,
        ciphertext: &[u8],
        source_context: &EncryptionContext,
        destination: &KeyRef,
        destination_context: &EncryptionContext,
    ) -> Result<ReEncrypted, Error> {
        let blob = Blob::parse(ciphertext)?;
        let source = self.entry(&KeyRef::Id(blob.header.key_id))?;
        let dest = self.entry(destination)?;
        let open_ok = self.permit(caller, &source, Op::Decrypt, source_context)?;
        let seal_ok = self.permit(caller, &dest, Op::ReEncrypt, destination_context)?;
        let plaintext = self.open_blob(&source, &blob, source_context, &open_ok)?;
        let mut sealed = self.seal(
            &dest,
            plaintext.expose_secret(),
            destination_context,
            seal_ok,
        )?;
        let mut policies = open_ok.into_policies();
        for p in sealed.policies.drain(..) {
            if !policies.contains(&p) {
                policies.push(p);
            }
        }
        sealed.policies = policies;
        Ok(ReEncrypted {
            source_key_id: blob.header.key_id,
            source_key_version: blob.header.key_version,
            sealed,
        })
    }

    /// True when operations under this key run in the HSM and so block on it; async callers
    /// move those off their workers. Software keys and unknown keys answer from memory.
    pub fn runs_in_hsm(&self, key: &KeyRef) -> bool {
        self.entry(key)
            .is_ok_and(|e| e.record.protection == Protection::Hsm)
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

    /// Authorises first, then checks state: a caller who may not use a key learns nothing
    /// of its state. A caller presenting a grant needs the grant to cover the key, the
    /// operation and the context, the grant's creator to be allowed the same request, and the
    /// policies to allow the caller itself under the grant.
    fn permit(
        &self,
        caller: &Caller,
        entry: &KeyEntry,
        op: Op,
        context: &EncryptionContext,
    ) -> Result<PolicyDecision, Error> {
        let now_unix = self.deps.clock.now_unix();
        let mut creator_policies = Vec::new();
        if let Some(g) = &caller.grant {
            let grant = &g.grant;
            let refused = |reason| Err(Error::GrantRefused { reason });
            if grant.key_id != entry.record.id {
                return refused("grant.other_key");
            }
            if !grant.allows_op(op) {
                return refused("grant.operation_not_granted");
            }
            if !grant.context_satisfied(context) {
                return refused("grant.context_mismatch");
            }
            let creator = Caller {
                id: PrincipalId::new(grant.creator.clone()),
                method: caller.method,
                workload: g.creator_workload.clone(),
                purpose: caller.purpose.clone(),
                grant: None,
            };
            let creator_request = AccessRequest {
                caller: &creator,
                op,
                key: &entry.record,
                context,
                now_unix,
            };
            match authorize(self.deps.authorizer.as_ref(), &creator_request) {
                Ok(d) => creator_policies = d.into_policies(),
                Err(_) => return refused("grant.creator_not_allowed"),
            }
        }
        let request = AccessRequest {
            caller,
            op,
            key: &entry.record,
            context,
            now_unix,
        };
        let mut ok = authorize(self.deps.authorizer.as_ref(), &request)?;
        ok.add_policies(creator_policies);
        if entry.record.state != KeyState::Enabled {
            return Err(Error::KeyState {
                id: entry.record.id,
                state: entry.record.state,
                op,
            });
        }
        Ok(ok)
    }

    /// Asks the authorizer whether `caller` may do `op` on `key` with `context`, doing
    /// nothing else: for checking that a grant's creator may do what it delegates.
    pub fn check_access(
        &self,
        caller: &Caller,
        key: &KeyRef,
        op: Op,
        context: &EncryptionContext,
    ) -> Result<(KeyRecord, Vec<String>), Error> {
        let entry = self.entry(key)?;
        let request = AccessRequest {
            caller,
            op,
            key: &entry.record,
            context,
            now_unix: self.deps.clock.now_unix(),
        };
        let ok = authorize(self.deps.authorizer.as_ref(), &request)?;
        Ok((entry.record.clone(), ok.into_policies()))
    }

    fn seal(
        &self,
        entry: &KeyEntry,
        plaintext: &[u8],
        context: &EncryptionContext,
        ok: PolicyDecision,
    ) -> Result<Sealed, Error> {
        let version = entry.record.current_version;
        let key = entry
            .versions
            .get(&version)
            .ok_or(Error::Internal("current version not loaded"))?;
        let mut nonce = [0u8; NONCE_LEN];
        self.deps.rng.fill(&mut nonce)?;
        let header = Header {
            algorithm: Algorithm::Aes256Gcm,
            key_id: entry.record.id,
            key_version: version,
            nonce,
        };
        let aad = header.aad(context)?;
        let sealed = match key.as_ref() {
            VersionKey::Hsm(token_key) => self
                .deps
                .hsm
                .aes_gcm_encrypt(*token_key, &nonce, &aad, plaintext)?,
            VersionKey::Software(key) => software_seal(key, &nonce, &aad, plaintext)?,
        };
        Ok(Sealed {
            key_id: entry.record.id,
            key_version: version,
            ciphertext: Blob::assemble(&header, &sealed),
            policies: ok.into_policies(),
        })
    }

    fn open_blob(
        &self,
        entry: &KeyEntry,
        blob: &Blob<'_>,
        context: &EncryptionContext,
        _ok: &PolicyDecision,
    ) -> Result<Plaintext, Error> {
        let header = &blob.header;
        let key = entry
            .versions
            .get(&header.key_version)
            .ok_or(Error::VersionNotFound {
                id: header.key_id,
                version: header.key_version,
            })?;
        let aad = header.aad(context)?;
        match key.as_ref() {
            VersionKey::Hsm(token_key) => Ok(Plaintext::from_secret(
                self.deps
                    .hsm
                    .aes_gcm_decrypt(*token_key, &header.nonce, &aad, blob.sealed)?,
            )),
            VersionKey::Software(key) => software_open(key, &header.nonce, &aad, blob.sealed),
        }
    }

    /// Makes new material for `version` of `record`'s key.
    fn new_version(
        &self,
        record: &KeyRecord,
        version: KeyVersion,
    ) -> Result<(VersionRecord, VersionKey), Error> {
        let hsm = self.deps.hsm.as_ref();
        let (material, key) = match record.protection {
            Protection::Hsm => {
                let label = format!("sovereign-kms/kek/{}/v{}", record.id, version);
                let handle = hsm.generate_aes_key(&label)?;
                (StoredMaterial::Hsm { label }, VersionKey::Hsm(handle))
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
                (
                    StoredMaterial::Software { wrapped },
                    VersionKey::Software(aead_key(&kek)?),
                )
            }
        };
        let record = VersionRecord {
            key_id: record.id,
            version,
            created_at: self.deps.clock.now_unix(),
            material,
        };
        Ok((record, key))
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

fn load(deps: &Deps) -> Result<Cache, Error> {
    let mut cache = Cache::default();
    let mut versions: BTreeMap<KeyId, BTreeMap<KeyVersion, Arc<VersionKey>>> = BTreeMap::new();
    for row in deps.store.scan(Table::Versions)? {
        let record: VersionRecord = decode(Table::Versions, &row.value)?;
        let key = materialize(deps.hsm.as_ref(), &record)?;
        versions
            .entry(record.key_id)
            .or_default()
            .insert(record.version, Arc::new(key));
    }
    for row in deps.store.scan(Table::Keys)? {
        let record: KeyRecord = decode(Table::Keys, &row.value)?;
        let versions = versions.remove(&record.id).unwrap_or_default();
        if !versions.contains_key(&record.current_version) {
            tracing::error!(key_id = %record.id, version = %record.current_version, "current key version missing from store");
            return Err(Error::Internal("key record without its current version"));
        }
        if let Some(alias) = &record.alias {
            cache.aliases.insert(alias.clone(), record.id);
        }
        cache
            .keys
            .insert(record.id, Arc::new(KeyEntry { record, versions }));
    }
    Ok(cache)
}

/// Turns a stored version into a usable one: find the token object, or unwrap the material.
fn materialize(hsm: &dyn Hsm, record: &VersionRecord) -> Result<VersionKey, Error> {
    match &record.material {
        StoredMaterial::Hsm { label } => Ok(VersionKey::Hsm(hsm.find_aes_key(label)?)),
        StoredMaterial::Software { wrapped } => {
            let (nonce, sealed) = wrapped
                .split_first_chunk::<NONCE_LEN>()
                .ok_or(Error::Internal("wrapped key material truncated"))?;
            let aad = kek_wrap_aad(record.key_id, record.version);
            let plain = hsm
                .aes_gcm_decrypt(hsm.root_key(), nonce, &aad, sealed)
                .map_err(|e| {
                    tracing::error!(key_id = %record.key_id, version = %record.version, error = %e,
                        "key version does not unwrap under this token's root key");
                    Error::from(e)
                })?;
            let kek = Kek::init_with(|buf| {
                let bytes: &[u8; KEK_LEN] = plain
                    .expose_secret()
                    .try_into()
                    .map_err(|_| Error::Internal("unwrapped key material has the wrong length"))?;
                buf.copy_from_slice(bytes);
                Ok(())
            })?;
            Ok(VersionKey::Software(aead_key(&kek)?))
        }
    }
}

fn aead_key(kek: &Kek) -> Result<LessSafeKey, Error> {
    UnboundKey::new(&AES_256_GCM, kek.expose_secret())
        .map(LessSafeKey::new)
        .map_err(|_| Error::Internal("aes-256-gcm key setup"))
}

fn software_seal(
    key: &LessSafeKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::with_capacity(plaintext.len() + crate::blob::TAG_LEN);
    buf.extend_from_slice(plaintext);
    match key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(*nonce),
        Aad::from(aad),
        &mut buf,
    ) {
        Ok(()) => Ok(buf),
        Err(_) => {
            buf.zeroize();
            Err(Error::Internal("aes-256-gcm seal"))
        }
    }
}

fn software_open(
    key: &LessSafeKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Plaintext, Error> {
    let mut buf = sealed.to_vec();
    let result = key
        .open_in_place(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            &mut buf,
        )
        .map(|plain| Plaintext::from_slice(plain))
        .map_err(|_| Error::DecryptFailed);
    buf.zeroize();
    result
}

fn decode<T: serde::de::DeserializeOwned>(table: Table, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::Record {
        table: table.name(),
        source,
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|_| Error::Internal("record encoding"))
}

fn put_key(record: &KeyRecord) -> Result<Change, Error> {
    Ok(Change::Put {
        table: Table::Keys,
        key: record.id.to_bytes().to_vec(),
        value: encode(record)?,
    })
}

fn put_version(record: &VersionRecord) -> Result<Change, Error> {
    let mut key = record.key_id.to_bytes().to_vec();
    key.extend_from_slice(&record.version.get().to_be_bytes());
    Ok(Change::Put {
        table: Table::Versions,
        key,
        value: encode(record)?,
    })
}

fn put_alias(alias: &Alias, id: KeyId) -> Change {
    Change::Put {
        table: Table::Aliases,
        key: alias.as_str().as_bytes().to_vec(),
        value: id.to_bytes().to_vec(),
    }
}

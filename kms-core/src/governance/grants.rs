//! Short-lived task grants: just-in-time credentials a workload mints for another (an agent,
//! a job) on one key, for some of the operations the creator may do itself, for minutes.
//!
//! A grant is stored (its constraints, expiry, revocation) and its token is only
//! `kmsg1.<id>.<tag>`: the id and an HMAC-SHA256 tag over it under a key that is kept wrapped
//! by the HSM's root key. The tag is checked on every use, before the store is consulted, so a
//! guessed id is worthless; everything the grant allows comes from the stored record, so a
//! token cannot be edited to allow more. A token is accepted only from the grantee it names,
//! authenticated by its own SVID: it is never a credential alone.
//!
//! Uses are counted durably: a use is reserved (a synced write) before the operation and
//! released if the operation is then refused, so concurrent requests cannot exceed the limit
//! and a crash can only lose a use, never grant an extra one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use aws_lc_rs::hmac;
use hsm_bridge::{Hsm, GCM_NONCE_LEN};
use parking_lot::{Mutex, RwLock};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox, SecretString};
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, Rng};
use crate::context::EncryptionContext;
use crate::error::{Error, InvalidInput};
use crate::governance::spiffe::SpiffeId;
use crate::ids::KeyId;
use crate::op::Op;
use crate::store::{Change, Row, Store, Table};

/// Store key of the wrapped grant MAC key in [`Table::Grants`].
pub(crate) const MAC_KEY: &[u8] = b"\0mac_key";
/// AAD of its wrap under the root key.
pub(crate) const MAC_KEY_AAD: &[u8] = b"sovereign-kms/grant-mac-key/v1";
const TOKEN_PREFIX: &str = "kmsg1.";

/// Grant settings.
#[derive(Clone, Copy, Debug)]
pub struct GrantConfig {
    /// Longest time to live a grant may have.
    pub max_ttl_secs: u64,
}

impl Default for GrantConfig {
    fn default() -> Self {
        Self { max_ttl_secs: 3600 }
    }
}

/// A grant's id: 16 random bytes, as 32 lower-case hex digits.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GrantId(String);

impl GrantId {
    fn from_random(raw: [u8; 16]) -> Self {
        Self(hex::encode(raw))
    }

    /// An id as stored or as a caller names one. Not checked: an id that was never issued
    /// names no grant.
    pub fn from_string(id: String) -> Self {
        Self(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for GrantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A stored grant. Its `Debug` names the required context's keys, not their values.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Random id.
    pub id: GrantId,
    /// The workload that minted it.
    pub creator: SpiffeId,
    /// The only workload that may use it.
    pub grantee: SpiffeId,
    /// The key it is for.
    pub key_id: KeyId,
    /// Operations it allows, sorted, each once.
    pub operations: Vec<Op>,
    /// Encryption-context entries every use must carry.
    pub required_context: BTreeMap<String, String>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Seconds since the epoch; refused from then on.
    pub expires_at: u64,
    /// At most this many uses, if set.
    pub max_uses: Option<u64>,
    /// When and by whom it was revoked.
    pub revoked: Option<Revocation>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("id", &self.id)
            .field("creator", &self.creator)
            .field("grantee", &self.grantee)
            .field("key_id", &self.key_id)
            .field("operations", &self.operations)
            .field(
                "required_context",
                &crate::context::KeysOnly(self.required_context.keys()),
            )
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("max_uses", &self.max_uses)
            .field("revoked", &self.revoked)
            .finish()
    }
}

/// A revocation.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Revocation {
    /// Seconds since the epoch.
    pub at: u64,
    /// Who revoked it.
    pub by: String,
}

impl Grant {
    /// True when `op` is among the grant's operations.
    pub fn allows_op(&self, op: Op) -> bool {
        self.operations.contains(&op)
    }

    /// True when `context` carries every required entry.
    pub fn context_satisfied(&self, context: &EncryptionContext) -> bool {
        self.required_context.iter().all(|(k, v)| {
            context
                .entries()
                .any(|(ck, cv)| ck == k.as_str() && cv == v.as_str())
        })
    }
}

/// What a creator asks for.
#[derive(Clone, Debug)]
pub struct NewGrant {
    /// The grantee.
    pub grantee: SpiffeId,
    /// The key.
    pub key: crate::ids::KeyRef,
    /// Operations: some of [`Op::USES`].
    pub operations: Vec<Op>,
    /// Context entries every use must carry.
    pub required_context: EncryptionContext,
    /// Time to live, seconds; `None` for the longest allowed.
    pub ttl_secs: Option<u64>,
    /// Use limit.
    pub max_uses: Option<u64>,
}

/// Proof that a grant's creator may do everything the grant delegates: made only by
/// [`crate::Kms::authorize_grant`], required by [`Grants::create`].
#[derive(Debug)]
pub struct AuthorizedGrant {
    pub(crate) creator: SpiffeId,
    pub(crate) key_id: KeyId,
    pub(crate) new: NewGrant,
    pub(crate) policies: Vec<String>,
}

impl AuthorizedGrant {
    /// The key the grant is for.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The policies that allowed the creator each delegated operation, sorted, each once.
    pub fn policies(&self) -> &[String] {
        &self.policies
    }
}

/// Checks a grant request's own shape: at least one operation, only key uses, a use limit
/// of at least one. Sorts and de-duplicates the operations.
pub(crate) fn check_new(new: &mut NewGrant) -> Result<(), Error> {
    new.operations.sort();
    new.operations.dedup();
    if new.operations.is_empty()
        || new.max_uses == Some(0)
        || !new.operations.iter().all(|op| op.is_key_use())
    {
        return Err(Error::Invalid(InvalidInput::Grant));
    }
    Ok(())
}

/// Why a presented grant is refused. Each has a stable reason for the audit log.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrantDenial {
    /// Not a grant token, or its tag does not verify.
    #[error("invalid grant token")]
    Invalid,
    /// No such grant (a tag that verifies for a grant that was never stored).
    #[error("unknown grant")]
    Unknown,
    /// Presented by a workload other than its grantee.
    #[error("grant belongs to another workload")]
    WrongGrantee,
    /// Revoked.
    #[error("grant revoked")]
    Revoked,
    /// Past its expiry.
    #[error("grant expired")]
    Expired,
    /// Its uses are spent.
    #[error("grant has no uses left")]
    UsedUp,
}

impl GrantDenial {
    /// A short, stable reason for audit records.
    pub fn reason(self) -> &'static str {
        match self {
            GrantDenial::Invalid => "grant.invalid",
            GrantDenial::Unknown => "grant.unknown",
            GrantDenial::WrongGrantee => "grant.wrong_grantee",
            GrantDenial::Revoked => "grant.revoked",
            GrantDenial::Expired => "grant.expired",
            GrantDenial::UsedUp => "grant.used_up",
        }
    }
}

/// The grant store.
pub struct Grants {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    rng: Arc<dyn Rng>,
    config: GrantConfig,
    mac: hmac::Key,
    grants: RwLock<HashMap<GrantId, Arc<Grant>>>,
    uses: Mutex<HashMap<GrantId, u64>>,
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grants")
            .field("grants", &self.grants.read().len())
            .finish_non_exhaustive()
    }
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::Record {
        table: "grants",
        source,
    })
}

fn use_key(id: &GrantId) -> Vec<u8> {
    format!("uses/{id}").into_bytes()
}

fn grant_key(id: &GrantId) -> Vec<u8> {
    format!("grant/{id}").into_bytes()
}

impl Grants {
    /// Loads every grant and its use count; creates the token key on first use (random from
    /// the HSM, stored wrapped under the root key).
    pub fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        rng: Arc<dyn Rng>,
        hsm: &dyn Hsm,
        config: GrantConfig,
    ) -> Result<Self, Error> {
        let mac = mac_key(store.as_ref(), hsm)?;
        let mut grants = HashMap::new();
        let mut uses = HashMap::new();
        for Row { key, value } in store.scan(Table::Grants)? {
            if let Some(id) = key.strip_prefix(b"grant/") {
                let g: Grant = decode(&value)?;
                if g.id.as_str().as_bytes() == id {
                    grants.insert(g.id.clone(), Arc::new(g));
                }
            } else if let Some(id) = key.strip_prefix(b"uses/") {
                let n: u64 = decode(&value)?;
                uses.insert(
                    GrantId::from_string(String::from_utf8_lossy(id).into_owned()),
                    n,
                );
            }
        }
        Ok(Self {
            store,
            clock,
            rng,
            config,
            mac,
            grants: RwLock::new(grants),
            uses: Mutex::new(uses),
        })
    }

    /// The settings.
    pub fn config(&self) -> GrantConfig {
        self.config
    }

    fn save(&self, g: &Grant) -> Result<(), Error> {
        let value =
            serde_json::to_vec(g).map_err(|_| Error::Internal("grant does not serialise"))?;
        self.store.write(vec![Change::Put {
            table: Table::Grants,
            key: grant_key(&g.id),
            value,
        }])
    }

    /// Stores a grant its creator was authorised to make, and returns it with its token. A
    /// missing time to live is the longest allowed.
    pub fn create(&self, authorized: AuthorizedGrant) -> Result<(Arc<Grant>, SecretString), Error> {
        let AuthorizedGrant {
            creator,
            key_id,
            new,
            policies: _,
        } = authorized;
        let max = self.config.max_ttl_secs;
        let ttl = new.ttl_secs.unwrap_or(max);
        if ttl == 0 || ttl > max {
            return Err(Error::GrantTtl { max_secs: max });
        }
        let mut raw = [0u8; 16];
        self.rng.fill(&mut raw)?;
        let id = GrantId::from_random(raw);
        let now = self.clock.now_unix();
        let g = Grant {
            id: id.clone(),
            creator,
            grantee: new.grantee,
            key_id,
            operations: new.operations,
            required_context: new
                .required_context
                .entries()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            created_at: now,
            expires_at: now.saturating_add(ttl),
            max_uses: new.max_uses,
            revoked: None,
        };
        self.save(&g)?;
        let g = Arc::new(g);
        self.grants.write().insert(id.clone(), g.clone());
        let tag = hmac::sign(&self.mac, id.as_str().as_bytes());
        let token = format!("{TOKEN_PREFIX}{id}.{}", hex::encode(tag.as_ref()));
        Ok((g, SecretString::from(token)))
    }

    /// The grant a token names, if its tag verifies; nothing else is checked.
    pub fn resolve(&self, token: &str) -> Result<Arc<Grant>, GrantDenial> {
        let rest = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(GrantDenial::Invalid)?;
        let (id, tag) = rest.split_once('.').ok_or(GrantDenial::Invalid)?;
        let tag = hex::decode(tag).map_err(|_| GrantDenial::Invalid)?;
        hmac::verify(&self.mac, id.as_bytes(), &tag).map_err(|_| GrantDenial::Invalid)?;
        self.grants
            .read()
            .get(&GrantId::from_string(id.to_owned()))
            .cloned()
            .ok_or(GrantDenial::Unknown)
    }

    /// Checks a presented grant for `caller` at `now`: bound to the caller, not revoked, not
    /// expired, uses left. The operation, key and context are checked where the key is known
    /// (`Kms`), with the creator's own permission.
    pub fn admit(
        &self,
        token: &str,
        caller: &SpiffeId,
        now: u64,
    ) -> Result<Arc<Grant>, GrantDenial> {
        let g = self.resolve(token)?;
        if &g.grantee != caller {
            return Err(GrantDenial::WrongGrantee);
        }
        if g.revoked.is_some() {
            return Err(GrantDenial::Revoked);
        }
        if now >= g.expires_at {
            return Err(GrantDenial::Expired);
        }
        if let Some(max) = g.max_uses {
            if self.uses(&g.id) >= max {
                return Err(GrantDenial::UsedUp);
            }
        }
        Ok(g)
    }

    /// Uses so far.
    pub fn uses(&self, id: &GrantId) -> u64 {
        self.uses.lock().get(id).copied().unwrap_or(0)
    }

    /// Reserves `n` uses, durably, if that many are left.
    pub fn reserve_uses(&self, g: &Grant, n: u64) -> Result<Result<(), GrantDenial>, Error> {
        if n == 0 {
            return Ok(Ok(()));
        }
        let mut uses = self.uses.lock();
        let used = uses.get(&g.id).copied().unwrap_or(0);
        let next = used.saturating_add(n);
        if g.max_uses.is_some_and(|max| next > max) {
            return Ok(Err(GrantDenial::UsedUp));
        }
        self.write_uses(&g.id, next)?;
        uses.insert(g.id.clone(), next);
        Ok(Ok(()))
    }

    /// Gives back `n` reserved uses of requests that were then refused or failed.
    pub fn release_uses(&self, g: &Grant, n: u64) -> Result<(), Error> {
        if n == 0 {
            return Ok(());
        }
        let mut uses = self.uses.lock();
        let left = uses.get(&g.id).copied().unwrap_or(0).saturating_sub(n);
        self.write_uses(&g.id, left)?;
        uses.insert(g.id.clone(), left);
        Ok(())
    }

    fn write_uses(&self, id: &GrantId, n: u64) -> Result<(), Error> {
        let value = serde_json::to_vec(&n).map_err(|_| Error::Internal("count"))?;
        self.store.write(vec![Change::Put {
            table: Table::Grants,
            key: use_key(id),
            value,
        }])
    }

    /// Revokes every unrevoked grant `pick` selects; returns them as they were.
    pub fn revoke_where(
        &self,
        by: &str,
        pick: impl Fn(&Grant) -> bool,
    ) -> Result<Vec<Arc<Grant>>, Error> {
        let now = self.clock.now_unix();
        let mut grants = self.grants.write();
        let chosen: Vec<Arc<Grant>> = grants
            .values()
            .filter(|g| g.revoked.is_none() && pick(g))
            .cloned()
            .collect();
        let mut changes = Vec::with_capacity(chosen.len());
        let mut revoked = Vec::with_capacity(chosen.len());
        for g in &chosen {
            let mut r = Grant::clone(g);
            r.revoked = Some(Revocation {
                at: now,
                by: by.to_owned(),
            });
            changes.push(Change::Put {
                table: Table::Grants,
                key: grant_key(&r.id),
                value: serde_json::to_vec(&r)
                    .map_err(|_| Error::Internal("grant does not serialise"))?,
            });
            revoked.push(r);
        }
        if !changes.is_empty() {
            self.store.write(changes)?;
        }
        for r in revoked {
            grants.insert(r.id.clone(), Arc::new(r));
        }
        Ok(chosen)
    }

    /// One grant by id.
    pub fn get(&self, id: &GrantId) -> Option<Arc<Grant>> {
        self.grants.read().get(id).cloned()
    }

    /// Every grant `pick` selects, newest first.
    pub fn list(&self, pick: impl Fn(&Grant) -> bool) -> Vec<Arc<Grant>> {
        let mut all: Vec<Arc<Grant>> = self
            .grants
            .read()
            .values()
            .filter(|g| pick(g))
            .cloned()
            .collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        all
    }
}

fn mac_key(store: &dyn Store, hsm: &dyn Hsm) -> Result<hmac::Key, Error> {
    let root = hsm.root_key();
    if let Some(wrapped) = store.get(Table::Grants, MAC_KEY)? {
        let (nonce, sealed) = wrapped
            .split_first_chunk::<GCM_NONCE_LEN>()
            .ok_or(Error::Internal("grant key record is damaged"))?;
        let raw = hsm.aes_gcm_decrypt(root, nonce, MAC_KEY_AAD, sealed)?;
        return Ok(hmac::Key::new(hmac::HMAC_SHA256, raw.expose_secret()));
    }
    let mut raw = SecretBox::new(Box::new([0u8; 32]));
    hsm.random(raw.expose_secret_mut())?;
    let mut nonce = [0u8; GCM_NONCE_LEN];
    hsm.random(&mut nonce)?;
    let mut wrapped = nonce.to_vec();
    wrapped.extend(hsm.aes_gcm_encrypt(root, &nonce, MAC_KEY_AAD, raw.expose_secret())?);
    store.write(vec![Change::Put {
        table: Table::Grants,
        key: MAC_KEY.to_vec(),
        value: wrapped,
    }])?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, raw.expose_secret()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_names_required_context_keys_never_values() {
        let g = Grant {
            id: GrantId::from_string("00ff".into()),
            creator: "spiffe://test.example/a".parse().unwrap(),
            grantee: "spiffe://test.example/b".parse().unwrap(),
            key_id: KeyId::from_random_bytes([3; 16]),
            operations: vec![Op::Decrypt],
            required_context: BTreeMap::from([("tenant".into(), "canary-tenant".into())]),
            created_at: 1,
            expires_at: 2,
            max_uses: None,
            revoked: None,
        };
        let printed = format!("{g:?}");
        assert!(
            printed.contains("required_context: {\"tenant\"}"),
            "{printed}"
        );
        assert!(!printed.contains("canary"), "{printed}");
    }
}

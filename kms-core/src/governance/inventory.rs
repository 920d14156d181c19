//! The inventory of non-human identities: which workloads may call the data plane at all, who
//! owns each, what it is for, and until when.
//!
//! A registration names one SPIFFE ID exactly (`spiffe://prod.example.org/billing/api`), or a
//! fleet by prefix (`spiffe://prod.example.org/agents/*` covers every ID under `/agents`). A
//! caller matches the most specific registration: an exact one first, then the longest prefix.
//! The most specific match decides alone, so deactivating one member of a fleet works.
//!
//! Registrations are few writes and many reads: every data-plane request looks its caller up
//! in memory; changes are written to the store (synced) and then swapped into memory. Last-seen
//! times and per-action call counts are kept in memory and written back periodically, so a
//! crash loses at most the counts since the last flush.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::error::{Error, InvalidInput};
use crate::governance::spiffe::SpiffeId;
use crate::key::Labels;
use crate::store::{Change, Row, Store, Table};

/// Longest owner or purpose text.
pub const MAX_TEXT: usize = 512;

/// What a registration covers: one SPIFFE ID, or every ID at or under a path.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Selector {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// This ID and every ID under it.
    Prefix(SpiffeId),
}

impl Selector {
    /// True when `id` is covered.
    pub fn covers(&self, id: &SpiffeId) -> bool {
        match self {
            Selector::Exact(e) => e == id,
            Selector::Prefix(p) => id.is_under(p),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Exact(id) => id.fmt(f),
            Selector::Prefix(id) => write!(f, "{id}/*"),
        }
    }
}

impl std::str::FromStr for Selector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |_| Error::Invalid(InvalidInput::Selector);
        match s.strip_suffix("/*") {
            Some(prefix) => Ok(Selector::Prefix(prefix.parse().map_err(bad)?)),
            None => Ok(Selector::Exact(s.parse().map_err(bad)?)),
        }
    }
}

/// A registered workload (or fleet).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Workload {
    /// What it covers, as text (`spiffe://…` or `spiffe://…/*`).
    pub selector: String,
    /// The person or team answerable for it.
    pub owner: String,
    /// What it is for.
    pub purpose: String,
    /// Labels such as `tier` or `tenant`, visible to policy.
    pub labels: Labels,
    /// End of the registration, seconds since the Unix epoch.
    pub expires_at: u64,
    /// False once deactivated.
    pub active: bool,
    /// When it was registered.
    pub created_at: u64,
    /// Who registered it.
    pub created_by: String,
    /// Last change.
    pub updated_at: u64,
    /// Who made the last change.
    pub updated_by: String,
    /// When its owner last confirmed it (registration and every update count).
    pub reviewed_at: u64,
}

impl Workload {
    /// The parsed selector.
    pub fn parsed_selector(&self) -> Result<Selector, Error> {
        self.selector.parse()
    }
}

/// Why a caller with a valid identity is refused before any key is looked at.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityDenial {
    /// No registration covers the ID.
    #[error("identity is not registered")]
    Unregistered,
    /// The covering registration was deactivated.
    #[error("identity is deactivated")]
    Deactivated,
    /// The covering registration has expired.
    #[error("identity registration has expired")]
    Expired,
}

impl IdentityDenial {
    /// A short, stable reason for audit records.
    pub fn reason(self) -> &'static str {
        match self {
            IdentityDenial::Unregistered => "identity.unregistered",
            IdentityDenial::Deactivated => "identity.deactivated",
            IdentityDenial::Expired => "identity.expired",
        }
    }
}

/// A new registration.
#[derive(Clone, Debug)]
pub struct NewWorkload {
    /// What it covers.
    pub selector: Selector,
    /// Owner.
    pub owner: String,
    /// Purpose.
    pub purpose: String,
    /// Labels.
    pub labels: Labels,
    /// End of the registration, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Changes to a registration; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct WorkloadUpdate {
    /// New owner.
    pub owner: Option<String>,
    /// New purpose.
    pub purpose: Option<String>,
    /// New labels (replacing all).
    pub labels: Option<Labels>,
    /// New expiry.
    pub expires_at: Option<u64>,
}

/// Filters for [`Inventory::list`].
#[derive(Clone, Debug, Default)]
pub struct WorkloadFilter {
    /// Only this owner.
    pub owner: Option<String>,
    /// Only registrations with this label key and value.
    pub label: Option<(String, String)>,
    /// Only registrations expiring before this time (seconds since the epoch).
    pub expiring_before: Option<u64>,
    /// Include deactivated registrations.
    pub include_inactive: bool,
}

/// Last-seen time and call counts of one registration.
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Usage {
    /// Last data-plane call, seconds since the epoch (0: never).
    pub last_seen: u64,
    /// Calls by action name.
    pub calls: BTreeMap<String, u64>,
}

/// Inventory settings.
#[derive(Clone, Copy, Debug)]
pub struct InventoryConfig {
    /// Longest registration allowed, in seconds from now.
    pub max_lifetime_secs: u64,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            max_lifetime_secs: 365 * 86_400,
        }
    }
}

#[derive(Default)]
struct Index {
    exact: HashMap<SpiffeId, Arc<Workload>>,
    prefix: HashMap<SpiffeId, Arc<Workload>>,
}

impl Index {
    fn insert(&mut self, w: Arc<Workload>) -> Result<(), Error> {
        match w.parsed_selector()? {
            Selector::Exact(id) => self.exact.insert(id, w),
            Selector::Prefix(id) => self.prefix.insert(id, w),
        };
        Ok(())
    }

    fn get(&self, selector: &Selector) -> Option<&Arc<Workload>> {
        match selector {
            Selector::Exact(id) => self.exact.get(id),
            Selector::Prefix(id) => self.prefix.get(id),
        }
    }

    /// The most specific registration covering `id`.
    fn covering(&self, id: &SpiffeId) -> Option<&Arc<Workload>> {
        if let Some(w) = self.exact.get(id) {
            return Some(w);
        }
        if self.prefix.is_empty() {
            return None;
        }
        let mut probe = id.clone();
        loop {
            if let Some(w) = self.prefix.get(&probe) {
                return Some(w);
            }
            probe = probe.parent()?;
        }
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.exact.values().chain(self.prefix.values())
    }
}

/// The inventory.
pub struct Inventory {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: InventoryConfig,
    index: RwLock<Index>,
    usage: Mutex<UsageBook>,
}

/// Usage by selector, and which selectors changed since the last flush.
#[derive(Default)]
struct UsageBook {
    all: HashMap<String, Usage>,
    dirty: HashSet<String>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("registrations", &self.len())
            .finish_non_exhaustive()
    }
}

fn check_text(text: &str) -> Result<(), Error> {
    if text.trim().is_empty() || text.len() > MAX_TEXT || text.chars().any(char::is_control) {
        return Err(Error::Invalid(InvalidInput::WorkloadText));
    }
    Ok(())
}

fn decode<T: for<'de> Deserialize<'de>>(table: &'static str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::Record { table, source })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|_| Error::Internal("record does not serialise"))
}

impl Inventory {
    /// Loads every registration and its usage from `store`.
    pub fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: InventoryConfig,
    ) -> Result<Self, Error> {
        let mut index = Index::default();
        for Row { value, .. } in store.scan(Table::Workloads)? {
            index.insert(Arc::new(decode::<Workload>("workloads", &value)?))?;
        }
        let mut usage = UsageBook::default();
        for Row { key, value } in store.scan(Table::WorkloadUsage)? {
            let selector = String::from_utf8(key).map_err(|_| Error::Internal("usage key"))?;
            usage
                .all
                .insert(selector, decode::<Usage>("workload_usage", &value)?);
        }
        Ok(Self {
            store,
            clock,
            config,
            index: RwLock::new(index),
            usage: Mutex::new(usage),
        })
    }

    /// Number of registrations, active or not.
    pub fn len(&self) -> usize {
        let index = self.index.read();
        index.exact.len() + index.prefix.len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The settings.
    pub fn config(&self) -> InventoryConfig {
        self.config
    }

    fn check_expiry(&self, expires_at: u64) -> Result<(), Error> {
        let now = self.clock.now_unix();
        if expires_at <= now {
            return Err(Error::Invalid(InvalidInput::Expiry));
        }
        if expires_at - now > self.config.max_lifetime_secs {
            return Err(Error::ExpiryTooFar {
                max_secs: self.config.max_lifetime_secs,
            });
        }
        Ok(())
    }

    fn save(&self, w: Workload) -> Result<Arc<Workload>, Error> {
        let w = Arc::new(w);
        self.store.write(vec![Change::Put {
            table: Table::Workloads,
            key: w.selector.as_bytes().to_vec(),
            value: encode(w.as_ref())?,
        }])?;
        self.index.write().insert(w.clone())?;
        Ok(w)
    }

    /// Checks a registration as [`Inventory::register`] would, making none (for a request
    /// that waits for approvals).
    pub fn check_new(&self, new: &NewWorkload) -> Result<(), Error> {
        check_text(&new.owner)?;
        check_text(&new.purpose)?;
        self.check_expiry(new.expires_at)?;
        if self.index.read().get(&new.selector).is_some() {
            return Err(Error::WorkloadExists {
                selector: new.selector.clone(),
            });
        }
        Ok(())
    }

    /// Checks a change as [`Inventory::update`] would, making none.
    pub fn check_update(&self, selector: &Selector, update: &WorkloadUpdate) -> Result<(), Error> {
        self.get(selector)?;
        for text in [&update.owner, &update.purpose].into_iter().flatten() {
            check_text(text)?;
        }
        if let Some(expires_at) = update.expires_at {
            self.check_expiry(expires_at)?;
        }
        Ok(())
    }

    /// Registers a workload. Its expiry is required and at most the configured lifetime away.
    pub fn register(&self, new: NewWorkload, by: &str) -> Result<Arc<Workload>, Error> {
        self.check_new(&new)?;
        let selector = new.selector.to_string();
        let now = self.clock.now_unix();
        self.save(Workload {
            selector,
            owner: new.owner,
            purpose: new.purpose,
            labels: new.labels,
            expires_at: new.expires_at,
            active: true,
            created_at: now,
            created_by: by.to_owned(),
            updated_at: now,
            updated_by: by.to_owned(),
            reviewed_at: now,
        })
    }

    /// One registration by selector.
    pub fn get(&self, selector: &Selector) -> Result<Arc<Workload>, Error> {
        self.index
            .read()
            .get(selector)
            .cloned()
            .ok_or_else(|| Error::WorkloadNotFound {
                selector: selector.clone(),
            })
    }

    /// Changes a registration (and counts as an owner review). Reactivates nothing: a
    /// deactivated registration stays deactivated until [`Inventory::reactivate`].
    pub fn update(
        &self,
        selector: &Selector,
        update: WorkloadUpdate,
        by: &str,
    ) -> Result<(Arc<Workload>, Arc<Workload>), Error> {
        let before = self.get(selector)?;
        let mut w = Workload::clone(&before);
        if let Some(owner) = update.owner {
            check_text(&owner)?;
            w.owner = owner;
        }
        if let Some(purpose) = update.purpose {
            check_text(&purpose)?;
            w.purpose = purpose;
        }
        if let Some(labels) = update.labels {
            w.labels = labels;
        }
        if let Some(expires_at) = update.expires_at {
            self.check_expiry(expires_at)?;
            w.expires_at = expires_at;
        }
        let now = self.clock.now_unix();
        w.updated_at = now;
        w.updated_by = by.to_owned();
        w.reviewed_at = now;
        Ok((before, self.save(w)?))
    }

    /// Deactivates a registration: its workloads are refused from the next request on.
    pub fn deactivate(
        &self,
        selector: &Selector,
        by: &str,
    ) -> Result<(Arc<Workload>, Arc<Workload>), Error> {
        self.set_active(selector, false, by)
    }

    /// Makes a deactivated registration active again; this counts as an owner review. Its
    /// expiry still applies (an expired registration needs a new one through `update`).
    pub fn reactivate(
        &self,
        selector: &Selector,
        by: &str,
    ) -> Result<(Arc<Workload>, Arc<Workload>), Error> {
        self.set_active(selector, true, by)
    }

    fn set_active(
        &self,
        selector: &Selector,
        active: bool,
        by: &str,
    ) -> Result<(Arc<Workload>, Arc<Workload>), Error> {
        let before = self.get(selector)?;
        let mut w = Workload::clone(&before);
        w.active = active;
        let now = self.clock.now_unix();
        w.updated_at = now;
        w.updated_by = by.to_owned();
        if active {
            w.reviewed_at = now;
        }
        Ok((before, self.save(w)?))
    }

    /// Registrations matching `filter`, sorted by selector, starting after `after`.
    pub fn list(
        &self,
        filter: &WorkloadFilter,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Arc<Workload>>, bool) {
        let index = self.index.read();
        let mut matching: Vec<&Arc<Workload>> = index
            .all()
            .filter(|w| filter.include_inactive || w.active)
            .filter(|w| filter.owner.as_ref().is_none_or(|o| &w.owner == o))
            .filter(|w| {
                filter
                    .label
                    .as_ref()
                    .is_none_or(|(k, v)| w.labels.value(k) == Some(v.as_str()))
            })
            .filter(|w| filter.expiring_before.is_none_or(|t| w.expires_at < t))
            .filter(|w| after.is_none_or(|a| w.selector.as_str() > a))
            .collect();
        matching.sort_by(|a, b| a.selector.cmp(&b.selector));
        let more = matching.len() > limit;
        (matching.into_iter().take(limit).cloned().collect(), more)
    }

    /// Every registration, active or not.
    pub fn all(&self) -> Vec<Arc<Workload>> {
        self.index.read().all().cloned().collect()
    }

    /// The registration that admits `id` now, or why there is none.
    pub fn admit(&self, id: &SpiffeId, now: u64) -> Result<Arc<Workload>, IdentityDenial> {
        let index = self.index.read();
        let w = index.covering(id).ok_or(IdentityDenial::Unregistered)?;
        if !w.active {
            return Err(IdentityDenial::Deactivated);
        }
        if now >= w.expires_at {
            return Err(IdentityDenial::Expired);
        }
        Ok(w.clone())
    }

    /// Notes one data-plane call by a workload admitted under `selector`.
    pub fn note_call(&self, selector: &str, action: &str, now: u64) {
        let mut book = self.usage.lock();
        if !book.dirty.contains(selector) {
            book.dirty.insert(selector.to_owned());
        }
        let u = match book.all.get_mut(selector) {
            Some(u) => u,
            None => book.all.entry(selector.to_owned()).or_default(),
        };
        u.last_seen = u.last_seen.max(now);
        match u.calls.get_mut(action) {
            Some(n) => *n = n.saturating_add(1),
            None => {
                u.calls.insert(action.to_owned(), 1);
            }
        }
    }

    /// Last-seen time and call counts under `selector`.
    pub fn usage(&self, selector: &str) -> Usage {
        self.usage
            .lock()
            .all
            .get(selector)
            .cloned()
            .unwrap_or_default()
    }

    /// Writes the usage that changed since the last flush to the store.
    pub fn flush_usage(&self) -> Result<(), Error> {
        let changed: Vec<(String, Usage)> = {
            let mut book = self.usage.lock();
            let dirty = std::mem::take(&mut book.dirty);
            dirty
                .into_iter()
                .filter_map(|k| book.all.get(&k).cloned().map(|u| (k, u)))
                .collect()
        };
        if changed.is_empty() {
            return Ok(());
        }
        let mut changes = Vec::with_capacity(changed.len());
        for (selector, usage) in &changed {
            changes.push(Change::Put {
                table: Table::WorkloadUsage,
                key: selector.as_bytes().to_vec(),
                value: encode(usage)?,
            });
        }
        if let Err(e) = self.store.write(changes) {
            // Keep them for the next flush.
            let mut book = self.usage.lock();
            book.dirty.extend(changed.into_iter().map(|(k, _)| k));
            return Err(e);
        }
        Ok(())
    }
}

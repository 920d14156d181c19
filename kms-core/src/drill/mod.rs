//! The provider-exit drill (docs/DRILL.md): its states, the facts it compares between a
//! bundle and the deployment recovered from it, its checks and its signed report.
//!
//! The drill itself (a fresh token, the recovery ceremony, a server on loopback, every canary
//! through the data plane) is run by `kms drill provider-exit`; this module holds what is
//! decided: which versions must be verified, what must match, and what the report says.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::key::{KeyRecord, KeyState, Protection, VersionRecord};
use crate::store::{Row, Store, Table};
use crate::KeyId;

mod report;

pub use self::report::{
    last_recorded, store_record, to_record, verify, RecordedDrill, Report, ReportError,
};

/// The `format` of every drill report this code writes.
pub const FORMAT: &str = "sovereign-kms/drill-report-v1";

/// What the signature covers before the report's compact JSON (without its signature).
const DOMAIN: &[u8] = b"sovereign-kms drill report v1\n";

/// The audit action a recorded drill is written under in the live deployment's log.
pub const RECORDED_ACTION: &str = crate::governance::actions::AdminAction::RecordDrill.as_str();

/// The row of the service-state table that holds the last recorded drill.
pub const LAST_DRILL_KEY: &[u8] = b"last_drill";

/// The drill's states, in the order it passes them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum State {
    /// Nothing made yet.
    Start,
    /// A temporary data directory, a new token, drill PINs and TLS.
    Isolated,
    /// The recovery ceremony ran into the isolated place.
    Recovered,
    /// The drill's own trust domain, workload and policy added to the recovered copy.
    Provisioned,
    /// A server of the recovered copy listens on loopback.
    Serving,
    /// Every canary was asked for through the data plane.
    Verified,
    /// The recovered copy was compared with the bundle.
    Compared,
    /// Server stopped; everything made torn down (after the report is signed).
    Done,
}

impl State {
    /// The state's name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Start => "start",
            State::Isolated => "isolated",
            State::Recovered => "recovered",
            State::Provisioned => "provisioned",
            State::Serving => "serving",
            State::Verified => "verified",
            State::Compared => "compared",
            State::Done => "done",
        }
    }
}

/// One check of the report (fields in name order, like every object of the report).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// What was found, in words.
    pub detail: String,
    /// Its name (docs/DRILL.md lists them).
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
}

impl Check {
    /// A check with its outcome.
    pub fn new(name: &str, passed: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            passed,
            detail: detail.into(),
        }
    }
}

/// What the drill added to the recovered copy, left out of every comparison.
#[derive(Clone, Debug)]
pub struct Additions {
    /// The drill's trust domain (a trust-bundles row).
    pub trust_domain: String,
    /// The drill workload's SPIFFE ID (a workloads row, and its usage row).
    pub workload: String,
    /// The drill policy's id (a policies row).
    pub policy_id: String,
}

impl Additions {
    fn excludes(&self, table: Table, key: &[u8]) -> bool {
        match table {
            Table::TrustBundles => key == self.trust_domain.as_bytes(),
            Table::Workloads | Table::WorkloadUsage => key == self.workload.as_bytes(),
            Table::Policies => key == self.policy_id.as_bytes(),
            _ => false,
        }
    }
}

/// The facts of a store that a drill compares: counts and hashes, no secret.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Facts {
    /// Keys per `protection/state`.
    pub keys: BTreeMap<String, u64>,
    /// Versions each level's non-destroyed keys must have (every version up to the current).
    pub expected: BTreeMap<String, u64>,
    /// Versions stored, per level.
    pub stored: BTreeMap<String, u64>,
    /// `KEY_ID/VERSION` a key's current version implies but the store lacks.
    pub missing: Vec<String>,
    /// Destroyed keys.
    pub destroyed: Vec<KeyId>,
    /// Every key's current version, by key id.
    pub current: BTreeMap<String, u32>,
    /// Versions with no escrow copy.
    pub unescrowed: Vec<String>,
    /// Versions with no canary.
    pub without_canary: Vec<String>,
    /// SHA-256 of the active policy set.
    pub policies: String,
    /// Trust bundles: rows and SHA-256 of the table.
    pub trust_bundles: (u64, String),
    /// Workload registrations: rows and SHA-256.
    pub workloads: (u64, String),
    /// Grants and their use counts: rows and SHA-256 (the wrapped token key is left out: a
    /// recovery wraps it again under the new root key).
    pub grants: (u64, String),
    /// Operators: rows and SHA-256.
    pub operators: (u64, String),
    /// The stored approval rules, as compact JSON.
    pub approval_rules: String,
    /// M, the expiry and how many actions are gated, in words.
    pub rules_summary: String,
    /// Ceremony id, epoch, threshold and custodians (name=recipient), or "none".
    pub custodians: String,
    /// The token the custody transcript names: the deployment's own (the old one, for a
    /// bundle).
    pub token: Option<recovery::TokenInfo>,
}

/// A version to verify: its canary and what its DEK must hash to.
#[derive(Clone, PartialEq, Eq)]
pub struct CanaryCase {
    /// The key.
    pub key_id: KeyId,
    /// The version.
    pub version: u32,
    /// The key's level.
    pub protection: Protection,
    /// The canary blob.
    pub blob: Vec<u8>,
    /// The encryption context it was made with ([`crate::canary_context`]).
    pub context: Vec<(String, String)>,
    /// Hex SHA-256 of its DEK.
    pub dek_sha256: String,
}

/// Names the version, not the blob.
impl std::fmt::Debug for CanaryCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CanaryCase({}/{})", self.key_id, self.version)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(table: Table, row: &Row) -> Result<T, Error> {
    serde_json::from_slice(&row.value).map_err(|source| Error::Record {
        table: table.name(),
        source,
    })
}

fn rows(store: &dyn Store, table: Table, skip: Option<&Additions>) -> Result<Vec<Row>, Error> {
    let mut rows = store.scan(table)?;
    if let Some(skip) = skip {
        rows.retain(|r| !skip.excludes(table, &r.key));
    }
    Ok(rows)
}

fn counted(rows: &[Row]) -> (u64, String) {
    (
        u64::try_from(rows.len()).unwrap_or(u64::MAX),
        crate::store::table_sha256(rows),
    )
}

/// A read-only store of some rows, for hashing a filtered table with the code that hashes
/// a whole one.
struct Filtered<'a> {
    inner: &'a dyn Store,
    skip: Option<&'a Additions>,
}

impl Store for Filtered<'_> {
    fn write(&self, _changes: Vec<crate::store::Change>) -> Result<(), Error> {
        Err(Error::Internal("a filtered view is read-only"))
    }
    fn scan(&self, table: Table) -> Result<Vec<Row>, Error> {
        rows(self.inner, table, self.skip)
    }
    fn scan_from(&self, table: Table, from: &[u8], limit: usize) -> Result<Vec<Row>, Error> {
        let mut out = self.inner.scan_from(table, from, limit)?;
        if let Some(skip) = self.skip {
            out.retain(|r| !skip.excludes(table, &r.key));
        }
        Ok(out)
    }
    fn last(&self, table: Table) -> Result<Option<Row>, Error> {
        Ok(self.scan(table)?.pop())
    }
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        if self.skip.is_some_and(|s| s.excludes(table, key)) {
            return Ok(None);
        }
        self.inner.get(table, key)
    }
}

impl std::fmt::Debug for Filtered<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filtered").finish_non_exhaustive()
    }
}

/// The keys and their versions in a store.
fn keys_and_versions(store: &dyn Store) -> Result<(Vec<KeyRecord>, Vec<VersionRecord>), Error> {
    let keys = store
        .scan(Table::Keys)?
        .iter()
        .map(|r| decode(Table::Keys, r))
        .collect::<Result<Vec<KeyRecord>, _>>()?;
    let versions = store
        .scan(Table::Versions)?
        .iter()
        .map(|r| decode(Table::Versions, r))
        .collect::<Result<Vec<VersionRecord>, _>>()?;
    Ok((keys, versions))
}

impl Facts {
    /// Gathers the facts of `store`, leaving out the drill's own additions when given.
    pub fn of(store: &dyn Store, additions: Option<&Additions>) -> Result<Self, Error> {
        Ok(Self::gather(store, additions, false)?.0)
    }

    /// The facts of a bundle's store, and the canary of every version of its non-destroyed
    /// keys: what the drill verifies. One read of the keys and versions serves both.
    pub fn with_canaries(store: &dyn Store) -> Result<(Self, Vec<CanaryCase>), Error> {
        Self::gather(store, None, true)
    }

    // long: one pass over the keys and versions fills every fact and the canaries together.
    fn gather(
        store: &dyn Store,
        additions: Option<&Additions>,
        want_canaries: bool,
    ) -> Result<(Self, Vec<CanaryCase>), Error> {
        let view = Filtered {
            inner: store,
            skip: additions,
        };
        let store: &dyn Store = &view;
        let (keys, versions) = keys_and_versions(store)?;
        let mut facts = Facts::default();
        let mut level = BTreeMap::new();
        for k in &keys {
            let p = k.protection.as_str();
            *facts
                .keys
                .entry(format!("{p}/{}", k.state.as_str()))
                .or_default() += 1;
            facts
                .current
                .insert(k.id.to_string(), k.current_version.get());
            let destroyed = k.state == KeyState::Destroyed;
            level.insert(k.id, (k.protection, destroyed));
            if destroyed {
                facts.destroyed.push(k.id);
            } else {
                *facts.expected.entry(p.to_owned()).or_default() +=
                    u64::from(k.current_version.get());
            }
        }
        let mut present = BTreeSet::new();
        let mut cases = Vec::new();
        for v in versions {
            present.insert((v.key_id, v.version.get()));
            let name = || format!("{}/{}", v.key_id, v.version.get());
            if v.escrow.is_none() {
                facts.unescrowed.push(name());
            }
            let Some(&(protection, destroyed)) = level.get(&v.key_id) else {
                continue;
            };
            *facts
                .stored
                .entry(protection.as_str().to_owned())
                .or_default() += 1;
            match v.canary {
                None => facts.without_canary.push(name()),
                Some(canary) if want_canaries && !destroyed => cases.push(CanaryCase {
                    context: crate::key::canary_context(v.key_id, v.version)?
                        .entries()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                    key_id: v.key_id,
                    version: v.version.get(),
                    protection,
                    blob: canary.blob,
                    dek_sha256: canary.dek_sha256,
                }),
                Some(_) => {}
            }
        }
        for k in keys.iter().filter(|k| k.state != KeyState::Destroyed) {
            for n in 1..=k.current_version.get() {
                if !present.contains(&(k.id, n)) {
                    facts.missing.push(format!("{}/{n}", k.id));
                }
            }
        }
        facts.policies = crate::governance::policy::active_set_sha256(store)?;
        facts.trust_bundles = counted(&store.scan(Table::TrustBundles)?);
        facts.workloads = counted(&store.scan(Table::Workloads)?);
        let mut grants = store.scan(Table::Grants)?;
        grants.retain(|r| r.key.starts_with(b"grant/") || r.key.starts_with(b"uses/"));
        facts.grants = counted(&grants);
        facts.operators = counted(&store.scan(Table::Operators)?);
        let rules = crate::governance::approvals::stored_rules(store)?;
        facts.approval_rules = serde_json::to_string(&rules)
            .map_err(|_| Error::Internal("approval rules encoding"))?;
        facts.rules_summary = format!(
            "M = {}, requests expire after {} s, {} gated actions",
            rules.required,
            rules.expiry_secs,
            rules.gated.len()
        );
        facts.custodians = match crate::custody::load(store)? {
            Some(c) => {
                let t = &c.transcript;
                let names: Vec<String> = t
                    .custodians
                    .iter()
                    .map(|c| format!("{}={}", c.name, c.recipient))
                    .collect();
                facts.token = Some(t.token.clone());
                format!(
                    "ceremony {} epoch {}, {} of [{}], transcript {}",
                    t.ceremony_id,
                    t.epoch.get(),
                    t.threshold,
                    names.join(", "),
                    hex::encode(t.sha256()?)
                )
            }
            None => "none".into(),
        };
        Ok((facts, cases))
    }
}

fn levels(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn first_few(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(5).map(String::as_str).collect();
    let more = items.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// The bundle's version checks: every version its keys imply is in it, verified through the
/// data plane, per level; and every version carries an escrow copy.
pub fn version_checks(bundle: &Facts, verified: &BTreeMap<String, u64>) -> Vec<Check> {
    let mut out = Vec::new();
    let complete = bundle.missing.is_empty() && verified == &bundle.expected;
    let mut detail = format!(
        "verified through the data plane: {}; the bundle's keys imply: {}",
        levels(verified),
        levels(&bundle.expected)
    );
    if !bundle.missing.is_empty() {
        detail.push_str(&format!(
            "; missing from the bundle: {}",
            first_few(&bundle.missing)
        ));
    }
    if !bundle.without_canary.is_empty() {
        detail.push_str(&format!(
            "; without a canary (made before canaries and exported before the next start): {}",
            first_few(&bundle.without_canary)
        ));
    }
    out.push(Check::new("key_versions", complete, detail));
    out.push(if bundle.unescrowed.is_empty() {
        Check::new(
            "escrow_complete",
            true,
            format!(
                "every stored version ({}) carries an escrow copy: none exists only inside the old HSM",
                levels(&bundle.stored)
            ),
        )
    } else {
        Check::new(
            "escrow_complete",
            false,
            format!(
                "{} version(s) have no escrow copy and exist only in the old deployment: {}",
                bundle.unescrowed.len(),
                first_few(&bundle.unescrowed)
            ),
        )
    });
    out
}

/// A key of the live deployment, as its admin plane lists it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LiveKey {
    /// Its id.
    pub key_id: String,
    /// Its current version.
    pub current_version: u32,
    /// Whether it is destroyed (its versions are gone, in the bundle or not).
    pub destroyed: bool,
}

/// `live_versions`: every version of every non-destroyed live key is in the bundle; the keys
/// and versions made after the export are named.
pub fn live_check(bundle: &Facts, live: &[LiveKey]) -> Check {
    let mut missing = Vec::new();
    for k in live.iter().filter(|k| !k.destroyed) {
        match bundle.current.get(&k.key_id) {
            None => missing.push(format!(
                "key {} (versions 1..{}) is not in the bundle",
                k.key_id, k.current_version
            )),
            Some(v) if *v < k.current_version => missing.push(format!(
                "key {}: versions {}..{} are not in the bundle",
                k.key_id,
                v.saturating_add(1),
                k.current_version
            )),
            Some(_) => {}
        }
    }
    if missing.is_empty() {
        Check::new(
            "live_versions",
            true,
            format!(
                "every version of the live deployment's {} key(s) is in the bundle ({} versions)",
                live.len(),
                bundle.expected.values().sum::<u64>()
            ),
        )
    } else {
        Check::new(
            "live_versions",
            false,
            format!(
                "the bundle is older than the live deployment: {}",
                first_few(&missing)
            ),
        )
    }
}

/// Compares the recovered copy (drill additions left out) with the bundle.
pub fn compare(bundle: &Facts, recovered: &Facts) -> Vec<Check> {
    let pair = |name: &str, what: &str, a: &(u64, String), b: &(u64, String)| {
        if a == b {
            Check::new(name, true, format!("{} {what}, SHA-256 {}", a.0, a.1))
        } else {
            Check::new(
                name,
                false,
                format!(
                    "bundle: {} {what} (SHA-256 {}); recovered: {} (SHA-256 {})",
                    a.0, a.1, b.0, b.1
                ),
            )
        }
    };
    let text = |name: &str, a: &str, b: &str| {
        if a == b {
            Check::new(name, true, a.to_owned())
        } else {
            Check::new(name, false, format!("bundle: {a}; recovered: {b}"))
        }
    };
    let inventory_same = bundle.workloads == recovered.workloads
        && bundle.trust_bundles == recovered.trust_bundles
        && bundle.keys == recovered.keys
        && bundle.stored == recovered.stored;
    let inventory = Check::new(
        "inventory",
        inventory_same,
        format!(
            "keys: {} (recovered: {}); versions: {} (recovered: {}); workloads: {} (recovered: \
             {}); trust bundles: {} (recovered: {})",
            levels(&bundle.keys),
            levels(&recovered.keys),
            levels(&bundle.stored),
            levels(&recovered.stored),
            bundle.workloads.0,
            recovered.workloads.0,
            bundle.trust_bundles.0,
            recovered.trust_bundles.0
        ),
    );
    vec![
        text("policies", &bundle.policies, &recovered.policies),
        inventory,
        pair("grants", "grant rows", &bundle.grants, &recovered.grants),
        pair(
            "operators",
            "operators",
            &bundle.operators,
            &recovered.operators,
        ),
        if bundle.approval_rules == recovered.approval_rules {
            Check::new(
                "approval_rules",
                true,
                format!(
                    "the stored rules, SHA-256 {}: {}",
                    crate::audit::sha256_hex(bundle.approval_rules.as_bytes()),
                    bundle.rules_summary
                ),
            )
        } else {
            Check::new(
                "approval_rules",
                false,
                format!(
                    "bundle: {}; recovered: {}",
                    bundle.approval_rules, recovered.approval_rules
                ),
            )
        },
        text("custodians", &bundle.custodians, &recovered.custodians),
    ]
}

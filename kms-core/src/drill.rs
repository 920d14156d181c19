//! The provider-exit drill (docs/DRILL.md): its states, the facts it compares between a
//! bundle and the deployment recovered from it, its checks and its signed report.
//!
//! The drill itself (a fresh token, the recovery ceremony, a server on loopback, every canary
//! through the data plane) is run by `kms drill provider-exit`; this module holds what is
//! decided: which versions must be verified, what must match, and what the report says.

use std::collections::{BTreeMap, BTreeSet};

use hsm_bridge::Hsm;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::key::{KeyRecord, KeyState, Protection, VersionRecord};
use crate::receipt::{
    check_signature, document_message, sign_document, ReceiptError, ReceiptSignature,
};
use crate::store::{Row, Store, Table};
use crate::KeyId;

/// The `format` of every drill report this code writes.
pub const FORMAT: &str = "sovereign-kms/drill-report-v1";

/// What the signature covers before the report's compact JSON (without its signature).
const DOMAIN: &[u8] = b"sovereign-kms drill report v1\n";

/// The audit action a recorded drill is written under in the live deployment's log.
pub const RECORDED_ACTION: &str = "drill.recorded";

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
        crate::attest::table_sha256(rows),
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

/// A drill report. Its fields are declared in name order, so its JSON has sorted keys; the
/// file is that compact JSON and a newline, in that one form.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// SHA-256 of the bundle file, hex.
    pub bundle_sha256: String,
    /// Every check, in the order run.
    pub checks: Vec<Check>,
    /// The bundle's custody epoch (null if the bundle did not parse).
    pub epoch: Option<u32>,
    /// When the drill ended, Unix seconds.
    pub finished_at: u64,
    /// [`FORMAT`].
    pub format: String,
    /// Versions the bundle's keys imply, all levels.
    pub key_versions_expected: u64,
    /// Versions whose canary decrypted to its recorded hash through the data plane.
    pub key_versions_verified: u64,
    /// Whether every check passed.
    pub passed: bool,
    /// The signature over the domain line and this report's compact JSON without it; absent
    /// when the drill stopped before its token held a signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<ReceiptSignature>,
    /// The drill token's audit signing key: its uncompressed P-256 point, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The version of the software that ran the drill.
    pub software_version: String,
    /// When the drill started, Unix seconds.
    pub started_at: u64,
    /// The last state reached.
    pub state: State,
    /// The token recovered into (`C_GetTokenInfo`).
    pub target_token: Option<recovery::TokenInfo>,
    /// Milliseconds per phase, `rto` (start to the first canary decrypted) and `total`.
    pub timings_ms: BTreeMap<String, u64>,
}

/// Why a report does not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// Not a drill report.
    #[error("not a drill report: {0}")]
    Malformed(String),
    /// A report of a format this build does not know.
    #[error("unknown drill report format {0:?}")]
    Format(String),
    /// Parsed, but not byte for byte as written.
    #[error("the report is not in its canonical form: it was edited after it was written")]
    NotCanonical,
    /// No signature: the drill stopped before its token held a signing key.
    #[error("the report is unsigned (the drill stopped at state {0} before its token held a signing key): it proves nothing")]
    Unsigned(&'static str),
    /// The signature does not verify under the key the report names.
    #[error("the report's signature does not verify under the drill key it names: it was changed after it was signed")]
    BadSignature,
    /// The signature names another key than the report's signer.
    #[error("the report's signature is by key {found}, not by the signer it names ({expected})")]
    OtherSigner {
        /// The id of the key the report names.
        expected: String,
        /// The id the signature names.
        found: String,
    },
}

impl Report {
    /// The bytes the signature is over.
    pub fn message(&self) -> Result<Vec<u8>, Error> {
        let mut unsigned = self.clone();
        unsigned.signature = None;
        document_message(DOMAIN, &unsigned)
    }

    /// Signs the report with the audit signing key in `hsm`, and names that key.
    pub fn sign(&mut self, hsm: &dyn Hsm) -> Result<(), Error> {
        // The signer is named inside what is signed, so its point is read first.
        let key = hsm.p256_signing_key(crate::audit::SIGNING_KEY_LABEL)?;
        self.signer = Some(hex::encode(key.public_point()));
        self.signature = None;
        self.signature = Some(sign_document(hsm, &self.message()?)?);
        Ok(())
    }

    /// The report file's text, in its one form: compact JSON and a newline.
    pub fn to_text(&self) -> Result<String, Error> {
        let mut text =
            serde_json::to_string(self).map_err(|_| Error::Internal("report encoding"))?;
        text.push('\n');
        Ok(text)
    }
}

/// Checks a report file: its format, its one canonical form, and its signature under the
/// key it names. That proves it intact since it was signed; who ran it is proven by a
/// `drill.recorded` record in the production audit log (docs/DRILL.md).
pub fn verify(file: &[u8]) -> Result<Report, ReportError> {
    let report: Report =
        serde_json::from_slice(file).map_err(|e| ReportError::Malformed(e.to_string()))?;
    let canonical = report
        .to_text()
        .map_err(|e| ReportError::Malformed(e.to_string()))?;
    if canonical.as_bytes() != file {
        return Err(ReportError::NotCanonical);
    }
    if report.format != FORMAT {
        return Err(ReportError::Format(report.format));
    }
    let (Some(signature), Some(signer)) = (&report.signature, &report.signer) else {
        return Err(ReportError::Unsigned(report.state.as_str()));
    };
    let point =
        hex::decode(signer).map_err(|_| ReportError::Malformed("signer is not hex".into()))?;
    let message = report
        .message()
        .map_err(|e| ReportError::Malformed(e.to_string()))?;
    check_signature(signature, &message, &point).map_err(|e| match e {
        ReceiptError::OtherSigner { expected, found } => {
            ReportError::OtherSigner { expected, found }
        }
        ReceiptError::Malformed(m) => ReportError::Malformed(m),
        _ => ReportError::BadSignature,
    })?;
    if report.passed != report.checks.iter().all(|c| c.passed) || report.checks.is_empty() {
        return Err(ReportError::Malformed(
            "`passed` does not agree with the checks".into(),
        ));
    }
    Ok(report)
}

/// A recorded drill, as the live deployment keeps the last one and its attestation states it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedDrill {
    /// SHA-256 of the report file.
    pub report_sha256: String,
    /// Whether every check passed.
    pub passed: bool,
    /// When the drill ended, Unix seconds.
    pub finished_at: u64,
    /// The bundle it recovered.
    pub bundle_sha256: String,
    /// When it was recorded, Unix seconds.
    pub recorded_at: u64,
    /// Who recorded it.
    pub recorded_by: String,
}

/// Checks a report sent to be recorded (it must verify as [`verify`] does) and returns what
/// the deployment keeps of it.
pub fn to_record(
    file: &[u8],
    recorded_at: u64,
    recorded_by: &str,
) -> Result<RecordedDrill, ReportError> {
    let report = verify(file)?;
    Ok(RecordedDrill {
        report_sha256: crate::audit::sha256_hex(file),
        passed: report.passed,
        finished_at: report.finished_at,
        bundle_sha256: report.bundle_sha256,
        recorded_at,
        recorded_by: recorded_by.to_owned(),
    })
}

/// Stores `drill` as the last recorded drill.
pub fn store_record(store: &dyn Store, drill: &RecordedDrill) -> Result<(), Error> {
    let value = serde_json::to_vec(drill).map_err(|_| Error::Internal("drill encoding"))?;
    store.write(vec![crate::store::Change::Put {
        table: Table::ServiceState,
        key: LAST_DRILL_KEY.to_vec(),
        value,
    }])
}

/// The last recorded drill in `store`, if any.
pub fn last_recorded(store: &dyn Store) -> Result<Option<RecordedDrill>, Error> {
    match store.get(Table::ServiceState, LAST_DRILL_KEY)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Record {
                table: Table::ServiceState.name(),
                source,
            }),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        reason = "test code: a failed step is a failed test"
    )]

    use super::*;

    fn report() -> Report {
        Report {
            bundle_sha256: "ab".repeat(32),
            checks: vec![Check::new("canaries", true, "3 canaries")],
            epoch: Some(1),
            finished_at: 2,
            format: FORMAT.into(),
            key_versions_expected: 3,
            key_versions_verified: 3,
            passed: true,
            signature: Some(ReceiptSignature {
                algorithm: crate::receipt::ALGORITHM.into(),
                key_id: "00".repeat(16),
                value: "00".repeat(64),
            }),
            signer: Some("04".into()),
            software_version: "0.1.0".into(),
            started_at: 1,
            state: State::Done,
            target_token: Some(recovery::TokenInfo {
                label: "t".into(),
                manufacturer: "m".into(),
                model: "x".into(),
                serial: "s".into(),
            }),
            timings_ms: BTreeMap::from([("total".to_owned(), 5)]),
        }
    }

    /// The report's text is what `json.dumps(r, sort_keys=True, separators=(",", ":"))`
    /// gives, so another tool can rebuild the signed bytes: every object's keys in order.
    #[test]
    fn a_report_is_compact_json_with_sorted_keys_at_every_level() {
        let text = report().to_text().unwrap();
        assert!(text.ends_with("}\n") && !text.contains(": ") && !text.contains(", "));
        // Each top-level key's place, in a report whose checks (which have a `passed` of
        // their own) are empty.
        let mut bare = report();
        bare.checks.clear();
        let top = bare.to_text().unwrap();
        let at = |k: &str| top.find(&format!("\"{k}\":")).unwrap();
        let in_order = |keys: &[&str]| {
            for pair in keys.windows(2) {
                assert!(at(pair[0]) < at(pair[1]), "{} before {}", pair[0], pair[1]);
            }
        };
        in_order(&[
            "bundle_sha256",
            "checks",
            "epoch",
            "finished_at",
            "format",
            "key_versions_expected",
            "key_versions_verified",
            "passed",
            "signature",
            "signer",
            "software_version",
            "started_at",
            "state",
            "target_token",
            "timings_ms",
        ]);
        // Inside a check (its `passed` comes before the report's own).
        let check = text.find("{\"detail\":\"3 canaries\",\"name\":\"canaries\",\"passed\":true}");
        assert!(check.is_some(), "{text}");
        assert!(text.contains("{\"algorithm\":"));
        assert!(text
            .contains("{\"label\":\"t\",\"manufacturer\":\"m\",\"model\":\"x\",\"serial\":\"s\"}"));
    }

    #[test]
    fn a_report_not_as_written_unsigned_or_signed_by_another_key_is_refused() {
        let text = report().to_text().unwrap();
        let spaced = text.replacen("{", "{ ", 1);
        assert!(matches!(
            verify(spaced.as_bytes()),
            Err(ReportError::NotCanonical)
        ));
        let mut unsigned = report();
        unsigned.signature = None;
        assert!(matches!(
            verify(unsigned.to_text().unwrap().as_bytes()),
            Err(ReportError::Unsigned("done"))
        ));
        // A signature of the wrong key id is named as such, before any arithmetic.
        assert!(matches!(
            verify(text.as_bytes()),
            Err(ReportError::OtherSigner { .. })
        ));
    }
}

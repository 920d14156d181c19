//! Policy-as-code: Cedar policies decide every data-plane request.
//!
//! Policies are stored by id, each id with its history of versions (a deletion is a version
//! too, so the history says who removed what and when). A policy text may hold several Cedar
//! statements; a text with one statement keeps its id, the statements of a longer text are
//! named `id.1`, `id.2`, ... in order. Every text is validated against [`SCHEMA`] (strict mode)
//! together with all other current policies before it is stored, so a stored set always
//! validates.
//!
//! Evaluation is Cedar's: default deny, any `forbid` wins over every `permit`. The principal
//! is the calling `Workload` (its registration's owner, purpose and labels as tags), the
//! resource the `Key` (its labels as tags), and the context carries the encryption context
//! (as the tags of an `EncryptionContext` entity, so policies can compare computed keys), the
//! time of the request, the authentication method and the caller's declared purpose.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::authz::{AccessRequest, Authorizer, Verdict};
use crate::clock::Clock;
use crate::error::{Error, InvalidInput, Op};
use crate::ids::{Alias, KeyId};
use crate::inventory::{Selector, Workload};
use crate::key::{KeyRecord, Labels};
use crate::spiffe::SpiffeId;
use crate::store::{Change, Row, Store, Table};

/// The Cedar schema every policy is validated against.
pub const SCHEMA: &str = r#"
// A calling workload. Tags are the labels of its inventory registration.
entity Workload = {
  spiffe_id: String,
  trust_domain: String,
  owner: String,
  purpose: String,
} tags String;

// A key. Tags are its labels (for example sensitivity, owner).
entity Key = {
  id: String,
  alias: String,
} tags String;

// The request's encryption context; its entries are the tags.
entity EncryptionContext tags String;

type Time = {
  // Seconds since the Unix epoch.
  unix: Long,
  // 0-23, 0-59, and 0 (Sunday) to 6, all UTC.
  hour_utc: Long,
  minute_utc: Long,
  weekday_utc: Long,
};

type Grant = {
  id: String,
  creator: String,
};

type RequestContext = {
  encryption_context: EncryptionContext,
  time: Time,
  // "mtls", "jwt" or "grant".
  auth_method: String,
  // The caller's declared reason for this request, when it gave one.
  purpose?: String,
  // The grant the caller presented, when it presented one.
  grant?: Grant,
};

action GenerateDataKey, Decrypt, Encrypt, ReEncrypt, CreateGrant appliesTo {
  principal: Workload,
  resource: Key,
  context: RequestContext,
};
"#;

/// Longest policy text.
pub const MAX_POLICY_TEXT: usize = 64 * 1024;

/// One stored version of a policy.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PolicyVersion {
    /// 1, 2, ...
    pub version: u32,
    /// The Cedar text; empty for a deletion.
    pub text: String,
    /// True when this version removed the policy.
    pub deleted: bool,
    /// When it was stored, seconds since the epoch.
    pub created_at: u64,
    /// Who stored it.
    pub created_by: String,
}

/// A policy id and every version it has had.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PolicyHistory {
    /// The id.
    pub id: String,
    /// Oldest first.
    pub versions: Vec<PolicyVersion>,
}

impl PolicyHistory {
    /// The newest version, if it is not a deletion.
    pub fn current(&self) -> Option<&PolicyVersion> {
        self.versions.last().filter(|v| !v.deleted)
    }
}

/// Checks a policy id: 1-64 of `a-z 0-9 _ -`, starting with a letter or digit.
fn check_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(InvalidInput::PolicyId))
    }
}

fn schema() -> Result<Schema, Error> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _)| s)
        .map_err(|_| Error::Internal("built-in policy schema does not parse"))
}

/// The Cedar statements of one stored text, named by `id`.
fn statements(id: &str, text: &str) -> Result<Vec<cedar_policy::Policy>, Error> {
    let parsed = PolicySet::from_str(text).map_err(|e| Error::PolicyInvalid {
        id: id.to_owned(),
        message: format!("{e}"),
    })?;
    if parsed.templates().next().is_some() {
        return Err(Error::PolicyInvalid {
            id: id.to_owned(),
            message: "templates are not supported".into(),
        });
    }
    let all: Vec<_> = parsed.policies().cloned().collect();
    if all.is_empty() {
        return Err(Error::PolicyInvalid {
            id: id.to_owned(),
            message: "no policy statement".into(),
        });
    }
    let n = all.len();
    Ok(all
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let name = if n == 1 {
                id.to_owned()
            } else {
                format!("{id}.{}", i + 1)
            };
            p.new_id(cedar_policy::PolicyId::new(name))
        })
        .collect())
}

/// Builds and validates the set of the given current texts.
fn compile(schema: &Schema, texts: &BTreeMap<String, String>) -> Result<PolicySet, Error> {
    let mut set = PolicySet::new();
    for (id, text) in texts {
        for statement in statements(id, text)? {
            set.add(statement).map_err(|e| Error::PolicyInvalid {
                id: id.clone(),
                message: format!("{e}"),
            })?;
        }
    }
    let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if !result.validation_passed() {
        let message = result
            .validation_errors()
            .map(|e| format!("{}: {e}", e.policy_id()))
            .collect::<Vec<_>>()
            .join("; ");
        let id = result
            .validation_errors()
            .next()
            .map(|e| e.policy_id().to_string())
            .unwrap_or_default();
        return Err(Error::PolicyInvalid { id, message });
    }
    Ok(set)
}

/// The current policies, sliced by principal: Cedar evaluates every policy in a set, so each
/// caller is evaluated against only the policies that could apply to it (those whose scope
/// names no principal, and those naming it with `principal == ...`). The decision is the one
/// the whole set would give, since a policy scoped to another principal can never match.
struct Compiled {
    all: Arc<PolicySet>,
    general: Slice,
    by_principal: HashMap<String, Slice>,
    statements: usize,
    /// Counts policy changes since start; decisions remembered under another generation are
    /// never reused.
    generation: u64,
    /// Each statement's text and what it reads of the encryption context, by statement id,
    /// so that a change to one policy does not analyse the others again.
    reads: HashMap<String, (String, EncryptionReads)>,
}

impl Compiled {
    /// Slices `set`; `previous` supplies the analysis of statements it shares with `set`.
    fn new(set: &PolicySet, generation: u64, previous: Option<&Self>) -> Result<Self, Error> {
        let slice_err = |e: cedar_policy::PolicySetError| Error::PolicyInvalid {
            id: String::new(),
            message: format!("{e}"),
        };
        let mut general = PolicySet::new();
        let mut general_reads = EncryptionReads::none();
        let mut specific: HashMap<String, Vec<(cedar_policy::Policy, EncryptionReads)>> =
            HashMap::new();
        let mut statements = 0;
        let mut reads_by_id = HashMap::new();
        for p in set.policies() {
            statements += 1;
            let id: &str = p.id().as_ref();
            let text = p.to_string();
            let reads = previous
                .and_then(|c| c.reads.get(id))
                .filter(|(t, _)| *t == text)
                .map_or_else(|| encryption_reads(p), |(_, r)| r.clone());
            match p.principal_constraint() {
                cedar_policy::PrincipalConstraint::Eq(uid) => specific
                    .entry(uid.id().unescaped().to_owned())
                    .or_default()
                    .push((p.clone(), reads.clone())),
                _ => {
                    general_reads.add(&reads);
                    general.add(p.clone()).map_err(slice_err)?;
                }
            }
            reads_by_id.insert(id.to_owned(), (text, reads));
        }
        let mut by_principal = HashMap::with_capacity(specific.len());
        for (principal, policies) in specific {
            let mut s = general.clone();
            let mut reads = general_reads.clone();
            for (p, r) in policies {
                reads.add(&r);
                s.add(p).map_err(slice_err)?;
            }
            by_principal.insert(
                principal,
                Slice {
                    set: Arc::new(s),
                    reads,
                },
            );
        }
        Ok(Self {
            all: Arc::new(set.clone()),
            general: Slice {
                set: Arc::new(general),
                reads: general_reads,
            },
            by_principal,
            statements,
            generation,
            reads: reads_by_id,
        })
    }

    fn for_principal(&self, principal: &str) -> &Slice {
        self.by_principal.get(principal).unwrap_or(&self.general)
    }
}

/// The policies that could apply to one principal, and what they read of the encryption
/// context.
struct Slice {
    set: Arc<PolicySet>,
    reads: EncryptionReads,
}

/// What a set of policies can read of a request's encryption context. A decision depends on
/// the encryption context through these reads alone, so requests that agree on them (and on
/// every other input) get the same decision.
#[derive(Clone, Debug, PartialEq, Eq)]
enum EncryptionReads {
    /// Only the entries with these names, each through
    /// `context.encryption_context.hasTag("name")` or `.getTag("name")` with a literal name.
    Entries(std::collections::BTreeSet<String>),
    /// Any entry: a name computed at evaluation time, or the entity used in another way.
    All,
}

impl EncryptionReads {
    fn none() -> Self {
        Self::Entries(std::collections::BTreeSet::new())
    }

    fn add(&mut self, other: &Self) {
        match (&mut *self, other) {
            (Self::All, _) => {}
            (_, Self::All) => *self = Self::All,
            (Self::Entries(mine), Self::Entries(theirs)) => mine.extend(theirs.iter().cloned()),
        }
    }
}

/// The context attribute holding the encryption context's entity (see [`SCHEMA`]).
const ENCRYPTION_ATTR: &str = "encryption_context";
/// The entity type of the encryption context (see [`SCHEMA`]).
const ENCRYPTION_TYPE: &str = "EncryptionContext";

/// What `policy` can read of the encryption context, from its JSON form: `Entries` only when
/// every use of `context` is `context.<attr>` for another attribute, `context has <attr>`, or
/// a tag test or lookup on `context.encryption_context` with a literal name, and no string
/// in the policy names the `EncryptionContext` type (an entity literal, an `is` test). Any
/// other form, or a policy that has no JSON form, reads `All`.
fn encryption_reads(policy: &cedar_policy::Policy) -> EncryptionReads {
    let Ok(json) = policy.to_json() else {
        return EncryptionReads::All;
    };
    let mut names = std::collections::BTreeSet::new();
    if only_literal_reads(&json, &mut names) {
        EncryptionReads::Entries(names)
    } else {
        EncryptionReads::All
    }
}

/// Walks a policy's JSON, adding the literal entry names read from the encryption context to
/// `names`; false when the encryption context may be read in any other way.
fn only_literal_reads(
    v: &serde_json::Value,
    names: &mut std::collections::BTreeSet<String>,
) -> bool {
    use serde_json::Value;
    let is_var_context = |e: Option<&Value>| {
        e.and_then(|e| e.get("Var"))
            .is_some_and(|var| var == "context")
    };
    match v {
        Value::String(text) => !text.contains(ENCRYPTION_TYPE),
        Value::Array(items) => items.iter().all(|x| only_literal_reads(x, names)),
        Value::Object(fields) => {
            if let (1, Some((op, arg))) = (fields.len(), fields.iter().next()) {
                match op.as_str() {
                    "Var" => return arg != "context",
                    // A record literal: its keys are the policy author's, its values are
                    // expressions.
                    "Record" => {
                        return arg
                            .as_object()
                            .is_some_and(|m| m.values().all(|x| only_literal_reads(x, names)))
                    }
                    "." | "has" if is_var_context(arg.get("left")) => {
                        let Some(attr) = arg.get("attr").and_then(Value::as_str) else {
                            return false;
                        };
                        return (op == "has" || attr != ENCRYPTION_ATTR)
                            && !attr.contains(ENCRYPTION_TYPE);
                    }
                    "hasTag" | "getTag" => {
                        let target = arg.get("left").and_then(|l| l.get("."));
                        let on_encryption = target.is_some_and(|t| {
                            is_var_context(t.get("left"))
                                && t.get("attr").is_some_and(|a| a == ENCRYPTION_ATTR)
                        });
                        if on_encryption {
                            return match arg
                                .get("right")
                                .and_then(|r| r.get("Value"))
                                .and_then(Value::as_str)
                            {
                                Some(name) => {
                                    names.insert(name.to_owned());
                                    true
                                }
                                None => false,
                            };
                        }
                    }
                    _ => {}
                }
            }
            fields.values().all(|x| only_literal_reads(x, names))
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => true,
    }
}

/// The stored policies and the compiled set evaluated on every request.
pub struct Policies {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    schema: Schema,
    histories: RwLock<BTreeMap<String, PolicyHistory>>,
    compiled: RwLock<Arc<Compiled>>,
    /// Times of the Cedar evaluations and of all decisions (the difference in their counts is
    /// the number of decisions reused).
    timings: Mutex<Option<Timings>>,
    names: Names,
    entities: Mutex<EntityCache>,
    decisions: Mutex<DecisionCache>,
    contexts: Mutex<ContextCache>,
    /// Numbers the principal and resource entities built, for [`Built`].
    builds: AtomicU64,
}

/// Evaluation times measured inside the server since start or the last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalStats {
    /// Evaluations measured.
    pub count: u64,
    /// Median, nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile, nanoseconds.
    pub p99_ns: u64,
    /// 99.9th percentile, nanoseconds.
    pub p999_ns: u64,
    /// Slowest, nanoseconds.
    pub max_ns: u64,
    /// Decisions answered from the decision cache (not evaluated again, not in the
    /// evaluation times).
    pub cached: u64,
    /// Decisions timed: every decision, reused or evaluated (`count + cached`).
    pub decisions: u64,
    /// Decision times, from a decision's start to its verdict: median, 99th percentile and
    /// slowest, nanoseconds.
    pub decision_p50_ns: u64,
    /// See `decision_p50_ns`.
    pub decision_p99_ns: u64,
    /// See `decision_p50_ns`.
    pub decision_max_ns: u64,
}

#[expect(
    clippy::disallowed_methods,
    reason = "policy evaluation time is measured wall time"
)]
fn eval_clock() -> std::time::Instant {
    std::time::Instant::now()
}

/// 1 ns to 10 s at 3 significant digits (valid bounds: never `None` in practice).
fn new_histogram() -> Option<hdrhistogram::Histogram<u64>> {
    hdrhistogram::Histogram::new_with_bounds(1, 10_000_000_000, 3).ok()
}

/// Times measured in [`Policies::evaluate`], in nanoseconds.
struct Timings {
    /// Cedar evaluations: building the Cedar request and `is_authorized`.
    evals: hdrhistogram::Histogram<u64>,
    /// Every decision, from its start to its verdict, whether reused or evaluated: what
    /// authorisation adds to a request.
    decisions: hdrhistogram::Histogram<u64>,
}

fn new_timings() -> Option<Timings> {
    Some(Timings {
        evals: new_histogram()?,
        decisions: new_histogram()?,
    })
}

fn elapsed_ns(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("ids", &self.histories.read().len())
            .finish_non_exhaustive()
    }
}

impl Policies {
    /// Loads and compiles the stored policies.
    pub fn open(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        let schema = schema()?;
        let mut histories = BTreeMap::new();
        for Row { value, .. } in store.scan(Table::Policies)? {
            let h: PolicyHistory =
                serde_json::from_slice(&value).map_err(|source| Error::Record {
                    table: "policies",
                    source,
                })?;
            histories.insert(h.id.clone(), h);
        }
        let compiled = Compiled::new(&compile(&schema, &current_texts(&histories))?, 0, None)?;
        let names = Names::new().map_err(|e| {
            tracing::error!(error = %e, "Cedar names could not be built");
            Error::Internal("Cedar names could not be built")
        })?;
        Ok(Self {
            store,
            clock,
            schema,
            histories: RwLock::new(histories),
            compiled: RwLock::new(Arc::new(compiled)),
            timings: Mutex::new(new_timings()),
            names,
            entities: Mutex::new(EntityCache::default()),
            decisions: Mutex::new(DecisionCache::default()),
            contexts: Mutex::new(ContextCache::default()),
            builds: AtomicU64::new(0),
        })
    }

    /// Stores a new version of policy `id` (creating it if new), after validating it with
    /// every other current policy. Returns the stored version and the one it replaced.
    pub fn put(
        &self,
        id: &str,
        text: &str,
        by: &str,
    ) -> Result<(PolicyVersion, Option<PolicyVersion>), Error> {
        check_id(id)?;
        if text.len() > MAX_POLICY_TEXT {
            return Err(Error::TooLarge {
                what: "policy text",
                len: text.len(),
                max: MAX_POLICY_TEXT,
            });
        }
        let mut histories = self.histories.write();
        let mut texts = current_texts(&histories);
        texts.insert(id.to_owned(), text.to_owned());
        let compiled = Compiled::new(
            &compile(&self.schema, &texts)?,
            self.next_generation(),
            Some(&self.compiled.read()),
        )?;
        let mut history = histories.get(id).cloned().unwrap_or(PolicyHistory {
            id: id.to_owned(),
            versions: Vec::new(),
        });
        let before = history.current().cloned();
        let version = PolicyVersion {
            version: next_version(&history),
            text: text.to_owned(),
            deleted: false,
            created_at: self.clock.now_unix(),
            created_by: by.to_owned(),
        };
        history.versions.push(version.clone());
        self.save(&history)?;
        histories.insert(id.to_owned(), history);
        *self.compiled.write() = Arc::new(compiled);
        Ok((version, before))
    }

    /// Removes policy `id` from evaluation, keeping its history. Returns the removed version.
    pub fn delete(&self, id: &str, by: &str) -> Result<PolicyVersion, Error> {
        let mut histories = self.histories.write();
        let mut history = histories
            .get(id)
            .filter(|h| h.current().is_some())
            .cloned()
            .ok_or_else(|| Error::PolicyNotFound { id: id.to_owned() })?;
        let before = history.current().cloned();
        let mut texts = current_texts(&histories);
        texts.remove(id);
        let compiled = Compiled::new(
            &compile(&self.schema, &texts)?,
            self.next_generation(),
            Some(&self.compiled.read()),
        )?;
        history.versions.push(PolicyVersion {
            version: next_version(&history),
            text: String::new(),
            deleted: true,
            created_at: self.clock.now_unix(),
            created_by: by.to_owned(),
        });
        self.save(&history)?;
        histories.insert(id.to_owned(), history);
        *self.compiled.write() = Arc::new(compiled);
        before.ok_or(Error::Internal("deleted policy had no current version"))
    }

    /// Version `version` of policy `id`, or its current version when `version` is `None`.
    pub fn get(&self, id: &str, version: Option<u32>) -> Result<PolicyVersion, Error> {
        let histories = self.histories.read();
        let history = histories
            .get(id)
            .ok_or_else(|| Error::PolicyNotFound { id: id.to_owned() })?;
        let found = match version {
            None => history.current(),
            Some(v) => history.versions.iter().find(|p| p.version == v),
        };
        found
            .cloned()
            .ok_or_else(|| Error::PolicyNotFound { id: id.to_owned() })
    }

    /// Every policy id with its history, current and deleted, sorted by id.
    pub fn list(&self) -> Vec<PolicyHistory> {
        self.histories.read().values().cloned().collect()
    }

    /// The generation the next compiled set gets (callers hold the `histories` write lock).
    fn next_generation(&self) -> u64 {
        self.compiled.read().generation.saturating_add(1)
    }

    /// Number of current Cedar statements.
    pub fn statement_count(&self) -> usize {
        self.compiled.read().statements
    }

    fn save(&self, history: &PolicyHistory) -> Result<(), Error> {
        let value = serde_json::to_vec(history)
            .map_err(|_| Error::Internal("policy history does not serialise"))?;
        self.store.write(vec![Change::Put {
            table: Table::Policies,
            key: history.id.as_bytes().to_vec(),
            value,
        }])
    }

    /// Evaluation times so far; `reset` starts a new measurement.
    pub fn eval_stats(&self, reset: bool) -> EvalStats {
        let mut guard = self.timings.lock();
        let Some(t) = guard.as_mut() else {
            return EvalStats::default();
        };
        let h = &t.evals;
        let d = &t.decisions;
        let stats = EvalStats {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
            cached: d.len().saturating_sub(h.len()),
            decisions: d.len(),
            decision_p50_ns: d.value_at_quantile(0.5),
            decision_p99_ns: d.value_at_quantile(0.99),
            decision_max_ns: d.max(),
        };
        if reset {
            t.evals.reset();
            t.decisions.reset();
        }
        stats
    }

    /// Evaluates `request` against the current policies, timing it.
    ///
    /// Cedar's decision is a function of the request's inputs and the policies alone, so a
    /// decision is remembered for the rest of its second under every input
    /// [`Policies::cedar_request`] reads (see [`decision_key`]) and the policies' generation,
    /// and requests identical in all of them within that second reuse it. A change of policy,
    /// registration, key alias or labels, purpose, grant or time is another key, and so is a
    /// change of an encryption-context entry the caller's policies can read (all entries when
    /// a policy computes an entry's name or uses the encryption context otherwise; see
    /// [`encryption_reads`]).
    pub fn evaluate(&self, request: &AccessRequest<'_>) -> Verdict {
        let started = eval_clock();
        let compiled = self.compiled.read().clone();
        let slice = compiled.for_principal(request.caller.id.as_str());
        let key = decision_key(request, &slice.reads);
        let reused = self.decisions.lock().get(compiled.generation, &key);
        if let Some(verdict) = reused {
            if let Some(t) = self.timings.lock().as_mut() {
                let _ = t.decisions.record(elapsed_ns(started));
            }
            return verdict;
        }
        let evaluating = eval_clock();
        let verdict = self.evaluate_untimed(&slice.set, request);
        let eval_ns = elapsed_ns(evaluating);
        self.decisions
            .lock()
            .put(compiled.generation, request.now_unix, key, verdict.clone());
        if let Some(t) = self.timings.lock().as_mut() {
            let _ = t.evals.record(eval_ns);
            let _ = t.decisions.record(elapsed_ns(started));
        }
        verdict
    }

    fn evaluate_untimed(&self, set: &PolicySet, request: &AccessRequest<'_>) -> Verdict {
        match self.cedar_request(request) {
            Ok((req, entities)) => {
                let response = cedar_policy::Authorizer::new().is_authorized(&req, set, &entities);
                let policies = response
                    .diagnostics()
                    .reason()
                    .map(ToString::to_string)
                    .collect();
                for e in response.diagnostics().errors() {
                    tracing::debug!(error = %e, "policy evaluation error");
                }
                match response.decision() {
                    cedar_policy::Decision::Allow => Verdict::allow(policies),
                    cedar_policy::Decision::Deny => Verdict::deny(policies),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "policy request could not be built; denied");
                Verdict::deny(Vec::new())
            }
        }
    }

    /// The `Workload` entity of the caller, from the cache while its registration's owner,
    /// purpose and labels are unchanged.
    fn principal_entity(
        &self,
        spiffe_id: &str,
        workload: Option<&Workload>,
    ) -> Result<Built, String> {
        let facts = workload.map(|w| (w.owner.as_str(), w.purpose.as_str(), &w.labels));
        if let Some(c) = self.entities.lock().workloads.get(spiffe_id) {
            let cached = c
                .facts
                .as_ref()
                .map(|(o, p, l)| (o.as_str(), p.as_str(), l));
            if cached == facts {
                return Ok(c.built.clone());
            }
        }
        let built = Built {
            entity: Arc::new(workload_entity(&self.names, spiffe_id, workload)?),
            build: self.builds.fetch_add(1, Ordering::Relaxed),
        };
        let mut cache = self.entities.lock();
        if cache.workloads.len() >= ENTITY_CACHE_MAX {
            cache.workloads.clear();
        }
        cache.workloads.insert(
            spiffe_id.to_owned(),
            CachedWorkload {
                facts: workload.map(|w| (w.owner.clone(), w.purpose.clone(), w.labels.clone())),
                built: built.clone(),
            },
        );
        Ok(built)
    }

    /// The `Key` entity of a key, from the cache while its alias and labels are unchanged.
    fn resource_entity(&self, key: &KeyRecord) -> Result<Built, String> {
        if let Some(c) = self.entities.lock().keys.get(&key.id) {
            if c.alias == key.alias && c.labels == key.labels {
                return Ok(c.built.clone());
            }
        }
        let built = Built {
            entity: Arc::new(key_entity(&self.names, key)?),
            build: self.builds.fetch_add(1, Ordering::Relaxed),
        };
        let mut cache = self.entities.lock();
        if cache.keys.len() >= ENTITY_CACHE_MAX {
            cache.keys.clear();
        }
        cache.keys.insert(
            key.id,
            CachedKey {
                alias: key.alias.clone(),
                labels: key.labels.clone(),
                built: built.clone(),
            },
        );
        Ok(built)
    }

    /// The Cedar context of a request: the encryption context's entity, the time, the
    /// authentication method, the declared purpose and the grant. Requests of the same
    /// second with the same method, purpose and grant share one (the encryption context's
    /// values are in its entity, not here).
    fn context(&self, r: &AccessRequest<'_>) -> Result<Context, String> {
        let mut key = Vec::with_capacity(64);
        context_key(&mut key, r);
        if let Some(context) = self.contexts.lock().get(r.now_unix, &key) {
            return Ok(context);
        }
        let ctx_uid = self.names.context.clone();
        let now = r.now_unix;
        let day_secs = now % 86_400;
        // 1970-01-01 was a Thursday (4).
        let weekday = (now / 86_400 + 4) % 7;
        let time = RestrictedExpression::new_record([
            ("unix".to_owned(), long(now)),
            ("hour_utc".to_owned(), long(day_secs / 3600)),
            ("minute_utc".to_owned(), long(day_secs % 3600 / 60)),
            ("weekday_utc".to_owned(), long(weekday)),
        ])
        .map_err(|e| e.to_string())?;
        let mut pairs = vec![
            (
                ENCRYPTION_ATTR.to_owned(),
                RestrictedExpression::new_entity_uid(ctx_uid),
            ),
            ("time".to_owned(), time),
            ("auth_method".to_owned(), string(auth_method(r))),
        ];
        if let Some(purpose) = &r.caller.purpose {
            pairs.push(("purpose".to_owned(), string(purpose)));
        }
        if let Some(grant) = &r.caller.grant {
            let g = RestrictedExpression::new_record([
                ("id".to_owned(), string(&grant.grant.id)),
                ("creator".to_owned(), string(&grant.grant.creator)),
            ])
            .map_err(|e| e.to_string())?;
            pairs.push(("grant".to_owned(), g));
        }
        let context = Context::from_pairs(pairs).map_err(|e| e.to_string())?;
        self.contexts.lock().put(r.now_unix, key, context.clone());
        Ok(context)
    }

    /// The principal and resource entities of a request as one `Entities` (Cedar computes
    /// the hierarchy's closure when building it), kept while both builds are current.
    fn pair(&self, principal: &Built, resource: &Built) -> Result<Entities, String> {
        let key = (principal.entity.uid(), resource.entity.uid());
        let builds = (principal.build, resource.build);
        if let Some(c) = self.entities.lock().pairs.get(&key) {
            if c.builds == builds {
                return Ok(c.entities.clone());
            }
        }
        let entities = Entities::from_entities(
            [
                Entity::clone(&principal.entity),
                Entity::clone(&resource.entity),
            ],
            None,
        )
        .map_err(|e| e.to_string())?;
        let mut cache = self.entities.lock();
        if cache.pairs.len() >= ENTITY_CACHE_MAX {
            cache.pairs.clear();
        }
        cache.pairs.insert(
            key,
            CachedPair {
                builds,
                entities: entities.clone(),
            },
        );
        Ok(entities)
    }

    /// The Cedar request and entities for one access request. Every input read here must
    /// also be written by [`decision_key`].
    fn cedar_request(&self, r: &AccessRequest<'_>) -> Result<(Request, Entities), String> {
        let principal_entity =
            self.principal_entity(r.caller.id.as_str(), r.caller.workload.as_deref())?;
        let principal = principal_entity.entity.uid();
        let resource_entity = self.resource_entity(r.key)?;
        let resource = resource_entity.entity.uid();

        let ctx_uid = self.names.context.clone();
        let ctx_entity = Entity::new_with_tags(
            ctx_uid.clone(),
            [],
            [],
            r.context.entries().map(|(k, v)| (k.to_owned(), string(v))),
        )
        .map_err(|e| e.to_string())?;

        let context = self.context(r)?;
        let action = self.names.action(r.op)?;
        let request =
            Request::new(principal, action, resource, context, None).map_err(|e| e.to_string())?;
        let entities = self
            .pair(&principal_entity, &resource_entity)?
            .add_entities([ctx_entity], None)
            .map_err(|e| e.to_string())?;
        Ok((request, entities))
    }
}

/// The authentication method as policy sees it: `grant` when a grant was presented.
fn auth_method(r: &AccessRequest<'_>) -> &'static str {
    if r.caller.grant.is_some() {
        "grant"
    } else {
        r.caller.method.as_str()
    }
}

/// Every input [`Policies::cedar_request`] reads, written out unambiguously (each string
/// length-prefixed, each optional part tagged): two requests with equal keys get the same
/// decision from the same policies. Of the encryption context, only the entries `reads` says
/// the caller's policies can read are written (present or absent, and their values).
fn decision_key(r: &AccessRequest<'_>, reads: &EncryptionReads) -> Vec<u8> {
    let mut k = Vec::with_capacity(256);
    key_text(&mut k, action_name(r.op));
    key_text(&mut k, r.caller.id.as_str());
    match r.caller.workload.as_deref() {
        None => k.push(0),
        Some(w) => {
            k.push(1);
            key_text(&mut k, &w.owner);
            key_text(&mut k, &w.purpose);
            key_pairs(&mut k, w.labels.entries());
        }
    }
    k.extend_from_slice(&r.key.id.to_bytes());
    key_optional(&mut k, r.key.alias.as_ref().map(|a| a.as_str()));
    key_pairs(&mut k, r.key.labels.entries());
    match reads {
        EncryptionReads::All => {
            k.push(0);
            key_pairs(&mut k, r.context.entries());
        }
        EncryptionReads::Entries(names) => {
            k.push(1);
            for name in names {
                key_optional(&mut k, r.context.get(name));
            }
        }
    }
    context_key(&mut k, r);
    k
}

/// Every input [`Policies::context`] reads: the time, the authentication method, the
/// declared purpose and the grant.
fn context_key(k: &mut Vec<u8>, r: &AccessRequest<'_>) {
    k.extend_from_slice(&r.now_unix.to_le_bytes());
    key_text(k, auth_method(r));
    key_optional(k, r.caller.purpose.as_deref());
    match &r.caller.grant {
        None => k.push(0),
        Some(g) => {
            k.push(1);
            key_text(k, &g.grant.id);
            key_text(k, &g.grant.creator);
        }
    }
}

fn key_text(k: &mut Vec<u8>, s: &str) {
    k.extend_from_slice(&s.len().to_le_bytes());
    k.extend_from_slice(s.as_bytes());
}

fn key_pairs<'a>(k: &mut Vec<u8>, entries: impl Iterator<Item = (&'a str, &'a str)>) {
    for (name, value) in entries {
        k.push(1);
        key_text(k, name);
        key_text(k, value);
    }
    k.push(0);
}

fn key_optional(k: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => k.push(0),
        Some(s) => {
            k.push(1);
            key_text(k, s);
        }
    }
}

/// At most this many remembered decisions per second; beyond it, decisions are evaluated
/// and not remembered.
const DECISION_CACHE_MAX: usize = 4096;

/// At most this many cached entities of each kind; the cache starts over when full.
const ENTITY_CACHE_MAX: usize = 10_000;

/// Decisions taken in the current second under the current policies.
#[derive(Default)]
struct DecisionCache {
    generation: u64,
    second: u64,
    decisions: HashMap<Vec<u8>, Verdict>,
}

impl DecisionCache {
    fn get(&self, generation: u64, key: &[u8]) -> Option<Verdict> {
        if self.generation != generation {
            return None;
        }
        self.decisions.get(key).cloned()
    }

    /// Remembers a decision taken under `generation` at `second`. A newer generation or a
    /// later second starts the cache over. A decision from an older generation (evaluated
    /// while the policies changed) is dropped, and so is one from a second or two ago (a
    /// request that was slow to finish), so that it does not empty the current second's cache;
    /// a clock stepped back further starts the cache over. Correctness never depends on
    /// this: the time is part of every key.
    fn put(&mut self, generation: u64, second: u64, key: Vec<u8>, verdict: Verdict) {
        if generation < self.generation {
            return;
        }
        let late = second < self.second && second.saturating_add(2) >= self.second;
        if generation == self.generation && late {
            return;
        }
        if generation > self.generation || second != self.second {
            self.generation = generation;
            self.second = second;
            self.decisions.clear();
        }
        if self.decisions.len() < DECISION_CACHE_MAX {
            self.decisions.insert(key, verdict);
        }
    }
}

/// At most this many Cedar contexts per second.
const CONTEXT_CACHE_MAX: usize = 1024;

/// Cedar contexts built in the current second, by [`context_key`].
#[derive(Default)]
struct ContextCache {
    second: u64,
    contexts: HashMap<Vec<u8>, Context>,
}

impl ContextCache {
    fn get(&self, second: u64, key: &[u8]) -> Option<Context> {
        if second != self.second {
            return None;
        }
        self.contexts.get(key).cloned()
    }

    /// Remembers a context built for `second`; a later second starts the cache over and an
    /// earlier one is not remembered. The time is part of every key as well.
    fn put(&mut self, second: u64, key: Vec<u8>, context: Context) {
        if second < self.second {
            return;
        }
        if second > self.second {
            self.second = second;
            self.contexts.clear();
        }
        if self.contexts.len() < CONTEXT_CACHE_MAX {
            self.contexts.insert(key, context);
        }
    }
}

/// Principal and resource entities, built once per registration and key state.
#[derive(Default)]
struct EntityCache {
    workloads: HashMap<String, CachedWorkload>,
    keys: HashMap<KeyId, CachedKey>,
    pairs: HashMap<(EntityUid, EntityUid), CachedPair>,
}

/// An entity with the number of its build: a changed registration or key gets a new
/// entity under the same uid, and a new number. Shared, as a Cedar entity is a deep copy.
#[derive(Clone)]
struct Built {
    entity: Arc<Entity>,
    build: u64,
}

/// The `Entities` of one principal build and one resource build.
struct CachedPair {
    builds: (u64, u64),
    entities: Entities,
}

struct CachedWorkload {
    /// Owner, purpose and labels of the registration it was built from.
    facts: Option<(String, String, Labels)>,
    built: Built,
}

struct CachedKey {
    alias: Option<Alias>,
    labels: Labels,
    built: Built,
}

/// Entity type names and uids every request uses, parsed once (Cedar parses them from text).
struct Names {
    workload: EntityTypeName,
    key: EntityTypeName,
    context: EntityUid,
    actions: Vec<(&'static str, EntityUid)>,
}

impl Names {
    fn new() -> Result<Self, String> {
        let actions = [
            Op::GenerateDataKey,
            Op::Decrypt,
            Op::Encrypt,
            Op::ReEncrypt,
            Op::CreateGrant,
        ]
        .into_iter()
        .map(|op| Ok((action_name(op), uid("Action", action_name(op))?)))
        .collect::<Result<_, String>>()?;
        Ok(Self {
            workload: EntityTypeName::from_str("Workload").map_err(|e| e.to_string())?,
            key: EntityTypeName::from_str("Key").map_err(|e| e.to_string())?,
            context: uid(ENCRYPTION_TYPE, "request")?,
            actions,
        })
    }

    fn action(&self, op: Op) -> Result<EntityUid, String> {
        let name = action_name(op);
        match self.actions.iter().find(|(n, _)| *n == name) {
            Some((_, uid)) => Ok(uid.clone()),
            None => uid("Action", name),
        }
    }
}

/// The data-plane operations that use a key (creating a grant does not, by itself).
pub const USE_OPS: [Op; 4] = [Op::GenerateDataKey, Op::Decrypt, Op::Encrypt, Op::ReEncrypt];

impl Policies {
    /// Whether the current policies could allow some workload under `registration` some use of
    /// `key`, for any encryption context, time, purpose, authentication method or grant.
    ///
    /// Cedar evaluates each use operation partially, with the request context unknown: `false`
    /// means every operation is denied whatever the context holds. An exact registration is
    /// evaluated as its own principal. A prefix registration stands for workloads not known in
    /// advance, so its principal is unknown too (its labels included) and any policy that could
    /// apply to some workload counts. The answer therefore errs towards "may use": a `true`
    /// can hide a condition that never holds, a `false` is certain.
    pub fn may_use(&self, registration: &Workload, key: &KeyRecord) -> Result<bool, Error> {
        let internal = |e: String| {
            tracing::error!(error = %e, "partial policy request could not be built");
            Error::Internal("partial policy request could not be built")
        };
        let selector = registration.parsed_selector()?;
        let compiled = self.compiled.read().clone();
        let resource = key_entity(&self.names, key).map_err(internal)?;
        let (set, principal) = match &selector {
            Selector::Exact(id) => (
                compiled.for_principal(&id.to_string()).set.clone(),
                Some(
                    workload_entity(&self.names, &id.to_string(), Some(registration))
                        .map_err(internal)?,
                ),
            ),
            _ => (compiled.all.clone(), None),
        };
        let mut entities = vec![resource.clone()];
        entities.extend(principal.clone());
        let entities =
            Entities::from_entities(entities, None).map_err(|e| internal(e.to_string()))?;
        for op in USE_OPS {
            let builder = Request::builder()
                .action(self.names.action(op).map_err(internal)?)
                .resource(resource.uid());
            let builder = match &principal {
                Some(p) => builder.principal(p.uid()),
                None => builder.unknown_principal_with_type(self.names.workload.clone()),
            };
            let response = cedar_policy::Authorizer::new().is_authorized_partial(
                &builder.build(),
                &set,
                &entities,
            );
            if response.decision() != Some(cedar_policy::Decision::Deny) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn current_texts(histories: &BTreeMap<String, PolicyHistory>) -> BTreeMap<String, String> {
    histories
        .iter()
        .filter_map(|(id, h)| h.current().map(|v| (id.clone(), v.text.clone())))
        .collect()
}

fn next_version(history: &PolicyHistory) -> u32 {
    history
        .versions
        .last()
        .map_or(1, |v| v.version.saturating_add(1))
}

/// The Cedar action for a data-plane operation.
pub fn action_name(op: Op) -> &'static str {
    match op {
        Op::Decrypt => "Decrypt",
        Op::Encrypt => "Encrypt",
        Op::GenerateDataKey => "GenerateDataKey",
        Op::ReEncrypt => "ReEncrypt",
        Op::CreateGrant => "CreateGrant",
        _ => "None",
    }
}

fn uid(type_name: &str, id: &str) -> Result<EntityUid, String> {
    let t = EntityTypeName::from_str(type_name).map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn long(n: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The `Workload` entity for a caller with this SPIFFE ID, under its registration if it has
/// one.
fn workload_entity(
    names: &Names,
    spiffe_id: &str,
    workload: Option<&Workload>,
) -> Result<Entity, String> {
    let trust_domain = SpiffeId::from_str(spiffe_id)
        .map(|id| id.trust_domain().to_owned())
        .unwrap_or_default();
    Entity::new_with_tags(
        EntityUid::from_type_name_and_id(names.workload.clone(), EntityId::new(spiffe_id)),
        [
            ("spiffe_id".to_owned(), string(spiffe_id)),
            ("trust_domain".to_owned(), string(&trust_domain)),
            (
                "owner".to_owned(),
                string(workload.map_or("", |w| w.owner.as_str())),
            ),
            (
                "purpose".to_owned(),
                string(workload.map_or("", |w| w.purpose.as_str())),
            ),
        ],
        [],
        workload
            .into_iter()
            .flat_map(|w| w.labels.entries())
            .map(|(k, v)| (k.to_owned(), string(v))),
    )
    .map_err(|e| e.to_string())
}

/// The `Key` entity for a key.
fn key_entity(names: &Names, key: &KeyRecord) -> Result<Entity, String> {
    let key_id = key.id.to_string();
    Entity::new_with_tags(
        EntityUid::from_type_name_and_id(names.key.clone(), EntityId::new(&key_id)),
        [
            ("id".to_owned(), string(&key_id)),
            (
                "alias".to_owned(),
                string(key.alias.as_ref().map_or("", |a| a.as_str())),
            ),
        ],
        [],
        key.labels.entries().map(|(k, v)| (k.to_owned(), string(v))),
    )
    .map_err(|e| e.to_string())
}

/// The data plane's [`Authorizer`]: the current Cedar policies.
#[derive(Clone, Debug)]
pub struct CedarAuthorizer {
    policies: Arc<Policies>,
}

impl CedarAuthorizer {
    /// An authorizer over `policies`; changes to them apply from the next request.
    pub fn new(policies: Arc<Policies>) -> Self {
        Self { policies }
    }
}

impl Authorizer for CedarAuthorizer {
    fn decide(&self, request: &AccessRequest<'_>) -> Verdict {
        self.policies.evaluate(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(text: &str) -> EncryptionReads {
        let set = PolicySet::from_str(text).unwrap();
        let mut all = EncryptionReads::none();
        for p in set.policies() {
            all.add(&encryption_reads(p));
        }
        all
    }

    fn entries(names: &[&str]) -> EncryptionReads {
        EncryptionReads::Entries(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn literal_tag_reads_are_found() {
        assert_eq!(
            reads(include_str!(
                "../../examples/policies/messaging-tenant.cedar"
            )),
            entries(&["tenant"])
        );
        assert_eq!(
            reads(include_str!(
                "../../examples/policies/restricted-hours.cedar"
            )),
            entries(&[])
        );
        assert_eq!(
            reads(
                "permit(principal, action, resource) when { \
                 context.encryption_context.hasTag(\"a\") && \
                 context.encryption_context.getTag(\"b\") == \"x\" && \
                 context has purpose && context.purpose == \"audit\" && \
                 context.time.hour_utc < 22 && context has encryption_context };\n\
                 forbid(principal, action, resource) when { \
                 context.encryption_context.hasTag(\"c\") };"
            ),
            entries(&["a", "b", "c"])
        );
    }

    #[test]
    fn any_other_use_of_the_encryption_context_reads_all_of_it() {
        for text in [
            // A name computed at evaluation time.
            "permit(principal, action, resource) when { \
             principal.hasTag(\"k\") && \
             context.encryption_context.hasTag(principal.getTag(\"k\")) };",
            "permit(principal, action, resource) when { context has purpose && \
             context.encryption_context.getTag(context.purpose) == \"x\" };",
            // The entity itself compared, tested or named.
            "permit(principal, action, resource) when { \
             context.encryption_context == EncryptionContext::\"request\" };",
            "permit(principal, action, resource) when { \
             context.encryption_context is EncryptionContext };",
            "permit(principal, action, resource) when { \
             EncryptionContext::\"request\".hasTag(\"a\") };",
            "permit(principal, action, resource) when { \
             (if true then context.encryption_context \
              else context.encryption_context).hasTag(\"a\") };",
            // The whole context.
            "permit(principal, action, resource) when { context == context };",
            "permit(principal, action, resource) when { context has encryption_context.a };",
            // Record literals, whose keys may spell the operators this analysis looks for.
            "permit(principal, action, resource) when { \
             {Var: context.encryption_context}.Var.hasTag(\"a\") };",
            "permit(principal, action, resource) when { \
             {\"hasTag\": context}.hasTag.encryption_context.hasTag(\"a\") };",
        ] {
            let set = PolicySet::from_str(text).unwrap();
            for p in set.policies() {
                assert_eq!(encryption_reads(p), EncryptionReads::All, "{text}");
            }
        }
        // One policy reading all makes the whole slice read all.
        assert_eq!(
            reads(
                "permit(principal, action, resource) when { \
                 context.encryption_context.hasTag(\"a\") };\n\
                 permit(principal, action, resource) when { context == context };"
            ),
            EncryptionReads::All
        );
    }
}

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
//!
//! ```text
//!  texts ─▶ compile (parse, name, validate) ─▶ Compiled (sliced by principal, reads analysed)
//!  request ─▶ eval::DecisionInputs ─┬▶ decision key ─▶ cache (per second, per generation)
//!                                   └▶ Cedar request (entities, context) ─▶ Verdict
//! ```
//!
//! It counts evaluated and reused decisions; it measures no time (the server times decisions
//! around [`Policies::decide`]).

mod cache;
mod compile;
mod coverage;
mod entities;
mod eval;
mod reads;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cedar_policy::Schema;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use self::cache::{ContextCache, DecisionCache};
use self::compile::{compile, schema, Compiled};
use self::entities::{EntityCache, Names};
pub use self::eval::Decided;
use crate::clock::Clock;
use crate::error::{Error, InvalidInput};
use crate::governance::authz::{AccessRequest, Authorizer, Verdict};
use crate::op::Op;
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

/// A policy id: 1-64 of `a-z 0-9 _ -`, starting with a letter or digit.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PolicyName(String);

impl PolicyName {
    /// Checks the syntax.
    pub fn parse(id: &str) -> Result<Self, Error> {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
            && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
        if ok {
            Ok(Self(id.to_owned()))
        } else {
            Err(Error::Invalid(InvalidInput::PolicyId))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// "Not found" for `id`; a malformed id cannot exist, so it is refused as malformed.
fn not_found(id: &str) -> Error {
    match PolicyName::parse(id) {
        Ok(id) => Error::PolicyNotFound { id },
        Err(e) => e,
    }
}

/// Why a policy text was refused.
#[derive(Debug)]
#[non_exhaustive]
#[expect(
    clippy::large_enum_variant,
    reason = "held only boxed, in Error::PolicyInvalid, on a rare admin path"
)]
pub enum PolicyProblem {
    /// It holds no statement.
    Empty,
    /// It does not parse.
    Parse(cedar_policy::ParseErrors),
    /// It does not validate against [`SCHEMA`] together with the other current policies.
    Schema(Vec<cedar_policy::ValidationError>),
    /// It conflicts with the set (for example a duplicate statement id).
    Set(cedar_policy::PolicySetError),
    /// It holds templates, which are not supported.
    Template,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyProblem::Empty => f.write_str("no policy statement"),
            PolicyProblem::Parse(e) => e.fmt(f),
            PolicyProblem::Schema(errors) => {
                for (i, e) in errors.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{}: {e}", e.policy_id())?;
                }
                Ok(())
            }
            PolicyProblem::Set(e) => e.fmt(f),
            PolicyProblem::Template => f.write_str("templates are not supported"),
        }
    }
}

/// Why Cedar could not be given a request or an entity. The built-in schema names and
/// validated inputs make this a server fault, never the caller's; the request is denied.
/// Boxed: Cedar's errors are large and this is on the evaluation path's `Result`s.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct BuildError(Box<BuildCause>);

impl BuildError {
    fn action(op: Op) -> Self {
        Self(Box::new(BuildCause::Action(op)))
    }
}

#[derive(Debug, thiserror::Error)]
enum BuildCause {
    #[error("no Cedar action for {0}")]
    Action(Op),
    #[error("context: {0}")]
    Context(#[from] cedar_policy::ContextCreationError),
    #[error("entities: {0}")]
    Entities(#[from] cedar_policy::entities_errors::EntitiesError),
    #[error("entity: {0}")]
    Entity(#[from] cedar_policy::EntityAttrEvaluationError),
    #[error("expression: {0}")]
    Expression(#[from] cedar_policy::ExpressionConstructionError),
    #[error("name: {0}")]
    Name(#[from] cedar_policy::ParseErrors),
    #[error("request: {0}")]
    Request(#[from] cedar_policy::RequestValidationError),
}

/// `?` on each Cedar error the builders meet.
macro_rules! build_error_from {
    ($($t:ty),* $(,)?) => {
        $(impl From<$t> for BuildError {
            fn from(e: $t) -> Self {
                Self(Box::new(BuildCause::from(e)))
            }
        })*
    };
}

build_error_from!(
    cedar_policy::ContextCreationError,
    cedar_policy::entities_errors::EntitiesError,
    cedar_policy::EntityAttrEvaluationError,
    cedar_policy::ExpressionConstructionError,
    cedar_policy::ParseErrors,
    cedar_policy::RequestValidationError,
);

/// How many decisions were taken since start or the last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionCounts {
    /// Decisions Cedar evaluated.
    pub count: u64,
    /// Decisions answered from the decision cache.
    pub cached: u64,
}

impl DecisionCounts {
    /// Every decision, reused or evaluated.
    pub fn decisions(&self) -> u64 {
        self.count.saturating_add(self.cached)
    }
}

#[derive(Debug, Default)]
struct Counters {
    evaluated: AtomicU64,
    reused: AtomicU64,
}

impl Counters {
    fn evaluated(&self) {
        self.evaluated.fetch_add(1, Ordering::Relaxed);
    }

    fn reused(&self) {
        self.reused.fetch_add(1, Ordering::Relaxed);
    }
}

/// The stored policies and the compiled set evaluated on every request.
pub struct Policies {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    schema: Schema,
    histories: RwLock<BTreeMap<String, PolicyHistory>>,
    compiled: RwLock<Arc<Compiled>>,
    counts: Counters,
    names: Names,
    entities: Mutex<EntityCache>,
    decisions: Mutex<DecisionCache>,
    contexts: Mutex<ContextCache>,
    /// Numbers the principal and resource entities built (see `entities::Built`).
    builds: AtomicU64,
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
            counts: Counters::default(),
            names,
            entities: Mutex::new(EntityCache::default()),
            decisions: Mutex::new(DecisionCache::default()),
            contexts: Mutex::new(ContextCache::default()),
            builds: AtomicU64::new(0),
        })
    }

    /// Checks that `text` would be accepted as policy `id` now (as [`Policies::put`] checks
    /// it), storing nothing: a change that waits for approvals is refused at once if bad.
    pub fn check(&self, id: &str, text: &str) -> Result<(), Error> {
        let texts = with_text(&self.histories.read(), id, text)?;
        compile(&self.schema, &texts).map(drop)
    }

    /// Stores a new version of policy `id` (creating it if new), after validating it with
    /// every other current policy. Returns the stored version and the one it replaced.
    pub fn put(
        &self,
        id: &str,
        text: &str,
        by: &str,
    ) -> Result<(PolicyVersion, Option<PolicyVersion>), Error> {
        let mut histories = self.histories.write();
        let texts = with_text(&histories, id, text)?;
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
            .ok_or_else(|| not_found(id))?;
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
        let history = histories.get(id).ok_or_else(|| not_found(id))?;
        let found = match version {
            None => history.current(),
            Some(v) => history.versions.iter().find(|p| p.version == v),
        };
        found.cloned().ok_or_else(|| not_found(id))
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

    /// Decisions counted so far; `reset` starts the counts over.
    pub fn decision_counts(&self, reset: bool) -> DecisionCounts {
        let take = |c: &AtomicU64| {
            if reset {
                c.swap(0, Ordering::Relaxed)
            } else {
                c.load(Ordering::Relaxed)
            }
        };
        DecisionCounts {
            count: take(&self.counts.evaluated),
            cached: take(&self.counts.reused),
        }
    }
}

/// SHA-256 (hex) of the active policy set in `store`: the compact JSON of every current
/// policy's text by id (ids sorted), as `{"ID":"TEXT",...}`. Deleted policies and past
/// versions are not in it.
pub fn active_set_sha256(store: &dyn Store) -> Result<String, Error> {
    let mut histories = BTreeMap::new();
    for Row { value, .. } in store.scan(Table::Policies)? {
        let h: PolicyHistory = serde_json::from_slice(&value).map_err(|source| Error::Record {
            table: "policies",
            source,
        })?;
        histories.insert(h.id.clone(), h);
    }
    let json = serde_json::to_vec(&current_texts(&histories))
        .map_err(|_| Error::Internal("policy set encoding"))?;
    Ok(crate::audit::sha256_hex(&json))
}

fn current_texts(histories: &BTreeMap<String, PolicyHistory>) -> BTreeMap<String, String> {
    histories
        .iter()
        .filter_map(|(id, h)| h.current().map(|v| (id.clone(), v.text.clone())))
        .collect()
}

/// Every current policy's text with `text` as policy `id`, once the id and the text's size
/// are checked: what a put would compile.
fn with_text(
    histories: &BTreeMap<String, PolicyHistory>,
    id: &str,
    text: &str,
) -> Result<BTreeMap<String, String>, Error> {
    PolicyName::parse(id)?;
    if text.len() > MAX_POLICY_TEXT {
        return Err(Error::TooLarge {
            what: "policy text",
            len: text.len(),
            max: MAX_POLICY_TEXT,
        });
    }
    let mut texts = current_texts(histories);
    texts.insert(id.to_owned(), text.to_owned());
    Ok(texts)
}

fn next_version(history: &PolicyHistory) -> u32 {
    history
        .versions
        .last()
        .map_or(1, |v| v.version.saturating_add(1))
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

//! From stored texts to the compiled set: parsing, naming statements, strict validation
//! against the schema, and slicing the set by principal.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{PolicySet, Schema, ValidationMode, Validator};

use super::reads::{encryption_reads, EncryptionReads};
use super::{PolicyProblem, SCHEMA};
use crate::error::Error;

pub(super) fn schema() -> Result<Schema, Error> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _)| s)
        .map_err(|_| Error::Internal("built-in policy schema does not parse"))
}

fn invalid(id: &str, problem: PolicyProblem) -> Error {
    Error::PolicyInvalid {
        id: cedar_policy::PolicyId::new(id),
        problem: Box::new(problem),
    }
}

/// The Cedar statements of one stored text, named by `id`.
fn statements(id: &str, text: &str) -> Result<Vec<cedar_policy::Policy>, Error> {
    let parsed = PolicySet::from_str(text).map_err(|e| invalid(id, PolicyProblem::Parse(e)))?;
    if parsed.templates().next().is_some() {
        return Err(invalid(id, PolicyProblem::Template));
    }
    let all: Vec<_> = parsed.policies().cloned().collect();
    if all.is_empty() {
        return Err(invalid(id, PolicyProblem::Empty));
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
pub(super) fn compile(
    schema: &Schema,
    texts: &BTreeMap<String, String>,
) -> Result<PolicySet, Error> {
    let mut set = PolicySet::new();
    for (id, text) in texts {
        for statement in statements(id, text)? {
            set.add(statement)
                .map_err(|e| invalid(id, PolicyProblem::Set(e)))?;
        }
    }
    let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if !result.validation_passed() {
        let errors: Vec<cedar_policy::ValidationError> =
            result.validation_errors().cloned().collect();
        let id = errors
            .first()
            .map(|e| e.policy_id().clone())
            .unwrap_or_else(|| cedar_policy::PolicyId::new(""));
        return Err(Error::PolicyInvalid {
            id,
            problem: Box::new(PolicyProblem::Schema(errors)),
        });
    }
    Ok(set)
}

/// The current policies, sliced by principal: Cedar evaluates every policy in a set, so each
/// caller is evaluated against only the policies that could apply to it (those whose scope
/// names no principal, and those naming it with `principal == ...`). The decision is the one
/// the whole set would give, since a policy scoped to another principal can never match.
pub(super) struct Compiled {
    pub(super) all: Arc<PolicySet>,
    general: Slice,
    by_principal: HashMap<String, Slice>,
    pub(super) statements: usize,
    /// Counts policy changes since start; decisions remembered under another generation are
    /// never reused.
    pub(super) generation: u64,
    /// Each statement's text and what it reads of the encryption context, by statement id,
    /// so that a change to one policy does not analyse the others again.
    reads: HashMap<String, (String, EncryptionReads)>,
}

impl Compiled {
    /// Slices `set`; `previous` supplies the analysis of statements it shares with `set`.
    pub(super) fn new(
        set: &PolicySet,
        generation: u64,
        previous: Option<&Self>,
    ) -> Result<Self, Error> {
        let slice_err = |e| invalid("", PolicyProblem::Set(e));
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

    pub(super) fn for_principal(&self, principal: &str) -> &Slice {
        self.by_principal.get(principal).unwrap_or(&self.general)
    }
}

/// The policies that could apply to one principal, and what they read of the encryption
/// context.
pub(super) struct Slice {
    pub(super) set: Arc<PolicySet>,
    pub(super) reads: EncryptionReads,
}

//! Evaluation: one request's inputs, the Cedar request built from them, and the decision
//! cache keyed by the same inputs.
//!
//! Cedar's decision is a function of the request's inputs and the policies alone. Every input
//! is gathered once into [`DecisionInputs`]; the Cedar request ([`Policies::cedar_request`])
//! and the decision-cache key ([`decision_key`]) are both built from that value alone, and
//! both take it apart without `..`, so an input added to it must be handled by both or the
//! crate does not compile. A forgotten input can therefore never make two different requests
//! share a remembered decision.

use cedar_policy::{Context, Entities, Entity, PolicySet, Request, RestrictedExpression};

use super::entities::{long, string, KeyFacts, RegistrationFacts};
use super::reads::{EncryptionReads, ENCRYPTION_ATTR};
use super::{BuildError, Policies};
use crate::context::EncryptionContext;
use crate::governance::authz::{AccessRequest, Verdict};
use crate::governance::grants::GrantId;
use crate::governance::spiffe::SpiffeId;
use crate::op::Op;

/// A decision and whether it was answered from the decision cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    /// The verdict.
    pub verdict: Verdict,
    /// True when an identical earlier request's decision was reused; false when Cedar
    /// evaluated this one.
    pub reused: bool,
}

/// Every input of one decision.
struct DecisionInputs<'a> {
    op: Op,
    principal: &'a SpiffeId,
    registration: Option<RegistrationFacts<'a>>,
    key: KeyFacts<'a>,
    context: &'a EncryptionContext,
    now_unix: u64,
    /// `mtls`, `jwt`, or `grant` when a grant was presented.
    auth_method: &'static str,
    purpose: Option<&'a str>,
    grant: Option<GrantInputs<'a>>,
}

/// What policy sees of a presented grant.
#[derive(Clone, Copy)]
struct GrantInputs<'a> {
    id: &'a GrantId,
    creator: &'a SpiffeId,
}

impl<'a> DecisionInputs<'a> {
    fn of(r: &'a AccessRequest<'a>) -> Self {
        let grant = r.caller.grant.as_ref().map(|g| GrantInputs {
            id: &g.grant.id,
            creator: &g.grant.creator,
        });
        Self {
            op: r.op,
            principal: &r.caller.id,
            registration: r.caller.workload.as_deref().map(RegistrationFacts::of),
            key: KeyFacts::of(r.key),
            context: r.context,
            now_unix: r.now_unix,
            auth_method: match grant {
                Some(_) => "grant",
                None => r.caller.method.as_str(),
            },
            purpose: r.caller.purpose.as_deref(),
            grant,
        }
    }
}

impl Policies {
    /// Evaluates `request` against the current policies.
    pub fn evaluate(&self, request: &AccessRequest<'_>) -> Verdict {
        self.decide(request).verdict
    }

    /// Evaluates `request` against the current policies, saying whether the decision was
    /// reused.
    ///
    /// A decision is remembered for the rest of its second under every input (see
    /// `DecisionInputs`) and the policies' generation, and requests identical in all of them
    /// within that second reuse it. A change of policy, registration, key alias or labels,
    /// purpose, grant or time is another key, and so is a change of an encryption-context
    /// entry the caller's policies can read (all entries when a policy computes an entry's
    /// name or uses the encryption context otherwise; see the `reads` module).
    pub fn decide(&self, request: &AccessRequest<'_>) -> Decided {
        let inputs = DecisionInputs::of(request);
        let compiled = self.compiled.read().clone();
        let slice = compiled.for_principal(inputs.principal.as_str());
        let key = decision_key(&inputs, &slice.reads);
        let reused = self.decisions.lock().get(compiled.generation, &key);
        if let Some(verdict) = reused {
            self.counts.reused();
            return Decided {
                verdict,
                reused: true,
            };
        }
        let verdict = self.evaluate_cedar(&slice.set, &inputs);
        self.counts.evaluated();
        self.decisions
            .lock()
            .put(compiled.generation, inputs.now_unix, key, verdict.clone());
        Decided {
            verdict,
            reused: false,
        }
    }

    fn evaluate_cedar(&self, set: &PolicySet, inputs: &DecisionInputs<'_>) -> Verdict {
        match self.cedar_request(inputs) {
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

    /// The Cedar request and entities for one decision.
    fn cedar_request(
        &self,
        inputs: &DecisionInputs<'_>,
    ) -> Result<(Request, Entities), BuildError> {
        let DecisionInputs {
            op,
            principal,
            registration,
            key,
            context,
            now_unix,
            auth_method,
            purpose,
            grant,
        } = inputs;
        let principal_entity = self.principal_entity(principal, *registration)?;
        let resource_entity = self.resource_entity(*key)?;
        let ctx_entity = Entity::new_with_tags(
            self.names.context.clone(),
            [],
            [],
            context.entries().map(|(k, v)| (k.to_owned(), string(v))),
        )?;
        let context = self.context(*now_unix, auth_method, *purpose, *grant)?;
        let request = Request::new(
            principal_entity.entity.uid(),
            self.names.action(*op)?,
            resource_entity.entity.uid(),
            context,
            None,
        )?;
        let entities = self
            .pair(&principal_entity, &resource_entity)?
            .add_entities([ctx_entity], None)?;
        Ok((request, entities))
    }

    /// The Cedar context of a request: the encryption context's entity, the time, the
    /// authentication method, the declared purpose and the grant. Requests of the same
    /// second with the same method, purpose and grant share one (the encryption context's
    /// values are in its entity, not here).
    fn context(
        &self,
        now: u64,
        auth_method: &str,
        purpose: Option<&str>,
        grant: Option<GrantInputs<'_>>,
    ) -> Result<Context, BuildError> {
        let mut key = Vec::with_capacity(64);
        context_key(&mut key, now, auth_method, purpose, grant);
        if let Some(context) = self.contexts.lock().get(now, &key) {
            return Ok(context);
        }
        let day_secs = now % 86_400;
        // 1970-01-01 was a Thursday (4).
        let weekday = (now / 86_400 + 4) % 7;
        let time = RestrictedExpression::new_record([
            ("unix".to_owned(), long(now)),
            ("hour_utc".to_owned(), long(day_secs / 3600)),
            ("minute_utc".to_owned(), long(day_secs % 3600 / 60)),
            ("weekday_utc".to_owned(), long(weekday)),
        ])?;
        let mut pairs = vec![
            (
                ENCRYPTION_ATTR.to_owned(),
                RestrictedExpression::new_entity_uid(self.names.context.clone()),
            ),
            ("time".to_owned(), time),
            ("auth_method".to_owned(), string(auth_method)),
        ];
        if let Some(purpose) = purpose {
            pairs.push(("purpose".to_owned(), string(purpose)));
        }
        if let Some(g) = grant {
            let g = RestrictedExpression::new_record([
                ("id".to_owned(), string(g.id.as_str())),
                ("creator".to_owned(), string(g.creator.as_str())),
            ])?;
            pairs.push(("grant".to_owned(), g));
        }
        let context = Context::from_pairs(pairs)?;
        self.contexts.lock().put(now, key, context.clone());
        Ok(context)
    }
}

/// Every input of a decision, written out unambiguously (each string length-prefixed, each
/// optional part tagged): two requests with equal keys get the same decision from the same
/// policies. Of the encryption context, only the entries `reads` says the caller's policies
/// can read are written (present or absent, and their values).
fn decision_key(inputs: &DecisionInputs<'_>, reads: &EncryptionReads) -> Vec<u8> {
    let DecisionInputs {
        op,
        principal,
        registration,
        key,
        context,
        now_unix,
        auth_method,
        purpose,
        grant,
    } = inputs;
    let mut k = Vec::with_capacity(256);
    key_text(&mut k, op.as_str());
    key_text(&mut k, principal.as_str());
    match registration {
        None => k.push(0),
        Some(r) => {
            k.push(1);
            key_text(&mut k, r.owner);
            key_text(&mut k, r.purpose);
            key_pairs(&mut k, r.labels.entries());
        }
    }
    k.extend_from_slice(&key.id.to_bytes());
    key_optional(&mut k, key.alias.map(|a| a.as_str()));
    key_pairs(&mut k, key.labels.entries());
    match reads {
        EncryptionReads::All => {
            k.push(0);
            key_pairs(&mut k, context.entries());
        }
        EncryptionReads::Entries(names) => {
            k.push(1);
            for name in names {
                key_optional(&mut k, context.get(name));
            }
        }
    }
    context_key(&mut k, *now_unix, auth_method, *purpose, *grant);
    k
}

/// Every input [`Policies::context`] reads: the time, the authentication method, the
/// declared purpose and the grant.
fn context_key(
    k: &mut Vec<u8>,
    now: u64,
    auth_method: &str,
    purpose: Option<&str>,
    grant: Option<GrantInputs<'_>>,
) {
    k.extend_from_slice(&now.to_le_bytes());
    key_text(k, auth_method);
    key_optional(k, purpose);
    match grant {
        None => k.push(0),
        Some(g) => {
            k.push(1);
            key_text(k, g.id.as_str());
            key_text(k, g.creator.as_str());
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

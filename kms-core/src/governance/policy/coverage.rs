//! Which keys the current policies could let some registered workload use: Cedar partial
//! evaluation with the request context unknown.

use cedar_policy::{Entities, Request};

use super::entities::{key_entity, workload_entity, KeyFacts, RegistrationFacts};
use super::{BuildError, Policies};
use crate::error::Error;
use crate::governance::inventory::{Selector, Workload};
use crate::key::KeyRecord;
use crate::op::Op;

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
        let internal = |e: BuildError| {
            tracing::error!(error = %e, "partial policy request could not be built");
            Error::Internal("partial policy request could not be built")
        };
        let selector = registration.parsed_selector()?;
        let compiled = self.compiled.read().clone();
        let resource = key_entity(&self.names, KeyFacts::of(key)).map_err(internal)?;
        let (set, principal) = match &selector {
            Selector::Exact(id) => (
                compiled.for_principal(id.as_str()).set.clone(),
                Some(
                    workload_entity(&self.names, id, Some(RegistrationFacts::of(registration)))
                        .map_err(internal)?,
                ),
            ),
            _ => (compiled.all.clone(), None),
        };
        let mut entities = vec![resource.clone()];
        entities.extend(principal.clone());
        let entities =
            Entities::from_entities(entities, None).map_err(|e| internal(BuildError::from(e)))?;
        for op in Op::USES {
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

//! The authorisation seam. Every data-plane operation asks an [`Authorizer`] after it has
//! resolved the key's metadata and before it touches key material or the HSM. Allowing
//! produces a [`PolicyDecision`], a proof token that only this module can construct and that
//! the sealing and opening functions require.

use crate::context::EncryptionContext;
use crate::error::{Error, Op};
use crate::ids::PrincipalId;
use crate::key::KeyRecord;

/// What is being asked.
#[derive(Debug)]
pub struct AccessRequest<'a> {
    /// The authenticated caller.
    pub principal: &'a PrincipalId,
    /// The operation.
    pub op: Op,
    /// The key's metadata (labels, state, protection).
    pub key: &'a KeyRecord,
    /// The encryption context of the request.
    pub context: &'a EncryptionContext,
}

/// The outcome of one decision.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Decision {
    /// The request may proceed.
    Allow,
    /// The request is refused.
    Deny,
}

/// Decides data-plane requests.
pub trait Authorizer: Send + Sync {
    /// Allow or deny one request.
    fn decide(&self, request: &AccessRequest<'_>) -> Decision;
}

/// Proof that an [`Authorizer`] allowed this request. Not constructible outside this module.
#[derive(Debug)]
pub struct PolicyDecision(());

/// Asks `authorizer`, turning a denial into [`Error::Denied`].
pub(crate) fn authorize(
    authorizer: &dyn Authorizer,
    request: &AccessRequest<'_>,
) -> Result<PolicyDecision, Error> {
    match authorizer.decide(request) {
        Decision::Allow => Ok(PolicyDecision(())),
        Decision::Deny => Err(Error::Denied),
    }
}

/// The policy of this release: any caller that the data plane's transport authenticated
/// (a client certificate issued by the workload CA) may use any enabled key. Per-request
/// policy-as-code replaces it behind the same trait.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAuthenticated;

impl Authorizer for AllowAuthenticated {
    fn decide(&self, _request: &AccessRequest<'_>) -> Decision {
        Decision::Allow
    }
}

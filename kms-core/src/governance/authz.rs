//! The authorisation seam. Every data-plane operation asks an [`Authorizer`] after it has
//! resolved the key's metadata and before it touches key material or the HSM. Allowing
//! produces a [`PolicyDecision`], a proof token that only this module can construct and that
//! the sealing and opening functions require.

use std::sync::Arc;

use crate::context::EncryptionContext;
use crate::error::Error;
use crate::governance::grants::Grant;
use crate::governance::inventory::Workload;
use crate::governance::spiffe::SpiffeId;
use crate::key::KeyRecord;
use crate::op::Op;

/// How the caller proved its identity.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum AuthMethod {
    /// A client X.509-SVID on the TLS connection.
    Mtls,
    /// A JWT-SVID bearer token.
    Jwt,
}

impl AuthMethod {
    /// The word used in audit records and policy context.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Mtls => "mtls",
            AuthMethod::Jwt => "jwt",
        }
    }
}

/// An authenticated data-plane caller and what the server knows of it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The verified SPIFFE ID.
    pub id: SpiffeId,
    /// How it was verified.
    pub method: AuthMethod,
    /// Its inventory registration, when it has one.
    pub workload: Option<Arc<Workload>>,
    /// The reason the caller declared for this request, if any.
    pub purpose: Option<String>,
    /// The task grant the caller presented, once verified.
    pub grant: Option<GrantFacts>,
}

/// A task grant the caller presented, verified by the server (token, grantee, expiry,
/// revocation, uses). The key service checks the rest where the key is known: the key, the
/// operation, the required context, and that the creator may still do it.
#[derive(Clone, Debug)]
pub struct GrantFacts {
    /// The stored grant.
    pub grant: Arc<Grant>,
    /// The creator's current registration.
    pub creator_workload: Option<Arc<Workload>>,
    /// Uses the server reserved for this request (given back if it fails).
    pub reserved: u64,
}

impl Caller {
    /// A caller with no registration and no declared purpose.
    pub fn new(id: SpiffeId, method: AuthMethod) -> Self {
        Self {
            id,
            method,
            workload: None,
            purpose: None,
            grant: None,
        }
    }
}

/// What is being asked.
#[derive(Debug)]
pub struct AccessRequest<'a> {
    /// The authenticated caller.
    pub caller: &'a Caller,
    /// The operation.
    pub op: Op,
    /// The key's metadata (labels, state, protection).
    pub key: &'a KeyRecord,
    /// The encryption context of the request.
    pub context: &'a EncryptionContext,
    /// The time of the request, seconds since the Unix epoch.
    pub now_unix: u64,
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

/// A decision and the policies that determined it (empty for a default deny).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Verdict {
    /// Allow or deny.
    pub decision: Decision,
    /// Ids of the determining policies.
    pub policies: Vec<String>,
}

impl Verdict {
    /// An allow determined by `policies`.
    pub fn allow(policies: Vec<String>) -> Self {
        Self {
            decision: Decision::Allow,
            policies,
        }
    }

    /// A deny determined by `policies`.
    pub fn deny(policies: Vec<String>) -> Self {
        Self {
            decision: Decision::Deny,
            policies,
        }
    }
}

/// Decides data-plane requests.
pub trait Authorizer: Send + Sync {
    /// Allow or deny one request.
    fn decide(&self, request: &AccessRequest<'_>) -> Verdict;
}

/// Proof that an [`Authorizer`] allowed this request, with the policies that allowed it. Not
/// constructible outside this module.
#[derive(Debug)]
pub struct PolicyDecision {
    policies: Vec<String>,
}

impl PolicyDecision {
    /// The policies that allowed the request.
    pub fn policies(&self) -> &[String] {
        &self.policies
    }

    pub(crate) fn into_policies(self) -> Vec<String> {
        self.policies
    }

    pub(crate) fn add_policies(&mut self, more: Vec<String>) {
        for p in more {
            if !self.policies.contains(&p) {
                self.policies.push(p);
            }
        }
    }
}

/// Asks `authorizer`, turning a denial into [`Error::Denied`].
pub(crate) fn authorize(
    authorizer: &dyn Authorizer,
    request: &AccessRequest<'_>,
) -> Result<PolicyDecision, Error> {
    let verdict = authorizer.decide(request);
    match verdict.decision {
        Decision::Allow => Ok(PolicyDecision {
            policies: verdict.policies,
        }),
        Decision::Deny => Err(Error::Denied {
            policies: verdict.policies,
        }),
    }
}

/// Authorizers that weaken security, for measurement and for tests of the key service.
pub mod danger {
    use super::{AccessRequest, Authorizer, Verdict};

    /// Allows every caller the transport authenticated to use any enabled key, whatever the
    /// policies say. For tests of the key service and `kms serve --dev --no-policy`
    /// measurements; servers decide with Cedar policies
    /// ([`crate::governance::policy::CedarAuthorizer`]).
    #[derive(Clone, Copy, Debug, Default)]
    pub struct AllowAuthenticated;

    impl Authorizer for AllowAuthenticated {
        fn decide(&self, _request: &AccessRequest<'_>) -> Verdict {
            Verdict::allow(Vec::new())
        }
    }
}

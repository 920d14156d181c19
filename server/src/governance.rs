//! Who may call the data plane: trust bundles, the workload inventory and the policies, and
//! the step every data-plane request takes through them before any key is looked at.

use std::sync::Arc;

use kms_core::governance::approvals::Approvals;
use kms_core::governance::grants::{GrantDenial, Grants};
use kms_core::governance::inventory::Inventory;
use kms_core::governance::operators::Operators;
use kms_core::governance::policy::Policies;
use kms_core::governance::spiffe::SpiffeId;
use kms_core::{AuthMethod, Caller, Clock, GrantFacts, Principal, Store};
use rustls_pki_types::CertificateDer;
use tonic::codegen::http::HeaderMap;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::authn::{AuthFailure, Authenticator, BundleSource};
// Refused registrations get the answer of an unknown key, so they learn no more.
use crate::data::NOT_FOUND_OR_DENIED;

/// The header in which a workload may declare why it makes a request (a key-access
/// justification); policies can require it and allow-list its values.
pub const PURPOSE_HEADER: &str = "kms-purpose";

/// The header in which a grantee presents a task grant's token.
pub const GRANT_HEADER: &str = "kms-grant";

/// Longest declared purpose.
pub const MAX_PURPOSE: usize = 256;

/// What a refused caller is told when its credential is not accepted. The reason is in the
/// audit record, not on the wire.
const NOT_AUTHENTICATED: &str = "workload identity not accepted";

/// Everything that governs the data plane's callers.
pub struct Governance {
    /// Registered workloads.
    pub inventory: Arc<Inventory>,
    /// Cedar policies.
    pub policies: Arc<Policies>,
    /// Task grants.
    pub grants: Arc<Grants>,
    /// Trust bundles and certificate checks.
    pub authn: Arc<Authenticator>,
    /// Registered operators: who may use the admin plane, with which role.
    pub operators: Arc<Operators>,
    /// Approval rules and requests: gated admin changes wait here for M approvals.
    pub approvals: Arc<Approvals>,
    /// Serialises approval steps, so that a quorum runs its change once.
    pub approval_lock: tokio::sync::Mutex<()>,
    /// Where bundles are stored.
    pub store: Arc<dyn Store>,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Random ids (approval requests).
    pub rng: Arc<dyn kms_core::Rng>,
    /// The shortest waiting period a key destruction may be scheduled with, in days.
    pub min_destroy_waiting_days: u32,
    /// The non-secret settings a backup bundle carries (`[approvals]`, `[inventory]`, ...).
    pub deployment_settings: serde_json::Value,
}

impl std::fmt::Debug for Governance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governance")
            .field("inventory", &self.inventory)
            .field("policies", &self.policies)
            .field("authn", &self.authn)
            .finish_non_exhaustive()
    }
}

/// A data-plane caller whose credential the gate verified; the request carries it to the
/// service in its extensions.
#[derive(Clone, Debug)]
pub(crate) struct Authenticated {
    pub(crate) id: SpiffeId,
    pub(crate) method: AuthMethod,
}

/// A data-plane request refused before any key was looked at.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The verified identity, or the claimed one, or none.
    pub(crate) principal: Principal,
    pub(crate) auth: &'static str,
    pub(crate) reason: &'static str,
    pub(crate) status: Status,
}

impl Governance {
    /// Why no gated change can run now, if too few operators are registered: a change needs
    /// M approvals from operators other than its requester, so M + 1 active operators.
    pub fn quorum_warning(&self) -> Option<String> {
        let now = self.clock.now_unix();
        let operators = self
            .operators
            .count_with(kms_core::governance::operators::Role::Operator, now);
        let required = self.approvals.rules().required;
        let needed = usize::try_from(required)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        (operators < needed).then(|| {
            format!(
                "only {operators} active operator(s) registered: a gated change needs \
                 {required} approval(s) from operators other than its requester, so at least \
                 {needed} must be registered; until then no gated change can run"
            )
        })
    }

    /// Loads the stored trust bundles into the authenticator.
    pub fn load_bundles(&self) -> Result<(), crate::Error> {
        let stored =
            kms_core::governance::trust::list(self.store.as_ref()).map_err(crate::Error::Core)?;
        let sources: Vec<BundleSource> = stored
            .into_iter()
            .map(|b| BundleSource {
                trust_domain: b.trust_domain,
                pem: b.pem,
                jwks: b.jwks,
            })
            .collect();
        self.authn
            .set_bundles(&sources)
            .map_err(crate::Error::TrustBundle)
    }

    /// Authenticates a data-plane caller from what the connection and the headers carry: its
    /// X.509-SVID (verified against its trust domain's bundle), or failing that a JWT-SVID in
    /// `authorization: Bearer ...`. Runs in the gate, before the request's body is read.
    pub(crate) fn authenticate(
        &self,
        certs: Option<&[CertificateDer<'_>]>,
        headers: &HeaderMap,
    ) -> Result<Authenticated, Refusal> {
        let certs = certs.filter(|c| !c.is_empty());
        let bearer = match certs {
            Some(_) => None,
            None => bearer_token(headers),
        };
        let method = if bearer.is_some() {
            AuthMethod::Jwt
        } else {
            AuthMethod::Mtls
        };
        let authenticated = match bearer {
            Some(token) => self.authn.authenticate_jwt(token),
            None => self.authn.authenticate(certs),
        };
        match authenticated {
            Ok(id) => Ok(Authenticated { id, method }),
            Err(f) => {
                // Whom the credential claims to be, marked unverified: an auditor can see who
                // was turned away without taking the claim for the truth.
                let claimed = match &f {
                    AuthFailure::Untrusted { claimed } => Some(claimed.clone()),
                    AuthFailure::Missing => None,
                    _ => match bearer {
                        Some(token) => crate::authn::claimed_by_jwt(token),
                        None => certs.and_then(crate::authn::claimed_by_certificate),
                    },
                };
                Err(Refusal {
                    principal: claimed.map_or(Principal::Anonymous, Principal::Unverified),
                    auth: if matches!(f, AuthFailure::Missing) {
                        "none"
                    } else {
                        method.as_str()
                    },
                    reason: f.reason(),
                    status: Status::unauthenticated(NOT_AUTHENTICATED),
                })
            }
        }
    }

    /// Admits an authenticated data-plane caller: covered by an active, unexpired
    /// registration; and, if it presents a grant, a grant that is its own, live, from a
    /// creator still registered, with `uses` uses left (reserved here; give back what was not
    /// used with [`Governance::release`]).
    pub(crate) fn identify(
        &self,
        who: Authenticated,
        metadata: &MetadataMap,
        uses: u64,
    ) -> Result<Caller, Refusal> {
        let Authenticated { id, method } = who;
        // Built only for a refusal: the accepted path does not copy the identity.
        let principal = || Principal::Workload(id.clone());
        let now = self.clock.now_unix();
        let workload = self.inventory.admit(&id, now).map_err(|d| Refusal {
            principal: principal(),
            auth: method.as_str(),
            reason: d.reason(),
            status: Status::permission_denied(NOT_FOUND_OR_DENIED),
        })?;
        let purpose = declared_purpose(metadata).map_err(|status| Refusal {
            principal: principal(),
            auth: method.as_str(),
            reason: "request.invalid_purpose",
            status,
        })?;
        let grant = match metadata.get(GRANT_HEADER) {
            None => None,
            Some(token) => Some(self.admit_grant(token, &id, now, uses)?),
        };
        Ok(Caller {
            id,
            method,
            workload: Some(workload),
            purpose,
            grant,
        })
    }

    /// Checks a presented grant token for `id` at `now`: its tag, that it is `id`'s own,
    /// live, from a creator still registered; then reserves `uses` of it.
    fn admit_grant(
        &self,
        token: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        id: &SpiffeId,
        now: u64,
        uses: u64,
    ) -> Result<GrantFacts, Refusal> {
        let refuse = |reason: &'static str, status: Status| Refusal {
            principal: Principal::Workload(id.clone()),
            auth: "grant",
            reason,
            status,
        };
        let denied = |reason| refuse(reason, Status::permission_denied(NOT_FOUND_OR_DENIED));
        let token = token
            .to_str()
            .map_err(|_| denied(GrantDenial::Invalid.reason()))?;
        let grant = self
            .grants
            .admit(token, id, now)
            .map_err(|d| denied(d.reason()))?;
        let creator_workload = self
            .inventory
            .admit(&grant.creator, now)
            .map_err(|_| denied("grant.creator_inactive"))?;
        match self.grants.reserve_uses(&grant, uses) {
            Ok(Ok(())) => {}
            Ok(Err(d)) => return Err(denied(d.reason())),
            Err(e) => {
                tracing::error!(error = %e, "grant use could not be recorded");
                return Err(refuse(
                    "grant.use_not_recorded",
                    Status::unavailable("grant use could not be recorded; retry"),
                ));
            }
        }
        Ok(GrantFacts {
            grant,
            creator_workload: Some(creator_workload),
            reserved: uses,
        })
    }

    /// Gives back `n` of the grant uses reserved for this request, for parts that did not
    /// succeed.
    pub(crate) fn release(&self, caller: &Caller, n: u64) {
        if let Some(g) = &caller.grant {
            if let Err(e) = self.grants.release_uses(&g.grant, n.min(g.reserved)) {
                tracing::warn!(error = %e, grant = %g.grant.id, "unused grant uses could not be given back");
            }
        }
    }

    /// Counts one call by an admitted caller.
    pub(crate) fn note_call(&self, caller: &Caller, action: &str) {
        if let Some(w) = &caller.workload {
            self.inventory
                .note_call(&w.selector, action, self.clock.now_unix());
        }
    }
}

/// The token of an `authorization: Bearer ...` header, if there is one.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

fn declared_purpose(metadata: &MetadataMap) -> Result<Option<String>, Status> {
    let Some(value) = metadata.get(PURPOSE_HEADER) else {
        return Ok(None);
    };
    let bad = || {
        Status::invalid_argument(format!(
            "invalid {PURPOSE_HEADER} header: 1-{MAX_PURPOSE} printable characters"
        ))
    };
    let text = value.to_str().map_err(|_| bad())?;
    if text.is_empty() || text.len() > MAX_PURPOSE || text.chars().any(char::is_control) {
        return Err(bad());
    }
    Ok(Some(text.to_owned()))
}

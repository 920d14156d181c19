//! Admin-plane calls that govern the data plane: trust bundles, the workload inventory and
//! policies. Every change passes the `Approvals` seam, is recorded as requested before it is
//! made and with its outcome (SHA-256 of the object before and after) once it is.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use api::v1::{
    GetPolicyRequest, ListPoliciesRequest, ListPoliciesResponse, ListTrustBundlesRequest,
    ListTrustBundlesResponse, ListWorkloadsRequest, ListWorkloadsResponse, PolicyInfo,
    PolicyRequest, PutPolicyRequest, RegisterWorkloadRequest, SetTrustBundleRequest,
    TestPolicyRequest, TestPolicyResponse, TrustBundle, TrustDomainRequest, UpdateWorkloadRequest,
    WorkloadInfo, WorkloadRequest,
};
use api::v1::{
    GrantInfo, ListGrantsRequest, ListGrantsResponse, RevokeGrantsRequest, RevokeGrantsResponse,
};
use kms_core::approvals::ChangeRequest;
use kms_core::audit::{object_hash, AuditEvent};
use kms_core::grants::Grant;
use kms_core::inventory::{NewWorkload, Selector, Usage, Workload, WorkloadFilter, WorkloadUpdate};
use kms_core::policy::PolicyVersion;
use kms_core::trust::TrustBundleRecord;
use kms_core::{
    AccessRequest, AuthMethod, Caller, Decision, EncryptionContext, KeyState, Labels, Op,
    PrincipalId,
};
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::admin::{to_status, AdminService};
use crate::audit::{status_word, tag};
use crate::authn::{parse_bundle, parse_jwks};
use crate::data::key_ref;
use crate::governance::Governance;
use crate::identity::principal;

/// Largest ListWorkloads page.
const MAX_PAGE: usize = 1000;
/// ListWorkloads page size when the caller gives none.
const DEFAULT_PAGE: usize = 100;

fn core<T>(r: Result<T, kms_core::Error>) -> Result<T, Status> {
    r.map_err(|e| to_status(&e))
}

/// What a change did: the object before (if it existed) and after, and the answer.
struct Changed<B, T> {
    before: Option<B>,
    after: Option<B>,
    answer: T,
}

impl AdminService {
    /// Runs one governance change through approvals and the audit log.
    async fn gov_change<R, B, T, F>(
        &self,
        action: &'static str,
        request: &Request<R>,
        target: String,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        B: Serialize + Send + 'static,
        T: Send + 'static,
        F: FnOnce(&Governance, &str) -> Result<Changed<B, T>, Status> + Send + 'static,
    {
        let operator = principal(request)?.to_string();
        let request_id = self.audit.request_id(request.metadata());
        let mut intent = AuditEvent::new(action, "requested");
        intent.principal = Some(operator.clone());
        intent.auth = Some("mtls".into());
        intent.request_id = Some(request_id.clone());
        intent.detail.insert("target".into(), target.clone());
        self.audit.record(intent.clone()).await?;

        let approved = self.gov.approvals.approve(&ChangeRequest {
            operator: &operator,
            action,
            target: &target,
        });
        let result = match approved {
            Err(e) => Err(to_status(&e)),
            Ok(()) => {
                let gov = self.gov.clone();
                let who = operator.clone();
                tokio::task::spawn_blocking(move || f(&gov, &who))
                    .await
                    .map_err(|_| Status::internal("internal error"))?
            }
        };

        let mut done = intent;
        done.status = status_word(result.as_ref().err());
        if let Ok(changed) = &result {
            done.before = changed.before.as_ref().and_then(object_hash);
            done.after = changed.after.as_ref().and_then(object_hash);
        }
        match &result {
            Ok(_) => tracing::info!(op = action, %operator, %target, "admin change done"),
            Err(s) => {
                tracing::info!(op = action, %operator, %target, code = ?s.code(), "admin change refused")
            }
        }
        if self.audit.record(done).await.is_err() {
            tracing::error!(op = action, %operator, "admin change outcome could not be audited");
        }
        result.map(|c| tag(Response::new(c.answer), &request_id))
    }

    /// Runs one governance read, recorded with who read what.
    async fn gov_read<R, T, F>(
        &self,
        action: &'static str,
        request: &Request<R>,
        target: String,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Governance) -> Result<T, Status> + Send + 'static,
    {
        let mut event = AuditEvent::default();
        if !target.is_empty() {
            event.detail.insert("target".into(), target);
        }
        let gov = self.gov.clone();
        self.read(action, request, event, move |_, _| f(&gov)).await
    }

    pub(crate) async fn set_trust_bundle_impl(
        &self,
        request: Request<SetTrustBundleRequest>,
    ) -> Result<Response<TrustBundle>, Status> {
        let req = request.get_ref().clone();
        core(kms_core::trust::check_trust_domain(&req.trust_domain))?;
        if req.pem.trim().is_empty() && req.jwks.trim().is_empty() {
            return Err(Status::invalid_argument(
                "a trust bundle needs CA certificates (pem), a JWKS (jwks), or both",
            ));
        }
        if !req.pem.trim().is_empty() {
            parse_bundle(&req.pem)
                .map_err(|e| Status::invalid_argument(format!("invalid trust bundle: {e}")))?;
        }
        if !req.jwks.trim().is_empty() {
            parse_jwks(&req.jwks)
                .map_err(|e| Status::invalid_argument(format!("invalid JWKS: {e}")))?;
        }
        let target = req.trust_domain.clone();
        self.gov_change("admin.SetTrustBundle", &request, target, move |gov, who| {
            let store = gov.store.as_ref();
            let before = core(kms_core::trust::get(store, &req.trust_domain))?;
            let record = TrustBundleRecord {
                trust_domain: req.trust_domain,
                pem: req.pem,
                jwks: (!req.jwks.trim().is_empty()).then_some(req.jwks),
                updated_at: gov.clock.now_unix(),
                updated_by: who.to_owned(),
            };
            core(kms_core::trust::put(store, &record))?;
            reload_bundles(gov)?;
            Ok(Changed {
                before,
                after: Some(record.clone()),
                answer: bundle_info(&record),
            })
        })
        .await
    }

    pub(crate) async fn delete_trust_bundle_impl(
        &self,
        request: Request<TrustDomainRequest>,
    ) -> Result<Response<TrustBundle>, Status> {
        let domain = request.get_ref().trust_domain.clone();
        core(kms_core::trust::check_trust_domain(&domain))?;
        self.gov_change(
            "admin.DeleteTrustBundle",
            &request,
            domain.clone(),
            move |gov, _| {
                let store = gov.store.as_ref();
                let before = core(kms_core::trust::get(store, &domain))?.ok_or_else(|| {
                    Status::not_found(format!("no trust bundle for trust domain {domain}"))
                })?;
                core(kms_core::trust::delete(store, &domain))?;
                reload_bundles(gov)?;
                Ok(Changed {
                    answer: bundle_info(&before),
                    before: Some(before),
                    after: None,
                })
            },
        )
        .await
    }

    pub(crate) async fn list_trust_bundles_impl(
        &self,
        request: Request<ListTrustBundlesRequest>,
    ) -> Result<Response<ListTrustBundlesResponse>, Status> {
        self.gov_read("admin.ListTrustBundles", &request, String::new(), |gov| {
            let bundles = core(kms_core::trust::list(gov.store.as_ref()))?
                .iter()
                .map(bundle_info)
                .collect();
            Ok(ListTrustBundlesResponse { bundles })
        })
        .await
    }

    pub(crate) async fn register_workload_impl(
        &self,
        request: Request<RegisterWorkloadRequest>,
    ) -> Result<Response<WorkloadInfo>, Status> {
        let req = request.get_ref().clone();
        let selector = selector(&req.selector)?;
        let labels = core(Labels::from_pairs(req.labels))?;
        if req.expires_at == 0 {
            return Err(Status::invalid_argument(
                "expires_at is required (seconds since the Unix epoch)",
            ));
        }
        let new = NewWorkload {
            selector: selector.clone(),
            owner: req.owner,
            purpose: req.purpose,
            labels,
            expires_at: req.expires_at,
        };
        self.gov_change(
            "admin.RegisterWorkload",
            &request,
            selector.to_string(),
            move |gov, who| {
                let w = core(gov.inventory.register(new, who))?;
                Ok(Changed {
                    before: None,
                    after: Some(Workload::clone(&w)),
                    answer: workload_info(&w, gov.inventory.usage(&w.selector)),
                })
            },
        )
        .await
    }

    pub(crate) async fn update_workload_impl(
        &self,
        request: Request<UpdateWorkloadRequest>,
    ) -> Result<Response<WorkloadInfo>, Status> {
        let req = request.get_ref().clone();
        let selector = selector(&req.selector)?;
        let update = WorkloadUpdate {
            owner: req.owner,
            purpose: req.purpose,
            labels: if req.replace_labels || !req.labels.is_empty() {
                Some(core(Labels::from_pairs(req.labels))?)
            } else {
                None
            },
            expires_at: (req.expires_at != 0).then_some(req.expires_at),
        };
        self.gov_change(
            "admin.UpdateWorkload",
            &request,
            selector.to_string(),
            move |gov, who| {
                let (before, after) = core(gov.inventory.update(&selector, update, who))?;
                Ok(Changed {
                    before: Some(Workload::clone(&before)),
                    after: Some(Workload::clone(&after)),
                    answer: workload_info(&after, gov.inventory.usage(&after.selector)),
                })
            },
        )
        .await
    }

    pub(crate) async fn deactivate_workload_impl(
        &self,
        request: Request<WorkloadRequest>,
    ) -> Result<Response<WorkloadInfo>, Status> {
        let selector = selector(&request.get_ref().selector)?;
        self.gov_change(
            "admin.DeactivateWorkload",
            &request,
            selector.to_string(),
            move |gov, who| {
                let (before, after) = core(gov.inventory.deactivate(&selector, who))?;
                Ok(Changed {
                    before: Some(Workload::clone(&before)),
                    after: Some(Workload::clone(&after)),
                    answer: workload_info(&after, gov.inventory.usage(&after.selector)),
                })
            },
        )
        .await
    }

    pub(crate) async fn describe_workload_impl(
        &self,
        request: Request<WorkloadRequest>,
    ) -> Result<Response<WorkloadInfo>, Status> {
        let selector = selector(&request.get_ref().selector)?;
        self.gov_read(
            "admin.DescribeWorkload",
            &request,
            selector.to_string(),
            move |gov| {
                let w = core(gov.inventory.get(&selector))?;
                Ok(workload_info(&w, gov.inventory.usage(&w.selector)))
            },
        )
        .await
    }

    pub(crate) async fn list_workloads_impl(
        &self,
        request: Request<ListWorkloadsRequest>,
    ) -> Result<Response<ListWorkloadsResponse>, Status> {
        let req = request.get_ref().clone();
        let limit = match usize::try_from(req.page_size).unwrap_or(MAX_PAGE) {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let label = match req.label.split_once('=') {
            Some((k, v)) => Some((k.to_owned(), v.to_owned())),
            None if req.label.is_empty() => None,
            None => return Err(Status::invalid_argument("label filter must be key=value")),
        };
        let filter = WorkloadFilter {
            owner: (!req.owner.is_empty()).then_some(req.owner),
            label,
            expiring_before: (req.expiring_before != 0).then_some(req.expiring_before),
            include_inactive: req.include_inactive,
        };
        let after = (!req.page_token.is_empty()).then_some(req.page_token);
        self.gov_read("admin.ListWorkloads", &request, String::new(), move |gov| {
            let (page, more) = gov.inventory.list(&filter, after.as_deref(), limit);
            let next_page_token = match (more, page.last()) {
                (true, Some(last)) => last.selector.clone(),
                _ => String::new(),
            };
            Ok(ListWorkloadsResponse {
                workloads: page
                    .iter()
                    .map(|w| workload_info(w, gov.inventory.usage(&w.selector)))
                    .collect(),
                next_page_token,
            })
        })
        .await
    }

    pub(crate) async fn put_policy_impl(
        &self,
        request: Request<PutPolicyRequest>,
    ) -> Result<Response<PolicyInfo>, Status> {
        let req = request.get_ref().clone();
        self.gov_change(
            "admin.PutPolicy",
            &request,
            req.id.clone(),
            move |gov, who| {
                let (version, before) = core(gov.policies.put(&req.id, &req.text, who))?;
                Ok(Changed {
                    before,
                    after: Some(version.clone()),
                    answer: policy_info(&req.id, &version),
                })
            },
        )
        .await
    }

    pub(crate) async fn get_policy_impl(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PolicyInfo>, Status> {
        let req = request.get_ref().clone();
        self.gov_read("admin.GetPolicy", &request, req.id.clone(), move |gov| {
            let version = (req.version != 0).then_some(req.version);
            let v = core(gov.policies.get(&req.id, version))?;
            Ok(policy_info(&req.id, &v))
        })
        .await
    }

    pub(crate) async fn list_policies_impl(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let include_deleted = request.get_ref().include_deleted;
        self.gov_read("admin.ListPolicies", &request, String::new(), move |gov| {
            let policies = gov
                .policies
                .list()
                .iter()
                .filter_map(|h| {
                    let last = h.versions.last()?;
                    (include_deleted || !last.deleted).then(|| policy_info(&h.id, last))
                })
                .collect();
            Ok(ListPoliciesResponse { policies })
        })
        .await
    }

    pub(crate) async fn delete_policy_impl(
        &self,
        request: Request<PolicyRequest>,
    ) -> Result<Response<PolicyInfo>, Status> {
        let id = request.get_ref().id.clone();
        self.gov_change(
            "admin.DeletePolicy",
            &request,
            id.clone(),
            move |gov, who| {
                let removed = core(gov.policies.delete(&id, who))?;
                Ok(Changed {
                    answer: policy_info(&id, &removed),
                    before: Some(removed),
                    after: None::<PolicyVersion>,
                })
            },
        )
        .await
    }

    pub(crate) async fn list_grants_impl(
        &self,
        request: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let req = request.get_ref().clone();
        let key = match req.key.is_empty() {
            true => None,
            false => Some(core(self.kms.describe_key(&key_ref(&req.key)?))?.id),
        };
        self.gov_read("admin.ListGrants", &request, String::new(), move |gov| {
            let now = gov.clock.now_unix();
            let grants = gov
                .grants
                .list(|g| {
                    (req.creator.is_empty() || g.creator == req.creator)
                        && (req.grantee.is_empty() || g.grantee == req.grantee)
                        && key.is_none_or(|k| g.key_id == k)
                        && (req.include_inactive || (g.revoked.is_none() && g.expires_at > now))
                })
                .iter()
                .map(|g| grant_info(g, gov.grants.uses(&g.id)))
                .collect();
            Ok(ListGrantsResponse { grants })
        })
        .await
    }

    pub(crate) async fn revoke_grants_impl(
        &self,
        request: Request<RevokeGrantsRequest>,
    ) -> Result<Response<RevokeGrantsResponse>, Status> {
        let req = request.get_ref().clone();
        let given = [&req.grant_id, &req.creator, &req.key]
            .iter()
            .filter(|f| !f.is_empty())
            .count();
        if given != 1 {
            return Err(Status::invalid_argument(
                "give exactly one of grant_id, creator or key",
            ));
        }
        let key = match req.key.is_empty() {
            true => None,
            false => Some(core(self.kms.describe_key(&key_ref(&req.key)?))?.id),
        };
        let target = format!(
            "{}{}{}",
            req.grant_id,
            req.creator,
            key.map(|k| k.to_string()).unwrap_or_default()
        );
        self.gov_change("admin.RevokeGrants", &request, target, move |gov, who| {
            let revoked = core(gov.grants.revoke_where(who, |g| {
                (!req.grant_id.is_empty() && g.id == req.grant_id)
                    || (!req.creator.is_empty() && g.creator == req.creator)
                    || key.is_some_and(|k| g.key_id == k)
            }))?;
            if !req.grant_id.is_empty() && revoked.is_empty() {
                return Err(Status::not_found(format!("no live grant {}", req.grant_id)));
            }
            let ids: Vec<String> = revoked.iter().map(|g| g.id.clone()).collect();
            Ok(Changed {
                before: Some(ids.clone()),
                after: None,
                answer: RevokeGrantsResponse { revoked: ids },
            })
        })
        .await
    }

    pub(crate) async fn policy_stats_impl(
        &self,
        request: Request<api::v1::PolicyStatsRequest>,
    ) -> Result<Response<api::v1::PolicyStatsResponse>, Status> {
        let reset = request.get_ref().reset;
        self.gov_read("admin.PolicyStats", &request, String::new(), move |gov| {
            let s = gov.policies.eval_stats(reset);
            Ok(api::v1::PolicyStatsResponse {
                evaluations: s.count,
                p50_ns: s.p50_ns,
                p99_ns: s.p99_ns,
                p999_ns: s.p999_ns,
                max_ns: s.max_ns,
                statements: u64::try_from(gov.policies.statement_count()).unwrap_or(u64::MAX),
                cached_decisions: s.cached,
                decision_p50_ns: s.decision_p50_ns,
                decision_p99_ns: s.decision_p99_ns,
                decision_max_ns: s.decision_max_ns,
            })
        })
        .await
    }

    pub(crate) async fn key_coverage_impl(
        &self,
        request: Request<api::v1::KeyCoverageRequest>,
    ) -> Result<Response<api::v1::KeyCoverageResponse>, Status> {
        let include_disabled = request.get_ref().include_disabled;
        let kms = self.kms.clone();
        self.gov_read("admin.KeyCoverage", &request, String::new(), move |gov| {
            let now = gov.clock.now_unix();
            let registrations: Vec<Arc<Workload>> = gov
                .inventory
                .all()
                .into_iter()
                .filter(|w| w.active && now < w.expires_at)
                .collect();
            let mut keys_checked = 0u64;
            let mut unusable_keys = Vec::new();
            let mut after = None;
            loop {
                let (page, next) = kms.list_keys(after, MAX_PAGE);
                for key in &page {
                    if key.state != KeyState::Enabled && !include_disabled {
                        continue;
                    }
                    keys_checked += 1;
                    let mut usable = false;
                    for w in &registrations {
                        if core(gov.policies.may_use(w, key))? {
                            usable = true;
                            break;
                        }
                    }
                    if !usable {
                        unusable_keys.push(crate::admin::metadata(key));
                    }
                }
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            Ok(api::v1::KeyCoverageResponse {
                keys_checked,
                registrations: u64::try_from(registrations.len()).unwrap_or(u64::MAX),
                unusable_keys,
            })
        })
        .await
    }

    pub(crate) async fn test_policy_impl(
        &self,
        request: Request<TestPolicyRequest>,
    ) -> Result<Response<TestPolicyResponse>, Status> {
        let req = request.get_ref().clone();
        let id: kms_core::spiffe::SpiffeId = req
            .principal
            .parse()
            .map_err(|e| Status::invalid_argument(format!("invalid principal: {e}")))?;
        let op = match req.action.as_str() {
            "GenerateDataKey" => Op::GenerateDataKey,
            "Decrypt" => Op::Decrypt,
            "Encrypt" => Op::Encrypt,
            "ReEncrypt" => Op::ReEncrypt,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown action {other:?}: GenerateDataKey, Decrypt, Encrypt or ReEncrypt"
                )))
            }
        };
        let method = match req.auth_method.as_str() {
            "" | "mtls" => AuthMethod::Mtls,
            "jwt" => AuthMethod::Jwt,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown auth method {other:?}: mtls or jwt"
                )))
            }
        };
        let key = key_ref(&req.key)?;
        let context =
            EncryptionContext::from_pairs(req.encryption_context).map_err(|e| to_status(&e))?;
        let purpose = (!req.purpose.is_empty()).then_some(req.purpose);
        let kms = self.kms.clone();
        self.gov_read(
            "admin.TestPolicy",
            &request,
            req.principal.clone(),
            move |gov| {
                let record = core(kms.describe_key(&key))?;
                let now = if req.at == 0 {
                    gov.clock.now_unix()
                } else {
                    req.at
                };
                let (workload, denial) = match gov.inventory.admit(&id, now) {
                    Ok(w) => (Some(w), None),
                    Err(d) => (None, Some(d)),
                };
                let matched_selector = workload
                    .as_ref()
                    .map(|w| w.selector.clone())
                    .unwrap_or_default();
                let caller = Caller {
                    id: PrincipalId::new(id.to_string()),
                    method,
                    workload,
                    purpose,
                    grant: None,
                };
                let verdict = gov.policies.evaluate(&AccessRequest {
                    caller: &caller,
                    op,
                    key: &record,
                    context: &context,
                    now_unix: now,
                });
                let allowed = denial.is_none() && verdict.decision == Decision::Allow;
                Ok(TestPolicyResponse {
                    decision: if allowed { "allow" } else { "deny" }.into(),
                    policies: verdict.policies,
                    identity_denial: denial.map(|d| d.reason().to_owned()).unwrap_or_default(),
                    matched_selector,
                    key_id: record.id.to_string(),
                })
            },
        )
        .await
    }
}

fn grant_info(g: &Grant, uses: u64) -> GrantInfo {
    GrantInfo {
        grant_id: g.id.clone(),
        creator: g.creator.clone(),
        grantee: g.grantee.clone(),
        key_id: g.key_id.to_string(),
        operations: g.operations.clone(),
        required_context: g.required_context.clone().into_iter().collect(),
        created_at: g.created_at,
        expires_at: g.expires_at,
        max_uses: g.max_uses.unwrap_or(0),
        uses,
        revoked_at: g.revoked.as_ref().map_or(0, |r| r.at),
        revoked_by: g.revoked.as_ref().map(|r| r.by.clone()).unwrap_or_default(),
    }
}

fn reload_bundles(gov: &Governance) -> Result<(), Status> {
    gov.load_bundles().map_err(|e| {
        tracing::error!(error = %e, "trust bundles could not be reloaded");
        Status::internal("trust bundles could not be reloaded")
    })
}

fn selector(s: &str) -> Result<Selector, Status> {
    Selector::from_str(s).map_err(|e| to_status(&e))
}

fn bundle_info(b: &TrustBundleRecord) -> TrustBundle {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    TrustBundle {
        trust_domain: b.trust_domain.clone(),
        pem: b.pem.clone(),
        certificates: count(parse_bundle(&b.pem).map_or(0, |a| a.len())),
        updated_at: b.updated_at,
        updated_by: b.updated_by.clone(),
        jwks: b.jwks.clone().unwrap_or_default(),
        jwt_keys: count(
            b.jwks
                .as_deref()
                .and_then(|j| parse_jwks(j).ok())
                .map_or(0, |s| s.keys.len()),
        ),
    }
}

fn workload_info(w: &Workload, usage: Usage) -> WorkloadInfo {
    WorkloadInfo {
        selector: w.selector.clone(),
        owner: w.owner.clone(),
        purpose: w.purpose.clone(),
        labels: w
            .labels
            .entries()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        expires_at: w.expires_at,
        active: w.active,
        created_at: w.created_at,
        created_by: w.created_by.clone(),
        updated_at: w.updated_at,
        updated_by: w.updated_by.clone(),
        reviewed_at: w.reviewed_at,
        last_seen: usage.last_seen,
        calls: usage.calls.into_iter().collect::<HashMap<_, _>>(),
    }
}

fn policy_info(id: &str, v: &PolicyVersion) -> PolicyInfo {
    PolicyInfo {
        id: id.to_owned(),
        version: v.version,
        text: v.text.clone(),
        deleted: v.deleted,
        created_at: v.created_at,
        created_by: v.created_by.clone(),
    }
}

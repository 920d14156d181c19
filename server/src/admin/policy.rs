//! Cedar policies: versioned put, get, list, delete; decision tests; decision statistics.

use api::v1::{
    GetPolicyRequest, ListPoliciesRequest, ListPoliciesResponse, PolicyInfo, PolicyRequest,
    PolicyStatsRequest, PolicyStatsResponse, PutPolicyRequest, TestPolicyRequest,
    TestPolicyResponse,
};
use kms_core::governance::actions::AdminAction;
use kms_core::governance::policy::PolicyVersion;
use kms_core::governance::spiffe::SpiffeId;
use kms_core::{AccessRequest, AuthMethod, Caller, Decision, EncryptionContext, Op};
use tonic::{Request, Response, Status};

use super::{core, key_ref, AdminService, Changed};
use crate::governance::Governance;

/// What approvers see of a policy change: the current text against `to`.
fn unified_diff(current: &str, to: &str, label: &str) -> String {
    similar::TextDiff::from_lines(current, to)
        .unified_diff()
        .header("current", label)
        .to_string()
}

pub(super) fn apply_put(
    gov: &Governance,
    req: PutPolicyRequest,
    who: &str,
) -> Result<Changed<PolicyVersion, PolicyInfo>, Status> {
    let (version, before) = core(gov.policies.put(&req.id, &req.text, who))?;
    Ok(Changed {
        before,
        after: Some(version.clone()),
        answer: policy_info(&req.id, &version),
    })
}

pub(super) async fn put(
    svc: &AdminService,
    request: Request<PutPolicyRequest>,
) -> Result<Response<PolicyInfo>, Status> {
    let req = request.get_ref().clone();
    core(svc.gov.policies.check(&req.id, &req.text))?;
    let current = svc
        .gov
        .policies
        .get(&req.id, None)
        .map(|v| v.text)
        .unwrap_or_default();
    let diff = unified_diff(&current, &req.text, "requested");
    let view = serde_json::json!({ "id": req.id, "text": req.text });
    svc.gov_change(
        AdminAction::PutPolicy,
        &request,
        req.id.clone(),
        view,
        Some(diff),
        move |gov, who| apply_put(gov, req, who),
    )
    .await
}

pub(super) async fn get(
    svc: &AdminService,
    request: Request<GetPolicyRequest>,
) -> Result<Response<PolicyInfo>, Status> {
    let req = request.get_ref().clone();
    svc.gov_read(
        AdminAction::GetPolicy,
        &request,
        req.id.clone(),
        move |gov| {
            let version = (req.version != 0).then_some(req.version);
            let v = core(gov.policies.get(&req.id, version))?;
            Ok(policy_info(&req.id, &v))
        },
    )
    .await
}

pub(super) async fn list(
    svc: &AdminService,
    request: Request<ListPoliciesRequest>,
) -> Result<Response<ListPoliciesResponse>, Status> {
    let include_deleted = request.get_ref().include_deleted;
    svc.gov_read(
        AdminAction::ListPolicies,
        &request,
        String::new(),
        move |gov| {
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
        },
    )
    .await
}

pub(super) fn apply_delete(
    gov: &Governance,
    req: PolicyRequest,
    who: &str,
) -> Result<Changed<PolicyVersion, PolicyInfo>, Status> {
    let removed = core(gov.policies.delete(&req.id, who))?;
    Ok(Changed {
        answer: policy_info(&req.id, &removed),
        before: Some(removed),
        after: None,
    })
}

pub(super) async fn delete(
    svc: &AdminService,
    request: Request<PolicyRequest>,
) -> Result<Response<PolicyInfo>, Status> {
    let req = request.get_ref().clone();
    let current = core(svc.gov.policies.get(&req.id, None))?;
    let diff = unified_diff(&current.text, "", "deleted");
    let view = serde_json::json!({ "id": req.id, "delete": true });
    svc.gov_change(
        AdminAction::DeletePolicy,
        &request,
        req.id.clone(),
        view,
        Some(diff),
        move |gov, who| apply_delete(gov, req, who),
    )
    .await
}

pub(super) async fn test(
    svc: &AdminService,
    request: Request<TestPolicyRequest>,
) -> Result<Response<TestPolicyResponse>, Status> {
    let req = request.get_ref().clone();
    let id: SpiffeId = req
        .principal
        .parse()
        .map_err(|e| Status::invalid_argument(format!("invalid principal: {e}")))?;
    let op = req
        .action
        .parse::<Op>()
        .ok()
        .filter(|op| op.is_key_use())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown action {:?}: GenerateDataKey, Decrypt, Encrypt or ReEncrypt",
                req.action
            ))
        })?;
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
    let context = core(EncryptionContext::from_pairs(req.encryption_context))?;
    let purpose = (!req.purpose.is_empty()).then_some(req.purpose);
    let kms = svc.kms.clone();
    svc.gov_read(
        AdminAction::TestPolicy,
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
                id: id.clone(),
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

pub(super) async fn stats(
    svc: &AdminService,
    request: Request<PolicyStatsRequest>,
) -> Result<Response<PolicyStatsResponse>, Status> {
    let reset = request.get_ref().reset;
    let stats = svc.stats.clone();
    svc.gov_read(
        AdminAction::PolicyStats,
        &request,
        String::new(),
        move |gov| {
            let s = stats.snapshot(reset);
            Ok(PolicyStatsResponse {
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
        },
    )
    .await
}

pub(super) fn policy_info(id: &str, v: &PolicyVersion) -> PolicyInfo {
    PolicyInfo {
        id: id.to_owned(),
        version: v.version,
        text: v.text.clone(),
        deleted: v.deleted,
        created_at: v.created_at,
        created_by: v.created_by.clone(),
        approval: None,
    }
}

//! M-of-N approvals on the admin plane (docs/APPROVALS.md): a gated change is stored as an
//! approval request, and runs, from its stored bytes, when the M-th operator other than its
//! requester approves it. The state machine is `kms_core::governance::approvals`; this module
//! stores, audits and runs.

use api::v1::{
    ApprovalId, ApprovalInfo, ApprovalRules as RulesInfo, ApprovalVote, GetApprovalRulesRequest,
    ListApprovalsRequest, ListApprovalsResponse, RejectChangeRequest, SetApprovalRulesRequest,
};
use kms_core::audit::{object_hash, AuditEvent};
use kms_core::governance::actions::{AdminAction, GatedAction};
use kms_core::governance::approvals::{
    ApprovalRequest, ApprovalRules, ApprovalState, NewRequest, Progress,
};
use kms_core::governance::operators::Role;
use kms_core::{Kms, OperatorId, Principal};
use prost::Message;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::{core, inventory, keys, operators, policy, seal, trust, AdminService, Changed};
use crate::audit::status_word;
use crate::governance::Governance;

/// A gated RPC's answer when its change waits for approvals: only `approval` is set.
pub(super) trait Pending: Default {
    fn pending(info: ApprovalInfo) -> Self;
}

macro_rules! pending {
    ($($t:ty),*) => {$(
        impl Pending for $t {
            fn pending(info: ApprovalInfo) -> Self {
                Self { approval: Some(info), ..Self::default() }
            }
        }
    )*};
}

pending!(
    api::v1::KeyMetadata,
    api::v1::PolicyInfo,
    api::v1::TrustBundle,
    api::v1::WorkloadInfo,
    api::v1::OperatorInfo,
    api::v1::ServiceStatus,
    RulesInfo
);

/// What running a stored request did: SHA-256 of the object before and after, and the object
/// after (or the one removed) as JSON.
pub(super) struct Ran {
    before: Option<String>,
    after: Option<String>,
    result: String,
}

impl<B: Serialize, T> From<Changed<B, T>> for Ran {
    fn from(c: Changed<B, T>) -> Self {
        let shown = match (&c.after, &c.before) {
            (Some(after), _) => serde_json::json!({ "after": after }),
            (None, Some(before)) => serde_json::json!({ "removed": before }),
            (None, None) => serde_json::json!({}),
        };
        Self {
            before: c.before.as_ref().and_then(object_hash),
            after: c.after.as_ref().and_then(object_hash),
            result: shown.to_string(),
        }
    }
}

fn decode<R: Message + Default>(bytes: &[u8]) -> Result<R, Status> {
    R::decode(bytes).map_err(|_| Status::internal("stored approval request does not decode"))
}

/// Runs a stored request as its requester. The match is exhaustive: a gated action that
/// nothing runs does not compile.
fn execute(kms: &Kms, gov: &Governance, r: &ApprovalRequest) -> Result<Ran, Status> {
    let (bytes, who) = (r.request.as_slice(), r.requested_by.as_str());
    Ok(match r.action {
        GatedAction::PutPolicy => policy::apply_put(gov, decode(bytes)?, who)?.into(),
        GatedAction::DeletePolicy => policy::apply_delete(gov, decode(bytes)?, who)?.into(),
        GatedAction::SetTrustBundle => trust::apply_set(gov, decode(bytes)?, who)?.into(),
        GatedAction::DeleteTrustBundle => trust::apply_delete(gov, decode(bytes)?, who)?.into(),
        GatedAction::RegisterWorkload => {
            inventory::apply_register(gov, decode(bytes)?, who)?.into()
        }
        GatedAction::UpdateWorkload => inventory::apply_update(gov, decode(bytes)?, who)?.into(),
        GatedAction::DeactivateWorkload => {
            inventory::apply_deactivate(gov, decode(bytes)?, who)?.into()
        }
        GatedAction::ReactivateWorkload => {
            inventory::apply_reactivate(gov, decode(bytes)?, who)?.into()
        }
        GatedAction::RegisterOperator => {
            operators::apply_register(gov, decode(bytes)?, who)?.into()
        }
        GatedAction::UpdateOperator => operators::apply_update(gov, decode(bytes)?, who)?.into(),
        GatedAction::DeactivateOperator => {
            operators::apply_deactivate(gov, decode(bytes)?, who)?.into()
        }
        GatedAction::SetApprovalRules => apply_set_rules(gov, decode(bytes)?, who)?.into(),
        GatedAction::Unseal => seal::apply_unseal(kms, decode(bytes)?, who)?.into(),
        GatedAction::ScheduleKeyDestruction => {
            let authority = kms_core::DestructionAuthority {
                requested_by: r.requested_by.clone(),
                approvers: r.approvals.iter().map(|v| v.operator.clone()).collect(),
                approval_id: Some(r.id.clone()),
            };
            keys::apply_schedule_destroy(kms, gov, decode(bytes)?, authority)?.into()
        }
        GatedAction::Reshare => Ran {
            before: None,
            after: None,
            result: super::custody::reshare_ticket_result(r, gov.clock.now_unix()),
        },
        GatedAction::ExportBackup => Ran {
            before: None,
            after: None,
            result: super::backup::ticket_result(r, gov.clock.now_unix()),
        },
    })
}

fn name_of(gov: &Governance, identity: &str) -> String {
    gov.operators
        .by_identity(identity)
        .map(|o| o.name.clone())
        .unwrap_or_default()
}

/// The wire form of a request.
pub(super) fn info(gov: &Governance, r: &ApprovalRequest) -> ApprovalInfo {
    ApprovalInfo {
        id: r.id.clone(),
        action: r.action.as_str().into(),
        target: r.target.clone(),
        hash: r.hash.clone(),
        view: r.view.clone(),
        diff: r.diff.clone().unwrap_or_default(),
        requested_by: r.requested_by.clone(),
        requested_by_name: name_of(gov, &r.requested_by),
        requested_at: r.requested_at,
        expires_at: r.expires_at,
        required: r.required,
        approvals: r
            .approvals
            .iter()
            .map(|v| ApprovalVote {
                operator: v.operator.clone(),
                name: name_of(gov, &v.operator),
                at: v.at,
            })
            .collect(),
        state: r.state.to_string(),
        ended_by: r.ended_by.clone().unwrap_or_default(),
        ended_at: r.ended_at.unwrap_or(0),
        reason: r.reason.clone().unwrap_or_default(),
        result: r.result.clone().unwrap_or_default(),
    }
}

/// An `approval.*` record of a step on `r`, made by `by`.
fn step_event(step: &str, r: &ApprovalRequest, by: &OperatorId) -> AuditEvent {
    let mut e = AuditEvent::new(format!("approval.{step}"), "ok")
        .with("approval_id", &r.id)
        .with("request_hash", &r.hash)
        .with("change", r.action.as_str())
        .with("target", &r.target)
        .with("requested_by", &r.requested_by);
    e.set_caller(Principal::Operator(by.clone()), "mtls");
    e
}

impl AdminService {
    /// Stores a gated change as a pending approval request and records it.
    pub(super) async fn propose(
        &self,
        operator: &OperatorId,
        new: NewRequest,
    ) -> Result<ApprovalRequest, Status> {
        let mut id = [0u8; 16];
        core(self.gov.rng.fill(&mut id))?;
        let rules = self.gov.approvals.rules();
        let now = self.gov.clock.now_unix();
        let req = ApprovalRequest::new(hex::encode(id), new, &rules, now);
        self.save(&req).await?;
        let mut event = step_event("requested", &req, operator);
        event
            .detail
            .insert("required".into(), req.required.to_string());
        event
            .detail
            .insert("expires_at".into(), req.expires_at.to_string());
        self.audit.record(event).await?;
        Ok(req)
    }

    /// Loads a request, marking (and recording) it expired if its time is up.
    async fn load(&self, id: &str, by: &OperatorId) -> Result<ApprovalRequest, Status> {
        let gov = self.gov.clone();
        let wanted = id.to_owned();
        let now = gov.clock.now_unix();
        let (req, expired) = tokio::task::spawn_blocking(move || {
            let mut req = core(gov.approvals.get(&wanted))?;
            let expired = req.expire_if_due(now);
            if expired {
                core(gov.approvals.save(&req))?;
            }
            Ok::<_, Status>((req, expired))
        })
        .await
        .map_err(|_| Status::internal("internal error"))??;
        if expired {
            self.audit.record(step_event("expired", &req, by)).await?;
        }
        Ok(req)
    }

    async fn save(&self, req: &ApprovalRequest) -> Result<(), Status> {
        let gov = self.gov.clone();
        let stored = req.clone();
        tokio::task::spawn_blocking(move || core(gov.approvals.save(&stored)))
            .await
            .map_err(|_| Status::internal("internal error"))?
    }

    /// One approval step: load the request, apply `step`, store and record it.
    async fn step<F>(
        &self,
        action: AdminAction,
        request: &Request<impl Sized>,
        id: &str,
        step: F,
    ) -> Result<Response<ApprovalInfo>, Status>
    where
        F: FnOnce(&mut ApprovalRequest, &str, u64) -> Result<&'static str, kms_core::Error>,
    {
        let (operator, mut intent) = self.intent(action, request)?;
        intent.detail.insert("approval_id".into(), id.to_owned());
        self.audit.record(intent.clone()).await?;
        let _serial = self.gov.approval_lock.lock().await;
        let result = async {
            let mut req = self.load(id, &operator).await?;
            let now = self.gov.clock.now_unix();
            let done = core(step(&mut req, operator.as_str(), now))?;
            self.save(&req).await?;
            self.audit.record(step_event(done, &req, &operator)).await?;
            Ok::<_, Status>(req)
        }
        .await;
        let mut done = intent;
        done.status = status_word(result.as_ref().err());
        self.outcome(done, &operator, &result).await;
        result.map(|r| Response::new(info(&self.gov, &r)))
    }
}

pub(super) async fn list(
    svc: &AdminService,
    request: Request<ListApprovalsRequest>,
) -> Result<Response<ListApprovalsResponse>, Status> {
    let state = request.get_ref().state.clone();
    let wanted = match state.as_str() {
        "" => None,
        s => Some(core(s.parse::<ApprovalState>())?),
    };
    let (operator, _) = svc.who(&request)?;
    // Expire what is due as it is read, so that a listing never shows a dead request as
    // pending: one scan, and a write only for what just expired.
    let all = {
        let _serial = svc.gov.approval_lock.lock().await;
        let gov = svc.gov.clone();
        let now = gov.clock.now_unix();
        let (all, expired) = tokio::task::spawn_blocking(move || {
            let mut all = core(gov.approvals.all())?;
            let mut expired = Vec::new();
            for r in &mut all {
                if r.expire_if_due(now) {
                    core(gov.approvals.save(r))?;
                    expired.push(r.clone());
                }
            }
            Ok::<_, Status>((all, expired))
        })
        .await
        .map_err(|_| Status::internal("internal error"))??;
        for r in &expired {
            svc.audit
                .record(step_event("expired", r, &operator))
                .await?;
        }
        all
    };
    svc.gov_read(AdminAction::ListApprovals, &request, state, move |gov| {
        let approvals = all
            .iter()
            .filter(|r| wanted.is_none_or(|w| r.state == w))
            .map(|r| info(gov, r))
            .collect();
        Ok(ListApprovalsResponse {
            approvals,
            warning: gov.quorum_warning().unwrap_or_default(),
        })
    })
    .await
}

pub(super) async fn get(
    svc: &AdminService,
    request: Request<ApprovalId>,
) -> Result<Response<ApprovalInfo>, Status> {
    let id = request.get_ref().id.clone();
    let (operator, _) = svc.who(&request)?;
    let req = {
        let _serial = svc.gov.approval_lock.lock().await;
        svc.load(&id, &operator).await
    };
    let gov = svc.gov.clone();
    svc.gov_read(AdminAction::GetApproval, &request, id, move |_| {
        req.map(|r| info(&gov, &r))
    })
    .await
}

pub(super) async fn reject(
    svc: &AdminService,
    request: Request<RejectChangeRequest>,
) -> Result<Response<ApprovalInfo>, Status> {
    let RejectChangeRequest { id, reason } = request.get_ref().clone();
    svc.step(
        AdminAction::RejectChange,
        &request,
        &id,
        move |req, by, now| {
            req.reject(by, now, &reason)?;
            Ok("rejected")
        },
    )
    .await
}

pub(super) async fn cancel(
    svc: &AdminService,
    request: Request<ApprovalId>,
) -> Result<Response<ApprovalInfo>, Status> {
    let id = request.get_ref().id.clone();
    svc.step(AdminAction::CancelChange, &request, &id, |req, by, now| {
        req.cancel(by, now)?;
        Ok("cancelled")
    })
    .await
}

pub(super) async fn approve(
    svc: &AdminService,
    request: Request<ApprovalId>,
) -> Result<Response<ApprovalInfo>, Status> {
    let id = request.get_ref().id.clone();
    let (operator, mut intent) = svc.intent(AdminAction::ApproveChange, &request)?;
    intent.detail.insert("approval_id".into(), id.clone());
    svc.audit.record(intent.clone()).await?;
    let _serial = svc.gov.approval_lock.lock().await;
    let result = approve_locked(svc, &id, &operator).await;
    let mut done = intent;
    done.status = status_word(result.as_ref().err());
    svc.outcome(done, &operator, &result).await;
    result.map(|r| Response::new(info(&svc.gov, &r)))
}

/// An approval, under the approval lock: record the vote, and on quorum run the change.
async fn approve_locked(
    svc: &AdminService,
    id: &str,
    operator: &OperatorId,
) -> Result<ApprovalRequest, Status> {
    let mut req = svc.load(id, operator).await?;
    let now = svc.gov.clock.now_unix();
    let required_now = svc.gov.approvals.rules().required;
    let progress = core(
        req.approve(operator.as_str(), now, required_now)
            .map_err(kms_core::Error::from),
    )?;
    svc.save(&req).await?;
    let mut vote = step_event("approved", &req, operator);
    vote.detail
        .insert("approvals".into(), req.approvals.len().to_string());
    vote.detail.insert(
        "required".into(),
        req.required.max(required_now).to_string(),
    );
    svc.audit.record(vote).await?;
    let Progress::Quorum(quorum) = progress else {
        return Ok(req);
    };
    let gov = svc.gov.clone();
    let kms = svc.kms.clone();
    let approved = req.clone();
    let ran = tokio::task::spawn_blocking(move || execute(&kms, &gov, &approved))
        .await
        .map_err(|_| Status::internal("internal error"))?;
    let finished = svc.gov.clock.now_unix();
    let mut event = match &ran {
        Ok(ran) => {
            let mut e = step_event("executed", &req, operator);
            e.before = ran.before.clone();
            e.after = ran.after.clone();
            e
        }
        Err(status) => {
            let mut e = step_event("failed", &req, operator);
            e.status = status_word(Some(status));
            e.reason = Some(status.message().to_owned());
            e
        }
    };
    let approvers: Vec<&str> = req.approvals.iter().map(|v| v.operator.as_str()).collect();
    event.detail.insert("approvers".into(), approvers.join(","));
    req.finish(
        quorum,
        finished,
        ran.map(|r| r.result).map_err(|s| s.message().to_owned()),
    );
    svc.save(&req).await?;
    svc.audit.record(event).await?;
    Ok(req)
}

fn rules_info(gov: &Governance, rules: &ApprovalRules) -> RulesInfo {
    let now = gov.clock.now_unix();
    RulesInfo {
        required: rules.required,
        expiry_secs: rules.expiry_secs,
        gated: rules.gated.iter().map(|a| a.as_str().into()).collect(),
        gatable: GatedAction::ALL.iter().map(|a| a.as_str().into()).collect(),
        operators: u32::try_from(gov.operators.count_with(Role::Operator, now)).unwrap_or(0),
        warning: gov.quorum_warning().unwrap_or_default(),
        approval: None,
    }
}

pub(super) async fn get_rules(
    svc: &AdminService,
    request: Request<GetApprovalRulesRequest>,
) -> Result<Response<RulesInfo>, Status> {
    svc.gov_read(
        AdminAction::GetApprovalRules,
        &request,
        String::new(),
        |gov| Ok(rules_info(gov, &gov.approvals.rules())),
    )
    .await
}

fn parse_rules(req: &SetApprovalRulesRequest) -> Result<ApprovalRules, Status> {
    let gated = if req.gated.is_empty() {
        GatedAction::ALL.iter().copied().collect()
    } else {
        // A name that is no gatable action makes the rules invalid, as before it was typed.
        let invalid = || kms_core::Error::Invalid(kms_core::InvalidInput::ApprovalRules);
        core(
            req.gated
                .iter()
                .map(|a| a.parse::<GatedAction>().map_err(|_| invalid()))
                .collect::<Result<_, _>>(),
        )?
    };
    core(ApprovalRules::new(req.required, req.expiry_secs, gated))
}

pub(super) fn apply_set_rules(
    gov: &Governance,
    req: SetApprovalRulesRequest,
    _who: &str,
) -> Result<Changed<ApprovalRules, RulesInfo>, Status> {
    let rules = parse_rules(&req)?;
    let before = gov.approvals.rules();
    core(gov.approvals.set_rules(rules.clone()))?;
    Ok(Changed {
        answer: rules_info(gov, &rules),
        before: Some(before),
        after: Some(rules),
    })
}

pub(super) async fn set_rules(
    svc: &AdminService,
    request: Request<SetApprovalRulesRequest>,
) -> Result<Response<RulesInfo>, Status> {
    let req = request.get_ref().clone();
    let rules = parse_rules(&req)?;
    let view = serde_json::json!({
        "required": rules.required,
        "expiry_secs": rules.expiry_secs,
        "gated": rules.gated,
    });
    svc.gov_change(
        AdminAction::SetApprovalRules,
        &request,
        "approval-rules".into(),
        view,
        None,
        move |gov, who| apply_set_rules(gov, req, who),
    )
    .await
}

//! The workload inventory: registrations with an owner, a purpose and an expiry.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use api::v1::{
    ListWorkloadsRequest, ListWorkloadsResponse, RegisterWorkloadRequest, UpdateWorkloadRequest,
    WorkloadInfo, WorkloadRequest,
};
use kms_core::governance::actions::AdminAction;
use kms_core::governance::inventory::{
    NewWorkload, Selector, Usage, Workload, WorkloadFilter, WorkloadUpdate,
};
use kms_core::Labels;
use tonic::{Request, Response, Status};

use super::{core, page_size, to_status, AdminService, Changed};
use crate::governance::Governance;

fn parse_register(req: RegisterWorkloadRequest) -> Result<NewWorkload, Status> {
    let selector = selector(&req.selector)?;
    let labels = core(Labels::from_pairs(req.labels))?;
    if req.expires_at == 0 {
        return Err(Status::invalid_argument(
            "expires_at is required (seconds since the Unix epoch)",
        ));
    }
    Ok(NewWorkload {
        selector,
        owner: req.owner,
        purpose: req.purpose,
        labels,
        expires_at: req.expires_at,
    })
}

/// What a workload change shows its approvers: the request, labels in key order.
fn workload_view(
    selector: &str,
    fields: serde_json::Value,
    labels: &HashMap<String, String>,
) -> serde_json::Value {
    let labels: BTreeMap<_, _> = labels.iter().collect();
    serde_json::json!({ "selector": selector, "fields": fields, "labels": labels })
}

type WorkloadChange = Changed<Workload, WorkloadInfo>;

fn changed(gov: &Governance, before: Option<&Workload>, after: &Workload) -> WorkloadChange {
    Changed {
        before: before.cloned(),
        after: Some(after.clone()),
        answer: workload_info(after, gov.inventory.usage(&after.selector)),
    }
}

pub(super) fn apply_register(
    gov: &Governance,
    req: RegisterWorkloadRequest,
    who: &str,
) -> Result<WorkloadChange, Status> {
    let w = core(gov.inventory.register(parse_register(req)?, who))?;
    Ok(changed(gov, None, &w))
}

pub(super) async fn register(
    svc: &AdminService,
    request: Request<RegisterWorkloadRequest>,
) -> Result<Response<WorkloadInfo>, Status> {
    let req = request.get_ref().clone();
    let new = parse_register(req.clone())?;
    core(svc.gov.inventory.check_new(&new))?;
    let view = workload_view(
        &req.selector,
        serde_json::json!({
            "owner": req.owner,
            "purpose": req.purpose,
            "expires_at": req.expires_at,
        }),
        &req.labels,
    );
    svc.gov_change(
        AdminAction::RegisterWorkload,
        &request,
        new.selector.to_string(),
        view,
        None,
        move |gov, who| apply_register(gov, req, who),
    )
    .await
}

fn parse_update(req: UpdateWorkloadRequest) -> Result<(Selector, WorkloadUpdate), Status> {
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
    Ok((selector, update))
}

pub(super) fn apply_update(
    gov: &Governance,
    req: UpdateWorkloadRequest,
    who: &str,
) -> Result<WorkloadChange, Status> {
    let (selector, update) = parse_update(req)?;
    let (before, after) = core(gov.inventory.update(&selector, update, who))?;
    Ok(changed(gov, Some(&before), &after))
}

pub(super) async fn update(
    svc: &AdminService,
    request: Request<UpdateWorkloadRequest>,
) -> Result<Response<WorkloadInfo>, Status> {
    let req = request.get_ref().clone();
    let (selector, update) = parse_update(req.clone())?;
    core(svc.gov.inventory.check_update(&selector, &update))?;
    let view = workload_view(
        &req.selector,
        serde_json::json!({
            "owner": req.owner,
            "purpose": req.purpose,
            "replace_labels": req.replace_labels,
            "expires_at": req.expires_at,
        }),
        &req.labels,
    );
    svc.gov_change(
        AdminAction::UpdateWorkload,
        &request,
        selector.to_string(),
        view,
        None,
        move |gov, who| apply_update(gov, req, who),
    )
    .await
}

pub(super) fn apply_deactivate(
    gov: &Governance,
    req: WorkloadRequest,
    who: &str,
) -> Result<WorkloadChange, Status> {
    let selector = selector(&req.selector)?;
    let (before, after) = core(gov.inventory.deactivate(&selector, who))?;
    Ok(changed(gov, Some(&before), &after))
}

pub(super) fn apply_reactivate(
    gov: &Governance,
    req: WorkloadRequest,
    who: &str,
) -> Result<WorkloadChange, Status> {
    let selector = selector(&req.selector)?;
    let (before, after) = core(gov.inventory.reactivate(&selector, who))?;
    Ok(changed(gov, Some(&before), &after))
}

pub(super) async fn deactivate(
    svc: &AdminService,
    request: Request<WorkloadRequest>,
) -> Result<Response<WorkloadInfo>, Status> {
    let req = request.get_ref().clone();
    let selector = selector(&req.selector)?;
    core(svc.gov.inventory.get(&selector))?;
    let view = serde_json::json!({ "selector": req.selector, "active": false });
    svc.gov_change(
        AdminAction::DeactivateWorkload,
        &request,
        selector.to_string(),
        view,
        None,
        move |gov, who| apply_deactivate(gov, req, who),
    )
    .await
}

pub(super) async fn reactivate(
    svc: &AdminService,
    request: Request<WorkloadRequest>,
) -> Result<Response<WorkloadInfo>, Status> {
    let req = request.get_ref().clone();
    let selector = selector(&req.selector)?;
    core(svc.gov.inventory.get(&selector))?;
    let view = serde_json::json!({ "selector": req.selector, "active": true });
    svc.gov_change(
        AdminAction::ReactivateWorkload,
        &request,
        selector.to_string(),
        view,
        None,
        move |gov, who| apply_reactivate(gov, req, who),
    )
    .await
}

pub(super) async fn describe(
    svc: &AdminService,
    request: Request<WorkloadRequest>,
) -> Result<Response<WorkloadInfo>, Status> {
    let selector = selector(&request.get_ref().selector)?;
    svc.gov_read(
        AdminAction::DescribeWorkload,
        &request,
        selector.to_string(),
        move |gov| {
            let w = core(gov.inventory.get(&selector))?;
            Ok(workload_info(&w, gov.inventory.usage(&w.selector)))
        },
    )
    .await
}

pub(super) async fn list(
    svc: &AdminService,
    request: Request<ListWorkloadsRequest>,
) -> Result<Response<ListWorkloadsResponse>, Status> {
    let req = request.get_ref().clone();
    let limit = page_size(req.page_size);
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
    svc.gov_read(
        AdminAction::ListWorkloads,
        &request,
        String::new(),
        move |gov| {
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
        },
    )
    .await
}

pub(super) fn selector(s: &str) -> Result<Selector, Status> {
    Selector::from_str(s).map_err(|e| to_status(&e))
}

pub(super) fn workload_info(w: &Workload, usage: Usage) -> WorkloadInfo {
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
        approval: None,
    }
}

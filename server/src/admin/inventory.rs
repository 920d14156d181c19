//! The workload inventory: registrations with an owner, a purpose and an expiry.

use std::collections::HashMap;
use std::str::FromStr;

use api::v1::{
    ListWorkloadsRequest, ListWorkloadsResponse, RegisterWorkloadRequest, UpdateWorkloadRequest,
    WorkloadInfo, WorkloadRequest,
};
use kms_core::governance::inventory::{
    NewWorkload, Selector, Usage, Workload, WorkloadFilter, WorkloadUpdate,
};
use kms_core::Labels;
use tonic::{Request, Response, Status};

use super::{core, page_size, to_status, AdminService, Changed};

pub(super) async fn register(
    svc: &AdminService,
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
    svc.gov_change(
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

pub(super) async fn update(
    svc: &AdminService,
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
    svc.gov_change(
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

pub(super) async fn deactivate(
    svc: &AdminService,
    request: Request<WorkloadRequest>,
) -> Result<Response<WorkloadInfo>, Status> {
    let selector = selector(&request.get_ref().selector)?;
    svc.gov_change(
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

pub(super) async fn reactivate(
    svc: &AdminService,
    request: Request<WorkloadRequest>,
) -> Result<Response<WorkloadInfo>, Status> {
    let selector = selector(&request.get_ref().selector)?;
    svc.gov_change(
        "admin.ReactivateWorkload",
        &request,
        selector.to_string(),
        move |gov, who| {
            let (before, after) = core(gov.inventory.reactivate(&selector, who))?;
            Ok(Changed {
                before: Some(Workload::clone(&before)),
                after: Some(Workload::clone(&after)),
                answer: workload_info(&after, gov.inventory.usage(&after.selector)),
            })
        },
    )
    .await
}

pub(super) async fn describe(
    svc: &AdminService,
    request: Request<WorkloadRequest>,
) -> Result<Response<WorkloadInfo>, Status> {
    let selector = selector(&request.get_ref().selector)?;
    svc.gov_read(
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
    svc.gov_read("admin.ListWorkloads", &request, String::new(), move |gov| {
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
    }
}

//! The operator inventory: who may use this plane, with which role. Register, update and
//! deactivate are gated by approvals; the gate (`gate.rs`) admits every admin request by it.

use std::collections::BTreeSet;

use api::v1::{
    ListOperatorsRequest, ListOperatorsResponse, OperatorInfo, OperatorRequest,
    RegisterOperatorRequest, UpdateOperatorRequest, WhoAmIRequest,
};
use kms_core::governance::actions::AdminAction;
use kms_core::governance::operators::{NewOperator, Operator, OperatorName, OperatorUpdate, Role};
use kms_core::OperatorId;
use tonic::{Request, Response, Status};

use super::{core, AdminService, Changed};
use crate::governance::Governance;

type OperatorChange = Changed<Operator, OperatorInfo>;

fn name(s: &str) -> Result<OperatorName, Status> {
    core(s.parse())
}

fn roles(names: &[String]) -> Result<BTreeSet<Role>, Status> {
    names.iter().map(|r| core(r.parse::<Role>())).collect()
}

fn parse_register(req: RegisterOperatorRequest) -> Result<NewOperator, Status> {
    if req.expires_at == 0 {
        return Err(Status::invalid_argument(
            "expires_at is required (seconds since the Unix epoch)",
        ));
    }
    Ok(NewOperator {
        identity: core(req.identity.parse::<OperatorId>())?,
        name: name(&req.name)?,
        owner: req.owner,
        roles: roles(&req.roles)?,
        expires_at: req.expires_at,
    })
}

pub(super) fn operator_info(o: &Operator) -> OperatorInfo {
    OperatorInfo {
        name: o.name.clone(),
        identity: o.identity.clone(),
        owner: o.owner.clone(),
        roles: o.roles.iter().map(ToString::to_string).collect(),
        expires_at: o.expires_at,
        active: o.active,
        created_at: o.created_at,
        created_by: o.created_by.clone(),
        updated_at: o.updated_at,
        updated_by: o.updated_by.clone(),
        approval: None,
    }
}

fn changed(before: Option<&Operator>, after: &Operator) -> OperatorChange {
    Changed {
        before: before.cloned(),
        after: Some(after.clone()),
        answer: operator_info(after),
    }
}

pub(super) fn apply_register(
    gov: &Governance,
    req: RegisterOperatorRequest,
    who: &str,
) -> Result<OperatorChange, Status> {
    let new = parse_register(req)?;
    let op = core(gov.operators.register(new, who, gov.clock.now_unix()))?;
    Ok(changed(None, &op))
}

pub(super) async fn register(
    svc: &AdminService,
    request: Request<RegisterOperatorRequest>,
) -> Result<Response<OperatorInfo>, Status> {
    let req = request.get_ref().clone();
    let new = parse_register(req.clone())?;
    core(svc.gov.operators.check_new(&new, svc.gov.clock.now_unix()))?;
    let view = serde_json::json!({
        "name": req.name,
        "identity": req.identity,
        "owner": req.owner,
        "roles": new.roles,
        "expires_at": req.expires_at,
    });
    svc.gov_change(
        AdminAction::RegisterOperator,
        &request,
        req.name.clone(),
        view,
        None,
        move |gov, who| apply_register(gov, req, who),
    )
    .await
}

fn parse_update(req: UpdateOperatorRequest) -> Result<(OperatorName, OperatorUpdate), Status> {
    let update = OperatorUpdate {
        owner: req.owner,
        roles: if req.roles.is_empty() {
            None
        } else {
            Some(roles(&req.roles)?)
        },
        expires_at: (req.expires_at != 0).then_some(req.expires_at),
    };
    Ok((name(&req.name)?, update))
}

pub(super) fn apply_update(
    gov: &Governance,
    req: UpdateOperatorRequest,
    who: &str,
) -> Result<OperatorChange, Status> {
    let (name, update) = parse_update(req)?;
    let (before, after) = core(
        gov.operators
            .update(&name, update, who, gov.clock.now_unix()),
    )?;
    Ok(changed(Some(&before), &after))
}

pub(super) async fn update(
    svc: &AdminService,
    request: Request<UpdateOperatorRequest>,
) -> Result<Response<OperatorInfo>, Status> {
    let req = request.get_ref().clone();
    let (name, update) = parse_update(req.clone())?;
    core(
        svc.gov
            .operators
            .check_update(&name, &update, svc.gov.clock.now_unix()),
    )?;
    let view = serde_json::json!({
        "name": req.name,
        "owner": req.owner,
        "roles": req.roles,
        "expires_at": req.expires_at,
    });
    svc.gov_change(
        AdminAction::UpdateOperator,
        &request,
        req.name.clone(),
        view,
        None,
        move |gov, who| apply_update(gov, req, who),
    )
    .await
}

pub(super) fn apply_deactivate(
    gov: &Governance,
    req: OperatorRequest,
    who: &str,
) -> Result<OperatorChange, Status> {
    let name = name(&req.name)?;
    let (before, after) = core(gov.operators.deactivate(&name, who, gov.clock.now_unix()))?;
    Ok(changed(Some(&before), &after))
}

pub(super) async fn deactivate(
    svc: &AdminService,
    request: Request<OperatorRequest>,
) -> Result<Response<OperatorInfo>, Status> {
    let req = request.get_ref().clone();
    core(svc.gov.operators.get(&name(&req.name)?))?;
    let view = serde_json::json!({ "name": req.name, "active": false });
    svc.gov_change(
        AdminAction::DeactivateOperator,
        &request,
        req.name.clone(),
        view,
        None,
        move |gov, who| apply_deactivate(gov, req, who),
    )
    .await
}

pub(super) async fn describe(
    svc: &AdminService,
    request: Request<OperatorRequest>,
) -> Result<Response<OperatorInfo>, Status> {
    let wanted = name(&request.get_ref().name)?;
    svc.gov_read(
        AdminAction::DescribeOperator,
        &request,
        wanted.to_string(),
        move |gov| Ok(operator_info(core(gov.operators.get(&wanted))?.as_ref())),
    )
    .await
}

pub(super) async fn list(
    svc: &AdminService,
    request: Request<ListOperatorsRequest>,
) -> Result<Response<ListOperatorsResponse>, Status> {
    let include_inactive = request.get_ref().include_inactive;
    svc.gov_read(
        AdminAction::ListOperators,
        &request,
        String::new(),
        move |gov| {
            Ok(ListOperatorsResponse {
                operators: gov
                    .operators
                    .list(include_inactive)
                    .iter()
                    .map(|o| operator_info(o))
                    .collect(),
            })
        },
    )
    .await
}

pub(super) async fn who_am_i(
    svc: &AdminService,
    request: Request<WhoAmIRequest>,
) -> Result<Response<OperatorInfo>, Status> {
    let (operator, _) = svc.who(&request)?;
    svc.gov_read(AdminAction::WhoAmI, &request, String::new(), move |gov| {
        gov.operators
            .by_identity(operator.as_str())
            .map(|o| operator_info(&o))
            .ok_or_else(|| Status::permission_denied("operator is not registered"))
    })
    .await
}

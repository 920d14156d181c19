//! Task grants as operators see them: list and revoke.

use api::v1::{
    GrantInfo, ListGrantsRequest, ListGrantsResponse, RevokeGrantsRequest, RevokeGrantsResponse,
};
use kms_core::governance::actions::AdminAction;
use kms_core::governance::grants::Grant;
use tonic::{Request, Response, Status};

use super::{core, key_ref, AdminService, Changed};

pub(super) async fn list(
    svc: &AdminService,
    request: Request<ListGrantsRequest>,
) -> Result<Response<ListGrantsResponse>, Status> {
    let req = request.get_ref().clone();
    let key = match req.key.is_empty() {
        true => None,
        false => Some(core(svc.kms.describe_key(&key_ref(&req.key)?))?.id),
    };
    svc.gov_read(
        AdminAction::ListGrants,
        &request,
        String::new(),
        move |gov| {
            let now = gov.clock.now_unix();
            let grants = gov
                .grants
                .list(|g| {
                    (req.creator.is_empty() || g.creator.as_str() == req.creator)
                        && (req.grantee.is_empty() || g.grantee.as_str() == req.grantee)
                        && key.is_none_or(|k| g.key_id == k)
                        && (req.include_inactive || (g.revoked.is_none() && g.expires_at > now))
                })
                .iter()
                .map(|g| grant_info(g, gov.grants.uses(&g.id)))
                .collect();
            Ok(ListGrantsResponse { grants })
        },
    )
    .await
}

pub(super) async fn revoke(
    svc: &AdminService,
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
        false => Some(core(svc.kms.describe_key(&key_ref(&req.key)?))?.id),
    };
    let target = format!(
        "{}{}{}",
        req.grant_id,
        req.creator,
        key.map(|k| k.to_string()).unwrap_or_default()
    );
    svc.gov_apply(
        AdminAction::RevokeGrants,
        &request,
        target,
        move |gov, who| {
            let revoked = core(gov.grants.revoke_where(who, |g| {
                (!req.grant_id.is_empty() && g.id.as_str() == req.grant_id)
                    || (!req.creator.is_empty() && g.creator.as_str() == req.creator)
                    || key.is_some_and(|k| g.key_id == k)
            }))?;
            if !req.grant_id.is_empty() && revoked.is_empty() {
                return Err(Status::not_found(format!("no live grant {}", req.grant_id)));
            }
            let ids: Vec<String> = revoked.iter().map(|g| g.id.to_string()).collect();
            Ok(Changed {
                before: Some(ids.clone()),
                after: None,
                answer: RevokeGrantsResponse { revoked: ids },
            })
        },
    )
    .await
}

pub(super) fn grant_info(g: &Grant, uses: u64) -> GrantInfo {
    GrantInfo {
        grant_id: g.id.to_string(),
        creator: g.creator.to_string(),
        grantee: g.grantee.to_string(),
        key_id: g.key_id.to_string(),
        operations: g
            .operations
            .iter()
            .map(|op| op.as_str().to_owned())
            .collect(),
        required_context: g.required_context.clone().into_iter().collect(),
        created_at: g.created_at,
        expires_at: g.expires_at,
        max_uses: g.max_uses.unwrap_or(0),
        uses,
        revoked_at: g.revoked.as_ref().map_or(0, |r| r.at),
        revoked_by: g.revoked.as_ref().map(|r| r.by.clone()).unwrap_or_default(),
    }
}

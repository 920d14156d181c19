//! Key lifecycle: create, describe, list, rotate, disable, enable, alias, destruction (gated
//! scheduling, single-operator cancel, the receipt); and which keys no registered workload
//! may use.

use std::sync::Arc;

use api::v1::{
    CreateAliasRequest, CreateKeyRequest, DestructionReceipt, KeyDestruction, KeyMetadata,
    KeyRequest, ListKeysRequest, ListKeysResponse, ScheduleKeyDestructionRequest,
};
use kms_core::audit::AuditEvent;
use kms_core::governance::actions::AdminAction;
use kms_core::governance::inventory::Workload;
use kms_core::{
    Alias, DestructionAuthority, KeyId, KeyRecord, KeyState, Kms, Labels, NewKey, Protection,
};
use tonic::{Request, Response, Status};

use super::{core, key_ref, page_size, to_status, AdminService, Changed, MAX_PAGE};
use crate::governance::Governance;
use crate::identity::operator;

pub(super) async fn create(
    svc: &AdminService,
    request: Request<CreateKeyRequest>,
) -> Result<Response<KeyMetadata>, Status> {
    operator(&request)?;
    let req = request.get_ref().clone();
    let protection = match api::v1::Protection::try_from(req.protection) {
        Ok(api::v1::Protection::Hsm) => Protection::Hsm,
        Ok(api::v1::Protection::Software | api::v1::Protection::Unspecified) => {
            Protection::Software
        }
        Err(_) => return Err(Status::invalid_argument("unknown protection level")),
    };
    let spec = NewKey {
        alias: match req.alias.is_empty() {
            true => None,
            false => Some(alias(req.alias)?),
        },
        labels: core(Labels::from_pairs(req.labels))?,
        protection,
    };
    svc.change(AdminAction::CreateKey, &request, None, move |kms| {
        core(kms.create_key(spec))
    })
    .await
}

pub(super) async fn describe(
    svc: &AdminService,
    request: Request<KeyRequest>,
) -> Result<Response<KeyMetadata>, Status> {
    let key = key_ref(&request.get_ref().key)?;
    let event = AuditEvent::default().on_key(&key);
    svc.read(AdminAction::DescribeKey, &request, event, move |kms, _| {
        core(kms.describe_key(&key)).map(|r| metadata(&r))
    })
    .await
}

pub(super) async fn list(
    svc: &AdminService,
    request: Request<ListKeysRequest>,
) -> Result<Response<ListKeysResponse>, Status> {
    let req = request.get_ref().clone();
    let limit = page_size(req.page_size);
    let after = match req.page_token.is_empty() {
        true => None,
        false => Some(
            req.page_token
                .parse::<KeyId>()
                .map_err(|_| Status::invalid_argument("invalid page token"))?,
        ),
    };
    svc.read(
        AdminAction::ListKeys,
        &request,
        AuditEvent::default(),
        move |kms, _| {
            let (page, next) = kms.list_keys(after, limit);
            Ok(ListKeysResponse {
                keys: page.iter().map(metadata).collect(),
                next_page_token: next.map(|id| id.to_string()).unwrap_or_default(),
            })
        },
    )
    .await
}

pub(super) async fn rotate(
    svc: &AdminService,
    request: Request<KeyRequest>,
) -> Result<Response<KeyMetadata>, Status> {
    let key = key_ref(&request.get_ref().key)?;
    let k = key.clone();
    svc.change(AdminAction::RotateKey, &request, Some(key), move |kms| {
        core(kms.rotate_key(&k))
    })
    .await
}

pub(super) async fn disable(
    svc: &AdminService,
    request: Request<KeyRequest>,
) -> Result<Response<KeyMetadata>, Status> {
    let key = key_ref(&request.get_ref().key)?;
    let k = key.clone();
    svc.change(AdminAction::DisableKey, &request, Some(key), move |kms| {
        core(kms.set_key_state(&k, KeyState::Disabled))
    })
    .await
}

pub(super) async fn enable(
    svc: &AdminService,
    request: Request<KeyRequest>,
) -> Result<Response<KeyMetadata>, Status> {
    let key = key_ref(&request.get_ref().key)?;
    let k = key.clone();
    svc.change(AdminAction::EnableKey, &request, Some(key), move |kms| {
        core(kms.set_key_state(&k, KeyState::Enabled))
    })
    .await
}

pub(super) async fn create_alias(
    svc: &AdminService,
    request: Request<CreateAliasRequest>,
) -> Result<Response<KeyMetadata>, Status> {
    let key = key_ref(&request.get_ref().key)?;
    let new_alias = alias(request.get_ref().alias.clone())?;
    let k = key.clone();
    svc.change(AdminAction::CreateAlias, &request, Some(key), move |kms| {
        core(kms.set_alias(new_alias, &k))
    })
    .await
}

/// Runs a destruction schedule, from a request as sent, on behalf of `authority`.
pub(super) fn apply_schedule_destroy(
    kms: &Kms,
    gov: &Governance,
    req: ScheduleKeyDestructionRequest,
    authority: DestructionAuthority,
) -> Result<Changed<KeyRecord, KeyMetadata>, Status> {
    let key = key_ref(&req.key)?;
    let before = core(kms.describe_key(&key))?;
    let after = core(kms.schedule_destruction(
        &key,
        req.waiting_days,
        gov.min_destroy_waiting_days,
        authority,
    ))?;
    Ok(Changed {
        answer: metadata(&after),
        before: Some(before),
        after: Some(after),
    })
}

/// Asks to destroy a key after a waiting period: a gated change, checked now and again when
/// it runs.
pub(super) async fn schedule_destroy(
    svc: &AdminService,
    request: Request<ScheduleKeyDestructionRequest>,
) -> Result<Response<KeyMetadata>, Status> {
    let req = request.get_ref().clone();
    let key = key_ref(&req.key)?;
    let record = core(svc.kms.check_destruction(
        &key,
        req.waiting_days,
        svc.gov.min_destroy_waiting_days,
    ))?;
    let view = serde_json::json!({
        "key_id": record.id.to_string(),
        "alias": record.alias.as_ref().map(ToString::to_string),
        "protection": record.protection.as_str(),
        "versions": record.current_version.get(),
        "waiting_days": req.waiting_days,
    });
    let kms = svc.kms.clone();
    svc.gov_change(
        AdminAction::ScheduleKeyDestruction,
        &request,
        record.id.to_string(),
        view,
        None,
        move |gov, who| {
            let authority = DestructionAuthority {
                requested_by: who.to_owned(),
                approvers: Vec::new(),
                approval_id: None,
            };
            apply_schedule_destroy(&kms, gov, req, authority)
        },
    )
    .await
}

pub(super) async fn cancel_destroy(
    svc: &AdminService,
    request: Request<KeyRequest>,
) -> Result<Response<KeyMetadata>, Status> {
    let key = key_ref(&request.get_ref().key)?;
    let k = key.clone();
    svc.change(
        AdminAction::CancelKeyDestruction,
        &request,
        Some(key),
        move |kms| core(kms.cancel_destruction(&k)),
    )
    .await
}

pub(super) async fn receipt(
    svc: &AdminService,
    request: Request<KeyRequest>,
) -> Result<Response<DestructionReceipt>, Status> {
    let key = key_ref(&request.get_ref().key)?;
    let event = AuditEvent::default().on_key(&key);
    svc.read(
        AdminAction::GetDestructionReceipt,
        &request,
        event,
        move |kms, _| {
            let record = core(kms.describe_key(&key))?;
            match record.destruction.and_then(|d| d.receipt) {
                Some(receipt) => Ok(DestructionReceipt {
                    key_id: record.id.to_string(),
                    receipt,
                }),
                None => Err(Status::failed_precondition(format!(
                    "key {} has no destruction receipt: it is {}{}",
                    record.id,
                    record.state.as_str(),
                    if record.state == KeyState::Destroyed {
                        " and its receipt is still being made; retry in a moment"
                    } else {
                        ""
                    }
                ))),
            }
        },
    )
    .await
}

pub(super) async fn coverage(
    svc: &AdminService,
    request: Request<api::v1::KeyCoverageRequest>,
) -> Result<Response<api::v1::KeyCoverageResponse>, Status> {
    let include_disabled = request.get_ref().include_disabled;
    let kms = svc.kms.clone();
    svc.gov_read(
        AdminAction::KeyCoverage,
        &request,
        String::new(),
        move |gov| {
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
                    let skipped = match key.state {
                        KeyState::Enabled => false,
                        // No workload will ever use it again.
                        KeyState::Destroyed => true,
                        _ => !include_disabled,
                    };
                    if skipped {
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
                        unusable_keys.push(super::keys::metadata(key));
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
        },
    )
    .await
}

pub(super) fn metadata(r: &KeyRecord) -> KeyMetadata {
    KeyMetadata {
        key_id: r.id.to_string(),
        alias: r.alias.as_ref().map(|a| a.to_string()).unwrap_or_default(),
        labels: r
            .labels
            .entries()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        protection: match r.protection {
            Protection::Hsm => api::v1::Protection::Hsm,
            _ => api::v1::Protection::Software,
        }
        .into(),
        state: match r.state {
            KeyState::Enabled => api::v1::KeyState::Enabled,
            KeyState::PendingDestruction => api::v1::KeyState::PendingDestruction,
            KeyState::Destroyed => api::v1::KeyState::Destroyed,
            _ => api::v1::KeyState::Disabled,
        }
        .into(),
        current_version: r.current_version.get(),
        created_at: r.created_at,
        updated_at: r.updated_at,
        destruction: r.destruction.as_ref().map(|d| KeyDestruction {
            scheduled_at: d.scheduled_at,
            destroy_at: d.destroy_at,
            destroyed_at: d.destroyed_at.unwrap_or(0),
            requested_by: d.authority.requested_by.clone(),
            approvers: d.authority.approvers.clone(),
            approval_id: d.authority.approval_id.clone().unwrap_or_default(),
            receipt: d.receipt.is_some(),
        }),
        approval: None,
    }
}

pub(super) fn alias(s: String) -> Result<Alias, Status> {
    Alias::try_from(s).map_err(|e| to_status(&e))
}

//! The emergency seal: `Seal` by any one operator, at once; `Unseal` gated by approvals; the
//! state, for anyone registered. The data plane's gate refuses every request while sealed.

use api::v1::{GetServiceStatusRequest, SealRequest, ServiceStatus, UnsealRequest};
use kms_core::audit::AuditEvent;
use kms_core::governance::actions::AdminAction;
use kms_core::seal::SealRecord;
use kms_core::{Kms, Principal};
use tonic::{Request, Response, Status};

use super::{core, AdminService, Changed};
use crate::audit::status_word;

fn status_of(record: Option<&SealRecord>) -> ServiceStatus {
    match record {
        Some(r) => ServiceStatus {
            sealed: true,
            sealed_at: r.sealed_at,
            sealed_by: r.sealed_by.clone(),
            reason: r.reason.clone(),
            approval: None,
        },
        None => ServiceStatus::default(),
    }
}

/// Seals now: one operator is enough, because an emergency must not wait for a quorum.
pub(super) async fn seal(
    svc: &AdminService,
    request: Request<SealRequest>,
) -> Result<Response<ServiceStatus>, Status> {
    let (operator, mut intent) = svc.intent(AdminAction::Seal, &request)?;
    let reason = request.get_ref().reason.clone();
    let record = core(SealRecord::new(
        svc.gov.clock.now_unix(),
        operator.to_string(),
        reason.clone(),
    ))?;
    intent.reason = Some(reason);
    svc.audit.record(intent.clone()).await?;
    let kms = svc.kms.clone();
    let result = tokio::task::spawn_blocking(move || core(kms.seal_service(&record)))
        .await
        .map_err(|_| Status::internal("internal error"))?;
    let mut done = intent;
    done.status = status_word(result.as_ref().err());
    svc.outcome(done, &operator, &result).await;
    if let Ok(sealed) = &result {
        let mut event = AuditEvent::new("service.sealed", "ok")
            .because(&sealed.reason)
            .with("sealed_by", &sealed.sealed_by);
        event.set_caller(Principal::Operator(operator.clone()), "mtls");
        svc.audit.record(event).await?;
    }
    result.map(|r| Response::new(status_of(Some(&r))))
}

pub(super) fn apply_unseal(
    kms: &Kms,
    _req: UnsealRequest,
    _who: &str,
) -> Result<Changed<SealRecord, ServiceStatus>, Status> {
    let lifted = core(kms.unseal_service())?;
    Ok(Changed {
        answer: status_of(None),
        before: lifted,
        after: None,
    })
}

/// Asks to unseal: a gated change, which runs (makes every key usable again) on the M-th
/// approval.
pub(super) async fn unseal(
    svc: &AdminService,
    request: Request<UnsealRequest>,
) -> Result<Response<ServiceStatus>, Status> {
    if !svc.kms.is_sealed() {
        return Err(Status::failed_precondition("the service is not sealed"));
    }
    let kms = svc.kms.clone();
    svc.gov_change(
        AdminAction::Unseal,
        &request,
        "service".into(),
        serde_json::json!({ "unseal": true }),
        None,
        move |_, who| apply_unseal(&kms, UnsealRequest {}, who),
    )
    .await
}

pub(super) async fn status(
    svc: &AdminService,
    request: Request<GetServiceStatusRequest>,
) -> Result<Response<ServiceStatus>, Status> {
    svc.read(
        AdminAction::GetServiceStatus,
        &request,
        AuditEvent::default(),
        |_, store| Ok(status_of(core(kms_core::seal::load(store))?.as_ref())),
    )
    .await
}

//! Custody on the admin plane: recording a custodian's share verification while the server
//! runs. The custodian checks the share on their own machine; the server gets the commitment
//! they recomputed, checks it against the ceremony on record, and records them as verified.
//! It never sees a share.

use api::v1::{
    AttestRequest, AttestResponse, AuthorizeReshareRequest, AuthorizeReshareResponse,
    RecordDrillRequest, RecordDrillResponse, ShareVerification, ShareVerificationRequest,
};
use kms_core::governance::actions::AdminAction;
use recovery::ceremony::ShareClaim;
use tonic::{Request, Response, Status};

use super::{core, AdminService};

fn hex32(what: &str, text: &str) -> Result<[u8; 32], Status> {
    let bytes =
        hex::decode(text).map_err(|_| Status::invalid_argument(format!("{what} is not hex")))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| Status::invalid_argument(format!("{what} is not 32 bytes")))
}

pub(super) async fn record_verification(
    svc: &AdminService,
    request: Request<ShareVerificationRequest>,
) -> Result<Response<ShareVerification>, Status> {
    let req = request.get_ref().clone();
    let claim = ShareClaim {
        ceremony_id: req
            .ceremony_id
            .parse()
            .map_err(|_| Status::invalid_argument("ceremony_id is not a ceremony id"))?,
        epoch: recovery::Epoch::new(req.epoch)
            .ok_or_else(|| Status::invalid_argument("epoch must be 1 or more"))?,
        custodian: req.custodian.clone(),
        index: u8::try_from(req.index)
            .map_err(|_| Status::invalid_argument("index is out of range"))?,
        transcript_sha256: hex32("transcript_sha256", &req.transcript_sha256)?,
        commitment: hex32("commitment", &req.commitment)?,
    };
    let (operator, mut intent) = svc.intent(AdminAction::RecordShareVerification, &request)?;
    intent
        .detail
        .insert("custodian".into(), req.custodian.clone());
    intent.detail.insert("index".into(), req.index.to_string());
    intent
        .detail
        .insert("ceremony_id".into(), req.ceremony_id.clone());
    svc.audit.record(intent.clone()).await?;
    let store = svc.store.clone();
    let now = svc.gov.clock.now_unix();
    let result = tokio::task::spawn_blocking(move || {
        core(kms_core::custody::verify_claim(store.as_ref(), &claim, now))
    })
    .await
    .map_err(|_| Status::internal("internal error"))?;
    let mut done = intent;
    done.status = crate::audit::status_word(result.as_ref().err());
    svc.outcome(done, &operator, &result).await;
    let (custodian, index) = result?;
    Ok(Response::new(ShareVerification {
        custodian,
        index: u32::from(index),
        verified: true,
    }))
}

/// What an approved reshare does: nothing yet but say so; the ticket is the executed request,
/// consumed by the offline `kms ceremony reshare --approval ID`.
pub(super) fn reshare_ticket_result(
    r: &kms_core::governance::approvals::ApprovalRequest,
    now: u64,
) -> String {
    kms_core::reshare::TICKET.result(
        r,
        now,
        &format!(
            "stop the server and run `kms ceremony reshare --approval {}` with the same threshold and custodians",
            r.id
        ),
    )
}

/// Checks a reshare plan and, when the action is gated, stores it for approval. The reshare
/// itself runs offline (docs/RECOVERY.md, "Reshare").
pub(super) async fn authorize_reshare(
    svc: &AdminService,
    request: Request<AuthorizeReshareRequest>,
) -> Result<Response<AuthorizeReshareResponse>, Status> {
    use kms_core::governance::approvals::NewRequest;
    use prost::Message;
    let req = request.get_ref().clone();
    let custodians = req
        .custodians
        .iter()
        .map(|c| recovery::Custodian::parse(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let threshold = usize::try_from(req.threshold).unwrap_or(usize::MAX);
    let names: Vec<String> = custodians.iter().map(|c| c.name.to_string()).collect();
    recovery::ceremony::Checked::new(threshold, custodians)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let store = svc.store.clone();
    let custody =
        tokio::task::spawn_blocking(move || core(kms_core::custody::load(store.as_ref())))
            .await
            .map_err(|_| Status::internal("internal error"))??;
    let Some(custody) = custody else {
        return Err(Status::failed_precondition(
            "custody is not initialised: run `kms ceremony init` first",
        ));
    };
    let action = kms_core::reshare::ACTION;
    if !svc.gov.approvals.rules().gates(action.action()) {
        return Ok(Response::new(AuthorizeReshareResponse {
            approval: None,
            gated: false,
        }));
    }
    let (operator, mut intent) = svc.intent(action.action(), &request)?;
    intent.detail.insert("target".into(), "custody".into());
    intent
        .detail
        .insert("threshold".into(), req.threshold.to_string());
    intent.detail.insert("custodians".into(), names.join(","));
    let new = NewRequest {
        action,
        target: "custody".into(),
        request: req.encode_to_vec(),
        view: serde_json::json!({
            "reshare": "a new recovery secret split to these custodians; every current share stops working",
            "ceremony_id": custody.record.ceremony_id.to_string(),
            "from_epoch": custody.record.epoch.get(),
            "threshold": req.threshold,
            "custodians": req.custodians,
            "ticket_valid_secs": kms_core::reshare::TICKET.secs,
        })
        .to_string(),
        diff: None,
        requested_by: operator.to_string(),
    };
    let r = svc.ask(&operator, intent, new).await?;
    Ok(Response::new(AuthorizeReshareResponse {
        approval: Some(super::approval::info(&svc.gov, &r)),
        gated: true,
    }))
}

/// A signed sovereignty attestation of the deployment as it is now (docs/DRILL.md).
pub(super) async fn attest(
    svc: &AdminService,
    request: Request<AttestRequest>,
) -> Result<Response<AttestResponse>, Status> {
    let (operator, intent) = svc.intent(AdminAction::Attest, &request)?;
    svc.audit.record(intent.clone()).await?;
    let kms = svc.kms.clone();
    let result = tokio::task::spawn_blocking(move || {
        core(
            kms.attest(env!("CARGO_PKG_VERSION"))
                .and_then(|a| a.to_text()),
        )
    })
    .await
    .map_err(|_| Status::internal("internal error"))?;
    let mut done = intent;
    done.status = crate::audit::status_word(result.as_ref().err());
    if let Ok(text) = &result {
        done.detail.insert(
            "attestation_sha256".into(),
            kms_core::audit::sha256_hex(text.as_bytes()),
        );
    }
    svc.outcome(done, &operator, &result).await;
    Ok(Response::new(AttestResponse { text: result? }))
}

/// Records a drill report's hash in the audit log and keeps it as the last drill
/// (docs/DRILL.md, "The report"). The report must verify: an edited one is refused.
pub(super) async fn record_drill(
    svc: &AdminService,
    request: Request<RecordDrillRequest>,
) -> Result<Response<RecordDrillResponse>, Status> {
    let (operator, mut intent) = svc.intent(AdminAction::RecordDrill, &request)?;
    let report = &request.get_ref().report;
    let sha256 = kms_core::audit::sha256_hex(report);
    intent.detail.insert("report_sha256".into(), sha256.clone());
    let drill = kms_core::drill::to_record(report, svc.gov.clock.now_unix(), &operator.to_string())
        .map_err(|e| Status::invalid_argument(e.to_string()));
    if let Ok(d) = &drill {
        intent.detail.insert("passed".into(), d.passed.to_string());
        intent
            .detail
            .insert("bundle_sha256".into(), d.bundle_sha256.clone());
        intent
            .detail
            .insert("finished_at".into(), d.finished_at.to_string());
    }
    svc.audit.record(intent.clone()).await?;
    let store = svc.store.clone();
    let result = match drill {
        Ok(d) => tokio::task::spawn_blocking(move || {
            core(kms_core::drill::store_record(store.as_ref(), &d)).map(|()| d)
        })
        .await
        .map_err(|_| Status::internal("internal error"))?,
        Err(e) => Err(e),
    };
    let mut done = intent;
    done.status = crate::audit::status_word(result.as_ref().err());
    let d = match result {
        Ok(d) => d,
        Err(e) => {
            svc.outcome(done, &operator, &Err::<(), _>(e.clone())).await;
            return Err(e);
        }
    };
    // The outcome with a signed checkpoint over it, so that an export taken right after
    // proves the record (`kms drill verify-report --audit-export`).
    let seq = svc.audit.record_checkpointed(done).await?;
    tracing::info!(operator = %operator, report_sha256 = %d.report_sha256, "drill recorded");
    Ok(Response::new(RecordDrillResponse {
        report_sha256: d.report_sha256,
        passed: d.passed,
        audit_seq: seq.unwrap_or_default(),
    }))
}

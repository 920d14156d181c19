//! Custody on the admin plane: recording a custodian's share verification while the server
//! runs. The custodian checks the share on their own machine; the server gets the commitment
//! they recomputed, checks it against the ceremony on record, and records them as verified.
//! It never sees a share.

use api::v1::{ShareVerification, ShareVerificationRequest};
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
    let (operator, mut intent) = svc.intent("ceremony.share_verified", &request)?;
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

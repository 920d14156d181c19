//! `kms seal`, `kms unseal`, `kms status`: the emergency seal (admin plane). Any one
//! operator seals at once; unsealing waits for approvals like any gated change.

use api::v1::{GetServiceStatusRequest, SealRequest, ServiceStatus, UnsealRequest};
use serde_json::{json, Value};

use crate::approval::emit_change;
use crate::connect::ConnectArgs;
use crate::error::Error;
use crate::output::{emit, rfc3339};

/// Options of `kms seal`.
#[derive(clap::Args, Debug)]
pub(crate) struct SealArgs {
    /// Why (recorded in the audit log with who sealed).
    #[arg(long)]
    reason: String,
}

pub(crate) async fn seal(args: SealArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let s = conn
        .admin()
        .await?
        .seal(SealRequest {
            reason: args.reason,
        })
        .await?
        .into_inner();
    emit(as_json, &status_json(&s))
}

pub(crate) async fn unseal(conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let s = conn
        .admin()
        .await?
        .unseal(UnsealRequest {})
        .await?
        .into_inner();
    emit_change(as_json, s.approval.as_ref(), || status_json(&s))
}

pub(crate) async fn status(conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let s = conn
        .admin()
        .await?
        .get_service_status(GetServiceStatusRequest {})
        .await?
        .into_inner();
    emit(as_json, &status_json(&s))
}

fn status_json(s: &ServiceStatus) -> Value {
    if !s.sealed {
        return json!({ "sealed": false });
    }
    json!({
        "sealed": true,
        "sealed_at": rfc3339(s.sealed_at),
        "sealed_by": s.sealed_by,
        "reason": s.reason,
    })
}

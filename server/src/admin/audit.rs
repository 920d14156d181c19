//! Filtered pages of the audit log, with what is needed to verify them.

use api::v1::{AuditCheckpoint, AuditRecord, AuditSigner, QueryAuditRequest, QueryAuditResponse};
use kms_core::audit::{public_key_pem, stored_signers, AuditEvent, AuditPage, AuditQuery, Signers};
use kms_core::governance::actions::AdminAction;
use tonic::{Request, Response, Status};

use super::{core, AdminService};

/// Longest QueryAudit filter value.
const MAX_FILTER: usize = 256;

pub(super) async fn query(
    svc: &AdminService,
    request: Request<QueryAuditRequest>,
) -> Result<Response<QueryAuditResponse>, Status> {
    let req = request.get_ref().clone();
    if [&req.principal, &req.key, &req.action, &req.decision]
        .iter()
        .any(|f| f.len() > MAX_FILTER)
    {
        return Err(Status::invalid_argument(format!(
            "audit filters are at most {MAX_FILTER} bytes"
        )));
    }
    // Who searched the audit log, and for what, is itself on record.
    let mut event = AuditEvent::default();
    let filters = [
        ("after_seq", req.after_seq.to_string()),
        ("principal", req.principal.clone()),
        ("key", req.key.clone()),
        ("action", req.action.clone()),
        ("decision", req.decision.clone()),
        ("since_ms", req.since_ms.to_string()),
        ("until_ms", req.until_ms.to_string()),
    ];
    for (name, value) in filters {
        if !value.is_empty() && value != "0" {
            event.detail.insert(name.into(), value);
        }
    }
    if !matches!(req.decision.as_str(), "" | "allow" | "deny") {
        return Err(Status::invalid_argument(
            "decision filter must be \"allow\" or \"deny\"",
        ));
    }
    svc.read(AdminAction::QueryAudit, &request, event, move |_, store| {
        let page = core(kms_core::audit::query(
            store,
            &AuditQuery {
                after_seq: req.after_seq,
                page: super::page_size(req.page_size),
                principal: &req.principal,
                key: &req.key,
                action: &req.action,
                decision: &req.decision,
                since_ms: req.since_ms,
                until_ms: req.until_ms,
            },
        ))?;
        Ok(page_response(page, core(stored_signers(store))?))
    })
    .await
}

fn page_response(page: AuditPage, signers: Signers) -> QueryAuditResponse {
    QueryAuditResponse {
        records: page
            .records
            .into_iter()
            .map(|r| AuditRecord {
                seq: r.seq,
                hash: hex::encode(r.hash),
                record_json: r.body,
            })
            .collect(),
        checkpoints: page
            .checkpoints
            .into_iter()
            .map(|c| AuditCheckpoint {
                seq: c.seq,
                head: c.head,
                time_ms: c.time_ms,
                key_id: c.key_id,
                signature: c.signature,
            })
            .collect(),
        signers: signers
            .into_iter()
            .map(|(key_id, point)| AuditSigner {
                key_id,
                public_key_pem: public_key_pem(&point),
            })
            .collect(),
        next_after_seq: page.next_after_seq,
        more: page.more,
    }
}

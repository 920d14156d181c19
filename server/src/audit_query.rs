//! `QueryAudit`: filtered pages of the audit log, with what is needed to verify them.

use api::v1::{AuditCheckpoint, AuditRecord, AuditSigner, QueryAuditRequest, QueryAuditResponse};
use kms_core::audit::{
    key_seq, public_key_pem, seq_key, split_record, stored_checkpoints, stored_signers, RecordBody,
};
use kms_core::store::Table;
use kms_core::Store;
use tonic::Status;

/// Largest page.
const MAX_PAGE: usize = 1000;
/// Page size when the caller gives none.
const DEFAULT_PAGE: usize = 100;
/// Most records one call reads while looking for matches.
const MAX_SCAN: usize = 20_000;

fn internal(e: &kms_core::Error) -> Status {
    tracing::error!(error = %e, "audit query failed");
    Status::internal("internal error")
}

/// Reads from `after_seq` on, keeping records that match every filter, until a page is full
/// or the scan budget is spent.
pub(crate) fn query_audit(
    store: &dyn Store,
    req: &QueryAuditRequest,
) -> Result<QueryAuditResponse, Status> {
    let page = match usize::try_from(req.page_size).unwrap_or(MAX_PAGE) {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    if !matches!(req.decision.as_str(), "" | "allow" | "deny") {
        return Err(Status::invalid_argument(
            "decision filter must be \"allow\" or \"deny\"",
        ));
    }
    let mut records = Vec::new();
    let mut next = req.after_seq;
    let mut scanned = 0usize;
    let mut more = true;
    while records.len() < page && scanned < MAX_SCAN {
        let rows = store
            .scan_from(
                Table::AuditRecords,
                &seq_key(next.saturating_add(1)),
                page.min(MAX_SCAN.saturating_sub(scanned)).max(1),
            )
            .map_err(|e| internal(&e))?;
        if rows.is_empty() {
            more = false;
            break;
        }
        for row in rows {
            scanned = scanned.saturating_add(1);
            let Some(seq) = key_seq(&row.key) else {
                continue;
            };
            next = seq;
            let Some((hash, body)) = split_record(&row.value) else {
                continue;
            };
            let Ok(parsed) = serde_json::from_slice::<RecordBody>(body) else {
                continue;
            };
            if matches(req, &parsed) {
                records.push(AuditRecord {
                    seq,
                    hash: hex::encode(hash),
                    record_json: String::from_utf8_lossy(body).into_owned(),
                });
                if records.len() >= page {
                    break;
                }
            }
        }
    }
    if more {
        more = !store
            .scan_from(Table::AuditRecords, &seq_key(next.saturating_add(1)), 1)
            .map_err(|e| internal(&e))?
            .is_empty();
    }
    let checkpoints = stored_checkpoints(store)
        .map_err(|e| internal(&e))?
        .into_iter()
        .filter_map(Result::ok)
        .filter(|c| c.seq > req.after_seq && c.seq <= next)
        .map(|c| AuditCheckpoint {
            seq: c.seq,
            head: c.head,
            time_ms: c.time_ms,
            key_id: c.key_id,
            signature: c.signature,
        })
        .collect();
    let signers = stored_signers(store)
        .map_err(|e| internal(&e))?
        .into_iter()
        .map(|(key_id, point)| AuditSigner {
            key_id,
            public_key_pem: public_key_pem(&point),
        })
        .collect();
    Ok(QueryAuditResponse {
        records,
        checkpoints,
        signers,
        next_after_seq: next,
        more,
    })
}

fn matches(req: &QueryAuditRequest, body: &RecordBody) -> bool {
    let e = &body.event;
    (req.principal.is_empty() || e.principal.as_deref() == Some(req.principal.as_str()))
        && (req.key.is_empty() || e.key.as_deref() == Some(req.key.as_str()))
        && (req.action.is_empty() || e.action == req.action)
        && (req.decision.is_empty() || e.decision.as_deref() == Some(req.decision.as_str()))
        && (req.since_ms == 0 || body.time_ms >= req.since_ms)
        && (req.until_ms == 0 || body.time_ms < req.until_ms)
}

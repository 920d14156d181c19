//! Backup export (docs/RECOVERY.md, "Export"): gated by approvals. The first call stores an
//! approval request and answers with it; the M-th approval runs the change, which is a
//! single-use ticket for the requester, valid for an hour ([`TICKET`]); the requester's next call
//! consumes the ticket (synced), forces a signed audit checkpoint over a `backup.export`
//! record, makes the bundle from one store snapshot and streams it.

use std::pin::Pin;

use api::v1::{BackupChunk, BackupSummary, ExportBackupRequest};
use kms_core::backup::ExportRequest;
use kms_core::bundle::AuditHead;
use kms_core::governance::actions::GatedAction;
use kms_core::governance::approvals::{ApprovalRequest, NewRequest, Ticket};
use kms_core::store::Table;
use kms_core::OperatorId;
use prost::Message;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{core, AdminService};
use crate::audit::status_word;

/// The gated action.
pub(super) const ACTION: GatedAction = GatedAction::ExportBackup;
/// An approved export: the requester may download one bundle within the hour.
pub(super) const TICKET: Ticket = Ticket::new(ACTION, 3600, b"export-used/");
/// Bytes per streamed message (a 10,000-version bundle is about 12 MB).
const CHUNK: usize = 1 << 20;

/// The stream an export answers with.
pub(crate) type ExportStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;

/// What the approved change does: nothing yet but say so; the ticket is the executed request.
pub(super) fn ticket_result(r: &ApprovalRequest, now: u64) -> String {
    TICKET.result(
        r,
        now,
        "the requester runs `kms backup export --out FILE` again to download it",
    )
}

/// The requester's unused, unexpired ticket, if any.
fn find_ticket(svc: &AdminService, who: &OperatorId) -> Result<Option<ApprovalRequest>, Status> {
    let now = svc.gov.clock.now_unix();
    for r in core(svc.gov.approvals.all())? {
        if r.requested_by == who.as_str()
            && core(TICKET.check(svc.store.as_ref(), &r, now))?.is_ok()
        {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

fn one(chunk: BackupChunk) -> ExportStream {
    Box::pin(tokio_stream::iter(vec![Ok(chunk)]))
}

// long: the ticket check, the snapshot and the stream of one export, in order.
pub(super) async fn export(
    svc: &AdminService,
    request: Request<ExportBackupRequest>,
) -> Result<Response<ExportStream>, Status> {
    let (operator, mut intent) = svc.intent(ACTION.action(), &request)?;
    let gated = svc.gov.approvals.rules().gates(ACTION.action());
    let ticket = if gated {
        let _serial = svc.gov.approval_lock.lock().await;
        let svc2 = svc.clone();
        let who = operator.clone();
        let found = tokio::task::spawn_blocking(move || find_ticket(&svc2, &who))
            .await
            .map_err(|_| Status::internal("internal error"))??;
        match found {
            Some(t) => {
                // Consumed before anything is made: a ticket serves one download, even if
                // this one fails.
                core(
                    svc.store
                        .write(vec![TICKET.consume(&t.id, operator.as_str())]),
                )?;
                Some(t)
            }
            None => {
                drop(_serial);
                intent.detail.insert("target".into(), "backup".into());
                let new = NewRequest {
                    action: ACTION,
                    target: "backup".into(),
                    request: request.get_ref().encode_to_vec(),
                    view: serde_json::json!({
                        "export": "a backup bundle of the whole store, every secret in it sealed to the recovery key",
                        "ticket_valid_secs": TICKET.secs,
                    })
                    .to_string(),
                    diff: None,
                    requested_by: operator.to_string(),
                };
                let req = svc.ask(&operator, intent, new).await?;
                return Ok(Response::new(one(BackupChunk {
                    approval: Some(super::approval::info(&svc.gov, &req)),
                    ..BackupChunk::default()
                })));
            }
        }
    } else {
        None
    };
    let approval_id = ticket.as_ref().map(|t| t.id.clone());
    intent.detail.insert("target".into(), "backup".into());
    if let Some(id) = &approval_id {
        intent.detail.insert("approval_id".into(), id.clone());
    }
    let mut bundle_id = [0u8; 16];
    core(svc.gov.rng.fill(&mut bundle_id))?;
    let bundle_id = hex::encode(bundle_id);
    intent.detail.insert("bundle_id".into(), bundle_id.clone());
    // The bundle's head: this record, with a checkpoint signed over it in the same write.
    let head_seq = svc.audit.record_checkpointed(intent.clone()).await?;
    let result = make(svc, &operator, ticket.as_ref(), bundle_id, head_seq).await;
    let mut done = intent;
    done.action = "backup.exported".into();
    done.status = status_word(result.as_ref().err());
    if let Ok((summary, _)) = &result {
        done.detail
            .insert("bundle_sha256".into(), summary.bundle_sha256.clone());
        done.detail
            .insert("key_versions".into(), summary.key_versions.to_string());
        done.detail.insert("size".into(), summary.size.to_string());
        if let Some(t) = &ticket {
            let approvers: Vec<&str> = t.approvals.iter().map(|v| v.operator.as_str()).collect();
            done.detail.insert("approvers".into(), approvers.join(","));
        }
    }
    svc.outcome(done, &operator, &result).await;
    let (summary, bytes) = result?;
    let mut chunks: Vec<Result<BackupChunk, Status>> = bytes
        .chunks(CHUNK)
        .map(|c| {
            Ok(BackupChunk {
                data: c.to_vec(),
                ..BackupChunk::default()
            })
        })
        .collect();
    chunks.push(Ok(BackupChunk {
        summary: Some(summary),
        ..BackupChunk::default()
    }));
    Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
}

async fn make(
    svc: &AdminService,
    operator: &OperatorId,
    ticket: Option<&ApprovalRequest>,
    bundle_id: String,
    head_seq: Option<u64>,
) -> Result<(BackupSummary, Vec<u8>), Status> {
    let store = svc.store.clone();
    let kms = svc.kms.clone();
    let req = ExportRequest {
        bundle_id: bundle_id.clone(),
        exported_at: svc.gov.clock.now_unix(),
        exported_by: operator.to_string(),
        approval_id: ticket.map(|t| t.id.clone()),
        audit_head: AuditHead {
            seq: 0,
            hash: String::new(),
        },
        config: svc.gov.deployment_settings.clone(),
    };
    let approval_id = req.approval_id.clone().unwrap_or_default();
    let exported = tokio::task::spawn_blocking(move || {
        let mut req = req;
        let (seq, hash) = match head_seq {
            Some(seq) => (
                seq,
                core(kms_core::audit::stored_hash(store.as_ref(), seq))?,
            ),
            None => match core(store.last(Table::AuditRecords))? {
                Some(row) => {
                    let seq = kms_core::audit::key_seq(&row.key).unwrap_or(0);
                    (
                        seq,
                        kms_core::audit::split_record(&row.value).map(|(h, _)| h),
                    )
                }
                None => (0, Some(kms_core::audit::GENESIS)),
            },
        };
        let hash = hash.ok_or_else(|| Status::internal("the audit head is not in the store"))?;
        req.audit_head = AuditHead {
            seq,
            hash: hex::encode(hash),
        };
        core(kms.export_backup(req))
    })
    .await
    .map_err(|_| Status::internal("internal error"))??;
    let sha = kms_core::audit::sha256_hex(&exported.bytes);
    let summary = BackupSummary {
        bundle_id,
        bundle_sha256: sha,
        key_versions: exported.key_versions,
        size: u64::try_from(exported.bytes.len()).unwrap_or(u64::MAX),
        approval_id,
    };
    Ok((summary, exported.bytes))
}

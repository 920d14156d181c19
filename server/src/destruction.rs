//! The destruction timer: once a second, with the server's injected clock, it carries out
//! every key destruction that is due (docs/APPROVALS.md), records each receipt in the audit
//! log, and only then stores the receipt beside the key. A failure is logged and retried on
//! the next tick; the core's steps can be repeated, so nothing is left half done.

use std::sync::Arc;
use std::time::Duration;

use kms_core::audit::AuditEvent;
use kms_core::receipt::Receipt;
use kms_core::{Clock, KeyId, Kms};

use crate::audit::Audit;

/// How often the timer looks for due destructions.
pub const DESTRUCTION_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Who the audit log names as the actor of a destruction: the server, on its clock.
const ACTOR: &str = "kms serve (destruction timer)";

/// Carries out every destruction due now. Returns how many keys were destroyed.
pub(crate) async fn run_due(kms: &Arc<Kms>, audit: &Audit, clock: &Arc<dyn Clock>) -> usize {
    let now = clock.now_unix();
    let mut done = 0;
    for id in kms.destructions_due(now) {
        match destroy(kms, audit, id, now).await {
            Ok(true) => done += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(key_id = %id, error = %e, "key destruction did not finish; retrying on the next check")
            }
        }
    }
    done
}

async fn destroy(kms: &Arc<Kms>, audit: &Audit, id: KeyId, now: u64) -> Result<bool, String> {
    let k = kms.clone();
    let receipt = tokio::task::spawn_blocking(move || k.destroy_if_due(id, now))
        .await
        .map_err(|_| "the destruction task stopped".to_owned())?
        .map_err(|e| e.to_string())?;
    let Some(receipt) = receipt else {
        return Ok(false);
    };
    let text = receipt.to_text().map_err(|e| e.to_string())?;
    audit
        .record(event(&receipt, &text))
        .await
        .map_err(|s| format!("the receipt could not be recorded: {}", s.message()))?;
    let k = kms.clone();
    tokio::task::spawn_blocking(move || k.record_receipt(id, text))
        .await
        .map_err(|_| "the destruction task stopped".to_owned())?
        .map_err(|e| e.to_string())?;
    tracing::info!("destruction receipt recorded for key {id}");
    Ok(true)
}

/// The `key.destroyed` record: the receipt's hash and signature, and what it states.
fn event(receipt: &Receipt, text: &str) -> AuditEvent {
    let s = &receipt.statement;
    let mut e = AuditEvent::new("key.destroyed", "ok")
        .by(ACTOR)
        .on_key(&s.key_id);
    let versions: Vec<String> = s.versions.iter().map(|v| v.version.to_string()).collect();
    let objects: Vec<String> = s
        .versions
        .iter()
        .filter_map(|v| v.token_object.as_ref())
        .map(|o| format!("{}#{}", o.label, o.cka_id.as_deref().unwrap_or("")))
        .collect();
    for (k, v) in [
        (
            "receipt_sha256",
            kms_core::audit::sha256_hex(text.as_bytes()),
        ),
        ("signature", receipt.signature.value.clone()),
        ("signer", receipt.signature.key_id.clone()),
        ("versions", versions.join(",")),
        ("token_objects", objects.join(",")),
        ("requested_by", s.requested_by.clone()),
        ("approvers", s.approvers.join(",")),
        ("approval_id", s.approval_id.clone().unwrap_or_default()),
        ("destroyed_at", s.destroyed_at.to_string()),
    ] {
        e.detail.insert(k.into(), v);
    }
    e
}

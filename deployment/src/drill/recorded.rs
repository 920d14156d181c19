//! Whether a production deployment recorded a drill report: its `drill.recorded` record,
//! found in an audit export verified under the production signer's key.

use std::path::Path;

use kms_core::audit::RecordBody;

use crate::error::Error;

/// Where a production audit export records a drill report.
#[derive(Debug)]
pub struct RecordedIn {
    /// The `drill.recorded` record's sequence number.
    pub seq: u64,
    /// The operator who recorded it.
    pub by: Option<String>,
    /// The signed checkpoint that covers it.
    pub checkpoint_seq: u64,
}

/// Finds the `drill.recorded` record of `sha` in an export verified under `pem`, covered by
/// a signed checkpoint.
pub fn recorded_in(export: &Path, pem: &Path, sha: &str) -> Result<RecordedIn, Error> {
    let trusted = crate::audit::trusted_keys(pem)?;
    let report = crate::audit::verify_file(export, Some(&trusted), None, None, None)?;
    if let Some(seq) = report.first_bad_seq {
        return Err(Error::AuditBroken {
            seq,
            problem: report.problem.unwrap_or_default(),
        });
    }
    let covered_to = report.last_checkpoint.as_ref().map_or(0, |c| c.seq);
    let mut found = None;
    crate::audit::for_each_line(export, |_, line| {
        if line.kind != "record" || found.is_some() {
            return Ok(());
        }
        let Some(raw) = &line.record else {
            return Ok(());
        };
        let Ok(body) = serde_json::from_str::<RecordBody>(raw.get()) else {
            return Ok(());
        };
        let e = &body.event;
        if e.action == kms_core::drill::RECORDED_ACTION
            && e.status == "ok"
            && e.detail.get("report_sha256").map(String::as_str) == Some(sha)
        {
            found = Some((body.seq, e.principal.clone()));
        }
        Ok(())
    })?;
    match found {
        None => Err(Error::NotRecorded(format!(
            "{}: no drill.recorded record names report {sha}: this report was not recorded in \
             that deployment",
            export.display()
        ))),
        Some((seq, _)) if seq > covered_to => Err(Error::NotRecorded(format!(
            "{}: the drill.recorded record (seq {seq}) is not yet covered by a signed checkpoint \
             (last at {covered_to}); export again after the next checkpoint",
            export.display()
        ))),
        Some((seq, by)) => Ok(RecordedIn {
            seq,
            by,
            checkpoint_seq: covered_to,
        }),
    }
}

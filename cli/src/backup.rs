//! `kms backup`: export a backup bundle over the admin plane (a gated change) and inspect one
//! offline (docs/RECOVERY.md).

use std::path::{Path, PathBuf};

use api::v1::ExportBackupRequest;
use clap::Subcommand;
use kms_deployment::backup;
use serde_json::{json, Value};

use crate::approval::emit_change;
use crate::connect::ConnectArgs;
use crate::error::Error;
use crate::output::{emit, rfc3339};

/// `kms backup`.
#[derive(Subcommand, Debug)]
pub(crate) enum BackupCommand {
    /// Export a backup bundle of the whole deployment (gated by approvals). The first run
    /// prints the pending approval; once other operators approve it, run the same command
    /// again (within an hour) to download the bundle. Every secret in it is sealed to the
    /// custodians' recovery key.
    Export(ExportArgs),
    /// Show what a bundle holds (counts, hash, ceremony epoch, export time, audit head)
    /// and check its structure; no secret is needed and none is shown.
    Inspect(InspectArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct ExportArgs {
    /// Where to write the bundle (refused if it exists; written as FILE.partial first).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Wait for the approvals, then download, instead of printing the pending approval.
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct InspectArgs {
    /// The bundle file.
    file: PathBuf,
}

pub(crate) async fn run(
    cmd: BackupCommand,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    match cmd {
        BackupCommand::Export(args) => export(&args, conn, as_json).await,
        BackupCommand::Inspect(args) => inspect(&args.file, as_json),
    }
}

async fn export(args: &ExportArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    backup::check_out(&args.out)?;
    let mut client = conn.admin().await?;
    loop {
        let mut stream = client
            .export_backup(ExportBackupRequest {})
            .await?
            .into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Error::Usage("the server sent an empty export".into()))?;
        if let Some(approval) = &first.approval {
            if !args.wait {
                return emit_change(as_json, Some(approval), || Value::Null);
            }
            tracing::info!(approval = %approval.id, "waiting for approvals of the export");
            backup::wait_executed(&mut client, &approval.id).await?;
            continue;
        }
        let summary = backup::download(&args.out, first, &mut stream).await?;
        return emit(
            as_json,
            &json!({
                "bundle_sha256": summary.bundle_sha256,
                "key_versions": summary.key_versions,
                "bundle_id": summary.bundle_id,
                "size": summary.size,
                "approval_id": (!summary.approval_id.is_empty()).then_some(&summary.approval_id),
                "out": args.out.display().to_string(),
            }),
        );
    }
}

fn inspect(file: &Path, as_json: bool) -> Result<(), Error> {
    let (bundle, sha, size) = backup::load(file)?;
    let h = &bundle.header;
    let versions = h.counts.get("versions").copied().unwrap_or(0);
    if as_json {
        return emit(
            true,
            &json!({
                "file": file.display().to_string(),
                "bundle_sha256": sha,
                "size": size,
                "format": h.format,
                "bundle_id": h.bundle_id,
                "exported_at": h.exported_at,
                "exported_at_rfc3339": rfc3339(h.exported_at),
                "exported_by": h.exported_by,
                "approval_id": h.approval_id,
                "ceremony_id": h.ceremony_id,
                "epoch": h.epoch,
                "transcript_sha256": h.transcript_sha256,
                "audit_head": { "seq": h.audit_head.seq, "hash": h.audit_head.hash },
                "signer": { "id": h.signer.id, "public_point": h.signer.public_point },
                "key_versions": versions,
                "counts": h.counts,
                "config": h.config,
                "records": bundle.records.len(),
                "structure": "ok: bounds, order and body hash checked",
                "signature": "not checked: only the custodians' quorum can tell the pinned signer (kms ceremony recover)",
            }),
        );
    }
    let exported = rfc3339(h.exported_at);
    let mut text = format!(
        "bundle {}\n  sha256       {sha}\n  size         {size} bytes\n  exported     {} by {}\n  ceremony     {} epoch {}\n  audit head   record {} ({})\n  signer       {}\n  key versions {versions}\n  counts:\n",
        file.display(),
        exported.as_str().unwrap_or("-"),
        h.exported_by,
        h.ceremony_id,
        h.epoch,
        h.audit_head.seq,
        h.audit_head.hash,
        h.signer.id,
    );
    for (k, n) in &h.counts {
        text.push_str(&format!("    {k:<22} {n}\n"));
    }
    text.push_str(
        "  structure ok; the signature is checked by the custodians' quorum at recovery\n",
    );
    crate::output::raw(&text)
}

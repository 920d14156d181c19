//! `kms backup`: export a backup bundle over the admin plane (a gated change) and inspect one
//! offline (docs/RECOVERY.md).

use std::io::Write;
use std::path::{Path, PathBuf};

use api::v1::{ApprovalId, ExportBackupRequest};
use clap::Subcommand;
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

fn partial(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

async fn export(args: &ExportArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    // Checked before the request, so that an approved ticket is not spent on a refusal.
    for path in [args.out.clone(), partial(&args.out)] {
        if path.exists() {
            return Err(Error::Usage(format!(
                "{} exists; choose another --out (a bundle is never overwritten)",
                path.display()
            )));
        }
    }
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
            wait_executed(&mut client, &approval.id).await?;
            continue;
        }
        return download(args, first, &mut stream, as_json).await;
    }
}

/// Polls the approval until it has run; an error if it ends otherwise.
async fn wait_executed(client: &mut api::AdminClient, id: &str) -> Result<(), Error> {
    loop {
        let a = client
            .get_approval(ApprovalId { id: id.to_owned() })
            .await?
            .into_inner();
        match a.state.as_str() {
            "executed" => return Ok(()),
            "pending" => tokio::time::sleep(std::time::Duration::from_secs(2)).await,
            other => {
                return Err(Error::Usage(format!(
                    "approval {id} ended {other}: {}",
                    a.reason
                )))
            }
        }
    }
}

async fn download(
    args: &ExportArgs,
    first: api::v1::BackupChunk,
    stream: &mut tonic::Streaming<api::v1::BackupChunk>,
    as_json: bool,
) -> Result<(), Error> {
    let tmp = partial(&args.out);
    let file_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::File { what, path, source }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(file_err("cannot create", &tmp))?;
    let result = async {
        let mut bytes = Vec::new();
        let mut next = Some(first);
        let summary = loop {
            let Some(chunk) = next.take() else {
                return Err(Error::Usage(
                    "the export ended before its summary: the bundle is incomplete".into(),
                ));
            };
            if let Some(summary) = chunk.summary {
                break summary;
            }
            bytes.extend_from_slice(&chunk.data);
            next = stream.message().await?;
        };
        let sha = kms_core::audit::sha256_hex(&bytes);
        if sha != summary.bundle_sha256 {
            return Err(Error::Usage(
                "the bundle received does not match the hash the server sent".into(),
            ));
        }
        kms_core::bundle::parse(&bytes).map_err(|source| Error::Bundle {
            file: tmp.clone(),
            source,
        })?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(file_err("cannot write", &tmp))?;
        std::fs::rename(&tmp, &args.out).map_err(file_err("cannot write", &args.out))?;
        Ok(summary)
    }
    .await;
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    emit(
        as_json,
        &json!({
            "bundle_sha256": summary.bundle_sha256,
            "key_versions": summary.key_versions,
            "bundle_id": summary.bundle_id,
            "size": summary.size,
            "approval_id": (!summary.approval_id.is_empty()).then_some(&summary.approval_id),
            "out": args.out.display().to_string(),
        }),
    )
}

/// A bundle read and checked for structure: the bundle, its SHA-256 (hex) and its size.
fn load(file: &Path) -> Result<(kms_core::bundle::Bundle, String, usize), Error> {
    let bytes = crate::error::read(file)?;
    let bundle = kms_core::bundle::parse(&bytes).map_err(|source| Error::Bundle {
        file: file.to_path_buf(),
        source,
    })?;
    let sha = kms_core::audit::sha256_hex(&bytes);
    Ok((bundle, sha, bytes.len()))
}

fn inspect(file: &Path, as_json: bool) -> Result<(), Error> {
    let (bundle, sha, size) = load(file)?;
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

//! `kms audit`: verify, export and read the signer keys of the tamper-evident audit log.
//!
//! `verify` and `public-key` work offline, on a stopped (or running) server's data directory
//! or on an exported file. `export` reads the data directory, or asks a running server
//! (`--server`, or `--follow`) through `QueryAudit`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use api::v1::QueryAuditRequest;
use clap::{Args, Subcommand};
use kms_core::audit::{
    public_key_from_pem, stored_signers, verify_store, Checkpoint, ExpectedHead, ExportLine,
    Report, VerifyOptions,
};
use kms_deployment::audit::{
    bad_line, export_store, for_each_line, open_store, parse_since, trusted_keys, verify_file,
    Since,
};

use crate::connect::{ConnectArgs, Plane};
use crate::error::{read, Error};
use crate::output::{emit, rfc3339};

/// `kms audit ...`
#[derive(Subcommand, Debug)]
pub(crate) enum AuditCommand {
    /// Check every record's hash, the chain, sequence numbers and checkpoint signatures.
    /// Exits 0 when the log is intact, 1 when it is not (naming the first broken record).
    Verify(VerifyArgs),
    /// Write the log as JSON Lines (signer keys, records, checkpoints) for a SIEM or for
    /// `kms audit verify --file`.
    Export(ExportArgs),
    /// Print the checkpoint signers' public keys (PEM). Keep a copy away from the server and
    /// pass it to `verify --public-key`.
    PublicKey(PublicKeyArgs),
    /// Check a key destruction receipt offline (from `kms key destruction-receipt`): its
    /// signature under the given public key, and that no byte of it was changed. Exits 0 when
    /// it verifies, 1 when it does not.
    VerifyReceipt(VerifyReceiptArgs),
}

/// Options of `kms audit verify-receipt`.
#[derive(Args, Debug)]
pub(crate) struct VerifyReceiptArgs {
    /// The receipt file.
    file: PathBuf,
    /// The audit signer's public key(s), PEM (from `kms audit public-key`), kept away from
    /// the server.
    #[arg(long)]
    public_key: PathBuf,
}

/// Options of `kms audit verify`.
#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    /// Verify an exported file instead of --data-dir.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Trust only the public key(s) in this PEM file (from `kms audit public-key`), not the
    /// ones recorded in the log itself.
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// Start at this sequence number (records before it are not checked).
    #[arg(long)]
    from: Option<u64>,
    /// A head known from elsewhere, as SEQ:HASH (a checkpoint's `seq` and `head`, kept by a
    /// SIEM or printed by an earlier verify): the log must hold exactly that record, so a log
    /// cut before it is reported as truncated.
    #[arg(long, value_name = "SEQ:HASH", conflicts_with = "expect_checkpoint")]
    expect_head: Option<String>,
    /// Like --expect-head, from the last checkpoint line of an export kept elsewhere (its
    /// signature is checked too).
    #[arg(long, value_name = "FILE")]
    expect_checkpoint: Option<PathBuf>,
    /// Exit 0 even if records after the last signed checkpoint (or expected head) are not
    /// covered by a signature. Without it, such a tail fails the check: nothing proves that
    /// records were not dropped from it.
    #[arg(long)]
    allow_unanchored: bool,
}

/// Options of `kms audit export`.
#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// First record: a sequence number, or a time (RFC 3339, e.g. 2026-11-22T10:00:00Z).
    #[arg(long, default_value = "1")]
    since: String,
    /// Output file (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep running and write new records as they are made (asks the running server).
    #[arg(long)]
    follow: bool,
}

/// Options of `kms audit public-key`.
#[derive(Args, Debug)]
pub(crate) struct PublicKeyArgs {
    /// Write to this file instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs one `kms audit` command.
pub(crate) async fn run(cmd: AuditCommand, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    match cmd {
        AuditCommand::Verify(args) => verify(&args, conn, as_json),
        AuditCommand::Export(args) => {
            if conn.server.is_some() || args.follow {
                export_remote(&args, conn).await
            } else {
                export_local(&args, &conn.data_dir)
            }
        }
        AuditCommand::VerifyReceipt(args) => verify_receipt(&args, as_json),
        AuditCommand::PublicKey(args) => {
            let store = open_store(&conn.data_dir)?;
            let signers = stored_signers(&store)?;
            if signers.is_empty() {
                return Err(Error::Usage(format!(
                    "no audit signing key recorded in {} (has the server started once?)",
                    conn.data_dir.display()
                )));
            }
            let pem: String = signers
                .values()
                .map(|p| kms_core::audit::public_key_pem(p))
                .collect();
            let mut out = Output::open(args.out.as_deref())?;
            out.write(pem.as_bytes())?;
            out.finish()
        }
    }
}

/// Checks a receipt against every key in the PEM file; the first that verifies it wins, and
/// otherwise the answer is the complaint under the key the receipt names (or the first).
fn verify_receipt(args: &VerifyReceiptArgs, as_json: bool) -> Result<(), Error> {
    use kms_core::receipt::{verify, ReceiptError};
    let keys = trusted_keys(&args.public_key)?;
    let file = read(&args.file)?;
    let mut refusal = None;
    for point in keys.values() {
        match verify(&file, point) {
            Ok(receipt) => return print_receipt(&receipt, as_json),
            Err(e @ ReceiptError::OtherSigner { .. }) => {
                refusal.get_or_insert(e);
            }
            // A complaint about the file itself, or under the key the receipt names.
            Err(e) => refusal = Some(e),
        }
    }
    Err(match refusal {
        Some(e) => Error::Receipt(e),
        None => Error::Usage("no public key to check the receipt with".into()),
    })
}

fn print_receipt(r: &kms_core::receipt::Receipt, as_json: bool) -> Result<(), Error> {
    let s = &r.statement;
    let objects: Vec<serde_json::Value> = s
        .versions
        .iter()
        .filter_map(|v| v.token_object.as_ref())
        .map(|o| serde_json::json!({ "label": o.label, "cka_id": o.cka_id }))
        .collect();
    let value = serde_json::json!({
        "valid": true,
        "key_id": s.key_id,
        "alias": s.alias,
        "versions": s.versions.iter().map(|v| v.version.get()).collect::<Vec<_>>(),
        "token_objects": objects,
        "destroyed_at": rfc3339(s.destroyed_at),
        "requested_by": s.requested_by,
        "approvers": s.approvers,
        "approval_id": s.approval_id,
        "signer": r.signature.key_id,
        "not_covered": s.not_covered,
    });
    if as_json {
        return emit(true, &value);
    }
    crate::output::raw(&format!(
        "receipt valid: key {} destroyed at {} ({} version(s), {} token object(s)), signed by \
         {}\nit cannot cover: {}\n",
        s.key_id,
        rfc3339(s.destroyed_at).as_str().unwrap_or("-"),
        s.versions.len(),
        objects.len(),
        r.signature.key_id,
        s.not_covered.join("; "),
    ))
}

fn verify(args: &VerifyArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let trusted = args.public_key.as_deref().map(trusted_keys).transpose()?;
    let (expected, extra) = expected_head(args)?;
    let report = match &args.file {
        Some(file) => verify_file(file, trusted.as_ref(), args.from, expected, extra)?,
        None => {
            let store = open_store(&conn.data_dir)?;
            // A checkpoint from elsewhere is checked with the ones in the store.
            let options = VerifyOptions::new(args.from, expected, extra.into_iter().collect());
            verify_store(&store, trusted.as_ref(), options)?
        }
    };
    if trusted.is_none() {
        eprintln_note(
            "checkpoint signatures were checked against the public key recorded in the log \
             itself; pass --public-key with a copy kept elsewhere to rule out a replaced key",
        );
    }
    let unanchored_tail = report.ok && report.unanchored > 0 && !args.allow_unanchored;
    print_report(&report, unanchored_tail, as_json)?;
    if let Some(seq) = report.first_bad_seq {
        return Err(Error::AuditBroken {
            seq,
            problem: report.problem.unwrap_or_default(),
        });
    }
    if unanchored_tail {
        let last = report.last_seq.unwrap_or_default();
        return Err(Error::AuditUnanchored {
            from: last.saturating_sub(report.unanchored).saturating_add(1),
            last,
        });
    }
    Ok(())
}

/// The head given with --expect-head or --expect-checkpoint, and for the latter the
/// checkpoint itself (so that its signature is checked).
fn expected_head(args: &VerifyArgs) -> Result<(Option<ExpectedHead>, Option<Checkpoint>), Error> {
    if let Some(text) = &args.expect_head {
        let bad = || {
            Error::Usage(format!(
                "--expect-head {text}: expected SEQ:HASH, a sequence number and the record's \
                 64-digit hex hash"
            ))
        };
        let (seq, hash) = text.split_once(':').ok_or_else(bad)?;
        let seq: u64 = seq.trim().parse().map_err(|_| bad())?;
        let hash: [u8; 32] = hex::decode(hash.trim())
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(bad)?;
        return Ok((Some(ExpectedHead { seq, hash }), None));
    }
    let Some(path) = &args.expect_checkpoint else {
        return Ok((None, None));
    };
    let mut last = None;
    for_each_line(path, |n, line| {
        if line.kind == "checkpoint" {
            last = Some(line.as_checkpoint().ok_or_else(|| bad_line(path, n))?);
        }
        Ok(())
    })?;
    let cp =
        last.ok_or_else(|| Error::Usage(format!("{}: no checkpoint line in it", path.display())))?;
    let hash: [u8; 32] = hex::decode(&cp.head)
        .ok()
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| {
            Error::Usage(format!(
                "{}: the checkpoint's head is not a hash",
                path.display()
            ))
        })?;
    Ok((Some(ExpectedHead { seq: cp.seq, hash }), Some(cp)))
}

fn eprintln_note(note: &str) {
    let _ = writeln!(std::io::stderr().lock(), "note: {note}");
}

fn print_report(report: &Report, unanchored_tail: bool, as_json: bool) -> Result<(), Error> {
    if as_json {
        return emit(true, &report_json(report, unanchored_tail)?);
    }
    let range = match (report.first_seq, report.last_seq) {
        (Some(a), Some(b)) => format!(" (records {a}..{b})"),
        _ => String::new(),
    };
    let mut text = match report.ok {
        true => format!(
            "audit log intact: {} records{range}, {} checkpoints verified",
            report.records, report.checkpoints
        ),
        false => format!(
            "audit log BROKEN at record {}: {}",
            report.first_bad_seq.unwrap_or_default(),
            report.problem.as_deref().unwrap_or("unknown")
        ),
    };
    if let Some(r) = &report.recovered {
        text.push_str(&format!(
            "; continues a recovered deployment at record {} (custody.recovered, bundle {}), after the old log's record {} ({})",
            r.seq, r.bundle_sha256, r.bundle_head_seq, r.bundle_head_hash
        ));
    }
    if let Some(cp) = &report.last_checkpoint {
        text.push_str(&format!(
            "; last signed checkpoint: record {} at {}",
            cp.seq,
            rfc3339(cp.time_ms / 1000)
                .as_str()
                .unwrap_or("an unknown time")
        ));
    }
    if report.expected_head == Some(true) {
        text.push_str("; the expected head is in the log");
    }
    if report.ok && report.unanchored > 0 {
        text.push_str(&format!(
            "; the last {} records are not covered by a signed checkpoint{}",
            report.unanchored,
            if unanchored_tail { "" } else { " (accepted)" }
        ));
    }
    text.push('\n');
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .map_err(|source| Error::File {
            what: "cannot write to",
            path: "stdout".into(),
            source,
        })
}

/// The report as JSON, with the last checkpoint's time in RFC 3339 and whether an unanchored
/// tail was accepted.
fn report_json(report: &Report, unanchored_tail: bool) -> Result<serde_json::Value, Error> {
    let mut value = serde_json::to_value(report).map_err(|e| Error::Usage(e.to_string()))?;
    if let Some(object) = value.as_object_mut() {
        if let (Some(cp), Some(seen)) = (
            &report.last_checkpoint,
            object
                .get_mut("last_checkpoint")
                .and_then(|v| v.as_object_mut()),
        ) {
            seen.insert("time".into(), rfc3339(cp.time_ms / 1000));
        }
        object.insert("unanchored_accepted".into(), (!unanchored_tail).into());
    }
    Ok(value)
}

/// Standard output or a file, line-buffered.
struct Output {
    out: Box<dyn Write>,
    path: PathBuf,
}

impl Output {
    fn open(path: Option<&Path>) -> Result<Self, Error> {
        Ok(match path {
            Some(p) => Self {
                out: Box::new(std::io::BufWriter::new(std::fs::File::create(p).map_err(
                    |source| Error::File {
                        what: "cannot write",
                        path: p.to_path_buf(),
                        source,
                    },
                )?)),
                path: p.to_path_buf(),
            },
            None => Self {
                out: Box::new(std::io::stdout()),
                path: "stdout".into(),
            },
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.out.write_all(bytes).map_err(|source| Error::File {
            what: "cannot write",
            path: self.path.clone(),
            source,
        })
    }

    fn line(&mut self, line: &ExportLine) -> Result<(), Error> {
        let mut text = serde_json::to_string(line).map_err(|e| Error::Usage(e.to_string()))?;
        text.push('\n');
        self.write(text.as_bytes())
    }

    fn finish(mut self) -> Result<(), Error> {
        self.out.flush().map_err(|source| Error::File {
            what: "cannot write",
            path: self.path.clone(),
            source,
        })
    }
}

fn export_local(args: &ExportArgs, data_dir: &Path) -> Result<(), Error> {
    let since = parse_since(&args.since)?;
    let mut out = Output::open(args.out.as_deref())?;
    export_store(data_dir, since, &mut |line| out.line(line))?;
    out.finish()
}

async fn export_remote(args: &ExportArgs, conn: &ConnectArgs) -> Result<(), Error> {
    let since = parse_since(&args.since)?;
    let (addr, tls) = conn.resolve(Plane::Admin)?;
    let mut client = tls.admin(&addr).await?;
    let mut out = Output::open(args.out.as_deref())?;
    let mut after = match since {
        Since::Seq(s) => s.saturating_sub(1),
        Since::TimeMs(_) => 0,
    };
    let since_ms = match since {
        Since::TimeMs(ms) => ms,
        Since::Seq(_) => 0,
    };
    let mut signers_written = std::collections::BTreeSet::new();
    loop {
        let page = client
            .query_audit(QueryAuditRequest {
                after_seq: after,
                page_size: 1000,
                since_ms,
                ..QueryAuditRequest::default()
            })
            .await?
            .into_inner();
        for s in &page.signers {
            if signers_written.insert(s.key_id.clone()) {
                if let Some(point) = public_key_from_pem(&s.public_key_pem) {
                    out.line(&ExportLine::signer(&s.key_id, &point))?;
                }
            }
        }
        let mut checkpoints = page.checkpoints.into_iter().peekable();
        for r in &page.records {
            let mut value = hex::decode(&r.hash).unwrap_or_default();
            value.extend_from_slice(r.record_json.as_bytes());
            if let Some(line) = ExportLine::record(r.seq, &value) {
                out.line(&line)?;
            }
            while let Some(cp) = checkpoints.next_if(|c| c.seq <= r.seq) {
                out.line(&checkpoint_line(cp))?;
            }
        }
        for cp in checkpoints {
            out.line(&checkpoint_line(cp))?;
        }
        after = page.next_after_seq.max(after);
        if !page.more {
            if !args.follow {
                break;
            }
            out.out.flush().map_err(|source| Error::File {
                what: "cannot write",
                path: out.path.clone(),
                source,
            })?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    out.finish()
}

fn checkpoint_line(cp: api::v1::AuditCheckpoint) -> ExportLine {
    ExportLine::checkpoint(&Checkpoint::new(
        cp.seq,
        cp.head,
        cp.time_ms,
        cp.key_id,
        cp.signature,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_sequence_number_or_a_time() {
        assert!(matches!(parse_since("42"), Ok(Since::Seq(42))));
        assert!(matches!(parse_since("0"), Ok(Since::Seq(1))));
        assert!(matches!(
            parse_since("2026-11-22T10:00:00Z"),
            Ok(Since::TimeMs(1_795_341_600_000))
        ));
        assert!(parse_since("yesterday").is_err());
    }
}

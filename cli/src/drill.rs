//! `kms drill provider-exit` and `kms drill verify-report` (docs/DRILL.md). The drill itself
//! is `kms_deployment::drill`'s; this module reads the flags, draws the progress, records the
//! report on the live deployment when asked, and prints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use api::v1::{ListKeysRequest, RecordDrillRequest};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kms_core::drill::{LiveKey, Report};
use kms_deployment::drill::{self, Finished, ProviderExit, TargetToken};
use serde_json::{json, Value};

use crate::connect::ConnectArgs;
use crate::error::{read, Error};
use crate::output::emit;
use crate::recover::ShareArgs;

/// `kms drill ...`
#[derive(Subcommand, Debug)]
pub(crate) enum DrillCommand {
    /// Prove that the deployment can leave its provider and HSM: recover a bundle with k
    /// shares into a fresh, isolated place (a new SoftHSM2 token, or --target-module), serve
    /// it on loopback, decrypt every version's canary through the data plane, compare the
    /// recovered copy with the bundle, and write a signed report (DIR/report.json and
    /// DIR/report.md). Everything made is torn down. Exits 0 only when every check passed.
    ProviderExit(ProviderExitArgs),
    /// Check a drill report: its one canonical form and its signature; with --audit-export
    /// and --public-key, also that the production audit log recorded this report (a
    /// `drill.recorded` record covered by a checkpoint signed by that key). Exits 0 only then.
    VerifyReport(VerifyReportArgs),
}

/// Options of `kms drill provider-exit`.
#[derive(Args, Debug)]
pub(crate) struct ProviderExitArgs {
    /// The backup bundle (`kms backup export`).
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    #[command(flatten)]
    shares: ShareArgs,
    /// Recover into this PKCS#11 module's token instead of a new SoftHSM2 token (to rehearse
    /// a move to another HSM vendor). The token must be empty.
    #[arg(long, value_name = "PATH", requires_all = ["target_token", "target_pin_file", "target_so_pin_file"])]
    target_module: Option<PathBuf>,
    /// The target token's label.
    #[arg(long, value_name = "LABEL", requires = "target_module")]
    target_token: Option<String>,
    /// A file holding the target token's user PIN.
    #[arg(long, value_name = "FILE", requires = "target_module")]
    target_pin_file: Option<PathBuf>,
    /// A file holding the target token's Security Officer PIN.
    #[arg(long, value_name = "FILE", requires = "target_module")]
    target_so_pin_file: Option<PathBuf>,
    /// Directory for report.json and report.md (created; must not hold a report already).
    #[arg(long, value_name = "DIR")]
    report: PathBuf,
    /// Also compare with the live deployment (admin plane, as --as NAME): every key and
    /// version it has must be in the bundle.
    #[arg(long)]
    compare_live: bool,
    /// Record the report's hash in the live deployment's audit log (admin plane, as --as
    /// NAME), for `verify-report --audit-export` later.
    #[arg(long)]
    record: bool,
    /// Data-plane requests in flight while canaries are verified.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
}

/// Options of `kms drill verify-report`.
#[derive(Args, Debug)]
pub(crate) struct VerifyReportArgs {
    /// The report (DIR/report.json).
    file: PathBuf,
    /// An audit export of the production deployment (`kms audit export --out FILE`).
    #[arg(long, value_name = "FILE", requires = "public_key")]
    audit_export: Option<PathBuf>,
    /// The production audit signer's public key (PEM, `kms audit public-key`).
    #[arg(long, value_name = "PEM", requires = "audit_export")]
    public_key: Option<PathBuf>,
}

pub(crate) fn run(cmd: DrillCommand, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    match cmd {
        DrillCommand::ProviderExit(args) => provider_exit(&args, conn, as_json),
        DrillCommand::VerifyReport(args) => verify_report(&args, as_json),
    }
}

/// The drill's progress on stderr: the phase, then a bar of versions verified.
struct Bar(ProgressBar);

impl drill::Progress for Bar {
    fn phase(&self, what: &'static str) {
        self.0.set_message(what);
    }

    fn println(&self, line: &str) {
        self.0.println(line);
    }

    fn count(&self, total: u64) {
        self.0.set_length(total);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {msg} {bar:30} {pos}/{len} versions",
        ) {
            self.0.set_style(style);
        }
    }

    fn inc(&self, n: u64) {
        self.0.inc(n);
    }
}

fn provider_exit(args: &ProviderExitArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let bar = progress_bar(as_json);
    let live = || live_versions(conn);
    let finished = drill::provider_exit(
        &ProviderExit {
            bundle: args.bundle.clone(),
            shares: args.shares.files(),
            target: target_token(args)?,
            report_dir: args.report.clone(),
            concurrency: usize::from(args.concurrency),
        },
        &bar,
        if args.compare_live { Some(&live) } else { None },
    );
    bar.0.finish_and_clear();
    let finished = finished?;
    let mut summary = summary(&finished);
    if args.record && finished.report.signature.is_none() {
        tracing::warn!(
            "the report is unsigned (the drill stopped before its token could sign): it is not \
             recorded, since the deployment would refuse it"
        );
    } else if args.record {
        let recorded = record(conn, finished.text.clone().into_bytes())?;
        if let Some(o) = summary.as_object_mut() {
            o.insert("recorded".into(), recorded);
        }
    }
    let report = &finished.report;
    if !as_json {
        print_human(report, &finished.report_json, &finished.report_md);
    } else {
        emit(true, &summary)?;
    }
    if report.passed {
        return Ok(());
    }
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    Err(Error::DrillFailed(if failed.is_empty() {
        format!("stopped at state {}", report.state.as_str())
    } else {
        failed.join(", ")
    }))
}

/// The token to recover into, when `--target-module` names one.
fn target_token(args: &ProviderExitArgs) -> Result<Option<TargetToken>, Error> {
    match (
        &args.target_module,
        &args.target_token,
        &args.target_pin_file,
        &args.target_so_pin_file,
    ) {
        (None, _, _, _) => Ok(None),
        (Some(module), Some(label), Some(pin), Some(so)) => Ok(Some(TargetToken {
            module: module.clone(),
            label: label.clone(),
            pin_file: pin.clone(),
            so_pin_file: so.clone(),
        })),
        _ => Err(Error::Usage(
            "--target-module needs --target-token, --target-pin-file and --target-so-pin-file"
                .into(),
        )),
    }
}

/// A spinner with the phase on stderr (hidden with `--json`).
fn progress_bar(as_json: bool) -> Bar {
    if as_json {
        return Bar(ProgressBar::hidden());
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    Bar(bar)
}

/// What `--json` prints of a finished drill.
fn summary(f: &Finished) -> Value {
    let report = &f.report;
    json!({
        "passed": report.passed,
        "state": report.state.as_str(),
        "report": f.report_json.display().to_string(),
        "report_md": f.report_md.display().to_string(),
        "report_sha256": kms_core::audit::sha256_hex(f.text.as_bytes()),
        "key_versions_verified": report.key_versions_verified,
        "key_versions_expected": report.key_versions_expected,
        "checks": report.checks,
        "timings_ms": report.timings_ms,
        "bundle_sha256": report.bundle_sha256,
        "epoch": report.epoch,
        "signed": report.signature.is_some(),
        "teardown": f.teardown,
    })
}

/// Records the report's hash in the live deployment's audit log (admin plane).
fn record(conn: &ConnectArgs, report: Vec<u8>) -> Result<Value, Error> {
    let recorded = conn.admin_call(|mut client| async move {
        let r = client
            .record_drill(RecordDrillRequest { report })
            .await?
            .into_inner();
        Ok::<_, Error>(r)
    })?;
    Ok(json!({
        "report_sha256": recorded.report_sha256,
        "passed": recorded.passed,
        "audit_seq": recorded.audit_seq,
    }))
}

/// Every key and version of the live deployment (admin plane).
fn live_versions(conn: &ConnectArgs) -> Result<Vec<LiveKey>, Error> {
    conn.admin_call(|mut client| async move {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_keys(ListKeysRequest {
                    page_size: 1000,
                    page_token: page_token.clone(),
                })
                .await?
                .into_inner();
            for k in page.keys {
                out.push(LiveKey {
                    destroyed: k.state == i32::from(api::v1::KeyState::Destroyed),
                    key_id: k.key_id,
                    current_version: k.current_version,
                });
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        Ok(out)
    })
}

fn print_human(report: &Report, json_path: &Path, md_path: &Path) {
    let mut text = format!(
        "provider-exit drill: {} ({} of {} key versions verified)\n",
        if report.passed { "PASSED" } else { "FAILED" },
        report.key_versions_verified,
        report.key_versions_expected
    );
    for c in &report.checks {
        text.push_str(&format!(
            "  {} {:<18} {}\n",
            if c.passed { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        ));
    }
    text.push_str(&format!(
        "report: {} and {}\n",
        json_path.display(),
        md_path.display()
    ));
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn verify_report(args: &VerifyReportArgs, as_json: bool) -> Result<(), Error> {
    let file = read(&args.file)?;
    let report = kms_core::drill::verify(&file).map_err(Error::DrillReport)?;
    let sha = kms_core::audit::sha256_hex(&file);
    let mut out = json!({
        "valid": true,
        "passed": report.passed,
        "report_sha256": sha,
        "signer": report.signature.as_ref().map(|s| s.key_id.clone()),
        "bundle_sha256": report.bundle_sha256,
        "key_versions_verified": report.key_versions_verified,
        "finished_at": report.finished_at,
    });
    let recorded = match (&args.audit_export, &args.public_key) {
        (Some(export), Some(pem)) => {
            let r = drill::recorded_in(export, pem, &sha)?;
            json!({ "seq": r.seq, "by": r.by, "checkpoint_seq": r.checkpoint_seq })
        }
        _ => json!(
            "not checked: the signature proves the report intact, not who ran it; \
                    give --audit-export FILE --public-key PEM to check it was recorded"
        ),
    };
    if let Some(o) = out.as_object_mut() {
        o.insert("recorded".into(), recorded);
    }
    emit(as_json, &out)
}

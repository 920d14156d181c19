//! `kms drill provider-exit` and `kms drill verify-report` (docs/DRILL.md).
//!
//! The drill recovers a bundle, with the custodians' shares, into a temporary directory and a
//! token of its own, starts a server of the recovered copy on loopback, and asks that server,
//! through the data plane over mTLS, for every canary; then it compares the recovered copy
//! with the bundle, signs its report with the drill token's audit key, and tears everything
//! down. The states and checks are `kms_core::drill`'s; this module does the I/O.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::v1::{DecryptRequest, GenerateDataKeyRequest, ListKeysRequest, RecordDrillRequest};
use api::ClientTls;
use clap::{Args, Subcommand};
use hsm_bridge::Pkcs11Hsm;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kms_core::audit::{AuditLog, RecordBody, VerifyOptions};
use kms_core::drill::{
    compare, version_checks, Additions, CanaryCase, Check, Facts, LiveKey, Report, State,
};
use kms_core::governance::inventory::{Inventory, NewWorkload};
use kms_core::governance::policy::Policies;
use kms_core::governance::trust::TrustBundleRecord;
use kms_core::restore::RestoreError;
use kms_core::store::{Row, SnapshotView};
use kms_core::{Clock, Labels, RocksStore, SystemClock, SystemRng};
use rcgen::{ExtendedKeyUsagePurpose, SanType};
use serde_json::{json, Value};

use crate::config::Config;
use crate::connect::ConnectArgs;
use crate::error::{read, write_private, write_public, Error};
use crate::output::emit;
use crate::recover::{ShareFiles, Target};

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
    shares: ShareFiles,
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

/// The drill's own identity in the recovered copy.
const DRILL_TRUST_DOMAIN: &str = "drill.sovereign-kms.invalid";
const DRILL_WORKLOAD: &str = "spiffe://drill.sovereign-kms.invalid/provider-exit";
const DRILL_POLICY_ID: &str = "provider-exit-drill";
/// Who the recovered copy's audit log names for the drill's additions.
const DRILL_PRINCIPAL: &str = "kms drill provider-exit";

fn drill_policy_text() -> String {
    format!(
        "// Added by `kms drill provider-exit` to the recovered copy only (never to a live\n\
         // deployment): the drill's identity may open canaries and ask for data keys.\n\
         permit (\n  principal == Workload::\"{DRILL_WORKLOAD}\",\n  \
         action in [Action::\"Decrypt\", Action::\"GenerateDataKey\"],\n  resource\n);\n"
    )
}

pub(crate) fn run(cmd: DrillCommand, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    match cmd {
        DrillCommand::ProviderExit(args) => provider_exit(&args, conn, as_json),
        DrillCommand::VerifyReport(args) => verify_report(&args, as_json),
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "the drill reports the time of each phase and its recovery time objective"
)]
fn now() -> Instant {
    Instant::now()
}

fn ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A check failed and was recorded: the drill stops here.
struct Stop;

/// What the drill has found so far.
struct Run {
    started: Instant,
    phase_at: Instant,
    state: State,
    checks: Vec<Check>,
    timings: BTreeMap<String, u64>,
    bar: ProgressBar,
    leftovers: Arc<Mutex<Leftovers>>,
}

/// What a drill interrupted by a signal must not leave behind: its temporary directory (a
/// working copy of every key, with the token's PINs beside it) and its server.
#[derive(Default)]
struct Leftovers {
    dir: Option<PathBuf>,
    server: Option<rustix::process::Pid>,
}

impl Run {
    fn left(&self, f: impl FnOnce(&mut Leftovers)) {
        if let Ok(mut l) = self.leftovers.lock() {
            f(&mut l);
        }
    }

    fn pass(&mut self, name: &str, detail: impl Into<String>) {
        self.checks.push(Check::new(name, true, detail));
    }

    fn fail(&mut self, name: &str, detail: impl Into<String>) -> Stop {
        let detail = detail.into();
        self.bar.println(format!("check {name} failed: {detail}"));
        self.checks.push(Check::new(name, false, detail));
        Stop
    }

    /// Ends the current phase (its time recorded under `name`) and enters `state`.
    fn reached(&mut self, name: &str, state: State) {
        self.timings.insert(name.to_owned(), ms(self.phase_at));
        self.phase_at = now();
        self.state = state;
    }

    fn phase(&self, what: &'static str) {
        self.bar.set_message(what);
    }
}

/// On SIGINT or SIGTERM: stops the drill's server, removes its directory and exits 130. The
/// runtime is built here, on the calling thread, so that the thread it runs on only waits on
/// signals (it reads no environment while the drill sets SoftHSM2's). A SIGKILL cannot be
/// caught: then the directory stays in the system temporary directory (docs/DRILL.md).
fn clean_up_on_signal(leftovers: Arc<Mutex<Leftovers>>) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::File {
            what: "cannot start the signal watcher of",
            path: "the drill".into(),
            source,
        })?;
    let (term, int) = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    });
    let (Ok(mut term), Ok(mut int)) = (term, int) else {
        tracing::warn!(
            "cannot watch for SIGINT and SIGTERM: an interrupted drill leaves its directory"
        );
        return Ok(());
    };
    std::thread::spawn(move || {
        let name = runtime.block_on(async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        });
        let (dir, server) = match leftovers.lock() {
            Ok(mut l) => (l.dir.take(), l.server.take()),
            Err(_) => (None, None),
        };
        if let Some(pid) = server {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let removed = match &dir {
            Some(d) => match std::fs::remove_dir_all(d) {
                Ok(()) => format!("{} removed", d.display()),
                Err(e) => format!(
                    "{} could not be removed ({e}): remove it by hand",
                    d.display()
                ),
            },
            None => "nothing to remove".into(),
        };
        let _ = writeln!(
            std::io::stderr().lock(),
            "kms: drill interrupted by {name}: its server stopped, {removed}; no report written"
        );
        std::process::exit(130);
    });
    Ok(())
}

/// The isolated place: a temporary directory (removed on drop) with its config.
struct Place {
    dir: tempfile::TempDir,
    config: PathBuf,
    so_pin_file: PathBuf,
    /// The drill workload's TLS material.
    tls: ClientTls,
    /// Whether the token is the drill's own SoftHSM2 token (removed with the directory).
    own_token: bool,
}

fn provider_exit(args: &ProviderExitArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let report_json = args.report.join("report.json");
    if report_json.exists() {
        return Err(Error::Usage(format!(
            "{} exists; choose another --report directory (a report is never overwritten)",
            report_json.display()
        )));
    }
    std::fs::create_dir_all(&args.report).map_err(|source| Error::File {
        what: "cannot create",
        path: args.report.clone(),
        source,
    })?;
    let bar = if as_json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    };
    let leftovers = Arc::new(Mutex::new(Leftovers::default()));
    clean_up_on_signal(leftovers.clone())?;
    let started_at = SystemClock.now_unix();
    let mut run = Run {
        started: now(),
        phase_at: now(),
        state: State::Start,
        checks: Vec::new(),
        timings: BTreeMap::new(),
        bar,
        leftovers,
    };
    let mut out = Outcome::default();
    let mut place = None;
    let _ = phases(args, conn, &mut run, &mut out, &mut place);
    run.timings.insert("total".into(), ms(run.started));
    run.bar.finish_and_clear();

    let passed = !run.checks.is_empty() && run.checks.iter().all(|c| c.passed);
    let mut report = Report {
        bundle_sha256: out.bundle_sha256.clone(),
        checks: run.checks,
        epoch: out.epoch,
        finished_at: SystemClock.now_unix(),
        format: kms_core::drill::FORMAT.into(),
        key_versions_expected: out.expected,
        key_versions_verified: out.verified,
        passed,
        signature: None,
        signer: None,
        software_version: env!("CARGO_PKG_VERSION").into(),
        started_at,
        state: run.state,
        target_token: out.token.clone(),
        timings_ms: run.timings,
    };
    // Signed with the drill token's audit key while the token still exists.
    if let (Some(p), true) = (&place, out.token.is_some()) {
        if let Err(e) = sign(&mut report, p) {
            tracing::warn!(error = %e.full_text(), "the report could not be signed");
        }
    }
    // Teardown: the temporary directory goes, and the drill's SoftHSM2 token with it.
    let mut teardown = "nothing was made".to_owned();
    if let Ok(mut l) = run.leftovers.lock() {
        // Removed here from now on; a signal during the removal leaves it to this code.
        l.dir = None;
    }
    if let Some(p) = place {
        let own = p.own_token;
        let path = p.dir.path().to_path_buf();
        match p.dir.close() {
            Ok(()) => {
                teardown = format!(
                    "{} removed{}",
                    path.display(),
                    if own {
                        ", with the drill's SoftHSM2 token"
                    } else {
                        "; the target token keeps the objects the recovery made (clear it with \
                         the vendor's tool)"
                    }
                )
            }
            Err(e) => {
                teardown = format!("{} could not be removed: {e}", path.display());
                tracing::warn!("{teardown}");
            }
        }
    }
    let text = report.to_text()?;
    write_public(&report_json, text.as_bytes())?;
    let md = args.report.join("report.md");
    write_public(&md, markdown(&report, &teardown).as_bytes())?;
    let sha = kms_core::audit::sha256_hex(text.as_bytes());
    let mut summary = json!({
        "passed": report.passed,
        "state": report.state.as_str(),
        "report": report_json.display().to_string(),
        "report_md": md.display().to_string(),
        "report_sha256": sha,
        "key_versions_verified": report.key_versions_verified,
        "key_versions_expected": report.key_versions_expected,
        "checks": report.checks,
        "timings_ms": report.timings_ms,
        "bundle_sha256": report.bundle_sha256,
        "epoch": report.epoch,
        "signed": report.signature.is_some(),
        "teardown": teardown,
    });
    if args.record && report.signature.is_none() {
        tracing::warn!(
            "the report is unsigned (the drill stopped before its token could sign): it is not \
             recorded, since the deployment would refuse it"
        );
    } else if args.record {
        let bytes = text.into_bytes();
        let recorded = conn.admin_call(|mut client| async move {
            let r = client
                .record_drill(RecordDrillRequest { report: bytes })
                .await?
                .into_inner();
            Ok::<_, Error>(r)
        })?;
        if let Some(o) = summary.as_object_mut() {
            o.insert(
                "recorded".into(),
                json!({
                    "report_sha256": recorded.report_sha256,
                    "passed": recorded.passed,
                    "audit_seq": recorded.audit_seq,
                }),
            );
        }
    }
    if !as_json {
        print_human(&report, &report_json, &md);
    } else {
        emit(true, &summary)?;
    }
    if report.passed {
        Ok(())
    } else {
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
}

/// What the phases found, for the report.
#[derive(Default)]
struct Outcome {
    bundle_sha256: String,
    epoch: Option<u32>,
    expected: u64,
    verified: u64,
    token: Option<recovery::TokenInfo>,
}

fn phases(
    args: &ProviderExitArgs,
    conn: &ConnectArgs,
    run: &mut Run,
    out: &mut Outcome,
    place: &mut Option<Place>,
) -> Result<(), Stop> {
    // The bundle, as it is: what every later check compares against.
    run.phase("reading the bundle");
    let bytes = read(&args.bundle).map_err(|e| run.fail("bundle", e.full_text()))?;
    out.bundle_sha256 = kms_core::audit::sha256_hex(&bytes);
    let bundle = kms_core::bundle::parse(&bytes)
        .map_err(|e| run.fail("bundle", format!("{}: {e}", args.bundle.display())))?;
    drop(bytes);
    out.epoch = Some(bundle.header.epoch);
    // The bundle's records become the view (moved, not copied: a bundle can be large).
    let view = SnapshotView::from_rows(bundle.records.into_iter().map(|r| {
        (
            r.table,
            Row {
                key: r.key,
                value: r.value,
            },
        )
    }));
    let (bundle_facts, cases) =
        Facts::with_canaries(&view).map_err(|e| run.fail("bundle", e.to_string()))?;
    drop(view);
    let destroyed = &bundle_facts.destroyed;
    out.expected = bundle_facts.expected.values().sum();
    run.pass(
        "bundle",
        format!(
            "{} parsed: {} key versions implied, {} canaries, {} destroyed key(s)",
            args.bundle.display(),
            out.expected,
            cases.len(),
            destroyed.len()
        ),
    );
    if args.compare_live {
        run.phase("comparing with the live deployment");
        let live = live_versions(conn).map_err(|e| run.fail("live_versions", e.full_text()))?;
        // A stale bundle is a finding, not a reason to stop: the drill still proves what
        // the bundle holds.
        let check = kms_core::drill::live_check(&bundle_facts, &live);
        if check.passed {
            run.checks.push(check);
        } else {
            let _ = run.fail("live_versions", check.detail);
        }
    }
    run.reached("read", State::Start);

    // Isolated: a temporary directory, a token, PINs and TLS of the drill's own.
    run.phase("isolating (temporary directory, new token, TLS)");
    let p = isolate(args).map_err(|e| run.fail("isolation", e.full_text()))?;
    let made = place.insert(p);
    let dir = made.dir.path().to_path_buf();
    run.left(|l| l.dir = Some(dir));
    let (config, empty) =
        target_is_empty(made).map_err(|e| run.fail("target_empty", e.full_text()))?;
    if let Some(found) = empty {
        return Err(run.fail(
            "target_empty",
            format!(
                "token {} holds {found} objects: a drill needs a new, empty token",
                config.hsm.token_label
            ),
        ));
    }
    run.pass(
        "target_empty",
        format!(
            "token {} is empty{}",
            config.hsm.token_label,
            if made.own_token {
                " (a new SoftHSM2 token made by the drill)"
            } else {
                ""
            }
        ),
    );
    run.reached("isolate", State::Isolated);

    // Recovered: the recovery ceremony, unchanged.
    run.phase("recovering (shares, unseal, new token, store)");
    let mut stage = "bundle";
    let recovered = crate::recover::recover(
        &args.bundle,
        &args.shares,
        &Target::Config(made.config.clone()),
        Some(&made.so_pin_file),
        &mut |s| stage = s,
    );
    let recovered = match recovered {
        Ok(r) => r,
        Err(e) => {
            let name = match (&e, stage) {
                (Error::Restore(RestoreError::NotAuthentic { .. }), _) => "bundle_authentic",
                (_, "shares") => "shares",
                (_, "bundle") => "bundle",
                _ => "recovery",
            };
            return Err(run.fail(name, e.full_text()));
        }
    };
    run.pass(
        "shares",
        format!(
            "the shares given rebuilt the recovery secret of epoch {}",
            out.epoch.unwrap_or_default()
        ),
    );
    run.pass(
        "bundle_authentic",
        format!(
            "signed by {}, the signer the custody transcripts pin",
            recovered.recovered.signer
        ),
    );
    for (k, v) in &recovered.timings {
        if let Some(v) = v.as_u64() {
            run.timings.insert(format!("recover.{k}"), v);
        }
    }
    let t = recovered.token.clone();
    out.token = Some(t.clone());
    match bundle_facts.token.as_ref().map(|o| (&o.label, &o.serial)) {
        Some((label, serial)) if label == &t.label && serial == &t.serial => {
            return Err(run.fail(
                "old_token_untouched",
                format!("the drill's target is the old token itself ({label}, serial {serial})"),
            ));
        }
        Some((label, serial)) => run.pass(
            "old_token_untouched",
            format!(
                "the drill was given no module or PIN of the old token ({label}, serial \
                 {serial}); it recovered into {} (serial {})",
                t.label, t.serial
            ),
        ),
        None => run.pass(
            "old_token_untouched",
            "the drill was given no module or PIN of the old token",
        ),
    }
    run.reached("recover", State::Recovered);

    // Provisioned: the drill's identity, in the recovered copy only; audited there.
    run.phase("provisioning the drill identity in the recovered copy");
    let additions = Additions {
        trust_domain: DRILL_TRUST_DOMAIN.into(),
        workload: DRILL_WORKLOAD.into(),
        policy_id: DRILL_POLICY_ID.into(),
    };
    let recovered_facts =
        provision(made, &config, &additions).map_err(|e| run.fail("provision", e.full_text()))?;
    run.reached("provision", State::Provisioned);

    // Serving: the recovered copy's own server, on loopback.
    run.phase("starting the recovered server on loopback");
    let server = Server::start(made).map_err(|e| run.fail("serve", e.full_text()))?;
    let pid = rustix::process::Pid::from_child(&server.child);
    run.left(|l| l.server = Some(pid));
    run.reached("serve", State::Serving);
    let serving_ms = ms(run.started);

    // Verified: every canary through the data plane.
    run.phase("verifying canaries through the data plane");
    run.bar
        .set_length(u64::try_from(cases.len()).unwrap_or(u64::MAX));
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {msg} {bar:30} {pos}/{len} versions",
    ) {
        run.bar.set_style(style);
    }
    let verified = verify_canaries(
        &made.tls,
        &server.data,
        cases,
        destroyed,
        usize::from(args.concurrency),
        &run.bar,
        run.started,
    );
    run.timings.insert("verify".into(), ms(run.phase_at));
    run.phase_at = now();
    let stopped = server.stop();
    run.left(|l| l.server = None);
    let verified = verified.map_err(|e| run.fail("canaries", e.full_text()))?;
    out.verified = verified.per_level.values().sum();
    if let Some(rto) = verified.first_ok_ms {
        run.timings.insert("rto".into(), rto);
    }
    match &verified.failures[..] {
        [] => run.pass(
            "canaries",
            format!(
                "{} canaries decrypted through the data plane (mTLS, inventory, policy, audit) \
                 to their recorded DEK hashes",
                out.verified
            ),
        ),
        failures => {
            let _ = run.fail(
                "canaries",
                format!(
                    "{} of {} canaries failed; first: {}",
                    failures.len(),
                    verified.asked,
                    failures
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            );
        }
    }
    run.checks
        .extend(version_checks(&bundle_facts, &verified.per_level));
    if verified.destroyed_refused == destroyed.len() {
        run.pass(
            "destroyed_refuse",
            format!(
                "{} destroyed key(s) refused a data key with \"key destroyed\"",
                destroyed.len()
            ),
        );
    } else {
        let _ = run.fail(
            "destroyed_refuse",
            format!(
                "{} of {} destroyed key(s) refused; {}",
                verified.destroyed_refused,
                destroyed.len(),
                verified.destroyed_problem.unwrap_or_default()
            ),
        );
    }
    match (verified.first_ok_ms, verified.asked) {
        (Some(rto), _) => run.pass(
            "rto",
            format!("{rto} ms from the start of the drill to the first canary decrypted"),
        ),
        // Nothing to decrypt: the recovery time is to the recovered server answering.
        (None, 0) => {
            let rto = serving_ms;
            run.timings.insert("rto".into(), rto);
            run.pass(
                "rto",
                format!(
                    "{rto} ms from the start of the drill to the recovered server answering (the \
                     bundle holds no key version to decrypt)"
                ),
            )
        }
        (None, _) => {
            let _ = run.fail("rto", "no canary was decrypted");
        }
    }
    stopped.map_err(|e| run.fail("serve", e.full_text()))?;
    run.reached("stop", State::Verified);

    // Compared: the recovered copy against the bundle, and the audit chain across recovery.
    run.phase("comparing the recovered copy with the bundle");
    run.checks.extend(compare(&bundle_facts, &recovered_facts));
    match audit_chain(made) {
        Ok(detail) => run.pass("audit_chain", detail),
        Err(detail) => {
            let _ = run.fail("audit_chain", detail);
        }
    }
    match self_contained(made, &config) {
        Ok(detail) => run.pass("self_contained", detail),
        Err(detail) => {
            let _ = run.fail("self_contained", detail);
        }
    }
    run.reached("compare", State::Compared);
    run.state = State::Done;
    Ok(())
}

/// Makes the isolated place.
fn isolate(args: &ProviderExitArgs) -> Result<Place, Error> {
    let dir = tempfile::Builder::new()
        .prefix("kms-drill-")
        .tempdir()
        .map_err(|source| Error::File {
            what: "cannot create a temporary directory in",
            path: std::env::temp_dir(),
            source,
        })?;
    let root = dir.path().to_path_buf();
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| Error::File {
            what: "cannot create",
            path: p.to_path_buf(),
            source,
        })
    };
    mkdir(&root.join("secrets"))?;
    mkdir(&root.join("pki"))?;
    let (hsm_section, so_pin_file, own_token) = match &args.target_module {
        None => {
            let mut tag = [0u8; 4];
            kms_core::Rng::fill(&SystemRng::new(), &mut tag)?;
            let label = format!("kms-drill-{}", hex::encode(tag));
            crate::dev::new_token(&root, &label)?;
            (
                format!(
                    "token_label = {}\npin_file = \"secrets/user.pin\"\nsofthsm2_conf = \"softhsm2.conf\"\n",
                    toml_str(&label)
                ),
                root.join("secrets/so.pin"),
                true,
            )
        }
        Some(module) => {
            let (Some(label), Some(pin), Some(so)) = (
                &args.target_token,
                &args.target_pin_file,
                &args.target_so_pin_file,
            ) else {
                return Err(Error::Usage(
                    "--target-module needs --target-token, --target-pin-file and \
                     --target-so-pin-file"
                        .into(),
                ));
            };
            let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            (
                format!(
                    "module = {}\ntoken_label = {}\npin_file = {}\n",
                    toml_str(&abs(module).display().to_string()),
                    toml_str(label),
                    toml_str(&abs(pin).display().to_string())
                ),
                abs(so),
                false,
            )
        }
    };
    // TLS of the drill's own: a server certificate, the drill workload's certificate and an
    // admin-plane CA that issues nothing (no operator can reach the recovered copy).
    let server_ca = crate::dev::ca("kms drill server CA")?;
    let drill_ca = crate::dev::ca("kms drill workload CA")?;
    let admin_ca = crate::dev::ca("kms drill admin CA (issues nothing)")?;
    let (server_cert, server_key) = crate::dev::leaf(
        &server_ca,
        "localhost",
        vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (drill_cert, drill_key) = crate::dev::leaf(
        &drill_ca,
        "provider-exit drill",
        vec![SanType::URI(DRILL_WORKLOAD.try_into()?)],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let pki = |name: &str| root.join("pki").join(name);
    write_public(&pki("server-ca.pem"), server_ca.pem().as_bytes())?;
    write_public(&pki("drill-ca.pem"), drill_ca.pem().as_bytes())?;
    write_public(&pki("admin-ca.pem"), admin_ca.pem().as_bytes())?;
    write_public(&pki("server.pem"), server_cert.as_bytes())?;
    write_private(&pki("server.key"), server_key.as_bytes())?;
    let config = root.join("kms.toml");
    write_public(
        &config,
        format!(
            "# Written by `kms drill provider-exit`: the recovered copy, on loopback only.\n\
             data_dir = \".\"\n\n[hsm]\n{hsm_section}\n\
             [listen]\ndata = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nreflection = \"off\"\n\n\
             [tls]\nserver_cert = \"pki/server.pem\"\nserver_key = \"pki/server.key\"\n\
             admin_client_ca = \"pki/admin-ca.pem\"\n"
        )
        .as_bytes(),
    )?;
    Ok(Place {
        config,
        so_pin_file,
        tls: ClientTls {
            server_ca_pem: server_ca.pem().into_bytes(),
            cert_pem: drill_cert.into_bytes(),
            key_pem: drill_key.into_bytes(),
            server_name: "localhost".into(),
        },
        own_token,
        dir,
    })
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The config, and the number of objects in its token when it is not empty.
fn target_is_empty(place: &Place) -> Result<(Config, Option<usize>), Error> {
    let config = Config::load(&place.config)?;
    if let Some(conf) = &config.hsm.softhsm2_conf {
        hsm_bridge::softhsm::use_conf(conf);
    }
    let hsm = crate::serve::hsm_config(&config, &place.config)?;
    let found = hsm_bridge::token_objects(&hsm.module, &hsm.token_label, &hsm.user_pin)?;
    Ok((config, (found > 0).then_some(found)))
}

/// Adds the drill's trust domain, workload and policy to the recovered copy, each audited,
/// and returns the copy's facts with them left out.
fn provision(place: &Place, config: &Config, additions: &Additions) -> Result<Facts, Error> {
    let store = Arc::new(RocksStore::open(&config.data_dir.join("store"))?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let log = AuditLog::open(store.clone(), clock.clone(), config.audit.settings())?;
    let record = |action: &str, target: &str, after: Option<String>| {
        crate::serve::record_offline_change(&log, DRILL_PRINCIPAL, action, target, after)
    };
    let ca =
        String::from_utf8_lossy(&read(&place.dir.path().join("pki/drill-ca.pem"))?).into_owned();
    let bundle = TrustBundleRecord {
        trust_domain: additions.trust_domain.clone(),
        pem: ca,
        jwks: None,
        updated_at: clock.now_unix(),
        updated_by: DRILL_PRINCIPAL.into(),
    };
    kms_core::governance::trust::put(store.as_ref(), &bundle)?;
    record(
        "admin.SetTrustBundle",
        &additions.trust_domain,
        kms_core::audit::object_hash(&bundle),
    )?;
    let inventory = Inventory::open(store.clone(), clock.clone(), config.inventory.settings())?;
    let lifetime = inventory.config().max_lifetime_secs.min(86_400);
    let w = inventory.register(
        NewWorkload {
            selector: additions.workload.parse()?,
            owner: DRILL_PRINCIPAL.into(),
            purpose: "the provider-exit drill's identity, in the recovered copy only".into(),
            labels: Labels::default(),
            expires_at: clock.now_unix().saturating_add(lifetime),
        },
        DRILL_PRINCIPAL,
    )?;
    record(
        "admin.RegisterWorkload",
        &w.selector,
        kms_core::audit::object_hash(w.as_ref()),
    )?;
    let policies = Policies::open(store.clone(), clock.clone())?;
    let (v, _) = policies.put(&additions.policy_id, &drill_policy_text(), DRILL_PRINCIPAL)?;
    record(
        "admin.PutPolicy",
        &additions.policy_id,
        kms_core::audit::object_hash(&v),
    )?;
    let facts = Facts::of(store.as_ref(), Some(additions))?;
    log.close();
    drop(log);
    Ok(facts)
}

/// The recovered copy's server, a child process of this binary.
struct Server {
    child: Child,
    data: String,
    log: PathBuf,
}

impl Server {
    fn start(place: &Place) -> Result<Self, Error> {
        let exe = std::env::current_exe().map_err(|source| Error::File {
            what: "cannot find the kms binary",
            path: "current_exe".into(),
            source,
        })?;
        let log = place.dir.path().join("server.log");
        let log_file = std::fs::File::create(&log).map_err(|source| Error::File {
            what: "cannot create",
            path: log.clone(),
            source,
        })?;
        let mut child = Command::new(exe)
            .arg("--data-dir")
            .arg(place.dir.path())
            .arg("serve")
            .arg("--config")
            .arg(&place.config)
            .env("RUST_LOG", "warn")
            .env_remove("KMS_SERVER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(|source| Error::File {
                what: "cannot start the recovered server from",
                path: place.config.clone(),
                source,
            })?;
        let stdout = child.stdout.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Some(out) = stdout {
                let _ = BufReader::new(out).read_line(&mut line);
            }
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let announced: Option<String> = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("data")?.as_str().map(str::to_owned));
        match announced {
            Some(data) => Ok(Self { child, data, log }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(Error::Usage(format!(
                    "the recovered server did not start: {}",
                    tail(&log)
                )))
            }
        }
    }

    /// Stops the server as an operator would (SIGTERM), so that it signs its last checkpoint.
    fn stop(mut self) -> Result<(), Error> {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let waited_from = now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(Error::Usage(format!(
                        "the recovered server stopped with {status}: {}",
                        tail(&self.log)
                    )))
                }
                Ok(None) if waited_from.elapsed() < Duration::from_secs(60) => {
                    #[expect(
                        clippy::disallowed_methods,
                        reason = "waits for the recovered server to finish its stop"
                    )]
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(Error::Usage(
                        "the recovered server did not stop within 60 s; it was killed".into(),
                    ));
                }
            }
        }
    }
}

/// A drill that ends early (an error, a panic) leaves no server of the recovered copy
/// running: it is killed here unless [`Server::stop`] stopped it.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last lines of the server's log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return "its log is empty".into();
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// What the data plane answered.
#[derive(Default)]
struct Verified {
    asked: usize,
    per_level: BTreeMap<String, u64>,
    failures: Vec<String>,
    first_ok_ms: Option<u64>,
    destroyed_refused: usize,
    destroyed_problem: Option<String>,
}

fn verify_canaries(
    tls: &ClientTls,
    addr: &str,
    cases: Vec<CanaryCase>,
    destroyed: &[kms_core::KeyId],
    concurrency: usize,
    bar: &ProgressBar,
    started: Instant,
) -> Result<Verified, Error> {
    use futures_util::stream::{self, StreamExt};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| Error::File {
            what: "cannot start the async runtime for",
            path: "the drill's data-plane client".into(),
            source,
        })?;
    runtime.block_on(async move {
        let client = tls.data(addr).await?;
        let mut found = Verified {
            asked: cases.len(),
            ..Verified::default()
        };
        let mut answers = stream::iter(cases.into_iter().map(|case| {
            let mut client = client.clone();
            async move {
                let label = format!("{}/{}", case.key_id, case.version);
                let answer = client
                    .decrypt(DecryptRequest {
                        ciphertext: case.blob,
                        encryption_context: case.context.into_iter().collect(),
                    })
                    .await;
                let outcome = match answer {
                    Ok(r) => {
                        let r = r.into_inner();
                        // The response wipes its plaintext when dropped.
                        let hash = kms_core::audit::sha256_hex(&r.plaintext);
                        if r.key_id != case.key_id.to_string() || r.key_version != case.version {
                            Err(format!("{label}: opened as {}/{}", r.key_id, r.key_version))
                        } else if hash != case.dek_sha256 {
                            Err(format!(
                                "{label}: the DEK does not hash to the recorded value"
                            ))
                        } else {
                            Ok(())
                        }
                    }
                    Err(status) => Err(format!("{label}: {}", status.message())),
                };
                (case.protection, outcome)
            }
        }))
        .buffer_unordered(concurrency);
        while let Some((protection, outcome)) = answers.next().await {
            bar.inc(1);
            match outcome {
                Ok(()) => {
                    found.first_ok_ms.get_or_insert_with(|| ms(started));
                    *found
                        .per_level
                        .entry(protection.as_str().to_owned())
                        .or_default() += 1;
                }
                Err(e) => found.failures.push(e),
            }
        }
        for key in destroyed {
            let mut c = client.clone();
            let answer = c
                .generate_data_key(GenerateDataKeyRequest {
                    key: key.to_string(),
                    encryption_context: [(
                        "sovereign-kms/drill".to_owned(),
                        "destroyed".to_owned(),
                    )]
                    .into_iter()
                    .collect(),
                    spec: 0,
                })
                .await;
            match answer {
                Err(s) if s.message().contains("destroyed") => found.destroyed_refused += 1,
                Err(s) => {
                    found
                        .destroyed_problem
                        .get_or_insert(format!("{key}: refused, but with {:?}", s.message()));
                }
                Ok(_) => {
                    found
                        .destroyed_problem
                        .get_or_insert(format!("{key}: a data key was returned"));
                }
            }
        }
        Ok(found)
    })
}

/// `kms audit verify` on the recovered copy, across its `custody.recovered` record.
fn audit_chain(place: &Place) -> Result<String, String> {
    let store = RocksStore::open_read_only(&place.dir.path().join("store"))
        .map_err(|e| format!("cannot open the recovered store: {e}"))?;
    let report =
        kms_core::audit::verify_store(&store, None, VerifyOptions::new(None, None, vec![]))
            .map_err(|e| e.to_string())?;
    if !report.ok {
        return Err(format!(
            "broken at record {}: {}",
            report.first_bad_seq.unwrap_or_default(),
            report.problem.unwrap_or_default()
        ));
    }
    let Some(r) = &report.recovered else {
        return Err("the recovered log holds no custody.recovered record".into());
    };
    if report.unanchored > 0 {
        return Err(format!(
            "the last {} records are not covered by a signed checkpoint",
            report.unanchored
        ));
    }
    Ok(format!(
        "{} records and {} checkpoints verified; the chain continues the bundle's record {} at \
         record {} (custody.recovered)",
        report.records, report.checkpoints, r.bundle_head_seq, r.seq
    ))
}

/// The recovered copy reached nothing outside the drill: every path its config names is in
/// the drill's directory (or is the target module), and it listened on loopback only.
fn self_contained(place: &Place, config: &Config) -> Result<String, String> {
    let root = place.dir.path();
    let mut outside = Vec::new();
    let mut paths = vec![
        config.data_dir.clone(),
        config.tls.server_cert.clone(),
        config.tls.server_key.clone(),
    ];
    paths.push(config.tls.admin_client_ca.clone());
    paths.extend(config.hsm.softhsm2_conf.clone());
    if place.own_token {
        paths.extend(config.hsm.pin_file.clone());
    }
    for p in paths {
        if !p.starts_with(root) {
            outside.push(p.display().to_string());
        }
    }
    if !outside.is_empty() {
        return Err(format!(
            "the recovered copy's config names paths outside the drill: {}",
            outside.join(", ")
        ));
    }
    if !config.trust_bundle.is_empty() || !config.operator.is_empty() {
        return Err("the recovered copy's config seeds trust bundles or operators".into());
    }
    Ok(format!(
        "inputs: the bundle, the shares and identities given; everything else (token, PINs, TLS, \
         the drill identity) was made by the drill under {}; the server listened on 127.0.0.1 \
         only",
        root.display()
    ))
}

/// Signs the report with the drill token's audit signing key.
fn sign(report: &mut Report, place: &Place) -> Result<(), Error> {
    let config = Config::load(&place.config)?;
    let hsm = Pkcs11Hsm::open(&crate::serve::hsm_config(&config, &place.config)?)?;
    report.sign(&hsm)?;
    Ok(())
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

/// The drill's phases, in order, as the report times them.
const PHASES: [&str; 8] = [
    "read",
    "isolate",
    "recover",
    "provision",
    "serve",
    "verify",
    "stop",
    "compare",
];

/// The report for a reader without tools.
fn markdown(report: &Report, teardown: &str) -> String {
    let mut md = String::new();
    md.push_str("# Provider-exit drill report\n\n");
    md.push_str(&format!(
        "**Result: {}** — {} of {} key versions verified through the data plane; state \
         reached: `{}`.\n\n",
        if report.passed { "PASSED" } else { "FAILED" },
        report.key_versions_verified,
        report.key_versions_expected,
        report.state.as_str()
    ));
    md.push_str("| | |\n|---|---|\n");
    md.push_str(&format!(
        "| bundle SHA-256 | `{}` |\n",
        report.bundle_sha256
    ));
    md.push_str(&format!(
        "| custody epoch | {} |\n",
        report
            .epoch
            .map_or_else(|| "unknown".to_owned(), |e| e.to_string())
    ));
    if let Some(t) = &report.target_token {
        md.push_str(&format!(
            "| recovered into | token `{}`, {} {}, serial `{}` |\n",
            t.label, t.manufacturer, t.model, t.serial
        ));
    }
    md.push_str(&format!(
        "| started / finished | {} / {} |\n",
        crate::output::rfc3339(report.started_at)
            .as_str()
            .unwrap_or("?"),
        crate::output::rfc3339(report.finished_at)
            .as_str()
            .unwrap_or("?")
    ));
    md.push_str(&format!("| software | {} |\n", report.software_version));
    md.push_str(&format!(
        "| signed by | {} |\n\n",
        match (&report.signature, &report.signer) {
            (Some(s), Some(_)) => format!("drill token audit key `{}`", s.key_id),
            _ => "unsigned (the drill stopped before its token held a signing key)".into(),
        }
    ));
    md.push_str("## Checks\n\n| check | result | detail |\n|---|---|---|\n");
    for c in &report.checks {
        md.push_str(&format!(
            "| `{}` | {} | {} |\n",
            c.name,
            if c.passed { "pass" } else { "**FAIL**" },
            c.detail.replace('|', "\\|")
        ));
    }
    md.push_str("\n## Time per phase\n\n```text\n");
    let phases: Vec<(&str, u64)> = PHASES
        .iter()
        .filter_map(|p| Some((*p, *report.timings_ms.get(*p)?)))
        .collect();
    let longest = phases.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    for (name, value) in &phases {
        let width = usize::try_from(value.saturating_mul(40) / longest).unwrap_or(40);
        md.push_str(&format!(
            "{name:<10} {:<40} {value:>7} ms\n",
            "#".repeat(width.max(usize::from(*value > 0)))
        ));
    }
    for (name, what) in [("total", "total"), ("rto", "rto")] {
        if let Some(v) = report.timings_ms.get(name) {
            md.push_str(&format!("{what:<10} {:<40} {v:>7} ms\n", ""));
        }
    }
    md.push_str(
        "```\n\n`rto`: from the start of the drill to the first canary decrypted through the \
         data plane (the recovery time objective as measured here).\n\n",
    );
    md.push_str(&format!("Teardown: {teardown}.\n\n"));
    md.push_str(
        "## How to verify this report\n\n\
         `kms drill verify-report report.json` checks that no byte of it changed since the \
         drill signed it. To check that it was recorded by the production deployment, export \
         its audit log (`kms audit export --out audit.jsonl`) and keep its signer's public key \
         (`kms audit public-key --out signer.pem`), then run `kms drill verify-report \
         report.json --audit-export audit.jsonl --public-key signer.pem`.\n",
    );
    md
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
        (Some(export), Some(pem)) => recorded_in(export, pem, &sha)?,
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

/// Finds the `drill.recorded` record of `sha` in an export verified under `pem`, covered by
/// a signed checkpoint.
fn recorded_in(export: &Path, pem: &Path, sha: &str) -> Result<Value, Error> {
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
        Some((seq, by)) => Ok(json!({
            "seq": seq,
            "by": by,
            "checkpoint_seq": covered_to,
        })),
    }
}

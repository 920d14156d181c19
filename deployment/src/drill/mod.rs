//! The host side of the provider-exit drill (docs/DRILL.md).
//!
//! The drill recovers a bundle, with the custodians' shares, into a temporary directory and a
//! token of its own, starts a server of the recovered copy on loopback, and asks that server,
//! through the data plane over mTLS, for every canary; then it compares the recovered copy
//! with the bundle, signs its report with the drill token's audit key, and tears everything
//! down. The states and checks are `kms_core::drill`'s; this module does the I/O, one function
//! per phase: read, isolate, recover, provision, serve and verify, compare, teardown.

mod interrupt;
mod markdown;
mod place;
mod recorded;
mod server;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kms_core::drill::{
    compare, version_checks, Additions, CanaryCase, Check, Facts, LiveKey, Report, State,
};
use kms_core::restore::RestoreError;
use kms_core::store::{Row, SnapshotView};
use kms_core::{Clock, SystemClock};

pub use self::recorded::{recorded_in, RecordedIn};

use self::interrupt::{clean_up_on_signal, Leftovers};
use self::place::Place;
use self::server::{verify_canaries, Server, Verified};
use crate::config::Config;
use crate::error::{read, write_public, Error};
use crate::recover::{ShareFiles, Target};

/// How a drill tells its user where it is (the `kms` command draws a progress bar).
pub trait Progress {
    /// A new phase began.
    fn phase(&self, what: &'static str);
    /// A line to show above the progress (a failed check).
    fn println(&self, line: &str);
    /// From now on, `total` items are counted.
    fn count(&self, total: u64);
    /// `n` more items are done.
    fn inc(&self, n: u64);
}

/// Another HSM's empty token to recover into, instead of a new SoftHSM2 token.
#[derive(Debug, Clone)]
pub struct TargetToken {
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The token's label.
    pub label: String,
    /// A file holding the token's user PIN.
    pub pin_file: PathBuf,
    /// A file holding the token's Security Officer PIN.
    pub so_pin_file: PathBuf,
}

/// What a provider-exit drill is given.
#[derive(Debug)]
pub struct ProviderExit {
    /// The backup bundle.
    pub bundle: PathBuf,
    /// k custodians' shares.
    pub shares: ShareFiles,
    /// Recover into this token instead of a new SoftHSM2 token.
    pub target: Option<TargetToken>,
    /// Directory for report.json and report.md.
    pub report_dir: PathBuf,
    /// Data-plane requests in flight while canaries are verified.
    pub concurrency: usize,
}

/// A drill that ran to its end (passed or not): its report, written.
#[derive(Debug)]
pub struct Finished {
    /// The report, signed when the drill got as far as its token.
    pub report: Report,
    /// The report's one canonical text, as written to `report.json`.
    pub text: String,
    /// `DIR/report.json`.
    pub report_json: PathBuf,
    /// `DIR/report.md`.
    pub report_md: PathBuf,
    /// What teardown removed.
    pub teardown: String,
}

/// The drill's own identity in the recovered copy.
const DRILL_TRUST_DOMAIN: &str = "drill.sovereign-kms.invalid";
pub(super) const DRILL_WORKLOAD: &str = "spiffe://drill.sovereign-kms.invalid/provider-exit";
const DRILL_POLICY_ID: &str = "provider-exit-drill";
/// Who the recovered copy's audit log names for the drill's additions.
pub(super) const DRILL_PRINCIPAL: &str = "kms drill provider-exit";

pub(super) fn drill_policy_text() -> String {
    format!(
        "// Added by `kms drill provider-exit` to the recovered copy only (never to a live\n\
         // deployment): the drill's identity may open canaries and ask for data keys.\n\
         permit (\n  principal == Workload::\"{DRILL_WORKLOAD}\",\n  \
         action in [Action::\"Decrypt\", Action::\"GenerateDataKey\"],\n  resource\n);\n"
    )
}

#[expect(
    clippy::disallowed_methods,
    reason = "the drill reports the time of each phase and its recovery time objective"
)]
pub(super) fn now() -> Instant {
    Instant::now()
}

pub(super) fn ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A check failed and was recorded: the drill stops here.
struct Stop;

/// What the drill has found so far.
struct Run<'a> {
    started: Instant,
    phase_at: Instant,
    state: State,
    checks: Vec<Check>,
    timings: BTreeMap<String, u64>,
    progress: &'a dyn Progress,
    leftovers: Arc<Mutex<Leftovers>>,
}

impl Run<'_> {
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
        self.progress
            .println(&format!("check {name} failed: {detail}"));
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
        self.progress.phase(what);
    }
}

/// Runs a provider-exit drill and writes its report (`DIR/report.json`, `DIR/report.md`).
/// `live`, for `--compare-live`, lists every key and version of the live deployment. Returns
/// the report whether or not every check passed; an error only when no report could be
/// written.
pub fn provider_exit(
    args: &ProviderExit,
    progress: &dyn Progress,
    live: Option<&dyn Fn() -> Result<Vec<LiveKey>, Error>>,
) -> Result<Finished, Error> {
    let report_json = args.report_dir.join("report.json");
    if report_json.exists() {
        return Err(Error::Usage(format!(
            "{} exists; choose another --report directory (a report is never overwritten)",
            report_json.display()
        )));
    }
    std::fs::create_dir_all(&args.report_dir).map_err(|source| Error::File {
        what: "cannot create",
        path: args.report_dir.clone(),
        source,
    })?;
    let leftovers = Arc::new(Mutex::new(Leftovers::default()));
    clean_up_on_signal(leftovers.clone())?;
    let started_at = SystemClock.now_unix();
    let mut run = Run {
        started: now(),
        phase_at: now(),
        state: State::Start,
        checks: Vec::new(),
        timings: BTreeMap::new(),
        progress,
        leftovers,
    };
    let mut out = Outcome::default();
    let mut place = None;
    let _ = phases(args, live, &mut run, &mut out, &mut place);
    run.timings.insert("total".into(), ms(run.started));
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
        if let Err(e) = place::sign(&mut report, p) {
            tracing::warn!(error = %e.full_text(), "the report could not be signed");
        }
    }
    if let Ok(mut l) = run.leftovers.lock() {
        // Removed here from now on; a signal during the removal leaves it to this code.
        l.dir = None;
    }
    let teardown = teardown(place);
    let text = report.to_text()?;
    write_public(&report_json, text.as_bytes())?;
    let report_md = args.report_dir.join("report.md");
    write_public(
        &report_md,
        markdown::markdown(&report, &teardown).as_bytes(),
    )?;
    Ok(Finished {
        report,
        text,
        report_json,
        report_md,
        teardown,
    })
}

/// Removes the temporary directory, and the drill's SoftHSM2 token with it; says what it did.
fn teardown(place: Option<Place>) -> String {
    let Some(p) = place else {
        return "nothing was made".to_owned();
    };
    let own = p.own_token;
    let path = p.dir.path().to_path_buf();
    match p.dir.close() {
        Ok(()) => format!(
            "{} removed{}",
            path.display(),
            if own {
                ", with the drill's SoftHSM2 token"
            } else {
                "; the target token keeps the objects the recovery made (clear it with \
                 the vendor's tool)"
            }
        ),
        Err(e) => {
            let teardown = format!("{} could not be removed: {e}", path.display());
            tracing::warn!("{teardown}");
            teardown
        }
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

/// The phases, in order; each records its checks in `run` and stops the drill at the first
/// check that cannot let it go on.
fn phases(
    args: &ProviderExit,
    live: Option<&dyn Fn() -> Result<Vec<LiveKey>, Error>>,
    run: &mut Run<'_>,
    out: &mut Outcome,
    place: &mut Option<Place>,
) -> Result<(), Stop> {
    let (bundle_facts, cases) = read_phase(args, live, run, out)?;
    let (made, config) = isolate_phase(args, run, place)?;
    recover_phase(args, run, out, made, &bundle_facts)?;
    // Provisioned: the drill's identity, in the recovered copy only; audited there.
    run.phase("provisioning the drill identity in the recovered copy");
    let additions = Additions {
        trust_domain: DRILL_TRUST_DOMAIN.into(),
        workload: DRILL_WORKLOAD.into(),
        policy_id: DRILL_POLICY_ID.into(),
    };
    let recovered_facts = place::provision(made, &config, &additions)
        .map_err(|e| run.fail("provision", e.full_text()))?;
    run.reached("provision", State::Provisioned);
    serve_and_verify(args, run, out, made, cases, &bundle_facts)?;
    compare_phase(run, made, &config, &bundle_facts, &recovered_facts);
    Ok(())
}

/// Read: the bundle, as it is (what every later check compares against), its facts and its
/// canaries; and with `live`, the live deployment's versions.
fn read_phase(
    args: &ProviderExit,
    live: Option<&dyn Fn() -> Result<Vec<LiveKey>, Error>>,
    run: &mut Run<'_>,
    out: &mut Outcome,
) -> Result<(Facts, Vec<CanaryCase>), Stop> {
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
    if let Some(live_versions) = live {
        run.phase("comparing with the live deployment");
        let live = live_versions().map_err(|e| run.fail("live_versions", e.full_text()))?;
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
    Ok((bundle_facts, cases))
}

/// Isolated: a temporary directory, a token, PINs and TLS of the drill's own.
fn isolate_phase<'p>(
    args: &ProviderExit,
    run: &mut Run<'_>,
    place: &'p mut Option<Place>,
) -> Result<(&'p Place, Config), Stop> {
    run.phase("isolating (temporary directory, new token, TLS)");
    let p =
        place::isolate(args.target.as_ref()).map_err(|e| run.fail("isolation", e.full_text()))?;
    let made = place.insert(p);
    let dir = made.dir.path().to_path_buf();
    run.left(|l| l.dir = Some(dir));
    let (config, empty) =
        place::target_is_empty(made).map_err(|e| run.fail("target_empty", e.full_text()))?;
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
    Ok((made, config))
}

/// Recovered: the recovery ceremony, unchanged.
fn recover_phase(
    args: &ProviderExit,
    run: &mut Run<'_>,
    out: &mut Outcome,
    made: &Place,
    bundle_facts: &Facts,
) -> Result<(), Stop> {
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
            recovered.recovered.bundle_signer
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
    Ok(())
}

/// Serving, then verified: the recovered copy's own server on loopback, asked for every
/// canary through the data plane, then stopped.
fn serve_and_verify(
    args: &ProviderExit,
    run: &mut Run<'_>,
    out: &mut Outcome,
    made: &Place,
    cases: Vec<CanaryCase>,
    bundle_facts: &Facts,
) -> Result<(), Stop> {
    let destroyed = &bundle_facts.destroyed;
    // Serving: the recovered copy's own server, on loopback.
    run.phase("starting the recovered server on loopback");
    let server = Server::start(made).map_err(|e| run.fail("serve", e.full_text()))?;
    let pid = rustix::process::Pid::from_child(&server.child);
    run.left(|l| l.server = Some(pid));
    run.reached("serve", State::Serving);
    let serving_ms = ms(run.started);

    // Verified: every canary through the data plane.
    run.phase("verifying canaries through the data plane");
    run.progress
        .count(u64::try_from(cases.len()).unwrap_or(u64::MAX));
    let verified = verify_canaries(
        &made.tls,
        &server.data,
        cases,
        destroyed,
        args.concurrency,
        run.progress,
        run.started,
    );
    run.timings.insert("verify".into(), ms(run.phase_at));
    run.phase_at = now();
    let stopped = server.stop();
    run.left(|l| l.server = None);
    let verified = verified.map_err(|e| run.fail("canaries", e.full_text()))?;
    verified_checks(run, out, verified, bundle_facts, serving_ms);
    stopped.map_err(|e| run.fail("serve", e.full_text()))?;
    run.reached("stop", State::Verified);
    Ok(())
}

/// The checks of what the data plane answered: canaries, versions, destroyed keys, rto.
fn verified_checks(
    run: &mut Run<'_>,
    out: &mut Outcome,
    verified: Verified,
    bundle_facts: &Facts,
    serving_ms: u64,
) {
    let destroyed = &bundle_facts.destroyed;
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
        .extend(version_checks(bundle_facts, &verified.per_level));
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
    rto_check(run, verified.first_ok_ms, verified.asked, serving_ms);
}

/// The recovery time: to the first canary decrypted, or with nothing to decrypt, to the
/// recovered server answering.
fn rto_check(run: &mut Run<'_>, first_ok_ms: Option<u64>, asked: usize, serving_ms: u64) {
    match (first_ok_ms, asked) {
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
}

/// Compared: the recovered copy against the bundle, and the audit chain across recovery.
fn compare_phase(
    run: &mut Run<'_>,
    made: &Place,
    config: &Config,
    bundle_facts: &Facts,
    recovered_facts: &Facts,
) {
    run.phase("comparing the recovered copy with the bundle");
    run.checks.extend(compare(bundle_facts, recovered_facts));
    match place::audit_chain(made) {
        Ok(detail) => run.pass("audit_chain", detail),
        Err(detail) => {
            let _ = run.fail("audit_chain", detail);
        }
    }
    match place::self_contained(made, config) {
        Ok(detail) => run.pass("self_contained", detail),
        Err(detail) => {
            let _ = run.fail("self_contained", detail);
        }
    }
    run.reached("compare", State::Compared);
    run.state = State::Done;
}

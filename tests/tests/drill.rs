//! The provider-exit drill end to end (docs/DRILL.md), with the real binary, real SoftHSM2
//! tokens, real RocksDB directories and the recovered server on loopback: a dev deployment
//! with keys of both levels, rotations, a destroyed key, a policy, a registration and a grant
//! is exported; the drill recovers it into a token of its own, decrypts every canary through
//! the data plane and passes; its signed report verifies, fails after a one-byte edit, and,
//! recorded, is found in the production audit export. Then each negative drill fails with the
//! check that should catch it named in the report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed step is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kms_core::store::Table;
use kms_tests::{softhsm_module, Server};
use serde_json::Value;

const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");

fn kms(dir: &Path, args: &[&str]) -> Output {
    kms_tests::kms_in(KMS, dir, args)
}

fn exported_bundle(server: &Server, out: &Path) {
    let out = out.to_str().unwrap();
    let asked = server.kms_json(&["--as", "operator1", "backup", "export", "--out", out]);
    let id = asked["approval_id"].as_str().unwrap().to_owned();
    server.kms_json(&["--as", "operator2", "approval", "approve", &id]);
    server.kms_json(&["--as", "operator3", "approval", "approve", &id]);
    server.kms_json(&["--as", "operator1", "backup", "export", "--out", out]);
    assert!(Path::new(out).exists());
}

/// The development custodians' share files, `k` of them, as drill arguments.
fn shares(dir: &Path, names: &[&str]) -> Vec<String> {
    let c = dir.join(".kms/custodians");
    let mut out = Vec::new();
    for n in names {
        out.push("--share".into());
        out.push(c.join(format!("{n}.share.age")).display().to_string());
        out.push("--identity".into());
        out.push(c.join(format!("{n}.key")).display().to_string());
    }
    out
}

/// Runs `kms drill provider-exit --bundle B SHARES --report R --json EXTRA`; returns the exit
/// status and the report file.
fn drill(
    dir: &Path,
    bundle: &Path,
    names: &[&str],
    report: &Path,
    extra: &[&str],
) -> (Output, Value) {
    let mut args: Vec<String> = vec![
        "drill".into(),
        "provider-exit".into(),
        "--bundle".into(),
        bundle.display().to_string(),
    ];
    args.extend(shares(dir, names));
    args.extend([
        "--report".into(),
        report.display().to_string(),
        "--json".into(),
    ]);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kms(dir, &refs);
    let file = std::fs::read(report.join("report.json")).unwrap_or_else(|_| {
        panic!(
            "no report written: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, serde_json::from_slice(&file).unwrap())
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

fn failed(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Rewrites a bundle with `edit` applied to its records and signs it again with the real
/// audit key in the development token (so only the drill's own checks can catch the edit).
fn resigned(
    dir: &Path,
    bundle: &Path,
    out: &Path,
    edit: impl FnOnce(&mut Vec<kms_core::bundle::Record>),
) {
    let parsed = kms_core::bundle::parse(&std::fs::read(bundle).unwrap()).unwrap();
    let mut records = parsed.records.clone();
    edit(&mut records);
    // The dev softhsm2.conf names its token directory relative to the data directory's
    // parent; this process gets one with the absolute path.
    let conf = dir.join("resign-softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join(".kms/tokens").display()
        ),
    )
    .unwrap();
    hsm_bridge::softhsm::use_conf(&conf);
    let pin = std::fs::read_to_string(dir.join(".kms/secrets/user.pin")).unwrap();
    let hsm = hsm_bridge::Pkcs11Hsm::open(&hsm_bridge::HsmConfig::new(
        PathBuf::from(softhsm_module()),
        "sovereign-kms-dev".into(),
        secrecy::SecretString::from(pin.trim().to_owned()),
    ))
    .unwrap();
    let bytes = kms_core::bundle::encode(parsed.header.clone(), &records, |digest| {
        Ok(kms_core::audit::sign_digest_with_audit_key(&hsm, digest)?.0)
    })
    .unwrap();
    std::fs::write(out, bytes).unwrap();
}

fn version_key(record: &kms_core::bundle::Record) -> Value {
    serde_json::from_slice(&record.value).unwrap()
}

#[test]
fn a_provider_exit_drill_passes_and_its_report_verifies_against_the_production_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = Server::start(KMS, dir);

    // Keys of both levels, rotations, a destroyed key, a policy, a registration, a grant.
    server.kms_json(&["key", "create", "--alias", "soft"]);
    server.kms_json(&["key", "create", "--alias", "hard", "--protection", "hsm"]);
    server.kms_json(&["key", "create", "--alias", "gone"]);
    server.kms_json(&["key", "rotate", "soft"]);
    server.kms_json(&["key", "rotate", "soft"]);
    server.kms_json(&["key", "rotate", "hard"]);
    server.kms_approved(&["key", "schedule-destroy", "gone", "--waiting-days", "7"]);
    server.kms_json(&["dev", "advance-clock", "8d"]);
    let gone_id = server.kms_json(&["key", "describe", "gone"])["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(server.log_shows(
        &format!("destruction receipt recorded for key {gone_id}"),
        Duration::from_secs(20)
    ));
    let policy = dir.join("team.cedar");
    std::fs::write(
        &policy,
        "permit (principal == Workload::\"spiffe://dev.sovereign-kms.local/workload/team\", action == Action::\"Decrypt\", resource);\n",
    )
    .unwrap();
    server.kms_approved(&["policy", "put", "team", "--file", policy.to_str().unwrap()]);
    server.kms_approved(&[
        "identity",
        "register",
        "spiffe://dev.sovereign-kms.local/workload/team",
        "--owner",
        "team",
        "--purpose",
        "drill test",
        "--expires",
        "30d",
    ]);
    let grant = server.kms_json(&[
        "grant",
        "create",
        "--grantee",
        "spiffe://dev.sovereign-kms.local/workload/team",
        "--key",
        "soft",
        "--op",
        "Decrypt",
        "--token-out",
        dir.join("grant.token").to_str().unwrap(),
    ]);
    assert!(grant["grant_id"].is_string(), "{grant}");
    let bundle = dir.join("deployment.bundle");
    exported_bundle(&server, &bundle);

    // The drill, recorded in the live deployment and compared with it.
    let report_dir = dir.join("drill-1");
    let (out, report) = drill(
        dir,
        &bundle,
        &["alice", "bob"],
        &report_dir,
        &["--as", "operator1", "--record", "--compare-live"],
    );
    assert!(
        out.status.success(),
        "drill failed: {}\n{report}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], true);
    assert!(failed(&report).is_empty(), "{report}");
    // The bundle's signer is named, not the drill token's new one.
    let inspected = server.kms_json(&["backup", "inspect", bundle.to_str().unwrap()]);
    let bundle_signer = inspected["signer"]["id"].as_str().unwrap();
    let authentic = check(&report, "bundle_authentic")["detail"]
        .as_str()
        .unwrap();
    assert!(
        authentic.contains(bundle_signer),
        "{authentic} / {bundle_signer}"
    );
    for name in [
        "bundle",
        "live_versions",
        "target_empty",
        "shares",
        "bundle_authentic",
        "old_token_untouched",
        "canaries",
        "key_versions",
        "escrow_complete",
        "destroyed_refuse",
        "rto",
        "policies",
        "inventory",
        "grants",
        "operators",
        "approval_rules",
        "custodians",
        "audit_chain",
        "self_contained",
    ] {
        assert_eq!(check(&report, name)["passed"], true, "{name}: {report}");
    }
    // soft 3 + hard 2; gone's versions went with its material.
    assert_eq!(report["key_versions_verified"], 5, "{report}");
    assert_eq!(report["key_versions_expected"], 5);
    assert!(check(&report, "destroyed_refuse")["detail"]
        .as_str()
        .unwrap()
        .starts_with("1 destroyed key"));
    assert!(
        !check(&report, "grants")["detail"]
            .as_str()
            .unwrap()
            .starts_with("0 grant rows"),
        "the grant is compared: {report}"
    );
    assert_eq!(report["state"], "done");
    assert_eq!(report["format"], "sovereign-kms/drill-report-v1");
    assert_eq!(report["epoch"], 1);
    for phase in [
        "isolate",
        "recover",
        "provision",
        "serve",
        "verify",
        "compare",
        "rto",
        "total",
    ] {
        assert!(report["timings_ms"][phase].is_u64(), "{phase}: {report}");
    }
    let bundle_sha = kms_core::audit::sha256_hex(&std::fs::read(&bundle).unwrap());
    assert_eq!(report["bundle_sha256"], bundle_sha);
    assert!(report["target_token"]["label"]
        .as_str()
        .unwrap()
        .starts_with("kms-drill-"));
    // Torn down: the temporary directory (and the drill token in it) is gone.
    let teardown = summary["teardown"].as_str().unwrap();
    let temp = teardown.split(' ').next().unwrap();
    assert!(
        temp.contains("kms-drill-") && !Path::new(temp).exists(),
        "{teardown}"
    );
    let md = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
    assert!(
        md.contains("**Result: PASSED**") && md.contains("`canaries`"),
        "{md}"
    );

    // The report verifies; one changed byte anywhere fails it.
    let report_file = report_dir.join("report.json");
    let ok = kms(
        dir,
        &[
            "drill",
            "verify-report",
            report_file.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let original = std::fs::read(&report_file).unwrap();
    let edited = dir.join("edited.json");
    let text = String::from_utf8(original.clone()).unwrap();
    std::fs::write(
        &edited,
        text.replacen(
            "\"key_versions_verified\":5",
            "\"key_versions_verified\":6",
            1,
        ),
    )
    .unwrap();
    let bad = kms(dir, &["drill", "verify-report", edited.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("changed after it was signed"));
    let mut flipped = original.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x01;
    std::fs::write(&edited, &flipped).unwrap();
    let bad = kms(dir, &["drill", "verify-report", edited.to_str().unwrap()]);
    assert!(!bad.status.success(), "a flipped byte must fail");

    // Recorded: the hash is in the production audit log under a checkpoint signed by the
    // production key, and the attestation names the drill.
    let recorded = &summary["recorded"];
    assert_eq!(
        recorded["report_sha256"],
        kms_core::audit::sha256_hex(&original)
    );
    let export = dir.join("audit.jsonl");
    let pem = dir.join("signer.pem");
    assert!(server
        .kms(&["audit", "export", "--out", export.to_str().unwrap()])
        .status
        .success());
    assert!(server
        .kms(&["audit", "public-key", "--out", pem.to_str().unwrap()])
        .status
        .success());
    let verified = server.kms_json(&[
        "drill",
        "verify-report",
        report_file.to_str().unwrap(),
        "--audit-export",
        export.to_str().unwrap(),
        "--public-key",
        pem.to_str().unwrap(),
    ]);
    assert_eq!(
        verified["recorded"]["seq"], recorded["audit_seq"],
        "{verified}"
    );
    assert!(verified["recorded"]["by"]
        .as_str()
        .unwrap()
        .ends_with("/operator1"));
    // The deployment records only a report that verifies, and only for an operator.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut admin = server
            .client_tls("operator1")
            .admin(&server.admin)
            .await
            .unwrap();
        let refused = admin
            .record_drill(api::v1::RecordDrillRequest {
                report: flipped.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        let mut auditor = server
            .client_tls("auditor")
            .admin(&server.admin)
            .await
            .unwrap();
        let refused = auditor
            .record_drill(api::v1::RecordDrillRequest {
                report: original.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    });
    // Its connections close with it (the server's stop would wait for them).
    drop(runtime);
    let attestation = dir.join("attest.json");
    server.kms_json(&["attest", "--out", attestation.to_str().unwrap()]);
    let statement: Value = serde_json::from_slice(&std::fs::read(&attestation).unwrap()).unwrap();
    assert_eq!(
        statement["statement"]["last_drill"]["report_sha256"],
        recorded["report_sha256"]
    );
    assert_eq!(statement["statement"]["last_drill"]["passed"], true);
    let checked = server.kms_json(&[
        "attest",
        "verify",
        attestation.to_str().unwrap(),
        "--public-key",
        pem.to_str().unwrap(),
    ]);
    assert_eq!(checked["valid"], true);

    // One share short: the shares check fails, nothing else is claimed.
    let (out, short) = drill(dir, &bundle, &["alice"], &dir.join("drill-short"), &[]);
    assert!(!out.status.success());
    assert_eq!(failed(&short), ["shares"], "{short}");
    assert!(check(&short, "shares")["detail"]
        .as_str()
        .unwrap()
        .contains("1 more needed"));
    assert_eq!(short["passed"], false);
    assert_eq!(short["state"], "isolated");
    let unrecorded = kms(
        dir,
        &[
            "drill",
            "verify-report",
            dir.join("drill-short/report.json").to_str().unwrap(),
            "--audit-export",
            export.to_str().unwrap(),
            "--public-key",
            pem.to_str().unwrap(),
        ],
    );
    assert!(
        !unrecorded.status.success(),
        "an unsigned report proves nothing"
    );

    // A bundle older than a key of the live deployment: that key is reported missing.
    let late = server.kms_json(&["key", "create", "--alias", "late"]);
    let late_id = late["key_id"].as_str().unwrap();
    let (out, older) = drill(
        dir,
        &bundle,
        &["bob", "carol"],
        &dir.join("drill-older"),
        &["--as", "auditor", "--compare-live"],
    );
    assert!(!out.status.success());
    assert_eq!(failed(&older), ["live_versions"], "{older}");
    assert_eq!(
        older["state"], "done",
        "a stale bundle is still drilled: {older}"
    );
    assert_eq!(older["key_versions_verified"], 5);
    assert!(check(&older, "live_versions")["detail"]
        .as_str()
        .unwrap()
        .contains(late_id));
    let log = server.stop();
    assert!(!log.contains("panicked"));

    // A version removed from the bundle, re-signed by the real key: key_versions catches it.
    let soft_id = {
        let parsed = kms_core::bundle::parse(&std::fs::read(&bundle).unwrap()).unwrap();
        parsed
            .records
            .iter()
            .filter(|r| r.table == Table::Versions)
            .map(version_key)
            .find(|v| v["version"] == 2)
            .unwrap()["key_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let removed = dir.join("removed.bundle");
    resigned(dir, &bundle, &removed, |records| {
        records.retain(|r| {
            !(r.table == Table::Versions
                && version_key(r)["key_id"] == soft_id.as_str()
                && version_key(r)["version"] == 1)
        });
    });
    let (out, missing) = drill(
        dir,
        &removed,
        &["alice", "bob"],
        &dir.join("drill-removed"),
        &[],
    );
    assert!(!out.status.success());
    assert_eq!(failed(&missing), ["key_versions"], "{missing}");
    assert!(check(&missing, "key_versions")["detail"]
        .as_str()
        .unwrap()
        .contains(&format!("missing from the bundle: {soft_id}/1")));
    // The report of a failed drill is signed too.
    let ok = kms(
        dir,
        &[
            "drill",
            "verify-report",
            dir.join("drill-removed/report.json").to_str().unwrap(),
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // A tampered canary, re-signed: the canaries check names it.
    let tampered = dir.join("tampered.bundle");
    resigned(dir, &bundle, &tampered, |records| {
        let r = records
            .iter_mut()
            .find(|r| r.table == Table::Versions && version_key(r)["key_id"] == soft_id.as_str())
            .unwrap();
        let mut v = version_key(r);
        v["canary"]["dek_sha256"] = Value::String("00".repeat(32));
        r.value = serde_json::to_vec(&v).unwrap();
    });
    let (out, bad_canary) = drill(
        dir,
        &tampered,
        &["alice", "bob"],
        &dir.join("drill-canary"),
        &[],
    );
    assert!(!out.status.success());
    assert!(
        failed(&bad_canary).contains(&"canaries".to_owned()),
        "{bad_canary}"
    );
    assert!(check(&bad_canary, "canaries")["detail"]
        .as_str()
        .unwrap()
        .contains("does not hash to the recorded value"));
}

/// Initialises a SoftHSM2 token labelled `label` in its own directory; returns its conf,
/// user PIN file and SO PIN file.
fn target_token(root: &Path, label: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(root.join("tokens")).unwrap();
    let conf = root.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            root.join("tokens").display()
        ),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", label])
        .args(["--so-pin", "so-secret-1", "--pin", "user-secret-1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pin = root.join("user.pin");
    let so = root.join("so.pin");
    std::fs::write(&pin, "user-secret-1\n").unwrap();
    std::fs::write(&so, "so-secret-1\n").unwrap();
    (conf, pin, so)
}

#[test]
fn a_drill_rehearses_a_move_to_a_named_module_and_refuses_a_token_that_is_not_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = Server::start(KMS, dir);
    server.kms_json(&["key", "create", "--alias", "soft"]);
    server.kms_json(&["key", "create", "--alias", "hard", "--protection", "hsm"]);
    let bundle = dir.join("deployment.bundle");
    exported_bundle(&server, &bundle);
    server.stop();

    // The target: another vendor's module and token, empty (here a second SoftHSM2).
    let vendor = dir.join("vendor");
    let (conf, pin, so) = target_token(&vendor, "vendor-token");
    let module = softhsm_module();
    let target = [
        "--target-module",
        module.as_str(),
        "--target-token",
        "vendor-token",
        "--target-pin-file",
        pin.to_str().unwrap(),
        "--target-so-pin-file",
        so.to_str().unwrap(),
    ];
    let run = |report: &Path| {
        let mut args: Vec<String> = vec![
            "drill".into(),
            "provider-exit".into(),
            "--bundle".into(),
            bundle.display().to_string(),
        ];
        args.extend(shares(dir, &["alice", "carol"]));
        args.extend([
            "--report".into(),
            report.display().to_string(),
            "--json".into(),
        ]);
        args.extend(target.iter().map(|s| (*s).to_owned()));
        let out = Command::new(KMS)
            .current_dir(dir)
            .env("SOFTHSM2_CONF", &conf)
            .args(&args)
            .output()
            .unwrap();
        let report: Value =
            serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
        (out, report)
    };
    let (out, report) = run(&dir.join("drill-vendor"));
    assert!(
        out.status.success(),
        "{}\n{report}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["target_token"]["label"], "vendor-token");
    assert_eq!(report["key_versions_verified"], 2);
    // The target token now holds the recovered root key: a second drill into it is refused,
    // before any share is opened, and its report says why.
    let (out, again) = run(&dir.join("drill-again"));
    assert!(!out.status.success());
    assert_eq!(failed(&again), ["target_empty"], "{again}");
    assert!(check(&again, "target_empty")["detail"]
        .as_str()
        .unwrap()
        .contains("vendor-token holds"));
    assert_eq!(again["state"], "start");
    assert!(again.get("signature").is_none(), "nothing could sign it");
}

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]
//! No single operator: the operator inventory and M-of-N approvals, through the real `kms`
//! binary against `kms serve --dev` (M = 2, operators operator1-3 and an auditor) on
//! loopback, with its SoftHSM2 token and RocksDB.

use std::process::Output;

use kms_tests::{audit_events, Server};
use serde_json::Value;

/// The CLI built for this test run from the current code.
const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must fail, and returns its error text.
fn refused(server: &Server, args: &[&str]) -> String {
    let out = server.kms(args);
    assert!(!out.status.success(), "kms {args:?} should have failed");
    stderr(&out)
}

fn policy_text(server: &Server, id: &str) -> Option<String> {
    let out = server.kms(&["policy", "get", id, "--json"]);
    out.status.success().then(|| {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["text"].as_str().unwrap().to_owned()
    })
}

#[test]
fn a_gated_change_runs_only_with_m_other_operators_before_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let text = "permit (principal == Workload::\"spiffe://test.example/a\", action, resource);\n";
    let file = write(dir.path(), "a.cedar", text);

    // Asked for: a pending id, exit 0, nothing changed.
    let asked = server.kms_json(&[
        "--as",
        "operator1",
        "policy",
        "put",
        "gated",
        "--file",
        &file,
    ]);
    assert_eq!(asked["state"], "pending", "{asked}");
    let id = asked["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(asked["request"]["text"], text);
    assert!(asked["diff"].as_str().unwrap().contains("+permit"));
    assert_eq!(policy_text(&server, "gated"), None, "nothing ran yet");

    // The requester's own approval does not count; the pending list shows the request.
    let own = refused(&server, &["--as", "operator1", "approval", "approve", &id]);
    assert!(own.contains("another operator must approve"), "{own}");
    let pending = server.kms(&["approval", "list", "--state", "pending", "--json"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&pending.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["approval_id"], id.as_str());

    // M - 1 approvals: still pending, still nothing ran; a second vote by the same operator
    // does not count either.
    let one = server.kms_json(&["--as", "operator2", "approval", "approve", &id]);
    assert_eq!(one["state"], "pending");
    assert_eq!(one["approvers"][0]["name"], "operator2");
    let twice = refused(&server, &["--as", "operator2", "approval", "approve", &id]);
    assert!(twice.contains("already approved"), "{twice}");
    assert_eq!(policy_text(&server, "gated"), None);
    // The auditor may look but not vote.
    let shown = server.kms_json(&["--as", "auditor", "approval", "show", &id]);
    assert_eq!(shown["request_hash"], asked["request_hash"]);
    let auditor = refused(&server, &["--as", "auditor", "approval", "approve", &id]);
    assert!(auditor.contains("auditor"), "{auditor}");

    // The M-th approval runs exactly what was asked for, as the requester.
    let ran = server.kms_json(&["--as", "operator3", "approval", "approve", &id]);
    assert_eq!(ran["state"], "executed", "{ran}");
    assert_eq!(ran["approvers"].as_array().unwrap().len(), 2);
    assert_eq!(policy_text(&server, "gated").as_deref(), Some(text));
    let stored = server.kms_json(&["policy", "get", "gated"]);
    assert_eq!(
        stored["created_by"],
        "spiffe://operators.sovereign-kms.local/operator/operator1"
    );
    // An executed request takes no more votes.
    let late = refused(&server, &["--as", "operator3", "approval", "approve", &id]);
    assert!(late.contains("executed, not pending"), "{late}");

    // Rejected by any one operator: it ends and never runs.
    let other = write(
        dir.path(),
        "b.cedar",
        "forbid (principal, action, resource);\n",
    );
    let asked = server.kms_json(&["policy", "put", "gated", "--file", &other]);
    let rejected_id = asked["approval_id"].as_str().unwrap().to_owned();
    let rejected = server.kms_json(&[
        "--as",
        "operator2",
        "approval",
        "reject",
        &rejected_id,
        "--reason",
        "too broad",
    ]);
    assert_eq!(rejected["state"], "rejected");
    assert_eq!(rejected["reason"], "too broad");
    let after = refused(
        &server,
        &["--as", "operator3", "approval", "approve", &rejected_id],
    );
    assert!(after.contains("rejected, not pending"), "{after}");
    assert_eq!(policy_text(&server, "gated").as_deref(), Some(text));

    // Cancelled by its requester only.
    let asked = server.kms_json(&["policy", "delete", "gated"]);
    let cancel_id = asked["approval_id"].as_str().unwrap().to_owned();
    let not_yours = refused(
        &server,
        &["--as", "operator2", "approval", "cancel", &cancel_id],
    );
    assert!(not_yours.contains("only its requester"), "{not_yours}");
    let cancelled = server.kms_json(&["approval", "cancel", &cancel_id]);
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(policy_text(&server, "gated").as_deref(), Some(text));

    // Expired (the dev clock moves past the 24 h expiry): never runs, even with approvals.
    let asked = server.kms_json(&["policy", "delete", "gated"]);
    let expiring = asked["approval_id"].as_str().unwrap().to_owned();
    server.kms_json(&["--as", "operator2", "approval", "approve", &expiring]);
    server.kms_json(&["dev", "advance-clock", "25h"]);
    let expired = refused(
        &server,
        &["--as", "operator3", "approval", "approve", &expiring],
    );
    assert!(expired.contains("expired, not pending"), "{expired}");
    let shown = server.kms_json(&["approval", "show", &expiring]);
    assert_eq!(shown["state"], "expired");
    assert_eq!(policy_text(&server, "gated").as_deref(), Some(text));

    // Every step is in the audit log, with the request's hash, and the log verifies.
    server.stop();
    let events = audit_events(KMS, dir.path());
    let steps: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["action"].as_str().unwrap_or("").starts_with("approval."))
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["detail"]["approval_id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for (step, which) in [
        ("approval.requested", &id),
        ("approval.approved", &id),
        ("approval.executed", &id),
        ("approval.rejected", &rejected_id),
        ("approval.cancelled", &cancel_id),
        ("approval.expired", &expiring),
    ] {
        assert!(
            steps.iter().any(|(s, i)| s == step && i == which),
            "{step} of {which} missing from {steps:?}"
        );
    }
    let executed = events
        .iter()
        .find(|e| e["action"] == "approval.executed")
        .unwrap();
    assert_eq!(executed["detail"]["request_hash"], asked_hash(&events, &id));
    assert!(executed["after"].is_string(), "{executed}");
    let verify = audit_verify(dir.path());
    assert!(verify.status.success(), "{}", stderr(&verify));
}

/// The hash the `approval.requested` record of `id` carries.
fn asked_hash(events: &[Value], id: &str) -> Value {
    events
        .iter()
        .find(|e| e["action"] == "approval.requested" && e["detail"]["approval_id"] == id)
        .map(|e| e["detail"]["request_hash"].clone())
        .unwrap()
}

#[test]
fn only_registered_active_unexpired_operators_reach_the_admin_plane() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());

    // A certificate from the operator CA that no one registered.
    let issued = server.kms_json(&["dev", "issue-operator", "stranger"]);
    assert_eq!(
        issued["identity"],
        "spiffe://operators.sovereign-kms.local/operator/stranger"
    );
    for args in [
        &["--as", "stranger", "key", "list"][..],
        &["--as", "stranger", "policy", "list"],
        &["--as", "stranger", "approval", "list"],
        &["--as", "stranger", "key", "create"],
    ] {
        let e = refused(&server, args);
        assert!(
            e.contains("not registered in the operator inventory"),
            "{args:?}: {e}"
        );
    }

    // Registered (a gated change), it works; deactivated (gated), it is refused again.
    let cert = dir.path().join(".kms/pki/stranger.pem");
    server.kms_approved(&[
        "operator",
        "register",
        "stranger",
        "--cert",
        cert.to_str().unwrap(),
        "--owner",
        "tests",
        "--role",
        "operator",
    ]);
    server.kms_json(&["--as", "stranger", "key", "list"]);
    let me = server.kms_json(&["--as", "stranger", "operator", "whoami"]);
    assert_eq!(me["name"], "stranger");
    server.kms_approved(&["operator", "deactivate", "stranger"]);
    let e = refused(&server, &["--as", "stranger", "key", "list"]);
    assert!(e.contains("deactivated"), "{e}");

    // One whose registration expires: refused once the clock passes it.
    server.kms_json(&["dev", "issue-operator", "shortlived"]);
    let cert = dir.path().join(".kms/pki/shortlived.pem");
    server.kms_approved(&[
        "operator",
        "register",
        "shortlived",
        "--cert",
        cert.to_str().unwrap(),
        "--owner",
        "tests",
        "--role",
        "operator",
        "--expires",
        "2h",
    ]);
    server.kms_json(&["--as", "shortlived", "key", "list"]);
    server.kms_json(&["dev", "advance-clock", "3h"]);
    let e = refused(&server, &["--as", "shortlived", "key", "list"]);
    assert!(e.contains("registration has expired"), "{e}");

    // The auditor reads (keys, policies, approvals, the audit log) and changes nothing.
    server.kms_json(&["--as", "auditor", "key", "list"]);
    server.kms_json(&["--as", "auditor", "policy", "list"]);
    let listed = server.kms(&["--as", "auditor", "operator", "list", "--json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 5);
    let export = server.kms(&[
        "--as",
        "auditor",
        "--server",
        &server.admin,
        "audit",
        "export",
    ]);
    assert!(export.status.success(), "{}", stderr(&export));
    assert!(String::from_utf8_lossy(&export.stdout).contains("approval.executed"));
    let policy = write(
        dir.path(),
        "p.cedar",
        "forbid (principal, action, resource);\n",
    );
    for args in [
        &["--as", "auditor", "key", "create"][..],
        &["--as", "auditor", "policy", "put", "x", "--file", &policy],
        &["--as", "auditor", "operator", "deactivate", "operator1"],
    ] {
        let e = refused(&server, args);
        assert!(e.contains("read-only"), "{args:?}: {e}");
    }

    // Each refusal is on record with its reason.
    server.stop();
    let events = audit_events(KMS, dir.path());
    for reason in [
        "operator.unregistered",
        "operator.deactivated",
        "operator.expired",
        "operator.read_only",
    ] {
        assert!(
            events
                .iter()
                .any(|e| e["reason"] == reason && e["decision"] == "deny"),
            "no refusal recorded as {reason}"
        );
    }
}

#[test]
fn changing_the_rules_is_gated_and_an_unreachable_quorum_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let rules = server.kms_json(&["approval", "rules"]);
    assert_eq!(rules["required"], 2);
    assert_eq!(rules["operators"], 3);
    assert!(rules["warning"].is_null());

    // M = 3 needs three operators besides the requester; the dev deployment has three in all.
    let changed = server.kms_approved(&["approval", "set-rules", "--required", "3"]);
    assert_eq!(changed["result"]["after"]["required"], 3);
    let rules = server.kms_json(&["approval", "rules"]);
    assert_eq!(rules["required"], 3);
    assert!(
        rules["warning"]
            .as_str()
            .unwrap()
            .contains("no gated change can run"),
        "{rules}"
    );
    let listed = server.kms(&["approval", "list"]);
    assert!(
        stderr(&listed).contains("no gated change can run"),
        "{}",
        stderr(&listed)
    );

    // Under the new rule two approvals no longer suffice.
    let policy = write(
        dir.path(),
        "p.cedar",
        "forbid (principal, action, resource);\n",
    );
    let asked = server.kms_json(&["policy", "put", "p", "--file", &policy]);
    let id = asked["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(asked["required"], 3);
    server.kms_json(&["--as", "operator2", "approval", "approve", &id]);
    let two = server.kms_json(&["--as", "operator3", "approval", "approve", &id]);
    assert_eq!(two["state"], "pending", "{two}");

    // A restart says so too.
    server.stop();
    let server = Server::start(KMS, dir.path());
    assert!(
        server.log_shows(
            "no gated change can run",
            std::time::Duration::from_secs(10)
        ),
        "{}",
        server.log()
    );
}

#[test]
fn one_operator_seals_at_once_and_unsealing_needs_m_approvals() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    server.kms_json(&["key", "create", "--alias", "soft"]);
    server.kms_json(&["key", "create", "--alias", "hard", "--protection", "hsm"]);
    let mut blobs = Vec::new();
    for key in ["soft", "hard"] {
        let made = server.kms_json(&["data", "generate-key", "--key", key, "--context", "t=1"]);
        blobs.push((
            made["ciphertext"].as_str().unwrap().to_owned(),
            made["plaintext"].as_str().unwrap().to_owned(),
        ));
    }

    let sealed = server.kms_json(&["--as", "operator2", "seal", "--reason", "suspected leak"]);
    assert_eq!(sealed["sealed"], true);
    assert_eq!(sealed["reason"], "suspected leak");
    let data_refused = |server: &Server| {
        for (ciphertext, _) in &blobs {
            let e = refused(
                server,
                &[
                    "data",
                    "decrypt",
                    "--ciphertext",
                    ciphertext,
                    "--context",
                    "t=1",
                ],
            );
            assert!(e.contains("service sealed"), "{e}");
        }
        let e = refused(server, &["data", "generate-key", "--key", "soft"]);
        assert!(e.contains("service sealed"), "{e}");
    };
    data_refused(&server);
    // Admin reads still answer; key changes wait for the unseal.
    server.kms_json(&["key", "describe", "soft"]);
    server.kms_json(&["--as", "auditor", "status"]);
    let e = refused(&server, &["key", "create"]);
    assert!(e.contains("service sealed"), "{e}");
    let e = refused(&server, &["key", "rotate", "soft"]);
    assert!(e.contains("service sealed"), "{e}");

    // A restart stays sealed.
    server.stop();
    let server = Server::start(KMS, dir.path());
    assert_eq!(server.kms_json(&["status"])["sealed"], true);
    data_refused(&server);

    // Unseal is a gated change: one approval is not enough.
    let asked = server.kms_json(&["--as", "operator2", "unseal"]);
    assert_eq!(asked["state"], "pending", "{asked}");
    let id = asked["approval_id"].as_str().unwrap().to_owned();
    let one = server.kms_json(&["--as", "operator1", "approval", "approve", &id]);
    assert_eq!(one["state"], "pending");
    data_refused(&server);
    let ran = server.kms_json(&["--as", "operator3", "approval", "approve", &id]);
    assert_eq!(ran["state"], "executed", "{ran}");
    assert_eq!(server.kms_json(&["status"])["sealed"], false);
    for (ciphertext, plaintext) in &blobs {
        let opened = server.kms_json(&[
            "data",
            "decrypt",
            "--ciphertext",
            ciphertext,
            "--context",
            "t=1",
        ]);
        assert_eq!(opened["plaintext"].as_str().unwrap(), plaintext);
    }
    server.kms_json(&["key", "rotate", "soft"]);

    server.stop();
    let events = audit_events(KMS, dir.path());
    let sealed = events
        .iter()
        .find(|e| e["action"] == "service.sealed")
        .unwrap();
    assert_eq!(sealed["reason"], "suspected leak");
    assert_eq!(
        sealed["principal"],
        "spiffe://operators.sovereign-kms.local/operator/operator2"
    );
    assert!(events
        .iter()
        .any(|e| e["action"] == "approval.executed" && e["detail"]["change"] == "admin.Unseal"));
    assert!(events.iter().any(|e| e["reason"] == "service.sealed"));
}

/// Every byte string in `key_id`'s stored version rows that is material or a copy of it, as
/// the store writes it: the whole row, the wrapped software material (a JSON array of bytes),
/// the escrow copy (base64). Read beside the running server.
fn version_material(dir: &std::path::Path, key_id: &str) -> Vec<Vec<u8>> {
    use kms_core::store::{Store, Table};
    let store = kms_core::RocksStore::open_read_only(&dir.join(".kms/store")).unwrap();
    let mut all = Vec::new();
    for row in store.scan(Table::Versions).unwrap() {
        let v: Value = serde_json::from_slice(&row.value).unwrap();
        if v["key_id"] != key_id {
            continue;
        }
        if let Some(wrapped) = v["material"].get("software").map(|m| &m["wrapped"]) {
            all.push(serde_json::to_vec(wrapped).unwrap());
        }
        // `{"sealed": {..., "sealed": "<base64>"}}` or `{"wrapped": {..., "wrapped": ...}}`.
        for (variant, body) in v["escrow"].as_object().into_iter().flatten() {
            all.push(body[variant].as_str().unwrap().as_bytes().to_vec());
        }
        all.push(row.value);
    }
    all
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Waits (up to 20 s) for the server's destruction timer to have destroyed `key_id` and
/// recorded its receipt, and returns the key as described then.
fn wait_destroyed(server: &Server, key_id: &str) -> Value {
    let recorded = format!("destruction receipt recorded for key {key_id}");
    assert!(
        server.log_shows(&recorded, std::time::Duration::from_secs(20)),
        "key {key_id} was not destroyed in time"
    );
    let d = server.kms_json(&["key", "describe", key_id]);
    assert_eq!(d["state"], "destroyed", "{d}");
    assert_eq!(d["destruction"]["receipt"], true, "{d}");
    d
}

#[test]
fn a_key_destroyed_with_approvals_loses_its_material_and_leaves_a_verifiable_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let mut keys = Vec::new();
    for (alias, protection) in [
        ("soft", "software"),
        ("hard", "hsm"),
        ("spared", "software"),
    ] {
        let k = server.kms_json(&[
            "key",
            "create",
            "--alias",
            alias,
            "--protection",
            protection,
        ]);
        keys.push(k["key_id"].as_str().unwrap().to_owned());
    }
    server.kms_json(&["key", "rotate", "soft"]);
    let (soft_id, hard_id) = (keys[0].clone(), keys[1].clone());
    let mut blobs = Vec::new();
    for key in ["soft", "hard"] {
        let made = server.kms_json(&["data", "generate-key", "--key", key, "--context", "t=1"]);
        blobs.push(made["ciphertext"].as_str().unwrap().to_owned());
    }
    let decrypt = |server: &Server, blob: &str| {
        refused(
            server,
            &["data", "decrypt", "--ciphertext", blob, "--context", "t=1"],
        )
    };
    let material: Vec<Vec<u8>> = version_material(dir.path(), &soft_id)
        .into_iter()
        .chain(version_material(dir.path(), &hard_id))
        .collect();
    // soft: two rows, each with wrapped material and an escrow copy; hard: one row with one.
    assert_eq!(material.len(), 3 * 2 + 2, "{material:?}");
    assert!(kms_tests::pkcs11_tool_objects(dir.path()).contains(&hard_id));

    // Too short a wait is refused at once; a good request waits for two other operators and
    // changes nothing until then.
    let short = refused(
        &server,
        &["key", "schedule-destroy", "soft", "--waiting-days", "3"],
    );
    assert!(short.contains("7 to 365 days"), "{short}");
    let asked = server.kms_json(&["key", "schedule-destroy", "soft", "--waiting-days", "7"]);
    assert_eq!(asked["state"], "pending", "{asked}");
    assert_eq!(asked["request"]["waiting_days"], 7);
    assert_eq!(
        server.kms_json(&["key", "describe", "soft"])["state"],
        "enabled"
    );
    server.kms_json(&["data", "generate-key", "--key", "soft"]);
    let id = asked["approval_id"].as_str().unwrap().to_owned();
    server.kms_json(&["--as", "operator2", "approval", "approve", &id]);
    let ran = server.kms_json(&["--as", "operator3", "approval", "approve", &id]);
    assert_eq!(ran["state"], "executed", "{ran}");
    server.kms_approved(&["key", "schedule-destroy", "hard", "--waiting-days", "7"]);

    // Pending: described with its date and its approvers; every operation refused.
    let pending = server.kms_json(&["key", "describe", "soft"]);
    assert_eq!(pending["state"], "pending_destruction", "{pending}");
    assert!(pending["destroy_at"].is_string(), "{pending}");
    assert_eq!(
        pending["destruction"]["approvers"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(pending["destruction"]["approval_id"], id.as_str());
    for blob in &blobs {
        let e = decrypt(&server, blob);
        assert!(e.contains("key pending destruction"), "{e}");
    }
    let e = refused(&server, &["data", "generate-key", "--key", "hard"]);
    assert!(e.contains("key pending destruction"), "{e}");
    let e = refused(&server, &["key", "enable", "soft"]);
    assert!(e.contains("pending_destruction"), "{e}");

    // Cancelled by one operator: back to disabled.
    server.kms_approved(&["key", "schedule-destroy", "spared", "--waiting-days", "30"]);
    let cancelled = server.kms_json(&["--as", "operator3", "key", "cancel-destroy", "spared"]);
    assert_eq!(cancelled["state"], "disabled", "{cancelled}");
    assert_eq!(cancelled["destruction"], Value::Null);
    server.kms_json(&["key", "enable", "spared"]);

    // The waiting period passes on the server's clock.
    server.kms_json(&["dev", "advance-clock", "8d"]);
    let destroyed = wait_destroyed(&server, &soft_id);
    assert!(
        destroyed["destruction"]["destroyed_at"].is_u64(),
        "{destroyed}"
    );
    wait_destroyed(&server, &hard_id);
    for blob in &blobs {
        let e = decrypt(&server, blob);
        assert!(e.contains("key destroyed"), "{e}");
    }
    server.kms_json(&["data", "generate-key", "--key", "spared"]);
    let objects = kms_tests::pkcs11_tool_objects(dir.path());
    assert!(!objects.contains(&hard_id), "{objects}");

    // The receipt, exported by the auditor, verifies offline under the signer's key; any
    // edited byte fails.
    let receipt = dir.path().join("receipt.json");
    let signer = dir.path().join("signer.pem");
    server.kms_json(&[
        "--as",
        "auditor",
        "key",
        "destruction-receipt",
        "hard",
        "--out",
        receipt.to_str().unwrap(),
    ]);
    server.kms(&["audit", "public-key", "--out", signer.to_str().unwrap()]);
    let checked = server.kms_json(&[
        "audit",
        "verify-receipt",
        receipt.to_str().unwrap(),
        "--public-key",
        signer.to_str().unwrap(),
    ]);
    assert_eq!(checked["valid"], true);
    assert_eq!(checked["key_id"], hard_id.as_str());
    let label = format!("sovereign-kms/kek/{hard_id}/v1");
    assert_eq!(checked["token_objects"][0]["label"], label.as_str());
    assert!(checked["token_objects"][0]["cka_id"].is_string());
    assert_eq!(checked["approvers"].as_array().unwrap().len(), 2);
    let text = std::fs::read(&receipt).unwrap();
    let mut edited = text.clone();
    let at = text.len() / 2;
    edited[at] ^= 1;
    std::fs::write(&receipt, &edited).unwrap();
    let bad = refused(
        &server,
        &[
            "audit",
            "verify-receipt",
            receipt.to_str().unwrap(),
            "--public-key",
            signer.to_str().unwrap(),
        ],
    );
    assert!(bad.contains("receipt does not verify"), "{bad}");

    // To a caller policy refuses, a destroyed key answers as a key that does not exist.
    let forbid = write(
        dir.path(),
        "forbid.cedar",
        "forbid (principal, action, resource) when { resource.id == \"KEY\" };\n"
            .replace("KEY", &hard_id)
            .as_str(),
    );
    server.kms_change(&["policy", "put", "forbid-hard", "--file", &forbid]);
    let unknown = refused(
        &server,
        &[
            "data",
            "generate-key",
            "--key",
            "0b0b0b0b-0b0b-4b0b-8b0b-0b0b0b0b0b0b",
        ],
    );
    let refused_hard = decrypt(&server, &blobs[1]);
    assert!(
        refused_hard.contains("key not found or access denied"),
        "{refused_hard}"
    );
    assert!(
        unknown.contains("key not found or access denied"),
        "{unknown}"
    );

    // Nothing of the material is left in any table of the store, nor in its files.
    server.stop();
    {
        use kms_core::store::{Store, Table};
        let store = kms_core::RocksStore::open_read_only(&dir.path().join(".kms/store")).unwrap();
        for table in Table::ALL {
            for row in store.scan(table).unwrap() {
                for m in &material {
                    assert!(!holds(&row.value, m), "material left in {}", table.name());
                }
            }
        }
        // The versions table's files hold only live rows and no deletion marker.
        let live = store.scan(Table::Versions).unwrap().len() as u64;
        assert_eq!(store.file_entries(Table::Versions).unwrap(), (live, 0));
    }
    for entry in std::fs::read_dir(dir.path().join(".kms/store")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            material.iter().all(|m| !holds(&bytes, m)),
            "material left in {}",
            path.display()
        );
    }

    // The audit log holds both destructions and every approval step, and verifies.
    let events = audit_events(KMS, dir.path());
    let gone: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "key.destroyed")
        .collect();
    assert_eq!(gone.len(), 2);
    let hard_event = gone.iter().find(|e| e["key"] == hard_id.as_str()).unwrap();
    let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &text);
    assert_eq!(
        hard_event["detail"]["receipt_sha256"],
        hex::encode(sha.as_ref())
    );
    assert!(events.iter().any(|e| e["action"] == "approval.executed"
        && e["detail"]["change"] == "admin.ScheduleKeyDestruction"));
    let verified = audit_verify(dir.path());
    assert!(verified.status.success(), "{}", stderr(&verified));
}

/// `kms audit verify` on a stopped server's directory.
fn audit_verify(dir: &std::path::Path) -> Output {
    std::process::Command::new(KMS)
        .current_dir(dir)
        .args(["audit", "verify"])
        .output()
        .unwrap()
}

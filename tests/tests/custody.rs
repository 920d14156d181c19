//! Custody end to end on a development deployment: the dev init ceremony on first start, share
//! files the standard `age` tool decrypts, verification by every custodian, status, and the
//! refusals a custodian or operator can meet.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]

use std::path::Path;
use std::process::{Command, Output};

use kms_tests::{audit_events, Server};
use serde_json::Value;

const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");

fn kms(dir: &Path, args: &[&str]) -> Output {
    Command::new(KMS)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run kms")
}

fn status(dir: &Path) -> Value {
    let out = kms(dir, &["ceremony", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `age -d -i KEY FILE`, as a custodian runs it.
fn age_decrypt(identity: &Path, file: &Path) -> Vec<u8> {
    let out = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg(file)
        .output()
        .expect("the age tool is installed (scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "age -d: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn dev_init_shares_open_with_age_and_every_custodian_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = Server::start(KMS, dir);
    server.kms_json(&["key", "create", "--alias", "soft"]);
    let log = server.stop();
    let custodians = dir.join(".kms/custodians");

    let s = status(dir);
    assert_eq!(s["initialised"], true);
    assert_eq!(s["threshold"], 2);
    assert_eq!(s["epoch"], 1);
    let names: Vec<&str> = s["custodians"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob", "carol"]);
    assert!(s["custodians"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["verified"] == false));
    assert_eq!(s["complete"], false);
    // transcript.json is the canonical transcript: its SHA-256 is the one status reports.
    let transcript = std::fs::read(custodians.join("transcript.json")).unwrap();
    let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &transcript);
    assert_eq!(s["transcript_sha256"], hex::encode(sha.as_ref()));
    // Software versions are escrowed (the one made after init at creation); none is left.
    let unescrowed = s["unescrowed_versions"].as_array().unwrap();
    assert!(
        unescrowed.iter().all(|v| v["protection"] == "hsm"),
        "{unescrowed:?}"
    );

    // Every share file is a standard age file for its custodian.
    let mut decrypted_shares = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let plain = age_decrypt(
            &custodians.join(format!("{name}.key")),
            &custodians.join(format!("{name}.share.age")),
        );
        let env: Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(env["format"], "sovereign-kms/share-v1");
        assert_eq!(env["custodian"], name);
        assert_eq!(env["transcript_sha256"], s["transcript_sha256"]);
        decrypted_shares.push(env["share"].as_str().unwrap().to_owned());
        let path = dir.join(format!("{name}.share.json"));
        std::fs::write(&path, &plain).unwrap();
    }

    // A flipped byte, and another custodian's identity, fail naming the file.
    let mut bad = std::fs::read(custodians.join("alice.share.age")).unwrap();
    let at = bad.len() - 5;
    bad[at] ^= 1;
    std::fs::write(dir.join("flipped.share.age"), &bad).unwrap();
    let out = kms(
        dir,
        &[
            "ceremony",
            "verify-share",
            "--share",
            "flipped.share.age",
            "--identity",
            ".kms/custodians/alice.key",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("flipped.share.age"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kms(
        dir,
        &[
            "ceremony",
            "verify-share",
            "--share",
            ".kms/custodians/bob.share.age",
            "--identity",
            ".kms/custodians/alice.key",
        ],
    );
    assert!(!out.status.success());
    assert_eq!(status(dir)["custodians"][0]["verified"], false);

    // Alice and carol verify what they decrypted with age; bob lets kms decrypt.
    for args in [
        vec!["--decrypted", "alice.share.json"],
        vec![
            "--share",
            ".kms/custodians/bob.share.age",
            "--identity",
            ".kms/custodians/bob.key",
        ],
        vec!["--decrypted", "carol.share.json"],
    ] {
        let mut all = vec!["ceremony", "verify-share"];
        all.extend(args);
        let out = kms(dir, &all);
        assert!(
            out.status.success(),
            "{all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = status(dir);
    assert!(
        s["custodians"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["verified"] == true),
        "{s}"
    );
    assert_eq!(s["complete"], true);

    // Init refuses to run twice.
    let out = kms(
        dir,
        &[
            "ceremony",
            "init",
            "--threshold",
            "2",
            "--custodian",
            &format!("x={}", recipient(&custodians, "alice")),
            "--custodian",
            &format!("y={}", recipient(&custodians, "bob")),
            "--out-dir",
            "again",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already initialised"));
    assert!(!dir.join("again/x.share.age").exists());

    // The ceremony is on record; no share is in the log or the audit log.
    let events = audit_events(KMS, dir);
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["action"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(actions.iter().filter(|a| **a == "ceremony.init").count(), 1);
    assert_eq!(
        actions
            .iter()
            .filter(|a| **a == "ceremony.share_verified")
            .count(),
        3
    );
    let audit_text = serde_json::to_string(&events).unwrap();
    for share in &decrypted_shares {
        assert!(!log.contains(share.as_str()));
        assert!(!audit_text.contains(share.as_str()));
    }
    for name in ["alice", "bob", "carol"] {
        std::fs::remove_file(dir.join(format!("{name}.share.json"))).unwrap();
    }
}

fn recipient(custodians: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(custodians.join(format!("{name}.key"))).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn bad_init_input_is_refused_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = Server::start(KMS, dir);
    server.stop();
    let custodians = dir.join(".kms/custodians");
    let alice = format!("a={}", recipient(&custodians, "alice"));
    for (args, says) in [
        (
            vec![
                "--threshold",
                "1",
                "--custodian",
                &alice,
                "--custodian",
                "b=age1xyz",
            ],
            "not an age",
        ),
        (
            vec!["--threshold", "3", "--custodian", &alice],
            "threshold 3 of 1",
        ),
        (
            vec!["--threshold", "2", "--custodian", "../evil=age1"],
            "custodian name",
        ),
    ] {
        let mut all = vec!["ceremony", "init", "--out-dir", "out"];
        all.extend(args);
        let out = kms(dir, &all);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{all:?}: {err}");
    }
}

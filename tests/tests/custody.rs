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
    kms_tests::kms_in(KMS, dir, args)
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
    // Every version is escrowed (the one made after init at creation); none is left.
    let unescrowed = s["unescrowed_versions"].as_array().unwrap();
    assert!(unescrowed.is_empty(), "{unescrowed:?}");

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

fn b64(text: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().unwrap())
        .unwrap()
}

/// Opens a blob with a bare AES-256-GCM key, from the documented layout (empty context),
/// with aws-lc.
fn open_blob(kek: &[u8], blob: &[u8]) -> Option<Vec<u8>> {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, kek).unwrap());
    let nonce = Nonce::try_assume_unique_for_key(&blob[26..38]).unwrap();
    let mut aad = blob[..38].to_vec();
    aad.extend_from_slice(&0u16.to_be_bytes());
    let mut body = blob[38..].to_vec();
    key.open_in_place(nonce, Aad::from(aad), &mut body)
        .ok()
        .map(|p| p.to_vec())
}

#[test]
fn k_decrypted_shares_and_the_store_alone_open_every_version_of_both_levels() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = Server::start(KMS, dir);
    // Keys of both levels, each rotated, and a data key under every version, through the
    // data plane.
    let mut blobs = Vec::new();
    for (alias, protection) in [("soft", "software"), ("hard", "hsm")] {
        server.kms_json(&[
            "key",
            "create",
            "--alias",
            alias,
            "--protection",
            protection,
        ]);
        blobs.push(server.kms_json(&["data", "generate-key", "--key", alias]));
        server.kms_json(&["key", "rotate", alias]);
        blobs.push(server.kms_json(&["data", "generate-key", "--key", alias]));
    }
    let log = server.stop();
    assert!(status(dir)["unescrowed_versions"]
        .as_array()
        .unwrap()
        .is_empty());

    // An auditor's view with the standard tool: escrowed hsm versions are sensitive, always
    // sensitive and local, and not extractable (so not "never extractable" either).
    let objects = kms_tests::pkcs11_tool_objects(dir);
    // One block per object: a heading line, then its indented attribute lines.
    let mut blocks: Vec<String> = Vec::new();
    for line in objects.lines() {
        match blocks.last_mut() {
            Some(block) if line.starts_with(' ') => {
                block.push('\n');
                block.push_str(line);
            }
            _ => blocks.push(line.to_owned()),
        }
    }
    let versions: Vec<&String> = blocks
        .iter()
        .filter(|o| o.starts_with("Secret Key Object") && o.contains("sovereign-kms/kek/"))
        .collect();
    assert_eq!(versions.len(), 2, "{objects}");
    for o in &versions {
        assert!(
            o.contains("Access:     sensitive, always sensitive, local"),
            "{o}"
        );
        assert!(!o.contains("extractable"), "{o}");
        assert!(o.contains("Usage:      encrypt, decrypt"), "{o}");
    }

    // kms hsm inspect: the attributes pkcs11-tool does not print, and a role for each object.
    let out = kms(dir, &["hsm", "inspect", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.iter().all(|r| r["flagged"] == false), "{rows:?}");
    let escrow: Vec<&Value> = rows
        .iter()
        .filter(|r| r["kms_role"] == "escrow-key")
        .collect();
    assert_eq!(escrow.len(), 1);
    let e = escrow[0];
    assert_eq!(e["trusted"], true);
    assert_eq!(e["modifiable"], false);
    assert_eq!(e["destroyable"], false);
    assert_eq!(
        (e["wrap"].clone(), e["unwrap"].clone()),
        (true.into(), false.into())
    );
    for usage in ["encrypt", "decrypt", "sign", "verify", "derive"] {
        assert_eq!(e[usage], false, "{usage}");
    }
    assert_eq!(
        e["allowed_mechanisms"],
        serde_json::json!(["CKM_AES_KEY_WRAP_PAD"])
    );
    let hsm_versions: Vec<&Value> = rows
        .iter()
        .filter(|r| r["kms_role"] == "key-version")
        .collect();
    assert_eq!(hsm_versions.len(), 2);
    for v in &hsm_versions {
        assert_eq!(v["wrap_with_trusted"], true);
        assert_eq!(v["extractable"], false);
        assert_eq!(v["always_sensitive"], true);
        assert_eq!(v["never_extractable"], false);
        assert_eq!(v["local"], true);
        assert_eq!(v["escrowed"], true);
    }
    for role in ["root-key", "audit-signing-key"] {
        assert!(rows.iter().any(|r| r["kms_role"] == role), "{role}");
    }

    // Recovery: alice's and carol's shares, decrypted with age, and the store; no token.
    let custodians = dir.join(".kms/custodians");
    let share = |name: &str| {
        let plain = age_decrypt(
            &custodians.join(format!("{name}.key")),
            &custodians.join(format!("{name}.share.age")),
        );
        let path = std::path::PathBuf::from(format!("{name}.share.json"));
        (
            path.clone(),
            recovery::ShareEnvelope::parse(&plain, &path).unwrap(),
        )
    };
    let shares = vec![share("alice"), share("carol")];
    assert!(
        recovery::combine(&shares[..1]).is_err(),
        "one share must not be enough"
    );
    let secret = recovery::combine(&shares).unwrap();
    let store = kms_core::RocksStore::open_read_only(&dir.join(".kms/store")).unwrap();
    let custody = kms_core::custody::load(&store).unwrap().unwrap();
    let private = custody.record.private_key(&secret).unwrap();
    let records = kms_core::custody::version_records(&store).unwrap();
    assert_eq!(records.len(), 4);
    let audit_text = serde_json::to_string(&audit_events(KMS, dir)).unwrap();
    for dk in &blobs {
        let record = records
            .iter()
            .find(|r| {
                r.key_id.to_string() == dk["key_id"].as_str().unwrap()
                    && u64::from(r.version.get()) == dk["key_version"].as_u64().unwrap()
            })
            .unwrap();
        let kek = kms_core::custody::open_escrow(&store, &private, record).unwrap();
        assert_eq!(format!("{kek:?}"), "Kek(<redacted>)");
        let kek = kek.expose_secret();
        assert_eq!(
            open_blob(kek, &b64(&dk["ciphertext"])).unwrap(),
            b64(&dk["plaintext"])
        );
        // Leak canary: no escrowed key reaches the server's log or the audit log.
        for form in [hex::encode(kek), {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(kek)
        }] {
            assert!(!log.contains(&form), "an escrowed key is in the log");
            assert!(
                !audit_text.contains(&form),
                "an escrowed key is in the audit log"
            );
        }
        assert!(!format!("{record:?}").contains(&hex::encode(kek)));
    }
    // The recovery secret and the shares do not print.
    assert_eq!(format!("{secret:?}"), "RecoverySecret(<redacted>)");
    for (_, envelope) in &shares {
        let text = format!("{envelope:?}");
        assert!(
            text.contains("Share(index") && text.contains("<redacted>"),
            "{text}"
        );
    }
}

#[test]
fn a_custodian_verifies_while_the_server_runs_and_a_wrong_claim_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = Server::start(KMS, dir);
    let custodians = dir.join(".kms/custodians");
    let plain = age_decrypt(
        &custodians.join("carol.key"),
        &custodians.join("carol.share.age"),
    );
    std::fs::write(dir.join("carol.share.json"), &plain).unwrap();
    // The same share, claimed for another custodian: the server refuses it.
    let mut forged: Value = serde_json::from_slice(&plain).unwrap();
    forged["custodian"] = "bob".into();
    std::fs::write(dir.join("forged.share.json"), forged.to_string()).unwrap();
    let out = kms(
        dir,
        &[
            "ceremony",
            "verify-share",
            "--decrypted",
            "forged.share.json",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not the one at its index"), "{err}");

    let out = kms(
        dir,
        &[
            "ceremony",
            "verify-share",
            "--decrypted",
            "carol.share.json",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["custodian"], "carol");
    assert_eq!(answer["verified"], true);
    // Status reads the store beside the running server.
    let s = status(dir);
    let verified: Vec<bool> = s["custodians"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["verified"] == true)
        .collect();
    assert_eq!(verified, [false, false, true]);
    let log = server.stop();
    // The share never reached the server: not in its log, not in the audit log.
    let share = serde_json::from_slice::<Value>(&plain).unwrap()["share"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!log.contains(&share));
    let events = audit_events(KMS, dir);
    assert!(!serde_json::to_string(&events).unwrap().contains(&share));
    assert!(events
        .iter()
        .any(|e| e["action"] == "ceremony.share_verified"
            && e["status"] == "ok"
            && e["detail"]["custodian"] == "carol"));
}

#[test]
fn an_attestation_states_where_custody_stands_and_any_edit_fails_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let server = Server::start(KMS, dir);
    server.kms_json(&["key", "create", "--alias", "soft"]);
    server.kms_json(&["key", "rotate", "soft"]);
    server.kms_json(&["key", "create", "--alias", "hard", "--protection", "hsm"]);
    let file = dir.join("attestation.json");
    let signer = dir.join("signer.pem");
    // An auditor (read-only) may ask for it.
    let made = server.kms_json(&["--as", "auditor", "attest", "--out", file.to_str().unwrap()]);
    let exported = server.kms(&["audit", "public-key", "--out", signer.to_str().unwrap()]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let checked = server.kms_json(&[
        "attest",
        "verify",
        file.to_str().unwrap(),
        "--public-key",
        signer.to_str().unwrap(),
    ]);
    assert_eq!(checked["valid"], true, "{checked}");
    assert_eq!(checked["versions"], 3);
    assert_eq!(checked["unescrowed"], 0);
    assert_eq!(checked["epoch"], 1);

    let text = std::fs::read_to_string(&file).unwrap();
    let a: Value = serde_json::from_str(&text).unwrap();
    let s = &a["statement"];
    assert!(s["root_of_trust"]["library"]
        .as_str()
        .unwrap()
        .contains("softhsm"));
    assert_eq!(s["root_of_trust"]["model"], "SoftHSM v2");
    assert!(!s["root_of_trust"]["serial"].as_str().unwrap().is_empty());
    let count = |protection: &str| {
        s["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["protection"] == protection && k["state"] == "enabled")
            .map(|k| (k["keys"].as_u64().unwrap(), k["versions"].as_u64().unwrap()))
    };
    assert_eq!(count("software"), Some((1, 2)), "{s}");
    assert_eq!(count("hsm"), Some((1, 1)), "{s}");
    assert_eq!(s["custody"]["threshold"], 2);
    assert_eq!(
        s["custody"]["custodians"],
        serde_json::json!(["alice", "bob", "carol"])
    );
    assert_eq!(s["approvals"]["required"], 2);
    assert!(s["approvals"]["gated"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g == "admin.Reshare"));
    for h in ["policies", "trust_bundles", "operators"] {
        assert_eq!(s["hashes"][h].as_str().unwrap().len(), 64, "{h}");
    }
    assert_eq!(s["last_drill"], Value::Null);

    // A changed field fails, and so does a byte of whitespace.
    let verify_fails = |edited: &str| {
        let bad = dir.join("edited.json");
        std::fs::write(&bad, edited).unwrap();
        let out = server.kms(&[
            "attest",
            "verify",
            bad.to_str().unwrap(),
            "--public-key",
            signer.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "an edited attestation verified");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let raised = text.replacen("\"threshold\": 2", "\"threshold\": 3", 1);
    assert_ne!(raised, text);
    let err = verify_fails(&raised);
    assert!(err.contains("attestation does not verify"), "{err}");
    let err = verify_fails(&text.replacen("{\n", "{ \n", 1));
    assert!(err.contains("canonical"), "{err}");
    // Refused if the file exists: an attestation is never overwritten.
    let again = server.kms(&["attest", "--out", file.to_str().unwrap()]);
    assert!(!again.status.success());

    // The request is on the audit record, naming the file's hash.
    drop(server.stop());
    let events = audit_events(KMS, dir);
    let asked = events
        .iter()
        .rev()
        .find(|e| e["action"] == "admin.Attest" && e["status"] == "ok")
        .expect("the attestation is audited");
    assert_eq!(asked["detail"]["attestation_sha256"], made["sha256"]);
}

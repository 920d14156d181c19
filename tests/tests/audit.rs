#![allow(
    clippy::disallowed_methods,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]
//! The audit log end to end: tampering found and named by `kms audit verify`, nothing secret
//! in logs or records, nothing acknowledged lost to SIGKILL, and refusal when the log cannot
//! be written. Real binary, real SoftHSM2 token, real RocksDB, loopback gRPC.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::v1::{
    BatchGenerateDataKeyRequest, DecryptRequest, EncryptRequest, GenerateDataKeyRequest,
    ReEncryptRequest,
};
use base64::Engine as _;
use kms_core::store::{Change, Store, Table};
use kms_core::RocksStore;
use kms_tests::Server;
use serde_json::Value;

/// The CLI built for this test run from the current code.
const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");

fn kms(dir: &Path, args: &[&str]) -> std::process::Output {
    kms_tests::kms_in(KMS, dir, args)
}

/// `kms audit verify --json` on a data directory or file: (exit code, report).
fn verify(dir: &Path, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["audit", "verify", "--json"];
    all.extend_from_slice(args);
    let out = kms(dir, &all);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "verify printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

fn seq_key(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A stopped dev server's directory holding a few dozen audit records.
fn stopped_server_with_history() -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    server.kms_json(&["key", "create", "--alias", "t"]);
    for i in 0..12 {
        server.kms_json(&[
            "data",
            "generate-key",
            "--key",
            "t",
            "--context",
            &format!("n={i}"),
        ]);
    }
    server.stop();
    let (code, report) = verify(dir.path(), &[]);
    assert_eq!(code, 0, "untampered log must verify: {report}");
    assert_eq!(report["ok"], true);
    let records = report["records"].as_u64().unwrap();
    assert!(records >= 16, "{report}");
    assert_eq!(report["first_bad_seq"], Value::Null);
    assert_eq!(report["anchored_to"].as_u64(), Some(records));
    (dir, records)
}

/// Copies the stopped server's `.kms`, tampers with its store, and verifies the copy.
fn tamper_and_verify(src: &Path, tamper: impl FnOnce(&RocksStore)) -> (i32, Value) {
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("copy");
    copy_dir(&src.join(".kms"), &copy);
    {
        let store = RocksStore::open(&copy.join("store")).unwrap();
        tamper(&store);
    }
    verify(work.path(), &["--data-dir", copy.to_str().unwrap()])
}

fn value(store: &RocksStore, seq: u64) -> Vec<u8> {
    store
        .get(Table::AuditRecords, &seq_key(seq))
        .unwrap()
        .unwrap()
}

fn put(store: &RocksStore, seq: u64, value: Vec<u8>) {
    store
        .write(vec![Change::Put {
            table: Table::AuditRecords,
            key: seq_key(seq),
            value,
        }])
        .unwrap();
}

#[test]
fn verify_names_the_first_edited_deleted_swapped_or_truncated_record() {
    let (dir, records) = stopped_server_with_history();

    // One byte flipped inside record 5's body.
    let (code, report) = tamper_and_verify(dir.path(), |s| {
        let mut v = value(s, 5);
        v[40] ^= 0x01;
        put(s, 5, v);
    });
    assert_eq!(
        (code, report["ok"].clone()),
        (1, Value::Bool(false)),
        "{report}"
    );
    assert_eq!(report["first_bad_seq"], 5, "{report}");

    // Record 7 deleted.
    let (code, report) = tamper_and_verify(dir.path(), |s| {
        s.write(vec![Change::Delete {
            table: Table::AuditRecords,
            key: seq_key(7),
        }])
        .unwrap();
    });
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["first_bad_seq"], 7, "{report}");

    // Records 8 and 9 swapped.
    let (code, report) = tamper_and_verify(dir.path(), |s| {
        let (a, b) = (value(s, 8), value(s, 9));
        put(s, 8, b);
        put(s, 9, a);
    });
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["first_bad_seq"], 8, "{report}");

    // The last three records dropped: the shutdown checkpoint still names them.
    let cut = records - 2;
    let (code, report) = tamper_and_verify(dir.path(), |s| {
        s.write(vec![Change::DeleteRange {
            table: Table::AuditRecords,
            from: seq_key(cut),
            to: seq_key(u64::MAX),
        }])
        .unwrap();
    });
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["first_bad_seq"], cut, "{report}");

    // A record rewritten with a consistent hash of its own: the chain still names it.
    let (code, report) = tamper_and_verify(dir.path(), |s| {
        let v = value(s, 6);
        let body = String::from_utf8(v[32..].to_vec()).unwrap();
        let forged = body.replacen("\"action\":\"", "\"action\":\"forged.", 1);
        assert_ne!(forged, body, "record 6 has an action");
        let hash = kms_core::audit::record_hash(forged.as_bytes());
        let mut v = hash.to_vec();
        v.extend_from_slice(forged.as_bytes());
        put(s, 6, v);
    });
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["first_bad_seq"], 6, "{report}");
}

/// A stopped dev server's directory whose log has two runs: records 1..=m signed by the first
/// run's shutdown checkpoint, m+1..=n by the second's. Returns (dir, m, n).
fn two_runs() -> (tempfile::TempDir, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut ends = Vec::new();
    for run in 0..2 {
        let server = Server::start(KMS, dir.path());
        if run == 0 {
            server.kms_json(&["key", "create", "--alias", "t"]);
        }
        for i in 0..6 {
            server.kms_json(&[
                "data",
                "generate-key",
                "--key",
                "t",
                "--context",
                &format!("n={i}"),
            ]);
        }
        server.stop();
        let (code, report) = verify(dir.path(), &[]);
        assert_eq!(code, 0, "{report}");
        ends.push(report["last_checkpoint"]["seq"].as_u64().unwrap());
    }
    (dir, ends[0], ends[1])
}

/// Lines of an export, with `keep` deciding which stay, written to `name`.
fn rewrite(dir: &Path, from: &str, name: &str, edit: impl Fn(Vec<Value>) -> Vec<Value>) {
    let text = std::fs::read_to_string(dir.join(from)).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let out: Vec<String> = edit(lines).iter().map(Value::to_string).collect();
    std::fs::write(dir.join(name), out.join("\n") + "\n").unwrap();
}

fn seq_of(line: &Value) -> u64 {
    line["seq"].as_u64().unwrap_or(0)
}

#[test]
fn verify_names_the_kind_of_break_and_a_cut_before_a_known_head() {
    let (dir, m, n) = two_runs();
    assert!(m + 6 <= n, "two runs of records: {m} {n}");
    let d = dir.path();
    assert!(kms(d, &["audit", "public-key", "--out", "signer.pem"])
        .status
        .success());
    assert!(kms(
        d,
        &["audit", "export", "--since", "1", "--out", "full.jsonl"]
    )
    .status
    .success());
    let file = |name: &str| {
        vec![
            "--file".to_owned(),
            name.to_owned(),
            "--public-key".to_owned(),
            "signer.pem".to_owned(),
        ]
    };
    let check = |name: &str, extra: &[&str]| {
        let mut args = file(name);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        verify(d, &args)
    };

    let (code, report) = check("full.jsonl", &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["last_checkpoint"]["seq"], n, "{report}");
    assert!(report["last_checkpoint"]["time"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let full = std::fs::read_to_string(d.join("full.jsonl")).unwrap();
    let head = full
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .rfind(|l| l["type"] == "checkpoint")
        .unwrap()["head"]
        .as_str()
        .unwrap()
        .to_owned();

    // Cut after m+3, with the later checkpoints dropped too: the chain is intact, but its
    // tail is unsigned, which fails unless accepted...
    let cut = m + 3;
    rewrite(d, "full.jsonl", "cut.jsonl", |lines| {
        lines
            .into_iter()
            .filter(|l| {
                l["type"] == "signer"
                    || seq_of(l) <= cut && (l["type"] == "record" || seq_of(l) <= m)
            })
            .collect()
    });
    let (code, report) = check("cut.jsonl", &[]);
    assert_eq!((code, &report["ok"]), (1, &Value::Bool(true)), "{report}");
    assert_eq!(report["unanchored"], 3, "{report}");
    assert_eq!(report["unanchored_accepted"], false, "{report}");
    assert_eq!(report["last_checkpoint"]["seq"], m, "{report}");
    let (code, report) = check("cut.jsonl", &["--allow-unanchored"]);
    assert_eq!(code, 0, "{report}");
    // ...and against a head kept elsewhere it is a truncation, named by its first missing
    // record, whether the head is given as SEQ:HASH or as the export that holds it.
    for extra in [
        vec!["--expect-head".to_owned(), format!("{n}:{head}")],
        vec!["--expect-checkpoint".to_owned(), "full.jsonl".to_owned()],
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (code, report) = check("cut.jsonl", &extra);
        assert_eq!(code, 1, "{report}");
        assert_eq!(report["kind"], "truncated", "{report}");
        assert_eq!(report["first_bad_seq"], cut + 1, "{report}");
        assert_eq!(report["expected_head"], false, "{report}");
        let (code, report) = check("full.jsonl", &extra);
        assert_eq!(
            (code, &report["expected_head"]),
            (0, &Value::Bool(true)),
            "{report}"
        );
    }
    // The data directory is checked against a known head the same way.
    let (code, report) = verify(d, &["--expect-head", &format!("{}:{head}", n + 5)]);
    assert_eq!(
        (code, &report["kind"], &report["first_bad_seq"]),
        (1, &Value::from("truncated"), &Value::from(n + 1)),
        "{report}"
    );

    // Two records swapped, and one repeated: named at the first record out of place.
    let (a, b) = (m + 2, m + 3);
    rewrite(d, "full.jsonl", "swapped.jsonl", |mut lines| {
        let i = lines
            .iter()
            .position(|l| l["type"] == "record" && seq_of(l) == a)
            .unwrap();
        lines.swap(i, i + 1);
        assert_eq!(seq_of(&lines[i]), b);
        lines
    });
    let (code, report) = check("swapped.jsonl", &[]);
    assert_eq!(
        (code, &report["kind"], &report["first_bad_seq"]),
        (1, &Value::from("reordered"), &Value::from(a)),
        "{report}"
    );
    rewrite(d, "full.jsonl", "repeated.jsonl", |mut lines| {
        let i = lines
            .iter()
            .position(|l| l["type"] == "record" && seq_of(l) == a)
            .unwrap();
        let again = lines[i].clone();
        lines.insert(i + 1, again);
        lines
    });
    let (code, report) = check("repeated.jsonl", &[]);
    assert_eq!(
        (code, &report["kind"], &report["first_bad_seq"]),
        (1, &Value::from("duplicated"), &Value::from(a)),
        "{report}"
    );

    // Record m+2 rewritten and the chain recomputed over everything after it: only the
    // signed head shows it, so the break is named from the first record after the last good
    // checkpoint, as an edit, with its range.
    let (code, report) = tamper_and_verify(d, |s| {
        let mut prev: Option<[u8; 32]> = None;
        for seq in a..=n {
            let v = value(s, seq);
            let mut body = String::from_utf8(v[32..].to_vec()).unwrap();
            if seq == a {
                let forged = body.replace("\"status\":\"ok\"", "\"status\":\"PermissionDenied\"");
                assert_ne!(forged, body);
                body = forged;
            }
            if let Some(p) = prev {
                let record: Value = serde_json::from_str(&body).unwrap();
                let old = record["prev"].as_str().unwrap().to_owned();
                body = body.replace(&old, &hex(&p));
            }
            let hash = kms_core::audit::record_hash(body.as_bytes());
            let mut v = hash.to_vec();
            v.extend_from_slice(body.as_bytes());
            put(s, seq, v);
            prev = Some(hash);
        }
    });
    assert_eq!(
        (code, &report["kind"], &report["first_bad_seq"]),
        (1, &Value::from("edited"), &Value::from(m + 1)),
        "{report}"
    );
    assert!(
        report["problem"]
            .as_str()
            .unwrap()
            .contains(&format!("{}..{n}", m + 1)),
        "{report}"
    );
}

#[test]
fn exported_log_verifies_offline_and_tampering_in_the_file_is_found() {
    let (dir, records) = stopped_server_with_history();
    let out = kms(dir.path(), &["audit", "public-key", "--out", "signer.pem"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kms(
        dir.path(),
        &["audit", "export", "--since", "1", "--out", "log.jsonl"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (code, report) = verify(
        dir.path(),
        &["--file", "log.jsonl", "--public-key", "signer.pem"],
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["records"].as_u64(), Some(records));
    assert!(report["checkpoints"].as_u64().unwrap() >= 1);

    // A line a SIEM can read: every record line is JSON with its body as an object.
    let text = std::fs::read_to_string(dir.path().join("log.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "signer");
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "record"
                && l["record"]["event"]["action"] == "data.GenerateDataKey")
    );

    // Edit record 4 inside the file.
    let edited: String = text
        .lines()
        .map(|l| {
            if l.contains("\"type\":\"record\",\"seq\":4,") {
                l.replacen("\"time_ms\":", "\"time_ms\":1", 1)
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("edited.jsonl"), edited).unwrap();
    let (code, report) = verify(
        dir.path(),
        &["--file", "edited.jsonl", "--public-key", "signer.pem"],
    );
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["first_bad_seq"], 4, "{report}");

    // A key that did not sign the checkpoints is not trusted.
    let other = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEht7WecW0vtR8VwMk9TQkuAMNoivW\nHyTZPJuKrTWAwnVYJwTAIZeSCW8cGDNmXY4IMMfQYZ4cy5sJ/7ZihBx4QQ==\n-----END PUBLIC KEY-----\n";
    std::fs::write(dir.path().join("other.pem"), other).unwrap();
    let (code, report) = verify(dir.path(), &["--public-key", "other.pem"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        report["problem"].as_str().unwrap().contains("unknown key"),
        "{report}"
    );
}

/// Every spelling of `secret` that a leak could take: raw, hex, base64 at each alignment.
fn spellings(secret: &[u8]) -> Vec<String> {
    let mut out = vec![
        String::from_utf8_lossy(secret).into_owned(),
        hex(secret),
        hex(secret).to_uppercase(),
    ];
    for shift in 0..3 {
        let mut shifted = vec![0u8; shift];
        shifted.extend_from_slice(secret);
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::URL_SAFE,
        ] {
            let enc = engine.encode(&shifted);
            // The characters that depend only on `secret`'s bytes.
            out.push(enc[4..enc.len() - 4].to_owned());
        }
    }
    out.retain(|s| s.len() >= 8);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn assert_absent(haystack: &str, what: &str, secret: &[u8]) {
    for s in spellings(secret) {
        assert!(
            !haystack.contains(&s),
            "{what} leaked as {s:?} into logs or the audit export"
        );
    }
}

#[test]
fn no_secret_reaches_the_logs_or_the_audit_log() {
    no_secret_reaches_the_logs_or_the_audit_log_in("text");
}

/// The same canaries with the server logging JSON lines (`--log-format json`), each line an
/// object, one per request among them.
#[test]
fn no_secret_reaches_json_logs_either() {
    let log = no_secret_reaches_the_logs_or_the_audit_log_in("json");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let request = lines
        .iter()
        .find(|l| l["target"] == "kms::request" && l["rpc"] == "data.GenerateDataKey")
        .expect("a request line");
    assert_eq!(request["plane"], "data");
    assert_eq!(request["outcome"], "ok");
    assert_eq!(request["request_id"].as_str().map(str::len), Some(32));
    assert!(request["duration_us"].is_u64(), "{request}");
}

/// Drives every operation with canary secrets against a server logging in `format` at TRACE,
/// and checks that none reaches its log or the audit log; returns the server's log.
fn no_secret_reaches_the_logs_or_the_audit_log_in(format: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(KMS, dir.path(), "trace", &["--log-format", format]);
    let plaintext = b"CANARY-PLAINTEXT-5b9e1c7a40d2";
    let context_value = "canary-context-value-d41d8cd98f";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut deks: Vec<Vec<u8>> = Vec::new();

    // Every admin operation.
    server.kms_json(&["key", "create", "--alias", "soft", "--label", "team=canary"]);
    server.kms_json(&["key", "create", "--alias", "hard", "--protection", "hsm"]);
    server.kms_json(&["key", "rotate", "soft"]);
    server.kms_json(&["key", "disable", "hard"]);
    server.kms_json(&["key", "enable", "hard"]);
    let k = server.kms_json(&["key", "create"]);
    server.kms_json(&["key", "alias", "third", k["key_id"].as_str().unwrap()]);
    server.kms_json(&["key", "describe", "soft"]);
    server.kms_json(&["key", "list"]);
    // Governance operations.
    server.kms_json(&["trust-bundle", "list"]);
    server.kms_approved(&[
        "identity",
        "register",
        "spiffe://canary.example/x",
        "--owner",
        "o",
        "--purpose",
        "p",
        "--expires",
        "1d",
    ]);
    server.kms_json(&["identity", "describe", "spiffe://canary.example/x"]);
    server.kms_json(&["identity", "list"]);
    server.kms_json(&["policy", "list"]);
    server.kms_json(&[
        "policy",
        "test",
        "--principal",
        "spiffe://canary.example/x",
        "--action",
        "Decrypt",
        "--key",
        "soft",
        "--context",
        &format!("tenant={context_value}"),
    ]);
    let mut tokens: Vec<String> = Vec::new();

    // Every data-plane operation, on both protection levels, with the canary context.
    rt.block_on(async {
        let mut data = server
            .client_tls("workload")
            .data(&server.data)
            .await
            .unwrap();
        let ctx = || [("tenant".to_owned(), context_value.to_owned())].into();
        for key in ["soft", "hard"] {
            let g = data
                .generate_data_key(GenerateDataKeyRequest {
                    key: key.into(),
                    encryption_context: ctx(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            deks.push(g.plaintext.clone());
            let d = data
                .decrypt(DecryptRequest {
                    ciphertext: g.ciphertext.clone(),
                    encryption_context: ctx(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(d.plaintext, g.plaintext);
            data.generate_data_key_without_plaintext(GenerateDataKeyRequest {
                key: key.into(),
                encryption_context: ctx(),
                ..Default::default()
            })
            .await
            .unwrap();
            let e = data
                .encrypt(EncryptRequest {
                    key: key.into(),
                    plaintext: plaintext.to_vec(),
                    encryption_context: ctx(),
                })
                .await
                .unwrap()
                .into_inner();
            let r = data
                .re_encrypt(ReEncryptRequest {
                    ciphertext: e.ciphertext.clone(),
                    source_encryption_context: ctx(),
                    destination_key: "soft".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let back = data
                .decrypt(DecryptRequest {
                    ciphertext: r.ciphertext,
                    encryption_context: ctx(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(back.plaintext, plaintext);
            let batch = data
                .batch_generate_data_key(BatchGenerateDataKeyRequest {
                    items: vec![
                        GenerateDataKeyRequest {
                            key: key.into(),
                            encryption_context: ctx(),
                            ..Default::default()
                        };
                        3
                    ],
                    without_plaintext: false,
                })
                .await
                .unwrap()
                .into_inner();
            for item in batch.results {
                if let Some(api::v1::generate_data_key_result::Result::Ok(ok)) = item.result {
                    deks.push(ok.plaintext.clone());
                }
            }
            // Refused requests are recorded too: wrong context, unknown key.
            assert!(data
                .decrypt(DecryptRequest {
                    ciphertext: g.ciphertext.clone(),
                    encryption_context: [("tenant".to_owned(), "other".to_owned())].into(),
                })
                .await
                .is_err());
        }
        // A grant, minted and used; its token is a secret too.
        let g = data
            .generate_data_key(GenerateDataKeyRequest {
                key: "soft".into(),
                encryption_context: ctx(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        deks.push(g.plaintext.clone());
        let grant = data
            .create_grant(api::v1::CreateGrantRequest {
                grantee: "spiffe://dev.sovereign-kms.local/workload/demo".into(),
                key: "soft".into(),
                operations: vec!["Decrypt".into()],
                required_context: ctx(),
                ttl_seconds: 60,
                max_uses: 5,
            })
            .await
            .unwrap()
            .into_inner();
        tokens.push(grant.token.clone());
        let mut with_grant = tonic::Request::new(DecryptRequest {
            ciphertext: g.ciphertext.clone(),
            encryption_context: ctx(),
        });
        with_grant
            .metadata_mut()
            .insert(server::GRANT_HEADER, grant.token.parse().unwrap());
        data.decrypt(with_grant).await.unwrap();
        // A malformed key reference is refused and not copied into the log.
        assert!(data
            .generate_data_key(GenerateDataKeyRequest {
                key: "z".repeat(5000),
                ..Default::default()
            })
            .await
            .is_err());
        assert!(data
            .generate_data_key(GenerateDataKeyRequest {
                key: "no-such-key".into(),
                encryption_context: ctx(),
                ..Default::default()
            })
            .await
            .is_err());
    });
    assert_eq!(deks.len(), 9);
    assert_eq!(tokens.len(), 1);
    let remote = kms(
        dir.path(),
        &["audit", "export", "--server", &server.admin, "--since", "1"],
    );
    assert!(
        remote.status.success(),
        "{}",
        String::from_utf8_lossy(&remote.stderr)
    );
    let log = server.stop();
    let out = kms(
        dir.path(),
        &["audit", "export", "--since", "1", "--out", "all.jsonl"],
    );
    assert!(out.status.success());
    let export = std::fs::read_to_string(dir.path().join("all.jsonl")).unwrap();
    assert!(export.contains("data.ReEncrypt") && export.contains("admin.CreateAlias"));
    assert!(export.contains("\"context_keys\":[\"tenant\"]"));
    assert!(export.contains("\"source_key_version\":\"1\""));
    assert!(export.contains("\"reason\":\"invalid key reference\""));
    assert!(!export.contains(&"z".repeat(100)));
    assert!(log.contains("TRACE"), "the server logged at TRACE");

    let pin = std::fs::read(dir.path().join(".kms/secrets/user.pin")).unwrap();
    let pin = String::from_utf8(pin).unwrap();
    let everything = format!(
        "{log}\n{export}\n{}",
        String::from_utf8_lossy(&remote.stdout)
    );
    assert_absent(&everything, "plaintext", plaintext);
    assert_absent(&everything, "context value", context_value.as_bytes());
    assert_absent(&everything, "HSM PIN", pin.trim().as_bytes());
    for dek in &deks {
        assert_absent(&everything, "data key", dek);
    }
    for token in &tokens {
        assert_absent(&everything, "grant token", token.as_bytes());
        let tag = token.rsplit('.').next().unwrap();
        assert_absent(&everything, "grant token tag", tag.as_bytes());
    }
    assert!(export.contains("data.CreateGrant"));
    log
}

/// Runs 20 clients against the server for a second, then SIGKILLs it mid-load; returns the
/// request ids of every response a client saw succeed.
fn load_then_kill(server: Server) -> Vec<String> {
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let round = server.admin.clone();
    let mut clients = Vec::new();
    for c in 0..20 {
        let tls = server.client_tls("workload");
        let addr = server.data.clone();
        let acknowledged = acknowledged.clone();
        let stop = stop.clone();
        let round = round.clone();
        clients.push(rt.spawn(async move {
            let mut data = tls.data(&addr).await.unwrap();
            // Bounded: at most 5000 requests per client, and it stops at the first failure.
            for i in 0..5000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = format!("{}-c{c}-{i}", round.replace([':', '.'], "_"));
                let mut req = tonic::Request::new(GenerateDataKeyRequest {
                    key: "load".into(),
                    ..Default::default()
                });
                req.metadata_mut()
                    .insert(server::REQUEST_ID, id.parse().unwrap());
                match data.generate_data_key(req).await {
                    Ok(resp) => {
                        assert_eq!(
                            resp.metadata().get(server::REQUEST_ID).unwrap(),
                            id.as_str()
                        );
                        acknowledged.lock().unwrap().push(id);
                    }
                    Err(_) => break,
                }
            }
        }));
    }
    // The kill comes once the load is well under way (at least 200 acknowledged), not after a
    // fixed time that a slow machine might not fill.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged.lock().unwrap().len() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let before_kill = acknowledged.lock().unwrap().len();
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for c in clients {
            c.await.unwrap();
        }
    });
    assert!(
        before_kill >= 100,
        "the load ran ({before_kill} requests before the kill)"
    );
    let acknowledged = acknowledged.lock().unwrap().clone();
    acknowledged
}

/// Request ids in the audit log of a stopped server's directory.
fn recorded_request_ids(dir: &Path) -> HashSet<String> {
    kms_tests::audit_events(KMS, dir)
        .iter()
        .filter_map(|e| e["client_request_id"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    server.kms_json(&["key", "create", "--alias", "load"]);
    let mut server = Some(server);
    let mut last_before = 0;
    // A kill lands at a random point of the group commit; three rounds make a lost record
    // likely to show if responses ever ran ahead of their records.
    for round in 0..3 {
        let acknowledged = load_then_kill(server.take().unwrap());
        // Killed, the server signed nothing after its last checkpoint: the chain is intact,
        // and verify says the tail is unsigned unless told to accept that.
        let (code, report) = verify(dir.path(), &[]);
        if report["unanchored"].as_u64().unwrap() > 0 {
            assert_eq!(
                (code, &report["ok"]),
                (1, &Value::Bool(true)),
                "round {round}: {report}"
            );
        }
        let (code, report) = verify(dir.path(), &["--allow-unanchored"]);
        assert_eq!(code, 0, "round {round}: {report}");
        let recorded = recorded_request_ids(dir.path());
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|id| !recorded.contains(*id))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} acknowledged requests have no audit record, e.g. {:?}",
            missing.len(),
            acknowledged.len(),
            missing.first()
        );
        last_before = report["last_seq"].as_u64().unwrap();
        server = Some(Server::start(KMS, dir.path()));
    }

    // Restarted: the chain continues without a gap and verifies, anchored again.
    let server = server.unwrap();
    server.kms_json(&["data", "generate-key", "--key", "load"]);
    server.stop();
    let (code, report) = verify(dir.path(), &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["unanchored"], 0, "{report}");
    assert!(
        report["last_seq"].as_u64().unwrap() >= last_before + 3,
        "{report}"
    );
    let export = kms(
        dir.path(),
        &["audit", "export", "--since", &(last_before + 1).to_string()],
    );
    let first: Value = serde_json::from_str(
        String::from_utf8_lossy(&export.stdout)
            .lines()
            .nth(1)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["seq"].as_u64(), Some(last_before + 1));
    assert_eq!(first["record"]["event"]["action"], "server.start");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallVolume(PathBuf);

impl SmallVolume {
    fn mount(at: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs to fill it, and needs root (CI runs as root)"
        );
        Self(at)
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros into `path` until the volume is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn full_audit_volume_fails_requests_closed() {
    let work = tempfile::tempdir().unwrap();
    let volume = SmallVolume::mount(work.path().join("vol"), "32m");
    let server = Server::start(KMS, &volume.0);
    server.kms_json(&["key", "create", "--alias", "full"]);
    server.kms_json(&["data", "generate-key", "--key", "full"]);

    fill(&volume.0.join("ballast"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let mut data = server
            .client_tls("workload")
            .data(&server.data)
            .await
            .unwrap();
        // Enough records to need new space however RocksDB had preallocated its log.
        let mut last = None;
        for _ in 0..200 {
            match data
                .generate_data_key(GenerateDataKeyRequest {
                    key: "full".into(),
                    ..Default::default()
                })
                .await
            {
                Ok(_) => {}
                Err(s) => {
                    last = Some(s);
                    break;
                }
            }
        }
        last
    });
    let status = status.expect("requests must be refused once the audit log cannot be written");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), server::AUDIT_UNAVAILABLE);
    assert!(server.log_shows("audit log write failed", Duration::from_secs(5)));

    // Space back, server restarted: the refused requests left no gap, and the log verifies.
    std::fs::remove_file(volume.0.join("ballast")).unwrap();
    server.kill9();
    let server = Server::start(KMS, &volume.0);
    server.kms_json(&["data", "generate-key", "--key", "full"]);
    server.stop();
    let (code, report) = verify(&volume.0, &[]);
    assert_eq!(code, 0, "{report}");
}

#[test]
fn query_audit_filters_and_pages_and_export_follows() {
    use api::v1::QueryAuditRequest;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let key = server.kms_json(&["key", "create", "--alias", "q"]);
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    for i in 0..5 {
        server.kms_json(&[
            "data",
            "generate-key",
            "--key",
            "q",
            "--context",
            &format!("i={i}"),
        ]);
    }
    assert!(!server
        .kms(&["data", "generate-key", "--key", "missing"])
        .status
        .success());

    // --follow keeps writing new records as they are made.
    let follow_out = dir.path().join("follow.jsonl");
    let mut follow = Command::new(KMS)
        .current_dir(dir.path())
        .args(["audit", "export", "--follow", "--since", "1", "--out"])
        .arg(&follow_out)
        .spawn()
        .unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin = server
            .client_tls("operator1")
            .admin(&server.admin)
            .await
            .unwrap();
        let query = |r: QueryAuditRequest| {
            let mut admin = admin.clone();
            async move { admin.query_audit(r).await.unwrap().into_inner() }
        };
        let allowed = query(QueryAuditRequest {
            action: "data.GenerateDataKey".into(),
            decision: "allow".into(),
            key: key_id.clone(),
            ..Default::default()
        })
        .await;
        assert_eq!(allowed.records.len(), 5);
        assert!(!allowed.more);
        let denied = query(QueryAuditRequest {
            decision: "deny".into(),
            ..Default::default()
        })
        .await;
        assert_eq!(denied.records.len(), 1);
        let body: Value = serde_json::from_str(&denied.records[0].record_json).unwrap();
        assert_eq!(body["event"]["key"], "missing");
        assert_eq!(body["event"]["reason"], "no such key");
        let principal = body["event"]["principal"].as_str().unwrap().to_owned();
        let by_principal = query(QueryAuditRequest {
            principal: principal.clone(),
            ..Default::default()
        })
        .await;
        assert_eq!(by_principal.records.len(), 6, "five allowed and one denied");

        // Pages of two, in sequence order, covering every record exactly once.
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let page = query(QueryAuditRequest {
                after_seq: after,
                page_size: 2,
                ..Default::default()
            })
            .await;
            assert!(page.records.len() <= 2);
            seen.extend(page.records.iter().map(|r| r.seq));
            after = page.next_after_seq;
            if !page.more {
                break;
            }
        }
        assert_eq!(seen, (1..=seen.len() as u64).collect::<Vec<_>>());
        assert!(seen.len() >= 9, "{seen:?}");
        assert_eq!(
            admin
                .clone()
                .query_audit(QueryAuditRequest {
                    decision: "maybe".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
        // Searching the audit log is itself recorded, with the filters used.
        let searches = query(QueryAuditRequest {
            action: "admin.QueryAudit".into(),
            ..Default::default()
        })
        .await;
        assert!(searches
            .records
            .iter()
            .any(|r| r.record_json.contains("\"detail\":{\"decision\":\"deny\"}")));
        // The data plane's certificate cannot read the audit log.
        let as_workload = server.client_tls("workload").admin(&server.admin).await;
        if let Ok(mut c) = as_workload {
            assert!(c.query_audit(QueryAuditRequest::default()).await.is_err());
        }
    });

    server.kms_json(&["data", "generate-key", "--key", "q", "--context", "late=1"]);
    let mut followed = false;
    for _ in 0..100 {
        let text = std::fs::read_to_string(&follow_out).unwrap_or_default();
        if text.contains("\"late\"") {
            followed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        followed,
        "export --follow wrote the record made after it started"
    );
}

#[test]
fn a_failed_hsm_login_is_on_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    server.stop();
    let pin = dir.path().join(".kms/secrets/user.pin");
    let good = std::fs::read(&pin).unwrap();
    std::fs::write(&pin, b"wrong-pin-000000").unwrap();
    let out = kms_tests::serve_dev(KMS, dir.path()).output().unwrap();
    assert!(!out.status.success());
    std::fs::write(&pin, good).unwrap();
    let export = kms(dir.path(), &["audit", "export", "--since", "1"]);
    let text = String::from_utf8_lossy(&export.stdout);
    assert!(text.contains("\"action\":\"hsm.open_failed\""), "{text}");
    assert!(!text.contains("wrong-pin-000000"));
    // The failed start could not sign (the HSM was not open): its records are chained only.
    let (code, report) = verify(dir.path(), &["--allow-unanchored"]);
    assert_eq!(code, 0, "{report}");
}

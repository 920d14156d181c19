#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]
//! `kms bench` (the load generator in `kms-loadgen`) against the real `kms serve --dev` on
//! loopback: every operation runs, counts what it sent, and sets up what it measures against.
//! Runs are one second long: this checks the tool, not the server's speed (bench/RESULTS.md).

use kms_tests::Server;
use serde_json::Value;

/// The CLI built for this test run from the current code.
const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");

fn bench(server: &Server, args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    server.kms_json(&all)
}

/// Keys on the server, every page.
fn key_count(server: &Server) -> usize {
    let (mut n, mut token) = (0, String::new());
    loop {
        let page = server.kms_json(&["key", "list", "--page-size", "1000", "--page-token", &token]);
        n += page["keys"].as_array().unwrap().len();
        token = page["next_page_token"].as_str().unwrap().to_owned();
        if token.is_empty() {
            return n;
        }
    }
}

/// A run that sent requests, all answered, and reports its percentiles in order.
fn assert_clean_run(r: &Value) {
    let requests = r["requests"].as_u64().unwrap();
    assert!(requests > 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["first_error"].is_null(), "{r}");
    assert!(r["ops_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    let p = |q: &str| r[q].as_u64().unwrap();
    assert!(p("p50_us") >= 1 && p("p50_us") <= p("p90_us"), "{r}");
    assert!(
        p("p90_us") <= p("p99_us") && p("p99_us") <= p("max_us"),
        "{r}"
    );
}

#[test]
fn every_operation_runs_and_counts_what_it_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    assert_eq!(key_count(&server), 0);

    let r = bench(
        &server,
        &[
            "--op",
            "generate-data-key",
            "--concurrency",
            "4",
            "--duration",
            "1",
        ],
    );
    assert_clean_run(&r);
    assert_eq!(
        (r["concurrency"].as_u64(), r["connections"].as_u64()),
        (Some(4), Some(1))
    );
    assert_eq!(r["protection"], "software");
    assert!(r["policy_evaluations"].is_u64(), "{r}");

    let r = bench(
        &server,
        &[
            "--op",
            "decrypt",
            "--protection",
            "hsm",
            "--batch",
            "5",
            "--concurrency",
            "2",
            "--connections",
            "2",
            "--duration",
            "1",
        ],
    );
    assert_clean_run(&r);
    // A batch RPC counts its items.
    let (ops, requests) = (
        r["ops_per_sec"].as_f64().unwrap(),
        r["requests"].as_u64().unwrap(),
    );
    assert!(ops >= 4.0 * requests as f64 / 2.0, "{r}");
    assert_eq!(
        (r["protection"].as_str(), r["batch"].as_u64()),
        (Some("hsm"), Some(5))
    );

    let r = bench(
        &server,
        &["--op", "health", "--concurrency", "1", "--duration", "1"],
    );
    assert_clean_run(&r);
    assert_eq!(r["protection"], "-");

    let r = bench(
        &server,
        &[
            "--op",
            "generate-data-key",
            "--concurrency",
            "2",
            "--duration",
            "1",
            "--distinct-contexts",
            "--distinct-entry",
            "message",
        ],
    );
    assert_clean_run(&r);
    assert_eq!(r["distinct_entry"], "message");

    let r = bench(&server, &["--op", "rotate-key", "--duration", "1"]);
    assert_clean_run(&r);
    assert_eq!(r["concurrency"], 1);
    let r = bench(&server, &["--op", "create-key", "--duration", "1"]);
    assert_clean_run(&r);

    // Each data-plane run made its key (health makes none), rotate one, create one per request.
    let created = r["requests"].as_u64().unwrap() as usize;
    assert_eq!(key_count(&server), 3 + 1 + 1 + created);
}

#[test]
fn refusal_timing_refuses_both_kinds_and_removes_its_policy() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let r = bench(&server, &["--op", "refusal-timing", "--pairs", "20"]);
    assert_eq!(r["forbidden"]["refused"], 20, "{r}");
    assert_eq!(r["unknown"]["refused"], 20, "{r}");
    assert!(r["median_gap_us"].is_i64(), "{r}");
    let policies = server.kms_json(&["policy", "list"]).to_string();
    assert!(!policies.contains("bench-timing-forbidden"), "{policies}");
}

#[test]
fn synthetic_governance_is_stored_and_approved() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let r = bench(
        &server,
        &[
            "--op",
            "health",
            "--concurrency",
            "1",
            "--duration",
            "1",
            "--add-policies",
            "3",
            "--add-identities",
            "40",
        ],
    );
    assert_clean_run(&r);
    let policies = server.kms_json(&["policy", "list"]).to_string();
    for id in [
        "bench-0",
        "bench-2",
        "bench-restricted-hours",
        "bench-blocked-requests",
    ] {
        assert!(
            policies.contains(&format!("\"{id}\"")),
            "{id} missing: {policies}"
        );
    }
    let identities = server.kms_json(&["identity", "list"]).to_string();
    for i in [0, 31, 32, 39] {
        let selector = format!("spiffe://bench.example/svc-{i}\"");
        assert!(identities.contains(&selector), "svc-{i} missing");
    }
    assert!(!identities.contains("spiffe://bench.example/svc-40\""));
}

#[test]
fn bad_flag_combinations_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    for (args, says) in [
        (
            &["--op", "refusal-timing", "--duration", "1"][..],
            "needs --pairs",
        ),
        (
            &["--op", "decrypt", "--pairs", "3"][..],
            "refusal-timing only",
        ),
        (
            &[
                "--op",
                "create-key",
                "--concurrency",
                "4",
                "--duration",
                "1",
            ][..],
            "one caller",
        ),
        (
            &["--op", "decrypt", "--duration", "1"][..],
            "--concurrency and --duration",
        ),
        (
            &[
                "--op",
                "decrypt",
                "--concurrency",
                "1",
                "--duration",
                "1",
                "--distinct-contexts",
            ][..],
            "generate-data-key only",
        ),
    ] {
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        let out = server.kms(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::print_stdout,
    reason = "a measurement program: a failed step ends it"
)]
//! Policy evaluation in process, with the governance benchmark's policy set: 1,000 policies
//! each naming another workload, the shipped restricted-hours forbid, a forbid reading the
//! `request` entry, and one permit for the caller. Prints the times Cedar's part of a request
//! takes without the server around it: with a new value of `request` per request (every
//! request evaluated), with a new value of an entry no policy reads (decisions reused across
//! contexts), and with one request repeated. Build with `--release`: `cargo run --release -p
//! kms-core --example policy_eval -- [requests]`.

use std::collections::BTreeMap;
use std::sync::Arc;

use kms_core::governance::inventory::Workload;
use kms_core::governance::policy::{Decided, Policies};
use kms_core::{
    AccessRequest, AuthMethod, Caller, Decision, EncryptionContext, KeyId, KeyRecord, KeyState,
    KeyVersion, Labels, Op, Protection, RocksStore, SystemClock,
};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(200_000, |a| a.parse().expect("evaluations: a number"));
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open(dir.path()).unwrap());
    let policies = Policies::open(store, Arc::new(SystemClock)).unwrap();
    let me = "spiffe://bench.example/caller";
    policies
        .put(
            "caller",
            &format!("permit (principal == Workload::\"{me}\", action, resource);"),
            "bench",
        )
        .unwrap();
    policies
        .put(
            "restricted-hours",
            include_str!("../../examples/policies/restricted-hours.cedar"),
            "bench",
        )
        .unwrap();
    // As in `kms bench --add-policies`: every caller's decision depends on the `request` entry.
    policies
        .put(
            "blocked-requests",
            "forbid (principal, action, resource) when { \
             context.encryption_context.hasTag(\"request\") && \
             context.encryption_context.getTag(\"request\") == \"blocked\" };",
            "bench",
        )
        .unwrap();
    for i in 0..1000 {
        let text = format!(
            "permit (principal == Workload::\"spiffe://bench.example/svc-{i}\", \
             action in [Action::\"GenerateDataKey\", Action::\"Decrypt\"], resource) \
             when {{ context.encryption_context.hasTag(\"tenant\") && \
             context.encryption_context.getTag(\"tenant\") == \"t{i}\" }};"
        );
        policies.put(&format!("bench-{i}"), &text, "bench").unwrap();
    }
    let labels = |pairs: &[(&str, &str)]| {
        Labels::from_pairs(pairs.iter().map(|(k, v)| ((*k).into(), (*v).into()))).unwrap()
    };
    let mut caller = Caller::new(me.parse().unwrap(), AuthMethod::Mtls);
    caller.workload = Some(Arc::new(Workload {
        selector: me.into(),
        owner: "team-1".into(),
        purpose: "benchmark identity".into(),
        labels: labels(&[("tier", "prod")]),
        expires_at: u64::MAX,
        active: true,
        created_at: 0,
        created_by: "bench".into(),
        updated_at: 0,
        updated_by: "bench".into(),
        reviewed_at: 0,
    }));
    let key = KeyRecord {
        id: KeyId::from_random_bytes([7; 16]),
        alias: None,
        labels: labels(&[("owner", "bench")]),
        protection: Protection::Software,
        state: KeyState::Enabled,
        current_version: KeyVersion::new(1).unwrap(),
        created_at: 0,
        updated_at: 0,
        destruction: None,
    };
    // Every request gets its own value of an entry the policies read (`request`), so each one
    // is evaluated by Cedar; then of an entry no policy reads (`message`), so decisions are
    // reused across contexts; then one request repeated.
    let contexts = |entry: &str| -> Vec<EncryptionContext> {
        (0..n)
            .map(|i| {
                EncryptionContext::from_pairs(BTreeMap::from([
                    ("tenant".to_owned(), "t1".to_owned()),
                    (entry.to_owned(), i.to_string()),
                ]))
                .unwrap()
            })
            .collect()
    };
    let read = contexts("request");
    let unread = contexts("message");
    // 12:00 UTC: the restricted-hours forbid does not fire. Each mode runs in its own second,
    // as the server's decision cache keeps at most 4,096 decisions a second.
    let noon = 1_798_804_800;
    let decide = |context: &'_ EncryptionContext, now_unix: u64| -> Decided {
        policies.decide(&AccessRequest {
            caller: &caller,
            op: Op::GenerateDataKey,
            key: &key,
            context,
            now_unix,
        })
    };
    let first = read.first().expect("at least one request");
    assert_eq!(decide(first, noon).verdict.decision, Decision::Allow);
    let repeated = vec![first.clone(); read.len()];
    for (second, (name, contexts)) in [
        ("distinct", &read),
        ("distinct-unread", &unread),
        ("repeated", &repeated),
    ]
    .into_iter()
    .enumerate()
    {
        let now = noon + 1 + u64::try_from(second).unwrap();
        policies.decision_counts(true);
        // Each evaluation timed here, as the server's decorator times it in production.
        let mut evals = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)
            .expect("histogram bounds");
        let started = std::time::Instant::now();
        for (i, context) in contexts.iter().enumerate() {
            let one = std::time::Instant::now();
            let decided = decide(std::hint::black_box(context), now);
            if !decided.reused {
                let _ = evals.record(
                    u64::try_from(one.elapsed().as_nanos())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
            }
            assert_eq!(decided.verdict.decision, Decision::Allow, "request {i}");
        }
        let elapsed = started.elapsed();
        let counts = policies.decision_counts(false);
        println!(
            "{{\"contexts\":\"{name}\",\"requests\":{n},\"evaluations\":{},\"reused\":{},\
             \"statements\":{},\"mean_ns\":{},\"p50_ns\":{},\"p99_ns\":{},\"p999_ns\":{},\
             \"max_ns\":{}}}",
            counts.count,
            counts.cached,
            policies.statement_count(),
            elapsed.as_nanos() / u128::from(n.max(1)),
            evals.value_at_quantile(0.5),
            evals.value_at_quantile(0.99),
            evals.value_at_quantile(0.999),
            evals.max()
        );
    }
}

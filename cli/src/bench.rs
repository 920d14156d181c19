//! `kms bench`: a closed-loop load generator against a running server.
//!
//! It creates its own key on the admin plane, opens a few HTTP/2 connections to the data plane
//! (one per 16 concurrent callers, at most 8), runs `--concurrency` callers for `--duration`
//! seconds, and reports throughput and latency percentiles of whole RPCs. With `--batch N`,
//! each RPC carries N items and throughput counts items.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::v1::{
    BatchDecryptRequest, BatchGenerateDataKeyRequest, CreateKeyRequest, DecryptRequest,
    GenerateDataKeyRequest,
};
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::connect::{ConnectArgs, Plane};
use crate::error::Error;
use crate::output::emit;

/// Options of `kms bench`.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Operation to measure.
    /// `refusal-timing` times a key the caller is forbidden against one that does not exist,
    /// interleaved, one caller (see --pairs). `create-key` and `rotate-key` time key lifecycle
    /// on the admin plane (each new version is escrowed), one caller, for --duration.
    #[arg(long, value_parser = ["generate-data-key", "decrypt", "health", "refusal-timing", "create-key", "rotate-key"])]
    op: String,
    /// Protection level of the key the benchmark creates.
    #[arg(long, default_value = "software", value_parser = ["software", "hsm"])]
    protection: String,
    /// Items per RPC; 1 uses the single-item RPC, more uses the batch RPC.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    batch: u32,
    /// Concurrent callers (data-plane ops; key lifecycle ops run one caller).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: Option<u32>,
    /// Seconds to run.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600), required_unless_present = "pairs")]
    duration: Option<u64>,
    /// refusal-timing only: how many (forbidden, unknown) pairs to time.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pairs: Option<u32>,
    /// HTTP/2 connections to spread callers over (default: one per 16 callers, at most 8).
    #[arg(long)]
    connections: Option<u32>,
    /// Before measuring, store this many extra policies (each for one synthetic workload), to
    /// measure authorisation with a large policy set. Adds to what is there.
    #[arg(long, default_value_t = 0)]
    add_policies: u32,
    /// Before measuring, register this many extra synthetic workload identities.
    #[arg(long, default_value_t = 0)]
    add_identities: u32,
    /// generate-data-key only: give every request its own encryption context (an extra entry,
    /// named by --distinct-entry, holding a counter). With the default entry, `request`, which
    /// the policies of --add-policies read, every request is evaluated by Cedar.
    #[arg(long)]
    distinct_contexts: bool,
    /// The entry --distinct-contexts varies. An entry no policy reads (for example `message`)
    /// lets the server reuse one decision across the contexts.
    #[arg(long, default_value = "request", requires = "distinct_contexts")]
    distinct_entry: String,
}

/// Synthetic governance for the benchmark: `policies` policies, each permitting one synthetic
/// workload two actions under a tenant context (so each is a real, schema-checked policy that
/// does not apply to the benchmark's own workload), the shipped restricted-hours forbid and a
/// forbid of requests whose `request` entry is `blocked` (both apply to every request; the
/// second makes every caller's decision depend on the `request` entry), and `identities`
/// registrations.
async fn populate(
    admin: &mut api::AdminClient,
    conn: &ConnectArgs,
    policies: u32,
    identities: u32,
) -> Result<(), Error> {
    use api::v1::{PutPolicyRequest, RegisterWorkloadRequest};
    let approvers = std::sync::Arc::new(crate::approval::DevApprovers::connect(conn).await?);
    if policies > 0 {
        let p = admin
            .put_policy(PutPolicyRequest {
                id: "bench-restricted-hours".into(),
                text: include_str!("../../examples/policies/restricted-hours.cedar").into(),
            })
            .await?
            .into_inner();
        approvers.settle(p.approval.as_ref()).await?;
        let p = admin
            .put_policy(PutPolicyRequest {
                id: "bench-blocked-requests".into(),
                text: "forbid (principal, action, resource)\nwhen {\n  \
                       context.encryption_context.hasTag(\"request\") &&\n  \
                       context.encryption_context.getTag(\"request\") == \"blocked\"\n};\n"
                    .into(),
            })
            .await?
            .into_inner();
        approvers.settle(p.approval.as_ref()).await?;
    }
    for i in 0..policies {
        let text = format!(
            "permit (\n  principal == Workload::\"spiffe://bench.example/svc-{i}\",\n  \
             action in [Action::\"GenerateDataKey\", Action::\"Decrypt\"],\n  resource\n)\n\
             when {{\n  context.encryption_context.hasTag(\"tenant\") &&\n  \
             context.encryption_context.getTag(\"tenant\") == \"t{i}\"\n}};\n"
        );
        let p = admin
            .put_policy(PutPolicyRequest {
                id: format!("bench-{i}"),
                text,
            })
            .await?
            .into_inner();
        approvers.settle(p.approval.as_ref()).await?;
    }
    // Registrations in parallel: each is its own synced write and two audit records.
    let expires_at = unix_now().saturating_add(30 * 86_400);
    let workers = 32u32;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut admin = admin.clone();
        let approvers = approvers.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < identities {
                let r = admin
                    .register_workload(RegisterWorkloadRequest {
                        selector: format!("spiffe://bench.example/svc-{i}"),
                        owner: format!("team-{}", i % 100),
                        purpose: "benchmark identity".into(),
                        labels: [("tier".to_owned(), "prod".to_owned())].into(),
                        expires_at,
                    })
                    .await?
                    .into_inner();
                approvers.settle(r.approval.as_ref()).await?;
                i += workers;
            }
            Ok::<(), Error>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|_| Error::Usage("a registration worker panicked".into()))??;
    }
    Ok(())
}

#[derive(Clone)]
enum Job {
    Decrypt(Vec<u8>),
    /// The key, and the entry that gives each request its own encryption context, if any.
    Generate(String, Option<Arc<str>>),
    Health,
}

struct WorkerResult {
    hist: Histogram<u64>,
    items: u64,
    errors: u64,
    first_error: Option<String>,
}

// long: one linear run whose report names every input and measurement; a report helper
// would only take them all as arguments.
pub(crate) async fn run(args: BenchArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    match (args.op.as_str(), args.pairs) {
        ("refusal-timing", Some(pairs)) => {
            return refusal_timing(&args, pairs, conn, as_json).await
        }
        ("refusal-timing", None) => {
            return Err(Error::Usage("--op refusal-timing needs --pairs N".into()))
        }
        (_, Some(_)) => {
            return Err(Error::Usage(
                "--pairs applies to --op refusal-timing only".into(),
            ))
        }
        ("create-key" | "rotate-key", None) => {
            if args.concurrency.is_some_and(|c| c != 1) {
                return Err(Error::Usage(
                    "--op create-key and rotate-key run one caller (the server serialises key changes)".into(),
                ));
            }
            return lifecycle(&args, conn, as_json).await;
        }
        _ => {}
    }
    let (Some(concurrency), Some(duration)) = (args.concurrency, args.duration) else {
        return Err(Error::Usage(
            "--concurrency and --duration are required".into(),
        ));
    };
    if args.distinct_contexts && args.op != "generate-data-key" {
        return Err(Error::Usage(
            "--distinct-contexts applies to --op generate-data-key only".into(),
        ));
    }
    let (admin_addr, admin_tls) = conn.resolve(Plane::Admin)?;
    let (data_addr, data_tls) = conn.resolve(Plane::Data)?;
    let connections = args
        .connections
        .unwrap_or_else(|| concurrency.div_ceil(16).min(8))
        .max(1);
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(data_tls.channel(&data_addr).await?);
    }
    if args.add_policies > 0 || args.add_identities > 0 {
        let mut admin = admin_tls.admin(&admin_addr).await?;
        populate(&mut admin, conn, args.add_policies, args.add_identities).await?;
    }
    // Policy evaluation times are measured in the server; start a fresh measurement.
    let _ = admin_tls
        .admin(&admin_addr)
        .await?
        .policy_stats(api::v1::PolicyStatsRequest { reset: true })
        .await;
    let job = job_for(&args, admin_tls.admin(&admin_addr).await?, &channels).await?;

    let duration_s = duration;
    let duration = Duration::from_secs(duration);
    let started = now();
    let deadline = started + duration;
    let batch = args.batch;
    let mut tasks = Vec::new();
    for channel in channels
        .iter()
        .cycle()
        .take(usize::try_from(concurrency).unwrap_or(1))
    {
        let channel = channel.clone();
        let job = job.clone();
        tasks.push(tokio::spawn(worker(channel, job, batch, deadline)));
    }
    let (hist, items, errors, first_error) = gather(tasks).await?;
    let elapsed = now().duration_since(started).as_secs_f64();
    let policy = admin_tls
        .admin(&admin_addr)
        .await?
        .policy_stats(api::v1::PolicyStatsRequest { reset: false })
        .await
        .map(tonic::Response::into_inner)
        .ok();
    let ops = if elapsed > 0.0 {
        items_f64(items) / elapsed
    } else {
        0.0
    };
    let report = json!({
        "op": args.op,
        "protection": if matches!(job, Job::Health) { "-" } else { args.protection.as_str() },
        "batch": batch,
        "concurrency": concurrency,
        "connections": connections,
        "duration_s": duration_s,
        "ops_per_sec": (ops * 10.0).round() / 10.0,
        "p50_us": hist.value_at_quantile(0.50),
        "p90_us": hist.value_at_quantile(0.90),
        "p99_us": hist.value_at_quantile(0.99),
        "max_us": hist.max(),
        "requests": hist.len(),
        "errors": errors,
        "first_error": first_error,
        "policy_statements": policy.as_ref().map(|p| p.statements),
        "policy_eval_p50_ns": policy.as_ref().map(|p| p.p50_ns),
        "policy_eval_p99_ns": policy.as_ref().map(|p| p.p99_ns),
        "policy_eval_max_ns": policy.as_ref().map(|p| p.max_ns),
        "policy_evaluations": policy.as_ref().map(|p| p.evaluations),
        "policy_cached_decisions": policy.as_ref().map(|p| p.cached_decisions),
        "policy_decision_p50_ns": policy.as_ref().map(|p| p.decision_p50_ns),
        "policy_decision_p99_ns": policy.as_ref().map(|p| p.decision_p99_ns),
        "policy_decision_max_ns": policy.as_ref().map(|p| p.decision_max_ns),
        "distinct_contexts": args.distinct_contexts,
        "distinct_entry": args.distinct_contexts.then_some(args.distinct_entry.as_str()),
    });
    emit(as_json, &report)
}

/// Times key creation or rotation, one request after another for --duration seconds (the
/// server serialises key changes, so more callers would only queue). Each new version is
/// escrowed inside its store write, so this is the cost of escrow at creation.
async fn lifecycle(args: &BenchArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let duration = args
        .duration
        .ok_or_else(|| Error::Usage("--duration is required".into()))?;
    let (admin_addr, admin_tls) = conn.resolve(Plane::Admin)?;
    let mut admin = admin_tls.admin(&admin_addr).await?;
    let protection = match args.protection.as_str() {
        "hsm" => api::v1::Protection::Hsm,
        _ => api::v1::Protection::Software,
    };
    let create = CreateKeyRequest {
        alias: String::new(),
        protection: protection.into(),
        labels: [("purpose".to_owned(), "benchmark".to_owned())].into(),
    };
    let key = admin.create_key(create.clone()).await?.into_inner().key_id;
    let mut hist = new_histogram()?;
    let (mut errors, mut first_error) = (0u64, None);
    let start = now();
    while start.elapsed() < Duration::from_secs(duration) {
        let t = now();
        let answer = if args.op == "rotate-key" {
            admin
                .rotate_key(api::v1::KeyRequest { key: key.clone() })
                .await
                .map(drop)
        } else {
            admin.create_key(create.clone()).await.map(drop)
        };
        let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        let _ = hist.record(us);
        if let Err(s) = answer {
            errors += 1;
            first_error.get_or_insert_with(|| s.message().to_owned());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let report = json!({
        "op": args.op,
        "protection": args.protection,
        "concurrency": 1,
        "duration_s": (secs * 10.0).round() / 10.0,
        "ops_per_sec": ((items_f64(hist.len()) / secs) * 10.0).round() / 10.0,
        "p50_us": hist.value_at_quantile(0.50),
        "p90_us": hist.value_at_quantile(0.90),
        "p99_us": hist.value_at_quantile(0.99),
        "max_us": hist.max(),
        "requests": hist.len(),
        "errors": errors,
        "first_error": first_error,
    });
    emit(as_json, &report)
}

/// Times `pairs` interleaved requests (the order alternating within each pair) for a key the
/// caller is forbidden (created with a label a forbid policy names) and for a key that does
/// not exist; both are answered with the same status and message, and should take the same
/// time.
async fn refusal_timing(
    args: &BenchArgs,
    pairs: u32,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    use api::v1::PutPolicyRequest;
    let (admin_addr, admin_tls) = conn.resolve(Plane::Admin)?;
    let (data_addr, data_tls) = conn.resolve(Plane::Data)?;
    let mut admin = admin_tls.admin(&admin_addr).await?;
    let key = admin
        .create_key(CreateKeyRequest {
            alias: String::new(),
            protection: match args.protection.as_str() {
                "hsm" => api::v1::Protection::Hsm,
                _ => api::v1::Protection::Software,
            }
            .into(),
            labels: [("timing".to_owned(), "forbidden".to_owned())].into(),
        })
        .await?
        .into_inner()
        .key_id;
    let approvers = crate::approval::DevApprovers::connect(conn).await?;
    let p = admin
        .put_policy(PutPolicyRequest {
            id: "bench-timing-forbidden".into(),
            text: "forbid (principal, action, resource)\nwhen { resource.hasTag(\"timing\") && \
                   resource.getTag(\"timing\") == \"forbidden\" };\n"
                .into(),
        })
        .await?
        .into_inner();
    approvers.settle(p.approval.as_ref()).await?;
    let unknown = "00000000-0000-4000-8000-00000000beef".to_owned();
    let mut data = api::DataClient::new(data_tls.channel(&data_addr).await?);
    let (hists, refused) = time_pairs(&mut data, &key, &unknown, pairs).await?;
    if let Ok(p) = admin
        .delete_policy(api::v1::PolicyRequest {
            id: "bench-timing-forbidden".into(),
        })
        .await
    {
        let _ = approvers.settle(p.into_inner().approval.as_ref()).await;
    }
    let [forbidden, missing] = &hists;
    let summary = |h: &Histogram<u64>, n: u64| {
        json!({
            "p10_us": h.value_at_quantile(0.10),
            "p50_us": h.value_at_quantile(0.50),
            "p90_us": h.value_at_quantile(0.90),
            "mean_us": (h.mean() * 10.0).round() / 10.0,
            "refused": n,
        })
    };
    let median_gap = i64::try_from(forbidden.value_at_quantile(0.5)).unwrap_or(i64::MAX)
        - i64::try_from(missing.value_at_quantile(0.5)).unwrap_or(i64::MAX);
    let report = json!({
        "op": "refusal-timing",
        "protection": args.protection,
        "pairs": pairs,
        "forbidden": summary(forbidden, refused[0]),
        "unknown": summary(missing, refused[1]),
        "median_gap_us": median_gap,
        "mean_gap_us": ((forbidden.mean() - missing.mean()) * 10.0).round() / 10.0,
    });
    emit(as_json, &report)
}

/// Sends `pairs` pairs of data-key requests, one for `key` and one for `unknown`, their order
/// alternating, and times each: (histograms in µs, PermissionDenied counts), forbidden first.
async fn time_pairs(
    data: &mut api::DataClient,
    key: &str,
    unknown: &str,
    pairs: u32,
) -> Result<([Histogram<u64>; 2], [u64; 2]), Error> {
    let mut hists = [new_histogram()?, new_histogram()?];
    let mut refused = [0u64; 2];
    for i in 0..pairs {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let request = GenerateDataKeyRequest {
                key: if which == 0 {
                    key.to_owned()
                } else {
                    unknown.to_owned()
                },
                ..Default::default()
            };
            let t = now();
            let answer = data.generate_data_key(request).await;
            let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            if let Some(h) = hists.get_mut(which) {
                let _ = h.record(us);
            }
            if let (Err(s), Some(n)) = (answer, refused.get_mut(which)) {
                if s.code() == tonic::Code::PermissionDenied {
                    *n += 1;
                }
            }
        }
    }
    Ok((hists, refused))
}

/// What each worker sends: a key created for the run (and, for decrypt, one blob under it).
async fn job_for(
    args: &BenchArgs,
    mut admin: api::AdminClient,
    channels: &[tonic::transport::Channel],
) -> Result<Job, Error> {
    Ok(match args.op.as_str() {
        "health" => Job::Health,
        op => {
            let protection = match args.protection.as_str() {
                "hsm" => api::v1::Protection::Hsm,
                _ => api::v1::Protection::Software,
            };
            let key = admin
                .create_key(CreateKeyRequest {
                    alias: String::new(),
                    protection: protection.into(),
                    labels: [("purpose".to_owned(), "benchmark".to_owned())].into(),
                })
                .await?
                .into_inner()
                .key_id;
            if op == "decrypt" {
                let first = channels
                    .first()
                    .cloned()
                    .ok_or_else(|| Error::Usage("no connection".into()))?;
                let mut client = api::v1::data_plane_client::DataPlaneClient::new(first);
                let blob = client
                    .generate_data_key_without_plaintext(gdk_request(&key))
                    .await?
                    .into_inner()
                    .ciphertext;
                Job::Decrypt(blob)
            } else {
                Job::Generate(
                    key,
                    args.distinct_contexts
                        .then(|| Arc::from(args.distinct_entry.as_str())),
                )
            }
        }
    })
}

/// Waits for every worker and merges what they measured: latencies, items, errors and the
/// first error.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<Result<WorkerResult, Error>>>,
) -> Result<(hdrhistogram::Histogram<u64>, u64, u64, Option<String>), Error> {
    let mut hist = new_histogram()?;
    let (mut items, mut errors) = (0u64, 0u64);
    let mut first_error = None;
    for t in tasks {
        let r = t
            .await
            .map_err(|_| Error::Usage("a benchmark worker panicked".into()))??;
        hist.add(&r.hist)
            .map_err(|_| Error::Usage("histogram merge".into()))?;
        items += r.items;
        errors += r.errors;
        first_error = first_error.or(r.first_error);
    }
    Ok((hist, items, errors, first_error))
}

/// A request with the benchmark's context, plus, when `distinct` names an entry, that entry
/// with a value unique to this process.
fn gdk_request_for(key: &str, distinct: Option<&str>) -> GenerateDataKeyRequest {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut r = gdk_request(key);
    if let Some(entry) = distinct {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        r.encryption_context.insert(entry.to_owned(), n.to_string());
    }
    r
}

fn gdk_request(key: &str) -> GenerateDataKeyRequest {
    GenerateDataKeyRequest {
        key: key.to_owned(),
        encryption_context: [("bench".to_owned(), "1".to_owned())].into(),
        spec: api::v1::DataKeySpec::Aes256.into(),
    }
}

#[expect(
    clippy::as_conversions,
    reason = "item counts far below 2^52 convert exactly"
)]
fn items_f64(n: u64) -> f64 {
    n as f64
}

#[expect(
    clippy::disallowed_methods,
    reason = "registrations expire relative to the wall clock"
)]
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[expect(clippy::disallowed_methods, reason = "a benchmark measures wall time")]
fn now() -> Instant {
    Instant::now()
}

fn new_histogram() -> Result<Histogram<u64>, Error> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .map_err(|_| Error::Usage("histogram bounds".into()))
}

async fn worker(
    channel: Channel,
    job: Job,
    batch: u32,
    deadline: Instant,
) -> Result<WorkerResult, Error> {
    let mut clients = Clients {
        data: api::v1::data_plane_client::DataPlaneClient::new(channel.clone()),
        health: HealthClient::new(channel),
    };
    let mut hist = new_histogram()?;
    let (mut items, mut errors) = (0u64, 0u64);
    let mut first_error = None;
    while now() < deadline {
        let t0 = now();
        let outcome = clients.call(&job, batch).await;
        let micros = u64::try_from(now().duration_since(t0).as_micros()).unwrap_or(u64::MAX);
        let _ = hist.record(micros.max(1));
        match outcome {
            Ok(()) => items += u64::from(batch),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    Ok(WorkerResult {
        hist,
        items,
        errors,
        first_error,
    })
}

struct Clients {
    data: api::v1::data_plane_client::DataPlaneClient<Channel>,
    health: HealthClient<Channel>,
}

impl Clients {
    /// One RPC; a batch counts as failed if any item failed.
    async fn call(&mut self, job: &Job, batch: u32) -> Result<(), String> {
        use api::v1::{decrypt_result, generate_data_key_result};
        let n = usize::try_from(batch).unwrap_or(1);
        let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
        match job {
            Job::Health => self
                .health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|_| ())
                .map_err(status),
            Job::Generate(key, distinct) if batch == 1 => self
                .data
                .generate_data_key(gdk_request_for(key, distinct.as_deref()))
                .await
                .map(|_| ())
                .map_err(status),
            Job::Generate(key, distinct) => {
                let items = (0..n)
                    .map(|_| gdk_request_for(key, distinct.as_deref()))
                    .collect();
                let request = BatchGenerateDataKeyRequest {
                    items,
                    without_plaintext: false,
                };
                let r = self
                    .data
                    .batch_generate_data_key(request)
                    .await
                    .map_err(status)?;
                match r.get_ref().results.iter().find_map(|x| match &x.result {
                    Some(generate_data_key_result::Result::Ok(_)) => None,
                    Some(generate_data_key_result::Result::Error(e)) => Some(e.message.clone()),
                    None => Some("empty batch item".to_owned()),
                }) {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
            Job::Decrypt(blob) if batch == 1 => self
                .data
                .decrypt(decrypt_request(blob))
                .await
                .map(|_| ())
                .map_err(status),
            Job::Decrypt(blob) => {
                let items = vec![decrypt_request(blob); n];
                let r = self
                    .data
                    .batch_decrypt(BatchDecryptRequest { items })
                    .await
                    .map_err(status)?;
                match r.get_ref().results.iter().find_map(|x| match &x.result {
                    Some(decrypt_result::Result::Ok(_)) => None,
                    Some(decrypt_result::Result::Error(e)) => Some(e.message.clone()),
                    None => Some("empty batch item".to_owned()),
                }) {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
        }
    }
}

fn decrypt_request(blob: &[u8]) -> DecryptRequest {
    DecryptRequest {
        ciphertext: blob.to_vec(),
        encryption_context: [("bench".to_owned(), "1".to_owned())].into(),
    }
}

//! `kms bench`: the flags and the report of `kms_loadgen`'s runs against a running server.
//!
//! It creates its own key on the admin plane, opens a few HTTP/2 connections to the data plane
//! (one per 16 concurrent callers, at most 8), runs `--concurrency` callers for `--duration`
//! seconds, and reports throughput and latency percentiles of whole RPCs. With `--batch N`,
//! each RPC carries N items and throughput counts items.

use std::time::Duration;

use clap::Args;
use kms_loadgen::{ClosedLoop, Histogram, Latencies, Lifecycle, Workload};
use serde_json::{json, Value};

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

pub(crate) async fn run(args: BenchArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    match (args.op.as_str(), args.pairs) {
        ("refusal-timing", Some(pairs)) => refusal_timing(&args, pairs, conn, as_json).await,
        ("refusal-timing", None) => Err(Error::Usage("--op refusal-timing needs --pairs N".into())),
        (_, Some(_)) => Err(Error::Usage(
            "--pairs applies to --op refusal-timing only".into(),
        )),
        ("create-key" | "rotate-key", None) => {
            if args.concurrency.is_some_and(|c| c != 1) {
                return Err(Error::Usage(
                    "--op create-key and rotate-key run one caller (the server serialises key changes)".into(),
                ));
            }
            lifecycle(&args, conn, as_json).await
        }
        _ => closed_loop(&args, conn, as_json).await,
    }
}

async fn closed_loop(args: &BenchArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let (Some(callers), Some(duration_s)) = (args.concurrency, args.duration) else {
        return Err(Error::Usage(
            "--concurrency and --duration are required".into(),
        ));
    };
    let workload = workload(args)?;
    let connections = args
        .connections
        .unwrap_or_else(|| callers.div_ceil(16).min(8))
        .max(1);
    let channels = data_channels(conn, connections).await?;
    let (admin_addr, admin_tls) = conn.resolve(Plane::Admin)?;
    let mut admin = admin_tls.admin(&admin_addr).await?;
    if args.add_policies > 0 || args.add_identities > 0 {
        let approvers = crate::approval::dev_approvers(conn).await?;
        kms_loadgen::populate(
            &mut admin,
            &approvers,
            args.add_policies,
            args.add_identities,
        )
        .await
        .map_err(load_error)?;
    }
    // Policy evaluation times are measured in the server; start a fresh measurement.
    let _ = admin
        .policy_stats(api::v1::PolicyStatsRequest { reset: true })
        .await;
    let plan = ClosedLoop {
        workload,
        protection: protection(args),
        batch: args.batch,
        callers,
        duration: Duration::from_secs(duration_s),
    };
    let measured = kms_loadgen::closed_loop(&mut admin, &channels, &plan)
        .await
        .map_err(load_error)?;
    let policy = admin
        .policy_stats(api::v1::PolicyStatsRequest { reset: false })
        .await
        .map(tonic::Response::into_inner)
        .ok();
    let report = Report {
        args,
        health: matches!(plan.workload, Workload::Health),
        callers,
        connections,
        duration_s,
    };
    emit(as_json, &report.closed_loop(&measured, policy.as_ref()))
}

/// What each caller sends, from --op and --distinct-contexts.
fn workload(args: &BenchArgs) -> Result<Workload, Error> {
    if args.distinct_contexts && args.op != "generate-data-key" {
        return Err(Error::Usage(
            "--distinct-contexts applies to --op generate-data-key only".into(),
        ));
    }
    Ok(match args.op.as_str() {
        "health" => Workload::Health,
        "decrypt" => Workload::Decrypt,
        _ => Workload::GenerateDataKey {
            distinct_entry: args.distinct_contexts.then(|| args.distinct_entry.clone()),
        },
    })
}

/// `n` HTTP/2 connections to the data plane.
async fn data_channels(
    conn: &ConnectArgs,
    n: u32,
) -> Result<Vec<tonic::transport::Channel>, Error> {
    let (data_addr, data_tls) = conn.resolve(Plane::Data)?;
    let mut channels = Vec::new();
    for _ in 0..n {
        channels.push(data_tls.channel(&data_addr).await?);
    }
    Ok(channels)
}

/// What a closed-loop report names besides its measurements.
struct Report<'a> {
    args: &'a BenchArgs,
    health: bool,
    callers: u32,
    connections: u32,
    duration_s: u64,
}

impl Report<'_> {
    /// The run's inputs, its measurements, and the server's policy evaluation times over the
    /// run (null when the server did not say).
    fn closed_loop(&self, m: &Latencies, p: Option<&api::v1::PolicyStatsResponse>) -> Value {
        let args = self.args;
        json!({
            "op": args.op,
            "protection": if self.health { "-" } else { args.protection.as_str() },
            "batch": args.batch,
            "concurrency": self.callers,
            "connections": self.connections,
            "duration_s": self.duration_s,
            "ops_per_sec": (m.per_second() * 10.0).round() / 10.0,
            "p50_us": m.hist.value_at_quantile(0.50),
            "p90_us": m.hist.value_at_quantile(0.90),
            "p99_us": m.hist.value_at_quantile(0.99),
            "max_us": m.hist.max(),
            "requests": m.hist.len(),
            "errors": m.errors,
            "first_error": m.first_error,
            "policy_statements": p.map(|p| p.statements),
            "policy_eval_p50_ns": p.map(|p| p.p50_ns),
            "policy_eval_p99_ns": p.map(|p| p.p99_ns),
            "policy_eval_max_ns": p.map(|p| p.max_ns),
            "policy_evaluations": p.map(|p| p.evaluations),
            "policy_cached_decisions": p.map(|p| p.cached_decisions),
            "policy_decision_p50_ns": p.map(|p| p.decision_p50_ns),
            "policy_decision_p99_ns": p.map(|p| p.decision_p99_ns),
            "policy_decision_max_ns": p.map(|p| p.decision_max_ns),
            "distinct_contexts": args.distinct_contexts,
            "distinct_entry": args.distinct_contexts.then_some(args.distinct_entry.as_str()),
        })
    }
}

/// Times key creation or rotation, one caller, for --duration.
async fn lifecycle(args: &BenchArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let duration = args
        .duration
        .ok_or_else(|| Error::Usage("--duration is required".into()))?;
    let (admin_addr, admin_tls) = conn.resolve(Plane::Admin)?;
    let mut admin = admin_tls.admin(&admin_addr).await?;
    let which = if args.op == "rotate-key" {
        Lifecycle::Rotate
    } else {
        Lifecycle::Create
    };
    let m = kms_loadgen::lifecycle(
        &mut admin,
        which,
        protection(args),
        Duration::from_secs(duration),
    )
    .await
    .map_err(load_error)?;
    let report = json!({
        "op": args.op,
        "protection": args.protection,
        "concurrency": 1,
        "duration_s": (m.elapsed.as_secs_f64() * 10.0).round() / 10.0,
        "ops_per_sec": (m.per_second() * 10.0).round() / 10.0,
        "p50_us": m.hist.value_at_quantile(0.50),
        "p90_us": m.hist.value_at_quantile(0.90),
        "p99_us": m.hist.value_at_quantile(0.99),
        "max_us": m.hist.max(),
        "requests": m.hist.len(),
        "errors": m.errors,
        "first_error": m.first_error,
    });
    emit(as_json, &report)
}

/// Times --pairs interleaved refusals of a forbidden and of an unknown key.
async fn refusal_timing(
    args: &BenchArgs,
    pairs: u32,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let (admin_addr, admin_tls) = conn.resolve(Plane::Admin)?;
    let (data_addr, data_tls) = conn.resolve(Plane::Data)?;
    let mut admin = admin_tls.admin(&admin_addr).await?;
    let approvers = crate::approval::dev_approvers(conn).await?;
    let mut data = api::DataClient::new(data_tls.channel(&data_addr).await?);
    let t = kms_loadgen::refusal_timing(&mut admin, &mut data, &approvers, protection(args), pairs)
        .await
        .map_err(load_error)?;
    let summary = |h: &Histogram<u64>, n: u64| {
        json!({
            "p10_us": h.value_at_quantile(0.10),
            "p50_us": h.value_at_quantile(0.50),
            "p90_us": h.value_at_quantile(0.90),
            "mean_us": (h.mean() * 10.0).round() / 10.0,
            "refused": n,
        })
    };
    let report = json!({
        "op": "refusal-timing",
        "protection": args.protection,
        "pairs": pairs,
        "forbidden": summary(&t.forbidden, t.refused.0),
        "unknown": summary(&t.unknown, t.refused.1),
        "median_gap_us": t.median_gap_us(),
        "mean_gap_us": ((t.forbidden.mean() - t.unknown.mean()) * 10.0).round() / 10.0,
    });
    emit(as_json, &report)
}

fn protection(args: &BenchArgs) -> api::v1::Protection {
    match args.protection.as_str() {
        "hsm" => api::v1::Protection::Hsm,
        _ => api::v1::Protection::Software,
    }
}

/// A load run's failure as the command's: a refusal keeps its status and exit code.
fn load_error(e: kms_loadgen::Error) -> Error {
    match e {
        kms_loadgen::Error::Rpc(s) => Error::Rpc(s),
        other => Error::Usage(other.to_string()),
    }
}

//! Decision times for `kms policy stats`, measured in the server around the core's decisions
//! (the core counts decisions but reads no clock).
//!
//! [`TimedAuthorizer`] is the data plane's authorizer: it asks the Cedar policies and records
//! how long each decision took, in one histogram for every decision and one for those Cedar
//! evaluated (not answered from the decision cache). An evaluated decision's time includes
//! the cache lookup before it, a few hundred nanoseconds.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kms_core::governance::policy::Policies;
use kms_core::{AccessRequest, Authorizer, Decision, Verdict};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::histogram::AtomicHistogram;

#[expect(
    clippy::disallowed_methods,
    reason = "decision time is measured wall time"
)]
fn stopwatch() -> Instant {
    Instant::now()
}

/// 1 ns to 10 s at 3 significant digits (valid bounds: never `None` in practice).
fn new_histogram() -> Option<hdrhistogram::Histogram<u64>> {
    hdrhistogram::Histogram::new_with_bounds(1, 10_000_000_000, 3).ok()
}

/// Times measured since start or the last reset, in nanoseconds.
struct Timings {
    /// Decisions Cedar evaluated.
    evals: hdrhistogram::Histogram<u64>,
    /// Every decision, reused or evaluated: what authorisation adds to a request.
    decisions: hdrhistogram::Histogram<u64>,
}

/// Decision times, shared by the data plane's authorizer and the admin plane's stats RPC,
/// and counted for the metrics listener once it is there.
#[derive(Clone, Default)]
pub struct PolicyStats {
    timings: Arc<Mutex<Option<Timings>>>,
    metrics: Arc<OnceLock<PolicyMetrics>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    effect: &'static str,
    source: &'static str,
}

/// Upper bounds of the evaluation-time buckets, in seconds: 1 µs to 10 ms.
const EVAL_BUCKETS: [f64; 12] = [
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.01,
];

/// Policy decisions for Prometheus: by effect and by where they came from. Each counter is
/// kept once made, so a decision touches no family's lock.
#[derive(Debug)]
struct PolicyMetrics {
    decisions: Family<DecisionLabels, Counter>,
    /// By [allow, deny] × [cedar, cache].
    counters: [[OnceLock<Counter>; 2]; 2],
    evaluation: AtomicHistogram,
}

impl std::fmt::Debug for PolicyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStats").finish_non_exhaustive()
    }
}

/// Evaluation times measured inside the server since start or the last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalStats {
    /// Decisions Cedar evaluated.
    pub count: u64,
    /// Their median, nanoseconds.
    pub p50_ns: u64,
    /// Their 99th percentile, nanoseconds.
    pub p99_ns: u64,
    /// Their 99.9th percentile, nanoseconds.
    pub p999_ns: u64,
    /// The slowest, nanoseconds.
    pub max_ns: u64,
    /// Decisions answered from the decision cache.
    pub cached: u64,
    /// Every decision, reused or evaluated (`count + cached`).
    pub decisions: u64,
    /// Decision times, reused or evaluated: median, nanoseconds.
    pub decision_p50_ns: u64,
    /// See `decision_p50_ns`: 99th percentile.
    pub decision_p99_ns: u64,
    /// See `decision_p50_ns`: slowest.
    pub decision_max_ns: u64,
}

impl PolicyStats {
    /// Empty statistics.
    pub fn new() -> Self {
        let timings = new_histogram()
            .zip(new_histogram())
            .map(|(evals, decisions)| Timings { evals, decisions });
        Self {
            timings: Arc::new(Mutex::new(timings)),
            metrics: Arc::new(OnceLock::new()),
        }
    }

    /// Registers the decision metrics in `registry` and counts every decision from now on.
    pub(crate) fn register(&self, registry: &mut Registry) {
        let m = PolicyMetrics {
            decisions: Family::default(),
            counters: Default::default(),
            evaluation: AtomicHistogram::new(&EVAL_BUCKETS),
        };
        let policy = registry.sub_registry_with_prefix("policy");
        policy.register(
            "decisions",
            "Data-plane policy decisions, by effect (allow, deny) and source (cedar: evaluated; \
             cache: reused from the decision cache)",
            m.decisions.clone(),
        );
        policy.register(
            "evaluation_duration_seconds",
            "Time of a decision Cedar evaluated (the cache lookup before it included)",
            m.evaluation.clone(),
        );
        let _ = self.metrics.set(m);
    }

    fn record(&self, started: Instant, reused: bool, decision: Decision) {
        let took = started.elapsed();
        if let Some(m) = self.metrics.get() {
            // Anything but an allow refuses the request.
            let allowed = decision == Decision::Allow;
            let slot = m
                .counters
                .get(usize::from(!allowed))
                .and_then(|by_source| by_source.get(usize::from(reused)));
            if let Some(slot) = slot {
                slot.get_or_init(|| {
                    let labels = DecisionLabels {
                        effect: if allowed { "allow" } else { "deny" },
                        source: if reused { "cache" } else { "cedar" },
                    };
                    m.decisions.get_or_create_owned(&labels)
                })
                .inc();
            }
            if !reused {
                m.evaluation.observe(took.as_secs_f64());
            }
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
        if let Some(t) = self.timings.lock().as_mut() {
            let _ = t.decisions.record(ns);
            if !reused {
                let _ = t.evals.record(ns);
            }
        }
    }

    /// The times so far; `reset` starts a new measurement.
    pub fn snapshot(&self, reset: bool) -> EvalStats {
        let mut guard = self.timings.lock();
        let Some(t) = guard.as_mut() else {
            return EvalStats::default();
        };
        let (h, d) = (&t.evals, &t.decisions);
        let stats = EvalStats {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
            cached: d.len().saturating_sub(h.len()),
            decisions: d.len(),
            decision_p50_ns: d.value_at_quantile(0.5),
            decision_p99_ns: d.value_at_quantile(0.99),
            decision_max_ns: d.max(),
        };
        if reset {
            t.evals.reset();
            t.decisions.reset();
        }
        stats
    }
}

/// The data plane's authorizer: the current Cedar policies, each decision timed.
#[derive(Clone, Debug)]
pub struct TimedAuthorizer {
    policies: Arc<Policies>,
    stats: PolicyStats,
}

impl TimedAuthorizer {
    /// Decides with `policies` (changes to them apply from the next request), recording each
    /// decision's time in `stats`.
    pub fn new(policies: Arc<Policies>, stats: PolicyStats) -> Self {
        Self { policies, stats }
    }
}

impl Authorizer for TimedAuthorizer {
    fn decide(&self, request: &AccessRequest<'_>) -> Verdict {
        let started = stopwatch();
        let decided = self.policies.decide(request);
        self.stats
            .record(started, decided.reused, decided.verdict.decision);
        decided.verdict
    }
}

#[cfg(test)]
mod tests {
    use kms_core::{
        AuthMethod, Caller, Decision, EncryptionContext, KeyId, KeyRecord, KeyState, KeyVersion,
        Labels, Protection, RocksStore, SystemClock,
    };

    use super::*;

    #[test]
    fn every_decision_is_timed_reused_or_evaluated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RocksStore::open(dir.path()).unwrap());
        let policies = Arc::new(Policies::open(store, Arc::new(SystemClock)).unwrap());
        policies
            .put("all", "permit (principal, action, resource);", "test")
            .unwrap();
        let stats = PolicyStats::new();
        let authorizer = TimedAuthorizer::new(policies.clone(), stats.clone());
        let caller = Caller::new(
            "spiffe://test.example/svc".parse().unwrap(),
            AuthMethod::Mtls,
        );
        let key = KeyRecord {
            id: KeyId::from_random_bytes([1; 16]),
            alias: None,
            labels: Labels::default(),
            protection: Protection::Software,
            state: KeyState::Enabled,
            current_version: KeyVersion::FIRST,
            created_at: 0,
            updated_at: 0,
            destruction: None,
        };
        let context = EncryptionContext::empty();
        for _ in 0..3 {
            let verdict = authorizer.decide(&AccessRequest {
                caller: &caller,
                op: kms_core::Op::Decrypt,
                key: &key,
                context: &context,
                now_unix: 1_800_000_000,
            });
            assert_eq!(verdict.decision, Decision::Allow);
        }
        let s = stats.snapshot(false);
        let counted = policies.decision_counts(false);
        assert_eq!((s.count, s.cached), (counted.count, counted.cached));
        assert_eq!((s.count, s.cached), (1, 2), "one evaluation, two reused");
        assert_eq!(s.decisions, s.count + s.cached);
        assert!(s.decision_p50_ns > 0 && s.decision_max_ns >= s.max_ns);
        let reset = stats.snapshot(true);
        assert_eq!(reset, s);
        assert_eq!(stats.snapshot(false).decisions, 0);
    }
}

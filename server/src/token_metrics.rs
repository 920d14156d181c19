//! The HSM as a node's metrics see it: every operation the key service runs on it (by
//! operation, mechanism and outcome, with its duration), the session pool, and a deep health
//! check that runs real operations on the token at most every [`DEEP_CHECK_EVERY`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hsm_bridge::{Hsm, HsmMeter, HsmOp, HsmOutcome, Pkcs11Hsm};
use kms_core::Clock;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::histogram::AtomicHistogram;

/// The deep health check runs at most this often; in between, its last answer is reused.
pub const DEEP_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Upper bounds of the HSM operation-time buckets, in seconds: 20 µs to 2.5 s.
const HSM_BUCKETS: [f64; 14] = [
    0.000_02, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.5, 2.5,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation: &'static str,
    mechanism: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpOnly {
    operation: &'static str,
}

fn op_histogram() -> AtomicHistogram {
    AtomicHistogram::new(&HSM_BUCKETS)
}

/// Counts of the key service's HSM operations: the meter a [`hsm_bridge::Metered`] HSM tells.
/// Each series is kept once made, so an operation touches no family's lock.
#[derive(Clone, Debug)]
pub struct HsmMetrics {
    operations: Family<OpLabels, Counter>,
    durations: Family<OpOnly, AtomicHistogram, fn() -> AtomicHistogram>,
    kept: Arc<Kept>,
}

/// By [`HsmOp::index`], then [`HsmOutcome::index`].
#[derive(Debug, Default)]
struct Kept {
    counters: [[OnceLock<Counter>; 3]; HsmOp::ALL.len()],
    durations: [OnceLock<AtomicHistogram>; HsmOp::ALL.len()],
}

impl Default for HsmMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl HsmMetrics {
    /// Empty counts.
    pub fn new() -> Self {
        Self {
            operations: Family::default(),
            durations: Family::new_with_constructor(op_histogram),
            kept: Arc::default(),
        }
    }
}

impl HsmMeter for HsmMetrics {
    fn observe(&self, op: HsmOp, outcome: HsmOutcome, took: Duration) {
        let operation = op.as_str();
        let kept = &self.kept;
        if let Some(c) = kept
            .counters
            .get(op.index())
            .and_then(|c| c.get(outcome.index()))
        {
            let labels = OpLabels {
                operation,
                mechanism: op.mechanism(),
                outcome: outcome.as_str(),
            };
            c.get_or_init(|| self.operations.get_or_create_owned(&labels))
                .inc();
        }
        if let Some(d) = kept.durations.get(op.index()) {
            d.get_or_init(|| self.durations.get_or_create_owned(&OpOnly { operation }))
                .observe(took.as_secs_f64());
        }
    }
}

/// The node's token, and the counts of what the key service ran on it.
#[derive(Clone)]
pub struct TokenWatch {
    /// The token.
    pub hsm: Arc<Pkcs11Hsm>,
    /// What the key service's metered HSM counted.
    pub metrics: HsmMetrics,
}

impl std::fmt::Debug for TokenWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenWatch").finish_non_exhaustive()
    }
}

/// The token's gauges and the cached deep check.
pub(crate) struct TokenGauges {
    watch: TokenWatch,
    open: Gauge,
    idle: Gauge,
    max: Gauge,
    waits: Counter,
    waits_seen: Mutex<u64>,
    retries: Counter,
    retries_seen: Mutex<u64>,
    /// The deployment's clock (a development instance's moves with `kms dev advance-clock`).
    clock: Arc<dyn Clock>,
    /// When the deep check last ran (ms on `clock`), and the problem it found, if any.
    last_check: Mutex<Option<(u64, Option<String>)>>,
}

impl std::fmt::Debug for TokenGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenGauges").finish_non_exhaustive()
    }
}

impl TokenGauges {
    /// Registers the operation counts and the pool's gauges under `kms_hsm_`.
    pub(crate) fn register(
        registry: &mut Registry,
        watch: TokenWatch,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let hsm = registry.sub_registry_with_prefix("hsm");
        hsm.register(
            "operations",
            "HSM operations of the key service, by operation, mechanism and outcome (ok, \
             decrypt_failed: the caller's input, error: the token)",
            watch.metrics.operations.clone(),
        );
        hsm.register(
            "operation_duration_seconds",
            "Time of one HSM operation, by operation",
            watch.metrics.durations.clone(),
        );
        let g = Self {
            watch,
            open: Gauge::default(),
            idle: Gauge::default(),
            max: Gauge::default(),
            waits: Counter::default(),
            waits_seen: Mutex::new(0),
            retries: Counter::default(),
            retries_seen: Mutex::new(0),
            clock,
            last_check: Mutex::new(None),
        };
        hsm.register(
            "sessions_open",
            "Token sessions open (idle and in use)",
            g.open.clone(),
        );
        hsm.register(
            "sessions_idle",
            "Token sessions idle in the pool",
            g.idle.clone(),
        );
        hsm.register(
            "sessions_max",
            "The most sessions the pool opens",
            g.max.clone(),
        );
        hsm.register(
            "session_waits",
            "Times an operation waited for a session (every one was in use)",
            g.waits.clone(),
        );
        hsm.register(
            "retries",
            "Operations retried once on a fresh session after a session loss or device error",
            g.retries.clone(),
        );
        g
    }

    /// Reads the pool.
    pub(crate) fn refresh(&self) {
        let s = self.watch.hsm.pool_stats();
        let as_gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.open.set(as_gauge(s.open));
        self.idle.set(as_gauge(s.idle));
        self.max.set(as_gauge(s.max));
        let mut seen = self.waits_seen.lock();
        self.waits.inc_by(s.waits.saturating_sub(*seen));
        *seen = s.waits;
        let retries = self.watch.hsm.retries();
        let mut seen = self.retries_seen.lock();
        self.retries.inc_by(retries.saturating_sub(*seen));
        *seen = retries;
    }

    /// Why the token cannot serve, if it cannot: a random draw and a read of the root key's
    /// attributes, run at most every [`DEEP_CHECK_EVERY`] (a cached answer otherwise). Blocks
    /// on the token: call it where blocking is allowed.
    pub(crate) fn problem(&self) -> Option<String> {
        let now = self.clock.now_unix_ms();
        let every = u64::try_from(DEEP_CHECK_EVERY.as_millis()).unwrap_or(u64::MAX);
        let mut last = self.last_check.lock();
        if let Some((at, found)) = &*last {
            if now.saturating_sub(*at) < every {
                return found.clone();
            }
        }
        let hsm = &self.watch.hsm;
        let mut draw = [0u8; 16];
        let found = hsm
            .random(&mut draw)
            .and_then(|()| hsm.key_attributes(hsm.root_key()))
            .err()
            .map(|e| format!("hsm unavailable: {e}"));
        *last = Some((now, found.clone()));
        found
    }
}

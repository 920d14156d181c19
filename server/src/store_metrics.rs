//! The store's synced writes, as a node's metrics see them.

use std::time::Duration;

use kms_core::store::StoreMeter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::histogram::AtomicHistogram;

/// Upper bounds of the store write-time buckets, in seconds: 100 µs to 2.5 s.
const WRITE_BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25, 0.5,
    2.5,
];

/// Times of the store's synced writes (key and governance changes, audit batches), and its
/// failed writes: the meter a [`kms_core::RocksStore`] tells.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    writes: AtomicHistogram,
    failures: Counter,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl StoreMetrics {
    /// Empty counts.
    pub fn new() -> Self {
        Self {
            writes: AtomicHistogram::new(&WRITE_BUCKETS),
            failures: Counter::default(),
        }
    }

    /// Registers them under `kms_store_`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        let store = registry.sub_registry_with_prefix("store");
        store.register(
            "write_duration_seconds",
            "Time of one synced store write (one fdatasync), audit batches included",
            self.writes.clone(),
        );
        store.register(
            "write_failures",
            "Store writes that failed",
            self.failures.clone(),
        );
    }
}

impl StoreMeter for StoreMetrics {
    fn written(&self, _changes: usize, took: Duration, ok: bool) {
        self.writes.observe(took.as_secs_f64());
        if !ok {
            self.failures.inc();
        }
    }
}

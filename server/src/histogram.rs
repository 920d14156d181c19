//! A histogram for the request path: buckets, count and sum in atomics, so that observing a
//! value takes no lock (`prometheus_client`'s own histogram locks a mutex per observation,
//! which every request on every core would share). Encoded by `prometheus_client` as any
//! classic histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// A classic histogram with fixed upper bounds (and the implicit `+Inf`).
#[derive(Clone, Debug)]
pub(crate) struct AtomicHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bounds: &'static [f64],
    /// One count per bound, then the `+Inf` bucket; not cumulative.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl AtomicHistogram {
    /// Empty, with these ascending upper bounds.
    pub(crate) fn new(bounds: &'static [f64]) -> Self {
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self {
            inner: Arc::new(Inner {
                bounds,
                buckets,
                count: AtomicU64::new(0),
                sum: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    /// Counts `v` in the first bucket whose bound is at least `v` (`+Inf` otherwise).
    pub(crate) fn observe(&self, v: f64) {
        let inner = &self.inner;
        let at = inner
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(inner.bounds.len());
        if let Some(bucket) = inner.buckets.get(at) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        inner.count.fetch_add(1, Ordering::Relaxed);
        let mut seen = inner.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(seen) + v).to_bits();
            match inner
                .sum
                .compare_exchange_weak(seen, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => seen = now,
            }
        }
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.inner;
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        // Read after the buckets: the count is then at least their total, as a scraper
        // expects of a histogram read while it is being written.
        let count = inner.count.load(Ordering::Relaxed);
        let sum = f64::from_bits(inner.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    static BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];

    #[test]
    fn it_encodes_as_prometheus_client_s_own_histogram_does() {
        let ours = AtomicHistogram::new(&BOUNDS);
        let theirs = prometheus_client::metrics::histogram::Histogram::new(BOUNDS);
        for v in [0.0005, 0.001, 0.002, 0.05, 0.5, 7.0] {
            ours.observe(v);
            theirs.observe(v);
        }
        let text = |h: Box<dyn FnOnce(&mut Registry)>| {
            let mut r = Registry::default();
            h(&mut r);
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &r).unwrap_or_default();
            out
        };
        let a = text(Box::new(move |r| r.register("t", "t", ours)));
        let b = text(Box::new(move |r| r.register("t", "t", theirs)));
        assert_eq!(a, b);
        assert!(a.contains("t_bucket{le=\"0.001\"} 2"), "{a}");
        assert!(a.contains("t_bucket{le=\"+Inf\"} 6"), "{a}");
    }

    #[test]
    fn observations_from_many_threads_all_count() {
        let h = AtomicHistogram::new(&BOUNDS);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        h.observe(0.005);
                    }
                });
            }
        });
        assert_eq!(h.inner.count.load(Ordering::Relaxed), 40_000);
        assert_eq!(h.inner.buckets[1].load(Ordering::Relaxed), 40_000);
        let sum = f64::from_bits(h.inner.sum.load(Ordering::Relaxed));
        assert!((sum - 200.0).abs() < 1e-6, "{sum}");
    }
}

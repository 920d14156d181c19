//! A closed-loop load generator for a running KMS.
//!
//! `kms bench` draws its measurements from here, and so can any test or tool that needs load
//! on the planes: callers spread over HTTP/2 connections, each sending one request after
//! another until a deadline ([`closed_loop()`]), key creation and rotation one after another
//! ([`lifecycle()`]), refusals of a forbidden and of an unknown key interleaved
//! ([`refusal_timing()`]), and synthetic governance to measure against ([`populate()`]). Every
//! latency is of a whole RPC, in microseconds, in an HDR histogram.
//!
//! The crate speaks only the public API (`kms-api`): it opens no store and holds no key.

mod approve;
mod closed;
mod lifecycle;
mod populate;
mod refusal;

use std::time::{Duration, Instant};

pub use approve::Approvers;
pub use closed::{closed_loop, ClosedLoop, Workload};
pub use hdrhistogram::Histogram;
pub use lifecycle::{lifecycle, Lifecycle};
pub use populate::populate;
pub use refusal::{refusal_timing, RefusalTiming};

/// A load run failed before it could measure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A set-up call (a key, a policy, a registration) was refused.
    #[error(transparent)]
    Rpc(#[from] tonic::Status),
    /// A gated set-up change did not run.
    #[error("{0}")]
    Approval(String),
    /// A caller task stopped without an answer, or a histogram could not be made or merged.
    #[error("{0}")]
    Internal(&'static str),
}

/// What a run measured: whole-RPC latencies, items done (a batch RPC counts its items),
/// failed RPCs and the first failure's message, and the run's wall time.
#[derive(Debug)]
pub struct Latencies {
    /// Latency of each RPC in microseconds.
    pub hist: Histogram<u64>,
    /// Items done by RPCs that succeeded.
    pub items: u64,
    /// RPCs that failed (a batch fails if any item failed).
    pub errors: u64,
    /// The first failure, as `Code: message`.
    pub first_error: Option<String>,
    /// Wall time from the first request to the last answer.
    pub elapsed: Duration,
}

impl Latencies {
    /// Nothing measured yet.
    pub fn empty() -> Result<Self, Error> {
        Ok(Self {
            hist: new_histogram()?,
            items: 0,
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
        })
    }

    /// Items per second over the run, 0 for a run of no time.
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            items_f64(self.items) / secs
        } else {
            0.0
        }
    }
}

/// A histogram of 1 µs to 60 s at three significant digits.
pub fn new_histogram() -> Result<Histogram<u64>, Error> {
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|_| Error::Internal("histogram bounds"))
}

/// Microseconds since `t`, at least 1 (the histogram's lowest value).
fn micros_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
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
    reason = "a load generator measures wall time"
)]
fn now() -> Instant {
    Instant::now()
}

/// A key for the run, labelled as a benchmark's.
fn key_request(protection: api::v1::Protection, label: (&str, &str)) -> api::v1::CreateKeyRequest {
    api::v1::CreateKeyRequest {
        alias: String::new(),
        protection: protection.into(),
        labels: [(label.0.to_owned(), label.1.to_owned())].into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_no_time_has_no_rate() -> Result<(), Error> {
        let l = Latencies {
            hist: new_histogram()?,
            items: 10,
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
        };
        assert!(l.per_second().abs() < f64::EPSILON);
        let l = Latencies {
            elapsed: Duration::from_millis(500),
            ..l
        };
        assert!((l.per_second() - 20.0).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn latencies_below_one_microsecond_count_as_one() -> Result<(), Error> {
        let mut h = new_histogram()?;
        h.record(micros_since(now()))
            .map_err(|_| Error::Internal("record"))?;
        assert_eq!(h.min(), 1);
        Ok(())
    }
}

//! Time and randomness seams. The core reads neither the clock nor an RNG directly; the
//! process passes these adapters in, and tests pass fixed or seeded ones.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SecureRandom;

use crate::error::Error;

/// Wall-clock time.
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now_unix(&self) -> u64;

    /// Milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> u64 {
        self.now_unix().saturating_mul(1000)
    }
}

/// Cryptographically secure random bytes.
pub trait Rng: Send + Sync {
    /// Fills `out` completely.
    fn fill(&self, out: &mut [u8]) -> Result<(), Error>;
}

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[expect(clippy::disallowed_methods, reason = "this is the clock adapter")]
    fn now_unix(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    #[expect(clippy::disallowed_methods, reason = "this is the clock adapter")]
    fn now_unix_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// aws-lc's DRBG (seeded from the OS), used for DEKs, nonces and ids.
#[derive(Debug)]
pub struct SystemRng(aws_lc_rs::rand::SystemRandom);

impl Default for SystemRng {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemRng {
    /// A new generator.
    pub fn new() -> Self {
        Self(aws_lc_rs::rand::SystemRandom::new())
    }
}

impl Rng for SystemRng {
    fn fill(&self, out: &mut [u8]) -> Result<(), Error> {
        self.0.fill(out).map_err(|_| Error::Rng)
    }
}

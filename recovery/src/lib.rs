//! # Design overview
//!
//! `recovery` is the recovery authority of sovereign-kms (protocol: `docs/CUSTODY.md`).
//!
//! What it does:
//! - makes the 64-byte recovery secret and splits it k-of-n with `shamirsecretsharing`;
//! - derives from it the hybrid recovery key (X25519 derived, ML-KEM-768 generated and kept
//!   sealed under a derived key), and seals material to the public half so that opening needs
//!   both the X25519 and the ML-KEM secret;
//! - wraps each share in a self-describing envelope sealed to its custodian's age recipient,
//!   so a share file is a standard age file;
//! - writes and checks ceremony transcripts (canonical JSON, hashed by anyone, MACed under a
//!   key derived from the secret);
//! - runs the init ceremony as consumed-by-value states.
//!
//! What it does not do: talk to the network, open the store or the HSM (the caller passes in
//! what they hold and writes what comes out), or read the clock. Secrets (the recovery secret,
//! shares, derived keys, private keys) are in types that wipe themselves and print redacted.
//!
//! ```text
//!  init:     Checked ─▶ Derived(secret) ─▶ Sealed{record, transcript, share files, seals}
//!  recover:  k share files ─▶ ShareEnvelope ─▶ combine ─▶ RecoverySecret
//!            ─▶ RecoveryKeyRecord::private_key ─▶ open(seal)
//! ```

pub mod ceremony;
mod error;
mod seal;
mod secret;
mod share;
mod transcript;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use error::{Error, ShareFault};
pub use seal::{Purpose, RecoveryKeyRecord, RecoveryPrivateKey, RecoveryPublicKey};
pub use secret::{RecoverySecret, SECRET_LEN};
pub use share::{
    combine, parse_identity, Custodian, CustodianName, Share, ShareEnvelope, SHARE_FORMAT,
    SHARE_LEN,
};
pub use transcript::{
    CeremonyKind, EscrowPin, TokenInfo, Transcript, TranscriptCustodian, TRANSCRIPT_FORMAT,
};

/// Randomness for secrets, nonces and ids. Implemented for aws-lc-rs's `SystemRandom`; the
/// KMS passes its own generator. (X25519 and ML-KEM key generation draw from aws-lc-rs's own
/// generator, which its safe API does not let a caller replace.)
pub trait Random {
    /// Fills `out` completely.
    fn fill(&self, out: &mut [u8]) -> Result<(), Error>;
}

impl Random for aws_lc_rs::rand::SystemRandom {
    fn fill(&self, out: &mut [u8]) -> Result<(), Error> {
        aws_lc_rs::rand::SecureRandom::fill(self, out).map_err(|_| Error::Random)
    }
}

/// A ceremony's id: a random UUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CeremonyId(uuid::Uuid);

impl CeremonyId {
    /// A fresh random id.
    pub fn new_v4_from(rng: &dyn Random) -> Result<Self, Error> {
        let mut bytes = [0u8; 16];
        rng.fill(&mut bytes).map_err(|_| Error::Random)?;
        Ok(Self(uuid::Builder::from_random_bytes(bytes).into_uuid()))
    }

    /// Its 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl std::str::FromStr for CeremonyId {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self, Error> {
        uuid::Uuid::parse_str(text)
            .map(Self)
            .map_err(|_| Error::Transcript {
                fault: "not a ceremony id",
            })
    }
}

impl fmt::Display for CeremonyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A recovery authority's epoch: 1 at init, one more at each reshare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(u32);

impl Epoch {
    /// The epoch of an init ceremony.
    pub const FIRST: Epoch = Epoch(1);

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// An epoch from its number (0 is none).
    pub fn new(n: u32) -> Option<Self> {
        (n > 0).then_some(Self(n))
    }
}

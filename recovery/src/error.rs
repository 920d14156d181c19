//! The one error type of the recovery crate.

use std::path::PathBuf;

/// What went wrong. Unsealing and combining failures carry no reason: a wrong key, a wrong
/// share set and a damaged input look the same.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The threshold and custodian count do not satisfy 2 <= k <= n <= 255.
    #[error("threshold {threshold} of {custodians} custodians: need 2 <= threshold <= custodians <= 255")]
    Threshold {
        /// k.
        threshold: usize,
        /// n.
        custodians: usize,
    },
    /// A custodian name is empty, too long, or not made of `A-Za-z0-9._-`.
    #[error(
        "custodian name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with . or -)"
    )]
    CustodianName {
        /// The name given.
        name: String,
    },
    /// Two custodians have the same name.
    #[error("custodian {name:?} is named twice")]
    CustodianTwice {
        /// The name.
        name: String,
    },
    /// An age recipient did not parse.
    #[error("custodian {name:?}: {recipient:?} is not an age X25519 recipient (age1...)")]
    Recipient {
        /// The custodian.
        name: String,
        /// What was given.
        recipient: String,
    },
    /// An age identity file held no X25519 identity.
    #[error("{file}: no age X25519 identity (AGE-SECRET-KEY-1...) in it")]
    Identity {
        /// The file.
        file: PathBuf,
    },
    /// A share file could not be opened or parsed; `fault` says which check failed.
    #[error("{file}: {fault}")]
    ShareFile {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        fault: ShareFault,
    },
    /// Shares of different ceremonies, epochs or transcripts were put together.
    #[error("{file}: this share is of ceremony {found}, the others of {expected}")]
    ShareMismatch {
        /// The odd one out.
        file: PathBuf,
        /// Its ceremony and epoch.
        found: String,
        /// The others'.
        expected: String,
    },
    /// Two shares carry the same index.
    #[error("{file}: custodian index {index} is given twice")]
    ShareTwice {
        /// The second file with that index.
        file: PathBuf,
        /// The index.
        index: u8,
    },
    /// Fewer shares than the threshold.
    #[error("{given} shares given; this ceremony needs {threshold}")]
    TooFewShares {
        /// How many were given.
        given: usize,
        /// k.
        threshold: u8,
    },
    /// The shares did not combine into the secret (opaque by design).
    #[error("the shares do not combine into the recovery secret")]
    Combine,
    /// A sealed object did not open (opaque by design).
    #[error("sealed object does not open")]
    Unseal,
    /// A transcript does not match its hash, MAC or format.
    #[error("transcript: {fault}")]
    Transcript {
        /// What is wrong.
        fault: &'static str,
    },
    /// A stored recovery record is damaged.
    #[error("recovery record: {fault}")]
    Record {
        /// What is wrong.
        fault: &'static str,
    },
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
    /// A cryptographic library call failed where it cannot with valid input.
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// Which check a share file failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShareFault {
    /// age could not decrypt it with the identity (wrong identity, or the file is damaged).
    #[error("does not decrypt with this age identity (wrong identity, or the file is damaged)")]
    Decrypt,
    /// The decrypted bytes are not a share envelope.
    #[error("is not a sovereign-kms share (format sovereign-kms/share-v1)")]
    Format,
    /// The share bytes have the wrong length or encoding.
    #[error("share bytes are damaged")]
    Bytes,
    /// The envelope's fields disagree with each other.
    #[error("share fields are inconsistent (index, threshold or custodian count)")]
    Fields,
    /// The file could not be read.
    #[error("cannot be read")]
    Read,
}

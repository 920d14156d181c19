//! Custodians, Shamir shares of the recovery secret, and the share envelope each custodian's
//! age file holds.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use aws_lc_rs::digest::{Context, SHA256};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox, SecretSlice, SecretString};
use serde::Deserialize;
use zeroize::Zeroize;

use crate::error::ShareFault;
use crate::secret::RecoverySecret;
use crate::{CeremonyId, Epoch, Error};

/// Length of one share (`shamirsecretsharing::SHARE_SIZE`).
pub const SHARE_LEN: usize = shamirsecretsharing::SHARE_SIZE;

/// The envelope's format string.
pub const SHARE_FORMAT: &str = "sovereign-kms/share-v1";

/// A custodian's name: 1 to 64 of `A-Za-z0-9._-`, not starting with `.` or `-`, so that it is
/// safe as a file name (`NAME.share.age`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CustodianName(String);

impl CustodianName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CustodianName {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self, Error> {
        let ok = (1..=64).contains(&name.len())
            && !name.starts_with(['.', '-'])
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(Error::CustodianName {
                name: name.to_owned(),
            });
        }
        Ok(Self(name.to_owned()))
    }
}

impl fmt::Display for CustodianName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One custodian: a name and the age X25519 recipient their share is sealed to.
#[derive(Clone)]
pub struct Custodian {
    /// The name.
    pub name: CustodianName,
    /// Their own age recipient (`age1...`).
    pub recipient: age::x25519::Recipient,
}

impl Custodian {
    /// Parses `NAME=age1...`.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let (name, recipient) = spec.split_once('=').ok_or_else(|| Error::CustodianName {
            name: spec.to_owned(),
        })?;
        let name: CustodianName = name.parse()?;
        let recipient = recipient.trim().parse().map_err(|_| Error::Recipient {
            name: name.0.clone(),
            recipient: recipient.to_owned(),
        })?;
        Ok(Self { name, recipient })
    }
}

impl fmt::Debug for Custodian {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Custodian")
            .field("name", &self.name)
            .field("recipient", &self.recipient.to_string())
            .finish()
    }
}

/// One Shamir share and its 1-based index. Wiped when dropped.
pub struct Share {
    index: u8,
    bytes: SecretBox<[u8; SHARE_LEN]>,
}

impl Share {
    /// Splits `secret` into `n` shares of which any `k` rebuild it.
    pub fn split(secret: &RecoverySecret, n: usize, k: usize) -> Result<Vec<Share>, Error> {
        let bad = || Error::Threshold {
            threshold: k,
            custodians: n,
        };
        if !(2 <= k && k <= n && n <= 255) {
            return Err(bad());
        }
        let n8 = u8::try_from(n).map_err(|_| bad())?;
        let k8 = u8::try_from(k).map_err(|_| bad())?;
        let mut raw = shamirsecretsharing::create_shares(secret.expose_secret(), n8, k8)
            .map_err(|_| Error::Internal("shamir create_shares"))?;
        let mut shares = Vec::with_capacity(n);
        for (i, bytes) in raw.iter_mut().enumerate() {
            let index = u8::try_from(i + 1).map_err(|_| bad())?;
            let share = Share::take(index, bytes);
            shares.push(share?);
        }
        Ok(shares)
    }

    /// Takes share bytes, wiping `bytes`.
    fn take(index: u8, bytes: &mut [u8]) -> Result<Self, Error> {
        let mut boxed = SecretBox::new(Box::new([0u8; SHARE_LEN]));
        let fits = <&[u8; SHARE_LEN]>::try_from(&*bytes)
            .map(|b| boxed.expose_secret_mut().copy_from_slice(b))
            .is_ok();
        bytes.zeroize();
        if !fits {
            return Err(Error::Internal("share length"));
        }
        Ok(Self {
            index,
            bytes: boxed,
        })
    }

    /// The 1-based index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The commitment recorded in the transcript: SHA-256 over a fixed label, the ceremony
    /// id, the index and the share. It reveals nothing of the secret (a share alone is
    /// uniformly random) and lets a custodian prove they hold this very share.
    pub fn commitment(&self, ceremony_id: CeremonyId) -> [u8; 32] {
        let mut ctx = Context::new(&SHA256);
        ctx.update(b"sovereign-kms/share-commitment-v1");
        ctx.update(ceremony_id.as_bytes());
        ctx.update(&[self.index]);
        ctx.update(self.bytes.expose_secret());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Share(index {}, <redacted>)", self.index)
    }
}

/// What a custodian's share file decrypts to: a self-describing share.
#[derive(Debug)]
pub struct ShareEnvelope {
    /// The ceremony.
    pub ceremony_id: CeremonyId,
    /// Its epoch.
    pub epoch: Epoch,
    /// The custodian it was made for.
    pub custodian: CustodianName,
    /// k.
    pub threshold: u8,
    /// n.
    pub custodians: u8,
    /// SHA-256 of the ceremony's canonical transcript.
    pub transcript_sha256: [u8; 32],
    /// The share (its index is the envelope's).
    pub share: Share,
}

/// The envelope as parsed, before its fields are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvelope {
    format: String,
    ceremony_id: CeremonyId,
    epoch: Epoch,
    custodian: String,
    index: u8,
    threshold: u8,
    custodians: u8,
    transcript_sha256: String,
    share: String,
}

impl ShareEnvelope {
    /// The envelope as JSON, fields in a fixed order, no whitespace. The buffer is a secret
    /// (it holds the share).
    pub fn to_json(&self) -> SecretSlice<u8> {
        let share = SecretString::from(B64.encode(self.share.bytes.expose_secret()));
        let head = format!(
            "{{\"format\":\"{SHARE_FORMAT}\",\"ceremony_id\":\"{}\",\"epoch\":{},\"custodian\":\"{}\",\"index\":{},\"threshold\":{},\"custodians\":{},\"transcript_sha256\":\"{}\",\"share\":\"",
            self.ceremony_id,
            self.epoch.get(),
            self.custodian,
            self.share.index,
            self.threshold,
            self.custodians,
            hex::encode(self.transcript_sha256),
        );
        let mut out = Vec::with_capacity(head.len() + share.expose_secret().len() + 2);
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(share.expose_secret().as_bytes());
        out.extend_from_slice(b"\"}");
        SecretSlice::from(out)
    }

    /// Parses a decrypted envelope strictly; errors name `file`.
    pub fn parse(bytes: &[u8], file: &Path) -> Result<Self, Error> {
        let fault = |fault| Error::ShareFile {
            file: file.to_owned(),
            fault,
        };
        let mut raw: RawEnvelope =
            serde_json::from_slice(bytes).map_err(|_| fault(ShareFault::Format))?;
        let parsed = Self::from_raw(&raw).map_err(fault);
        raw.share.zeroize();
        parsed
    }

    fn from_raw(raw: &RawEnvelope) -> Result<Self, ShareFault> {
        if raw.format != SHARE_FORMAT {
            return Err(ShareFault::Format);
        }
        let custodian = raw.custodian.parse().map_err(|_| ShareFault::Fields)?;
        if !(2 <= raw.threshold && raw.threshold <= raw.custodians)
            || raw.index == 0
            || raw.index > raw.custodians
        {
            return Err(ShareFault::Fields);
        }
        let mut transcript_sha256 = [0u8; 32];
        hex::decode_to_slice(&raw.transcript_sha256, &mut transcript_sha256)
            .map_err(|_| ShareFault::Fields)?;
        let mut decoded = B64
            .decode(raw.share.as_bytes())
            .map_err(|_| ShareFault::Bytes)?;
        if decoded.len() != SHARE_LEN {
            decoded.zeroize();
            return Err(ShareFault::Bytes);
        }
        let share = Share::take(raw.index, &mut decoded).map_err(|_| ShareFault::Bytes)?;
        Ok(Self {
            ceremony_id: raw.ceremony_id,
            epoch: raw.epoch,
            custodian,
            threshold: raw.threshold,
            custodians: raw.custodians,
            transcript_sha256,
            share,
        })
    }

    /// The envelope as a standard age file to `recipient`.
    pub fn seal_to(&self, recipient: &age::x25519::Recipient) -> Result<Vec<u8>, Error> {
        let json = self.to_json();
        age::encrypt(recipient, json.expose_secret()).map_err(|_| Error::Internal("age encrypt"))
    }

    /// Decrypts an age share file with `identity` and parses it; errors name `file`.
    pub fn open(
        sealed: &[u8],
        identity: &age::x25519::Identity,
        file: &Path,
    ) -> Result<Self, Error> {
        let mut plain = age::decrypt(identity, sealed).map_err(|_| Error::ShareFile {
            file: file.to_owned(),
            fault: ShareFault::Decrypt,
        })?;
        let parsed = Self::parse(&plain, file);
        plain.zeroize();
        parsed
    }

    /// "ceremony ID epoch N", for messages.
    fn origin(&self) -> String {
        format!("{} epoch {}", self.ceremony_id, self.epoch.get())
    }
}

/// Reads an age X25519 identity from the text of an identity file (as `age-keygen` writes).
pub fn parse_identity(text: &SecretString, file: &Path) -> Result<age::x25519::Identity, Error> {
    text.expose_secret()
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| Error::Identity {
            file: file.to_owned(),
        })
}

/// Rebuilds the recovery secret from shares of one ceremony; each comes with the file it was
/// read from, for errors. Fewer than k, mixed ceremonies and repeated indices are refused
/// before combining; a set that still does not combine gives the opaque [`Error::Combine`].
pub fn combine(shares: &[(PathBuf, ShareEnvelope)]) -> Result<RecoverySecret, Error> {
    let Some((_, first)) = shares.first() else {
        return Err(Error::TooFewShares {
            given: 0,
            threshold: 2,
        });
    };
    let mut seen = Vec::with_capacity(shares.len());
    for (file, s) in shares {
        if s.ceremony_id != first.ceremony_id
            || s.epoch != first.epoch
            || s.transcript_sha256 != first.transcript_sha256
            || s.threshold != first.threshold
            || s.custodians != first.custodians
        {
            return Err(Error::ShareMismatch {
                file: file.clone(),
                found: s.origin(),
                expected: first.origin(),
            });
        }
        if seen.contains(&s.share.index) {
            return Err(Error::ShareTwice {
                file: file.clone(),
                index: s.share.index,
            });
        }
        seen.push(s.share.index);
    }
    if shares.len() < usize::from(first.threshold) {
        return Err(Error::TooFewShares {
            given: shares.len(),
            threshold: first.threshold,
        });
    }
    let mut raw: Vec<Vec<u8>> = shares
        .iter()
        .map(|(_, s)| s.share.bytes.expose_secret().to_vec())
        .collect();
    let combined = shamirsecretsharing::combine_shares(&raw);
    for r in &mut raw {
        r.zeroize();
    }
    match combined {
        Ok(Some(mut bytes)) => RecoverySecret::take(&mut bytes),
        Ok(None) | Err(_) => Err(Error::Combine),
    }
}

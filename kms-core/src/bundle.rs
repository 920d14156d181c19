//! The backup bundle's file format (docs/RECOVERY.md): a header, the records of one store
//! snapshot, and a signature by the audit signing key. Only the format lives here; what goes
//! into a bundle and how it is restored are the export and the recovery ceremony.
//!
//! ```text
//! "SKMSBNDL" ‖ version u16 ‖ header_len u32 ‖ header (JSON)
//!   ‖ records: name_len u8 ‖ table name ‖ key_len u16 ‖ key ‖ value_len u32 ‖ value
//!   ‖ sig_len u16 ‖ signature (ECDSA P-256, r ‖ s)
//! ```
//!
//! The signature covers `"sovereign-kms bundle v1\n" ‖ version ‖ header ‖ records`; the header
//! holds the records' length and SHA-256. Parsing is strict and bounded: every malformed,
//! truncated, oversized or unknown input is a [`BundleError`], never a panic.

use std::collections::BTreeMap;

use aws_lc_rs::digest::{Context, Digest, SHA256};
use serde::{Deserialize, Serialize};

use crate::audit::signer_id;
use crate::error::Error;
use crate::store::Table;

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"SKMSBNDL";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// The header's `format`.
pub const FORMAT: &str = "sovereign-kms/bundle-v1";
/// Largest header.
pub const MAX_HEADER: usize = 1 << 20;
/// Largest record value.
pub const MAX_VALUE: usize = 1 << 20;
/// Largest bundle.
pub const MAX_BUNDLE: usize = 2 << 30;
/// A P-256 signature as r ‖ s.
const SIGNATURE_LEN: usize = 64;
/// What the signature covers before the version, header and records.
const DOMAIN: &[u8] = b"sovereign-kms bundle v1\n";

/// The audit chain's head when the bundle was made.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditHead {
    /// The last record's sequence number.
    pub seq: u64,
    /// Its hash, hex.
    pub hash: String,
}

/// The key that signed the bundle.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSigner {
    /// Its id, as audit checkpoints name it.
    pub id: String,
    /// Its public point (65 bytes, uncompressed), hex.
    pub public_point: String,
}

/// What a bundle says of itself. Nothing in it is secret.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// [`FORMAT`].
    pub format: String,
    /// A random id, hex.
    pub bundle_id: String,
    /// Unix seconds.
    pub exported_at: u64,
    /// The operator who asked.
    pub exported_by: String,
    /// The approval request that allowed the export.
    pub approval_id: Option<String>,
    /// The custody ceremony whose recovery key seals every secret in it.
    pub ceremony_id: String,
    /// Its epoch.
    pub epoch: u32,
    /// SHA-256 of the transcript in force, hex.
    pub transcript_sha256: String,
    /// The audit head.
    pub audit_head: AuditHead,
    /// The signer.
    pub signer: BundleSigner,
    /// Records per table (and per protection level, as `versions.software`).
    pub counts: BTreeMap<String, u64>,
    /// The non-secret configuration a recovered deployment starts from.
    pub config: serde_json::Value,
    /// Length of the records, bytes.
    pub body_len: u64,
    /// SHA-256 of the records, hex.
    pub body_sha256: String,
}

/// One store row.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// Its table.
    pub table: Table,
    /// Its key.
    pub key: Vec<u8>,
    /// Its value.
    pub value: Vec<u8>,
}

/// Names the row and its size, not its bytes (escrow copies are sealed, but a log is no place
/// for them, nor for megabytes of records).
impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("table", &self.table.name())
            .field("key_len", &self.key.len())
            .field("value_len", &self.value.len())
            .finish()
    }
}

/// A parsed bundle: structure and body hash checked, signature not yet.
#[derive(Debug)]
pub struct Bundle {
    /// The header.
    pub header: Header,
    /// The records, in (table, key) order.
    pub records: Vec<Record>,
    /// SHA-256 of the signed message.
    signed: Digest,
    signature: Vec<u8>,
}

/// Why a bundle is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not a bundle.
    #[error("not a sovereign-kms backup bundle")]
    Magic,
    /// Written by a format this build does not read.
    #[error("bundle format version {0} is not supported (this build reads version {VERSION})")]
    Version(u16),
    /// The file ends inside `what`.
    #[error("bundle truncated in {what}")]
    Truncated {
        /// Where.
        what: &'static str,
    },
    /// A part is larger than its bound.
    #[error("bundle {what} too large: {len} bytes, at most {max}")]
    TooLarge {
        /// Which part.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The header is not the documented JSON.
    #[error("bundle header is malformed: {0}")]
    Header(String),
    /// A record names a table this build does not know.
    #[error("bundle record {at} names an unknown table")]
    Table {
        /// The record's index.
        at: usize,
    },
    /// Records out of (table, key) order, or one repeated.
    #[error("bundle record {at} is out of order or repeated")]
    Order {
        /// The record's index.
        at: usize,
    },
    /// The records do not match the header's length or hash.
    #[error("bundle records do not match the header's hash: the body was changed")]
    BodyHash,
    /// Bytes after the signature.
    #[error("bundle has trailing bytes after its signature")]
    Trailing,
    /// Signed by another key than the one trusted.
    #[error("bundle is signed by {found}, not by the pinned signer {expected}")]
    OtherSigner {
        /// The trusted signer's id.
        expected: String,
        /// The id the bundle names.
        found: String,
    },
    /// The signature does not verify.
    #[error("bundle signature does not verify: it was changed or forged")]
    Signature,
}

fn table_of(name: &[u8]) -> Option<Table> {
    Table::ALL.into_iter().find(|t| t.name().as_bytes() == name)
}

fn table_rank(t: Table) -> usize {
    Table::ALL
        .iter()
        .position(|x| *x == t)
        .unwrap_or(usize::MAX)
}

fn encode_records(records: &[Record]) -> Result<Vec<u8>, Error> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by(|a, b| (table_rank(a.table), &a.key).cmp(&(table_rank(b.table), &b.key)));
    let mut body = Vec::new();
    for r in sorted {
        let name = r.table.name().as_bytes();
        let too_large = |what, len, max| Error::TooLarge { what, len, max };
        let key_len = u16::try_from(r.key.len())
            .map_err(|_| too_large("bundle record key", r.key.len(), usize::from(u16::MAX)))?;
        if r.value.len() > MAX_VALUE {
            return Err(too_large("bundle record value", r.value.len(), MAX_VALUE));
        }
        let value_len =
            u32::try_from(r.value.len()).map_err(|_| Error::Internal("bundle value length"))?;
        let name_len =
            u8::try_from(name.len()).map_err(|_| Error::Internal("bundle table name length"))?;
        body.push(name_len);
        body.extend_from_slice(name);
        body.extend_from_slice(&key_len.to_be_bytes());
        body.extend_from_slice(&r.key);
        body.extend_from_slice(&value_len.to_be_bytes());
        body.extend_from_slice(&r.value);
    }
    if body.len() > MAX_BUNDLE {
        return Err(Error::TooLarge {
            what: "bundle",
            len: body.len(),
            max: MAX_BUNDLE,
        });
    }
    Ok(body)
}

/// SHA-256 of what the signature covers, computed over the parts in place (a bundle can be
/// tens of megabytes: it is not copied to be hashed).
fn message_digest(header: &[u8], body: &[u8]) -> Digest {
    let mut ctx = Context::new(&SHA256);
    ctx.update(DOMAIN);
    ctx.update(&VERSION.to_be_bytes());
    ctx.update(header);
    ctx.update(body);
    ctx.finish()
}

/// Writes a bundle of `records` (sorted here) under `header`, whose `format`, `body_len` and
/// `body_sha256` are filled in; `sign` signs the SHA-256 digest of the signed message (the
/// audit key in the token signs digests) and returns r ‖ s.
pub fn encode(
    mut header: Header,
    records: &[Record],
    sign: impl FnOnce(&[u8; 32]) -> Result<Vec<u8>, Error>,
) -> Result<Vec<u8>, Error> {
    let body = encode_records(records)?;
    header.format = FORMAT.into();
    header.body_len = u64::try_from(body.len()).map_err(|_| Error::Internal("bundle length"))?;
    header.body_sha256 = crate::audit::sha256_hex(&body);
    let header_json =
        serde_json::to_vec(&header).map_err(|_| Error::Internal("bundle header encoding"))?;
    if header_json.len() > MAX_HEADER {
        return Err(Error::TooLarge {
            what: "bundle header",
            len: header_json.len(),
            max: MAX_HEADER,
        });
    }
    let hashed: [u8; 32] = message_digest(&header_json, &body)
        .as_ref()
        .try_into()
        .map_err(|_| Error::Internal("sha-256 length"))?;
    let signature = sign(&hashed)?;
    if signature.len() != SIGNATURE_LEN {
        return Err(Error::Internal("bundle signature has the wrong length"));
    }
    let mut out = Vec::with_capacity(16 + header_json.len() + body.len() + SIGNATURE_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    let header_len =
        u32::try_from(header_json.len()).map_err(|_| Error::Internal("bundle header length"))?;
    out.extend_from_slice(&header_len.to_be_bytes());
    out.extend_from_slice(&header_json);
    out.extend_from_slice(&body);
    out.extend_from_slice(&64u16.to_be_bytes());
    out.extend_from_slice(&signature);
    Ok(out)
}

/// Reads bytes off the front of a slice, naming what is cut short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], BundleError> {
        if self.0.len() < n {
            return Err(BundleError::Truncated { what });
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], BundleError> {
        let bytes = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(bytes);
        Ok(a)
    }
}

/// Parses a bundle: structure, bounds, record order and the body hash. The signature is
/// checked by [`Bundle::verify`] against a signer the caller trusts.
pub fn parse(bytes: &[u8]) -> Result<Bundle, BundleError> {
    if bytes.len() > MAX_BUNDLE {
        return Err(BundleError::TooLarge {
            what: "file",
            len: bytes.len(),
            max: MAX_BUNDLE,
        });
    }
    let mut r = Reader(bytes);
    if r.take(MAGIC.len(), "magic")
        .map_err(|_| BundleError::Magic)?
        != MAGIC
    {
        return Err(BundleError::Magic);
    }
    let version = u16::from_be_bytes(r.array("version")?);
    if version != VERSION {
        return Err(BundleError::Version(version));
    }
    let header_len =
        usize::try_from(u32::from_be_bytes(r.array("header length")?)).unwrap_or(usize::MAX);
    if header_len > MAX_HEADER {
        return Err(BundleError::TooLarge {
            what: "header",
            len: header_len,
            max: MAX_HEADER,
        });
    }
    let header_json = r.take(header_len, "header")?;
    let header: Header =
        serde_json::from_slice(header_json).map_err(|e| BundleError::Header(e.to_string()))?;
    if header.format != FORMAT {
        return Err(BundleError::Header(format!(
            "unknown format {:?}",
            header.format
        )));
    }
    let body_len = usize::try_from(header.body_len).unwrap_or(usize::MAX);
    let body = r.take(body_len, "records")?;
    if crate::audit::sha256_hex(body) != header.body_sha256 {
        return Err(BundleError::BodyHash);
    }
    let records = parse_records(body)?;
    let sig_len = usize::from(u16::from_be_bytes(r.array("signature length")?));
    if sig_len != SIGNATURE_LEN {
        return Err(BundleError::Signature);
    }
    let signature = r.take(sig_len, "signature")?.to_vec();
    if !r.0.is_empty() {
        return Err(BundleError::Trailing);
    }
    Ok(Bundle {
        header,
        records,
        signed: message_digest(header_json, body),
        signature,
    })
}

fn parse_records(body: &[u8]) -> Result<Vec<Record>, BundleError> {
    let mut r = Reader(body);
    let mut records: Vec<Record> = Vec::new();
    while !r.0.is_empty() {
        let at = records.len();
        let [name_len] = r.array("record table")?;
        let name = r.take(usize::from(name_len), "record table")?;
        let table = table_of(name).ok_or(BundleError::Table { at })?;
        let key_len = usize::from(u16::from_be_bytes(r.array("record key")?));
        let key = r.take(key_len, "record key")?.to_vec();
        let value_len =
            usize::try_from(u32::from_be_bytes(r.array("record value")?)).unwrap_or(usize::MAX);
        if value_len > MAX_VALUE {
            return Err(BundleError::TooLarge {
                what: "record value",
                len: value_len,
                max: MAX_VALUE,
            });
        }
        let value = r.take(value_len, "record value")?.to_vec();
        if let Some(last) = records.last() {
            if (table_rank(last.table), &last.key) >= (table_rank(table), &key) {
                return Err(BundleError::Order { at });
            }
        }
        records.push(Record { table, key, value });
    }
    Ok(records)
}

impl Bundle {
    /// Checks the signature under `trusted` (a 65-byte P-256 public point): the header must
    /// name that signer, and the signature must verify.
    pub fn verify(&self, trusted: &[u8]) -> Result<(), BundleError> {
        let expected = signer_id(trusted);
        if self.header.signer.id != expected {
            return Err(BundleError::OtherSigner {
                expected,
                found: self.header.signer.id.clone(),
            });
        }
        if crate::signature::p256_verifies_digest(trusted, &self.signed, &self.signature) {
            Ok(())
        } else {
            Err(BundleError::Signature)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        reason = "test code: a failed step is a failed test"
    )]

    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    use proptest::prelude::*;

    use super::*;

    fn key() -> EcdsaKeyPair {
        EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap()
    }

    fn header(signer: &EcdsaKeyPair) -> Header {
        let point = signer.public_key().as_ref();
        Header {
            format: String::new(),
            bundle_id: "ab".repeat(16),
            exported_at: 1_800_000_000,
            exported_by: "spiffe://operators.example/op1".into(),
            approval_id: Some("cd".repeat(16)),
            ceremony_id: "0b0b0b0b-0b0b-4b0b-8b0b-0b0b0b0b0b0b".into(),
            epoch: 1,
            transcript_sha256: "ef".repeat(32),
            audit_head: AuditHead {
                seq: 42,
                hash: "01".repeat(32),
            },
            signer: BundleSigner {
                id: signer_id(point),
                public_point: hex::encode(point),
            },
            counts: BTreeMap::from([("keys".to_owned(), 2)]),
            config: serde_json::json!({ "approvals": { "required": 2 } }),
            body_len: 0,
            body_sha256: String::new(),
        }
    }

    fn records() -> Vec<Record> {
        vec![
            Record {
                table: Table::Versions,
                key: vec![1, 0, 0, 0, 1],
                value: br#"{"escrow":"..."}"#.to_vec(),
            },
            Record {
                table: Table::Keys,
                key: vec![2],
                value: b"{}".to_vec(),
            },
            Record {
                table: Table::Keys,
                key: vec![1],
                value: b"{}".to_vec(),
            },
        ]
    }

    /// Signs a SHA-256 digest, as the token does.
    fn sign_digest(signer: &EcdsaKeyPair, hashed: &[u8; 32]) -> Vec<u8> {
        let d = aws_lc_rs::digest::Digest::import_less_safe(hashed, &SHA256).unwrap();
        signer.sign_digest(&d).unwrap().as_ref().to_vec()
    }

    fn bundle(signer: &EcdsaKeyPair) -> Vec<u8> {
        encode(header(signer), &records(), |d| Ok(sign_digest(signer, d))).unwrap()
    }

    #[test]
    fn a_bundle_round_trips_sorted_and_verifies_under_its_signer_only() {
        let signer = key();
        let bytes = bundle(&signer);
        let b = parse(&bytes).unwrap();
        assert_eq!(b.header.format, FORMAT);
        let order: Vec<(Table, Vec<u8>)> =
            b.records.iter().map(|r| (r.table, r.key.clone())).collect();
        assert_eq!(
            order,
            [
                (Table::Keys, vec![1]),
                (Table::Keys, vec![2]),
                (Table::Versions, vec![1, 0, 0, 0, 1])
            ]
        );
        b.verify(signer.public_key().as_ref()).unwrap();
        let other = key();
        assert!(matches!(
            b.verify(other.public_key().as_ref()),
            Err(BundleError::OtherSigner { .. })
        ));
        // Re-signed by another key that claims the first one's id: the signature fails.
        let mut claimed = header(&other);
        claimed.signer = header(&signer).signer;
        let forged = encode(claimed, &records(), |d| Ok(sign_digest(&other, d))).unwrap();
        assert_eq!(
            parse(&forged).unwrap().verify(signer.public_key().as_ref()),
            Err(BundleError::Signature)
        );
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let signer = key();
        let point = signer.public_key().as_ref().to_vec();
        let bytes = bundle(&signer);
        for len in 0..bytes.len() {
            assert!(parse(&bytes[..len]).is_err(), "a cut at {len} parsed");
        }
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x01;
            let refused = parse(&flipped).and_then(|b| b.verify(&point));
            assert!(refused.is_err(), "a flip at byte {at} was accepted");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(parse(&longer).err(), Some(BundleError::Trailing));
        let mut other_version = bytes.clone();
        other_version[9] = 2;
        assert_eq!(parse(&other_version).err(), Some(BundleError::Version(2)));
        assert_eq!(parse(b"not a bundle").err(), Some(BundleError::Magic));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_bytes_after_the_magic_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..4096)
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&VERSION.to_be_bytes());
            bytes.extend(tail);
            let _ = parse(&bytes);
        }
    }
}

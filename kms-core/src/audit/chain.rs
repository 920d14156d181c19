//! The record and checkpoint formats, and their hashes and signed messages.
//!
//! A stored record is `hash (32 bytes) ‖ body`, where the body is the record's JSON and
//! `hash = SHA-256("sovereign-kms/audit-record/v1\0" ‖ body)`. The body carries its sequence
//! number and the hash of the record before it (`prev`; 32 zero bytes for record 1), so that
//! every record commits to the whole history before it. The body bytes are hashed exactly as
//! stored and exported; they are never re-serialised before hashing.
//!
//! A checkpoint signs `"sovereign-kms/audit-checkpoint/v1\0" ‖ seq (u64 BE) ‖ head hash ‖
//! time_ms (u64 BE)` with ECDSA P-256 / SHA-256, the private key never leaving the HSM.

use std::collections::BTreeMap;

use aws_lc_rs::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ids::Principal;

/// Length of a record hash.
pub const HASH_LEN: usize = 32;
/// A record hash.
pub type Hash = [u8; HASH_LEN];
/// The `prev` of record 1.
pub const GENESIS: Hash = [0; HASH_LEN];

const RECORD_DOMAIN: &[u8] = b"sovereign-kms/audit-record/v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"sovereign-kms/audit-checkpoint/v1\0";

/// The action written when old records are pruned; its `first_retained` detail tells the
/// verifier where the retained log legitimately starts.
pub const PRUNED_ACTION: &str = "audit.pruned";

/// The action of the first record of a deployment restored by the recovery ceremony: it
/// follows the backup bundle's head (its `bundle_head_seq` and `bundle_head_hash` details,
/// and its own `prev`), so the verifier accepts a log that starts there, and says so.
pub const RECOVERED_ACTION: &str = "custody.recovered";

/// The first record of a recovered log, chained to the bundle's head: `(hash, stored value)`.
pub fn recovered_record(
    head_seq: u64,
    head_hash: &Hash,
    time_ms: u64,
    event: &AuditEvent,
) -> Result<(Hash, Vec<u8>), Error> {
    let json = serde_json::to_vec(event).map_err(|_| Error::Internal("audit event encoding"))?;
    Ok(encode_chained(
        head_seq.saturating_add(1),
        head_hash,
        time_ms,
        &json,
    ))
}

/// One security-relevant event. Never holds plaintext, DEKs, PINs, key material or
/// encryption-context values: context keys are listed and their values only digested.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditEvent {
    /// What happened, as `plane.Operation`: `data.GenerateDataKey`, `admin.RotateKey`,
    /// `server.start`, `hsm.retry`.
    pub action: String,
    /// Who asked: the authenticated caller's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// How the caller authenticated (`mtls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// `allow` or `deny`, when an authorisation decision was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Why it was denied or failed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The outcome: `ok`, or the status code the caller saw.
    pub status: String,
    /// The key, as resolved (an id) or as asked for (an id or alias) when it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The key version used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// Encryption-context keys, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context_keys: Vec<String>,
    /// Keyed digest (HMAC-SHA-256 under the log's context key) of the canonical context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_digest: Option<String>,
    /// Policies that determined the decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
    /// The grant used, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// The request id the server assigned (random, unique per request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The caller's own `x-request-id`, when it sent a well-formed one (at most 64 of
    /// `A-Z a-z 0-9 . _ -`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    /// Time spent serving the request, in microseconds, up to the audit write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// SHA-256 of the changed object before an admin change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// SHA-256 of the changed object after an admin change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Further facts, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub detail: BTreeMap<String, String>,
}

impl AuditEvent {
    /// An event for `action` with outcome `status`.
    pub fn new(action: impl Into<String>, status: impl Into<String>) -> Self {
        Self {
            action: action.into(),
            status: status.into(),
            ..Self::default()
        }
    }

    /// The same event, done by `principal` (for changes made outside the planes, whose
    /// caller is not authenticated per request: start-up, ceremonies, drills).
    #[must_use]
    pub fn by(mut self, principal: impl Into<String>) -> Self {
        self.principal = Some(principal.into());
        self
    }

    /// The same event, about `key` (an id, or the alias asked for).
    #[must_use]
    pub fn on_key(mut self, key: impl ToString) -> Self {
        self.key = Some(key.to_string());
        self
    }

    /// The same event, with why it was refused or failed.
    #[must_use]
    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// The same event, with the fact `name` = `value` (a later value for a name replaces an
    /// earlier one).
    #[must_use]
    pub fn with(mut self, name: &str, value: impl ToString) -> Self {
        self.detail.insert(name.to_owned(), value.to_string());
        self
    }

    /// Fills the caller fields: who (as [`Principal`] names it) and how it authenticated
    /// (`mtls`, `jwt`, `grant`, or `none`). Every record's caller is set here and nowhere
    /// else.
    pub fn set_caller(&mut self, principal: Principal, auth: &str) {
        self.principal = Some(principal.into());
        self.auth = Some(auth.to_owned());
    }
}

/// A record as stored: its place in the chain and its event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecordBody {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// Hex hash of the record before.
    pub prev: String,
    /// When it was written, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What happened.
    pub event: AuditEvent,
}

/// A signed statement that the chain had `head` as the hash of record `seq` at `time_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Checkpoint {
    /// The last record covered.
    pub seq: u64,
    /// Hex hash of that record.
    pub head: String,
    /// When it was signed, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Which signing key: hex of the first 16 bytes of SHA-256 of its public point.
    pub key_id: String,
    /// Hex ECDSA P-256 signature, r ‖ s.
    pub signature: String,
}

impl Checkpoint {
    /// A checkpoint as read from elsewhere (an export, an RPC).
    pub fn new(seq: u64, head: String, time_ms: u64, key_id: String, signature: String) -> Self {
        Self {
            seq,
            head,
            time_ms,
            key_id,
            signature,
        }
    }
}

/// The hash of a record body.
pub fn record_hash(body: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(RECORD_DOMAIN);
    ctx.update(body);
    let mut out = GENESIS;
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Encodes a record for the store: its hash and `hash ‖ body`, in one buffer.
pub(super) fn encode_record(body: &RecordBody) -> Result<(Hash, Vec<u8>), Error> {
    let mut value = Vec::with_capacity(512);
    value.extend_from_slice(&GENESIS);
    serde_json::to_writer(&mut value, body).map_err(|source| Error::Record {
        table: "audit_records",
        source,
    })?;
    let hash = record_hash(value.get(HASH_LEN..).unwrap_or_default());
    if let Some(slot) = value.get_mut(..HASH_LEN) {
        slot.copy_from_slice(&hash);
    }
    Ok((hash, value))
}

/// The same encoding as [`encode_record`], from an event already serialised to JSON (the
/// callers serialise in parallel; only the chaining is left to the single writer). The body
/// is written field by field in `RecordBody`'s order; every field but the event is a number
/// or hex, so nothing needs escaping.
pub(super) fn encode_chained(
    seq: u64,
    prev: &Hash,
    time_ms: u64,
    event_json: &[u8],
) -> (Hash, Vec<u8>) {
    let mut prev_hex = [0u8; 2 * HASH_LEN];
    // Cannot fail: the output is exactly twice the input.
    let _ = hex::encode_to_slice(prev, &mut prev_hex);
    let mut value = Vec::with_capacity(HASH_LEN + 128 + event_json.len());
    value.extend_from_slice(&GENESIS);
    value.extend_from_slice(b"{\"seq\":");
    value.extend_from_slice(seq.to_string().as_bytes());
    value.extend_from_slice(b",\"prev\":\"");
    value.extend_from_slice(&prev_hex);
    value.extend_from_slice(b"\",\"time_ms\":");
    value.extend_from_slice(time_ms.to_string().as_bytes());
    value.extend_from_slice(b",\"event\":");
    value.extend_from_slice(event_json);
    value.push(b'}');
    let hash = record_hash(value.get(HASH_LEN..).unwrap_or_default());
    if let Some(slot) = value.get_mut(..HASH_LEN) {
        slot.copy_from_slice(&hash);
    }
    (hash, value)
}

/// Splits a stored record into its hash and body.
pub fn split_record(value: &[u8]) -> Option<(Hash, &[u8])> {
    let (hash, body) = value.split_first_chunk::<HASH_LEN>()?;
    Some((*hash, body))
}

/// The store key of a sequence number (big-endian, so key order is sequence order).
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The sequence number of a store key.
pub fn key_seq(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

/// The message a checkpoint signs.
pub fn checkpoint_message(seq: u64, head: &Hash, time_ms: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 8 + HASH_LEN + 8);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head);
    m.extend_from_slice(&time_ms.to_be_bytes());
    m
}

/// The id of a signing key: hex of the first 16 bytes of SHA-256 of its public point.
pub fn signer_id(public_point: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&SHA256, public_point);
    hex::encode(digest.as_ref().get(..16).unwrap_or_default())
}

/// SHA-256 of a value's JSON, for the before/after fields of admin changes.
pub fn object_hash<T: Serialize>(value: &T) -> Option<String> {
    let json = serde_json::to_vec(value).ok()?;
    Some(sha256_hex(&json))
}

/// SHA-256 of `bytes`, lower-case hex: how records name a file (a receipt, an attestation, a
/// bundle, a drill report) or a value.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&SHA256, bytes).as_ref())
}

/// The fixed DER prefix of a P-256 SubjectPublicKeyInfo (RFC 5480) before the 65-byte point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A P-256 public point as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), for `openssl` and others.
pub fn public_key_pem(point: &[u8]) -> String {
    use base64::Engine as _;
    let mut der = P256_SPKI_PREFIX.to_vec();
    der.extend_from_slice(point);
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

/// The point inside a PEM P-256 public key written by [`public_key_pem`] (or `openssl ec
/// -pubout`); `None` for anything else.
pub fn public_key_from_pem(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let point = der.strip_prefix(P256_SPKI_PREFIX.as_slice())?;
    (point.len() == hsm_bridge::P256_POINT_LEN && point.first() == Some(&0x04))
        .then(|| point.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_built_in_one_expression() {
        let e = AuditEvent::new("ceremony.init", "error")
            .by("kms ceremony init")
            .because("token full")
            .with("threshold", 2)
            .with("custodians", "alice,bob")
            .with("threshold", 3);
        assert_eq!(e.principal.as_deref(), Some("kms ceremony init"));
        assert_eq!(e.reason.as_deref(), Some("token full"));
        assert_eq!(e.detail.get("threshold").map(String::as_str), Some("3"));
        assert_eq!(e.detail.len(), 2);
        assert_eq!(
            (e.action.as_str(), e.status.as_str()),
            ("ceremony.init", "error")
        );
    }

    #[test]
    fn record_round_trips_and_hash_covers_every_byte() {
        let body = RecordBody {
            seq: 7,
            prev: hex::encode(GENESIS),
            time_ms: 1,
            event: AuditEvent::new("data.Decrypt", "ok"),
        };
        let (hash, value) = encode_record(&body).unwrap();
        let (stored, json) = split_record(&value).unwrap();
        assert_eq!(stored, hash);
        assert_eq!(record_hash(json), hash);
        let back: RecordBody = serde_json::from_slice(json).unwrap();
        assert_eq!(back, body);
        for i in 0..json.len() {
            let mut flipped = json.to_vec();
            flipped[i] ^= 1;
            assert_ne!(record_hash(&flipped), hash, "byte {i}");
        }
    }

    #[test]
    fn chained_encoding_is_byte_for_byte_the_serde_encoding() {
        let mut event = AuditEvent::new("data.Encrypt", "ok");
        event.principal = Some("x509-sha256:ab\"cd\\".into());
        event.context_keys = vec!["tenant".into(), "é".into()];
        event.detail.insert("k".into(), "v\n".into());
        let prev = [7u8; HASH_LEN];
        let body = RecordBody {
            seq: 18_446_744_073_709_551_615,
            prev: hex::encode(prev),
            time_ms: 1_795_341_600_123,
            event: event.clone(),
        };
        let (hash, value) = encode_record(&body).unwrap();
        let json = serde_json::to_vec(&event).unwrap();
        let (hash2, value2) = encode_chained(body.seq, &prev, body.time_ms, &json);
        assert_eq!(value2, value);
        assert_eq!(hash2, hash);
    }

    #[test]
    fn pem_round_trips() {
        let mut point = vec![4u8];
        point.extend((0..64).map(|i: u8| i));
        let pem = public_key_pem(&point);
        assert_eq!(public_key_from_pem(&pem).unwrap(), point);
        assert!(public_key_from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END").is_none());
    }
}

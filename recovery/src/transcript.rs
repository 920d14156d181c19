//! The ceremony transcript: what a ceremony pinned, hashed by anyone, MACed by the quorum.

use aws_lc_rs::digest::{digest, SHA256};
use aws_lc_rs::hmac;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::seal::RecoveryPublicKey;
use crate::secret::{Derive, RecoverySecret};
use crate::{CeremonyId, Epoch, Error};

/// The transcript's format string.
pub const TRANSCRIPT_FORMAT: &str = "sovereign-kms/transcript-v1";

/// Which ceremony wrote a transcript.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CeremonyKind {
    /// The first split of a deployment's recovery authority.
    Init,
    /// A recovery onto a new token: it pins the new token and audit signer under the same
    /// recovery secret, so that bundles the recovered deployment exports authenticate too.
    Recover,
    /// A new recovery secret split to a (possibly new) custodian set at the next epoch.
    Reshare,
}

/// A custodian as the transcript records them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscriptCustodian {
    /// Name.
    pub name: String,
    /// 1-based share index.
    pub index: u8,
    /// Their age recipient.
    pub recipient: String,
    /// Hex SHA-256 commitment to their share (see `Share::commitment`).
    pub commitment: String,
}

/// The HSM token the ceremony ran against (`C_GetTokenInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenInfo {
    /// Token label.
    pub label: String,
    /// Manufacturer id.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Serial number.
    pub serial: String,
}

/// The trusted escrow key the KMS wraps `hsm` versions under, pinned by check value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscrowPin {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_ID`, hex.
    pub id: String,
    /// Key check value, hex.
    pub check_value: String,
}

/// A ceremony transcript. `mac` is HMAC-SHA256, under a key derived from the recovery secret,
/// over the canonical JSON of every other field; the transcript's hash is SHA-256 of the
/// canonical JSON of all of it, which is exactly the bytes of `transcript.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transcript {
    /// [`TRANSCRIPT_FORMAT`].
    pub format: String,
    /// Which ceremony.
    pub kind: CeremonyKind,
    /// Its id.
    pub ceremony_id: CeremonyId,
    /// Its epoch.
    pub epoch: Epoch,
    /// k.
    pub threshold: u8,
    /// The n custodians, by index.
    pub custodians: Vec<TranscriptCustodian>,
    /// The recovery public key.
    pub recovery_public_key: RecoveryPublicKey,
    /// The pinned escrow key, when the token holds one.
    pub escrow_key: Option<EscrowPin>,
    /// The token.
    pub token: TokenInfo,
    /// The audit checkpoint signer's public key, hex (SEC1 uncompressed P-256).
    pub audit_signer: String,
    /// A fresh 32-byte nonce, hex.
    pub nonce: String,
    /// When, Unix seconds.
    pub time: u64,
    /// Hex HMAC-SHA256 over the rest; empty until [`Transcript::mac_with`].
    pub mac: String,
    /// A reshare's or a recovery's: hex SHA-256 of the transcript it follows (a reshare
    /// replaces it; a recovery pins a successor signer beside it). Absent from init
    /// transcripts, so one written before this field existed keeps its bytes and hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_sha256: Option<String>,
}

impl Transcript {
    /// The canonical JSON of everything (keys sorted, no whitespace).
    pub fn canonical(&self) -> Result<Vec<u8>, Error> {
        let value =
            serde_json::to_value(self).map_err(|_| Error::Internal("transcript encoding"))?;
        let mut out = String::new();
        canonical(&value, &mut out)?;
        Ok(out.into_bytes())
    }

    /// SHA-256 of [`Transcript::canonical`].
    pub fn sha256(&self) -> Result<[u8; 32], Error> {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, &self.canonical()?).as_ref());
        Ok(out)
    }

    /// Parses `transcript.json`: it must be the canonical form of what it holds.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let t: Transcript = serde_json::from_slice(bytes).map_err(|_| Error::Transcript {
            fault: "not a sovereign-kms transcript",
        })?;
        if t.format != TRANSCRIPT_FORMAT {
            return Err(Error::Transcript {
                fault: "unknown format",
            });
        }
        if t.canonical()? != bytes {
            return Err(Error::Transcript {
                fault: "not in canonical form (was it edited?)",
            });
        }
        Ok(t)
    }

    /// Sets `mac` from the recovery secret.
    pub fn mac_with(&mut self, secret: &RecoverySecret) -> Result<(), Error> {
        self.mac = hex::encode(self.compute_mac(secret)?.as_ref());
        Ok(())
    }

    /// Checks `mac` with a recovery secret rebuilt by a quorum.
    pub fn verify_mac(&self, secret: &RecoverySecret) -> Result<(), Error> {
        let key = self.mac_key(secret)?;
        let tag = hex::decode(&self.mac).map_err(|_| Error::Transcript {
            fault: "mac is not hex",
        })?;
        hmac::verify(&key, &self.body()?, &tag).map_err(|_| Error::Transcript {
            fault: "mac does not verify under this recovery secret",
        })
    }

    fn compute_mac(&self, secret: &RecoverySecret) -> Result<hmac::Tag, Error> {
        Ok(hmac::sign(&self.mac_key(secret)?, &self.body()?))
    }

    fn mac_key(&self, secret: &RecoverySecret) -> Result<hmac::Key, Error> {
        let derived = secret.derive(self.ceremony_id, Derive::TranscriptMac)?;
        Ok(hmac::Key::new(hmac::HMAC_SHA256, derived.expose_secret()))
    }

    /// The canonical JSON without `mac`.
    fn body(&self) -> Result<Vec<u8>, Error> {
        let mut value =
            serde_json::to_value(self).map_err(|_| Error::Internal("transcript encoding"))?;
        if let Value::Object(map) = &mut value {
            map.remove("mac");
        }
        let mut out = String::new();
        canonical(&value, &mut out)?;
        Ok(out.into_bytes())
    }
}

/// Writes `value` as JSON with object keys sorted and no whitespace.
fn canonical(value: &Value, out: &mut String) -> Result<(), Error> {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).map_err(|_| Error::Internal("json"))?);
                out.push(':');
                canonical(map.get(k).ok_or(Error::Internal("json key"))?, out)?;
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out)?;
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).map_err(|_| Error::Internal("json"))?),
    }
    Ok(())
}

//! Key records as stored: metadata, versions and their wrapped or token-resident material.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use hsm_bridge::Hsm;
use secrecy::ExposeSecret;

use crate::blob::NONCE_LEN;
use crate::error::{Error, InvalidInput};
use crate::ids::{Alias, KeyId, KeyVersion};
use crate::secret::{Kek, KEK_LEN};
use crate::store::{Change, Table};

/// Where a key version's material lives and where its operations run.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Protection {
    /// A non-extractable token object; every wrap and unwrap runs inside the HSM.
    Hsm,
    /// 32 random bytes from the HSM, stored wrapped under the root key and unwrapped into
    /// zeroizing memory, so operations run in process at software speed.
    Software,
}

impl Protection {
    /// Every protection level.
    pub const ALL: [Protection; 2] = [Protection::Hsm, Protection::Software];

    /// The level's name on the wire and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::Hsm => "hsm",
            Protection::Software => "software",
        }
    }
}

/// A key's lifecycle state.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KeyState {
    /// No cryptographic operation is allowed; metadata stays readable.
    Disabled,
    /// Usable.
    Enabled,
    /// Scheduled for destruction (docs/APPROVALS.md): no cryptographic operation is allowed,
    /// the material is still there, and `cancel-destroy` returns the key to `Disabled`.
    PendingDestruction,
    /// Its material is gone, for good; the record stays for its history.
    Destroyed,
}

impl KeyState {
    /// Every state.
    pub const ALL: [KeyState; 4] = [
        KeyState::Disabled,
        KeyState::Enabled,
        KeyState::PendingDestruction,
        KeyState::Destroyed,
    ];

    /// The state's name on the wire and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Disabled => "disabled",
            KeyState::Enabled => "enabled",
            KeyState::PendingDestruction => "pending_destruction",
            KeyState::Destroyed => "destroyed",
        }
    }
}

/// Key labels such as `owner` and `sensitivity`, used by policy and inventory.
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// At most this many labels.
    pub const MAX_LABELS: usize = 32;

    /// Validated labels from pairs; duplicates are refused.
    pub fn from_pairs<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Result<Self, Error> {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            let key_ok = !k.is_empty()
                && k.len() <= 64
                && k.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
                });
            let value_ok = v.len() <= 256 && v.chars().all(|c| !c.is_control());
            if !key_ok || !value_ok || map.insert(k, v).is_some() || map.len() > Self::MAX_LABELS {
                return Err(Error::Invalid(InvalidInput::Label));
            }
        }
        Ok(Self(map))
    }

    /// The value of one label.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// All labels, sorted.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = Error;
    fn try_from(map: BTreeMap<String, String>) -> Result<Self, Error> {
        Self::from_pairs(map)
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(l: Labels) -> Self {
        l.0
    }
}

/// A key's metadata record.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key id.
    pub id: KeyId,
    /// Its alias, if any.
    pub alias: Option<Alias>,
    /// Labels.
    pub labels: Labels,
    /// Protection level, fixed at creation.
    pub protection: Protection,
    /// Lifecycle state.
    pub state: KeyState,
    /// The version new encryptions use.
    pub current_version: KeyVersion,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Last change, Unix seconds.
    pub updated_at: u64,
    /// The destruction scheduled for the key, or carried out on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destruction: Option<Destruction>,
}

/// Who asked for a key's destruction, and who approved it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DestructionAuthority {
    /// The operator who asked.
    pub requested_by: String,
    /// The operators who approved (none when the action is not gated).
    #[serde(default)]
    pub approvers: Vec<String>,
    /// The approval request that ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
}

/// A key's destruction: scheduled, then carried out (docs/APPROVALS.md).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Destruction {
    /// When it was scheduled, Unix seconds.
    pub scheduled_at: u64,
    /// When the material is deleted, Unix seconds.
    pub destroy_at: u64,
    /// Who asked and approved.
    pub authority: DestructionAuthority,
    /// When the key was committed to `Destroyed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<u64>,
    /// What was deleted, written when the key is committed to `Destroyed`, so that a receipt
    /// made after a restart names the same objects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<DeletedVersion>,
    /// The signed receipt (its file text), once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
}

/// One destroyed version.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DeletedVersion {
    /// The version.
    pub version: KeyVersion,
    /// Where its material was.
    pub protection: Protection,
    /// The token object of an `hsm` version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_object: Option<TokenObject>,
    /// Whether an escrow copy was kept in the version's record (and so deleted with it).
    #[serde(default)]
    pub escrowed: bool,
}

/// A token object, as PKCS#11 tools show it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TokenObject {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_ID`, hex (absent for versions made before objects had ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cka_id: Option<String>,
}

/// One version of a key.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The key.
    pub key_id: KeyId,
    /// The version.
    pub version: KeyVersion,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Its material.
    pub material: StoredMaterial,
    /// Its escrow to the recovery authority; absent only for versions made before custody was
    /// initialised (and, until the trusted escrow key is built, `hsm` versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escrow: Option<Escrow>,
    /// A data-key blob under this version and the hash of its DEK, for provider-exit drills
    /// (docs/DRILL.md); absent only until the first start after canaries existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
}

/// A version's canary: a data-key blob made under it with [`canary_context`], and SHA-256 of
/// its DEK. It holds nothing secret: the DEK is random and used for nothing else.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Canary {
    /// The blob, as the data plane's Decrypt takes it.
    #[serde(with = "crate::custody::b64")]
    pub blob: Vec<u8>,
    /// Hex SHA-256 of the DEK inside.
    pub dek_sha256: String,
}

/// The encryption context of a version's canary: `{"sovereign-kms/canary": "KEY_ID/VERSION"}`.
pub fn canary_context(
    key_id: KeyId,
    version: KeyVersion,
) -> Result<crate::context::EncryptionContext, Error> {
    crate::context::EncryptionContext::from_pairs([(
        "sovereign-kms/canary".to_owned(),
        format!("{key_id}/{}", version.get()),
    )])
}

/// How a version is escrowed.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Escrow {
    /// The material sealed to the recovery public key (purpose `software-version`, bound to
    /// [`kek_wrap_aad`]), under the recovery key of `ceremony`.
    Sealed {
        /// The ceremony whose recovery key it is sealed to.
        ceremony: recovery::CeremonyId,
        /// The hybrid seal.
        #[serde(with = "crate::custody::b64")]
        sealed: Vec<u8>,
    },
    /// An `hsm` version wrapped in the token under the trusted escrow key of `ceremony`
    /// (`CKM_AES_KEY_WRAP_PAD`, RFC 5649). The escrow key's value is itself sealed to the
    /// recovery public key.
    Wrapped {
        /// The ceremony whose escrow key it is wrapped under.
        ceremony: recovery::CeremonyId,
        /// The escrow key's `CKA_ID`, hex.
        escrow_key_id: String,
        /// The wrapped key.
        #[serde(with = "crate::custody::b64")]
        wrapped: Vec<u8>,
    },
}

/// How a version's material is kept. Neither form is usable without the HSM.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StoredMaterial {
    /// A token object, found by `CKA_ID` and check value (by label alone for versions made
    /// before objects had ids).
    Hsm {
        /// The `CKA_LABEL` of the token key.
        label: String,
        /// Its `CKA_ID`, hex.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// Its check value, hex.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check_value: Option<String>,
    },
    /// 32 bytes sealed with AES-256-GCM under the root key: 12-byte nonce then ciphertext and
    /// tag. The AAD binds the key id and version, so records cannot be swapped.
    Software {
        /// Nonce, ciphertext and tag.
        wrapped: Vec<u8>,
    },
}

/// Domain separation for wrapping software KEK versions under the root key.
const KEK_WRAP_AAD_PREFIX: &[u8] = b"sovereign-kms/kek-wrap/v1";

/// The AAD under which a software KEK version is wrapped by the root key: a fixed prefix, the
/// key id's 16 bytes and the version as u32 big-endian. Part of the stored format.
pub fn kek_wrap_aad(id: KeyId, version: KeyVersion) -> Vec<u8> {
    let mut aad = KEK_WRAP_AAD_PREFIX.to_vec();
    aad.extend_from_slice(&id.to_bytes());
    aad.extend_from_slice(&version.get().to_be_bytes());
    aad
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|_| Error::Internal("record encoding"))
}

/// A version's key in [`Table::Versions`]: key id ‖ version (big-endian).
pub(crate) fn version_key(id: KeyId, version: KeyVersion) -> Vec<u8> {
    let mut key = id.to_bytes().to_vec();
    key.extend_from_slice(&version.get().to_be_bytes());
    key
}

pub(crate) fn put_version(record: &VersionRecord) -> Result<Change, Error> {
    Ok(Change::Put {
        table: Table::Versions,
        key: version_key(record.key_id, record.version),
        value: encode(record)?,
    })
}

/// Unwraps a software version's material under the root key.
pub(crate) fn unwrap_software(hsm: &dyn Hsm, record: &VersionRecord) -> Result<Kek, Error> {
    let StoredMaterial::Software { wrapped } = &record.material else {
        return Err(Error::Internal("not a software version"));
    };
    let (nonce, sealed) = wrapped
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(Error::Internal("wrapped key material truncated"))?;
    let aad = kek_wrap_aad(record.key_id, record.version);
    let plain = hsm
        .aes_gcm_decrypt(hsm.root_key(), nonce, &aad, sealed)
        .map_err(|e| {
            tracing::error!(key_id = %record.key_id, version = %record.version, error = %e,
                "key version does not unwrap under this token's root key");
            Error::from(e)
        })?;
    Kek::init_with(|buf| {
        let bytes: &[u8; KEK_LEN] = plain
            .expose_secret()
            .try_into()
            .map_err(|_| Error::Internal("unwrapped key material has the wrong length"))?;
        buf.copy_from_slice(bytes);
        Ok(())
    })
}

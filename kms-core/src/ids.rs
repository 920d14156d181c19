//! Identifiers: key ids, key versions, aliases, operators and principals.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, InvalidInput};
use crate::governance::spiffe::SpiffeId;

/// A key's permanent identity: a random (version 4) UUID.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(uuid::Uuid);

impl KeyId {
    /// Builds a key id from 16 random bytes, setting the UUID version and variant bits.
    pub fn from_random_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Builder::from_random_bytes(bytes).into_uuid())
    }

    /// The 16 bytes as they appear in a ciphertext header.
    pub fn to_bytes(self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    /// Reads the 16 header bytes back.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        uuid::Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| Error::Invalid(InvalidInput::KeyId))
    }
}

/// A key version number. Version 1 is created with the key; each rotation adds one.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct KeyVersion(u32);

impl KeyVersion {
    /// The first version of every key.
    pub const FIRST: KeyVersion = KeyVersion(1);

    /// Wraps a raw version number; zero is not a version.
    pub fn new(n: u32) -> Option<Self> {
        (n >= 1).then_some(Self(n))
    }

    /// The raw number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The version after this one.
    pub fn next(self) -> Result<Self, Error> {
        self.0
            .checked_add(1)
            .map(Self)
            .ok_or(Error::Internal("key version overflow"))
    }
}

impl fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A unique, human-friendly name for a key: 1 to 64 characters of `A-Z a-z 0-9 / _ - .`,
/// not itself a UUID, so that a key reference is never ambiguous.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Alias(String);

impl Alias {
    /// Maximum length in bytes.
    pub const MAX_LEN: usize = 64;

    /// The alias text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Alias {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.'));
        if s.is_empty() || s.len() > Self::MAX_LEN || !ok_chars || uuid::Uuid::try_parse(&s).is_ok()
        {
            return Err(Error::Invalid(InvalidInput::Alias));
        }
        Ok(Self(s))
    }
}

impl From<Alias> for String {
    fn from(a: Alias) -> String {
        a.0
    }
}

impl fmt::Display for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How a caller names a key: by id or by alias.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum KeyRef {
    /// By alias.
    Alias(Alias),
    /// By id.
    Id(KeyId),
}

impl FromStr for KeyRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if let Ok(id) = s.parse::<KeyId>() {
            return Ok(KeyRef::Id(id));
        }
        Alias::try_from(s.to_owned())
            .map(KeyRef::Alias)
            .map_err(|_| Error::Invalid(InvalidInput::KeyRef))
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Alias(a) => a.fmt(f),
            KeyRef::Id(id) => id.fmt(f),
        }
    }
}

/// An operator, as the admin plane's TLS handshake verified it: the URI SAN of its
/// certificate, or the certificate's SHA-256 fingerprint as `x509-sha256:<hex>`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct OperatorId(String);

impl OperatorId {
    /// Longest URI SAN taken as an operator's identity.
    pub const MAX_URI_LEN: usize = 2048;

    /// The operator named by its certificate's only URI SAN; `None` for an empty, overlong or
    /// control-character-bearing URI (the fingerprint names it then).
    pub fn from_uri(uri: &str) -> Option<Self> {
        (!uri.is_empty() && uri.len() <= Self::MAX_URI_LEN && !uri.chars().any(char::is_control))
            .then(|| Self(uri.to_owned()))
    }

    /// The operator named by the SHA-256 digest of its certificate.
    pub fn from_fingerprint(sha256: &[u8; 32]) -> Self {
        Self(format!("x509-sha256:{}", hex::encode(sha256)))
    }

    /// The identity text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for OperatorId {
    type Err = crate::error::Error;

    /// An identity as an operator writes it: `x509-sha256:` and 64 lower-case hex digits, or
    /// a URI (`scheme://...`) as [`OperatorId::from_uri`] takes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = crate::error::Error::Invalid(crate::error::InvalidInput::OperatorIdentity);
        if let Some(hex) = s.strip_prefix("x509-sha256:") {
            let ok = hex.len() == 64
                && hex
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
            return ok.then(|| Self(s.to_owned())).ok_or(bad);
        }
        let scheme_ok = s
            .split_once("://")
            .is_some_and(|(scheme, rest)| !scheme.is_empty() && !rest.is_empty());
        match Self::from_uri(s) {
            Some(id) if scheme_ok && !s.contains(char::is_whitespace) => Ok(id),
            _ => Err(bad),
        }
    }
}

impl fmt::Display for OperatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who made a request, as the audit log names it.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Principal {
    /// No credential was presented.
    Anonymous,
    /// An operator on the admin plane.
    Operator(OperatorId),
    /// A credential that did not verify, and the identity it claimed (already bounded to a
    /// SPIFFE ID's syntax, so it is safe to record).
    Unverified(SpiffeId),
    /// A verified workload on the data plane.
    Workload(SpiffeId),
}

/// The principal's text, moving an identity's own text rather than copying it.
impl From<Principal> for String {
    fn from(p: Principal) -> String {
        match p {
            Principal::Operator(OperatorId(text)) => text,
            Principal::Workload(id) => id.into(),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("anonymous"),
            Principal::Operator(id) => id.fmt(f),
            Principal::Unverified(claimed) => write!(f, "unverified:{claimed}"),
            Principal::Workload(id) => id.fmt(f),
        }
    }
}

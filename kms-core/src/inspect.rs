//! What each object in the token is to the KMS, as an auditor sees it (`kms hsm inspect`):
//! the root key, the audit signing key pair, the trusted escrow key the custody transcript
//! pins, a key version the store names, or something the KMS cannot account for (flagged).
//!
//! Reads nothing itself: [`TokenInventory`] is built from the store, and each
//! [`hsm_bridge::ObjectReport`] comes from the token.

use hsm_bridge::{EscrowPin, ObjectReport, DEFAULT_ROOT_KEY_LABEL};

use crate::error::Error;
use crate::key::{StoredMaterial, VersionRecord};
use crate::store::Store;
use crate::{custody, KeyId, KeyVersion};

/// What the store says the token should hold.
#[derive(Debug, Default)]
pub struct TokenInventory {
    escrow: Option<EscrowPin>,
    versions: Vec<VersionRecord>,
}

/// What one token object is to the KMS.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Role {
    /// The audit signing key (private half).
    AuditSigningKey,
    /// The audit signing key's public half.
    AuditSigningPublicKey,
    /// The trusted escrow key the custody transcript pins.
    EscrowKey,
    /// A key version's token object.
    KeyVersion,
    /// The root wrapping key.
    RootKey,
    /// Nothing the KMS made.
    Unknown,
    /// A trusted key that no ceremony on record pins (a failed init's, or planted).
    UnpinnedTrustedKey,
}

impl Role {
    /// The role's name in `kms hsm inspect`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::AuditSigningKey => "audit-signing-key",
            Role::AuditSigningPublicKey => "audit-signing-public-key",
            Role::EscrowKey => "escrow-key",
            Role::KeyVersion => "key-version",
            Role::RootKey => "root-key",
            Role::Unknown => "unknown",
            Role::UnpinnedTrustedKey => "unpinned-trusted-key",
        }
    }
}

/// A key version a token object belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct VersionOf {
    /// The key.
    pub key_id: KeyId,
    /// The version.
    pub version: KeyVersion,
    /// Whether the version is escrowed.
    pub escrowed: bool,
}

/// A token object's role, whether an auditor should look at it, and the version it is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Classified {
    /// What it is.
    pub role: Role,
    /// Whether it is not as the KMS made it (or not the KMS's at all).
    pub flagged: bool,
    /// For a key version: which.
    pub version: Option<VersionOf>,
}

impl TokenInventory {
    /// What `store` says the token should hold.
    pub fn read(store: &dyn Store) -> Result<Self, Error> {
        let escrow = match custody::load(store)? {
            Some(c) => custody::escrow_pin(&c.transcript)?,
            None => None,
        };
        Ok(Self {
            escrow,
            versions: custody::version_records(store)?,
        })
    }

    /// The role of object `o`, and whether it is flagged.
    pub fn classify(&self, o: &ObjectReport) -> Classified {
        let plain = |role, flagged| Classified {
            role,
            flagged,
            version: None,
        };
        let label = o.label.as_deref().unwrap_or("");
        if let Some(pin) = &self.escrow {
            if o.id.as_deref() == Some(pin.id.to_hex().as_str()) {
                let intact = o.check_value.as_deref() == Some(pin.check_value.to_hex().as_str())
                    && o.trusted == Some(true);
                return plain(Role::EscrowKey, !intact);
            }
        }
        if o.trusted == Some(true) {
            // A trusted key the ceremony on record does not pin: left by an init that failed
            // after its import, or planted. The KMS never wraps under it.
            return plain(Role::UnpinnedTrustedKey, true);
        }
        if let Some(found) = self.version_of(o, label) {
            return found;
        }
        match (o.class.as_deref().unwrap_or(""), label) {
            ("CKO_SECRET_KEY", DEFAULT_ROOT_KEY_LABEL) => plain(Role::RootKey, false),
            ("CKO_PRIVATE_KEY", crate::audit::SIGNING_KEY_LABEL) => {
                plain(Role::AuditSigningKey, false)
            }
            ("CKO_PUBLIC_KEY", crate::audit::SIGNING_KEY_LABEL) => {
                plain(Role::AuditSigningPublicKey, false)
            }
            _ => plain(Role::Unknown, true),
        }
    }

    /// The key version `o` is, by `CKA_ID` (or by label for versions made before ids), flagged
    /// when its check value differs from the recorded one, when it is not escrowed, or when it
    /// can do more than encrypt and decrypt (`CKA_DERIVE`, `CKA_WRAP` or `CKA_UNWRAP` switched
    /// on: a key that wraps or derives can let its value out under another key).
    fn version_of(&self, o: &ObjectReport, label: &str) -> Option<Classified> {
        self.versions.iter().find_map(|v| {
            let StoredMaterial::Hsm {
                label: l,
                id,
                check_value,
            } = &v.material
            else {
                return None;
            };
            let matches = match id {
                Some(id) => o.id.as_deref() == Some(id.as_str()),
                None => label == l,
            };
            let intact = check_value.is_none() || o.check_value == *check_value;
            let widened = [o.derive, o.wrap, o.unwrap].contains(&Some(true));
            matches.then_some(Classified {
                role: Role::KeyVersion,
                flagged: !intact || widened || v.escrow.is_none(),
                version: Some(VersionOf {
                    key_id: v.key_id,
                    version: v.version,
                    escrowed: v.escrow.is_some(),
                }),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed step is a failed test"
    )]

    use hsm_bridge::{CheckValue, ObjectId};

    use super::*;
    use crate::key::{Escrow, StoredMaterial};

    fn object(class: &str, label: &str, id: Option<&str>, check: Option<&str>) -> ObjectReport {
        let mut o = ObjectReport::default();
        o.class = Some(class.into());
        o.label = Some(label.into());
        o.id = id.map(Into::into);
        o.check_value = check.map(Into::into);
        o.encrypt = Some(true);
        o.decrypt = Some(true);
        o
    }

    fn inventory(escrowed: bool) -> TokenInventory {
        TokenInventory {
            escrow: Some(EscrowPin {
                label: "escrow".into(),
                id: ObjectId([7; 16]),
                check_value: CheckValue([1, 2, 3]),
            }),
            versions: vec![VersionRecord {
                key_id: KeyId::from_random_bytes([5; 16]),
                version: KeyVersion::FIRST,
                created_at: 0,
                material: StoredMaterial::Hsm {
                    label: "v1".into(),
                    id: Some("aa".repeat(16)),
                    check_value: Some("abcdef".into()),
                },
                escrow: escrowed.then(|| Escrow::Wrapped {
                    ceremony: "00000000-0000-4000-8000-000000000001".parse().unwrap(),
                    escrow_key_id: "07".repeat(16),
                    wrapped: vec![1, 2, 3],
                }),
                canary: None,
            }],
        }
    }

    fn classify(inv: &TokenInventory, o: &ObjectReport) -> (&'static str, bool) {
        let c = inv.classify(o);
        (c.role.as_str(), c.flagged)
    }

    #[test]
    fn the_kms_objects_are_named_and_not_flagged() {
        let inv = inventory(true);
        let root = object("CKO_SECRET_KEY", DEFAULT_ROOT_KEY_LABEL, None, None);
        assert_eq!(classify(&inv, &root), ("root-key", false));
        let signing = object(
            "CKO_PRIVATE_KEY",
            crate::audit::SIGNING_KEY_LABEL,
            None,
            None,
        );
        assert_eq!(classify(&inv, &signing), ("audit-signing-key", false));
        let public = object(
            "CKO_PUBLIC_KEY",
            crate::audit::SIGNING_KEY_LABEL,
            None,
            None,
        );
        assert_eq!(classify(&inv, &public), ("audit-signing-public-key", false));
        let mut escrow = object(
            "CKO_SECRET_KEY",
            "escrow",
            Some(&"07".repeat(16)),
            Some("010203"),
        );
        escrow.trusted = Some(true);
        assert_eq!(classify(&inv, &escrow), ("escrow-key", false));
        let version = object(
            "CKO_SECRET_KEY",
            "v1",
            Some(&"aa".repeat(16)),
            Some("abcdef"),
        );
        let found = inv.classify(&version);
        assert_eq!((found.role, found.flagged), (Role::KeyVersion, false));
        assert_eq!(found.version.map(|v| v.escrowed), Some(true));
    }

    #[test]
    fn what_the_kms_did_not_make_as_it_is_is_flagged() {
        let inv = inventory(true);
        let mut escrow = object(
            "CKO_SECRET_KEY",
            "escrow",
            Some(&"07".repeat(16)),
            Some("ffffff"),
        );
        escrow.trusted = Some(true);
        assert_eq!(
            classify(&inv, &escrow),
            ("escrow-key", true),
            "another value"
        );
        let mut planted = object("CKO_SECRET_KEY", "other", Some(&"09".repeat(16)), None);
        planted.trusted = Some(true);
        assert_eq!(classify(&inv, &planted), ("unpinned-trusted-key", true));
        let changed = object(
            "CKO_SECRET_KEY",
            "v1",
            Some(&"aa".repeat(16)),
            Some("000000"),
        );
        assert_eq!(
            classify(&inv, &changed),
            ("key-version", true),
            "another check value"
        );
        let stranger = object("CKO_SECRET_KEY", "stranger", None, None);
        assert_eq!(classify(&inv, &stranger), ("unknown", true));
        let unescrowed = object(
            "CKO_SECRET_KEY",
            "v1",
            Some(&"aa".repeat(16)),
            Some("abcdef"),
        );
        assert_eq!(
            classify(&inventory(false), &unescrowed),
            ("key-version", true)
        );
    }

    #[test]
    fn a_key_version_that_can_wrap_unwrap_or_derive_is_flagged() {
        let inv = inventory(true);
        let widened: [fn(&mut ObjectReport); 3] = [
            |o| o.derive = Some(true),
            |o| o.wrap = Some(true),
            |o| o.unwrap = Some(true),
        ];
        for widen in widened {
            let mut o = object(
                "CKO_SECRET_KEY",
                "v1",
                Some(&"aa".repeat(16)),
                Some("abcdef"),
            );
            widen(&mut o);
            assert_eq!(classify(&inv, &o), ("key-version", true), "{o:?}");
        }
    }
}

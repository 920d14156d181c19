//! Escrow of token-resident keys under a trusted escrow key, the token self-test that shows
//! the token enforces `CKA_WRAP_WITH_TRUSTED`, and the object inventory for auditors
//! (protocol: `docs/CUSTODY.md`).
//!
//! The trusted escrow key is imported once, by the token's Security Officer, at the init
//! ceremony. It can wrap and do nothing else, cannot be changed or destroyed, and is the only
//! key an escrowed version can ever be wrapped under (`CKA_WRAP_WITH_TRUSTED`). Its value is
//! sealed to the recovery authority on the ceremony host; the running server never holds it.

use std::fmt;
use std::path::Path;

use cryptoki::error::RvError;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use zeroize::Zeroize;

use crate::error::{Error, Result};
use crate::TokenKey;

/// Length of a `CKA_ID` this project gives its objects.
pub const OBJECT_ID_LEN: usize = 16;
/// Length of a PKCS#11 key check value (`CKA_CHECK_VALUE`): the first three bytes of the
/// AES-ECB encryption of a zero block.
pub const CHECK_VALUE_LEN: usize = 3;

/// An object's `CKA_ID`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; OBJECT_ID_LEN]);

/// A key's check value (`CKA_CHECK_VALUE`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CheckValue(pub [u8; CHECK_VALUE_LEN]);

macro_rules! hex_type {
    ($t:ty, $len:expr, $what:literal) => {
        impl $t {
            /// Lower-case hex.
            pub fn to_hex(&self) -> String {
                self.0.iter().map(|b| format!("{b:02x}")).collect()
            }

            /// Parses lower- or upper-case hex of exactly the right length.
            pub fn from_hex(text: &str) -> Result<Self> {
                let mut out = [0u8; $len];
                if text.len() != 2 * $len || !text.is_ascii() {
                    return Err(Error::InvalidArgument { what: $what });
                }
                for (i, byte) in out.iter_mut().enumerate() {
                    let pair = text
                        .get(2 * i..2 * i + 2)
                        .ok_or(Error::InvalidArgument { what: $what })?;
                    *byte = u8::from_str_radix(pair, 16)
                        .map_err(|_| Error::InvalidArgument { what: $what })?;
                }
                Ok(Self(out))
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
    };
}

hex_type!(ObjectId, OBJECT_ID_LEN, "object id is not 32 hex digits");
hex_type!(
    CheckValue,
    CHECK_VALUE_LEN,
    "check value is not 6 hex digits"
);

/// How the KMS names the trusted escrow key it may wrap under: the ceremony pins all three,
/// and any other trusted key is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EscrowPin {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_ID`.
    pub id: ObjectId,
    /// `CKA_CHECK_VALUE`.
    pub check_value: CheckValue,
}

/// A freshly generated, escrowed token key: the handle, what finds it again, and its wrap
/// under the trusted escrow key (`CKM_AES_KEY_WRAP_PAD`, RFC 5649).
#[derive(Clone, Debug)]
pub struct EscrowedKey {
    /// The token object, now non-extractable.
    pub key: TokenKey,
    /// Its `CKA_ID`.
    pub id: ObjectId,
    /// Its check value.
    pub check_value: CheckValue,
    /// The key wrapped under the escrow key. Only the escrow key's value, which only a
    /// quorum of custodians can unseal, opens it.
    pub wrapped: Vec<u8>,
}

/// One token object as an auditor sees it. Attributes the token does not report for this
/// object (sensitive, unavailable or not applicable) are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObjectReport {
    /// `CKA_CLASS`, as PKCS#11 names it (`CKO_SECRET_KEY`).
    pub class: Option<String>,
    /// `CKA_KEY_TYPE` (`CKK_AES`).
    pub key_type: Option<String>,
    /// `CKA_LABEL`, lossy UTF-8.
    pub label: Option<String>,
    /// `CKA_ID`, hex.
    pub id: Option<String>,
    /// `CKA_TOKEN`.
    pub token: Option<bool>,
    /// `CKA_PRIVATE`.
    pub private: Option<bool>,
    /// `CKA_SENSITIVE`.
    pub sensitive: Option<bool>,
    /// `CKA_EXTRACTABLE`.
    pub extractable: Option<bool>,
    /// `CKA_ALWAYS_SENSITIVE`.
    pub always_sensitive: Option<bool>,
    /// `CKA_NEVER_EXTRACTABLE`.
    pub never_extractable: Option<bool>,
    /// `CKA_LOCAL`: generated in the token.
    pub local: Option<bool>,
    /// `CKA_TRUSTED`.
    pub trusted: Option<bool>,
    /// `CKA_WRAP_WITH_TRUSTED`.
    pub wrap_with_trusted: Option<bool>,
    /// `CKA_MODIFIABLE`.
    pub modifiable: Option<bool>,
    /// `CKA_DESTROYABLE`.
    pub destroyable: Option<bool>,
    /// `CKA_COPYABLE`.
    pub copyable: Option<bool>,
    /// `CKA_ENCRYPT`.
    pub encrypt: Option<bool>,
    /// `CKA_DECRYPT`.
    pub decrypt: Option<bool>,
    /// `CKA_WRAP`.
    pub wrap: Option<bool>,
    /// `CKA_UNWRAP`.
    pub unwrap: Option<bool>,
    /// `CKA_SIGN`.
    pub sign: Option<bool>,
    /// `CKA_VERIFY`.
    pub verify: Option<bool>,
    /// `CKA_DERIVE`.
    pub derive: Option<bool>,
    /// `CKA_KEY_GEN_MECHANISM` (`CKM_AES_KEY_GEN`); absent for imported keys.
    pub key_gen_mechanism: Option<String>,
    /// `CKA_ALLOWED_MECHANISMS`.
    pub allowed_mechanisms: Option<Vec<String>>,
    /// `CKA_CHECK_VALUE`, hex.
    pub check_value: Option<String>,
    /// `CKA_VALUE_LEN` in bytes.
    pub value_len: Option<u64>,
}

/// A template for the trusted escrow key: AES-256, a public token object that wraps with
/// `CKM_AES_KEY_WRAP_PAD` and does nothing else, and can never be changed, copied or
/// destroyed. `CKA_TRUSTED` can only be set by the Security Officer.
fn escrow_key_template(pin_label: &str, id: &ObjectId, value: &[u8; 32]) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(value.to_vec()),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Destroyable(false),
        Attribute::AllowedMechanisms(vec![MechanismType::AES_KEY_WRAP_PAD]),
        Attribute::Id(id.0.to_vec()),
        Attribute::Label(pin_label.as_bytes().to_vec()),
    ]
}

/// Reads one attribute on its own, so that a sensitive or unknown one does not hide the
/// others (`get_attributes` drops sensitive attributes and fails on some unavailable ones).
fn one(session: &Session, object: ObjectHandle, kind: AttributeType) -> Option<Attribute> {
    // Asked for its size first: an attribute the token marks unavailable (the generation
    // mechanism of an imported key) or sensitive is skipped, not decoded.
    match session.get_attribute_info(object, &[kind]).ok()?.first()? {
        cryptoki::object::AttributeInfo::Available(_) => {}
        _ => return None,
    }
    session
        .get_attributes(object, &[kind])
        .ok()
        .and_then(|v| v.into_iter().next())
}

/// The value of a boolean attribute.
fn as_bool(attribute: &Attribute) -> Option<bool> {
    match attribute {
        Attribute::Token(v)
        | Attribute::Private(v)
        | Attribute::Sensitive(v)
        | Attribute::Extractable(v)
        | Attribute::AlwaysSensitive(v)
        | Attribute::NeverExtractable(v)
        | Attribute::Local(v)
        | Attribute::Trusted(v)
        | Attribute::WrapWithTrusted(v)
        | Attribute::Modifiable(v)
        | Attribute::Destroyable(v)
        | Attribute::Copyable(v)
        | Attribute::Encrypt(v)
        | Attribute::Decrypt(v)
        | Attribute::Wrap(v)
        | Attribute::Unwrap(v)
        | Attribute::Sign(v)
        | Attribute::Verify(v)
        | Attribute::Derive(v) => Some(*v),
        _ => None,
    }
}

fn one_bool(session: &Session, object: ObjectHandle, kind: AttributeType) -> Option<bool> {
    as_bool(&one(session, object, kind)?)
}

fn one_bytes(session: &Session, object: ObjectHandle, kind: AttributeType) -> Option<Vec<u8>> {
    match one(session, object, kind)? {
        Attribute::Id(v) | Attribute::Label(v) | Attribute::CheckValue(v) => Some(v),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything an auditor needs of one object, attribute by attribute.
pub(crate) fn report(session: &Session, object: ObjectHandle) -> ObjectReport {
    use AttributeType as A;
    let b = |kind| one_bool(session, object, kind);
    ObjectReport {
        class: match one(session, object, A::Class) {
            Some(Attribute::Class(c)) => Some(c.to_string()),
            _ => None,
        },
        key_type: match one(session, object, A::KeyType) {
            Some(Attribute::KeyType(k)) => Some(k.to_string()),
            _ => None,
        },
        label: one_bytes(session, object, A::Label)
            .map(|l| String::from_utf8_lossy(&l).into_owned()),
        id: one_bytes(session, object, A::Id).map(|v| hex(&v)),
        token: b(A::Token),
        private: b(A::Private),
        sensitive: b(A::Sensitive),
        extractable: b(A::Extractable),
        always_sensitive: b(A::AlwaysSensitive),
        never_extractable: b(A::NeverExtractable),
        local: b(A::Local),
        trusted: b(A::Trusted),
        wrap_with_trusted: b(A::WrapWithTrusted),
        modifiable: b(A::Modifiable),
        destroyable: b(A::Destroyable),
        copyable: b(A::Copyable),
        encrypt: b(A::Encrypt),
        decrypt: b(A::Decrypt),
        wrap: b(A::Wrap),
        unwrap: b(A::Unwrap),
        sign: b(A::Sign),
        verify: b(A::Verify),
        derive: b(A::Derive),
        // Only a key generated in the token has one; SoftHSM2 answers CK_UNAVAILABLE_INFORMATION
        // in the value for an imported key, which cryptoki cannot decode.
        key_gen_mechanism: match b(A::Local) {
            Some(true) => match one(session, object, A::KeyGenMechanism) {
                Some(Attribute::KeyGenMechanism(m)) => Some(m.to_string()),
                _ => None,
            },
            _ => None,
        },
        allowed_mechanisms: match one(session, object, A::AllowedMechanisms) {
            Some(Attribute::AllowedMechanisms(m)) => {
                Some(m.iter().map(ToString::to_string).collect())
            }
            _ => None,
        },
        check_value: one_bytes(session, object, A::CheckValue).map(|v| hex(&v)),
        value_len: match one(session, object, A::ValueLen) {
            Some(Attribute::ValueLen(v)) => Some(u64::from(v)),
            _ => None,
        },
    }
}

/// The one secret key with `id`; none, or more than one (a planted object), is an error.
pub(crate) fn find_by_id(session: &Session, id: &ObjectId) -> Result<ObjectHandle> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Id(id.0.to_vec()),
    ])?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::ObjectMissing { id: id.to_hex() }),
        _ => Err(Error::ObjectAmbiguous {
            what: format!("CKA_ID {id}"),
        }),
    }
}

fn check_value_of(session: &Session, object: ObjectHandle) -> Result<CheckValue> {
    let raw = one_bytes(session, object, AttributeType::CheckValue).ok_or(Error::Escrow {
        what: "the token reports no CKA_CHECK_VALUE for the key",
    })?;
    <[u8; CHECK_VALUE_LEN]>::try_from(raw.as_slice())
        .map(CheckValue)
        .map_err(|_| Error::Escrow {
            what: "CKA_CHECK_VALUE is not 3 bytes",
        })
}

/// The escrow key `pin` names, checked: exactly one object with its id, trusted, wrap-only,
/// fixed, with the pinned label and check value.
pub(crate) fn pinned_escrow_key(session: &Session, pin: &EscrowPin) -> Result<ObjectHandle> {
    use AttributeType as A;
    let handle = find_by_id(session, &pin.id)?;
    let expect = |kind, want: bool, what: &'static str| -> Result<()> {
        if one_bool(session, handle, kind) == Some(want) {
            Ok(())
        } else {
            Err(Error::Escrow { what })
        }
    };
    expect(A::Trusted, true, "the pinned escrow key is not CKA_TRUSTED")?;
    expect(A::Wrap, true, "the pinned escrow key cannot wrap")?;
    for (kind, what) in [
        (A::Unwrap, "the pinned escrow key can unwrap"),
        (A::Encrypt, "the pinned escrow key can encrypt"),
        (A::Decrypt, "the pinned escrow key can decrypt"),
        (A::Sign, "the pinned escrow key can sign"),
        (A::Verify, "the pinned escrow key can verify"),
        (A::Derive, "the pinned escrow key can derive"),
        (A::Modifiable, "the pinned escrow key is modifiable"),
        (A::Destroyable, "the pinned escrow key is destroyable"),
        (A::Extractable, "the pinned escrow key is extractable"),
    ] {
        expect(kind, false, what)?;
    }
    match one(session, handle, A::AllowedMechanisms) {
        Some(Attribute::AllowedMechanisms(m)) if m == [MechanismType::AES_KEY_WRAP_PAD] => {}
        _ => {
            return Err(Error::Escrow {
                what: "the pinned escrow key allows other mechanisms than CKM_AES_KEY_WRAP_PAD",
            })
        }
    }
    if one_bytes(session, handle, A::Label).as_deref() != Some(pin.label.as_bytes()) {
        return Err(Error::Escrow {
            what: "the pinned escrow key has another label",
        });
    }
    if check_value_of(session, handle)? != pin.check_value {
        return Err(Error::Escrow {
            what: "the key with the pinned CKA_ID has another check value",
        });
    }
    Ok(handle)
}

/// What an escrowed version key must show once locked, read back in one call; returns its
/// check value.
fn check_locked(session: &Session, key: ObjectHandle, id: &ObjectId) -> Result<CheckValue> {
    use AttributeType as A;
    let wants = [
        (A::Token, true),
        (A::Private, true),
        (A::Sensitive, true),
        (A::AlwaysSensitive, true),
        (A::Local, true),
        (A::Extractable, false),
        (A::WrapWithTrusted, true),
        (A::Encrypt, true),
        (A::Decrypt, true),
        (A::Wrap, false),
        (A::Unwrap, false),
        (A::Sign, false),
        (A::Verify, false),
        (A::Derive, false),
    ];
    let mut kinds: Vec<AttributeType> = wants.iter().map(|(k, _)| *k).collect();
    kinds.extend([A::Id, A::CheckValue]);
    let read = session.get_attributes(key, &kinds)?;
    let wrong = || Error::Escrow {
        what: "the escrowed key's attributes read back differently from its template",
    };
    for (kind, want) in wants {
        let got = read
            .iter()
            .find(|a| a.attribute_type() == kind)
            .and_then(as_bool);
        if got != Some(want) {
            tracing::error!(attribute = ?kind, want, "escrowed key read back wrong");
            return Err(wrong());
        }
    }
    let mut id_ok = false;
    let mut check_value = None;
    for attribute in read {
        match attribute {
            Attribute::Id(v) => id_ok = v == id.0,
            Attribute::CheckValue(v) => {
                check_value = <[u8; CHECK_VALUE_LEN]>::try_from(v.as_slice())
                    .ok()
                    .map(CheckValue);
            }
            _ => {}
        }
    }
    match (id_ok, check_value) {
        (true, Some(cv)) => Ok(cv),
        _ => Err(wrong()),
    }
}

/// Generates, wraps, locks and checks a version key in one session, under `escrow`, the
/// handle of the pinned escrow key (see [`pinned_escrow_key`]). Any failure after the generate
/// destroys the object.
pub(crate) fn generate_escrowed(
    session: &Session,
    label: &str,
    id: &ObjectId,
    escrow: ObjectHandle,
) -> Result<EscrowedKey> {
    // No search for an object with `id` first: ids are 16 random bytes, and a search costs a
    // pass over every object on the token (measured: 2 ms at 200 keys on SoftHSM2). A clash
    // would make the later lookup by id refuse both, not pick one.
    let template = aes_key_template(label, id, true);
    let key = session.generate_key(&Mechanism::AesKeyGen, &template)?;
    let steps = || -> Result<EscrowedKey> {
        let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, escrow, key)?;
        session.update_attributes(key, &[Attribute::Extractable(false)])?;
        let check_value = check_locked(session, key, id)?;
        Ok(EscrowedKey {
            key: TokenKey(key),
            id: *id,
            check_value,
            wrapped,
        })
    };
    match steps() {
        Ok(done) => Ok(done),
        Err(e) => {
            if let Err(destroy) = session.destroy_object(key) {
                tracing::error!(error = %destroy, %id, "could not destroy a key whose escrow failed");
            }
            Err(e)
        }
    }
}

/// The token self-test: a key marked `CKA_WRAP_WITH_TRUSTED` must not wrap under an untrusted
/// key, and the user must not be able to make a key trusted. Session objects only; each is
/// destroyed.
pub(crate) fn self_test(session: &Session) -> Result<()> {
    let session_key = |extra: Vec<Attribute>| {
        let mut t = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Sensitive(true),
        ];
        t.extend(extra);
        session.generate_key(&Mechanism::AesKeyGen, &t)
    };
    let wrapping = session_key(vec![Attribute::Wrap(true), Attribute::Extractable(false)])?;
    let guarded = match session_key(vec![
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
    ]) {
        Ok(k) => k,
        Err(e) => {
            let _ = session.destroy_object(wrapping);
            return Err(e.into());
        }
    };
    let wrap = session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, guarded);
    let _ = session.destroy_object(guarded);
    let _ = session.destroy_object(wrapping);
    match wrap {
        Err(cryptoki::error::Error::Pkcs11(RvError::KeyNotWrappable, _)) => {}
        Ok(mut bytes) => {
            bytes.zeroize();
            return Err(Error::SelfTest {
                what: "the token wrapped a CKA_WRAP_WITH_TRUSTED key under an untrusted key",
            });
        }
        Err(e) => {
            tracing::error!(error = %e, "wrap of a CKA_WRAP_WITH_TRUSTED key under an untrusted key");
            return Err(Error::SelfTest {
                what: "wrapping a CKA_WRAP_WITH_TRUSTED key under an untrusted key failed without CKR_KEY_NOT_WRAPPABLE",
            });
        }
    }
    match session_key(vec![
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Extractable(false),
    ]) {
        Ok(k) => {
            let _ = session.destroy_object(k);
            Err(Error::SelfTest {
                what: "a user session could create a CKA_TRUSTED key",
            })
        }
        Err(_) => Ok(()),
    }
}

/// Imports the trusted escrow key as the token's Security Officer, reads it back and checks
/// it against `pin`. For the init ceremony only, in a process that has not logged in to the
/// token as the user (PKCS#11 keeps one login state per application, and logging the user out
/// would invalidate the handles of private objects): run it before [`crate::Pkcs11Hsm::open`].
///
/// The key is `CKA_DESTROYABLE=false`: this step cannot be undone. The PIN is never part of an
/// error.
pub fn import_trusted_escrow_key(
    module: &Path,
    token_label: &str,
    so_pin: &SecretString,
    pin: &EscrowPin,
    value: &SecretBox<[u8; 32]>,
) -> Result<()> {
    let ctx = crate::slot::load_module(module)?;
    let slot = crate::slot::find_slot(&ctx, token_label, module)?;
    let session = ctx.open_rw_session(slot)?;
    match session.login(UserType::So, Some(so_pin)) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(rv, _)) => {
            return Err(Error::Login {
                label: format!("{token_label} (security officer)"),
                rv,
            })
        }
        Err(other) => return Err(Error::Cryptoki(other)),
    }
    let result = (|| {
        if !session
            .find_objects(&[Attribute::Id(pin.id.0.to_vec())])?
            .is_empty()
        {
            return Err(Error::ObjectAmbiguous {
                what: format!("CKA_ID {} is already on the token", pin.id),
            });
        }
        let mut template = escrow_key_template(&pin.label, &pin.id, value.expose_secret());
        let created = session.create_object(&template);
        for attribute in &mut template {
            if let Attribute::Value(v) = attribute {
                v.zeroize();
            }
        }
        created?;
        pinned_escrow_key(&session, pin).map(|_| ())
    })();
    let _ = session.logout();
    result
}

/// AES-256 key length in bytes.
const AES_256_LEN: u64 = 32;

/// An AES-256 token key that only encrypts and decrypts. Every usage flag is set, so no token
/// default decides one. A fixed key never leaves the HSM and cannot be changed; an escrowed one
/// can be wrapped only under a trusted key, and stays modifiable so that it can be locked
/// non-extractable once it has been (see `docs/CUSTODY.md`).
pub(crate) fn aes_key_template(label: &str, id: &ObjectId, escrowed: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(AES_256_LEN.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(escrowed),
        Attribute::WrapWithTrusted(escrowed),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Modifiable(escrowed),
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
        Attribute::Id(id.0.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

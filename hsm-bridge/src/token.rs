//! The PKCS#11 implementation of [`crate::Hsm`] on `cryptoki`.

use std::fmt;
use std::path::PathBuf;

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use parking_lot::Mutex;
use secrecy::{SecretBox, SecretSlice};
use zeroize::Zeroize;

use crate::config::HsmConfig;
use crate::error::{rv_is_device_fault, Error, Result};
use crate::escrow::{
    self, aes_key_template, report, CheckValue, EscrowPin, EscrowedKey, ObjectId, ObjectReport,
};
use crate::pool::SessionPool;
use crate::slot::{find_slot, load_module};
use crate::{
    Hsm, HsmEvent, HsmObserver, IdentifiedKey, KeyAttributes, SigningKey, TokenKey,
    ECDSA_P256_SIG_LEN, GCM_NONCE_LEN, GCM_TAG_LEN, P256_POINT_LEN,
};

/// GCM tag length in bits, as PKCS#11 wants it.
const GCM_TAG_BITS: u64 = 128;
/// DER of the named curve P-256 (OID 1.2.840.10045.3.1.7), as `CKA_EC_PARAMS` wants it.
const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A logged-in PKCS#11 token holding the root wrapping key.
pub struct Pkcs11Hsm {
    ctx: Pkcs11,
    slot: Slot,
    pub(crate) pool: SessionPool,
    root: TokenKey,
    /// Keeps the login alive: PKCS#11 logs the application out when its last session closes.
    _login: Mutex<Session>,
    module: PathBuf,
    label: String,
    observer: std::sync::OnceLock<HsmObserver>,
    pub(crate) retries: std::sync::atomic::AtomicU64,
    /// The pinned escrow key, once checked: it can be neither changed nor destroyed, so its
    /// handle stays good for the life of the login.
    escrow_key: Mutex<Option<(EscrowPin, ObjectHandle)>>,
}

impl Pkcs11Hsm {
    /// Loads the module, finds the token by label, logs in once, and finds or creates the
    /// root wrapping key.
    pub fn open(config: &HsmConfig) -> Result<Self> {
        let module = config.module.clone();
        let ctx = load_module(&module)?;
        let slot = find_slot(&ctx, &config.token_label, &module)?;
        let login = ctx.open_rw_session(slot)?;
        match login.login(UserType::User, Some(&config.user_pin)) {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(cryptoki::error::Error::Pkcs11(rv, _)) => {
                return Err(Error::Login {
                    label: config.token_label.clone(),
                    rv,
                })
            }
            Err(other) => return Err(Error::Cryptoki(other)),
        }
        let root_id = root_key_id(&config.root_key_label);
        let root = match find_key(&login, &config.root_key_label)? {
            Some(handle) => TokenKey(handle),
            None => {
                tracing::info!(label = %config.root_key_label, "creating root wrapping key in the token");
                TokenKey(login.generate_key(
                    &Mechanism::AesKeyGen,
                    &aes_key_template(&config.root_key_label, &root_id, false),
                )?)
            }
        };
        Ok(Self {
            ctx,
            slot,
            pool: SessionPool::new(config.max_sessions),
            root,
            _login: Mutex::new(login),
            module,
            label: config.token_label.clone(),
            observer: std::sync::OnceLock::new(),
            retries: std::sync::atomic::AtomicU64::new(0),
            escrow_key: Mutex::new(None),
        })
    }

    /// Logs a retry and tells the observer, if one is set.
    fn retrying(&self, e: &Error) {
        tracing::warn!(error = %e, token = %self.label, "hsm session lost; retrying once");
        self.retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(observer) = self.observer.get() {
            observer(&HsmEvent::Retry {
                error: e.to_string(),
            });
        }
    }

    /// Sets the function told about session losses and device errors (for the audit log).
    /// Only the first call has an effect.
    pub fn set_observer(&self, observer: HsmObserver) {
        let _ = self.observer.set(observer);
    }

    /// Runs `op` on a pooled session; a session-loss or device error drops the session (and
    /// drains the pool for a device error) and retries once on a fresh session.
    fn run<T>(&self, op: impl Fn(&Session) -> cryptoki::error::Result<T>) -> Result<T> {
        match self.run_once(&op) {
            Err(e) if e.is_retryable() => {
                self.retrying(&e);
                self.run_once(&op)
            }
            other => other,
        }
    }

    /// Runs `op` once on a pooled session, never retried: for steps such as a generate that
    /// must not run twice. A failed session is closed.
    pub(crate) fn run_one<T>(&self, op: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        let mut guard = self.pool.take(&self.ctx, self.slot)?;
        let session = guard
            .session()
            .ok_or(Error::Internal("pool guard without session"))?;
        let result = op(session);
        if let Err(Error::Pkcs11 { rv, .. }) = &result {
            guard.discard();
            if rv_is_device_fault(*rv) {
                self.pool.drain();
            }
        }
        result
    }

    /// [`Pkcs11Hsm::run_one`], retried once on a fresh session after a session loss or device
    /// error: for lookups, which are safe to repeat.
    fn run_lookup<T>(&self, op: impl Fn(&Session) -> Result<T>) -> Result<T> {
        match self.run_one(&op) {
            Err(e) if e.is_retryable() => {
                self.retrying(&e);
                self.run_one(&op)
            }
            other => other,
        }
    }

    fn run_once<T>(&self, op: &impl Fn(&Session) -> cryptoki::error::Result<T>) -> Result<T> {
        let mut guard = self.pool.take(&self.ctx, self.slot)?;
        let session = guard
            .session()
            .ok_or(Error::Internal("pool guard without session"))?;
        match op(session) {
            Ok(v) => Ok(v),
            Err(e) => {
                guard.discard();
                let e = Error::from(e);
                if let Error::Pkcs11 { rv, .. } = &e {
                    if rv_is_device_fault(*rv) {
                        self.pool.drain();
                    }
                }
                Err(e)
            }
        }
    }
}

impl Hsm for Pkcs11Hsm {
    fn describe(&self) -> Result<(TokenFacts, std::path::PathBuf)> {
        Ok((self.token_info()?, self.module.clone()))
    }

    fn random(&self, out: &mut [u8]) -> Result<()> {
        // The session writes into a private buffer so a retried call never leaves half output.
        let mut bytes =
            self.run(|s| s.generate_random_vec(u32::try_from(out.len()).unwrap_or(u32::MAX)))?;
        if bytes.len() != out.len() {
            bytes.zeroize();
            return Err(Error::Internal(
                "token returned the wrong number of random bytes",
            ));
        }
        out.copy_from_slice(&bytes);
        bytes.zeroize();
        Ok(())
    }

    fn root_key(&self) -> TokenKey {
        self.root
    }

    fn generate_aes_key(&self, label: &str, id: &ObjectId) -> Result<TokenKey> {
        if label.is_empty() {
            return Err(Error::InvalidArgument {
                what: "empty key label",
            });
        }
        let template = aes_key_template(label, id, false);
        self.run_one(|s| Ok(s.generate_key(&Mechanism::AesKeyGen, &template)?))
            .map(TokenKey)
    }

    fn generate_escrowed_key(
        &self,
        label: &str,
        id: &ObjectId,
        escrow: &EscrowPin,
    ) -> Result<EscrowedKey> {
        if label.is_empty() {
            return Err(Error::InvalidArgument {
                what: "empty key label",
            });
        }
        let cached = self
            .escrow_key
            .lock()
            .as_ref()
            .filter(|(pin, _)| pin == escrow)
            .map(|(_, handle)| *handle);
        self.run_one(|s| {
            let handle = match cached {
                Some(handle) => handle,
                None => {
                    let handle = escrow::pinned_escrow_key(s, escrow)?;
                    *self.escrow_key.lock() = Some((escrow.clone(), handle));
                    handle
                }
            };
            escrow::generate_escrowed(s, label, id, handle)
        })
    }

    fn find_key_by_id(&self, id: &ObjectId, check_value: &CheckValue) -> Result<TokenKey> {
        let op = |s: &Session| -> Result<ObjectHandle> {
            let handle = escrow::find_by_id(s, id)?;
            let (_, cv, widened) = identity_of(s, handle)?;
            if cv.as_ref() != Some(check_value) {
                return Err(Error::ObjectAmbiguous {
                    what: format!("the key with CKA_ID {id} has another check value"),
                });
            }
            if widened {
                return Err(Error::KeyWidened { id: id.to_hex() });
            }
            Ok(handle)
        };
        self.run_lookup(op).map(TokenKey)
    }

    fn aes_keys_by_id(&self) -> Result<Vec<IdentifiedKey>> {
        self.run_lookup(|s: &Session| {
            let objects = s.find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
            ])?;
            let mut out = Vec::with_capacity(objects.len());
            for object in objects {
                if let (Some(id), Some(check_value), widened) = identity_of(s, object)? {
                    out.push(IdentifiedKey {
                        id,
                        check_value,
                        key: TokenKey(object),
                        widened,
                    });
                }
            }
            Ok(out)
        })
    }

    fn destroy_key(&self, key: TokenKey) -> Result<()> {
        self.run_one(|s| Ok(s.destroy_object(key.0)?))
    }

    fn escrow_self_test(&self, escrow: Option<&EscrowPin>) -> Result<()> {
        self.run_one(|s| {
            escrow::self_test(s)?;
            if let Some(pin) = escrow {
                let handle = escrow::pinned_escrow_key(s, pin)?;
                *self.escrow_key.lock() = Some((pin.clone(), handle));
            }
            Ok(())
        })
    }

    fn find_aes_key(&self, label: &str) -> Result<TokenKey> {
        self.run_lookup(|s: &Session| find_key(s, label))?
            .map(TokenKey)
            .ok_or_else(|| Error::KeyNotFound {
                label: label.to_owned(),
            })
    }

    fn aes_gcm_encrypt(
        &self,
        key: TokenKey,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        self.run(|s| {
            let mut iv = *nonce;
            let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into())?;
            s.encrypt(&Mechanism::AesGcm(params), key.0, plaintext)
        })
    }

    fn aes_gcm_decrypt(
        &self,
        key: TokenKey,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<SecretSlice<u8>> {
        if ciphertext.len() < GCM_TAG_LEN {
            return Err(Error::DecryptFailed);
        }
        let op = |s: &Session| {
            let mut iv = *nonce;
            let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into())?;
            s.decrypt(&Mechanism::AesGcm(params), key.0, ciphertext)
        };
        let result = match self.run_once(&op) {
            Err(e) if e.is_retryable() && !is_bad_ciphertext(&e) => {
                self.retrying(&e);
                self.run_once(&op)
            }
            other => other,
        };
        match result {
            Ok(plain) => Ok(into_secret(plain)),
            Err(e) if is_bad_ciphertext(&e) => Err(Error::DecryptFailed),
            Err(e) => Err(e),
        }
    }

    fn key_attributes(&self, key: TokenKey) -> Result<KeyAttributes> {
        let types = [
            AttributeType::Token,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::NeverExtractable,
            AttributeType::ValueLen,
        ];
        let attrs = self.run(|s| s.get_attributes(key.0, &types))?;
        let mut out = KeyAttributes::default();
        for attr in attrs {
            match attr {
                Attribute::Token(v) => out.token = v,
                Attribute::Sensitive(v) => out.sensitive = v,
                Attribute::Extractable(v) => out.extractable = v,
                Attribute::NeverExtractable(v) => out.never_extractable = v,
                Attribute::ValueLen(v) => out.value_len = u64::from(v),
                _ => {}
            }
        }
        Ok(out)
    }

    fn p256_signing_key(&self, label: &str) -> Result<SigningKey> {
        if label.is_empty() {
            return Err(Error::InvalidArgument {
                what: "empty key label",
            });
        }
        let found = self.run_one(|s| {
            let private = find_object(s, ObjectClass::PRIVATE_KEY, KeyType::EC, label)?;
            let public = find_object(s, ObjectClass::PUBLIC_KEY, KeyType::EC, label)?;
            Ok(private.zip(public))
        })?;
        let (private, public) = match found {
            Some(pair) => pair,
            None => {
                tracing::info!(%label, "creating ECDSA P-256 signing key in the token");
                let (public_template, private_template) = p256_templates(label);
                let (public, private) = self.run(|s| {
                    s.generate_key_pair(
                        &Mechanism::EccKeyPairGen,
                        &public_template,
                        &private_template,
                    )
                })?;
                (private, public)
            }
        };
        let attrs = self.run(|s| s.get_attributes(public, &[AttributeType::EcPoint]))?;
        let point = attrs
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .ok_or(Error::Internal("public key without CKA_EC_POINT"))?;
        Ok(SigningKey {
            private,
            public_point: uncompressed_point(&point)?,
        })
    }

    fn ecdsa_sign_digest(&self, key: &SigningKey, digest: &[u8; 32]) -> Result<Vec<u8>> {
        let signature = self.run(|s| s.sign(&Mechanism::Ecdsa, key.private, digest))?;
        if signature.len() != ECDSA_P256_SIG_LEN {
            return Err(Error::Internal("ECDSA signature is not 64 bytes"));
        }
        Ok(signature)
    }
}

impl Pkcs11Hsm {
    /// The module this token was loaded from.
    pub fn module(&self) -> &std::path::Path {
        &self.module
    }

    /// Imports an AES-256 key value as a token object of the logged-in user: sensitive,
    /// non-extractable, encrypt and decrypt only, labelled `label` with `CKA_ID` `id` (the
    /// recovery ceremony restores `hsm` key versions from their escrow copies this way). The
    /// token shows it as imported: neither `CKA_LOCAL` nor `CKA_ALWAYS_SENSITIVE`. Returns the
    /// object and the check value the token computed for it.
    pub fn import_aes_key(
        &self,
        label: &str,
        id: &ObjectId,
        value: &SecretBox<[u8; 32]>,
    ) -> Result<(TokenKey, CheckValue)> {
        use secrecy::ExposeSecret;
        if label.is_empty() {
            return Err(Error::InvalidArgument {
                what: "empty key label",
            });
        }
        self.run_one(|s| {
            let mut template: Vec<Attribute> = aes_key_template(label, id, false)
                .into_iter()
                .filter(|a| !matches!(a, Attribute::ValueLen(_)))
                .collect();
            template.push(Attribute::Value(value.expose_secret().to_vec()));
            let created = s.create_object(&template);
            for attribute in &mut template {
                if let Attribute::Value(v) = attribute {
                    v.zeroize();
                }
            }
            let handle = created?;
            let check_value = s
                .get_attributes(handle, &[AttributeType::CheckValue])?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::CheckValue(v) => {
                        <[u8; crate::CHECK_VALUE_LEN]>::try_from(v.as_slice()).ok()
                    }
                    _ => None,
                });
            match check_value {
                Some(cv) => Ok((TokenKey(handle), CheckValue(cv))),
                None => {
                    let _ = s.destroy_object(handle);
                    Err(Error::Internal(
                        "the token gave an imported key no check value",
                    ))
                }
            }
        })
    }

    /// The token's label.
    pub fn token_label(&self) -> &str {
        &self.label
    }

    /// What `C_GetTokenInfo` says of the token: label, manufacturer, model, serial number
    /// (trimmed of PKCS#11's space padding), for ceremony transcripts.
    pub fn token_info(&self) -> Result<TokenFacts> {
        let info = self.ctx.get_token_info(self.slot)?;
        Ok(TokenFacts {
            label: info.label().trim().to_owned(),
            manufacturer: info.manufacturer_id().trim().to_owned(),
            model: info.model().trim().to_owned(),
            serial: info.serial_number().trim().to_owned(),
        })
    }
}

/// A token's identity as `C_GetTokenInfo` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenFacts {
    /// Label.
    pub label: String,
    /// Manufacturer id.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Serial number.
    pub serial: String,
}

impl fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("module", &self.module)
            .field("token", &self.label)
            .finish_non_exhaustive()
    }
}

/// A decryption refused because of its input: SoftHSM2 reports a bad GCM tag as
/// `CKR_GENERAL_ERROR`, other tokens as `CKR_ENCRYPTED_DATA_INVALID`. Neither says anything
/// about the device, so neither is retried.
fn is_bad_ciphertext(e: &Error) -> bool {
    matches!(
        e,
        Error::Pkcs11 {
            func: Function::Decrypt,
            rv: RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::GeneralError,
        }
    )
}

fn find_key(session: &Session, label: &str) -> Result<Option<ObjectHandle>> {
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let found = session.find_objects(&template)?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(Error::ObjectAmbiguous {
            what: format!("more than one AES key is labelled {label:?}"),
        }),
    }
}

fn find_object(
    session: &Session,
    class: ObjectClass,
    key_type: KeyType,
    label: &str,
) -> Result<Option<ObjectHandle>> {
    let template = [
        Attribute::Class(class),
        Attribute::KeyType(key_type),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    match session.find_objects(&template)?.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(Error::ObjectAmbiguous {
            what: format!("more than one {class} is labelled {label:?}"),
        }),
    }
}

/// Templates for a P-256 key pair: (public, private). The private key signs and does nothing
/// else, and never leaves the token.
fn p256_templates(label: &str) -> (Vec<Attribute>, Vec<Attribute>) {
    let id = root_key_id(label).0.to_vec();
    let public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
        Attribute::EcParams(P256_EC_PARAMS.to_vec()),
        Attribute::Id(id.clone()),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Id(id),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    (public, private)
}

/// `CKA_EC_POINT` is a DER OCTET STRING around the SEC1 point (PKCS#11 v2.40 §2.3.3); some
/// tokens return the bare point. Accepts both, for an uncompressed P-256 point only.
fn uncompressed_point(raw: &[u8]) -> Result<[u8; P256_POINT_LEN]> {
    let bare = match raw {
        [0x04, 0x41, rest @ ..] if rest.len() == P256_POINT_LEN => rest,
        _ => raw,
    };
    match <[u8; P256_POINT_LEN]>::try_from(bare) {
        Ok(point) if point.first() == Some(&0x04) => Ok(point),
        _ => Err(Error::Internal(
            "CKA_EC_POINT is not an uncompressed P-256 point",
        )),
    }
}

/// The root key's `CKA_ID`: its label's bytes, so that it is found the same way on every
/// token (at most 16 bytes; a longer label is cut).
fn root_key_id(label: &str) -> ObjectId {
    let mut id = [0u8; crate::escrow::OBJECT_ID_LEN];
    for (slot, byte) in id.iter_mut().zip(label.bytes()) {
        *slot = byte;
    }
    ObjectId(id)
}

/// Moves plaintext into a secret box of exactly its length and wipes the source buffer.
fn into_secret(mut plain: Vec<u8>) -> SecretSlice<u8> {
    let boxed: Box<[u8]> = plain.as_slice().into();
    plain.zeroize();
    SecretBox::new(boxed)
}

/// How many objects the user of token `label` can see (`C_FindObjects` with no template),
/// logged in for the count and logged out after. The recovery ceremony refuses a token that
/// is not empty; run it before [`Pkcs11Hsm::open`] in the same process.
pub fn token_objects(
    module: &std::path::Path,
    label: &str,
    user_pin: &secrecy::SecretString,
) -> Result<usize> {
    let ctx = load_module(module)?;
    let slot = find_slot(&ctx, label, module)?;
    let session = ctx.open_ro_session(slot)?;
    match session.login(UserType::User, Some(user_pin)) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(cryptoki::error::Error::Pkcs11(rv, _)) => {
            return Err(Error::Login {
                label: label.to_owned(),
                rv,
            })
        }
        Err(other) => return Err(Error::Cryptoki(other)),
    }
    let found = session.find_objects(&[]).map(|o| o.len());
    let _ = session.logout();
    Ok(found?)
}

impl Pkcs11Hsm {
    /// Every object the logged-in user can see, attribute by attribute.
    pub fn inspect(&self) -> Result<Vec<ObjectReport>> {
        self.run_one(|session| {
            let objects = session.find_objects(&[])?;
            Ok(objects.into_iter().map(|o| report(session, o)).collect())
        })
    }
}

/// A key's `CKA_ID` (16 bytes) and check value when it has them, and whether it can wrap,
/// unwrap or derive, read in one call.
fn identity_of(
    s: &Session,
    object: ObjectHandle,
) -> Result<(Option<ObjectId>, Option<CheckValue>, bool)> {
    let (mut id, mut cv, mut widened) = (None, None, false);
    let kinds = [
        AttributeType::Id,
        AttributeType::CheckValue,
        AttributeType::Wrap,
        AttributeType::Unwrap,
        AttributeType::Derive,
    ];
    for a in s.get_attributes(object, &kinds)? {
        match a {
            Attribute::Id(v) => {
                id = <[u8; crate::OBJECT_ID_LEN]>::try_from(v.as_slice())
                    .ok()
                    .map(ObjectId)
            }
            Attribute::CheckValue(v) => {
                cv = <[u8; crate::CHECK_VALUE_LEN]>::try_from(v.as_slice())
                    .ok()
                    .map(CheckValue)
            }
            Attribute::Wrap(true) | Attribute::Unwrap(true) | Attribute::Derive(true) => {
                widened = true
            }
            _ => {}
        }
    }
    Ok((id, cv, widened))
}

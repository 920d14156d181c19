//! Key destruction on a real SoftHSM2 token and RocksDB store (docs/APPROVALS.md): the
//! waiting period refuses every operation while leaving the material; on the date every
//! version's material goes (store rows and their escrow copies, token objects, even from the
//! store's files); the receipt verifies under the audit signer's public key and fails after
//! any one-byte change; a destruction a stop interrupted is finished at the next start.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hsm_bridge::test_support::TestToken;
use hsm_bridge::{Hsm, Pkcs11Hsm};
use kms_core::audit::SIGNING_KEY_LABEL;
use kms_core::receipt::{verify, ReceiptError};
use kms_core::store::{Store, Table};
use kms_core::{
    AccessRequest, AuthMethod, Authorizer, Caller, Clock, Deps, DestructionAuthority,
    EncryptionContext, Error, ErrorClass, KeyId, KeyRef, KeyState, Kms, Labels, NewKey, Protection,
    RocksStore, StoredMaterial, SystemRng, Verdict, VersionRecord,
};

const T0: u64 = 1_800_000_000;
const DAY: u64 = 86_400;
const MIN_DAYS: u32 = 7;

/// A clock the test moves.
struct TestClock(AtomicU64);
impl Clock for TestClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

const INTRUDER: &str = "spiffe://test.example/intruder";

/// Allows every caller but the intruder.
struct AllButIntruder;
impl Authorizer for AllButIntruder {
    fn decide(&self, request: &AccessRequest<'_>) -> Verdict {
        if request.caller.id.to_string() == INTRUDER {
            Verdict::deny(Vec::new())
        } else {
            Verdict::allow(vec!["test".into()])
        }
    }
}

fn caller(id: &str) -> Caller {
    Caller::new(id.parse().unwrap(), AuthMethod::Mtls)
}

fn owner() -> Caller {
    caller("spiffe://test.example/owner")
}

struct Deployment {
    _token: TestToken,
    hsm: Arc<Pkcs11Hsm>,
    dir: tempfile::TempDir,
    store: Arc<RocksStore>,
    clock: Arc<TestClock>,
}

impl Deployment {
    /// A fresh token and store, custody initialised (so `hsm` keys can be made).
    fn new() -> Self {
        let (token, hsm, dir, store) = common::deployment_with_custody();
        Self {
            _token: token,
            hsm,
            dir,
            store,
            clock: Arc::new(TestClock(AtomicU64::new(T0))),
        }
    }

    fn kms(&self) -> Kms {
        Kms::open(Deps {
            hsm: self.hsm.clone(),
            store: self.store.clone(),
            clock: self.clock.clone(),
            rng: Arc::new(SystemRng::new()),
            authorizer: Arc::new(AllButIntruder),
        })
        .unwrap()
    }

    fn advance(&self, secs: u64) {
        self.clock.0.fetch_add(secs, Ordering::SeqCst);
    }

    fn now(&self) -> u64 {
        self.clock.0.load(Ordering::SeqCst)
    }

    /// The audit signer's public point, as `kms audit public-key` prints it.
    fn signer(&self) -> Vec<u8> {
        self.hsm
            .p256_signing_key(SIGNING_KEY_LABEL)
            .unwrap()
            .public_point()
            .to_vec()
    }

    fn rows_of(&self, id: KeyId) -> Vec<VersionRecord> {
        self.raw_rows_of(id).into_iter().map(|(_, v)| v).collect()
    }

    /// Each version row of `id`: its stored bytes and its record.
    fn raw_rows_of(&self, id: KeyId) -> Vec<(Vec<u8>, VersionRecord)> {
        self.store
            .scan(Table::Versions)
            .unwrap()
            .into_iter()
            .map(|r| {
                let v = serde_json::from_slice::<VersionRecord>(&r.value).unwrap();
                (r.value, v)
            })
            .filter(|(_, v)| v.key_id == id)
            .collect()
    }

    fn token_labels(&self) -> Vec<String> {
        self.hsm
            .inspect()
            .unwrap()
            .into_iter()
            .filter_map(|o| o.label)
            .collect()
    }
}

fn new_key(kms: &Kms, protection: Protection) -> KeyId {
    kms.create_key(NewKey {
        alias: None,
        labels: Labels::default(),
        protection,
    })
    .unwrap()
    .id
}

fn authority() -> DestructionAuthority {
    DestructionAuthority {
        requested_by: "spiffe://operators.example/op1".into(),
        approvers: vec![
            "spiffe://operators.example/op2".into(),
            "spiffe://operators.example/op3".into(),
        ],
        approval_id: Some("ab".repeat(16)),
    }
}

/// Every byte string that is a version's material or a copy of it, as the store writes it:
/// the whole row, the wrapped software material (a JSON array of bytes) and the escrow copy
/// (base64).
fn material_of(rows: &[(Vec<u8>, VersionRecord)]) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for (raw, row) in rows {
        all.push(raw.clone());
        if let StoredMaterial::Software { wrapped } = &row.material {
            all.push(serde_json::to_vec(wrapped).unwrap());
        }
        // `{"sealed": {..., "sealed": "<base64>"}}` or `{"wrapped": {..., "wrapped": ...}}`.
        let escrow = serde_json::to_value(&row.escrow).unwrap();
        for (variant, body) in escrow.as_object().into_iter().flatten() {
            if let Some(text) = body.get(variant).and_then(|v| v.as_str()) {
                all.push(text.as_bytes().to_vec());
            }
        }
    }
    assert!(all.len() > rows.len(), "no escrow or material found");
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn class(r: Result<impl Sized, Error>) -> ErrorClass {
    r.err().expect("refused").class()
}

fn refused_for_state(r: Result<impl Sized, Error>, want: KeyState) {
    match r {
        Err(Error::KeyState { state, .. }) => assert_eq!(state, want),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("not refused"),
    }
}

#[test]
fn destruction_waits_then_removes_every_copy_of_the_material_and_signs_a_receipt() {
    let d = Deployment::new();
    let kms = d.kms();
    let ctx = EncryptionContext::empty();
    let soft = new_key(&kms, Protection::Software);
    kms.rotate_key(&KeyRef::Id(soft)).unwrap();
    let hard = new_key(&kms, Protection::Hsm);
    let soft_blob = kms
        .generate_data_key(&owner(), &KeyRef::Id(soft), &ctx)
        .unwrap()
        .ciphertext;
    let hard_blob = kms
        .generate_data_key(&owner(), &KeyRef::Id(hard), &ctx)
        .unwrap()
        .ciphertext;
    let soft_rows = d.raw_rows_of(soft);
    let hard_rows = d.raw_rows_of(hard);
    assert_eq!(soft_rows.len(), 2);
    let material: Vec<Vec<u8>> = material_of(&soft_rows)
        .into_iter()
        .chain(material_of(&hard_rows))
        .collect();
    let hard_rows: Vec<VersionRecord> = hard_rows.into_iter().map(|(_, v)| v).collect();
    let hard_label = format!("sovereign-kms/kek/{hard}/v1");
    assert!(d.token_labels().contains(&hard_label));

    // The waiting period is bounded.
    for days in [0, MIN_DAYS - 1, kms_core::MAX_DESTROY_WAITING_DAYS + 1] {
        let e = kms
            .check_destruction(&KeyRef::Id(soft), days, MIN_DAYS)
            .unwrap_err();
        assert!(matches!(e, Error::WaitingPeriod { .. }), "{e}");
    }

    // Scheduled: every operation is refused, the allowed caller is told why, an intruder gets
    // the answer an unknown key gets; the material is untouched.
    for id in [soft, hard] {
        kms.schedule_destruction(&KeyRef::Id(id), MIN_DAYS, MIN_DAYS, authority())
            .unwrap();
    }
    let described = kms.describe_key(&KeyRef::Id(soft)).unwrap();
    assert_eq!(described.state, KeyState::PendingDestruction);
    assert_eq!(
        described.destruction.as_ref().unwrap().destroy_at,
        T0 + u64::from(MIN_DAYS) * DAY
    );
    refused_for_state(
        kms.decrypt(&owner(), &soft_blob, &ctx),
        KeyState::PendingDestruction,
    );
    refused_for_state(
        kms.generate_data_key(&owner(), &KeyRef::Id(hard), &ctx),
        KeyState::PendingDestruction,
    );
    let unknown = KeyRef::Id(KeyId::from_random_bytes([9; 16]));
    assert_eq!(
        class(kms.generate_data_key(&caller(INTRUDER), &KeyRef::Id(soft), &ctx)),
        class(kms.generate_data_key(&caller(INTRUDER), &unknown, &ctx)),
    );
    assert_eq!(
        class(kms.decrypt(&caller(INTRUDER), &soft_blob, &ctx)),
        ErrorClass::NotFoundOrDenied
    );
    for e in [
        kms.set_key_state(&KeyRef::Id(soft), KeyState::Enabled)
            .unwrap_err(),
        kms.schedule_destruction(&KeyRef::Id(soft), MIN_DAYS, MIN_DAYS, authority())
            .unwrap_err(),
    ] {
        assert!(matches!(e, Error::KeyLifecycle { .. }), "{e}");
    }
    assert_eq!(d.rows_of(soft).len(), 2);

    // Nothing is due before the date.
    d.advance(u64::from(MIN_DAYS) * DAY - 1);
    assert!(kms.destructions_due(d.now()).is_empty());
    assert!(kms.destroy_if_due(soft, d.now()).unwrap().is_none());
    assert_eq!(d.rows_of(soft).len(), 2);

    // A cancelled destruction leaves the key disabled and usable once enabled.
    let spared = new_key(&kms, Protection::Software);
    kms.schedule_destruction(&KeyRef::Id(spared), MIN_DAYS, MIN_DAYS, authority())
        .unwrap();
    let back = kms.cancel_destruction(&KeyRef::Id(spared)).unwrap();
    assert_eq!(back.state, KeyState::Disabled);
    assert!(back.destruction.is_none());
    assert!(matches!(
        kms.cancel_destruction(&KeyRef::Id(spared)).unwrap_err(),
        Error::KeyLifecycle { .. }
    ));
    kms.set_key_state(&KeyRef::Id(spared), KeyState::Enabled)
        .unwrap();
    kms.generate_data_key(&owner(), &KeyRef::Id(spared), &ctx)
        .unwrap();

    // The date passes.
    d.advance(1);
    let mut due = kms.destructions_due(d.now());
    due.sort();
    let mut want = vec![soft, hard];
    want.sort();
    assert_eq!(due, want);
    let signer = d.signer();
    let soft_receipt = kms.destroy_if_due(soft, d.now()).unwrap().unwrap();
    let hard_receipt = kms.destroy_if_due(hard, d.now()).unwrap().unwrap();

    // The receipts say what went, and verify.
    let s = &soft_receipt.statement;
    assert_eq!(s.key_id, soft.to_string());
    let versions: Vec<u32> = s.versions.iter().map(|v| v.version.get()).collect();
    assert_eq!(versions, [1, 2]);
    assert!(s.versions.iter().all(|v| v.escrowed));
    assert_eq!(s.approvers, authority().approvers);
    assert_eq!(s.destroyed_at, d.now());
    assert!(s.not_covered.iter().any(|n| n.contains("backups")));
    let object = hard_receipt.statement.versions[0]
        .token_object
        .clone()
        .unwrap();
    assert_eq!(object.label, hard_label);
    let StoredMaterial::Hsm { id: cka_id, .. } = &hard_rows[0].material else {
        panic!("hsm version");
    };
    assert_eq!(&object.cka_id, cka_id);
    let text = soft_receipt.to_text().unwrap();
    assert_eq!(verify(text.as_bytes(), &signer).unwrap(), soft_receipt);
    // Any one-byte change fails, whitespace included.
    let bytes = text.as_bytes();
    for at in 0..bytes.len() {
        let mut edited = bytes.to_vec();
        edited[at] = if edited[at] == b' ' {
            b'\t'
        } else {
            edited[at] ^ 1
        };
        assert!(
            verify(&edited, &signer).is_err(),
            "an edit at byte {at} verified"
        );
    }
    // Another key's signature is named as such.
    use aws_lc_rs::signature::KeyPair as _;
    let stranger = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    )
    .unwrap();
    let theirs = verify(text.as_bytes(), stranger.public_key().as_ref());
    assert!(
        matches!(theirs, Err(ReceiptError::OtherSigner { .. })),
        "{theirs:?}"
    );
    for (id, r) in [(soft, &soft_receipt), (hard, &hard_receipt)] {
        kms.record_receipt(id, r.to_text().unwrap()).unwrap();
    }
    assert!(kms.destructions_due(d.now()).is_empty());

    // Destroyed: the allowed caller is told so, an intruder is not; the key stays listed with
    // its history; nothing moves it out of the state.
    refused_for_state(kms.decrypt(&owner(), &soft_blob, &ctx), KeyState::Destroyed);
    refused_for_state(kms.decrypt(&owner(), &hard_blob, &ctx), KeyState::Destroyed);
    assert_eq!(
        class(kms.decrypt(&caller(INTRUDER), &hard_blob, &ctx)),
        ErrorClass::NotFoundOrDenied
    );
    assert!(kms.rotate_key(&KeyRef::Id(soft)).is_err());
    assert!(kms.cancel_destruction(&KeyRef::Id(soft)).is_err());
    assert!(kms
        .set_key_state(&KeyRef::Id(soft), KeyState::Enabled)
        .is_err());

    // No material anywhere: not in the token, not in any table, not in the store's files.
    assert!(
        !d.token_labels()
            .iter()
            .any(|l| l.contains(&hard.to_string())),
        "{:?}",
        d.token_labels()
    );
    for table in Table::ALL {
        for row in d.store.scan(table).unwrap() {
            for m in &material {
                assert!(
                    !contains(&row.value, m) && !contains(&row.key, m),
                    "material left in {}",
                    table.name()
                );
            }
        }
    }
    assert!(d.rows_of(soft).is_empty() && d.rows_of(hard).is_empty());
    // The versions table's files hold the live rows (the spared key's) and no deletion
    // marker: the deleted values were rewritten away, not only hidden. The write-ahead log
    // and every other file hold none of the material either.
    let live = d.store.scan(Table::Versions).unwrap().len() as u64;
    assert_eq!(d.store.file_entries(Table::Versions).unwrap(), (live, 0));
    for entry in walk(d.dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        for m in &material {
            assert!(
                !contains(&bytes, m),
                "material left in the store's file {}",
                entry.display()
            );
        }
    }

    // A restart loads the destroyed keys as they were left.
    drop(kms);
    let kms = d.kms();
    let described = kms.describe_key(&KeyRef::Id(hard)).unwrap();
    assert_eq!(described.state, KeyState::Destroyed);
    assert!(described.destruction.unwrap().receipt.is_some());
    refused_for_state(kms.decrypt(&owner(), &hard_blob, &ctx), KeyState::Destroyed);
    kms.generate_data_key(&owner(), &KeyRef::Id(spared), &ctx)
        .unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_destruction_a_stop_interrupted_is_finished_at_the_next_start() {
    let d = Deployment::new();
    let kms = d.kms();
    let hard = new_key(&kms, Protection::Hsm);
    kms.schedule_destruction(&KeyRef::Id(hard), MIN_DAYS, MIN_DAYS, authority())
        .unwrap();
    d.advance(u64::from(MIN_DAYS) * DAY);
    let rows = d.rows_of(hard);

    // A stop after the commit and the token step, before the rows went: the record says
    // destroyed, the rows are there, the token object is gone.
    let mut record = kms.describe_key(&KeyRef::Id(hard)).unwrap();
    drop(kms);
    record.state = KeyState::Destroyed;
    let destruction = record.destruction.as_mut().unwrap();
    destruction.destroyed_at = Some(d.now());
    destruction.deleted = vec![kms_core::DeletedVersion {
        version: rows[0].version,
        protection: Protection::Hsm,
        token_object: match &rows[0].material {
            StoredMaterial::Hsm { label, id, .. } => Some(kms_core::TokenObject {
                label: label.clone(),
                cka_id: id.clone(),
            }),
            StoredMaterial::Software { .. } => None,
            _ => None,
        },
        escrowed: true,
    }];
    d.store
        .write(vec![kms_core::store::Change::Put {
            table: Table::Keys,
            key: hard.to_bytes().to_vec(),
            value: serde_json::to_vec(&record).unwrap(),
        }])
        .unwrap();
    let label = format!("sovereign-kms/kek/{hard}/v1");
    let handle = d.hsm.find_aes_key(&label).unwrap();
    d.hsm.destroy_key(handle).unwrap();

    // The next start loads (it does not look for the object), and finishes the work.
    let kms = d.kms();
    assert_eq!(kms.destructions_due(d.now()), vec![hard]);
    let receipt = kms.destroy_if_due(hard, d.now()).unwrap().unwrap();
    assert_eq!(
        receipt.statement.versions,
        record.destruction.unwrap().deleted
    );
    assert!(d.rows_of(hard).is_empty());
    verify(receipt.to_text().unwrap().as_bytes(), &d.signer()).unwrap();
    kms.record_receipt(hard, receipt.to_text().unwrap())
        .unwrap();
    assert!(kms.destructions_due(d.now()).is_empty());
}

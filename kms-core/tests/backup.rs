//! What a backup bundle holds, on a real SoftHSM2 token and RocksDB store (docs/RECOVERY.md):
//! every key, version and governance table from one snapshot; every version's escrow and no
//! material wrapped under the token's root key; no root-wrapped MAC key; signed so that it
//! verifies under the audit signer and nothing else.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed step is a failed test"
)]

mod common;

use std::sync::Arc;

use hsm_bridge::Hsm;
use kms_core::audit::SIGNING_KEY_LABEL;
use kms_core::backup::{export, ExportRequest};
use kms_core::bundle::{parse, AuditHead, BundleError};
use kms_core::governance::authz::danger::AllowAuthenticated;
use kms_core::store::{Store, Table};
use kms_core::{
    Clock, Deps, DestructionAuthority, Error, KeyRef, Kms, Labels, NewKey, Protection, RocksStore,
    StoredMaterial, SystemRng, VersionRecord,
};

struct FixedClock;
impl Clock for FixedClock {
    fn now_unix(&self) -> u64 {
        1_800_000_000
    }
}

fn request() -> ExportRequest {
    ExportRequest {
        bundle_id: "ab".repeat(16),
        exported_at: 1_800_000_000,
        exported_by: "spiffe://operators.example/op1".into(),
        approval_id: Some("cd".repeat(16)),
        audit_head: AuditHead {
            seq: 7,
            hash: "00".repeat(32),
        },
        config: serde_json::json!({ "approvals": { "required": 2 } }),
    }
}

fn new_key(kms: &Kms, protection: Protection) -> KeyRef {
    KeyRef::Id(
        kms.create_key(NewKey {
            alias: None,
            labels: Labels::default(),
            protection,
        })
        .unwrap()
        .id,
    )
}

/// The key service over a test deployment, every authenticated caller allowed.
fn open_kms(hsm: &Arc<hsm_bridge::Pkcs11Hsm>, store: &Arc<kms_core::RocksStore>) -> Kms {
    Kms::open(Deps {
        hsm: hsm.clone(),
        store: store.clone(),
        clock: Arc::new(FixedClock),
        rng: Arc::new(SystemRng::new()),
        authorizer: Arc::new(AllowAuthenticated),
    })
    .unwrap()
}

#[test]
fn a_bundle_carries_every_escrow_and_no_root_wrapped_secret() {
    let (_token, hsm, _dir, store) = common::deployment_with_custody();
    let kms = open_kms(&hsm, &store);
    // The deployment's other root-wrapped secrets, as a running server makes them: the grant
    // MAC key and the audit context-digest key.
    let _grants = kms_core::governance::grants::Grants::open(
        store.clone(),
        Arc::new(FixedClock),
        Arc::new(SystemRng::new()),
        hsm.as_ref(),
        kms_core::governance::grants::GrantConfig::default(),
    )
    .unwrap();
    let audit = kms_core::audit::AuditLog::open(
        store.clone(),
        Arc::new(FixedClock),
        kms_core::audit::AuditConfig::default(),
    )
    .unwrap();
    audit.attach_hsm(hsm.clone()).unwrap();
    let soft = new_key(&kms, Protection::Software);
    kms.rotate_key(&soft).unwrap();
    new_key(&kms, Protection::Hsm);
    // A destroyed key: its record travels, its material does not exist any more.
    let gone = new_key(&kms, Protection::Software);
    let authority = DestructionAuthority {
        requested_by: "op1".into(),
        approvers: vec![],
        approval_id: None,
    };
    kms.schedule_destruction(&gone, 7, 7, authority).unwrap();
    let gone_id = kms.describe_key(&gone).unwrap().id;
    let receipt = kms
        .destroy_if_due(gone_id, 1_800_000_000 + 7 * 86_400)
        .unwrap()
        .unwrap();
    kms.record_receipt(gone_id, receipt.to_text().unwrap())
        .unwrap();
    // What must not travel: the software versions' root-wrapped material, the grant MAC key
    // and the context-digest key wrapped under the root key.
    let mut root_wrapped = Vec::new();
    for row in store.scan(Table::Versions).unwrap() {
        let v: VersionRecord = serde_json::from_slice(&row.value).unwrap();
        if let StoredMaterial::Software { wrapped } = &v.material {
            root_wrapped.push(serde_json::to_vec(wrapped).unwrap());
        }
    }
    assert_eq!(root_wrapped.len(), 2);

    let out = export(store.as_ref(), hsm.as_ref(), request()).unwrap();
    assert_eq!(out.key_versions, 3);
    let bundle = parse(&out.bytes).unwrap();
    let signer = hsm.p256_signing_key(SIGNING_KEY_LABEL).unwrap();
    bundle.verify(signer.public_point()).unwrap();
    let h = &bundle.header;
    assert_eq!(h.counts["versions.software"], 2);
    assert_eq!(h.counts["versions.hsm"], 1);
    assert_eq!(h.counts["keys"], 3);
    let custody = kms_core::custody::load(store.as_ref()).unwrap().unwrap();
    assert_eq!(h.ceremony_id, custody.record.ceremony_id.to_string());
    assert_eq!(h.epoch, 1);
    assert_eq!(
        h.transcript_sha256,
        hex::encode(custody.transcript.sha256().unwrap())
    );
    assert_eq!(h.audit_head.seq, 7);

    for r in &bundle.records {
        for m in &root_wrapped {
            assert!(
                !r.value.windows(m.len()).any(|w| w == m.as_slice()),
                "root-wrapped material in {}",
                r.table.name()
            );
        }
        assert!(r.table != Table::AuditRecords && r.table != Table::AuditCheckpoints);
        assert!(!(r.table == Table::Grants && r.key == b"\0mac_key"));
        assert!(!(r.table == Table::AuditMeta && r.key == b"context_key"));
        if r.table == Table::Versions {
            let v: VersionRecord = serde_json::from_slice(&r.value).unwrap();
            assert!(v.escrow.is_some(), "a version without its escrow");
            assert_ne!(v.key_id, gone_id, "a destroyed key's version travelled");
        }
    }
    assert!(bundle.records.iter().any(|r| r.table == Table::Custody));
    // The store holds both, so leaving them out was the export's doing; the signer's public
    // key travels.
    assert!(store
        .get(Table::AuditMeta, b"context_key")
        .unwrap()
        .is_some());
    assert!(store.get(Table::Grants, b"\0mac_key").unwrap().is_some());
    assert!(bundle
        .records
        .iter()
        .any(|r| r.table == Table::AuditMeta && r.key.starts_with(b"signer/")));
    audit.close();

    // Another signer's key does not verify it.
    let other = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    )
    .unwrap();
    use aws_lc_rs::signature::KeyPair as _;
    assert!(matches!(
        bundle.verify(other.public_key().as_ref()),
        Err(BundleError::OtherSigner { .. })
    ));

    // A deployment without custody has nothing that could open a bundle: refused.
    let empty_dir = tempfile::tempdir().unwrap();
    let empty = RocksStore::open(empty_dir.path()).unwrap();
    let refused = export(&empty, hsm.as_ref(), request()).unwrap_err();
    assert!(matches!(refused, Error::BackupRefused { .. }), "{refused}");
    assert!(refused.to_string().contains("kms ceremony init"));
}

/// A real bundle of a small deployment, and its signer's public point, made once for the
/// robustness properties below.
fn sample_bundle() -> &'static (Vec<u8>, Vec<u8>) {
    static SAMPLE: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    SAMPLE.get_or_init(|| {
        let (token, hsm, dir, store) = common::deployment_with_custody();
        let kms = open_kms(&hsm, &store);
        let soft = new_key(&kms, Protection::Software);
        kms.rotate_key(&soft).unwrap();
        new_key(&kms, Protection::Hsm);
        let out = export(store.as_ref(), hsm.as_ref(), request()).unwrap();
        let point = hsm
            .p256_signing_key(SIGNING_KEY_LABEL)
            .unwrap()
            .public_point()
            .to_vec();
        drop((kms, store, dir, hsm, token));
        (out.bytes, point)
    })
}

#[test]
fn every_truncation_of_a_bundle_is_a_typed_error() {
    let (bytes, point) = sample_bundle();
    assert!(parse(bytes).unwrap().verify(point).is_ok());
    for len in 0..bytes.len() {
        let cut = &bytes[..len];
        assert!(parse(cut).is_err(), "a bundle cut at {len} parsed");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Random byte flips anywhere (header, body, signature) never panic the parser, and a
    /// flipped bundle never both parses and verifies.
    #[test]
    fn flipped_bundles_never_panic_and_never_verify(
        flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), 1u8..=255), 1..4)
    ) {
        let (bytes, point) = sample_bundle();
        let mut bad = bytes.clone();
        for (at, mask) in &flips {
            let i = at.index(bad.len());
            bad[i] ^= mask;
        }
        let verified = parse(&bad).and_then(|b| b.verify(point));
        proptest::prop_assert!(verified.is_err());
    }

    /// Random bytes, and a valid prefix followed by random bytes, are typed errors.
    #[test]
    fn arbitrary_input_is_a_typed_error(
        junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        keep in proptest::prelude::any::<proptest::sample::Index>(),
    ) {
        let (bytes, _) = sample_bundle();
        proptest::prop_assert!(parse(&junk).is_err());
        let mut spliced = bytes[..keep.index(bytes.len())].to_vec();
        spliced.extend_from_slice(&junk);
        if spliced != *bytes {
            let _ = parse(&spliced);
        }
    }
}

/// A snapshot view answers every read as the store did when it was taken, and nothing after.
#[test]
fn a_snapshot_view_reads_as_the_store_did_and_refuses_writes() {
    use kms_core::store::{Change, SnapshotView};
    let dir = tempfile::tempdir().unwrap();
    let store = kms_core::RocksStore::open(dir.path()).unwrap();
    let put = |key: &str, value: &str| Change::Put {
        table: Table::Policies,
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    };
    store
        .write(vec![put("a", "1"), put("b", "2"), put("d", "4")])
        .unwrap();
    let view = SnapshotView::read(&store, &[Table::Policies, Table::Keys]).unwrap();
    store
        .write(vec![put("c", "3"), put("b", "changed")])
        .unwrap();

    assert_eq!(view.scan(Table::Policies).unwrap().len(), 3);
    assert_eq!(
        view.get(Table::Policies, b"b").unwrap(),
        Some(b"2".to_vec())
    );
    assert_eq!(view.get(Table::Policies, b"c").unwrap(), None);
    assert_eq!(view.last(Table::Policies).unwrap().unwrap().key, b"d");
    let from_b: Vec<Vec<u8>> = view
        .scan_from(Table::Policies, b"b", 5)
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(from_b, vec![b"b".to_vec(), b"d".to_vec()]);
    assert!(view.scan(Table::Keys).unwrap().is_empty());
    // A table it was not asked for is empty, not read from the store.
    assert!(view.scan(Table::Versions).unwrap().is_empty());
    assert!(view.write(vec![put("e", "5")]).is_err());
    assert_eq!(store.get(Table::Policies, b"e").unwrap(), None);
}

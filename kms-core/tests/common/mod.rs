//! Custody init for tests, as `kms ceremony init` runs it: prepare in memory, import the
//! trusted escrow key as the Security Officer, commit in one store write.

use std::sync::Arc;

use aws_lc_rs::rand::SystemRandom;
use hsm_bridge::test_support::TestToken;
use hsm_bridge::{Hsm, Pkcs11Hsm};
use kms_core::custody::{self, InitPlan, NewEscrowKey};
use kms_core::store::Store;
use kms_core::RocksStore;
use recovery::ceremony::Sealed;
use recovery::{Custodian, TokenInfo};

/// A fresh escrow key, imported by the Security Officer. Call it before the process opens
/// the token as the user.
pub(crate) fn escrow_key(token: &TestToken) -> NewEscrowKey {
    let key = NewEscrowKey::generate(&SystemRandom::new()).unwrap();
    let config = token.config().unwrap();
    key.import(&config.module, token.label(), token.so_pin())
        .unwrap();
    key
}

/// Initialises custody with three custodians, threshold 2; returns what the ceremony made and
/// the custodians' age identities, in order.
pub(crate) fn init_custody(
    store: &dyn Store,
    hsm: &dyn Hsm,
    escrow: NewEscrowKey,
) -> (Sealed, Vec<age::x25519::Identity>) {
    let identities: Vec<_> = (0..3).map(|_| age::x25519::Identity::generate()).collect();
    let custodians = ["alice", "bob", "carol"]
        .iter()
        .zip(&identities)
        .map(|(n, id)| Custodian::parse(&format!("{n}={}", id.to_public())).unwrap())
        .collect();
    let token = TokenInfo {
        label: "t".into(),
        manufacturer: "m".into(),
        model: "SoftHSM v2".into(),
        serial: "1".into(),
    };
    let plan = InitPlan {
        threshold: 2,
        custodians,
        audit_signer: String::new(),
        time: 1_800_000_000,
    };
    let prepared =
        custody::prepare_init(store, hsm, token, &SystemRandom::new(), plan, escrow).unwrap();
    (custody::commit_init(store, prepared).unwrap(), identities)
}

/// A fresh deployment with custody initialised, so that `hsm` keys can be made: a token (the
/// escrow key imported first, then opened as the user) and a store in a new directory.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub(crate) fn deployment_with_custody() -> (
    TestToken,
    Arc<Pkcs11Hsm>,
    tempfile::TempDir,
    Arc<RocksStore>,
) {
    let token = TestToken::create().expect("SoftHSM2 token");
    token.activate();
    let escrow = escrow_key(&token);
    let hsm = Arc::new(Pkcs11Hsm::open(&token.config().unwrap()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open(dir.path()).unwrap());
    init_custody(store.as_ref(), hsm.as_ref(), escrow);
    (token, hsm, dir, store)
}

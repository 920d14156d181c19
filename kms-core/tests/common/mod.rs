//! Custody init for tests, as `kms ceremony init` runs it: prepare in memory, import the
//! trusted escrow key as the Security Officer, commit in one store write.

use aws_lc_rs::rand::SystemRandom;
use hsm_bridge::test_support::TestToken;
use hsm_bridge::Hsm;
use kms_core::custody::{self, InitPlan, NewEscrowKey};
use kms_core::store::Store;
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

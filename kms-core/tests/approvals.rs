#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failed step is a failed test"
)]
//! The operator inventory and the approval store on a real RocksDB directory: what survives a
//! reopen, what the bootstrap rules become, and what a stop in the middle of a run leaves.

use std::collections::BTreeSet;
use std::sync::Arc;

use kms_core::governance::approvals::{
    ApprovalRequest, ApprovalRules, ApprovalState, Approvals, NewRequest, Progress,
};
use kms_core::governance::operators::{
    NewOperator, OperatorDenial, OperatorUpdate, Operators, Role,
};
use kms_core::{Error, OperatorId, RocksStore, Store};

const T0: u64 = 1_798_761_600;

fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    Arc::new(RocksStore::open(dir.path()).unwrap())
}

fn new_operator(name: &str, roles: &[Role], expires_at: u64) -> NewOperator {
    NewOperator {
        identity: format!("spiffe://operators.example.org/{name}")
            .parse()
            .unwrap(),
        name: name.parse().unwrap(),
        owner: "security".into(),
        roles: roles.iter().copied().collect(),
        expires_at,
    }
}

#[test]
fn operators_are_admitted_by_registration_state_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ops = Operators::open(store(&dir)).unwrap();
        assert!(ops.is_empty());
        ops.register(
            new_operator("alice", &[Role::Operator], T0 + 100),
            "config",
            T0,
        )
        .unwrap();
        ops.register(
            new_operator("audra", &[Role::Auditor], T0 + 100),
            "config",
            T0,
        )
        .unwrap();
        // Names and identities are unique.
        assert!(matches!(
            ops.register(new_operator("alice", &[Role::Operator], T0 + 100), "x", T0),
            Err(Error::OperatorExists { .. })
        ));
        assert!(ops
            .register(new_operator("bob", &[], T0 + 100), "x", T0)
            .is_err());
        assert!(ops
            .register(new_operator("bob", &[Role::Operator], T0), "x", T0)
            .is_err());
        ops.register(new_operator("bob", &[Role::Operator], T0 + 100), "x", T0)
            .unwrap();
        ops.deactivate(&"bob".parse().unwrap(), "alice", T0 + 1)
            .unwrap();
        ops.update(
            &"audra".parse().unwrap(),
            OperatorUpdate {
                roles: Some(BTreeSet::from([Role::Auditor, Role::Operator])),
                ..OperatorUpdate::default()
            },
            "alice",
            T0 + 2,
        )
        .unwrap();
    }
    let ops = Operators::open(store(&dir)).unwrap();
    let id = |n: &str| -> OperatorId {
        format!("spiffe://operators.example.org/{n}")
            .parse()
            .unwrap()
    };
    assert!(ops
        .admit(&id("alice"), T0 + 99)
        .unwrap()
        .has(Role::Operator));
    assert_eq!(
        ops.admit(&id("alice"), T0 + 100).unwrap_err(),
        OperatorDenial::Expired
    );
    assert_eq!(
        ops.admit(&id("bob"), T0 + 5).unwrap_err(),
        OperatorDenial::Deactivated
    );
    assert_eq!(
        ops.admit(&id("carol"), T0 + 5).unwrap_err(),
        OperatorDenial::Unregistered
    );
    assert!(ops.admit(&id("audra"), T0 + 5).unwrap().has(Role::Operator));
    assert_eq!(ops.count_with(Role::Operator, T0 + 5), 2);
    assert_eq!(ops.list(false).len(), 2);
    assert_eq!(ops.list(true).len(), 3);
}

#[test]
fn identities_parse_strictly() {
    for ok in [
        "spiffe://operators.example.org/alice",
        &format!("x509-sha256:{}", "ab".repeat(32)),
    ] {
        assert!(ok.parse::<OperatorId>().is_ok(), "{ok}");
    }
    for bad in [
        "",
        "alice",
        "x509-sha256:abc",
        &format!("x509-sha256:{}", "AB".repeat(32)),
        "spiffe://a b",
        "://x",
    ] {
        assert!(bad.parse::<OperatorId>().is_err(), "{bad:?}");
    }
}

fn action(name: &str) -> kms_core::governance::actions::AdminAction {
    name.parse().unwrap()
}

fn request(action: &str) -> NewRequest {
    NewRequest {
        action: action.parse().unwrap(),
        target: "p".into(),
        request: vec![1, 2, 3],
        view: "{}".into(),
        diff: None,
        requested_by: "alice".into(),
    }
}

#[test]
fn rules_are_seeded_once_and_a_run_cut_short_is_marked_failed() {
    let dir = tempfile::tempdir().unwrap();
    let configured = ApprovalRules::default();
    {
        let opened = Approvals::open(store(&dir), configured.clone(), T0).unwrap();
        assert!(!opened.config_differs);
        let approvals = opened.approvals;
        let mut r =
            ApprovalRequest::new("a".repeat(32), request("admin.PutPolicy"), &configured, T0);
        approvals.save(&r).unwrap();
        r.approve("bob", T0 + 1, 2).unwrap();
        let Progress::Quorum(_) = r.approve("carol", T0 + 2, 2).unwrap() else {
            panic!("quorum expected");
        };
        // Saved as approved, and the process stops before the outcome is recorded.
        approvals.save(&r).unwrap();
        let pending = ApprovalRequest::new(
            "b".repeat(32),
            request("admin.DeletePolicy"),
            &configured,
            T0 + 3,
        );
        approvals.save(&pending).unwrap();
        let stricter = ApprovalRules::new(3, 3600, configured.gated.clone()).unwrap();
        approvals.set_rules(stricter).unwrap();
    }
    // The config still says 2: the stored rules apply, and the difference is reported.
    let opened = Approvals::open(store(&dir), configured, T0 + 10).unwrap();
    assert!(opened.config_differs);
    assert_eq!(opened.approvals.rules().required, 3);
    assert_eq!(opened.interrupted.len(), 1);
    let cut = opened.approvals.get(&"a".repeat(32)).unwrap();
    assert_eq!(cut.state, ApprovalState::Failed);
    assert!(cut.reason.unwrap().contains("interrupted"));
    assert_eq!(
        opened.approvals.get(&"b".repeat(32)).unwrap().state,
        ApprovalState::Pending
    );
    let all = opened.approvals.all().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].id, "b".repeat(32), "newest first");
    assert!(matches!(
        opened.approvals.get("nope"),
        Err(Error::Approval(_))
    ));
}

#[test]
fn an_action_added_by_a_later_release_starts_gated_under_rules_stored_before_it() {
    let dir = tempfile::tempdir().unwrap();
    // Rules as the release before key destruction stored them: no `known`, and an operator
    // had taken policy deletion off the list.
    let legacy = serde_json::json!({
        "required": 2,
        "expiry_secs": 86_400,
        "gated": [
            "admin.PutPolicy", "admin.SetTrustBundle", "admin.DeleteTrustBundle",
            "admin.RegisterWorkload", "admin.UpdateWorkload", "admin.DeactivateWorkload",
            "admin.ReactivateWorkload", "admin.RegisterOperator", "admin.UpdateOperator",
            "admin.DeactivateOperator", "admin.Unseal", "admin.SetApprovalRules"
        ],
    });
    store(&dir)
        .write(vec![kms_core::store::Change::Put {
            table: kms_core::store::Table::Approvals,
            key: b"rules".to_vec(),
            value: serde_json::to_vec(&legacy).unwrap(),
        }])
        .unwrap();
    let rules = Approvals::open(store(&dir), ApprovalRules::default(), T0)
        .unwrap()
        .approvals
        .rules();
    assert!(rules.gates(action("admin.ScheduleKeyDestruction")));
    assert!(
        !rules.gates(action("admin.DeletePolicy")),
        "an operator's choice stays"
    );
    // Written back: the next start neither reports nor changes anything more.
    let again = Approvals::open(store(&dir), ApprovalRules::default(), T0)
        .unwrap()
        .approvals
        .rules();
    assert_eq!(again, rules);
    // Taken off the list on purpose, it stays off.
    let mut open = again.gated.clone();
    open.remove(&"admin.ScheduleKeyDestruction".parse().unwrap());
    let approvals = Approvals::open(store(&dir), ApprovalRules::default(), T0)
        .unwrap()
        .approvals;
    approvals
        .set_rules(ApprovalRules::new(2, 86_400, open).unwrap())
        .unwrap();
    drop(approvals);
    let reopened = Approvals::open(store(&dir), ApprovalRules::default(), T0)
        .unwrap()
        .approvals
        .rules();
    assert!(!reopened.gates(action("admin.ScheduleKeyDestruction")));
}

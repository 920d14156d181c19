#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failed step is a failed test"
)]
//! The inventory and the policy store on a real RocksDB directory, and the shipped example
//! policies, each with cases it allows and cases it denies (time windows on an injected clock).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kms_core::governance::grants::{Grant, GrantId};
use kms_core::governance::inventory::{
    IdentityDenial, Inventory, InventoryConfig, NewWorkload, Selector, WorkloadFilter,
    WorkloadUpdate,
};
use kms_core::governance::policy::Policies;
use kms_core::{
    AccessRequest, AuthMethod, Caller, Clock, Decision, EncryptionContext, Error, GrantFacts,
    KeyId, KeyRecord, KeyState, KeyVersion, Labels, Op, Protection, RocksStore,
};

/// 2027-01-01T00:00:00Z, a Friday.
const T0: u64 = 1_798_761_600;
const DAY: u64 = 86_400;

struct ManualClock(AtomicU64);

impl ManualClock {
    fn at(t: u64) -> Arc<Self> {
        Arc::new(Self(AtomicU64::new(t)))
    }
    fn set(&self, t: u64) {
        self.0.store(t, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels::from_pairs(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
    .unwrap()
}

fn new(selector: &str, owner: &str, l: &[(&str, &str)], expires_at: u64) -> NewWorkload {
    NewWorkload {
        selector: selector.parse().unwrap(),
        owner: owner.into(),
        purpose: "tests".into(),
        labels: labels(l),
        expires_at,
    }
}

fn id(s: &str) -> kms_core::governance::spiffe::SpiffeId {
    s.parse().unwrap()
}

#[test]
fn inventory_admits_by_most_specific_registration() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open(dir.path()).unwrap());
    let clock = ManualClock::at(T0);
    let inv = Inventory::open(store.clone(), clock.clone(), InventoryConfig::default()).unwrap();

    inv.register(
        new(
            "spiffe://prod.example/agents/*",
            "ai-team",
            &[("kind", "ai-agent")],
            T0 + 30 * DAY,
        ),
        "op",
    )
    .unwrap();
    inv.register(
        new(
            "spiffe://prod.example/agents/rogue",
            "ai-team",
            &[],
            T0 + 30 * DAY,
        ),
        "op",
    )
    .unwrap();
    inv.register(
        new(
            "spiffe://prod.example/billing",
            "payments",
            &[("tier", "prod")],
            T0 + DAY,
        ),
        "op",
    )
    .unwrap();

    // A fleet member is admitted under the prefix; the prefix does not cover look-alikes.
    let w = inv
        .admit(&id("spiffe://prod.example/agents/a/b"), T0)
        .unwrap();
    assert_eq!(w.selector, "spiffe://prod.example/agents/*");
    assert_eq!(
        inv.admit(&id("spiffe://prod.example/agentsX"), T0)
            .unwrap_err(),
        IdentityDenial::Unregistered
    );
    assert_eq!(
        inv.admit(&id("spiffe://other.example/agents/a"), T0)
            .unwrap_err(),
        IdentityDenial::Unregistered
    );
    // The exact registration wins over the prefix; deactivating it refuses that one only.
    inv.deactivate(&"spiffe://prod.example/agents/rogue".parse().unwrap(), "op")
        .unwrap();
    assert_eq!(
        inv.admit(&id("spiffe://prod.example/agents/rogue"), T0)
            .unwrap_err(),
        IdentityDenial::Deactivated
    );
    assert!(inv
        .admit(&id("spiffe://prod.example/agents/other"), T0)
        .is_ok());
    // Expiry.
    assert!(inv
        .admit(&id("spiffe://prod.example/billing"), T0 + DAY - 1)
        .is_ok());
    assert_eq!(
        inv.admit(&id("spiffe://prod.example/billing"), T0 + DAY)
            .unwrap_err(),
        IdentityDenial::Expired
    );

    // Bad registrations are refused with typed errors.
    assert!(matches!(
        inv.register(
            new("spiffe://prod.example/billing", "x", &[], T0 + DAY),
            "op"
        ),
        Err(Error::WorkloadExists { .. })
    ));
    assert!(matches!(
        inv.register(
            new("spiffe://prod.example/late", "x", &[], T0 + 400 * DAY),
            "op"
        ),
        Err(Error::ExpiryTooFar { .. })
    ));
    assert!(matches!(
        inv.register(new("spiffe://prod.example/past", "x", &[], T0), "op"),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        inv.register(new("spiffe://prod.example/blank", " ", &[], T0 + DAY), "op"),
        Err(Error::Invalid(_))
    ));
    assert!("https://prod.example/x".parse::<Selector>().is_err());
    assert!("spiffe://prod.example/a/*/b".parse::<Selector>().is_err());

    // Updates count as a review and keep the rest.
    clock.set(T0 + 10);
    let sel: Selector = "spiffe://prod.example/billing".parse().unwrap();
    let (before, after) = inv
        .update(
            &sel,
            WorkloadUpdate {
                owner: Some("payments-platform".into()),
                ..WorkloadUpdate::default()
            },
            "op2",
        )
        .unwrap();
    assert_eq!(before.owner, "payments");
    assert_eq!(after.owner, "payments-platform");
    assert_eq!(after.labels, labels(&[("tier", "prod")]));
    assert_eq!(
        (after.reviewed_at, after.updated_by.as_str()),
        (T0 + 10, "op2")
    );

    // Listing and filters.
    let all = WorkloadFilter {
        include_inactive: true,
        ..WorkloadFilter::default()
    };
    let (page, more) = inv.list(&all, None, 2);
    assert_eq!(page.len(), 2);
    assert!(more);
    let (rest, more) = inv.list(&all, Some(&page[1].selector), 10);
    assert_eq!((rest.len(), more), (1, false));
    let (active, _) = inv.list(&WorkloadFilter::default(), None, 10);
    assert_eq!(active.len(), 2);
    let by_owner = WorkloadFilter {
        owner: Some("ai-team".into()),
        ..WorkloadFilter::default()
    };
    assert_eq!(inv.list(&by_owner, None, 10).0.len(), 1);
    let by_label = WorkloadFilter {
        label: Some(("tier".into(), "prod".into())),
        ..WorkloadFilter::default()
    };
    assert_eq!(inv.list(&by_label, None, 10).0[0].selector, sel.to_string());
    let expiring = WorkloadFilter {
        expiring_before: Some(T0 + 2 * DAY),
        ..WorkloadFilter::default()
    };
    assert_eq!(inv.list(&expiring, None, 10).0.len(), 1);

    // Usage is counted, flushed, and read back by a new instance along with registrations.
    inv.note_call("spiffe://prod.example/billing", "data.Decrypt", T0 + 20);
    inv.note_call("spiffe://prod.example/billing", "data.Decrypt", T0 + 30);
    inv.note_call(
        "spiffe://prod.example/billing",
        "data.GenerateDataKey",
        T0 + 25,
    );
    inv.flush_usage().unwrap();
    drop(inv);
    let again = Inventory::open(store, clock, InventoryConfig::default()).unwrap();
    assert_eq!(again.len(), 3);
    let usage = again.usage("spiffe://prod.example/billing");
    assert_eq!(usage.last_seen, T0 + 30);
    assert_eq!(usage.calls.get("data.Decrypt"), Some(&2));
    assert_eq!(usage.calls.get("data.GenerateDataKey"), Some(&1));
    assert_eq!(
        again
            .admit(&id("spiffe://prod.example/agents/rogue"), T0)
            .unwrap_err(),
        IdentityDenial::Deactivated
    );
}

fn key(l: &[(&str, &str)]) -> KeyRecord {
    KeyRecord {
        id: KeyId::from_random_bytes([7; 16]),
        alias: None,
        labels: labels(l),
        protection: Protection::Software,
        state: KeyState::Enabled,
        current_version: KeyVersion::new(1).unwrap(),
        created_at: T0,
        updated_at: T0,
        destruction: None,
    }
}

fn caller(spiffe: &str, l: &[(&str, &str)]) -> Caller {
    let mut c = Caller::new(spiffe.parse().unwrap(), AuthMethod::Mtls);
    c.workload = Some(Arc::new(kms_core::governance::inventory::Workload {
        selector: spiffe.into(),
        owner: "team".into(),
        purpose: "tests".into(),
        labels: labels(l),
        expires_at: T0 + DAY,
        active: true,
        created_at: T0,
        created_by: "op".into(),
        updated_at: T0,
        updated_by: "op".into(),
        reviewed_at: T0,
    }));
    c
}

fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
    EncryptionContext::from_pairs(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    )
    .unwrap()
}

fn decide(
    p: &Policies,
    c: &Caller,
    op: Op,
    k: &KeyRecord,
    context: &EncryptionContext,
    now: u64,
) -> (Decision, Vec<String>) {
    let v = p.evaluate(&AccessRequest {
        caller: c,
        op,
        key: k,
        context,
        now_unix: now,
    });
    (v.decision, v.policies)
}

fn policies() -> (tempfile::TempDir, Arc<RocksStore>, Policies) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open(dir.path()).unwrap());
    let p = Policies::open(store.clone(), ManualClock::at(T0)).unwrap();
    (dir, store, p)
}

#[test]
fn policies_are_validated_versioned_and_survive_a_restart() {
    let (_dir, store, p) = policies();
    let c = caller("spiffe://prod.example/svc", &[]);
    let k = key(&[]);
    let none = ctx(&[]);
    // Default deny, with no determining policy.
    assert_eq!(
        decide(&p, &c, Op::Decrypt, &k, &none, T0),
        (Decision::Deny, vec![])
    );

    // Syntax errors, schema errors and bad ids are refused and change nothing.
    for (id, text) in [
        ("broken", "permit (principal, action, resource"),
        (
            "unknown-attr",
            "permit (principal, action, resource) when { principal.nickname == \"x\" };",
        ),
        (
            "unknown-action",
            "permit (principal, action == Action::\"Fly\", resource);",
        ),
        (
            "unguarded-tag",
            "permit (principal, action, resource) when { principal.getTag(\"tier\") == \"prod\" };",
        ),
        ("Bad Id", "permit (principal, action, resource);"),
    ] {
        let e = p.put(id, text, "op").unwrap_err();
        assert!(
            matches!(e, Error::PolicyInvalid { .. } | Error::Invalid(_)),
            "{id}: {e:?}"
        );
    }
    assert!(p.list().is_empty());

    let v1 = "permit (principal == Workload::\"spiffe://prod.example/svc\", action == Action::\"Decrypt\", resource);";
    let (stored, before) = p.put("svc-decrypt", v1, "alice").unwrap();
    assert_eq!((stored.version, before), (1, None));
    assert_eq!(
        decide(&p, &c, Op::Decrypt, &k, &none, T0),
        (Decision::Allow, vec!["svc-decrypt".to_owned()])
    );
    assert_eq!(decide(&p, &c, Op::Encrypt, &k, &none, T0).0, Decision::Deny);

    // A second version with two statements: ids id.1, id.2.
    let v2 = "permit (principal == Workload::\"spiffe://prod.example/svc\", action == Action::\"Decrypt\", resource);\n\
              permit (principal == Workload::\"spiffe://prod.example/svc\", action == Action::\"Encrypt\", resource);";
    let (stored, before) = p.put("svc-decrypt", v2, "bob").unwrap();
    assert_eq!(stored.version, 2);
    assert_eq!(before.unwrap().text, v1);
    assert_eq!(
        decide(&p, &c, Op::Encrypt, &k, &none, T0),
        (Decision::Allow, vec!["svc-decrypt.2".to_owned()])
    );
    assert_eq!(p.get("svc-decrypt", Some(1)).unwrap().text, v1);
    assert_eq!(p.get("svc-decrypt", None).unwrap().created_by, "bob");

    // Reopened from the store: the same decisions.
    drop(p);
    let p = Policies::open(store.clone(), ManualClock::at(T0)).unwrap();
    assert_eq!(p.statement_count(), 2);
    assert_eq!(
        decide(&p, &c, Op::Encrypt, &k, &none, T0).0,
        Decision::Allow
    );

    // Deleting keeps the history and denies again.
    let removed = p.delete("svc-decrypt", "carol").unwrap();
    assert_eq!(removed.version, 2);
    assert_eq!(decide(&p, &c, Op::Decrypt, &k, &none, T0).0, Decision::Deny);
    let history = &p.list()[0];
    assert_eq!(history.versions.len(), 3);
    assert!(history.versions[2].deleted);
    assert!(matches!(
        p.get("svc-decrypt", None),
        Err(Error::PolicyNotFound { .. })
    ));
    assert!(matches!(
        p.delete("svc-decrypt", "carol"),
        Err(Error::PolicyNotFound { .. })
    ));
}

/// Stores the shipped messaging example policy.
fn put_messaging_example(p: &Policies) {
    p.put(
        "messaging-tenant",
        include_str!("../../examples/policies/messaging-tenant.cedar"),
        "op",
    )
    .unwrap();
}

/// A messaging service of tenant `acme`, as the messaging example expects.
fn messaging_chat() -> Caller {
    caller(
        "spiffe://prod.example/messaging/chat",
        &[("role", "messaging"), ("tenant", "acme")],
    )
}

#[test]
fn example_policy_messaging_tenant() {
    let (_dir, _store, p) = policies();
    put_messaging_example(&p);
    let k = key(&[]);
    let chat = messaging_chat();
    let own = ctx(&[("tenant", "acme"), ("channel", "42")]);
    let other = ctx(&[("tenant", "globex")]);
    let missing = ctx(&[("channel", "42")]);
    for op in [Op::GenerateDataKey, Op::Decrypt] {
        assert_eq!(
            decide(&p, &chat, op, &k, &own, T0),
            (Decision::Allow, vec!["messaging-tenant".to_owned()])
        );
        assert_eq!(decide(&p, &chat, op, &k, &other, T0).0, Decision::Deny);
        assert_eq!(decide(&p, &chat, op, &k, &missing, T0).0, Decision::Deny);
    }
    // Not an action the policy names.
    assert_eq!(
        decide(&p, &chat, Op::Encrypt, &k, &own, T0).0,
        Decision::Deny
    );
    // Not a messaging service, or one without a tenant label.
    let batch = caller("spiffe://prod.example/batch", &[("tenant", "acme")]);
    assert_eq!(
        decide(&p, &batch, Op::Decrypt, &k, &own, T0).0,
        Decision::Deny
    );
    let untenanted = caller(
        "spiffe://prod.example/messaging/x",
        &[("role", "messaging")],
    );
    assert_eq!(
        decide(&p, &untenanted, Op::Decrypt, &k, &own, T0).0,
        Decision::Deny
    );
}

#[test]
fn example_policy_ai_agent_grant_only() {
    let (_dir, _store, p) = policies();
    p.put(
        "ai-agent-grant-only",
        include_str!("../../examples/policies/ai-agent-grant-only.cedar"),
        "op",
    )
    .unwrap();
    // A broad permit that the agent policy's forbid must override.
    p.put(
        "everyone-decrypts",
        "permit (principal, action == Action::\"Decrypt\", resource);",
        "op",
    )
    .unwrap();
    let k = key(&[]);
    let none = ctx(&[]);
    let agent = caller(
        "spiffe://prod.example/agents/summariser",
        &[("kind", "ai-agent")],
    );
    let (d, why) = decide(&p, &agent, Op::Decrypt, &k, &none, T0);
    assert_eq!(d, Decision::Deny);
    assert_eq!(why, vec!["ai-agent-grant-only.2".to_owned()]);

    let mut granted = agent.clone();
    granted.grant = Some(GrantFacts {
        grant: Arc::new(Grant {
            id: GrantId::from_string("g-1".into()),
            creator: "spiffe://prod.example/orchestrator".parse().unwrap(),
            grantee: "spiffe://prod.example/agents/summariser".parse().unwrap(),
            key_id: k.id,
            operations: vec![Op::Decrypt],
            required_context: BTreeMap::new(),
            created_at: T0,
            expires_at: T0 + 600,
            max_uses: None,
            revoked: None,
        }),
        creator_workload: None,
        reserved: 0,
    });
    let (d, mut why) = decide(&p, &granted, Op::Decrypt, &k, &none, T0);
    why.sort();
    assert_eq!(d, Decision::Allow);
    assert_eq!(
        why,
        vec![
            "ai-agent-grant-only.1".to_owned(),
            "everyone-decrypts".to_owned()
        ]
    );
    // Other workloads are unaffected.
    let svc = caller("spiffe://prod.example/svc", &[]);
    assert_eq!(
        decide(&p, &svc, Op::Decrypt, &k, &none, T0).0,
        Decision::Allow
    );
}

#[test]
fn example_policy_restricted_hours() {
    let (_dir, _store, p) = policies();
    p.put(
        "restricted-hours",
        include_str!("../../examples/policies/restricted-hours.cedar"),
        "op",
    )
    .unwrap();
    p.put("everyone", "permit (principal, action, resource);", "op")
        .unwrap();
    let restricted = key(&[("sensitivity", "restricted")]);
    let ordinary = key(&[("sensitivity", "internal")]);
    let prod = caller("spiffe://prod.example/api", &[("tier", "prod")]);
    let staging = caller("spiffe://prod.example/api-staging", &[("tier", "staging")]);
    let none = ctx(&[]);
    let at = |h: u64, m: u64| T0 + h * 3600 + m * 60;

    for (t, expect) in [
        (at(5, 59), Decision::Deny),
        (at(6, 0), Decision::Allow),
        (at(13, 30), Decision::Allow),
        (at(21, 59), Decision::Allow),
        (at(22, 0), Decision::Deny),
        (at(23, 59) + DAY, Decision::Deny),
    ] {
        assert_eq!(
            decide(&p, &prod, Op::GenerateDataKey, &restricted, &none, t).0,
            expect,
            "prod at {t}"
        );
    }
    let (d, why) = decide(&p, &staging, Op::Decrypt, &restricted, &none, at(12, 0));
    assert_eq!(
        (d, why),
        (Decision::Deny, vec!["restricted-hours".to_owned()])
    );
    // Keys that are not restricted are usable at any hour by anyone the permit covers.
    assert_eq!(
        decide(&p, &staging, Op::Decrypt, &ordinary, &none, at(3, 0)).0,
        Decision::Allow
    );
}

/// A registration as the inventory would hold it.
/// Decisions are remembered for identical requests within a second; any change of an input
/// policy can see (registration, key, context, purpose, time, operation, policies) is a new
/// evaluation, never a stale answer.
#[test]
fn remembered_decisions_follow_every_input() {
    let (_dir, _store, p) = policies();
    let text = format!(
        "permit(principal, action == Action::\"Decrypt\", resource)\n\
         when {{\n  principal.owner == \"team\" && principal.hasTag(\"tier\") &&\n  \
         resource.hasTag(\"open\") && resource.alias != \"closed\" &&\n  \
         context.encryption_context.hasTag(\"tenant\") &&\n  \
         context.time.unix < {} && context.auth_method == \"mtls\" &&\n  \
         !(context has purpose && context.purpose == \"audit\")\n}};\n",
        T0 + 1
    );
    p.put("cache-probe", &text, "op").unwrap();
    let c = caller("spiffe://prod.example/app", &[("tier", "prod")]);
    let k = key(&[("open", "yes")]);
    let good = ctx(&[("tenant", "acme")]);
    let allow = |c: &Caller, k: &KeyRecord, e: &EncryptionContext, op: Op, now: u64| {
        decide(&p, c, op, k, e, now).0 == Decision::Allow
    };

    assert!(allow(&c, &k, &good, Op::Decrypt, T0));
    assert!(allow(&c, &k, &good, Op::Decrypt, T0));
    let s = p.decision_counts(false);
    assert_eq!(
        (s.count, s.cached),
        (1, 1),
        "the repeat is answered from the cache"
    );

    // The same SPIFFE ID under a changed registration: owner, then labels.
    let mut other_owner = c.clone();
    let mut w = other_owner.workload.as_deref().unwrap().clone();
    w.owner = "someone-else".into();
    other_owner.workload = Some(Arc::new(w));
    assert!(!allow(&other_owner, &k, &good, Op::Decrypt, T0));
    let relabelled = caller("spiffe://prod.example/app", &[("team", "prod")]);
    assert!(!allow(&relabelled, &k, &good, Op::Decrypt, T0));
    // The same key id with other labels or another alias.
    assert!(!allow(&c, &key(&[]), &good, Op::Decrypt, T0));
    let mut aliased = k.clone();
    aliased.alias = Some(kms_core::Alias::try_from("closed".to_owned()).unwrap());
    assert!(!allow(&c, &aliased, &good, Op::Decrypt, T0));
    // Context, authentication method, declared purpose, time, operation.
    assert!(!allow(&c, &k, &ctx(&[("team", "acme")]), Op::Decrypt, T0));
    let mut by_jwt = c.clone();
    by_jwt.method = AuthMethod::Jwt;
    assert!(!allow(&by_jwt, &k, &good, Op::Decrypt, T0));
    let mut auditing = c.clone();
    auditing.purpose = Some("audit".into());
    assert!(!allow(&auditing, &k, &good, Op::Decrypt, T0));
    assert!(!allow(&c, &k, &good, Op::Decrypt, T0 + 1));
    assert!(!allow(&c, &k, &good, Op::GenerateDataKey, T0));
    // And back: the original request is still allowed.
    assert!(allow(&c, &k, &good, Op::Decrypt, T0));

    // A policy change applies to the very next request, even one just answered.
    p.delete("cache-probe", "op").unwrap();
    assert!(!allow(&c, &k, &good, Op::Decrypt, T0));
    p.put("cache-probe", &text, "op").unwrap();
    assert!(allow(&c, &k, &good, Op::Decrypt, T0));
    let s = p.decision_counts(false);
    // Only the first repeat was reused: every other request differed in an input, or came
    // after a request of another second (T0 + 1), which starts the cache over.
    assert_eq!(s.cached, 1);
}

#[test]
fn decisions_are_shared_across_encryption_contexts_only_through_the_entries_policies_read() {
    let (_dir, _store, p) = policies();
    put_messaging_example(&p);
    // A policy for one workload that reads an entry whose name comes from its own label.
    p.put(
        "computed",
        "permit(principal == Workload::\"spiffe://prod.example/computed\", action, resource)\n\
         when { principal.hasTag(\"entry\") &&\n  \
         context.encryption_context.hasTag(principal.getTag(\"entry\")) };\n",
        "op",
    )
    .unwrap();
    let k = key(&[]);
    let chat = messaging_chat();
    let before = p.decision_counts(false);
    for n in 0..20 {
        let channel = n.to_string();
        let own = ctx(&[("tenant", "acme"), ("channel", channel.as_str())]);
        let other = ctx(&[("tenant", "globex"), ("channel", channel.as_str())]);
        let missing = ctx(&[("channel", channel.as_str())]);
        let op = Op::GenerateDataKey;
        assert_eq!(
            decide(&p, &chat, op, &k, &own, T0),
            (Decision::Allow, vec!["messaging-tenant".to_owned()])
        );
        assert_eq!(decide(&p, &chat, op, &k, &other, T0).0, Decision::Deny);
        assert_eq!(decide(&p, &chat, op, &k, &missing, T0).0, Decision::Deny);
    }
    let after = p.decision_counts(false);
    assert_eq!(
        (after.count - before.count, after.cached - before.cached),
        (3, 57),
        "the messaging policies read only `tenant`: one evaluation for each tenant value \
         (or none), the other channels reuse it"
    );

    // The computed entry name can be any entry, so every new context is evaluated.
    let computed = caller("spiffe://prod.example/computed", &[("entry", "job")]);
    for n in 0..10 {
        let job = n.to_string();
        let with = ctx(&[("job", job.as_str())]);
        let without = ctx(&[("batch", job.as_str())]);
        assert_eq!(
            decide(&p, &computed, Op::Decrypt, &k, &with, T0),
            (Decision::Allow, vec!["computed".to_owned()])
        );
        assert_eq!(
            decide(&p, &computed, Op::Decrypt, &k, &without, T0).0,
            Decision::Deny
        );
    }
    let last = p.decision_counts(false);
    assert_eq!(
        (last.count - after.count, last.cached - after.cached),
        (20, 0)
    );

    // A new version of a policy is analysed again: now `channel` is read too.
    p.put(
        "messaging-tenant",
        "permit(principal, action, resource) when {\n  \
         context.encryption_context.hasTag(\"channel\") &&\n  \
         context.encryption_context.getTag(\"channel\") != \"closed\" };\n",
        "op",
    )
    .unwrap();
    for n in 0..5 {
        let channel = n.to_string();
        let own = ctx(&[("tenant", "acme"), ("channel", channel.as_str())]);
        assert_eq!(
            decide(&p, &chat, Op::GenerateDataKey, &k, &own, T0).0,
            Decision::Allow
        );
    }
    let closed = ctx(&[("tenant", "acme"), ("channel", "closed")]);
    assert_eq!(
        decide(&p, &chat, Op::GenerateDataKey, &k, &closed, T0).0,
        Decision::Deny
    );
    let end = p.decision_counts(false);
    assert_eq!((end.count - last.count, end.cached - last.cached), (6, 0));
    // Every decision is counted, reused or not. (That every decision is also timed is
    // asserted where it is timed: `server::policy_stats`'s tests.)
    assert_eq!(end.decisions(), end.count + end.cached);
}

fn registration(selector: &str, l: &[(&str, &str)]) -> kms_core::governance::inventory::Workload {
    // Any caller's registration, under the given (possibly prefix) selector.
    let mut w = caller("spiffe://prod.example/any", l)
        .workload
        .unwrap()
        .as_ref()
        .clone();
    w.selector = selector.into();
    w
}

#[test]
fn key_coverage_finds_keys_no_registration_may_use() {
    let (_dir, _store, p) = policies();
    p.put(
        "restricted-hours",
        include_str!("../../examples/policies/restricted-hours.cedar"),
        "op",
    )
    .unwrap();
    p.put(
        "same-team",
        r#"permit (principal, action in [Action::"GenerateDataKey", Action::"Decrypt"], resource)
           when { principal.hasTag("team") && resource.hasTag("team") &&
                  principal.getTag("team") == resource.getTag("team") &&
                  context.encryption_context.hasTag("tenant") };"#,
        "op",
    )
    .unwrap();
    p.put(
        "retired",
        r#"forbid (principal, action, resource) when { resource.hasTag("retired") };"#,
        "op",
    )
    .unwrap();
    let payments = registration(
        "spiffe://prod.example/payments",
        &[("team", "payments"), ("tier", "dev")],
    );
    let fleet = registration("spiffe://prod.example/fleet/*", &[("team", "nobody")]);

    // Usable whatever the context turns out to be: the permit's condition waits on the
    // encryption context, which is unknown.
    let usable = key(&[("team", "payments")]);
    assert!(p.may_use(&payments, &usable).unwrap());
    // Another team's key, a restricted key for a non-prod workload, a retired key: no context
    // can make any of them usable by this registration.
    let other_team = key(&[("team", "billing")]);
    let restricted = key(&[("team", "payments"), ("sensitivity", "restricted")]);
    let retired = key(&[("team", "payments"), ("retired", "yes")]);
    for k in [&other_team, &restricted, &retired] {
        assert!(!p.may_use(&payments, k).unwrap(), "{:?}", k.labels);
    }

    // A fleet stands for workloads not known in advance, evaluated as an unknown principal:
    // anything a permit could match counts as possibly usable; a forbid on the key alone
    // still rules it out.
    assert!(p.may_use(&fleet, &other_team).unwrap());
    assert!(!p.may_use(&fleet, &retired).unwrap());

    // A policy naming the workload makes the restricted key usable in the permitted hours.
    p.put(
        "payments-all",
        r#"permit (principal == Workload::"spiffe://prod.example/payments", action, resource);"#,
        "op",
    )
    .unwrap();
    assert!(p.may_use(&payments, &other_team).unwrap());
    assert!(!p.may_use(&payments, &restricted).unwrap());
    let prod = registration(
        "spiffe://prod.example/payments",
        &[("team", "payments"), ("tier", "prod")],
    );
    assert!(p.may_use(&prod, &restricted).unwrap());
    assert!(!p.may_use(&prod, &retired).unwrap());
}

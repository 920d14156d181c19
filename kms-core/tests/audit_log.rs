#![allow(
    clippy::disallowed_methods,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed step is a failed test"
)]
//! The audit writer against a real SoftHSM2 token and a real RocksDB directory: chaining,
//! checkpoint cadence, continuation after reopen, and retention that stays verifiable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hsm_bridge::test_support::TestToken;
use hsm_bridge::Pkcs11Hsm;
use kms_core::audit::{verify_store, AuditConfig, AuditEvent, AuditLog, VerifyOptions};
use kms_core::store::{Change, Store, Table};
use kms_core::{Clock, EncryptionContext, RocksStore};

/// A clock the test moves by hand.
#[derive(Default)]
struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::SeqCst) / 1000
    }
    fn now_unix_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

const DAY_MS: u64 = 86_400_000;

struct Harness {
    _token: TestToken,
    hsm: Arc<Pkcs11Hsm>,
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
}

impl Harness {
    fn new() -> Self {
        let token = TestToken::create().expect("SoftHSM2 token");
        token.activate();
        let hsm = Arc::new(Pkcs11Hsm::open(&token.config().unwrap()).unwrap());
        let clock = Arc::new(ManualClock(AtomicU64::new(1_800_000_000_000)));
        Self {
            _token: token,
            hsm,
            dir: tempfile::tempdir().unwrap(),
            clock,
        }
    }

    fn open(&self, config: AuditConfig) -> (Arc<RocksStore>, AuditLog) {
        let store = Arc::new(RocksStore::open(self.dir.path()).unwrap());
        let log = AuditLog::open(store.clone(), self.clock.clone(), config).unwrap();
        log.attach_hsm(self.hsm.clone()).unwrap();
        (store, log)
    }

    fn advance(&self, ms: u64) {
        self.clock.0.fetch_add(ms, Ordering::SeqCst);
    }
}

fn append(log: &AuditLog, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            log.submit(AuditEvent::new(format!("test.event{i}"), "ok"))
                .wait_blocking()
                .unwrap()
        })
        .collect()
}

fn checkpoint_seqs(store: &RocksStore) -> Vec<u64> {
    store
        .scan(Table::AuditCheckpoints)
        .unwrap()
        .iter()
        .map(|r| u64::from_be_bytes(r.key.clone().try_into().unwrap()))
        .collect()
}

#[test]
fn records_chain_are_checkpointed_and_continue_after_reopen() {
    let h = Harness::new();
    let config = AuditConfig::new(5, Duration::from_secs(3600), None);
    {
        let (store, log) = h.open(config);
        assert_eq!(append(&log, 12), (1..=12).collect::<Vec<_>>());
        // Many waiters at once: one group commit, sequence numbers still dense.
        let pending: Vec<_> = (0..50)
            .map(|_| log.submit(AuditEvent::new("test.burst", "ok")))
            .collect();
        let mut seqs: Vec<u64> = pending
            .into_iter()
            .map(|p| p.wait_blocking().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (13..=62).collect::<Vec<_>>());
        log.close();
        assert!(log
            .submit(AuditEvent::new("late", "ok"))
            .wait_blocking()
            .is_err());
        let cps = checkpoint_seqs(&store);
        assert_eq!(cps.first(), Some(&5), "{cps:?}");
        assert_eq!(
            cps.last(),
            Some(&62),
            "the close signs a final checkpoint: {cps:?}"
        );
        let report = verify_store(store.as_ref(), None, VerifyOptions::default()).unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!((report.records, report.anchored_to), (62, Some(62)));
    }
    let (store, log) = h.open(config);
    assert_eq!(append(&log, 1), vec![63]);
    log.close();
    let report = verify_store(store.as_ref(), None, VerifyOptions::default()).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records, 63);
}

#[test]
fn records_left_unsigned_by_a_crash_are_anchored_when_the_hsm_is_attached() {
    let h = Harness::new();
    let config = AuditConfig::new(1_000, Duration::from_secs(3600), None);
    {
        let store = Arc::new(RocksStore::open(h.dir.path()).unwrap());
        // No HSM attached: records are written, nothing signs them (as after a crash).
        let log = AuditLog::open(store.clone(), h.clock.clone(), config).unwrap();
        append(&log, 4);
        assert!(checkpoint_seqs(&store).is_empty());
        drop(log);
        let report = verify_store(store.as_ref(), None, VerifyOptions::default()).unwrap();
        assert_eq!((report.ok, report.unanchored), (true, 4));
        // The writer thread lets go of the store once it sees the log dropped; only then can
        // the directory be opened again.
        let mut waited = 0;
        while Arc::strong_count(&store) > 1 && waited < 250 {
            std::thread::sleep(Duration::from_millis(20));
            waited += 1;
        }
        assert_eq!(
            Arc::strong_count(&store),
            1,
            "the audit writer still holds the store"
        );
    }
    let (store, log) = h.open(config);
    let mut waited = 0;
    while checkpoint_seqs(&store).is_empty() && waited < 100 {
        std::thread::sleep(Duration::from_millis(20));
        waited += 1;
    }
    assert_eq!(checkpoint_seqs(&store), vec![4]);
    log.close();
}

#[test]
fn a_time_based_checkpoint_is_signed_while_records_wait() {
    let h = Harness::new();
    let (store, log) = h.open(AuditConfig::new(1_000_000, Duration::from_millis(50), None));
    append(&log, 3);
    assert!(checkpoint_seqs(&store).is_empty());
    h.advance(60);
    // The writer wakes by itself when the interval has passed.
    let mut waited = 0;
    while checkpoint_seqs(&store).is_empty() && waited < 100 {
        std::thread::sleep(Duration::from_millis(20));
        waited += 1;
    }
    assert_eq!(checkpoint_seqs(&store), vec![3]);
    log.close();
}

#[test]
fn retention_prunes_at_a_checkpoint_and_stays_verifiable() {
    let h = Harness::new();
    let config = AuditConfig::new(
        3,
        Duration::from_secs(3600),
        Some(Duration::from_secs(86_400)),
    );
    let (store, log) = h.open(config);
    append(&log, 6); // checkpoints at 3 and 6
    h.advance(2 * DAY_MS);
    append(&log, 1); // record 7; the prune that follows writes record 8
    log.close();
    let report = verify_store(store.as_ref(), None, VerifyOptions::default()).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.first_seq, Some(6), "{report:?}");
    assert_eq!(report.last_seq, Some(8), "{report:?}");
    assert!(store
        .get(Table::AuditRecords, &5u64.to_be_bytes())
        .unwrap()
        .is_none());

    // Deleting the first retained record as well is not mistaken for pruning.
    store
        .write(vec![Change::Delete {
            table: Table::AuditRecords,
            key: 6u64.to_be_bytes().to_vec(),
        }])
        .unwrap();
    let report = verify_store(store.as_ref(), None, VerifyOptions::default()).unwrap();
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, Some(6), "{report:?}");
}

#[test]
fn context_digests_are_keyed_stable_and_hide_values() {
    let h = Harness::new();
    let ctx =
        |v: &str| EncryptionContext::from_pairs([("tenant".to_owned(), v.to_owned())]).unwrap();
    let (store, log) = h.open(AuditConfig::default());
    let a = log.context_digest(&ctx("acme")).unwrap();
    assert_eq!(log.context_digest(&ctx("acme")).unwrap(), a);
    assert_ne!(log.context_digest(&ctx("acme2")).unwrap(), a);
    assert!(log.context_digest(&EncryptionContext::empty()).is_none());
    // Not a plain hash: someone holding only the log cannot test guesses.
    let plain = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        b"acme",
    ));
    assert_ne!(a, plain);
    log.close();
    // The key survives a restart (wrapped under the root key in the store).
    drop((store, log));
    let (_store, log) = h.open(AuditConfig::default());
    assert_eq!(log.context_digest(&ctx("acme")).unwrap(), a);
    log.close();
}

/// What an observer was told, in order.
#[derive(Default)]
struct Told(parking_lot::Mutex<Vec<String>>);

impl kms_core::audit::AuditObserver for Told {
    fn committed(&self, records: usize, _took: Duration) {
        self.0.lock().push(format!("committed {records}"));
    }
    fn failed(&self, records: usize) {
        self.0.lock().push(format!("failed {records}"));
    }
    fn checkpointed(&self, time_ms: u64) {
        self.0.lock().push(format!("checkpoint {time_ms}"));
    }
}

#[test]
fn an_observer_is_told_of_each_batch_and_checkpoint() {
    let h = Harness::new();
    let config = AuditConfig::new(3, Duration::from_secs(3600), None);
    let (store, log) = h.open(config);
    append(&log, 2);
    log.close();
    drop((log, store));
    // Reopened: the observer first hears of the checkpoint close signed.
    let (_store, log) = h.open(config);
    let told = Arc::new(Told::default());
    log.observe(told.clone());
    let start = h.clock.now_unix_ms();
    append(&log, 3);
    log.close();
    let said = told.0.lock().clone();
    assert_eq!(
        said.first().map(String::as_str),
        Some(format!("checkpoint {start}").as_str())
    );
    let committed: usize = said
        .iter()
        .filter_map(|s| s.strip_prefix("committed ")?.parse::<usize>().ok())
        .sum();
    assert_eq!(committed, 3, "{said:?}");
    // Three records reach checkpoint_every: one more checkpoint after the first.
    assert!(
        said.iter().filter(|s| s.starts_with("checkpoint")).count() >= 2,
        "{said:?}"
    );
    assert!(!said.iter().any(|s| s.starts_with("failed")), "{said:?}");
}

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::disallowed_methods,
    clippy::print_stdout,
    reason = "test code: a failed step is a failed test; the kill waits on the load's progress; \
              the totals are printed for make crash-test"
)]
//! Crash cycles: the real `kms serve --dev` on loopback, driven by 16 clients (data keys,
//! grants, key creations and rotations), killed with SIGKILL at a random moment, restarted, and
//! checked: every acknowledged write is there, every acknowledged ciphertext decrypts to its
//! plaintext, and the audit chain verifies (its unsigned tail accepted only as the documented
//! unanchored tail). `KMS_CRASH_CYCLES` cycles (10 by default; `make crash-test CYCLES=100`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::v1::{
    BatchDecryptRequest, CreateGrantRequest, CreateKeyRequest, DecryptRequest,
    GenerateDataKeyRequest, KeyRequest, ListGrantsRequest,
};
use kms_tests::Server;

/// The CLI built for this test run from the current code.
const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");
const CLIENTS: usize = 16;

/// What the server acknowledged, to be found again after every kill.
#[derive(Default)]
struct Acknowledged {
    /// Ciphertext → (context value, plaintext).
    blobs: Vec<(Vec<u8>, String, Vec<u8>)>,
    /// Keys created.
    keys: Vec<String>,
    /// Key → the highest version a rotation of it returned.
    rotations: BTreeMap<String, u32>,
    /// Grants created.
    grants: Vec<String>,
    /// Failures while the server was up (none are expected).
    unexpected: Vec<String>,
}

impl Acknowledged {
    fn writes(&self) -> usize {
        self.blobs.len() + self.keys.len() + self.rotations.len() + self.grants.len()
    }
}

/// A small deterministic generator, so a failing cycle can be run again.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// One client's share of the load: mostly data keys, and every few requests a grant, a key
/// creation or a rotation, until `stop`.
async fn client(
    server_data: String,
    server_admin: String,
    tls: (api::ClientTls, api::ClientTls),
    c: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    acked: Arc<Mutex<Acknowledged>>,
) {
    let (Ok(mut data), Ok(mut admin)) = (
        tls.0.data(&server_data).await,
        tls.1.admin(&server_admin).await,
    ) else {
        return;
    };
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let ok = match i % 20 {
            5 => admin
                .create_key(CreateKeyRequest::default())
                .await
                .map(|r| acked.lock().unwrap().keys.push(r.into_inner().key_id)),
            10 => admin
                .rotate_key(KeyRequest {
                    key: "crash".into(),
                })
                .await
                .map(|r| {
                    let version = r.into_inner().current_version;
                    let mut a = acked.lock().unwrap();
                    let seen = a.rotations.entry("crash".into()).or_default();
                    *seen = (*seen).max(version);
                }),
            15 => data
                .create_grant(CreateGrantRequest {
                    grantee: format!("spiffe://dev.sovereign-kms.local/workload/g{c}"),
                    key: "crash".into(),
                    operations: vec!["Decrypt".into()],
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let grant = r.into_inner().grant_id.clone();
                    acked.lock().unwrap().grants.push(grant);
                }),
            _ => {
                let value = format!("c{c}-{i}");
                data.generate_data_key(GenerateDataKeyRequest {
                    key: "crash".into(),
                    encryption_context: [("conversation".into(), value.clone())].into(),
                    spec: api::v1::DataKeySpec::Aes256.into(),
                })
                .await
                .map(|r| {
                    let mut r = r.into_inner();
                    let (ciphertext, plaintext) = (
                        std::mem::take(&mut r.ciphertext),
                        std::mem::take(&mut r.plaintext),
                    );
                    acked
                        .lock()
                        .unwrap()
                        .blobs
                        .push((ciphertext, value, plaintext));
                })
            }
        };
        if let Err(status) = ok {
            // Once the kill is under way, what was not answered was not acknowledged.
            if !stop.load(Ordering::SeqCst) {
                acked
                    .lock()
                    .unwrap()
                    .unexpected
                    .push(format!("client {c}, request {i}: {status}"));
            }
            return;
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts the load, kills the server once `kill_after` requests were answered, and waits for
/// the clients.
fn load_and_kill(server: Server, kill_after: usize, acked: &Arc<Mutex<Acknowledged>>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let tls = (
        server.client_tls("workload"),
        server.client_tls("operator1"),
    );
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            rt.spawn(client(
                server.data.clone(),
                server.admin.clone(),
                tls.clone(),
                c,
                stop.clone(),
                done.clone(),
                acked.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Relaxed) < kill_after && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    // Stop is raised before the kill, so a failure the kill causes is not counted unexpected.
    stop.store(true, Ordering::SeqCst);
    server.kill9();
    rt.block_on(async {
        for c in clients {
            c.await.unwrap();
        }
    });
}

/// Checks every acknowledged write against a restarted server.
fn check(server: &Server, acked: &Acknowledged, cycle: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut admin = server
            .client_tls("operator1")
            .admin(&server.admin)
            .await
            .unwrap();
        let mut data = server
            .client_tls("workload")
            .data(&server.data)
            .await
            .unwrap();
        for key in &acked.keys {
            let found = admin.describe_key(KeyRequest { key: key.clone() }).await;
            assert!(found.is_ok(), "cycle {cycle}: acknowledged key {key} lost");
        }
        for (key, version) in &acked.rotations {
            let now = admin
                .describe_key(KeyRequest { key: key.clone() })
                .await
                .unwrap()
                .into_inner()
                .current_version;
            assert!(
                now >= *version,
                "cycle {cycle}: {key} at v{now}, acknowledged v{version}"
            );
        }
        let listed = admin
            .list_grants(ListGrantsRequest {
                include_inactive: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .grants;
        for grant in &acked.grants {
            assert!(
                listed.iter().any(|g| &g.grant_id == grant),
                "cycle {cycle}: acknowledged grant {grant} lost"
            );
        }
        for chunk in acked.blobs.chunks(500) {
            let items = chunk
                .iter()
                .map(|(ciphertext, value, _)| DecryptRequest {
                    ciphertext: ciphertext.clone(),
                    encryption_context: [("conversation".into(), value.clone())].into(),
                })
                .collect();
            let results = data
                .batch_decrypt(BatchDecryptRequest { items })
                .await
                .unwrap()
                .into_inner()
                .results;
            for ((_, value, plaintext), result) in chunk.iter().zip(results) {
                match result.result {
                    Some(api::v1::decrypt_result::Result::Ok(r)) => {
                        assert_eq!(&r.plaintext, plaintext, "cycle {cycle}: {value}")
                    }
                    other => panic!("cycle {cycle}: ciphertext of {value} lost: {other:?}"),
                }
            }
        }
    });
}

#[test]
fn acknowledged_writes_survive_sigkill_cycles() {
    let cycles: usize = std::env::var("KMS_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(KMS, dir.path(), "warn");
    server.kms_json(&["key", "create", "--alias", "crash"]);
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut server = Some(server);
    for cycle in 1..=cycles {
        // Killed after 20 to 400 answered requests: somewhere in a group commit, a rotation or
        // a key creation.
        let kill_after = 20 + usize::try_from(next(&mut seed) % 381).unwrap();
        load_and_kill(server.take().unwrap(), kill_after, &acked);
        let verified = kms_tests::kms_in(
            KMS,
            dir.path(),
            &["audit", "verify", "--allow-unanchored", "--json"],
        );
        assert!(
            verified.status.success(),
            "cycle {cycle}: the audit chain does not verify: {}",
            String::from_utf8_lossy(&verified.stdout)
        );
        let restarted = Server::start_with(KMS, dir.path(), "warn");
        check(&restarted, &acked.lock().unwrap(), cycle);
        server = Some(restarted);
    }
    let a = acked.lock().unwrap();
    assert!(
        a.unexpected.is_empty(),
        "failures under load: {:?}",
        a.unexpected
    );
    let writes = a.writes();
    assert!(
        writes > cycles * 10,
        "the load ran: {writes} acknowledged writes"
    );
    // Every kind of write was acknowledged, so every kind was checked.
    let kinds = (
        a.blobs.len(),
        a.keys.len(),
        a.rotations.len(),
        a.grants.len(),
    );
    assert!(
        kinds.0 > 0 && kinds.1 > 0 && kinds.2 > 0 && kinds.3 > 0,
        "{kinds:?}"
    );
    println!(
        "crash-test: data keys {}, keys {}, rotated keys {}, grants {}",
        kinds.0, kinds.1, kinds.2, kinds.3
    );
    println!("crash-test: {cycles} cycles, {writes} acknowledged writes, 0 lost");
}

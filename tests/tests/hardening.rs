#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    clippy::disallowed_methods,
    reason = "test code: a failed step is a failed test"
)]
//! The listeners probed as an attacker on the network would: raw HTTP/2 over TLS, with and
//! without a client certificate, against the real `kms serve --dev` on loopback.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::v1::{BatchGenerateDataKeyRequest, GenerateDataKeyRequest};
use bytes::Bytes;
use h2::client::SendRequest;
use kms_tests::Server;
use prost::Message;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

/// The CLI built for this test run from the current code.
const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");

const GENERATE: &str = "/kms.v1.DataPlane/GenerateDataKey";
const BATCH_GENERATE: &str = "/kms.v1.DataPlane/BatchGenerateDataKey";

/// A TLS client configuration trusting the dev server CA, with `who`'s certificate if given.
fn tls_config(server: &Server, who: Option<&str>) -> Arc<rustls::ClientConfig> {
    let pki = server.dir.join(".kms/pki");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(pki.join("server-ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match who {
        None => builder.with_no_client_auth(),
        Some(who) => {
            let certs = CertificateDer::pem_file_iter(pki.join(format!("{who}.pem")))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(pki.join(format!("{who}.key"))).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr` under `config`.
async fn tls(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// A raw HTTP/2 connection to `addr`, as `who` (or with no certificate).
async fn h2(server: &Server, addr: &str, who: Option<&str>) -> SendRequest<Bytes> {
    let stream = tls(addr, tls_config(server, who)).await;
    let (send, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A gRPC answer as a client sees it.
#[derive(Debug)]
struct Answer {
    code: i32,
    message: String,
    request_id: Option<String>,
}

/// One gRPC call with a hand-made body: `message` framed as one length-prefixed message.
async fn call(
    send: &mut SendRequest<Bytes>,
    path: &str,
    message: &[u8],
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = http::Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let mut ready = send.clone().ready().await.unwrap();
    let (response, mut body_out) = ready
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(message);
    // A refusal may come (and the stream close) before the body is sent: the gate answers
    // from the headers alone. The answer is what counts.
    let _ = body_out.send_data(Bytes::from(framed), true);
    let response = response.await.unwrap();
    let (parts, mut body) = response.into_parts();
    let header =
        |h: &http::HeaderMap, name: &str| h.get(name).map(|v| v.to_str().unwrap().to_owned());
    let request_id = header(&parts.headers, "x-request-id");
    let (code, message) = match header(&parts.headers, "grpc-status") {
        Some(code) => (code, header(&parts.headers, "grpc-message")),
        None => {
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let trailers = body.trailers().await.unwrap().unwrap_or_default();
            (
                header(&trailers, "grpc-status").unwrap(),
                header(&trailers, "grpc-message"),
            )
        }
    };
    Answer {
        code: code.parse().unwrap(),
        message: message.map(|m| percent_decode(&m)).unwrap_or_default(),
        request_id,
    }
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn generate_request(key: &str) -> Vec<u8> {
    GenerateDataKeyRequest {
        key: key.into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn records(dir: &Path) -> Vec<Value> {
    kms_tests::audit_events(KMS, dir)
}

/// Codes as gRPC numbers them.
const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 3;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNIMPLEMENTED: i32 = 12;
const UNAUTHENTICATED: i32 = 16;

/// Growth of the server's resident memory that the flood below must stay within. Before the
/// HTTP/2 limits and the gate, 80,000 header-only streams took it up by about 400 MiB.
const FLOOD_MEMORY_BOUND: u64 = 64 * 1024 * 1024;

#[test]
fn a_flood_of_streams_without_a_certificate_stays_bounded_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(KMS, dir.path(), "warn");
    server.kms_json(&["key", "create", "--alias", "soft"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut workload = server
            .client_tls("workload")
            .data(&server.data)
            .await
            .unwrap();
        let mut served = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            workload
                .generate_data_key(GenerateDataKeyRequest {
                    key: "soft".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            served.push(t.elapsed());
        }
        let before = rss(server.pid());

        // Four connections without a certificate, each opening header-only streams (never a
        // body, never an end) and holding them.
        let mut held = Vec::new();
        let mut connections = Vec::new();
        let mut opened = 0usize;
        for _ in 0..4 {
            let send = h2(&server, &server.data, None).await;
            for _ in 0..20_000 {
                let Ok(Ok(mut ready)) =
                    tokio::time::timeout(Duration::from_secs(2), send.clone().ready()).await
                else {
                    break;
                };
                let request = http::Request::post(format!("https://localhost{GENERATE}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .unwrap();
                match ready.send_request(request, false) {
                    Ok(stream) => held.push(stream),
                    Err(_) => break,
                }
                opened += 1;
            }
            connections.push(send);
        }
        // Let the server take in what was sent.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let during = rss(server.pid());

        // A workload with a certificate is still served, and promptly.
        let mut under_flood = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            tokio::time::timeout(
                Duration::from_secs(5),
                workload.generate_data_key(GenerateDataKeyRequest {
                    key: "soft".into(),
                    ..Default::default()
                }),
            )
            .await
            .expect("a normal client is served during the flood")
            .unwrap();
            under_flood.push(t.elapsed());
        }
        under_flood.sort();
        served.sort();
        eprintln!(
            "flood: {opened} streams opened; rss {} -> {} MiB; normal p50 {:?} -> {:?}",
            before >> 20,
            during >> 20,
            served[10],
            under_flood[10]
        );
        assert!(
            during.saturating_sub(before) < FLOOD_MEMORY_BOUND,
            "memory grew by {} MiB under the flood ({opened} streams)",
            during.saturating_sub(before) >> 20
        );
        assert!(
            under_flood[10] < Duration::from_secs(1),
            "median latency under the flood was {:?}",
            under_flood[10]
        );
        drop(held);
        drop(connections);
    });
}

#[test]
fn refusals_come_after_authentication_are_recorded_and_say_nothing_internal() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(KMS, dir.path(), "warn");
    server.kms_json(&["key", "create", "--alias", "soft"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let batch = BatchGenerateDataKeyRequest {
        items: (0..1001)
            .map(|_| GenerateDataKeyRequest {
                key: "soft".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let garbage = [0xffu8; 16];
    rt.block_on(async {
        // Without a certificate: refused as unauthenticated whatever the body is.
        let mut anon = h2(&server, &server.data, None).await;
        for (path, body) in [
            (BATCH_GENERATE, batch.as_slice()),
            (GENERATE, &garbage[..]),
            ("/kms.v1.Admin/ListKeys", &garbage[..]),
        ] {
            let a = call(&mut anon, path, body, &[]).await;
            assert_eq!(a.code, UNAUTHENTICATED, "{path}: {a:?}");
            assert!(
                a.request_id.is_some(),
                "{path}: an error carries x-request-id"
            );
        }

        // With the workload's certificate: validated after authentication, with fixed
        // messages that name no internal type.
        let mut wl = h2(&server, &server.data, Some("workload")).await;
        let a = call(&mut wl, GENERATE, &garbage, &[]).await;
        assert_eq!(a.code, INVALID_ARGUMENT, "{a:?}");
        assert_eq!(a.message, "request could not be decoded");
        let big = vec![0u8; 9 * 1024 * 1024];
        let a = call(&mut wl, GENERATE, &big, &[]).await;
        assert_eq!(a.code, RESOURCE_EXHAUSTED, "{a:?}");
        assert_eq!(a.message, "request too large");
        let a = call(&mut wl, "/kms.v1.Admin/ListKeys", &[], &[]).await;
        assert_eq!(a.code, UNIMPLEMENTED, "{a:?}");
        assert_eq!(a.message, "method not served on this listener");
        let a = call(&mut wl, BATCH_GENERATE, &batch, &[]).await;
        assert_eq!(a.code, INVALID_ARGUMENT, "{a:?}");
        assert!(a.request_id.is_some());

        // Request ids: the caller's is echoed; a malformed one is replaced; the server's own
        // are random, not a counter.
        let a = call(
            &mut wl,
            GENERATE,
            &generate_request("soft"),
            &[("x-request-id", "job-7.a_b")],
        )
        .await;
        assert_eq!(a.code, OK, "{a:?}");
        assert_eq!(a.request_id.as_deref(), Some("job-7.a_b"));
        let long = "x".repeat(65);
        let a = call(
            &mut wl,
            GENERATE,
            &generate_request("soft"),
            &[("x-request-id", &long)],
        )
        .await;
        let first = a.request_id.unwrap();
        let b = call(&mut wl, GENERATE, &generate_request("soft"), &[]).await;
        let second = b.request_id.unwrap();
        for id in [&first, &second] {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
        assert_ne!(first, second);
        let common = first
            .chars()
            .zip(second.chars())
            .take_while(|(a, b)| a == b)
            .count();
        assert!(common < 8, "server ids share a prefix: {first} {second}");
    });
    let _ = server.stop();

    let events = records(dir.path());
    let with_reason =
        |reason: &str| -> Vec<&Value> { events.iter().filter(|e| e["reason"] == reason).collect() };
    assert_eq!(
        with_reason("auth.missing").len(),
        3,
        "each unauthenticated refusal is recorded"
    );
    for e in with_reason("auth.missing") {
        assert_eq!(e["auth"], "none");
        assert_eq!(e["status"], "Unauthenticated");
    }
    assert_eq!(with_reason("request.undecodable").len(), 1);
    assert_eq!(with_reason("request.too_large").len(), 1);
    let unserved = with_reason("request.unserved_method");
    assert_eq!(unserved.len(), 1);
    assert_eq!(unserved[0]["action"], "data.unserved");
    assert_eq!(unserved[0]["detail"]["method"], "/kms.v1.Admin/ListKeys");
    let too_many = with_reason("request.batch_too_large");
    assert_eq!(too_many.len(), 1);
    assert_eq!(too_many[0]["action"], "data.BatchGenerateDataKey");
    for e in [&with_reason("request.undecodable"), &too_many] {
        assert!(
            e[0]["principal"].as_str().unwrap().starts_with("spiffe://"),
            "refusals after authentication name the caller: {}",
            e[0]
        );
    }
    // The caller's id is recorded beside the server's; a malformed one is not recorded.
    let tagged: Vec<_> = events
        .iter()
        .filter(|e| e["client_request_id"] == "job-7.a_b")
        .collect();
    assert_eq!(tagged.len(), 1);
    assert_eq!(tagged[0]["request_id"].as_str().unwrap().len(), 32);
    assert!(events.iter().all(|e| e["client_request_id"]
        .as_str()
        .is_none_or(|c| c.len() <= 64)));
}

#[test]
fn admin_sessions_are_not_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(KMS, dir.path(), "warn");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // One client configuration (and so one session cache) for both connections.
        let operator = tls_config(&server, Some("operator1"));
        let workload = tls_config(&server, Some("workload"));
        for (addr, config, resumable) in [
            (&server.admin, operator, false),
            (&server.data, workload, true),
        ] {
            // A call on the first connection, so its session tickets (sent after the
            // handshake) are read.
            let first = tls(addr, config.clone()).await;
            let (mut send, conn) = h2::client::handshake(first).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let health = tonic_health::pb::HealthCheckRequest::default().encode_to_vec();
            let h = call(&mut send, "/grpc.health.v1.Health/Check", &health, &[]).await;
            assert_eq!(h.code, OK);
            let second = tls(addr, config.clone()).await;
            let kind = second.get_ref().1.handshake_kind();
            assert_eq!(
                kind == Some(rustls::HandshakeKind::Resumed),
                resumable,
                "{addr}: {kind:?}"
            );
        }
    });
}

#[test]
fn reflection_outside_dev_needs_an_authenticated_caller_and_can_be_off() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    // First start writes the dev config; then the setting is changed and the server restarted.
    let server = Server::start_with(KMS, dir.path(), "warn");
    let _ = server.stop();
    let config = dir.path().join(".kms/kms.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let reflection_path = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }
    .encode_to_vec();
    for (setting, anonymous, authenticated) in [
        ("authenticated", UNAUTHENTICATED, OK),
        ("off", UNAUTHENTICATED, UNIMPLEMENTED),
    ] {
        let with = text.replace("[listen]", &format!("[listen]\nreflection = \"{setting}\""));
        assert_ne!(with, text, "the dev config has a [listen] section");
        std::fs::write(&config, with).unwrap();
        let server = Server::start_with(KMS, dir.path(), "warn");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut anon = h2(&server, &server.data, None).await;
            let a = call(&mut anon, reflection_path, &list, &[]).await;
            assert_eq!(a.code, anonymous, "{setting}, no certificate: {a:?}");
            // Health stays open for load balancers.
            let health = tonic_health::pb::HealthCheckRequest::default().encode_to_vec();
            let h = call(&mut anon, "/grpc.health.v1.Health/Check", &health, &[]).await;
            assert_eq!(h.code, OK, "health: {h:?}");
            let channel = server
                .client_tls("workload")
                .channel(&server.data)
                .await
                .unwrap();
            let mut client = ServerReflectionClient::new(channel);
            let got = client
                .server_reflection_info(tokio_stream::once(ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                }))
                .await;
            let code = match got {
                Ok(mut s) => match s.get_mut().message().await {
                    Ok(_) => OK,
                    Err(status) => status.code() as i32,
                },
                Err(status) => status.code() as i32,
            };
            assert_eq!(code, authenticated, "{setting}, workload");
        });
        let _ = server.stop();
    }
}

/// Paths under `dir` (not following links) whose mode gives group or others any access.
fn shared_paths(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(p) = pending.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.permissions().mode() & 0o077 != 0 {
            out.push(format!("{} {:o}", p.display(), meta.permissions().mode()));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                pending.push(e.unwrap().path());
            }
        }
    }
    out
}

#[test]
fn the_data_directory_and_exports_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(KMS, dir.path(), "warn");
    server.kms_json(&["key", "create", "--alias", "soft"]);
    server.kms_json(&["data", "generate-key", "--key", "soft"]);
    let _ = server.stop();
    let data = dir.path().join(".kms");
    assert_eq!(shared_paths(&data), Vec::<String>::new());
    let out = Command::new(KMS)
        .current_dir(dir.path())
        .args(["audit", "export", "--since", "1", "--out", "audit.jsonl"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(dir.path().join("audit.jsonl"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Files an earlier version left readable are tightened at the next start.
    let store = data.join("store");
    let some_file = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_file())
        .unwrap();
    std::fs::set_permissions(&some_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start_with(KMS, dir.path(), "warn");
    let _ = server.stop();
    assert_eq!(shared_paths(&data), Vec::<String>::new());
}

#[test]
fn registrations_can_be_reactivated_and_aliases_differ_in_more_than_case() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(KMS, dir.path(), "warn");
    let selector = "spiffe://dev.sovereign-kms.local/jobs/nightly";
    server.kms_approved(&[
        "identity",
        "register",
        selector,
        "--owner",
        "ops",
        "--purpose",
        "tests",
        "--expires",
        "30d",
    ]);
    let off = server.kms_approved(&["identity", "deactivate", selector]);
    assert_eq!(off["result"]["after"]["active"], false, "{off}");
    let on = server.kms_approved(&["identity", "reactivate", selector]);
    assert_eq!(on["result"]["after"]["active"], true, "{on}");
    assert_eq!(
        server.kms_json(&["identity", "describe", selector])["active"],
        true
    );

    server.kms_json(&["key", "create", "--alias", "Demo"]);
    for args in [
        vec!["key", "create", "--alias", "demo"],
        vec!["key", "create", "--alias", "DEMO"],
    ] {
        let out = server.kms(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("alias Demo is already in use"), "{err}");
    }
    let other = server.kms_json(&["key", "create", "--alias", "other"]);
    let out = server.kms(&["key", "alias", "dEMO", other["key_id"].as_str().unwrap()]);
    assert!(
        !out.status.success(),
        "an alias differing only in case was set"
    );
}

/// How many times `needle` is in the writable memory of process `pid`.
fn copies_in_memory(pid: u32, needles: &[&[u8]]) -> Vec<usize> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut counts = vec![0; needles.len()];
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap()];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        for (n, needle) in needles.iter().enumerate() {
            counts[n] += buf.windows(needle.len()).filter(|w| w == needle).count();
        }
    }
    counts
}

#[test]
fn plaintexts_and_data_keys_do_not_stay_in_server_memory() {
    use api::v1::{generate_data_key_result, EncryptRequest};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(KMS, dir.path(), "warn");
    server.kms_json(&["key", "create", "--alias", "soft"]);
    let canary = b"CANARY-ENCRYPT-PLAINTEXT-5b1f0c2e9a7d4418".to_vec();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deks = rt.block_on(async {
        let mut c = server
            .client_tls("workload")
            .data(&server.data)
            .await
            .unwrap();
        let mut request = EncryptRequest::default();
        request.key = "soft".into();
        request.plaintext.clone_from(&canary);
        c.encrypt(request).await.unwrap();
        let batch = c
            .batch_generate_data_key(BatchGenerateDataKeyRequest {
                items: (0..3)
                    .map(|_| GenerateDataKeyRequest {
                        key: "soft".into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut single = c
            .generate_data_key(GenerateDataKeyRequest {
                key: "soft".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut deks: Vec<Vec<u8>> = batch
            .results
            .iter()
            .map(|r| match r.result.as_ref().unwrap() {
                generate_data_key_result::Result::Ok(ok) => ok.plaintext.clone(),
                generate_data_key_result::Result::Error(e) => panic!("{e:?}"),
            })
            .collect();
        deks.push(std::mem::take(&mut single.plaintext));
        deks
    });
    let mut needles: Vec<&[u8]> = vec![&canary];
    needles.extend(deks.iter().map(Vec::as_slice));
    let counts = copies_in_memory(server.pid(), &needles);
    eprintln!(
        "copies in server memory: encrypt plaintext {}, data keys {:?}",
        counts[0],
        &counts[1..]
    );
    // What stays is in buffers the server does not own (SECURITY.md): the encoded message in
    // gRPC's codec buffer, and for small frames HTTP/2's write buffer. Every buffer the
    // server's code held them in is wiped; before it was, each batch data key was found twice
    // and the single one three times.
    assert!(counts[0] <= 1, "encrypt plaintext: {} copies", counts[0]);
    for (n, c) in counts[1..4].iter().enumerate() {
        assert!(*c <= 1, "batch data key {n}: {c} copies");
    }
    assert!(counts[4] <= 2, "single data key: {} copies", counts[4]);
    let _ = server.stop();
}

/// A method the data-plane service does not have, asked for with a valid certificate, is
/// refused like any other unserved method (with its fixed message) and recorded, naming the
/// caller (it was answered by the router with an empty UNIMPLEMENTED, unrecorded).
#[test]
fn an_unknown_method_of_the_plane_service_is_refused_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(KMS, dir.path(), "warn");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut wl = h2(&server, &server.data, Some("workload")).await;
        let a = call(&mut wl, "/kms.v1.DataPlane/NoSuchMethod", &[], &[]).await;
        assert_eq!(a.code, UNIMPLEMENTED, "{a:?}");
        assert_eq!(a.message, "method not served on this listener");
        assert!(a.request_id.is_some(), "{a:?}");
    });
    let _ = server.stop();
    let events = records(dir.path());
    let unserved: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "request.unserved_method")
        .collect();
    assert_eq!(unserved.len(), 1, "{events:?}");
    assert_eq!(unserved[0]["action"], "data.NoSuchMethod");
    assert!(
        unserved[0]["principal"]
            .as_str()
            .unwrap()
            .starts_with("spiffe://"),
        "{}",
        unserved[0]
    );
}

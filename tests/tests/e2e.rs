#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]
//! End to end: the real `kms serve --dev` binary on loopback, driven by the real CLI and the
//! gRPC client, with a real SoftHSM2 token and RocksDB under a temporary directory.

use api::v1::{DecryptRequest, GenerateDataKeyRequest, KeyRequest};
use kms_tests::Server;

/// The CLI built for this test run from the current code.
const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn b64_flip_last(blob_b64: &str) -> String {
    // Changes the final base64 character that carries whole bits of the tag.
    let mut chars: Vec<char> = blob_b64.trim_end_matches('=').chars().collect();
    let pads = blob_b64.len() - chars.len();
    let i = chars.len() - 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let mut s: String = chars.into_iter().collect();
    s.push_str(&"=".repeat(pads));
    s
}

#[test]
fn create_generate_decrypt_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    for protection in ["software", "hsm"] {
        let alias = format!("demo-{protection}");
        let created = server.kms_json(&[
            "key",
            "create",
            "--alias",
            &alias,
            "--protection",
            protection,
            "--label",
            "owner=platform",
            "--label",
            "sensitivity=internal",
        ]);
        let key_id = created["key_id"].as_str().unwrap().to_owned();
        assert_eq!(created["protection"], protection);
        assert_eq!(created["labels"]["owner"], "platform");

        let dk = server.kms_json(&[
            "data",
            "generate-key",
            "--key",
            &alias,
            "--context",
            "tenant=acme",
            "--context",
            "app=chat",
        ]);
        assert_eq!(dk["key_id"], key_id.as_str());
        assert_eq!(dk["key_version"], 1);
        let plaintext = dk["plaintext"].as_str().unwrap();
        let ciphertext = dk["ciphertext"].as_str().unwrap();

        // Context order does not matter.
        let opened = server.kms_json(&[
            "data",
            "decrypt",
            "--ciphertext",
            ciphertext,
            "--context",
            "app=chat",
            "--context",
            "tenant=acme",
        ]);
        assert_eq!(opened["key_id"], key_id.as_str());
        assert_eq!(opened["plaintext"], plaintext);

        server.kms_json(&["key", "rotate", &alias]);
        let moved = server.kms_json(&[
            "data",
            "re-encrypt",
            "--ciphertext",
            ciphertext,
            "--context",
            "tenant=acme",
            "--context",
            "app=chat",
            "--destination-key",
            &alias,
        ]);
        assert_eq!(moved["source_key_id"], key_id.as_str());
        assert_eq!(moved["source_key_version"], 1);
        assert_eq!(moved["key_id"], key_id.as_str());
        assert_eq!(moved["key_version"], 2);
        let reopened = server.kms_json(&[
            "data",
            "decrypt",
            "--ciphertext",
            moved["ciphertext"].as_str().unwrap(),
            "--context",
            "tenant=acme",
            "--context",
            "app=chat",
        ]);
        assert_eq!(reopened["plaintext"], plaintext);

        let described = server.kms_json(&["key", "describe", &key_id]);
        assert_eq!(described["alias"], alias.as_str());
        assert_eq!(described["state"], "enabled");
    }
    let listed = server.kms_json(&["key", "list"]);
    assert_eq!(listed["keys"].as_array().unwrap().len(), 2);
    assert_eq!(
        server.terminate().code(),
        Some(0),
        "SIGTERM shuts down cleanly"
    );
}

#[test]
fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    server.kms_json(&["key", "create", "--alias", "k"]);
    let dk = server.kms_json(&["data", "generate-key", "--key", "k", "--context", "a=1"]);
    let blob = dk["ciphertext"].as_str().unwrap();

    let tampered = server.kms(&[
        "data",
        "decrypt",
        "--ciphertext",
        &b64_flip_last(blob),
        "--context",
        "a=1",
    ]);
    assert_eq!(tampered.status.code(), Some(1));
    assert!(
        stderr(&tampered).contains("decryption failed"),
        "{}",
        stderr(&tampered)
    );

    let wrong_ctx = server.kms(&["data", "decrypt", "--ciphertext", blob, "--context", "a=2"]);
    assert_eq!(wrong_ctx.status.code(), Some(1));
    assert!(
        stderr(&wrong_ctx).contains("decryption failed"),
        "{}",
        stderr(&wrong_ctx)
    );

    let garbage = server.kms(&[
        "data",
        "decrypt",
        "--ciphertext",
        "aGVsbG8=",
        "--context",
        "a=1",
    ]);
    assert!(
        stderr(&garbage).contains("malformed ciphertext"),
        "{}",
        stderr(&garbage)
    );

    server.kms_json(&["key", "disable", "k"]);
    let disabled = server.kms(&["data", "generate-key", "--key", "k"]);
    assert!(
        stderr(&disabled).contains("key is disabled"),
        "{}",
        stderr(&disabled)
    );
    let disabled = server.kms(&["data", "decrypt", "--ciphertext", blob, "--context", "a=1"]);
    assert!(
        stderr(&disabled).contains("key is disabled"),
        "{}",
        stderr(&disabled)
    );
    server.kms_json(&["key", "enable", "k"]);
    server.kms_json(&["data", "decrypt", "--ciphertext", blob, "--context", "a=1"]);

    // An unknown key and an unknown alias get the one fixed answer a refused caller would get.
    let unknown_id = server.kms(&[
        "data",
        "generate-key",
        "--key",
        "0b0b0b0b-0b0b-4b0b-8b0b-0b0b0b0b0b0b",
    ]);
    let unknown_alias = server.kms(&["data", "generate-key", "--key", "nope"]);
    assert!(
        stderr(&unknown_id).contains("key not found or access denied"),
        "{}",
        stderr(&unknown_id)
    );
    assert_eq!(stderr(&unknown_id), stderr(&unknown_alias));

    let usage = server.kms(&["data", "generate-key", "--key", "k", "--context", "novalue"]);
    assert_eq!(usage.status.code(), Some(2));
    assert!(stderr(&usage).contains("expects K=V"));

    let dup = server.kms(&["key", "create", "--alias", "k"]);
    assert!(stderr(&dup).contains("already in use"), "{}", stderr(&dup));
}

#[test]
fn acknowledged_changes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let created = server.kms_json(&["key", "create", "--alias", "durable", "--protection", "hsm"]);
    let soft = server.kms_json(&["key", "create", "--protection", "software"]);
    let soft_id = soft["key_id"].as_str().unwrap().to_owned();
    let before = server.kms_json(&[
        "data",
        "generate-key",
        "--key",
        "durable",
        "--context",
        "c=1",
    ]);
    let soft_before = server.kms_json(&["data", "generate-key", "--key", &soft_id]);
    let rotated = server.kms_json(&["key", "rotate", "durable"]);
    assert_eq!(rotated["current_version"], 2);
    server.kms_json(&["key", "rotate", &soft_id]);
    server.kill9();

    let server = Server::start(KMS, dir.path());
    let described = server.kms_json(&["key", "describe", "durable"]);
    assert_eq!(described["key_id"], created["key_id"]);
    assert_eq!(described["current_version"], 2);
    let opened = server.kms_json(&[
        "data",
        "decrypt",
        "--ciphertext",
        before["ciphertext"].as_str().unwrap(),
        "--context",
        "c=1",
    ]);
    assert_eq!(opened["plaintext"], before["plaintext"]);
    let opened = server.kms_json(&[
        "data",
        "decrypt",
        "--ciphertext",
        soft_before["ciphertext"].as_str().unwrap(),
    ]);
    assert_eq!(opened["plaintext"], soft_before["plaintext"]);
    let after = server.kms_json(&["data", "generate-key", "--key", "durable"]);
    assert_eq!(after["key_version"], 2);
    assert_eq!(
        server.kms_json(&["key", "describe", &soft_id])["current_version"],
        2
    );
}

#[test]
fn each_plane_accepts_only_its_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let operator = server.client_tls("operator1");
        let workload = server.client_tls("workload");

        let mut admin = operator.admin(&server.admin).await.unwrap();
        let key = admin
            .create_key(api::v1::CreateKeyRequest {
                alias: String::new(),
                protection: 0,
                labels: Default::default(),
            })
            .await
            .unwrap()
            .into_inner()
            .key_id;
        let mut data = workload.data(&server.data).await.unwrap();
        let dk = data
            .generate_data_key(GenerateDataKeyRequest {
                key: key.clone(),
                encryption_context: Default::default(),
                spec: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let opened = data
            .decrypt(DecryptRequest {
                ciphertext: dk.ciphertext.clone(),
                encryption_context: Default::default(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(opened.plaintext, dk.plaintext);

        // An operator certificate on the data plane: the TLS handshake or the first call fails.
        let refused = match operator.data(&server.data).await {
            Err(_) => true,
            Ok(mut c) => c
                .generate_data_key(GenerateDataKeyRequest {
                    key: key.clone(),
                    encryption_context: Default::default(),
                    spec: 0,
                })
                .await
                .is_err(),
        };
        assert!(refused, "data plane accepted an operator certificate");

        // A workload certificate on the admin plane likewise.
        let refused = match workload.admin(&server.admin).await {
            Err(_) => true,
            Ok(mut c) => c
                .describe_key(KeyRequest { key: key.clone() })
                .await
                .is_err(),
        };
        assert!(refused, "admin plane accepted a workload certificate");

        // Both planes answer gRPC health checks.
        for (tls, addr) in [(&workload, &server.data), (&operator, &server.admin)] {
            let channel = tls.channel(addr).await.unwrap();
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(
                status,
                i32::from(tonic_health::pb::health_check_response::ServingStatus::Serving)
            );
        }
    });
}

#[test]
fn batch_calls_return_per_item_results() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let key = server.kms_json(&["key", "create", "--alias", "batch"])["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut data = server.client_tls("workload").data(&server.data).await.unwrap();
        let item = |k: &str| GenerateDataKeyRequest { key: k.into(), encryption_context: [("i".into(), "1".into())].into(), spec: 0 };
        let mut items: Vec<_> = (0..99).map(|_| item("batch")).collect();
        items.push(item("missing"));
        let results = data
            .batch_generate_data_key(api::v1::BatchGenerateDataKeyRequest { items, without_plaintext: false })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(results.len(), 100);
        use api::v1::generate_data_key_result::Result as R;
        let oks: Vec<_> = results[..99]
            .iter()
            .map(|r| match &r.result {
                Some(R::Ok(ok)) => ok.clone(),
                other => panic!("item failed: {other:?}"),
            })
            .collect();
        assert!(oks.iter().all(|o| o.key_id == key));
        assert!(matches!(&results[99].result, Some(R::Error(e)) if e.message == "key not found or access denied"));

        let decrypts = oks
            .iter()
            .map(|o| DecryptRequest { ciphertext: o.ciphertext.clone(), encryption_context: [("i".into(), "1".into())].into() })
            .collect();
        let opened = data
            .batch_decrypt(api::v1::BatchDecryptRequest { items: decrypts })
            .await
            .unwrap()
            .into_inner()
            .results;
        for (o, r) in oks.iter().zip(&opened) {
            match &r.result {
                Some(api::v1::decrypt_result::Result::Ok(d)) => assert_eq!(d.plaintext, o.plaintext),
                other => panic!("decrypt failed: {other:?}"),
            }
        }

        let too_many = (0..1001).map(|_| item("batch")).collect();
        let err = data
            .batch_generate_data_key(api::v1::BatchGenerateDataKeyRequest { items: too_many, without_plaintext: true })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    });
}

#[test]
fn reflection_lists_each_planes_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for (who, addr, service, other) in [
            ("workload", &server.data, "kms.v1.DataPlane", "kms.v1.Admin"),
            (
                "operator1",
                &server.admin,
                "kms.v1.Admin",
                "kms.v1.DataPlane",
            ),
        ] {
            let channel = server.client_tls(who).channel(addr).await.unwrap();
            let mut client = ServerReflectionClient::new(channel);
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut responses = client
                .server_reflection_info(tokio_stream::once(request))
                .await
                .unwrap()
                .into_inner();
            let response = responses.message().await.unwrap().unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = response.message_response
            else {
                panic!("unexpected reflection response");
            };
            let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
            assert!(names.contains(&service), "{names:?}");
            assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
            // A listener describes only what it serves.
            assert!(!names.contains(&other), "{names:?}");
        }
    });
}

#[test]
fn every_subcommand_runs_without_panicking() {
    // Each with placeholders for its required arguments, against a running dev server: most
    // are refused (bad input, no such key), none may panic.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let invocations = kms_cli::minimal_invocations();
    assert!(invocations.len() > 30, "{invocations:?}");
    assert!(invocations.iter().any(|i| i == &["policy", "get", "x"]));
    for args in &invocations {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = server.kms(&args);
        let err = stderr(&out);
        assert!(
            !err.contains("panicked") && out.status.code().is_some_and(|c| c != 101),
            "kms {args:?} panicked or was killed ({:?}): {err}",
            out.status
        );
    }
}

/// The development clock moves on as often as asked (it once worked only the first time: the
/// offset file could not be written over).
#[test]
fn the_dev_clock_advances_more_than_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(".kms")).unwrap();
    let advance = |by: &str| -> serde_json::Value {
        let out = kms_tests::kms_in(KMS, dir.path(), &["dev", "advance-clock", by, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(advance("1h")["offset_secs"], 3600);
    assert_eq!(advance("30m")["offset_secs"], 5400);
    assert_eq!(advance("1d")["offset_secs"], 91_800);
}

/// A development layout works from any working directory and after it is moved: its
/// SoftHSM2 configuration names the token directory by its absolute path, and is pointed at
/// the layout's own `tokens/` again when the layout is opened somewhere else.
#[test]
fn a_dev_layout_works_from_another_directory_and_after_a_move() {
    let first = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, first.path());
    drop(server.stop());
    let elsewhere = tempfile::tempdir().unwrap();
    let inspect = |data_dir: &std::path::Path| {
        let dir = data_dir.to_str().unwrap();
        let out = kms_tests::kms_in(
            KMS,
            elsewhere.path(),
            &["--data-dir", dir, "hsm", "inspect", "--json"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("\"root-key\""), "{text}");
    };
    inspect(&first.path().join(".kms"));
    let moved = tempfile::tempdir().unwrap();
    let to = moved.path().join("kms-moved");
    std::fs::rename(first.path().join(".kms"), &to).unwrap();
    inspect(&to);
}

/// A config whose token cannot be opened for want of its PIN file stops start-up with an error
/// naming the file, and leaves nothing behind: no data directory, no store, no audit log.
#[test]
fn a_missing_pin_file_leaves_no_data_directory_behind() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kms.toml");
    std::fs::write(
        &config,
        "data_dir = \"data\"\n\n[hsm]\ntoken_label = \"nowhere\"\npin_file = \"missing.pin\"\n\n\
         [listen]\ndata = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nmetrics = \"off\"\n\n\
         [tls]\nserver_cert = \"server.pem\"\nserver_key = \"server.key\"\n\
         admin_client_ca = \"operator-ca.pem\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(KMS)
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("missing.pin"), "{err}");
    assert!(
        !dir.path().join("data").exists(),
        "a data directory was left: {err}"
    );
}

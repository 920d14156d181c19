#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::disallowed_methods,
    reason = "test code: a failed step is a failed test"
)]
//! Workload identity, inventory and policy end to end: the real server, certificates made
//! here, trust bundles, registrations and policies set with the real CLI, and every data-plane
//! RPC tried as every kind of caller.

use std::collections::HashMap;

use api::v1::{
    decrypt_result, generate_data_key_result, BatchDecryptRequest, BatchGenerateDataKeyRequest,
    CreateGrantRequest, DecryptRequest, EncryptRequest, GenerateDataKeyRequest, QueryAuditRequest,
    ReEncryptRequest,
};
use kms_tests::Server;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::Value;
use tonic::{Code, Status};

const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");

type Ca = CertifiedIssuer<'static, KeyPair>;

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

#[derive(Clone, Copy)]
enum Shape {
    Valid,
    Expired,
    CaLeaf,
}

/// A client certificate and key (PEM) for `uri`, issued by `issuer`.
fn svid(issuer: &Ca, uri: &str, shape: Shape) -> (Vec<u8>, Vec<u8>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    match shape {
        Shape::Valid => {}
        Shape::Expired => {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        Shape::CaLeaf => {
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages.push(KeyUsagePurpose::KeyCertSign);
        }
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

async fn client(server: &Server, cert: Option<(Vec<u8>, Vec<u8>)>) -> api::DataClient {
    let server_ca = std::fs::read(server.dir.join(".kms/pki/server-ca.pem")).unwrap();
    match cert {
        Some((cert_pem, key_pem)) => api::ClientTls {
            server_ca_pem: server_ca,
            cert_pem,
            key_pem,
            server_name: "localhost".into(),
        }
        .data(&server.data)
        .await
        .unwrap(),
        None => {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(server_ca))
                .domain_name("localhost");
            let channel =
                tonic::transport::Endpoint::from_shared(format!("https://{}", server.data))
                    .unwrap()
                    .tls_config(tls)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
            api::v1::data_plane_client::DataPlaneClient::new(channel)
        }
    }
}

fn ctx() -> HashMap<String, String> {
    HashMap::from([("app".to_owned(), "matrix".to_owned())])
}

/// Every data-plane RPC once, as (rpc, outcome); a batch's single item's error counts as the
/// call's.
fn with_grant<T>(message: T, grant: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(token) = grant {
        r.metadata_mut()
            .insert(server::GRANT_HEADER, token.parse().unwrap());
    }
    r
}

async fn every_rpc(
    c: &mut api::DataClient,
    key: &str,
    blob: &[u8],
    grant: Option<&str>,
) -> Vec<(&'static str, Result<(), Status>)> {
    let g = |m: BatchGenerateDataKeyRequest| with_grant(m, grant);
    let gen = || GenerateDataKeyRequest {
        key: key.to_owned(),
        encryption_context: ctx(),
        spec: 0,
    };
    let dec = || DecryptRequest {
        ciphertext: blob.to_vec(),
        encryption_context: ctx(),
    };
    let item = |code: i32, message: &str| Err(Status::new(Code::from(code), message.to_owned()));
    let mut out = Vec::new();
    out.push((
        "GenerateDataKey",
        c.generate_data_key(with_grant(gen(), grant))
            .await
            .map(drop),
    ));
    out.push((
        "GenerateDataKeyWithoutPlaintext",
        c.generate_data_key_without_plaintext(with_grant(gen(), grant))
            .await
            .map(drop),
    ));
    out.push((
        "Decrypt",
        c.decrypt(with_grant(dec(), grant)).await.map(drop),
    ));
    out.push((
        "Encrypt",
        c.encrypt(with_grant(
            EncryptRequest {
                key: key.to_owned(),
                plaintext: b"matrix".to_vec(),
                encryption_context: ctx(),
            },
            grant,
        ))
        .await
        .map(drop),
    ));
    out.push((
        "ReEncrypt",
        c.re_encrypt(with_grant(
            ReEncryptRequest {
                ciphertext: blob.to_vec(),
                source_encryption_context: ctx(),
                destination_key: key.to_owned(),
                destination_context_set: false,
                destination_encryption_context: HashMap::new(),
            },
            grant,
        ))
        .await
        .map(drop),
    ));
    let batch = c
        .batch_generate_data_key(g(BatchGenerateDataKeyRequest {
            items: vec![gen()],
            without_plaintext: false,
        }))
        .await
        .map(|r| r.into_inner().results.remove(0).result.unwrap());
    out.push((
        "BatchGenerateDataKey",
        match batch {
            Err(s) => Err(s),
            Ok(generate_data_key_result::Result::Ok(_)) => Ok(()),
            Ok(generate_data_key_result::Result::Error(e)) => item(e.code, &e.message),
        },
    ));
    let batch = c
        .batch_decrypt(with_grant(
            BatchDecryptRequest { items: vec![dec()] },
            grant,
        ))
        .await
        .map(|r| r.into_inner().results.remove(0).result.unwrap());
    out.push((
        "BatchDecrypt",
        match batch {
            Err(s) => Err(s),
            Ok(decrypt_result::Result::Ok(_)) => Ok(()),
            Ok(decrypt_result::Result::Error(e)) => item(e.code, &e.message),
        },
    ));
    out
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn authorisation_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let ok = |args: &[&str]| server.kms_change(args);

    let trusted = ca("test.example workloads");
    let untrusted = ca("someone else");
    let bundle = write(dir.path(), "test-ca.pem", &trusted.pem());
    ok(&["trust-bundle", "set", "test.example", "--file", &bundle]);

    let key = server.kms_json(&["key", "create", "--alias", "matrix"])["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let policy = write(
        dir.path(),
        "allowed.cedar",
        "permit (principal == Workload::\"spiffe://test.example/allowed\", action, resource);",
    );
    ok(&["policy", "put", "matrix-allowed", "--file", &policy]);
    // The agent has no policy of its own: a grant is its permission.
    for (selector, expires) in [
        ("spiffe://test.example/agent", "30d"),
        ("spiffe://test.example/allowed", "30d"),
        ("spiffe://test.example/denied", "30d"),
        ("spiffe://test.example/deactivated", "30d"),
        ("spiffe://test.example/expiring", "3s"),
    ] {
        ok(&[
            "identity",
            "register",
            selector,
            "--owner",
            "matrix-team",
            "--purpose",
            "tests",
            "--expires",
            expires,
        ]);
    }
    ok(&[
        "identity",
        "deactivate",
        "spiffe://test.example/deactivated",
    ]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut allowed = client(
            &server,
            Some(svid(
                &trusted,
                "spiffe://test.example/allowed",
                Shape::Valid,
            )),
        )
        .await;
        let blob = allowed
            .generate_data_key(GenerateDataKeyRequest {
                key: key.clone(),
                encryption_context: ctx(),
                spec: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .ciphertext.clone();

        // What "no such key" looks like to an allowed caller: every refusal below that is not
        // about authentication must look exactly the same.
        let missing = allowed
            .generate_data_key(GenerateDataKeyRequest {
                key: "no-such-key".into(),
                encryption_context: ctx(),
                spec: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::PermissionDenied);
        let not_found = (missing.code(), missing.message().to_owned());

        // Grants minted by the allowed workload for the agent.
        let mint = |ops: &[&str], required: &[(&str, &str)], ttl: u32, max_uses: u64| {
            let mut allowed = allowed.clone();
            let key = key.clone();
            let ops: Vec<String> = ops.iter().map(|o| (*o).to_owned()).collect();
            let required: HashMap<String, String> = required
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            async move {
                allowed
                    .create_grant(CreateGrantRequest {
                        grantee: "spiffe://test.example/agent".into(),
                        key,
                        operations: ops,
                        required_context: required,
                        ttl_seconds: ttl,
                        max_uses,
                    })
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
        let all_ops = ["GenerateDataKey", "Decrypt", "Encrypt", "ReEncrypt"];
        let live = mint(&all_ops, &[("app", "matrix")], 600, 0).await;
        let short = mint(&all_ops, &[], 1, 0).await;
        let revoked = mint(&all_ops, &[], 600, 0).await;
        let once = mint(&all_ops, &[], 600, 1).await;
        let other_ctx = mint(&all_ops, &[("app", "other")], 600, 0).await;
        ok(&["grant", "revoke-all", "--id", &revoked.grant_id]);
        let agent_cert = svid(&trusted, "spiffe://test.example/agent", Shape::Valid);
        {
            // Spend the single use.
            let mut agent = client(&server, Some(agent_cert.clone())).await;
            agent
                .generate_data_key(with_grant(
                    GenerateDataKeyRequest {
                        key: key.clone(),
                        encryption_context: ctx(),
                        spec: 0,
                    },
                    Some(&once.token),
                ))
                .await
                .unwrap();
        }
        // The agent without a grant is refused by its policy.
        // Grants of grants are refused.
        {
            let mut agent = client(&server, Some(agent_cert.clone())).await;
            let refused = agent
                .create_grant(with_grant(
                    CreateGrantRequest {
                        grantee: "spiffe://test.example/allowed".into(),
                        key: key.clone(),
                        operations: vec!["Decrypt".into()],
                        required_context: HashMap::new(),
                        ttl_seconds: 60,
                        max_uses: 0,
                    },
                    Some(&live.token),
                ))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied);
        }
        // Let the short grant and the short registration expire: the dev server's clock moves
        // on (`kms dev advance-clock` returns once a running server sees it), no one waits.
        server.kms_json(&["dev", "advance-clock", "5s"]);

        #[derive(Debug, PartialEq)]
        enum Want {
            Allowed,
            Unauthenticated,
            NotFoundOrDenied,
        }
        /// A client certificate and its key, both PEM.
        type Cert = Option<(Vec<u8>, Vec<u8>)>;
        let mut cases: Vec<(&str, Cert, Option<String>, Want)> = Vec::new();
        let plain: Vec<(&str, Cert, Want)> = vec![
            ("no client certificate", None, Want::Unauthenticated),
            (
                "certificate from an untrusted CA",
                Some(svid(
                    &untrusted,
                    "spiffe://test.example/allowed",
                    Shape::Valid,
                )),
                Want::Unauthenticated,
            ),
            (
                "trust domain without a bundle",
                Some(svid(
                    &trusted,
                    "spiffe://elsewhere.example/allowed",
                    Shape::Valid,
                )),
                Want::Unauthenticated,
            ),
            (
                "expired SVID",
                Some(svid(
                    &trusted,
                    "spiffe://test.example/allowed",
                    Shape::Expired,
                )),
                Want::Unauthenticated,
            ),
            (
                "CA certificate as a leaf",
                Some(svid(
                    &trusted,
                    "spiffe://test.example/allowed",
                    Shape::CaLeaf,
                )),
                Want::Unauthenticated,
            ),
            (
                "unregistered identity",
                Some(svid(&trusted, "spiffe://test.example/nobody", Shape::Valid)),
                Want::NotFoundOrDenied,
            ),
            (
                "expired registration",
                Some(svid(
                    &trusted,
                    "spiffe://test.example/expiring",
                    Shape::Valid,
                )),
                Want::NotFoundOrDenied,
            ),
            (
                "deactivated identity",
                Some(svid(
                    &trusted,
                    "spiffe://test.example/deactivated",
                    Shape::Valid,
                )),
                Want::NotFoundOrDenied,
            ),
            (
                "registered but denied by policy",
                Some(svid(&trusted, "spiffe://test.example/denied", Shape::Valid)),
                Want::NotFoundOrDenied,
            ),
            (
                "allowed",
                Some(svid(
                    &trusted,
                    "spiffe://test.example/allowed",
                    Shape::Valid,
                )),
                Want::Allowed,
            ),
            (
                "grantee without a grant",
                Some(agent_cert.clone()),
                Want::NotFoundOrDenied,
            ),
        ];
        cases.extend(plain.into_iter().map(|(n, c, w)| (n, c, None, w)));
        let denied_cert = svid(&trusted, "spiffe://test.example/denied", Shape::Valid);
        for (name, cert, token, want) in [
            (
                "allowed via grant",
                agent_cert.clone(),
                &live.token,
                Want::Allowed,
            ),
            (
                "expired grant",
                agent_cert.clone(),
                &short.token,
                Want::NotFoundOrDenied,
            ),
            (
                "revoked grant",
                agent_cert.clone(),
                &revoked.token,
                Want::NotFoundOrDenied,
            ),
            (
                "grant presented by another identity",
                denied_cert,
                &live.token,
                Want::NotFoundOrDenied,
            ),
            (
                "grant used beyond its max uses",
                agent_cert.clone(),
                &once.token,
                Want::NotFoundOrDenied,
            ),
            (
                "grant with another encryption context",
                agent_cert.clone(),
                &other_ctx.token,
                Want::NotFoundOrDenied,
            ),
        ] {
            cases.push((name, Some(cert), Some(token.clone()), want));
        }
        let mut failures = Vec::new();
        for (name, cert, token, want) in cases {
            let mut c = client(&server, cert).await;
            for (rpc, outcome) in every_rpc(&mut c, &key, &blob, token.as_deref()).await {
                let good = match (&want, &outcome) {
                    (Want::Allowed, Ok(())) => true,
                    (Want::Unauthenticated, Err(s)) => s.code() == Code::Unauthenticated,
                    (Want::NotFoundOrDenied, Err(s)) => {
                        (s.code(), s.message().to_owned()) == not_found
                    }
                    _ => false,
                };
                if !good {
                    failures.push(format!("{name} × {rpc}: wanted {want:?}, got {outcome:?}"));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "matrix failures:\n{}",
            failures.join("\n")
        );

        // Every refusal is on record with its own reason, and allowed calls with the policy
        // that allowed them.
        let mut admin = server
            .client_tls("operator1")
            .admin(&server.admin)
            .await
            .unwrap();
        let mut records: Vec<Value> = Vec::new();
        let mut after = 0;
        loop {
            let page = admin
                .query_audit(QueryAuditRequest {
                    after_seq: after,
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            records.extend(
                page.records
                    .iter()
                    .map(|r| serde_json::from_str::<Value>(&r.record_json).unwrap()),
            );
            after = page.next_after_seq;
            if !page.more {
                break;
            }
        }
        let reasons_for = |principal_part: &str| -> Vec<String> {
            records
                .iter()
                .map(|r| &r["event"])
                .filter(|e| e["action"].as_str().is_some_and(|a| a.starts_with("data.")))
                .filter(|e| {
                    e["principal"]
                        .as_str()
                        .is_some_and(|p| p.contains(principal_part))
                })
                .filter_map(|e| e["reason"].as_str().map(str::to_owned))
                .collect()
        };
        let count = |reason: &str| {
            records
                .iter()
                .filter(|r| r["event"]["reason"] == reason && r["event"]["decision"] == "deny")
                .count()
        };
        // Seven RPCs each.
        for reason in [
            "auth.missing",
            "svid.untrusted",
            "svid.unknown_trust_domain",
            "svid.expired",
            "svid.ca_as_leaf",
            "identity.unregistered",
            "identity.expired",
            "identity.deactivated",
            "grant.expired",
            "grant.revoked",
            "grant.wrong_grantee",
            "grant.used_up",
            "grant.context_mismatch",
        ] {
            assert_eq!(count(reason), 7, "records with reason {reason}");
        }
        // A refused certificate's claimed identity is kept, marked unverified.
        for reason in ["svid.expired", "svid.ca_as_leaf", "svid.untrusted"] {
            assert!(
                records
                    .iter()
                    .filter(|r| r["event"]["reason"] == reason)
                    .all(|r| r["event"]["principal"] == "unverified:spiffe://test.example/allowed"),
                "{reason}"
            );
        }
        // Uses under a grant carry its id; the grant's creation is on record.
        let live_uses = records
            .iter()
            .filter(|r| {
                r["event"]["grant_id"] == live.grant_id.as_str()
                    && r["event"]["decision"] == "allow"
            })
            .count();
        assert!(
            live_uses >= 7,
            "allowed uses of the live grant: {live_uses}"
        );
        assert!(records
            .iter()
            .any(|r| r["event"]["action"] == "data.CreateGrant"
                && r["event"]["grant_id"] == live.grant_id.as_str()));
        // The denied identity: refused by policy, and (presenting someone else's grant) by
        // the grant check.
        let denied = reasons_for("spiffe://test.example/denied");
        assert_eq!(
            denied
                .iter()
                .filter(|r| *r == "no policy allows it")
                .count(),
            7,
            "{denied:?}"
        );
        assert!(denied
            .iter()
            .all(|r| r == "no policy allows it" || r == "grant.wrong_grantee"));
        let allowed_records: Vec<&Value> = records
            .iter()
            .map(|r| &r["event"])
            .filter(|e| {
                e["principal"] == "spiffe://test.example/allowed" && e["decision"] == "allow"
            })
            .collect();
        assert!(allowed_records.len() >= 7);
        assert!(allowed_records
            .iter()
            .all(|e| e["policy_ids"] == serde_json::json!(["matrix-allowed"])));

        // A grant of only ReEncrypt moves a blob to the key's current version without being
        // able to open it.
        let rewrap = mint(&["ReEncrypt"], &[], 600, 0).await;
        let mut agent = client(&server, Some(agent_cert.clone())).await;
        let outcomes = every_rpc(&mut agent, &key, &blob, Some(&rewrap.token)).await;
        for (rpc, outcome) in &outcomes {
            match *rpc {
                "ReEncrypt" => assert!(outcome.is_ok(), "ReEncrypt under a ReEncrypt grant: {outcome:?}"),
                _ => {
                    let s = outcome.as_ref().unwrap_err();
                    assert_eq!((s.code(), s.message().to_owned()), not_found, "{rpc}");
                }
            }
        }
        // A policy that forbids the grantee's request still refuses it under a grant.
        let forbid = write(
            dir.path(),
            "forbid-agent.cedar",
            "forbid (principal == Workload::\"spiffe://test.example/agent\", action, resource) when { context has grant };",
        );
        ok(&["policy", "put", "matrix-forbid-agent", "--file", &forbid]);
        for (rpc, outcome) in every_rpc(&mut agent, &key, &blob, Some(&live.token)).await {
            let s = outcome.unwrap_err();
            assert_eq!((s.code(), s.message().to_owned()), not_found, "{rpc} under a forbid");
        }
    });

    // Calls were counted against the registration.
    let described = server.kms_json(&["identity", "describe", "spiffe://test.example/allowed"]);
    assert!(described["calls"]["data.GenerateDataKey"].as_u64().unwrap() >= 2);
    assert!(described["last_seen"].is_string());
}

#[test]
fn changes_apply_on_the_next_request_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let ok = |server: &Server, args: &[&str]| {
        server.kms_change(args);
    };
    let trusted = ca("test.example workloads");
    let bundle = write(dir.path(), "test-ca.pem", &trusted.pem());
    ok(
        &server,
        &["trust-bundle", "set", "test.example", "--file", &bundle],
    );
    ok(&server, &["key", "create", "--alias", "reload"]);
    let policy = write(
        dir.path(),
        "svc.cedar",
        "permit (principal == Workload::\"spiffe://test.example/svc\", action, resource);",
    );
    ok(&server, &["policy", "put", "svc", "--file", &policy]);
    ok(
        &server,
        &[
            "identity",
            "register",
            "spiffe://test.example/*",
            "--owner",
            "team",
            "--purpose",
            "tests",
            "--expires",
            "7d",
            "--label",
            "tier=prod",
        ],
    );
    let cert = svid(&trusted, "spiffe://test.example/svc", Shape::Valid);
    let gen = || GenerateDataKeyRequest {
        key: "reload".into(),
        encryption_context: HashMap::new(),
        spec: 0,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = |server: &Server| {
        rt.block_on(async {
            let mut c = client(server, Some(cert.clone())).await;
            c.generate_data_key(gen())
                .await
                .map(drop)
                .map_err(|s| s.code())
        })
    };
    assert_eq!(code(&server), Ok(()));

    // A policy deletion, then a new version, apply from the next request.
    ok(&server, &["policy", "delete", "svc"]);
    assert_eq!(code(&server), Err(Code::PermissionDenied));
    ok(&server, &["policy", "put", "svc", "--file", &policy]);
    assert_eq!(code(&server), Ok(()));

    // Removing the trust bundle refuses the workload's certificate; setting it again restores.
    ok(&server, &["trust-bundle", "remove", "test.example"]);
    assert_eq!(code(&server), Err(Code::Unauthenticated));
    ok(
        &server,
        &["trust-bundle", "set", "test.example", "--file", &bundle],
    );
    assert_eq!(code(&server), Ok(()));

    // A grant revoked by its creator is refused on the very next request, and after a restart.
    ok(
        &server,
        &[
            "identity",
            "register",
            "spiffe://other.example/agent",
            "--owner",
            "team",
            "--purpose",
            "tests",
            "--expires",
            "7d",
        ],
    );
    let other_bundle = ca("other.example workloads");
    let other_pem = write(dir.path(), "other-ca.pem", &other_bundle.pem());
    ok(
        &server,
        &["trust-bundle", "set", "other.example", "--file", &other_pem],
    );
    let agent_policy = write(
        dir.path(),
        "agent.cedar",
        "permit (principal == Workload::\"spiffe://other.example/agent\", action, resource) when { context has grant };",
    );
    ok(
        &server,
        &["policy", "put", "agent", "--file", &agent_policy],
    );
    let agent = svid(&other_bundle, "spiffe://other.example/agent", Shape::Valid);
    let grant = rt.block_on(async {
        client(&server, Some(cert.clone()))
            .await
            .create_grant(CreateGrantRequest {
                grantee: "spiffe://other.example/agent".into(),
                key: "reload".into(),
                operations: vec!["GenerateDataKey".into()],
                required_context: HashMap::new(),
                ttl_seconds: 600,
                max_uses: 0,
            })
            .await
            .unwrap()
            .into_inner()
    });
    let agent_code = |server: &Server| {
        rt.block_on(async {
            let mut c = client(server, Some(agent.clone())).await;
            c.generate_data_key(with_grant(gen(), Some(&grant.token)))
                .await
                .map(drop)
                .map_err(|s| s.code())
        })
    };
    assert_eq!(agent_code(&server), Ok(()));
    let revoked = rt.block_on(async {
        client(&server, Some(cert.clone()))
            .await
            .revoke_grant(api::v1::RevokeGrantRequest {
                grant_id: grant.grant_id.clone(),
                all: false,
            })
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(revoked.revoked, vec![grant.grant_id.clone()]);
    assert_eq!(agent_code(&server), Err(Code::PermissionDenied));
    let listed = server.kms_json(&["grant", "list", "--include-inactive"]);
    assert_eq!(listed["grants"][0]["uses"], 1);
    assert!(listed["grants"][0]["revoked_at"].is_string());

    // Deactivation takes effect at once and survives a restart, as do the policy and bundle.
    ok(
        &server,
        &["identity", "deactivate", "spiffe://test.example/*"],
    );
    assert_eq!(code(&server), Err(Code::PermissionDenied));
    let history = server.kms_json(&["policy", "list", "--include-deleted"]);
    let svc = history["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "svc")
        .unwrap();
    assert_eq!(svc["version"], 3, "put, delete, put again");
    server.stop();
    let server = Server::start(KMS, dir.path());
    assert_eq!(code(&server), Err(Code::PermissionDenied));
    assert_eq!(agent_code(&server), Err(Code::PermissionDenied));
    let grants = server.kms_json(&["grant", "list", "--include-inactive"]);
    assert!(grants["grants"][0]["revoked_at"].is_string());
    let listed = server.kms_json(&[
        "identity",
        "list",
        "--include-inactive",
        "--label",
        "tier=prod",
    ]);
    assert_eq!(listed["workloads"][0]["active"], false);
    let diff = server.kms(&["policy", "diff", "svc", "--from", "1", "--to", "3"]);
    assert!(diff.status.success());
    // `policy get`, current and by version (its --version once clashed with clap's own and
    // panicked; issue 20, item 11).
    let current = server.kms_json(&["policy", "get", "svc"]);
    assert_eq!(
        (current["id"].as_str(), current["version"].as_u64()),
        (Some("svc"), Some(3))
    );
    let first = server.kms_json(&["policy", "get", "svc", "--version", "1"]);
    assert_eq!(first["version"], 1);
    assert_eq!(
        first["text"], current["text"],
        "the same file was put twice"
    );

    // Policy test explains a decision without making a call.
    let verdict = server.kms_json(&[
        "--json",
        "policy",
        "test",
        "--principal",
        "spiffe://test.example/svc",
        "--action",
        "Decrypt",
        "--key",
        "reload",
    ]);
    assert_eq!(verdict["decision"], "deny");
    assert_eq!(verdict["identity_denial"], "identity.deactivated");

    // Invalid input is refused with a clear message, and changes nothing.
    let bad = write(
        dir.path(),
        "bad.cedar",
        "permit (principal, action, resource) when { principal.nickname == \"x\" };",
    );
    let out = server.kms(&["policy", "put", "bad", "--file", &bad]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("policy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.kms(&[
        "identity",
        "register",
        "spiffe://test.example/x",
        "--owner",
        "t",
        "--purpose",
        "p",
        "--expires",
        "9999d",
    ]);
    assert!(!out.status.success());
    let out = server.kms(&["trust-bundle", "set", "Bad Domain", "--file", &bundle]);
    assert!(!out.status.success());
}

/// A JWT-SVID signed by `key` (PKCS#8 DER of a P-256 key) with key id `kid`.
fn jwt(key_der: &[u8], kid: &str, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_ec_der(key_der),
    )
    .unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn jwt_svids_are_verified_against_their_trust_domains_jwks() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let ok = |args: &[&str]| server.kms_change(args);
    let signer = KeyPair::generate().unwrap();
    let stranger = KeyPair::generate().unwrap();
    let point = signer.public_key_raw();
    assert_eq!(point.len(), 65, "uncompressed P-256 point");
    let jwks = serde_json::json!({ "keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
        "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
    }]});
    let jwks_file = write(dir.path(), "jwks.json", &jwks.to_string());
    ok(&["trust-bundle", "set", "jwt.example", "--jwks", &jwks_file]);
    ok(&["key", "create", "--alias", "jwt"]);
    let policy = write(
        dir.path(),
        "jwt.cedar",
        "permit (principal == Workload::\"spiffe://jwt.example/svc\", action, resource) when { context.auth_method == \"jwt\" };",
    );
    ok(&["policy", "put", "jwt", "--file", &policy]);
    ok(&[
        "identity",
        "register",
        "spiffe://jwt.example/svc",
        "--owner",
        "team",
        "--purpose",
        "tests",
        "--expires",
        "7d",
    ]);

    let now = unix_now();
    let claims = |sub: &str, aud: &str, exp: Option<u64>| {
        let mut c = serde_json::json!({ "sub": sub, "aud": [aud], "iat": now });
        if let Some(e) = exp {
            c["exp"] = e.into();
        }
        c
    };
    let good = jwt(
        &signer.serialize_der(),
        "k1",
        &claims("spiffe://jwt.example/svc", "sovereign-kms", Some(now + 300)),
    );
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("valid", good.clone(), None),
        (
            "wrong audience",
            jwt(
                &signer.serialize_der(),
                "k1",
                &claims("spiffe://jwt.example/svc", "someone-else", Some(now + 300)),
            ),
            Some("jwt.wrong_audience"),
        ),
        (
            "expired",
            jwt(
                &signer.serialize_der(),
                "k1",
                &claims("spiffe://jwt.example/svc", "sovereign-kms", Some(now - 10)),
            ),
            Some("jwt.expired"),
        ),
        (
            "no expiry",
            jwt(
                &signer.serialize_der(),
                "k1",
                &claims("spiffe://jwt.example/svc", "sovereign-kms", None),
            ),
            Some("jwt.no_expiry"),
        ),
        (
            "valid for too long",
            jwt(
                &signer.serialize_der(),
                "k1",
                &claims(
                    "spiffe://jwt.example/svc",
                    "sovereign-kms",
                    Some(now + 7200),
                ),
            ),
            Some("jwt.lifetime_too_long"),
        ),
        (
            "unknown key id",
            jwt(
                &signer.serialize_der(),
                "k2",
                &claims("spiffe://jwt.example/svc", "sovereign-kms", Some(now + 300)),
            ),
            Some("jwt.unknown_key"),
        ),
        (
            "signed by another key",
            jwt(
                &stranger.serialize_der(),
                "k1",
                &claims("spiffe://jwt.example/svc", "sovereign-kms", Some(now + 300)),
            ),
            Some("jwt.bad_signature"),
        ),
        (
            "trust domain without keys",
            jwt(
                &signer.serialize_der(),
                "k1",
                &claims(
                    "spiffe://elsewhere.example/svc",
                    "sovereign-kms",
                    Some(now + 300),
                ),
            ),
            Some("svid.unknown_trust_domain"),
        ),
        (
            "HS256",
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims("spiffe://jwt.example/svc", "sovereign-kms", Some(now + 300)),
                &jsonwebtoken::EncodingKey::from_secret(b"guessable"),
            )
            .unwrap(),
            Some("jwt.algorithm_not_allowed"),
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = client(&server, None).await;
        for (name, token, refusal) in &cases {
            let mut request = tonic::Request::new(GenerateDataKeyRequest {
                key: "jwt".into(),
                encryption_context: HashMap::new(),
                spec: 0,
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            let outcome = c.generate_data_key(request).await;
            match refusal {
                None => assert!(outcome.is_ok(), "{name}: {outcome:?}"),
                Some(_) => assert_eq!(outcome.unwrap_err().code(), Code::Unauthenticated, "{name}"),
            }
        }
        let mut admin = server
            .client_tls("operator1")
            .admin(&server.admin)
            .await
            .unwrap();
        let page = admin
            .query_audit(QueryAuditRequest {
                decision: "deny".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let reasons: Vec<String> = page
            .records
            .iter()
            .map(|r| {
                serde_json::from_str::<Value>(&r.record_json).unwrap()["event"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        for (name, _, refusal) in &cases {
            if let Some(reason) = refusal {
                assert!(
                    reasons.iter().any(|r| r == reason),
                    "{name}: no record with {reason} in {reasons:?}"
                );
            }
        }
        let allowed = admin
            .query_audit(QueryAuditRequest {
                principal: "spiffe://jwt.example/svc".into(),
                decision: "allow".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let event = serde_json::from_str::<Value>(&allowed.records[0].record_json).unwrap();
        assert_eq!(event["event"]["auth"], "jwt");
    });

    // The CLI presents a JWT-SVID without a client certificate.
    let token_file = write(dir.path(), "svid.jwt", &good);
    let out = server.kms_json(&[
        "data",
        "--jwt-file",
        &token_file,
        "generate-key",
        "--key",
        "jwt",
    ]);
    assert!(out["ciphertext"].is_string());
}

#[test]
fn identity_report_lists_keys_no_registration_may_use() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let keys = |report: &Value| -> Vec<String> {
        let mut k: Vec<String> = report["unusable_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["alias"].as_str().unwrap().to_owned())
            .collect();
        k.sort();
        k
    };
    for (alias, label) in [
        ("pay", "team=payments"),
        ("billing", "team=billing"),
        ("retired", "retired=yes"),
    ] {
        server.kms_json(&["key", "create", "--alias", alias, "--label", label]);
    }
    // The development workload may use every key until its policy goes.
    assert_eq!(
        keys(&server.kms_json(&["identity", "report"])),
        Vec::<String>::new()
    );
    server.kms_approved(&["policy", "delete", "dev-workload"]);
    // No policy at all: nothing may use any key.
    let report = server.kms_json(&["identity", "report"]);
    assert_eq!(report["keys_checked"], 3);
    assert_eq!(keys(&report), ["billing", "pay", "retired"]);

    let same_team = write(
        dir.path(),
        "team.cedar",
        r#"permit (principal, action == Action::"Decrypt", resource)
           when { principal.hasTag("team") && resource.hasTag("team") &&
                  principal.getTag("team") == resource.getTag("team") };
           forbid (principal, action, resource) when { resource.hasTag("retired") };"#,
    );
    server.kms_approved(&["policy", "put", "team", "--file", &same_team]);
    server.kms_approved(&[
        "identity",
        "register",
        "spiffe://test.example/payments",
        "--owner",
        "team",
        "--purpose",
        "tests",
        "--expires",
        "7d",
        "--label",
        "team=payments",
    ]);
    let report = server.kms_json(&["identity", "report"]);
    assert_eq!(keys(&report), ["billing", "retired"]);

    // A fleet registration is an unknown workload: a key some permit could match for it is
    // no longer certainly unusable; a key every request is forbidden on stays listed.
    server.kms_approved(&[
        "identity",
        "register",
        "spiffe://test.example/fleet/*",
        "--owner",
        "team",
        "--purpose",
        "tests",
        "--expires",
        "7d",
    ]);
    let report = server.kms_json(&["identity", "report"]);
    assert_eq!(keys(&report), ["retired"]);
    // Disabled keys are left out; --skip-keys leaves the check out.
    server.kms_json(&["key", "disable", "retired"]);
    assert_eq!(
        keys(&server.kms_json(&["identity", "report"])),
        Vec::<String>::new()
    );
    let skipped = server.kms_json(&["identity", "report", "--skip-keys"]);
    assert!(skipped["unusable_keys"].is_null());
}

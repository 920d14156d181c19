//! Backup export and the quorum recovery ceremony end to end (docs/RECOVERY.md), with the real
//! binary, real SoftHSM2 tokens and real RocksDB directories: a deployment with keys of both
//! protection levels, rotations, an alias, a disabled and a destroyed key, policies,
//! registrations, a live grant and 200 data-key blobs kept by the client is exported (approved
//! by two operators), deleted, and recovered by two custodians onto a new token in a new
//! directory; every blob opens to the same key again. Then every refusal the ceremony owes,
//! each leaving the target untouched.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use api::v1::{DecryptRequest, GenerateDataKeyRequest};
use kms_tests::{audit_events, pkcs11_tool_objects, Server};
use serde_json::Value;

const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");

fn kms(dir: &Path, args: &[&str]) -> Output {
    kms_tests::kms_in(KMS, dir, args)
}

fn kms_ok(dir: &Path, args: &[&str]) -> Value {
    let out = kms(dir, args);
    assert!(
        out.status.success(),
        "kms {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Runs a command that must fail; returns its error text.
fn kms_err(dir: &Path, args: &[&str]) -> String {
    let out = kms(dir, args);
    assert!(!out.status.success(), "kms {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ctx(i: usize) -> HashMap<String, String> {
    HashMap::from([("blob".to_owned(), i.to_string())])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A data-plane client with the workload certificate in `pki` and the server CA of `server`.
async fn data_client(server: &Server, pki: &Path) -> api::DataClient {
    api::ClientTls {
        server_ca_pem: std::fs::read(server.dir.join(".kms/pki/server-ca.pem")).unwrap(),
        cert_pem: std::fs::read(pki.join("workload.pem")).unwrap(),
        key_pem: std::fs::read(pki.join("workload.key")).unwrap(),
        server_name: "localhost".into(),
    }
    .data(&server.data)
    .await
    .unwrap()
}

/// `kms operator list --json` prints one operator per line.
fn operators(server: &Server) -> Value {
    let out = server.kms(&["operator", "list", "--json"]);
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect()
}

struct Blob {
    key: String,
    context: usize,
    plaintext: Vec<u8>,
    ciphertext: Vec<u8>,
}

fn make_blobs(server: &Server, keys: &[(&str, usize)], first: usize) -> Vec<Blob> {
    let pki = server.dir.join(".kms/pki");
    runtime().block_on(async {
        let mut c = data_client(server, &pki).await;
        let mut out = Vec::new();
        let mut i = first;
        for (key, n) in keys {
            for _ in 0..*n {
                let r = c
                    .generate_data_key(GenerateDataKeyRequest {
                        key: (*key).to_owned(),
                        encryption_context: ctx(i),
                        spec: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                out.push(Blob {
                    key: (*key).to_owned(),
                    context: i,
                    plaintext: r.plaintext.clone(),
                    ciphertext: r.ciphertext.clone(),
                });
                i += 1;
            }
        }
        out
    })
}

/// What the quorum and the operators keep outside the deployment.
struct Kept {
    dir: tempfile::TempDir,
    bundle: PathBuf,
}

impl Kept {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Copies the files a custodian or client keeps out of the old data directory.
fn keep(old: &Path, kept: &Path) {
    let kms_dir = old.join(".kms");
    for name in ["alice", "bob", "carol"] {
        for ext in ["key", "share.age"] {
            let file = format!("{name}.{ext}");
            std::fs::copy(kms_dir.join("custodians").join(&file), kept.join(&file)).unwrap();
        }
    }
    for name in ["workload.pem", "workload.key"] {
        std::fs::copy(kms_dir.join("pki").join(name), kept.join(name)).unwrap();
    }
}

/// `age -d -i KEY FILE > OUT`, as a custodian runs it.
fn age_decrypt(identity: &Path, file: &Path, out: &Path) {
    let done = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg("-o")
        .arg(out)
        .arg(file)
        .status()
        .expect("the age tool is installed (scripts/install-deps.sh)");
    assert!(done.success());
}

fn exported_bundle(server: &Server, out: &Path) -> Value {
    let out = out.to_str().unwrap();
    let asked = server.kms_json(&["--as", "operator1", "backup", "export", "--out", out]);
    assert_eq!(asked["state"], "pending", "{asked}");
    assert!(
        !Path::new(out).exists(),
        "nothing is written before the approvals"
    );
    let id = asked["approval_id"].as_str().unwrap().to_owned();
    let once = server.kms_json(&["--as", "operator2", "approval", "approve", &id]);
    assert_eq!(once["state"], "pending");
    let ran = server.kms_json(&["--as", "operator3", "approval", "approve", &id]);
    assert_eq!(ran["state"], "executed", "{ran}");
    let got = server.kms_json(&["--as", "operator1", "backup", "export", "--out", out]);
    assert!(Path::new(out).exists());
    got
}

#[test]
fn a_deployment_is_exported_deleted_and_recovered_by_two_custodians() {
    let old_tmp = tempfile::tempdir().unwrap();
    let old = old_tmp.path();
    let kept = Kept {
        dir: tempfile::tempdir().unwrap(),
        bundle: PathBuf::new(),
    };
    let server = Server::start(KMS, old);

    // Keys of both levels, rotations, an alias, a disabled key, a destroyed key.
    server.kms_json(&["key", "create", "--alias", "soft"]);
    server.kms_json(&["key", "create", "--alias", "hard", "--protection", "hsm"]);
    server.kms_json(&["key", "create", "--alias", "gone", "--protection", "hsm"]);
    server.kms_json(&["key", "create", "--alias", "paused"]);
    let mut blobs = make_blobs(&server, &[("soft", 40), ("hard", 40), ("paused", 10)], 0);
    server.kms_json(&["key", "rotate", "soft"]);
    server.kms_json(&["key", "rotate", "hard"]);
    blobs.extend(make_blobs(&server, &[("soft", 40), ("hard", 30)], 1000));
    server.kms_json(&["key", "rotate", "soft"]);
    blobs.extend(make_blobs(&server, &[("soft", 40)], 2000));
    let doomed = make_blobs(&server, &[("gone", 3)], 3000);
    server.kms_json(&["key", "disable", "paused"]);
    server.kms_approved(&["key", "schedule-destroy", "gone", "--waiting-days", "7"]);
    server.kms_json(&["dev", "advance-clock", "8d"]);
    let gone_id = server.kms_json(&["key", "describe", "gone"])["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(server.log_shows(
        &format!("destruction receipt recorded for key {gone_id}"),
        Duration::from_secs(20)
    ));
    assert_eq!(blobs.len(), 200);
    // A live grant.
    let grant = server.kms_json(&[
        "grant",
        "create",
        "--grantee",
        "spiffe://dev.sovereign-kms.local/workload/other",
        "--key",
        "soft",
        "--op",
        "Decrypt",
        "--token-out",
        old.join("grant.token").to_str().unwrap(),
    ]);
    assert!(grant["grant_id"].is_string(), "{grant}");
    let policies_before = server.kms_json(&["policy", "list"]);
    let workloads_before = server.kms_json(&["identity", "list"]);
    let operators_before = operators(&server);
    let keys_before = server.kms_json(&["key", "list"]);
    let grants_before = server.kms_json(&["grant", "list"]);

    // The export: gated, approved by two other operators, then downloaded by the requester.
    let bundle = kept.path("deployment.bundle");
    let exported = exported_bundle(&server, &bundle);
    // soft 3 + hard 2 + paused 1 (gone's versions were destroyed).
    assert_eq!(exported["key_versions"], 6, "{exported}");
    let inspected = server.kms_json(&["backup", "inspect", bundle.to_str().unwrap()]);
    assert_eq!(inspected["bundle_sha256"], exported["bundle_sha256"]);
    assert_eq!(inspected["counts"]["versions.software"], 4);
    assert_eq!(inspected["counts"]["versions.hsm"], 2);
    assert_eq!(inspected["epoch"], 1);
    // Only the quorum can check the signature; the bundle holds no root-wrapped material.
    let raw = std::fs::read(&bundle).unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("PRIVATE KEY"));
    // A ticket serves one download.
    let again = server.kms_json(&[
        "--as",
        "operator1",
        "backup",
        "export",
        "--out",
        kept.path("second.bundle").to_str().unwrap(),
    ]);
    assert_eq!(
        again["state"], "pending",
        "a second download needs new approvals"
    );
    let old_head = inspected["audit_head"].clone();
    let events = {
        let log = server.stop();
        assert!(!log.contains("panicked"));
        audit_events(KMS, old)
    };
    assert!(events.iter().any(|e| e["action"] == "backup.exported"
        && e["detail"]["bundle_sha256"] == exported["bundle_sha256"]
        && e["detail"]["approvers"]
            .as_str()
            .unwrap()
            .split(',')
            .count()
            == 2));

    // The old site is lost: only the bundle, the custodians' files and the client's
    // certificate survive.
    keep(old, kept.dir.path());
    std::fs::remove_dir_all(old.join(".kms")).unwrap();
    let kept = Kept {
        bundle: bundle.clone(),
        ..kept
    };

    // Bob decrypts his share with the standard age tool; alice gives hers with her identity.
    let bob_plain = kept.path("bob.share.json");
    age_decrypt(
        &kept.path("bob.key"),
        &kept.path("bob.share.age"),
        &bob_plain,
    );
    let new_tmp = tempfile::tempdir().unwrap();
    let new = new_tmp.path();
    let recovered = kms_ok(
        new,
        &[
            "ceremony",
            "recover",
            "--bundle",
            kept.bundle.to_str().unwrap(),
            "--share",
            kept.path("alice.share.age").to_str().unwrap(),
            "--identity",
            kept.path("alice.key").to_str().unwrap(),
            "--decrypted",
            bob_plain.to_str().unwrap(),
            "--dev",
            "--json",
        ],
    );
    assert_eq!(recovered["key_versions_restored"], 6, "{recovered}");
    assert_eq!(recovered["hsm"], 2);
    let head_seq = old_head["seq"].as_u64().unwrap();
    assert_eq!(recovered["audit_head"]["seq"], head_seq + 1);
    // The hsm versions are token objects of the new token, imported (not local).
    let objects = pkcs11_tool_objects(new);
    assert!(objects.contains("sovereign-kms/kek/"), "{objects}");

    // The old workload certificate works against the recovered deployment.
    for name in ["workload.pem", "workload.key"] {
        std::fs::copy(kept.path(name), new.join(".kms/pki").join(name)).unwrap();
    }
    let server = Server::start(KMS, new);
    let pki = new.join(".kms/pki");
    runtime().block_on(async {
        let mut c = data_client(&server, &pki).await;
        for b in &blobs {
            let got = c
                .decrypt(DecryptRequest {
                    ciphertext: b.ciphertext.clone(),
                    encryption_context: ctx(b.context),
                })
                .await;
            match (b.key.as_str(), got) {
                ("paused", Err(s)) => assert_eq!(s.code(), tonic::Code::FailedPrecondition),
                (_, Ok(r)) => assert_eq!(r.into_inner().plaintext, b.plaintext),
                (k, Err(s)) => panic!("blob of {k} did not open: {s:?}"),
            }
        }
        for b in &doomed {
            let s = c
                .decrypt(DecryptRequest {
                    ciphertext: b.ciphertext.clone(),
                    encryption_context: ctx(b.context),
                })
                .await
                .unwrap_err();
            assert!(s.message().contains("key destroyed"), "{s:?}");
        }
    });
    server.kms_json(&["key", "enable", "paused"]);
    runtime().block_on(async {
        let mut c = data_client(&server, &pki).await;
        for b in blobs.iter().filter(|b| b.key == "paused") {
            let r = c
                .decrypt(DecryptRequest {
                    ciphertext: b.ciphertext.clone(),
                    encryption_context: ctx(b.context),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.plaintext, b.plaintext);
        }
    });
    // Governance answers as before.
    assert_eq!(server.kms_json(&["policy", "list"]), policies_before);
    let strip = |v: Value, drop: &[&str]| -> Value {
        let mut v = v;
        fn walk(v: &mut Value, drop: &[&str]) {
            match v {
                Value::Object(m) => {
                    for k in drop {
                        m.remove(*k);
                    }
                    m.values_mut().for_each(|x| walk(x, drop));
                }
                Value::Array(a) => a.iter_mut().for_each(|x| walk(x, drop)),
                _ => {}
            }
        }
        walk(&mut v, drop);
        v
    };
    // Usage counters and last-seen times move with use; the rest must be equal.
    let volatile = ["last_seen", "calls", "warning"];
    assert_eq!(
        strip(server.kms_json(&["identity", "list"]), &volatile),
        strip(workloads_before, &volatile)
    );
    assert_eq!(
        strip(operators(&server), &volatile),
        strip(operators_before, &volatile)
    );
    let keys_after = server.kms_json(&["key", "list"]);
    let states = |v: &Value| -> BTreeMap<String, (Value, Value)> {
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["key_id"].as_str().unwrap().to_owned(),
                    (k["state"].clone(), k["current_version"].clone()),
                )
            })
            .collect()
    };
    let mut expected = states(&keys_before);
    if let Some(paused) = expected.values_mut().find(|(s, _)| s == "disabled") {
        paused.0 = Value::from("enabled");
    }
    assert_eq!(states(&keys_after), expected);
    assert_eq!(
        strip(server.kms_json(&["grant", "list"]), &volatile),
        strip(grants_before, &volatile)
    );
    // New hsm keys are escrowed again under the restored escrow key.
    let fresh = server.kms_json(&["key", "create", "--alias", "after", "--protection", "hsm"]);
    assert_eq!(fresh["protection"], "hsm", "{fresh}");
    let status = kms_ok(new, &["ceremony", "status", "--json"]);
    assert_eq!(
        status["unescrowed_versions"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    let log = server.stop();
    assert!(!log.contains("panicked"));
    // The audit chain continues from the bundle's head, and says where.
    let verified = kms_ok(new, &["audit", "verify", "--json"]);
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["recovered"]["bundle_head_seq"], head_seq);
    assert_eq!(verified["recovered"]["bundle_head_hash"], old_head["hash"]);
    assert_eq!(
        verified["recovered"]["bundle_sha256"],
        exported["bundle_sha256"]
    );
    let events = audit_events(KMS, new);
    let first = &events[0];
    assert_eq!(first["action"], "custody.recovered");
    assert_eq!(first["detail"]["bundle_head_seq"], head_seq.to_string());
    assert!(first["detail"]["hsm_versions"]
        .as_str()
        .unwrap()
        .contains("restored from escrow"));
}

/// The target directory's entries, to show a refused recovery left it as it was.
fn entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            let mut v: Vec<String> = rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    }
}

#[test]
fn every_bad_input_is_refused_with_its_own_error_and_the_target_is_untouched() {
    let a_tmp = tempfile::tempdir().unwrap();
    let a = a_tmp.path();
    let kept = tempfile::tempdir().unwrap();
    let k = |n: &str| kept.path().join(n);
    let server = Server::start(KMS, a);
    server.kms_json(&["key", "create", "--alias", "soft"]);
    server.kms_json(&["key", "create", "--alias", "hard", "--protection", "hsm"]);
    let bundle = k("a.bundle");
    exported_bundle(&server, &bundle);
    drop(server.stop());
    keep(a, kept.path());
    // Another deployment, with its own custodians.
    let b_tmp = tempfile::tempdir().unwrap();
    let b = b_tmp.path();
    let other = Server::start(KMS, b);
    drop(other.stop());

    let target_tmp = tempfile::tempdir().unwrap();
    let target = target_tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let recover = |extra: &[String]| -> String {
        let mut args: Vec<String> = vec!["ceremony".into(), "recover".into()];
        args.extend(extra.iter().cloned());
        args.push("--dev".into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = kms_err(target, &refs);
        assert!(
            entries(&target.join(".kms")).is_empty(),
            "a refused recovery left {:?}",
            entries(&target.join(".kms"))
        );
        err
    };
    let share = |name: &str, bundle: &Path| -> Vec<String> {
        vec![
            "--bundle".into(),
            s(bundle),
            "--share".into(),
            s(&k(&format!("{name}.share.age"))),
            "--identity".into(),
            s(&k(&format!("{name}.key"))),
        ]
    };
    let with = |mut base: Vec<String>, more: &[&str]| {
        base.extend(more.iter().map(|m| (*m).to_owned()));
        base
    };

    // k − 1 shares.
    let err = recover(&share("alice", &bundle));
    assert!(err.contains("1 of 2 shares given; 1 more needed"), "{err}");
    // The same custodian twice.
    let alice = s(&k("alice.share.age"));
    let err = recover(&with(share("alice", &bundle), &["--share", &alice]));
    assert!(err.contains("custodian alice is given twice"), "{err}");
    // A share of another deployment.
    let other_share = s(&b.join(".kms/custodians/bob.share.age"));
    let other_key = s(&b.join(".kms/custodians/bob.key"));
    let err = recover(&with(
        share("alice", &bundle),
        &["--share", &other_share, "--identity", &other_key],
    ));
    assert!(
        err.contains("bob.share.age") && err.contains("another deployment"),
        "{err}"
    );
    // One flipped byte in a share file.
    let mut bytes = std::fs::read(k("bob.share.age")).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 1;
    std::fs::write(k("bob-flipped.share.age"), &bytes).unwrap();
    let flipped = s(&k("bob-flipped.share.age"));
    let bob_key = s(&k("bob.key"));
    let err = recover(&with(
        share("alice", &bundle),
        &["--share", &flipped, "--identity", &bob_key],
    ));
    assert!(
        err.contains("bob-flipped.share.age") && err.contains("damaged"),
        "{err}"
    );
    let good = |b: &Path| {
        with(
            share("alice", b),
            &["--share", &s(&k("bob.share.age")), "--identity", &bob_key],
        )
    };
    // One flipped byte in the bundle's body, and in its signature.
    let raw = std::fs::read(&bundle).unwrap();
    let parsed = kms_core::bundle::parse(&raw).unwrap();
    let mut body = raw.clone();
    let mid = raw.len() / 2;
    body[mid] ^= 1;
    std::fs::write(k("body.bundle"), &body).unwrap();
    let err = recover(&good(&k("body.bundle")));
    assert!(err.contains("body.bundle"), "{err}");
    let mut sig = raw.clone();
    let last = sig.len() - 5;
    sig[last] ^= 1;
    std::fs::write(k("sig.bundle"), &sig).unwrap();
    let err = recover(&good(&k("sig.bundle")));
    assert!(
        err.contains("sig.bundle") && err.contains("not authentic"),
        "{err}"
    );
    // A bundle re-signed by a key the transcript does not pin.
    let stranger = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    )
    .unwrap();
    let mut header = parsed.header.clone();
    let point = aws_lc_rs::signature::KeyPair::public_key(&stranger)
        .as_ref()
        .to_vec();
    header.signer = kms_core::bundle::BundleSigner {
        id: kms_core::audit::signer_id(&point),
        public_point: hex::encode(&point),
    };
    let forged = kms_core::bundle::encode(header, &parsed.records, |digest| {
        let digest =
            aws_lc_rs::digest::Digest::import_less_safe(digest, &aws_lc_rs::digest::SHA256)
                .unwrap();
        Ok(stranger.sign_digest(&digest).unwrap().as_ref().to_vec())
    })
    .unwrap();
    std::fs::write(k("forged.bundle"), &forged).unwrap();
    let err = recover(&good(&k("forged.bundle")));
    assert!(
        err.contains("forged.bundle") && err.contains("pinned signer"),
        "{err}"
    );
    // A target directory that is not empty.
    std::fs::create_dir_all(target.join(".kms")).unwrap();
    std::fs::write(target.join(".kms/notes.txt"), b"keep me").unwrap();
    let mut args: Vec<String> = vec!["ceremony".into(), "recover".into()];
    args.extend(good(&bundle));
    args.push("--dev".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = kms_err(target, &refs);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(entries(&target.join(".kms")), vec!["notes.txt".to_owned()]);
    std::fs::remove_file(target.join(".kms/notes.txt")).unwrap();
    // A target token that is not empty: the other deployment's.
    let other_kms = b.join(".kms");
    let data = k("new-data");
    let config = k("new.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[hsm]\ntoken_label = \"sovereign-kms-dev\"\npin_file = \"{}\"\nsofthsm2_conf = \"{}\"\n[tls]\nserver_cert = \"{}\"\nserver_key = \"{}\"\nadmin_client_ca = \"{}\"\n",
            data.display(),
            other_kms.join("secrets/user.pin").display(),
            other_kms.join("softhsm2.conf").display(),
            other_kms.join("pki/server.pem").display(),
            other_kms.join("pki/server.key").display(),
            other_kms.join("pki/operator-ca.pem").display(),
        ),
    )
    .unwrap();
    let before = pkcs11_tool_objects(b);
    let mut args: Vec<String> = vec!["ceremony".into(), "recover".into()];
    args.extend(good(&bundle));
    args.extend(["--config".into(), s(&config)]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    // The development token's files are found relative to its deployment's directory.
    let err = kms_err(b, &refs);
    assert!(
        err.contains("is not empty") && err.contains("objects"),
        "{err}"
    );
    assert!(entries(&data).is_empty(), "{:?}", entries(&data));
    assert_eq!(pkcs11_tool_objects(b), before);
    // And with all of it right, the same target recovers.
    let mut args: Vec<String> = vec!["ceremony".into(), "recover".into()];
    args.extend(good(&bundle));
    args.extend(["--dev".into(), "--json".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let done = kms_ok(target, &refs);
    assert_eq!(done["key_versions_restored"], 2, "{done}");
}

#[test]
fn bundle_parser_survives_every_truncation_of_a_real_bundle() {
    // The property tests in kms_core::bundle cover random flips of synthetic bundles; this
    // one cuts a real exported bundle at every length.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    server.kms_json(&["key", "create", "--alias", "soft"]);
    let bundle = dir.path().join("b.bundle");
    exported_bundle(&server, &bundle);
    drop(server.stop());
    let raw = std::fs::read(&bundle).unwrap();
    assert!(kms_core::bundle::parse(&raw).is_ok());
    for len in 0..raw.len() {
        assert!(
            kms_core::bundle::parse(&raw[..len]).is_err(),
            "cut at {len}"
        );
    }
    let cut = dir.path().join("cut.bundle");
    std::fs::write(&cut, &raw[..raw.len() - 1]).unwrap();
    let err = kms_err(
        dir.path(),
        &["backup", "inspect", cut.to_str().unwrap(), "--json"],
    );
    assert!(err.contains("cut.bundle"), "{err}");
    let shown = kms_ok(
        dir.path(),
        &["backup", "inspect", bundle.to_str().unwrap(), "--json"],
    );
    assert_eq!(shown["counts"]["versions.software"], 1, "{shown}");
}

/// A new age identity made with the standard tool; returns (identity file, recipient).
fn age_keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{name}.key"));
    let made = Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .expect("age-keygen is installed (scripts/install-deps.sh)");
    assert!(made.status.success());
    let public = Command::new("age-keygen")
        .arg("-y")
        .arg(&key)
        .output()
        .unwrap();
    assert!(public.status.success());
    (
        key,
        String::from_utf8(public.stdout).unwrap().trim().to_owned(),
    )
}

#[test]
fn a_reshare_moves_recovery_to_new_custodians_and_old_shares_lose_later_bundles() {
    let a_tmp = tempfile::tempdir().unwrap();
    let a = a_tmp.path();
    let kept_tmp = tempfile::tempdir().unwrap();
    let kept = kept_tmp.path();
    let k = |n: &str| kept.join(n).to_str().unwrap().to_owned();
    let server = Server::start(KMS, a);
    server.kms_json(&["key", "create", "--alias", "soft"]);
    server.kms_json(&["key", "rotate", "soft"]);
    server.kms_json(&["key", "create", "--alias", "hard", "--protection", "hsm"]);
    let before = kept.join("before.bundle");
    exported_bundle(&server, &before);
    keep(a, kept);

    // The new custodians make their own age identities; the plan is authorised on line.
    let new_ids: Vec<(PathBuf, String)> = ["dave", "erin", "frank"]
        .iter()
        .map(|n| age_keygen(kept, n))
        .collect();
    let custodian_flags: Vec<String> = ["dave", "erin", "frank"]
        .iter()
        .zip(&new_ids)
        .flat_map(|(n, (_, r))| ["--custodian".to_owned(), format!("{n}={r}")])
        .collect();
    let mut ask: Vec<&str> = vec![
        "--as",
        "operator1",
        "ceremony",
        "authorize-reshare",
        "--threshold",
        "2",
    ];
    ask.extend(custodian_flags.iter().map(String::as_str));
    let approved = server.kms_approved(&ask);
    let approval = approved["approval_id"].as_str().unwrap().to_owned();
    // Reshare is offline: refused while the server holds the store.
    drop(server.stop());

    let out = kept.join("epoch2");
    let reshare = |shares: &[&str], approval: Option<&str>, out: &Path| -> Output {
        let mut args: Vec<String> = vec![
            "ceremony".into(),
            "reshare".into(),
            "--threshold".into(),
            "2".into(),
        ];
        args.extend(custodian_flags.iter().cloned());
        for name in shares {
            args.extend([
                "--share".into(),
                k(&format!("{name}.share.age")),
                "--identity".into(),
                k(&format!("{name}.key")),
            ]);
        }
        if let Some(id) = approval {
            args.extend(["--approval".into(), id.to_owned()]);
        }
        args.extend([
            "--out-dir".into(),
            out.to_str().unwrap().into(),
            "--json".into(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        kms(a, &refs)
    };
    let failed = |o: &Output| -> String {
        assert!(!o.status.success(), "should have failed");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // Without the approval, with one share, or with a plan the approval does not name: refused,
    // and nothing is written.
    let err = failed(&reshare(&["alice", "bob"], None, &out));
    assert!(err.contains("authorize-reshare"), "{err}");
    let err = failed(&reshare(&["alice"], Some(&approval), &out));
    assert!(err.contains("1 of 2 shares given; 1 more needed"), "{err}");
    assert!(entries(&out).is_empty(), "{:?}", entries(&out));
    let status = kms_ok(a, &["ceremony", "status", "--json"]);
    assert_eq!(status["epoch"], 1);

    let done = reshare(&["alice", "bob"], Some(&approval), &out);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let summary: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(summary["epoch"], 2, "{summary}");
    assert_eq!(summary["previous_epoch"], 1);
    // Two software versions, the escrow key and the two deployment keys are sealed again.
    assert_eq!(summary["resealed"], 5, "{summary}");
    let transcript = std::fs::read(out.join("transcript.json")).unwrap();
    let t: Value = serde_json::from_slice(&transcript).unwrap();
    assert_eq!(t["kind"], "reshare");
    assert_eq!(t["epoch"], 2);
    assert_eq!(
        t["previous_sha256"], summary["previous_transcript_sha256"],
        "{t}"
    );
    // The new custodians open their shares with the standard tool.
    for (name, (key, _)) in ["dave", "erin", "frank"].iter().zip(&new_ids) {
        let plain = kept.join(format!("{name}.plain"));
        age_decrypt(key, &out.join(format!("{name}.share.age")), &plain);
        let opened: Value = serde_json::from_slice(&std::fs::read(&plain).unwrap()).unwrap();
        assert_eq!(opened["epoch"], 2);
    }
    // The ticket serves one reshare.
    let err = failed(&reshare(
        &["alice", "bob"],
        Some(&approval),
        &kept.join("again"),
    ));
    assert!(err.contains("used by an earlier reshare"), "{err}");
    let status = kms_ok(a, &["ceremony", "status", "--json"]);
    assert_eq!(status["epoch"], 2, "{status}");
    assert_eq!(status["threshold"], 2);
    assert_eq!(status["custodians"][0]["name"], "dave");
    assert_eq!(status["custodians"][0]["verified"], false);

    // The deployment serves on; a new software version is sealed to the new key.
    let server = Server::start(KMS, a);
    server.kms_json(&["key", "rotate", "soft"]);
    let after = kept.join("after.bundle");
    exported_bundle(&server, &after);
    let log = server.stop();
    assert!(!log.contains("panicked"));
    let verified = kms_ok(a, &["audit", "verify", "--json"]);
    assert_eq!(verified["ok"], true, "{verified}");
    let events = audit_events(KMS, a);
    let reshared = events
        .iter()
        .find(|e| e["action"] == "ceremony.reshare" && e["status"] == "ok")
        .expect("the reshare is audited");
    assert_eq!(reshared["detail"]["epoch"], "2");
    assert_eq!(reshared["detail"]["approval_id"], approval);

    let recover = |bundle: &Path, shares: &[(&str, &Path, &Path)]| -> (Output, tempfile::TempDir) {
        let target = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = vec![
            "ceremony".into(),
            "recover".into(),
            "--bundle".into(),
            bundle.to_str().unwrap().into(),
        ];
        for (_, share, key) in shares {
            args.extend([
                "--share".into(),
                share.to_str().unwrap().into(),
                "--identity".into(),
                key.to_str().unwrap().into(),
            ]);
        }
        args.extend(["--dev".into(), "--json".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        (kms(target.path(), &refs), target)
    };
    let old = [
        (
            "alice",
            kept.join("alice.share.age"),
            kept.join("alice.key"),
        ),
        ("bob", kept.join("bob.share.age"), kept.join("bob.key")),
    ];
    let old: Vec<(&str, &Path, &Path)> = old
        .iter()
        .map(|(n, s, i)| (*n, s.as_path(), i.as_path()))
        .collect();
    let new_files: Vec<(PathBuf, PathBuf)> = ["dave", "erin"]
        .iter()
        .zip(&new_ids)
        .map(|(n, (key, _))| (out.join(format!("{n}.share.age")), key.clone()))
        .collect();
    let new: Vec<(&str, &Path, &Path)> = new_files
        .iter()
        .map(|(s, i)| ("new", s.as_path(), i.as_path()))
        .collect();

    // Old shares cannot open the bundle exported after the reshare, nor new shares the one
    // from before; each refusal names the epoch and leaves the target untouched.
    let (o, target) = recover(&after, &old);
    let err = failed(&o);
    assert!(
        err.contains("alice.share.age") && err.contains("epoch 1, not of the current epoch 2"),
        "{err}"
    );
    assert!(entries(&target.path().join(".kms")).is_empty());
    let (o, _) = recover(&before, &new);
    let err = failed(&o);
    assert!(err.contains("epoch 2, not of the current epoch 1"), "{err}");

    // New shares recover the later bundle, with the version made after the reshare.
    let (o, target) = recover(&after, &new);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(got["key_versions_restored"], 4, "{got}");
    let verified = kms_ok(target.path(), &["audit", "verify", "--json"]);
    assert_eq!(verified["ok"], true, "{verified}");
    let status = kms_ok(target.path(), &["ceremony", "status", "--json"]);
    assert_eq!(status["epoch"], 2, "{status}");
    // And old shares still open the bundle from before (documented: destroy such bundles).
    let (o, _) = recover(&before, &old);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(got["key_versions_restored"], 3, "{got}");
}

/// Offline tools read the deployment's clock, not the host's: on a development deployment
/// whose clock has moved two hours on, an approved reshare (a one-hour ticket) is refused as
/// too old by the offline `kms ceremony reshare`, as the server would refuse it.
#[test]
fn an_offline_reshare_reads_the_deployments_clock() {
    let a_tmp = tempfile::tempdir().unwrap();
    let a = a_tmp.path();
    let server = Server::start(KMS, a);
    let (_, erin) = age_keygen(a, "erin");
    let (_, frank) = age_keygen(a, "frank");
    let plan = [
        "--threshold".to_owned(),
        "2".to_owned(),
        "--custodian".to_owned(),
        format!("erin={erin}"),
        "--custodian".to_owned(),
        format!("frank={frank}"),
    ];
    let mut ask: Vec<&str> = vec!["--as", "operator1", "ceremony", "authorize-reshare"];
    ask.extend(plan.iter().map(String::as_str));
    let approved = server.kms_approved(&ask);
    let approval = approved["approval_id"].as_str().unwrap().to_owned();
    drop(server.stop());

    kms_ok(a, &["dev", "advance-clock", "2h", "--json"]);
    let custodians = a.join(".kms/custodians");
    let file = |n: &str| custodians.join(n).to_str().unwrap().to_owned();
    let out = a.join("epoch2");
    let mut args: Vec<String> = vec!["ceremony".into(), "reshare".into()];
    args.extend(plan.iter().cloned());
    for name in ["alice", "bob"] {
        args.extend([
            "--share".into(),
            file(&format!("{name}.share.age")),
            "--identity".into(),
            file(&format!("{name}.key")),
        ]);
    }
    args.extend([
        "--approval".into(),
        approval,
        "--out-dir".into(),
        out.to_str().unwrap().into(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = kms_err(a, &refs);
    assert!(err.contains("more than 60 minutes ago"), "{err}");
    assert!(entries(&out).is_empty(), "{:?}", entries(&out));
    assert_eq!(kms_ok(a, &["ceremony", "status", "--json"])["epoch"], 1);
}

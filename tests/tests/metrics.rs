#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed step is a failed test"
)]
//! Metrics and health of the real `kms serve --dev` on loopback: the scrape counts what the
//! planes answered, names no caller-chosen value, and the health follows the seal, over HTTP
//! and over gRPC.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kms_tests::Server;
use tonic_health::pb::health_check_response::ServingStatus;

/// The CLI built for this test run from the current code.
const KMS: &str = env!("CARGO_BIN_EXE_kms-under-test");

/// `GET path` over plain HTTP/1.1: (status code, headers, body).
fn get(addr: &str, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, head.to_owned(), body.to_owned())
}

/// The value of the series `name{labels}` in a Prometheus text scrape.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn the_scrape_counts_what_the_planes_answered() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let key = server.kms_json(&["key", "create", "--alias", "m"])["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..3 {
        server.kms_json(&["data", "generate-key", "--key", "m"]);
    }
    let unknown = "00000000-0000-4000-8000-000000000042";
    assert!(!server
        .kms(&["data", "generate-key", "--key", unknown])
        .status
        .success());

    let (code, head, scrape) = get(&server.metrics, "/metrics", None);
    assert_eq!(code, 200);
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let ok = "kms_rpc_requests_total{plane=\"data\",method=\"GenerateDataKey\",code=\"ok\"}";
    assert_eq!(value(&scrape, ok), Some(3.0), "{scrape}");
    let refused =
        "kms_rpc_requests_total{plane=\"data\",method=\"GenerateDataKey\",code=\"permission_denied\"}";
    assert_eq!(value(&scrape, refused), Some(1.0), "{scrape}");
    let count = "kms_rpc_duration_seconds_count{plane=\"data\",method=\"GenerateDataKey\"}";
    assert_eq!(value(&scrape, count), Some(4.0), "{scrape}");
    let created = "kms_rpc_requests_total{plane=\"admin\",method=\"CreateKey\",code=\"ok\"}";
    assert_eq!(value(&scrape, created), Some(1.0), "{scrape}");
    assert_eq!(value(&scrape, "kms_sealed"), Some(0.0));
    assert!(value(&scrape, "kms_uptime_seconds").unwrap() > 0.0);
    // The development server certificate expires in the future (about a year out).
    let expiry = "kms_tls_certificate_expiry_timestamp_seconds{certificate=\"server\"}";
    let now = std::time::SystemTime::UNIX_EPOCH
        .elapsed()
        .unwrap()
        .as_secs_f64();
    assert!(value(&scrape, expiry).unwrap() > now + 86_400.0, "{scrape}");
    // What the node holds: the one key, its version, the development workload.
    let keys = "kms_keys{state=\"enabled\",protection=\"software\"}";
    assert_eq!(value(&scrape, keys), Some(1.0), "{scrape}");
    assert_eq!(
        value(&scrape, "kms_keys{state=\"destroyed\",protection=\"hsm\"}"),
        Some(0.0)
    );
    assert_eq!(
        value(&scrape, "kms_key_versions{protection=\"software\"}"),
        Some(1.0)
    );
    assert_eq!(value(&scrape, "kms_workloads{state=\"active\"}"), Some(1.0));
    assert_eq!(value(&scrape, "kms_approvals_pending"), Some(0.0));
    assert_eq!(value(&scrape, "kms_grants_live"), Some(0.0));
    // At least the three allowed requests' decisions, evaluated by Cedar or reused from the
    // decision cache (a request may take more than one decision).
    let allowed: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("kms_policy_decisions_total{effect=\"allow\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(allowed >= 3.0, "{scrape}");
    assert!(value(&scrape, "kms_policy_evaluation_duration_seconds_count").unwrap() >= 1.0);
    // The key's creation and every audit batch were synced writes; none failed.
    assert!(value(&scrape, "kms_store_write_duration_seconds_count").unwrap() >= 2.0);
    assert_eq!(value(&scrape, "kms_store_write_failures_total"), Some(0.0));
    // Every request above was recorded; the writer told how, and nothing failed.
    assert!(
        value(&scrape, "kms_audit_records_total").unwrap() >= 5.0,
        "{scrape}"
    );
    assert_eq!(value(&scrape, "kms_audit_append_failures_total"), Some(0.0));
    assert!(value(&scrape, "kms_audit_commit_duration_seconds_count").unwrap() >= 1.0);
    // The dev server signs a checkpoint at start-up (anchoring its seeding records).
    assert!(
        value(&scrape, "kms_audit_checkpoint_age_seconds").unwrap() >= 0.0,
        "{scrape}"
    );
    assert!(scrape.contains(&format!(
        "kms_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    // Nothing a caller chose is a label: not the key, not the identity, not a request id.
    for secret_ish in [key.as_str(), unknown, "spiffe://", "workload/demo"] {
        assert!(!scrape.contains(secret_ish), "{secret_ish} in the scrape");
    }
    // The scrape's own in-flight gauge has returned to 0 on both planes.
    assert_eq!(
        value(&scrape, "kms_rpc_in_flight{plane=\"data\"}"),
        Some(0.0)
    );

    let (code, head, open) = get(
        &server.metrics,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert_eq!(code, 200);
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert_eq!(get(&server.metrics, "/nothing", None).0, 404);
}

#[test]
fn health_follows_the_seal_over_http_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let (code, _, body) = get(&server.metrics, "/health", None);
    assert_eq!((code, body.as_str()), (200, "{\"status\":\"serving\"}"));
    assert_eq!(grpc_health(&server), ServingStatus::Serving);
    server.kms_json(&["key", "create"]);
    let (_, _, scrape) = get(&server.metrics, "/metrics", None);
    assert_eq!(
        value(&scrape, "kms_key_versions{protection=\"software\"}"),
        Some(1.0)
    );

    server.kms_json(&["--as", "operator2", "seal", "--reason", "drill"]);
    let (code, _, body) = get(&server.metrics, "/health", None);
    assert_eq!(code, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "not_serving");
    assert_eq!(body["reason"], "sealed");
    let (_, _, scrape) = get(&server.metrics, "/metrics", None);
    assert_eq!(value(&scrape, "kms_sealed"), Some(1.0));
    // Sealed: no usable version in memory, and the unseal waits for approvals.
    assert_eq!(
        value(&scrape, "kms_key_versions{protection=\"software\"}"),
        Some(0.0)
    );
    assert!(
        wait_for(&server, ServingStatus::NotServing),
        "gRPC health still serving"
    );

    let asked = server.kms_json(&["--as", "operator2", "unseal"]);
    let id = asked["approval_id"].as_str().unwrap().to_owned();
    let (_, _, scrape) = get(&server.metrics, "/metrics", None);
    assert_eq!(
        value(&scrape, "kms_approvals_pending"),
        Some(1.0),
        "{scrape}"
    );
    server.kms_json(&["--as", "operator1", "approval", "approve", &id]);
    let ran = server.kms_json(&["--as", "operator3", "approval", "approve", &id]);
    assert_eq!(ran["state"], "executed", "{ran}");
    assert_eq!(get(&server.metrics, "/health", None).0, 200);
    assert!(
        wait_for(&server, ServingStatus::Serving),
        "gRPC health did not come back"
    );
}

/// Watches the data plane's gRPC health (a stream of its changes) until it says `want`, for
/// at most 10 s.
fn wait_for(server: &Server, want: ServingStatus) -> bool {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = server
            .client_tls("workload")
            .channel(&server.data)
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let request = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        let mut changes = health.watch(request).await.unwrap().into_inner();
        let seen = async {
            while let Ok(Some(m)) = changes.message().await {
                if m.status == i32::from(want) {
                    return true;
                }
            }
            false
        };
        tokio::time::timeout(Duration::from_secs(10), seen)
            .await
            .unwrap_or(false)
    })
}

/// The data plane's overall gRPC health.
fn grpc_health(server: &Server) -> ServingStatus {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = server
            .client_tls("workload")
            .channel(&server.data)
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        ServingStatus::try_from(status).unwrap()
    })
}

#[test]
fn metrics_are_served_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(KMS)
        .current_dir(dir.path())
        .args(["serve", "--dev", "--metrics-addr", "0.0.0.0:9464"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");
}

/// A Prometheus server (Debian's `prometheus`) on loopback with its own directory, stopped
/// by its pid when dropped.
struct Prometheus {
    child: std::process::Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, and waits (up to 30 s) until it is
    /// ready.
    fn start(dir: &std::path::Path, target: &str) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: kms\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        // A free loopback port: bound, read and released just before Prometheus takes it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect(
                "prometheus (Debian package `prometheus`, installed by scripts/install-deps.sh)",
            );
        let p = Prometheus { child, addr };
        let ready = (0..300).any(|_| {
            TcpStream::connect(&p.addr).is_ok() && get(&p.addr, "/-/ready", None).0 == 200
                || !wait_a_tick()
        });
        assert!(ready, "prometheus not ready: {}", read_log(dir));
        p
    }

    /// The value of the first series an instant query returns, once it returns one for which
    /// `accept` holds (waiting up to 30 s for scrapes to bring it).
    fn query_until(&self, query: &str, accept: impl Fn(f64) -> bool) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", url_encode(query));
        (0..300).find_map(|_| {
            let (_, _, body) = get(&self.addr, &path, None);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let found = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|x| accept(*x));
            if found.is_none() {
                wait_a_tick();
            }
            found
        })
    }
}

fn read_log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
}

/// Waits 100 ms: Prometheus's next scrape or readiness is an event outside this process
/// with no notification to wait on, so it is polled.
#[expect(
    clippy::disallowed_methods,
    reason = "polls an external server that sends no notification"
)]
fn wait_a_tick() -> bool {
    std::thread::sleep(Duration::from_millis(100));
    true
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_real_prometheus_scrapes_counters_latencies_and_the_seal() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let prom_dir = tempfile::tempdir().unwrap();
    let prometheus = Prometheus::start(prom_dir.path(), &server.metrics);
    let r = server.kms_json(&[
        "bench",
        "--op",
        "generate-data-key",
        "--concurrency",
        "2",
        "--duration",
        "2",
    ]);
    let sent = r["requests"].as_f64().unwrap();
    assert!(sent > 0.0 && r["errors"] == 0, "{r}");

    let ok = "kms_rpc_requests_total{plane=\"data\",method=\"GenerateDataKey\",code=\"ok\"}";
    let counted = prometheus.query_until(ok, |x| (x - sent).abs() < 0.5);
    assert_eq!(counted, Some(sent), "{}", read_log(prom_dir.path()));
    let p99 = "histogram_quantile(0.99, sum by (le) \
               (kms_rpc_duration_seconds_bucket{plane=\"data\",method=\"GenerateDataKey\"}))";
    let p99 = prometheus.query_until(p99, |x| x > 0.0).unwrap();
    assert!(p99 < 10.0, "p99 {p99} s");
    assert_eq!(
        prometheus.query_until("kms_sealed", |x| x == 0.0),
        Some(0.0)
    );

    server.kms_json(&["--as", "operator2", "seal", "--reason", "prometheus test"]);
    assert_eq!(
        prometheus.query_until("kms_sealed", |x| x == 1.0),
        Some(1.0)
    );

    // The scrape is valid Prometheus text, as Prometheus's own linter reads it.
    let (_, _, scrape) = get(&server.metrics, "/metrics", None);
    promtool(&["check", "metrics"], std::env::temp_dir(), Some(&scrape));
}

/// Runs Prometheus's `promtool ARGS` in `dir`, with `input` on its standard input, and
/// asserts that it passes.
fn promtool(args: &[&str], dir: impl AsRef<std::path::Path>, input: Option<&str>) {
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        let mut stdin = stdin;
        stdin.write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_can_be_turned_off() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = kms_tests::serve_dev(KMS, dir.path())
        .args(["--metrics-addr", "off"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let listening: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(listening["event"], "listening", "{line}");
    assert!(listening["metrics"].is_null(), "{line}");
    let recorded = std::fs::read_to_string(dir.path().join(".kms/endpoints.json")).unwrap();
    assert!(recorded.contains("\"metrics\":null"), "{recorded}");
}

/// Every `kms_*` name in `text` (a dashboard or rule file).
fn kms_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("kms_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_and_alerts_use_only_what_a_node_exports_and_the_rules_pass_promtool() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    server.kms_json(&["key", "create", "--alias", "d"]);
    server.kms_json(&["data", "generate-key", "--key", "d"]);
    let (_, _, scrape) = get(&server.metrics, "/metrics", None);
    let exported: std::collections::BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect();
    let dashboard = std::fs::read_to_string(deploy.join("grafana/sovereign-kms.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(parsed["panels"].as_array().unwrap().len() >= 10);
    let alerts = std::fs::read_to_string(deploy.join("prometheus/alerts.yml")).unwrap();
    for (file, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        let used = kms_names(text);
        assert!(used.len() >= 5, "{file}: {used:?}");
        for name in used {
            assert!(
                exported.contains(&name),
                "{file} uses {name}, which no node exports"
            );
        }
    }
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        promtool(args, deploy.join("prometheus"), None);
    }
}

#[test]
fn the_config_chooses_json_logs_and_refuses_metrics_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let _ = server.stop();
    let config = dir.path().join(".kms/kms.toml");
    let text = std::fs::read_to_string(&config).unwrap();

    std::fs::write(&config, format!("{text}\n[log]\nformat = \"json\"\n")).unwrap();
    let server = Server::start(KMS, dir.path());
    server.kms_json(&["key", "list"]);
    let log = server.stop();
    assert!(log.lines().count() > 3, "{log}");
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }

    let elsewhere = text.replace("[listen]", "[listen]\nmetrics = \"10.1.2.3:9464\"");
    assert_ne!(elsewhere, text, "the dev config has a [listen] section");
    std::fs::write(&config, elsewhere).unwrap();
    let out = kms_tests::serve_dev(KMS, dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");
}

/// An unsigned JWT claiming `sub`: its claims are what a caller chooses, and it is refused.
fn forged_jwt(sub: &str) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(serde_json::json!({ "alg": "ES256", "typ": "JWT" })),
        b64(serde_json::json!({ "sub": sub, "aud": ["kms"], "exp": 4_000_000_000u64 })),
    )
}

#[test]
fn many_keys_identities_and_requests_stay_under_two_thousand_series() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let keys = rt.block_on(async {
        let admin = server
            .client_tls("operator1")
            .admin(&server.admin)
            .await
            .unwrap();
        // 1,000 keys, made by 8 callers.
        let makers: Vec<_> = (0..8)
            .map(|_| {
                let mut admin = admin.clone();
                tokio::spawn(async move {
                    let mut made = Vec::new();
                    for _ in 0..125 {
                        let r = admin
                            .create_key(api::v1::CreateKeyRequest::default())
                            .await
                            .unwrap();
                        made.push(r.into_inner().key_id);
                    }
                    made
                })
            })
            .collect();
        let mut keys = Vec::new();
        for m in makers {
            keys.extend(m.await.unwrap());
        }
        // 100 registered identities, approved by the other development operators.
        let mut others = Vec::new();
        for name in ["operator2", "operator3"] {
            others.push(server.client_tls(name).admin(&server.admin).await.unwrap());
        }
        let approvers = kms_loadgen::Approvers::new(others);
        kms_loadgen::populate(&mut admin.clone(), &approvers, 0, 100)
            .await
            .unwrap();
        keys
    });
    assert_eq!(keys.len(), 1_000);
    let keys = std::sync::Arc::new(keys);
    rt.block_on(async {
        // 10,000 data keys over the 1,000 keys, each with its own context and request id.
        let channel = server
            .client_tls("workload")
            .channel(&server.data)
            .await
            .unwrap();
        let callers: Vec<_> = (0..16u32)
            .map(|c| {
                let (keys, channel) = (keys.clone(), channel.clone());
                tokio::spawn(async move {
                    let mut data = api::DataClient::new(channel);
                    for i in (c..10_000).step_by(16) {
                        let mut request = tonic::Request::new(api::v1::GenerateDataKeyRequest {
                            key: keys[usize::try_from(i).unwrap() % 1_000].clone(),
                            encryption_context: [("conversation".into(), format!("c-{i}"))].into(),
                            spec: api::v1::DataKeySpec::Aes256.into(),
                        });
                        request
                            .metadata_mut()
                            .insert("x-request-id", format!("req-{i}").parse().unwrap());
                        data.generate_data_key(request).await.unwrap();
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.unwrap();
        }
        // 100 callers claiming identities of their own choosing, all refused.
        let mut anonymous = server.client_tls("workload");
        anonymous.cert_pem.clear();
        anonymous.key_pem.clear();
        let mut data = anonymous.data(&server.data).await.unwrap();
        for i in 0..100 {
            let mut request = tonic::Request::new(api::v1::GenerateDataKeyRequest {
                key: keys[i].clone(),
                ..Default::default()
            });
            let jwt = forged_jwt(&format!("spiffe://chosen.example/caller-{i}"));
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {jwt}").parse().unwrap());
            assert!(data.generate_data_key(request).await.is_err());
        }
    });
    let (_, _, scrape) = get(&server.metrics, "/metrics", None);
    let series = scrape.lines().filter(|l| !l.starts_with('#')).count();
    assert!(series < 2_000, "{series} series");
    let ok = "kms_rpc_requests_total{plane=\"data\",method=\"GenerateDataKey\",code=\"ok\"}";
    assert_eq!(value(&scrape, ok), Some(10_000.0));
    for secret_ish in [
        keys[0].as_str(),
        keys[999].as_str(),
        "req-",
        "c-1",
        "chosen.example",
    ] {
        assert!(!scrape.contains(secret_ish), "{secret_ish} in the scrape");
    }
    eprintln!("{series} series after 10,000 requests over 1,000 keys");
}

#[test]
fn health_turns_not_serving_when_the_token_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    server.kms_json(&["key", "create", "--alias", "h", "--protection", "hsm"]);
    server.kms_json(&["data", "generate-key", "--key", "h"]);
    let (code, _, _) = get(&server.metrics, "/health", None);
    assert_eq!(code, 200);
    let (_, _, scrape) = get(&server.metrics, "/metrics", None);
    let ok = "kms_hsm_operations_total{operation=\"encrypt\",mechanism=\"aes_gcm\",outcome=\"ok\"}";
    assert!(value(&scrape, ok).unwrap() >= 1.0, "{scrape}");
    assert!(value(&scrape, "kms_hsm_sessions_max").unwrap() >= 1.0);
    assert_eq!(value(&scrape, "kms_hsm_retries_total"), Some(0.0));

    // The token's files vanish, as a removed device would. The deep check's last answer is
    // reused for 10 s of the deployment's clock; the development clock moves past it.
    let tokens = dir.path().join(".kms/tokens");
    let away = dir.path().join("tokens-away");
    std::fs::rename(&tokens, &away).unwrap();
    server.kms_json(&["dev", "advance-clock", "11s"]);
    let (code, _, body) = get(&server.metrics, "/health", None);
    assert_eq!(code, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "not_serving");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .starts_with("hsm unavailable"),
        "{body}"
    );
    assert!(
        wait_for(&server, ServingStatus::NotServing),
        "gRPC health still serving"
    );
    assert!(!server
        .kms(&["data", "generate-key", "--key", "h"])
        .status
        .success());
    let (_, _, scrape) = get(&server.metrics, "/metrics", None);
    let failed =
        "kms_hsm_operations_total{operation=\"encrypt\",mechanism=\"aes_gcm\",outcome=\"error\"}";
    assert!(value(&scrape, failed).unwrap() >= 1.0, "{scrape}");

    // SoftHSM2 gives the objects new handles when the files return: the node serves again
    // after a restart, which finds its keys afresh.
    std::fs::rename(&away, &tokens).unwrap();
    let _ = server.stop();
    let server = Server::start(KMS, dir.path());
    assert_eq!(get(&server.metrics, "/health", None).0, 200);
    assert_eq!(grpc_health(&server), ServingStatus::Serving);
    server.kms_json(&["data", "generate-key", "--key", "h"]);
}

/// `GET path` over TLS to `addr`, trusting the dev server CA, presenting `client` (a
/// certificate and key, PEM) if given: the status code and body, or the connection's error.
fn get_tls(
    server: &Server,
    addr: &str,
    path: &str,
    client: Option<(&[u8], &[u8])>,
) -> Result<(u16, String), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    let server_ca = server.dir.join(".kms/pki/server-ca.pem");
    for ca in CertificateDer::pem_file_iter(server_ca).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(cert)
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_slice(key).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| e.to_string())?;
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = raw.split_once("\r\n\r\n").ok_or(raw.clone())?;
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or(raw.clone())?;
        Ok((code, body.to_owned()))
    })
}

#[test]
fn with_a_scrapers_ca_metrics_are_served_over_tls_to_its_certificates_only() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(KMS, dir.path());
    let _ = server.stop();
    // A CA for the scrapers, and one scraper's client certificate.
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "scrapers");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["prometheus".to_owned()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let scraper = params.signed_by(&key, &ca).unwrap();
    let (cert, key) = (scraper.pem(), key.serialize_pem());
    std::fs::write(dir.path().join(".kms/scraper-ca.pem"), ca.pem()).unwrap();
    let config = dir.path().join(".kms/kms.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let with = text.replace(
        "[listen]",
        "[listen]\nmetrics_client_ca = \"scraper-ca.pem\"",
    );
    assert_ne!(with, text);
    std::fs::write(&config, with).unwrap();

    let server = Server::start(KMS, dir.path());
    let (code, body) = get_tls(
        &server,
        &server.metrics,
        "/metrics",
        Some((cert.as_bytes(), key.as_bytes())),
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("kms_sealed 0"), "{body}");
    let (code, body) = get_tls(
        &server,
        &server.metrics,
        "/health",
        Some((cert.as_bytes(), key.as_bytes())),
    )
    .unwrap();
    assert_eq!((code, body.as_str()), (200, "{\"status\":\"serving\"}"));
    // No certificate, or one from another CA (an operator's): no answer.
    assert!(get_tls(&server, &server.metrics, "/metrics", None).is_err());
    let pki = dir.path().join(".kms/pki");
    let operator = std::fs::read(pki.join("operator1.pem")).unwrap();
    let operator_key = std::fs::read(pki.join("operator1.key")).unwrap();
    let other = get_tls(
        &server,
        &server.metrics,
        "/metrics",
        Some((&operator, &operator_key)),
    );
    assert!(other.is_err(), "{other:?}");
    // Nor plain HTTP.
    let mut s = TcpStream::connect(&server.metrics).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert!(
        !String::from_utf8_lossy(&raw).contains("kms_"),
        "plain HTTP was answered"
    );
}

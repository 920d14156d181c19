//! What a node tells its operators: Prometheus metrics and health, on a listener of their
//! own (plain HTTP, loopback only; see docs/OPERATIONS.md).
//!
//! Every request on either plane is counted by the gate, by plane, method and gRPC status,
//! with its duration in a histogram (histograms, not summaries, so percentiles aggregate
//! across nodes). No label takes a value the caller chooses: a method is named only if its
//! plane's service has it (anything else is `unknown`), and key ids, identities and request ids
//! are never labels.
//!
//! `GET /metrics` answers in the Prometheus text format, or in OpenMetrics when the scraper
//! asks for it; `GET /health` answers 200 `{"status":"serving"}`, or 503
//! `{"status":"not_serving","reason":...}` while the node cannot serve keys.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kms_core::audit::AuditObserver;
use kms_core::{Clock, Kms};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use prost::Message;

use crate::census::Census;
use crate::governance::Governance;
use crate::histogram::AtomicHistogram;
use crate::policy_stats::PolicyStats;
use crate::store_metrics::StoreMetrics;
use crate::token_metrics::{TokenGauges, TokenWatch};

/// Upper bounds of the request-duration buckets, in seconds: 50 µs to 10 s.
const DURATION_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the audit batch-size buckets, in records: 1 to 4,096 (the writer's most).
const BATCH_BUCKETS: [f64; 13] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// Upper bounds of the audit commit-time buckets, in seconds: 100 µs to 2.5 s.
const COMMIT_BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25, 0.5,
    2.5,
];

/// A method label for anything a plane's service does not have.
const UNKNOWN: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    plane: &'static str,
    method: Arc<String>,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    plane: &'static str,
    method: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaneLabels {
    plane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    certificate: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// A node's metrics, shared by both gates and the metrics listener.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<RpcLabels, Counter>,
    durations: Family<MethodLabels, AtomicHistogram, fn() -> AtomicHistogram>,
    /// The data plane's and the admin plane's in-flight gauges.
    in_flight: [Gauge; 2],
    sealed_gauge: Gauge,
    uptime: Gauge<f64, AtomicU64>,
    started: Instant,
    sealed: Arc<AtomicBool>,
    audit: AuditMetrics,
    clock: Arc<dyn Clock>,
    census: Option<Census>,
    token: Option<TokenGauges>,
    certificates: Family<CertificateLabels, Gauge>,
    /// Each plane's methods by request path, with their series once used.
    methods: HashMap<String, Method>,
    /// Everything else.
    unknown: Method,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("sealed", &self.sealed)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

/// The audit writer's numbers, told by the writer itself (see [`AuditObserver`]).
#[derive(Debug)]
struct AuditMetrics {
    records: Counter,
    failures: Counter,
    batch: AtomicHistogram,
    commit: AtomicHistogram,
    checkpoint_age: Gauge<f64, AtomicU64>,
    /// When the last checkpoint was signed (ms since the epoch); 0 before any.
    last_checkpoint_ms: AtomicU64,
    /// Set while the last write failed: requests are being refused.
    failing: AtomicBool,
}

impl AuditMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            records: Counter::default(),
            failures: Counter::default(),
            batch: AtomicHistogram::new(&BATCH_BUCKETS),
            commit: AtomicHistogram::new(&COMMIT_BUCKETS),
            checkpoint_age: Gauge::default(),
            last_checkpoint_ms: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        };
        let audit = registry.sub_registry_with_prefix("audit");
        audit.register(
            "records",
            "Audit records written durably",
            m.records.clone(),
        );
        audit.register(
            "append_failures",
            "Audit records that could not be written (their requests were refused); must stay 0",
            m.failures.clone(),
        );
        audit.register(
            "commit_batch_records",
            "Records per synced audit write (group commit)",
            m.batch.clone(),
        );
        audit.register(
            "commit_duration_seconds",
            "Time of one synced audit write",
            m.commit.clone(),
        );
        audit.register(
            "checkpoint_age_seconds",
            "Seconds since the last signed checkpoint (-1 before the first)",
            m.checkpoint_age.clone(),
        );
        m
    }
}

impl AuditObserver for Metrics {
    fn committed(&self, records: usize, took: Duration) {
        let a = &self.inner.audit;
        a.records.inc_by(u64::try_from(records).unwrap_or(u64::MAX));
        a.batch
            .observe(f64::from(u32::try_from(records).unwrap_or(u32::MAX)));
        a.commit.observe(took.as_secs_f64());
        a.failing.store(false, Ordering::Relaxed);
    }

    fn failed(&self, records: usize) {
        let a = &self.inner.audit;
        a.failures
            .inc_by(u64::try_from(records).unwrap_or(u64::MAX));
        a.failing.store(true, Ordering::Relaxed);
    }

    fn checkpointed(&self, time_ms: u64) {
        self.inner
            .audit
            .last_checkpoint_ms
            .store(time_ms, Ordering::Relaxed);
    }
}

fn duration_histogram() -> AtomicHistogram {
    AtomicHistogram::new(&DURATION_BUCKETS)
}

/// A method's label and its series on each plane (data, admin), made on first use and kept,
/// so that a request touches no family's lock.
#[derive(Debug)]
struct Method {
    name: Arc<String>,
    planes: [Slot; 2],
}

#[derive(Debug, Default)]
struct Slot {
    duration: OnceLock<AtomicHistogram>,
    /// By gRPC status code (0-16).
    codes: [OnceLock<Counter>; 17],
}

impl Method {
    fn new(name: String) -> Self {
        Self {
            name: Arc::new(name),
            planes: Default::default(),
        }
    }
}

/// The index of a plane's series: 0 for the data plane, 1 for the admin plane.
fn plane_index(plane: &str) -> usize {
    usize::from(plane != "data")
}

/// The node's own gauges: seal, uptime, build, certificate expiry.
struct Process {
    sealed: Gauge,
    uptime: Gauge<f64, AtomicU64>,
    certificates: Family<CertificateLabels, Gauge>,
}

impl Process {
    fn register(registry: &mut Registry) -> Self {
        let p = Self {
            sealed: Gauge::default(),
            uptime: Gauge::default(),
            certificates: Family::default(),
        };
        registry.register(
            "sealed",
            "1 while the service is sealed (every data-plane request refused), else 0",
            p.sealed.clone(),
        );
        registry.register(
            "uptime_seconds",
            "Seconds since the node started",
            p.uptime.clone(),
        );
        registry.register(
            "build",
            "The version of the running kms",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When a certificate the listeners present (server) or trust (operator_ca) expires",
            p.certificates.clone(),
        );
        p
    }
}

impl Metrics {
    /// Metrics for a node whose seal state is `sealed`, whose audit times are on `clock`,
    /// whose policy decisions are `policy`'s, and whose keys and governance, when given, are
    /// counted at each scrape.
    pub fn new(
        sealed: Arc<AtomicBool>,
        clock: Arc<dyn Clock>,
        policy: &PolicyStats,
        holdings: Option<(Arc<Kms>, Arc<Governance>)>,
        token: Option<TokenWatch>,
        store: Option<&StoreMetrics>,
    ) -> Self {
        let mut registry = Registry::with_prefix("kms");
        let audit = AuditMetrics::register(&mut registry);
        policy.register(&mut registry);
        let census = holdings.map(|(kms, gov)| Census::register(&mut registry, kms, gov));
        let token = token.map(|watch| TokenGauges::register(&mut registry, watch, clock.clone()));
        if let Some(s) = store {
            s.register(&mut registry);
        }
        let process = Process::register(&mut registry);
        let requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "Requests answered, by plane, method and gRPC status (refusals included)",
            requests.clone(),
        );
        let durations =
            Family::<MethodLabels, AtomicHistogram, fn() -> AtomicHistogram>::new_with_constructor(
                duration_histogram,
            );
        registry.register(
            "rpc_duration_seconds",
            "Time from a request's headers to its answer, by plane and method",
            durations.clone(),
        );
        let in_flight_family = Family::<PlaneLabels, Gauge>::default();
        registry.register(
            "rpc_in_flight",
            "Requests being served, by plane",
            in_flight_family.clone(),
        );
        let in_flight = ["data", "admin"]
            .map(|plane| in_flight_family.get_or_create_owned(&PlaneLabels { plane }));
        Self {
            inner: Arc::new(Inner {
                registry,
                requests,
                durations,
                in_flight,
                sealed_gauge: process.sealed,
                uptime: process.uptime,
                started: now(),
                sealed,
                audit,
                clock,
                census,
                token,
                certificates: process.certificates,
                methods: plane_methods(),
                unknown: Method::new(UNKNOWN.to_owned()),
            }),
        }
    }

    /// Records that the certificate `name` expires at `not_after` (seconds since the epoch).
    pub(crate) fn certificate_expires(&self, name: &'static str, not_after: u64) {
        self.inner
            .certificates
            .get_or_create(&CertificateLabels { certificate: name })
            .set(i64::try_from(not_after).unwrap_or(i64::MAX));
    }

    /// Counts a request as in flight on `plane` (`data` or `admin`) until the returned guard
    /// is dropped.
    pub(crate) fn start(&self, plane: &'static str) -> Option<InFlight<'_>> {
        let gauge = self.inner.in_flight.get(plane_index(plane))?;
        gauge.inc();
        Some(InFlight(gauge))
    }

    /// Counts an answered request: its plane, its path, the gRPC status it was answered with
    /// and how long it took.
    pub(crate) fn answered(
        &self,
        plane: &'static str,
        path: &str,
        code: tonic::Code,
        took: Duration,
    ) {
        let inner = &self.inner;
        let method = inner.methods.get(path).unwrap_or(&inner.unknown);
        let Some(slot) = method.planes.get(plane_index(plane)) else {
            return;
        };
        slot.duration
            .get_or_init(|| {
                inner.durations.get_or_create_owned(&MethodLabels {
                    plane,
                    method: method.name.clone(),
                })
            })
            .observe(took.as_secs_f64());
        let index = usize::try_from(i32::from(code)).unwrap_or(0);
        if let Some(counter) = slot.codes.get(index) {
            counter
                .get_or_init(|| {
                    inner.requests.get_or_create_owned(&RpcLabels {
                        plane,
                        method: method.name.clone(),
                        code: code_label(code),
                    })
                })
                .inc();
        }
    }

    /// The scrape: Prometheus text (version 0.0.4), or OpenMetrics when `openmetrics`. Counts
    /// keys and governance afresh, reading the store: call it where blocking is allowed.
    pub fn encode(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let inner = &self.inner;
        if let Some(c) = &inner.census {
            c.refresh();
        }
        if let Some(t) = &inner.token {
            t.refresh();
        }
        inner
            .sealed_gauge
            .set(i64::from(inner.sealed.load(Ordering::Relaxed)));
        inner.uptime.set(inner.started.elapsed().as_secs_f64());
        let last = inner.audit.last_checkpoint_ms.load(Ordering::Relaxed);
        let age_ms = inner.clock.now_unix_ms().saturating_sub(last);
        inner.audit.checkpoint_age.set(if last == 0 {
            -1.0
        } else {
            f64::from(u32::try_from(age_ms).unwrap_or(u32::MAX)) / 1000.0
        });
        let mut out = String::with_capacity(16 * 1024);
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &inner.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &inner.registry)?;
        }
        Ok(out)
    }

    /// Why the node cannot serve keys now, if it cannot: sealed, audit writes failing, or
    /// the token failing the deep check (run at most every 10 s; blocks on the token, so
    /// call it where blocking is allowed).
    pub fn not_serving(&self) -> Option<String> {
        if self.inner.sealed.load(Ordering::Relaxed) {
            Some("sealed".into())
        } else if self.inner.audit.failing.load(Ordering::Relaxed) {
            Some("audit log unavailable".into())
        } else {
            self.inner.token.as_ref().and_then(TokenGauges::problem)
        }
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "uptime is measured on the monotonic clock"
)]
fn now() -> Instant {
    Instant::now()
}

/// Holds one request in a plane's in-flight gauge.
pub(crate) struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `/service/Method` → `Method` for every method of the two planes' services, the health
/// service (`Health.Check`, `Health.Watch`) and reflection (`Reflection`).
fn plane_methods() -> HashMap<String, Method> {
    let mut methods = HashMap::new();
    for set in [
        api::DATA_FILE_DESCRIPTOR_SET,
        api::ADMIN_FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = format!("{package}.{}", service.name.unwrap_or_default());
                for m in service.method {
                    let m = m.name.unwrap_or_default();
                    methods.insert(format!("/{name}/{m}"), Method::new(m));
                }
            }
        }
    }
    for m in ["Check", "Watch"] {
        methods.insert(
            format!("/grpc.health.v1.Health/{m}"),
            Method::new(format!("Health.{m}")),
        );
    }
    methods.insert(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_owned(),
        Method::new("Reflection".to_owned()),
    );
    methods
}

/// The status a response carries (a trailers-only answer has it in its headers; a unary
/// answer that carries a message succeeded, its OK in the trailers).
pub(crate) fn response_code(headers: &tonic::codegen::http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

/// The status as a label: `ok`, `permission_denied`, ...
pub(crate) fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "ok",
        C::Cancelled => "cancelled",
        C::Unknown => "unknown",
        C::InvalidArgument => "invalid_argument",
        C::DeadlineExceeded => "deadline_exceeded",
        C::NotFound => "not_found",
        C::AlreadyExists => "already_exists",
        C::PermissionDenied => "permission_denied",
        C::ResourceExhausted => "resource_exhausted",
        C::FailedPrecondition => "failed_precondition",
        C::Aborted => "aborted",
        C::OutOfRange => "out_of_range",
        C::Unimplemented => "unimplemented",
        C::Internal => "internal",
        C::Unavailable => "unavailable",
        C::DataLoss => "data_loss",
        C::Unauthenticated => "unauthenticated",
    }
}

/// Serves `GET /metrics` and `GET /health` on `listener` until `stop` resolves: plain HTTP,
/// or TLS with a client certificate when `tls` is given.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: Metrics,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let scrape = |m: Metrics| {
        move |headers: HeaderMap| async move {
            let openmetrics = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            let content_type = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE
            };
            let encoded = tokio::task::spawn_blocking(move || m.encode(openmetrics)).await;
            match encoded {
                Ok(Ok(body)) => {
                    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
                }
                Ok(Err(_)) | Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
    };
    let health = |m: Metrics| {
        move || async move {
            let problem = tokio::task::spawn_blocking(move || m.not_serving())
                .await
                .unwrap_or_else(|_| Some("health check failed".into()));
            let (status, body) = match problem {
                None => (StatusCode::OK, serde_json::json!({ "status": "serving" })),
                Some(reason) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "status": "not_serving", "reason": reason }),
                ),
            };
            (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
        }
    };
    let app = axum::Router::new()
        .route("/metrics", get(scrape(metrics.clone())))
        .route("/health", get(health(metrics)));
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
        Some(tls) => {
            serve_tls(listener, tls, app, stop).await;
            Ok(())
        }
    }
}

/// Most TLS connections the metrics listener holds at once (scrapers are few).
const METRICS_CONNECTIONS: usize = 64;
/// Longest a TLS handshake on the metrics listener may take.
const METRICS_HANDSHAKE: Duration = Duration::from_secs(10);

/// Accepts TLS connections (each proving a client certificate from the scrapers' CA in its
/// handshake) and serves `app` on each, until `stop` resolves.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    tokio::pin!(stop);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    continue;
                }
            },
            () = &mut stop => return,
        };
        // Over the limit, the connection is closed at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(stream)) =
                tokio::time::timeout(METRICS_HANDSHAKE, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
        });
    }
}

/// Whether `addr` may serve metrics in plain HTTP: loopback only.
pub(crate) fn plain_http_allowed(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(u64);

    impl Clock for Fixed {
        fn now_unix(&self) -> u64 {
            self.0 / 1000
        }
        fn now_unix_ms(&self) -> u64 {
            self.0
        }
    }

    fn test_clock() -> Arc<dyn Clock> {
        Arc::new(Fixed(1_800_000_000_000))
    }

    /// Metrics of a node with no keys, governance, token or store to count, sealed as
    /// `sealed` says.
    fn bare(sealed: Arc<AtomicBool>) -> Metrics {
        Metrics::new(sealed, test_clock(), &PolicyStats::new(), None, None, None)
    }

    #[test]
    fn the_audit_writer_s_numbers_and_failures_show() {
        let m = bare(Arc::new(AtomicBool::new(false)));
        assert!(m
            .encode(false)
            .unwrap_or_default()
            .contains("kms_audit_checkpoint_age_seconds -1"));
        m.committed(3, Duration::from_micros(700));
        m.checkpointed(1_800_000_000_000 - 12_500);
        let text = m.encode(false).unwrap_or_default();
        assert!(text.contains("kms_audit_records_total 3"), "{text}");
        assert!(
            text.contains("kms_audit_checkpoint_age_seconds 12.5"),
            "{text}"
        );
        assert!(
            text.contains("kms_audit_commit_batch_records_count 1"),
            "{text}"
        );
        assert_eq!(m.not_serving(), None::<String>);
        m.failed(2);
        assert!(m
            .encode(false)
            .unwrap_or_default()
            .contains("kms_audit_append_failures_total 2"));
        assert_eq!(m.not_serving().as_deref(), Some("audit log unavailable"));
        m.committed(1, Duration::from_micros(500));
        assert_eq!(m.not_serving(), None::<String>);
    }

    #[test]
    fn methods_are_named_only_if_a_plane_has_them() {
        let m = bare(Arc::new(AtomicBool::new(false)));
        let took = Duration::from_micros(300);
        m.answered(
            "data",
            "/kms.v1.DataPlane/GenerateDataKey",
            tonic::Code::Ok,
            took,
        );
        m.answered(
            "data",
            "/kms.v1.DataPlane/NoSuchThing",
            tonic::Code::Unimplemented,
            took,
        );
        m.answered("admin", "/x/../../etc", tonic::Code::Unimplemented, took);
        let text = m.encode(false).unwrap_or_default();
        assert!(
            text.contains(
                "kms_rpc_requests_total{plane=\"data\",method=\"GenerateDataKey\",code=\"ok\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "kms_rpc_requests_total{plane=\"data\",method=\"unknown\",code=\"unimplemented\"} 1"
        ));
        assert!(!text.contains("NoSuchThing") && !text.contains("etc"));
        assert!(text.contains("kms_rpc_duration_seconds_bucket{le=\"0.0005\",plane=\"data\",method=\"GenerateDataKey\"} 1")
            || text.contains("kms_rpc_duration_seconds_bucket{plane=\"data\",method=\"GenerateDataKey\",le=\"0.0005\"} 1"), "{text}");
    }

    #[test]
    fn the_seal_shows_in_the_scrape_and_the_health() {
        let sealed = Arc::new(AtomicBool::new(false));
        let m = bare(sealed.clone());
        assert!(m.encode(false).unwrap_or_default().contains("kms_sealed 0"));
        assert_eq!(m.not_serving(), None::<String>);
        sealed.store(true, Ordering::Relaxed);
        assert!(m.encode(false).unwrap_or_default().contains("kms_sealed 1"));
        assert_eq!(m.not_serving().as_deref(), Some("sealed"));
        let open = m.encode(true).unwrap_or_default();
        assert!(open.ends_with("# EOF\n"), "{open}");
    }

    #[test]
    fn every_plane_method_has_a_label() {
        let methods = plane_methods();
        for path in [
            "/kms.v1.DataPlane/Decrypt",
            "/kms.v1.Admin/RotateKey",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(methods.contains_key(path), "{path}");
        }
        assert!(methods.len() > 50, "{}", methods.len());
    }

    #[test]
    fn a_trailers_only_answer_carries_its_code() {
        let mut h = tonic::codegen::http::HeaderMap::new();
        assert_eq!(response_code(&h), tonic::Code::Ok);
        h.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("7"),
        );
        assert_eq!(response_code(&h), tonic::Code::PermissionDenied);
    }
}

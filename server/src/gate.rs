//! The gate every request passes on either listener before a service sees it.
//!
//! In order: the request gets its ids (the server's own, random, and the caller's
//! `x-request-id` if it is a sane token); health checks pass; on the data plane the caller is
//! authenticated (X.509-SVID or JWT-SVID) from the connection and the headers alone, before a
//! byte of the body is read, and on the admin plane the operator certificate is checked to be
//! still within its validity (a resumed or long-lived connection does not outlive it), its
//! identity registered, active and unexpired in the operator inventory, and its role allowed
//! the method (an auditor only reads); then methods the listener does not serve are refused. Only then does the service decode the
//! message and validate it.
//!
//! Every refusal is recorded. A request the service took records itself; one refused before it
//! (here, or by the gRPC codec: undecodable, too large, unknown method) is recorded by the
//! gate, and the codec's statuses are replaced by fixed ones (`INVALID_ARGUMENT`,
//! `RESOURCE_EXHAUSTED`, `UNIMPLEMENTED`) that name no internal type. Refusals of callers that
//! proved no identity are budgeted ([`UNAUTHENTICATED_PER_SEC`] recorded one by one per
//! listener; beyond that they are counted by reason and written as one
//! `server.refusals_summarised` record every [`SUMMARY_EVERY`]), so that a flood without a
//! credential cannot fill the log. Every response carries `x-request-id`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use kms_core::audit::AuditEvent;
use kms_core::governance::operators::{OperatorDenial, Role};
use kms_core::Principal;
use parking_lot::Mutex;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};

use crate::audit::{status_word, Audit, RequestTag, REQUEST_ID};
use crate::governance::{Governance, Refusal};

/// Refusals of unauthenticated callers recorded one by one, per listener and second.
pub const UNAUTHENTICATED_PER_SEC: u32 = 50;

/// How often counted (not individually recorded) refusals are written as one summary.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// What a caller is told for a message that does not decode.
const UNDECODABLE: &str = "request could not be decoded";
/// What a caller is told for a message over the size limit.
const TOO_LARGE: &str = "request too large";
/// What a caller is told for a method this listener does not serve.
const UNSERVED: &str = "method not served on this listener";
/// What every data-plane caller is told while the service is sealed.
pub(crate) const SEALED: &str = "service sealed";
/// Longest method path copied into a record.
const MAX_RECORDED_PATH: usize = 128;

/// Which listener a gate stands in front of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plane {
    Data,
    Admin,
}

impl Plane {
    pub(crate) fn word(self) -> &'static str {
        match self {
            Plane::Data => "data",
            Plane::Admin => "admin",
        }
    }

    /// The gRPC service this plane exists for.
    fn service(self) -> &'static str {
        match self {
            Plane::Data => "kms.v1.DataPlane",
            Plane::Admin => "kms.v1.Admin",
        }
    }
}

/// Who may use gRPC reflection on a listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reflection {
    /// Not served.
    Off,
    /// Served to authenticated callers only (the default outside `--dev`).
    #[default]
    Authenticated,
    /// Served to anyone who reaches the listener (`--dev`).
    Open,
}

/// The admin RPCs an operator with only the `auditor` role may call: reads, never changes.
pub(crate) const READ_ONLY_METHODS: [&str; 21] = [
    "DescribeKey",
    "GetDestructionReceipt",
    "ListKeys",
    "KeyCoverage",
    "QueryAudit",
    "ListTrustBundles",
    "DescribeWorkload",
    "ListWorkloads",
    "GetPolicy",
    "ListPolicies",
    "TestPolicy",
    "PolicyStats",
    "ListGrants",
    "DescribeOperator",
    "ListOperators",
    "WhoAmI",
    "ListApprovals",
    "GetApproval",
    "GetApprovalRules",
    "GetServiceStatus",
    "Attest",
];

/// Marks that a service took a request: from then on the service records it, whatever it
/// answers.
#[derive(Clone, Debug, Default)]
pub(crate) struct Taken(Arc<AtomicBool>);

impl Taken {
    /// Called by a service as it takes `request`.
    pub(crate) fn mark<T>(request: &tonic::Request<T>) {
        if let Some(t) = request.extensions().get::<Taken>() {
            t.0.store(true, Ordering::Relaxed);
        }
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where a request goes, from its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Health,
    Reflection,
    Plane,
    Unserved,
}

impl Route {
    fn of(plane: Plane, path: &str) -> Self {
        let service = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .map_or("", |(s, _)| s);
        match service {
            "grpc.health.v1.Health" => Route::Health,
            "grpc.reflection.v1.ServerReflection" => Route::Reflection,
            s if s == plane.service() => Route::Plane,
            _ => Route::Unserved,
        }
    }
}

/// The layer that puts a [`Gate`] in front of a listener's services.
#[derive(Clone, Debug)]
pub(crate) struct GateLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    plane: Plane,
    audit: Audit,
    gov: Arc<Governance>,
    reflection: Reflection,
    budget: Mutex<Budget>,
    /// Set while the service is sealed: the data plane refuses every request.
    sealed: Arc<AtomicBool>,
    /// Where every answered request is counted; none when no listener serves metrics.
    metrics: Option<crate::metrics::Metrics>,
}

/// Individually recorded refusals left this second, and what was only counted.
#[derive(Debug)]
struct Budget {
    second: Instant,
    left: u32,
    counted: BTreeMap<&'static str, u64>,
}

impl GateLayer {
    pub(crate) fn new(
        plane: Plane,
        audit: Audit,
        gov: Arc<Governance>,
        reflection: Reflection,
        sealed: Arc<AtomicBool>,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                plane,
                audit,
                gov,
                reflection,
                sealed,
                metrics,
                budget: Mutex::new(Budget {
                    second: monotonic(),
                    left: UNAUTHENTICATED_PER_SEC,
                    counted: BTreeMap::new(),
                }),
            }),
        }
    }

    /// Writes the refusals counted since the last summary as one record, if there were any.
    pub(crate) async fn summarise(&self) {
        self.shared.summarise().await;
    }
}

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The gate in front of one listener's routes.
#[derive(Clone, Debug)]
pub(crate) struct Gate<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> tower_service::Service<http::Request<Body>> for Gate<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone that was made ready serves this call; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.pass(request, inner).await) })
    }
}

/// A refusal the gate makes itself.
struct Refused {
    refusal: Refusal,
    /// Whether the caller proved no identity (such refusals are budgeted).
    anonymous: bool,
}

impl Shared {
    async fn pass<S>(&self, mut request: http::Request<Body>, mut inner: S) -> http::Response<Body>
    where
        S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        >,
    {
        let started = monotonic();
        let _in_flight = self
            .metrics
            .as_ref()
            .and_then(|m| m.start(self.plane.word()));
        let ids = RequestTag::new(request.headers());
        let taken = Taken::default();
        // A `Uri` clone shares its bytes: no copy of the path unless a record needs it.
        let uri = request.uri().clone();
        let path = uri.path();
        let route = Route::of(self.plane, path);
        request.extensions_mut().insert(ids.clone());
        request.extensions_mut().insert(taken.clone());
        let mut response = match self.admit(&mut request, route) {
            Err(refused) => self.refuse(refused, path, &ids, started).await,
            Ok(()) => {
                let admitted = request.extensions().get::<Admitted>().cloned();
                let response = match inner.call(request).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                // Only a request the service never took can have been refused before it: by
                // the codec (a `Status`), or by the router, which answers a method its service
                // does not have with a bare UNIMPLEMENTED (a grpc-status header). Either is
                // refused here like any other, and recorded.
                if taken.is_set() || route == Route::Health {
                    response
                } else {
                    let failed = response
                        .extensions()
                        .get::<Status>()
                        .cloned()
                        .or_else(|| unimplemented(&response));
                    match failed {
                        Some(status) => {
                            self.refused_before_service(status, admitted, path, &ids, started)
                                .await
                        }
                        None => response,
                    }
                }
            }
        };
        if let Ok(v) = AsciiMetadataValue::try_from(ids.echoed()) {
            if let Ok(v) = http::HeaderValue::from_bytes(v.as_encoded_bytes()) {
                response.headers_mut().insert(REQUEST_ID, v);
            }
        }
        if let Some(m) = &self.metrics {
            let code = crate::metrics::response_code(response.headers());
            m.answered(self.plane.word(), path, code, started.elapsed());
        }
        // One line per request when asked for (RUST_LOG=info,kms::request=debug); its fields
        // are computed only then.
        tracing::debug!(
            target: "kms::request",
            request_id = %ids.server,
            plane = self.plane.word(),
            rpc = %self.action(path),
            outcome = crate::metrics::code_label(crate::metrics::response_code(response.headers())),
            duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "request"
        );
        response
    }

    /// The checks made before the service is called; on success the request carries the
    /// caller's verified identity in its extensions.
    // long: the admission checks in order, each refusal returned at its own check.
    fn admit(&self, request: &mut http::Request<Body>, route: Route) -> Result<(), Refused> {
        match route {
            Route::Health => return Ok(()),
            Route::Reflection if self.reflection == Reflection::Open => return Ok(()),
            _ => {}
        }
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        if self.plane == Plane::Data && self.sealed.load(Ordering::SeqCst) {
            // Before any credential is looked at: a sealed service answers nobody. Counted
            // like an anonymous refusal, so a flood cannot fill the log.
            return Err(Refused {
                anonymous: true,
                refusal: Refusal {
                    principal: Principal::Anonymous,
                    auth: "none",
                    reason: "service.sealed",
                    status: Status::unavailable(SEALED),
                },
            });
        }
        let (principal, auth) = match self.plane {
            Plane::Data => {
                let who = self
                    .gov
                    .authenticate(certs.as_ref().map(|c| c.as_slice()), request.headers())
                    .map_err(|refusal| Refused {
                        anonymous: true,
                        refusal,
                    })?;
                let admitted = (Principal::Workload(who.id.clone()), who.method.as_str());
                request.extensions_mut().insert(who);
                admitted
            }
            Plane::Admin => {
                let operator = crate::identity::operator_from(certs.as_deref().map(Vec::as_slice))
                    .map_err(|status| Refused {
                        anonymous: true,
                        refusal: Refusal {
                            principal: Principal::Anonymous,
                            auth: "none",
                            reason: "operator.no_certificate",
                            status,
                        },
                    })?;
                let principal = Principal::Operator(operator.id.clone());
                let now = self.gov.clock.now_unix();
                if now > operator.not_after || now < operator.not_before {
                    return Err(Refused {
                        anonymous: false,
                        refusal: Refusal {
                            principal,
                            auth: "mtls",
                            reason: "operator.certificate_expired",
                            status: Status::unauthenticated(
                                "operator certificate is not valid now",
                            ),
                        },
                    });
                }
                if route == Route::Plane {
                    let method = request.uri().path().rsplit_once('/').map_or("", |(_, m)| m);
                    let admitted = self.gov.operators.admit(&operator.id, now).and_then(|op| {
                        let may = op.has(Role::Operator) || READ_ONLY_METHODS.contains(&method);
                        if may {
                            Ok(())
                        } else {
                            Err(OperatorDenial::ReadOnly)
                        }
                    });
                    if let Err(denial) = admitted {
                        return Err(Refused {
                            anonymous: false,
                            refusal: Refusal {
                                principal,
                                auth: "mtls",
                                reason: denial.reason(),
                                status: Status::permission_denied(denial.to_string()),
                            },
                        });
                    }
                }
                request.extensions_mut().insert(operator.id);
                (principal, "mtls")
            }
        };
        let unserved = match route {
            Route::Unserved => Some("request.unserved_method"),
            Route::Reflection if self.reflection == Reflection::Off => {
                Some("request.reflection_off")
            }
            _ => None,
        };
        if let Some(reason) = unserved {
            return Err(Refused {
                anonymous: false,
                refusal: Refusal {
                    principal,
                    auth,
                    reason,
                    status: Status::unimplemented(UNSERVED),
                },
            });
        }
        request
            .extensions_mut()
            .insert(Admitted { principal, auth });
        Ok(())
    }

    /// Records a refusal made here (within the budget, if the caller proved no identity) and
    /// answers it.
    async fn refuse(
        &self,
        refused: Refused,
        path: &str,
        ids: &RequestTag,
        started: Instant,
    ) -> http::Response<Body> {
        let Refused { refusal, anonymous } = refused;
        if anonymous && !self.within_budget(refusal.reason) {
            return refusal.status.into_http();
        }
        let mut event = AuditEvent::new(self.action(path), status_word(Some(&refusal.status)));
        event.set_caller(refusal.principal, refusal.auth);
        event.decision = Some("deny".into());
        event.reason = Some(refusal.reason.into());
        self.finish(&mut event, path, ids, started);
        match self.audit.record(event).await {
            Ok(()) => refusal.status.into_http(),
            Err(unrecorded) => unrecorded.into_http(),
        }
    }

    /// Records a request the codec or router refused before the service took it, and answers
    /// with a fixed status in place of the codec's.
    async fn refused_before_service(
        &self,
        status: Status,
        admitted: Option<Admitted>,
        path: &str,
        ids: &RequestTag,
        started: Instant,
    ) -> http::Response<Body> {
        let (status, reason) = match status.code() {
            Code::Internal => (Status::invalid_argument(UNDECODABLE), "request.undecodable"),
            Code::OutOfRange | Code::ResourceExhausted => {
                (Status::resource_exhausted(TOO_LARGE), "request.too_large")
            }
            Code::Unimplemented => (Status::unimplemented(UNSERVED), "request.unserved_method"),
            _ => (status, "request.refused"),
        };
        let mut event = AuditEvent::new(self.action(path), status_word(Some(&status)));
        match admitted {
            Some(a) => event.set_caller(a.principal, a.auth),
            None => event.set_caller(Principal::Anonymous, "none"),
        }
        event.decision = Some("deny".into());
        event.reason = Some(reason.into());
        self.finish(&mut event, path, ids, started);
        match self.audit.record(event).await {
            Ok(()) => status.into_http(),
            Err(unrecorded) => unrecorded.into_http(),
        }
    }

    /// The record's action: `plane.Method` for this plane's service, otherwise
    /// `plane.unserved` (the path goes into the detail).
    fn action(&self, path: &str) -> String {
        let plane = self.plane.word();
        match path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(s, _)| *s == self.plane.service())
        {
            Some((_, method)) if !method.is_empty() && method.len() <= 64 => {
                format!("{plane}.{method}")
            }
            _ => format!("{plane}.unserved"),
        }
    }

    fn finish(&self, event: &mut AuditEvent, path: &str, ids: &RequestTag, started: Instant) {
        if event.action.ends_with(".unserved") {
            let shown: String = path
                .chars()
                .take(MAX_RECORDED_PATH)
                .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                .collect();
            event.detail.insert("method".into(), shown);
        }
        ids.stamp(event);
        event.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    }

    /// Whether one more unauthenticated refusal may be recorded on its own; if not, it is
    /// counted under `reason` for the next summary.
    fn within_budget(&self, reason: &'static str) -> bool {
        let mut budget = self.budget.lock();
        let now = monotonic();
        if now.duration_since(budget.second) >= Duration::from_secs(1) {
            budget.second = now;
            budget.left = UNAUTHENTICATED_PER_SEC;
        }
        if budget.left > 0 {
            budget.left -= 1;
            return true;
        }
        *budget.counted.entry(reason).or_insert(0) += 1;
        false
    }

    async fn summarise(&self) {
        let counted = std::mem::take(&mut self.budget.lock().counted);
        if counted.is_empty() {
            return;
        }
        let total: u64 = counted.values().sum();
        let mut event = AuditEvent::new("server.refusals_summarised", "ok");
        event.set_caller(Principal::Anonymous, "none");
        event.decision = Some("deny".into());
        event
            .detail
            .insert("plane".into(), self.plane.word().into());
        event.detail.insert("refusals".into(), total.to_string());
        for (reason, n) in counted {
            event
                .detail
                .insert(format!("reason.{reason}"), n.to_string());
        }
        if self.audit.record(event).await.is_err() {
            tracing::error!(
                plane = self.plane.word(),
                refusals = total,
                "a summary of refusals could not be recorded"
            );
        }
    }
}

/// Who the gate admitted, for records the gate itself writes after the service declined.
#[derive(Clone, Debug)]
struct Admitted {
    principal: Principal,
    auth: &'static str,
}

/// Monotonic time, for request latency and the refusal budget.
#[expect(
    clippy::disallowed_methods,
    reason = "latency and the refusal budget are measured wall time"
)]
fn monotonic() -> Instant {
    Instant::now()
}

/// A bare UNIMPLEMENTED answer (the router's, for a method its service does not have).
fn unimplemented(response: &http::Response<Body>) -> Option<Status> {
    let code = response.headers().get("grpc-status")?;
    (code.as_bytes() == b"12").then(|| Status::unimplemented(""))
}

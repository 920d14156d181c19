//! # Design overview
//!
//! `kms-server` runs the two gRPC planes of sovereign-kms over one [`kms_core::Kms`]:
//!
//! ```text
//!  workload ──mTLS (X.509-SVID)───▶ data listener  ──▶ DataService  ─┐
//!                                                                   ├─▶ Kms (kms-core) ─▶ HSM, store
//!  operator ──mTLS (operator CA)──▶ admin listener ──▶ AdminService ─┘
//! ```
//!
//! Each plane has its own listener, its own rustls configuration (TLS 1.3 only), its own
//! service and its own status mapper. The admin plane requires a certificate from the operator
//! CA in the handshake. The data plane verifies each request's X.509-SVID against the bundle of
//! its trust domain, then admits it only if the inventory covers it ([`Governance`]), then
//! asks the Cedar policies; operators' certificates are not in any workload trust domain.
//! Both planes also serve gRPC health (open) and reflection (of their own services only;
//! authenticated callers only outside `--dev`, or off). A gate in front of each listener
//! (`gate.rs`) gives every request its ids, authenticates it before its body is read, and
//! records every refusal.
//!
//! It does not hold domain rules: validation, authorisation and key handling live in
//! kms-core. It runs every core call under `spawn_blocking`, since those may call the HSM.

mod admin;
mod audit;
mod authn;
mod census;
mod data;
mod destruction;
mod error;
mod gate;
mod governance;
mod histogram;
mod identity;
mod metrics;
mod policy_stats;
mod store_metrics;
mod tls;
mod token_metrics;
mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use api::v1::admin_server::AdminServer;
use api::v1::data_plane_server::DataPlaneServer;
use kms_core::{Kms, Store};
use tokio::net::TcpListener;
use tonic::transport::Server;

pub use admin::AdminService;
pub use audit::{Audit, AUDIT_UNAVAILABLE, MAX_CLIENT_REQUEST_ID, REQUEST_ID};
pub use authn::{
    parse_bundle, parse_jwks, AuthFailure, Authenticator, BadBundle, BundleError, BundleSource,
    JwtConfig,
};
pub use data::{DataService, MAX_BATCH};
pub use destruction::DESTRUCTION_CHECK_EVERY;
pub use error::Error;
pub use gate::{Reflection, SUMMARY_EVERY, UNAUTHENTICATED_PER_SEC};
pub use governance::{Governance, GRANT_HEADER, MAX_PURPOSE, PURPOSE_HEADER};
pub use identity::{operator_identity, svid_facts};
pub use metrics::Metrics;
pub use policy_stats::{EvalStats, PolicyStats, TimedAuthorizer};
pub use store_metrics::StoreMetrics;
pub use token_metrics::{HsmMetrics, TokenWatch, DEEP_CHECK_EVERY};

/// Where and how the two planes listen.
#[derive(Clone, Debug)]
pub struct ListenConfig {
    /// Data-plane address.
    pub data_addr: SocketAddr,
    /// Admin-plane address.
    pub admin_addr: SocketAddr,
    /// Server certificate chain (PEM), presented on both planes.
    pub server_cert: PathBuf,
    /// Server private key (PEM).
    pub server_key: PathBuf,
    /// CA(s) whose client certificates the admin plane accepts.
    pub admin_client_ca: PathBuf,
    /// Metrics and health address, or none: plain HTTP on loopback, or TLS with client
    /// certificates from `metrics_client_ca` (required on any other address).
    pub metrics_addr: Option<SocketAddr>,
    /// The CA whose client certificates the metrics listener requires, making it TLS.
    pub metrics_client_ca: Option<PathBuf>,
}

/// The HTTP/2 and connection limits of one listener (documented in SECURITY.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Open connections, handshakes included; a connection over it is closed at once.
    pub connections: usize,
    /// Concurrent streams (requests) per connection.
    pub streams_per_connection: u32,
    /// Largest header list a request may carry, in bytes.
    pub header_list_bytes: u32,
    /// Largest request message, in bytes (read only once the caller is authenticated).
    pub message_bytes: usize,
    /// Time a request may take, from its headers to its answer.
    pub request_timeout: Duration,
    /// A connection idle this long is pinged; one that does not answer in
    /// [`Limits::keepalive_timeout`] is closed.
    pub keepalive_interval: Duration,
    /// See [`Limits::keepalive_interval`].
    pub keepalive_timeout: Duration,
}

impl Limits {
    /// The data plane's limits: room for many workloads and batches of 1,000 blobs.
    pub const DATA: Limits = Limits {
        connections: 4096,
        streams_per_connection: 128,
        header_list_bytes: 16 * 1024,
        message_bytes: 8 * 1024 * 1024,
        request_timeout: Duration::from_secs(30),
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
    };
    /// The admin plane's limits: few operators; reports over large inventories may be slow.
    pub const ADMIN: Limits = Limits {
        connections: 128,
        streams_per_connection: 32,
        header_list_bytes: 16 * 1024,
        message_bytes: 4 * 1024 * 1024,
        request_timeout: Duration::from_secs(300),
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
    };

    fn builder(&self) -> Server {
        Server::builder()
            .max_concurrent_streams(self.streams_per_connection)
            .http2_max_header_list_size(self.header_list_bytes)
            .timeout(self.request_timeout)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
    }
}

/// What the two planes serve.
#[derive(Clone)]
pub struct Services {
    /// The key service.
    pub kms: Arc<Kms>,
    /// Where every request is recorded before it is answered.
    pub audit: Audit,
    /// The store, for reading the audit log.
    pub store: Arc<dyn Store>,
    /// Trust bundles, inventory and policies.
    pub gov: Arc<Governance>,
    /// Decision times, measured by the data plane's [`TimedAuthorizer`].
    pub stats: PolicyStats,
    /// Who may use gRPC reflection.
    pub reflection: Reflection,
    /// The token and what the key service's metered HSM counted, when metrics are served.
    pub token: Option<TokenWatch>,
    /// The store's write times, when metrics are served.
    pub store_metrics: Option<StoreMetrics>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("kms", &self.kms)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

/// Both planes, bound and ready to serve.
#[derive(Debug)]
pub struct Bound {
    data: TcpListener,
    admin: TcpListener,
    data_tls: Arc<rustls::ServerConfig>,
    admin_tls: Arc<rustls::ServerConfig>,
    metrics: Option<TcpListener>,
    /// The metrics listener's TLS configuration, when it has a client CA.
    metrics_tls: Option<Arc<rustls::ServerConfig>>,
    /// When the certificates the listeners present or trust expire, by name.
    certificates: Vec<(&'static str, u64)>,
}

impl Bound {
    /// Loads TLS material and binds both listeners. Fails before anything is served.
    pub async fn bind(config: &ListenConfig) -> Result<Self, Error> {
        let data_tls = tls::data_server_config(&config.server_cert, &config.server_key)?;
        let admin_tls = tls::admin_server_config(
            &config.server_cert,
            &config.server_key,
            &config.admin_client_ca,
        )?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })
        };
        let metrics_tls = config
            .metrics_client_ca
            .as_ref()
            .map(|ca| tls::metrics_server_config(&config.server_cert, &config.server_key, ca))
            .transpose()?;
        let metrics = match config.metrics_addr {
            Some(addr) if metrics_tls.is_none() && !metrics::plain_http_allowed(addr) => {
                return Err(Error::MetricsNotLoopback { addr })
            }
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let certificates = [
            ("server", &config.server_cert),
            ("operator_ca", &config.admin_client_ca),
        ]
        .into_iter()
        .filter_map(|(name, path)| Some((name, tls::not_after(path)?)))
        .collect();
        Ok(Self {
            data: bind(config.data_addr).await?,
            admin: bind(config.admin_addr).await?,
            data_tls,
            admin_tls,
            metrics,
            metrics_tls,
            certificates,
        })
    }

    /// The addresses actually bound (port 0 resolves to an ephemeral port).
    pub fn local_addrs(&self) -> Result<(SocketAddr, SocketAddr), Error> {
        let addr = |l: &TcpListener, configured| {
            l.local_addr().map_err(|source| Error::Bind {
                addr: configured,
                source,
            })
        };
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        Ok((
            addr(&self.data, unspecified)?,
            addr(&self.admin, unspecified)?,
        ))
    }

    /// The metrics and health address actually bound, if metrics are served.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, Error> {
        self.metrics
            .as_ref()
            .map(|l| {
                l.local_addr().map_err(|source| Error::Bind {
                    addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                    source,
                })
            })
            .transpose()
    }

    /// Serves both planes until `shutdown` resolves, then drains in-flight requests.
    // long: both planes' servers, their layers and the drain, built side by side.
    pub async fn serve(
        self,
        services: Services,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // Each listener describes only its own services.
        let reflection = |plane: &'static [u8]| {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(plane)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .build_v1()
                .map_err(Error::Reflection)
        };
        let open = services.reflection != Reflection::Off;
        // Requests are counted only when a listener serves the counts.
        let metrics = self.metrics.is_some().then(|| {
            Metrics::new(
                services.kms.sealed_flag(),
                services.gov.clock.clone(),
                &services.stats,
                Some((services.kms.clone(), services.gov.clone())),
                services.token.clone(),
                services.store_metrics.as_ref(),
            )
        });
        if let Some(m) = &metrics {
            services.audit.observe(Arc::new(m.clone()));
            for (name, not_after) in &self.certificates {
                m.certificate_expires(name, *not_after);
            }
        }
        let data_gate = gate::GateLayer::new(
            gate::Plane::Data,
            services.audit.clone(),
            services.gov.clone(),
            services.reflection,
            services.kms.sealed_flag(),
            metrics.clone(),
        );
        let admin_gate = gate::GateLayer::new(
            gate::Plane::Admin,
            services.audit.clone(),
            services.gov.clone(),
            services.reflection,
            services.kms.sealed_flag(),
            metrics.clone(),
        );
        let observed = {
            let stop = stopped(stop_rx.clone());
            let metrics = metrics.clone();
            async move {
                match (self.metrics, metrics) {
                    (Some(listener), Some(metrics)) => {
                        metrics::serve(listener, self.metrics_tls, metrics, stop).await
                    }
                    _ => Ok(()),
                }
            }
        };

        let (data_health, data_health_svc) = tonic_health::server::health_reporter();
        data_health
            .set_serving::<DataPlaneServer<DataService>>()
            .await;
        // The data plane's health follows the seal (and, with metrics on, the audit log and the
        // token's deep check): NOT_SERVING while requests would be refused.
        let seal_watch = {
            let (sealed, health) = (services.kms.sealed_flag(), data_health.clone());
            let watched = metrics.clone();
            let was = Arc::new(AtomicBool::new(false));
            every(SEAL_CHECK_EVERY, stop_rx.clone(), move || {
                let (sealed, health, was) = (sealed.clone(), health.clone(), was.clone());
                let watched = watched.clone();
                async move {
                    let now = match watched {
                        Some(m) => tokio::task::spawn_blocking(move || m.not_serving().is_some())
                            .await
                            .unwrap_or(true),
                        None => sealed.load(Ordering::Relaxed),
                    };
                    if was.swap(now, Ordering::Relaxed) != now {
                        let status = if now {
                            tonic_health::ServingStatus::NotServing
                        } else {
                            tonic_health::ServingStatus::Serving
                        };
                        health.set_service_status("", status).await;
                        health.set_service_status("kms.v1.DataPlane", status).await;
                    }
                }
            })
        };
        let limits = Limits::DATA;
        let data = limits
            .builder()
            .layer(data_gate.clone())
            .add_service(data_health_svc)
            .add_optional_service(
                open.then(|| reflection(api::DATA_FILE_DESCRIPTOR_SET))
                    .transpose()?,
            )
            .add_service(
                DataPlaneServer::new(DataService::new(
                    services.kms.clone(),
                    services.audit.clone(),
                    services.gov.clone(),
                ))
                .max_decoding_message_size(limits.message_bytes),
            )
            .serve_with_incoming_shutdown(
                tls::incoming("data", self.data, self.data_tls, limits.connections),
                stopped(stop_rx.clone()),
            );

        // Key destructions fall due on the server's clock (docs/APPROVALS.md).
        let destructions = {
            let (kms, audit, clock) = (
                services.kms.clone(),
                services.audit.clone(),
                services.gov.clock.clone(),
            );
            every(DESTRUCTION_CHECK_EVERY, stop_rx.clone(), move || {
                let (kms, audit, clock) = (kms.clone(), audit.clone(), clock.clone());
                async move {
                    destruction::run_due(&kms, &audit, &clock).await;
                }
            })
        };

        let (admin_health, admin_health_svc) = tonic_health::server::health_reporter();
        admin_health
            .set_serving::<AdminServer<AdminService>>()
            .await;
        let limits = Limits::ADMIN;
        let admin = limits
            .builder()
            .layer(admin_gate.clone())
            .add_service(admin_health_svc)
            .add_optional_service(
                open.then(|| reflection(api::ADMIN_FILE_DESCRIPTOR_SET))
                    .transpose()?,
            )
            .add_service(
                AdminServer::new(AdminService::new(
                    services.kms,
                    services.audit,
                    services.store,
                    services.gov,
                    services.stats,
                ))
                .max_decoding_message_size(limits.message_bytes),
            )
            .serve_with_incoming_shutdown(
                tls::incoming("admin", self.admin, self.admin_tls, limits.connections),
                stopped(stop_rx.clone()),
            );

        // Refusals counted beyond the budget are written as summaries, and once more at stop.
        let summaries = {
            let (data_gate, admin_gate) = (data_gate.clone(), admin_gate.clone());
            every(SUMMARY_EVERY, stop_rx, move || {
                let (data_gate, admin_gate) = (data_gate.clone(), admin_gate.clone());
                async move {
                    data_gate.summarise().await;
                    admin_gate.summarise().await;
                }
            })
        };

        let (d, a, m, (), (), ()) =
            tokio::join!(data, admin, observed, summaries, destructions, seal_watch);
        if let Err(e) = m {
            tracing::error!(error = %e, "the metrics listener failed");
        }
        data_gate.summarise().await;
        admin_gate.summarise().await;
        d.map_err(|source| Error::Serve {
            plane: "data",
            source,
        })?;
        a.map_err(|source| Error::Serve {
            plane: "admin",
            source,
        })?;
        Ok(())
    }
}

/// How often the data plane's gRPC health is brought in line with the seal.
const SEAL_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Runs `tick` every `period` until `stop` turns true.
async fn every<F, Fut>(
    period: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut tick: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut interval = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        tick().await;
    }
}

//! A node: one KMS server process on an opened deployment. [`Node::prepare`] opens and seeds
//! everything before the async runtime exists (SoftHSM2's configuration is process-wide
//! environment); [`Node::run`] binds both planes, serves until SIGTERM or SIGINT, and stops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kms_core::audit::AuditLog;
use kms_core::{Deps, Kms, RocksStore, SystemRng};
use server::{Audit, Bound, Governance, ListenConfig, PolicyStats, Services, TimedAuthorizer};

use crate::error::{write_public, Error};
use crate::open::{ClockKind, Deployment};

/// How a node is started (`kms serve`'s flags).
#[derive(Debug, Default)]
pub struct NodeOptions {
    /// A development instance: the development clock, custody, workload and policy.
    pub dev: bool,
    /// Data-plane address, overriding the config (port 0 picks a free port).
    pub data_addr: Option<SocketAddr>,
    /// Admin-plane address, overriding the config.
    pub admin_addr: Option<SocketAddr>,
    /// Metrics and health address or `off`, overriding the config.
    pub metrics_addr: Option<crate::config::MetricsSetting>,
    /// Serve without recording requests in the audit log (measurement only; dev only).
    pub unaudited: bool,
    /// Allow every admitted workload every key, skipping Cedar (measurement only; dev only).
    pub no_policy: bool,
}

/// Everything opened before the async runtime starts.
pub struct Node {
    kms: Arc<Kms>,
    audit_log: Arc<AuditLog>,
    store: Arc<RocksStore>,
    gov: Arc<Governance>,
    stats: PolicyStats,
    unaudited: bool,
    listen: ListenConfig,
    reflection: server::Reflection,
    endpoints: PathBuf,
    dev: bool,
    token: Option<server::TokenWatch>,
    store_metrics: Option<server::StoreMetrics>,
}

impl Node {
    /// Reads the config, opens the HSM and the store, seeds them and loads every key. Runs
    /// before the async runtime exists, because SoftHSM2's configuration is process-wide
    /// environment.
    pub fn prepare(config_path: &Path, options: &NodeOptions) -> Result<Self, Error> {
        let config = crate::open::load(config_path)?;
        if options.dev {
            // Before the token is opened as the user: the ceremony's Security Officer step
            // needs a process with no user logged in.
            crate::seed::dev_custody(config_path, &config.data_dir)?;
        }
        let clock = if options.dev {
            ClockKind::Dev
        } else {
            ClockKind::System
        };
        let d = Deployment::open_loaded(config, config_path, clock)?;
        let gov = Arc::new(d.governance()?);
        crate::seed::operators(&d.config, config_path, &gov, &d.audit_log)?;
        crate::seed::report_approvals(&gov, &d.audit_log)?;
        crate::seed::trust_bundles(
            &d.config,
            config_path,
            d.store.as_ref(),
            d.clock.as_ref(),
            &d.audit_log,
        )?;
        if options.dev {
            crate::seed::dev_governance(&gov, &d.audit_log)?;
        }
        gov.load_bundles()?;
        let stats = PolicyStats::new();
        let metrics_addr = options
            .metrics_addr
            .unwrap_or(d.config.listen.metrics)
            .addr();
        let (hsm, token, store_metrics) = metered(&d, metrics_addr.is_some());
        let kms = Kms::open(Deps {
            hsm,
            store: d.store.clone(),
            clock: d.clock,
            rng: d.rng,
            authorizer: if options.no_policy {
                tracing::warn!("--no-policy: Cedar policies are NOT evaluated (measurement only)");
                Arc::new(kms_core::governance::authz::danger::AllowAuthenticated)
            } else {
                Arc::new(TimedAuthorizer::new(gov.policies.clone(), stats.clone()))
            },
        })?;
        if options.unaudited {
            tracing::warn!(
                "--unaudited: requests are NOT recorded in the audit log (measurement only)"
            );
        }
        let config = d.config;
        Ok(Self {
            kms: Arc::new(kms),
            audit_log: d.audit_log,
            store: d.store,
            gov,
            stats,
            unaudited: options.unaudited,
            listen: ListenConfig {
                data_addr: options.data_addr.unwrap_or(config.listen.data),
                admin_addr: options.admin_addr.unwrap_or(config.listen.admin),
                server_cert: config.tls.server_cert,
                server_key: config.tls.server_key,
                admin_client_ca: config.tls.admin_client_ca,
                metrics_addr,
                metrics_client_ca: config.listen.metrics_client_ca,
            },
            reflection: match config.listen.reflection {
                Some(setting) => setting.into(),
                None if options.dev => server::Reflection::Open,
                None => server::Reflection::Authenticated,
            },
            endpoints: config.data_dir.join("endpoints.json"),
            dev: options.dev,
            token,
            store_metrics,
        })
    }

    /// Binds, records the bound addresses in `data_dir/endpoints.json`, tells `announce` of
    /// them (`{"event": "listening", "data", "admin"}`), and serves until a shutdown signal.
    pub async fn run(self, announce: impl FnOnce(&serde_json::Value)) -> Result<(), Error> {
        let shutdown = shutdown_signal();
        let bound = Bound::bind(&self.listen).await?;
        let (data, admin) = bound.local_addrs()?;
        let metrics = bound.metrics_addr()?.map(|a| a.to_string());
        let listening = serde_json::json!({
            "event": "listening",
            "data": data.to_string(),
            "admin": admin.to_string(),
            "metrics": metrics,
        });
        let tmp = self.endpoints.with_extension("json.tmp");
        write_public(&tmp, listening.to_string().as_bytes())?;
        std::fs::rename(&tmp, &self.endpoints).map_err(|source| Error::File {
            what: "cannot write",
            path: self.endpoints.clone(),
            source,
        })?;
        announce(&listening);
        tracing::info!(%data, %admin, metrics = metrics.as_deref().unwrap_or("off"), "serving");
        if self.dev {
            tracing::info!(
                "try: kms key create --alias demo && kms data generate-key --key demo --context app=demo"
            );
        }
        let boot = boot_id();
        let audit = if self.unaudited {
            Audit::danger_disabled()
        } else {
            Audit::new(self.audit_log.clone())
        };
        self.audit_log
            .submit(crate::events::server_start(&boot, data, admin))
            .wait()
            .await
            .map_err(|e| Error::Usage(format!("cannot start: {e}")))?;
        let services = Services {
            kms: self.kms,
            audit,
            store: self.store,
            gov: self.gov.clone(),
            stats: self.stats,
            reflection: self.reflection,
            token: self.token,
            store_metrics: self.store_metrics,
        };
        let flusher = tokio::spawn(flush_usage_every(self.gov.clone(), USAGE_FLUSH));
        let result = bound.serve(services, shutdown).await;
        flusher.abort();
        let gov = self.gov.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || gov.inventory.flush_usage()).await {
            tracing::warn!(error = %e, "workload usage could not be saved at stop");
        }
        let _ = std::fs::remove_file(&self.endpoints);
        let stop = crate::events::server_stop(&boot, result.is_ok());
        if self.audit_log.submit(stop).wait().await.is_err() {
            tracing::error!("the server stop could not be audited");
        }
        // Signs the final checkpoint; blocking, so off the async workers.
        let log = self.audit_log;
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        tracing::info!("stopped");
        Ok(result?)
    }
}

/// The HSM the key service runs on. With metrics served: one that counts every operation,
/// the token and its counts for the metrics listener, and the store's writes timed.
fn metered(
    d: &Deployment,
    metrics: bool,
) -> (
    Arc<dyn hsm_bridge::Hsm>,
    Option<server::TokenWatch>,
    Option<server::StoreMetrics>,
) {
    if !metrics {
        return (d.hsm.clone(), None, None);
    }
    let watch = server::TokenWatch {
        hsm: d.hsm.clone(),
        metrics: server::HsmMetrics::new(),
    };
    let counted = hsm_bridge::Metered::new(d.hsm.clone(), Arc::new(watch.metrics.clone()));
    let store = server::StoreMetrics::new();
    d.store.observe(Arc::new(store.clone()));
    (Arc::new(counted), Some(watch), Some(store))
}

/// How often last-seen times and call counts are written back.
const USAGE_FLUSH: std::time::Duration = std::time::Duration::from_secs(10);

async fn flush_usage_every(gov: Arc<Governance>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let g = gov.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || g.inventory.flush_usage()).await {
            tracing::warn!(error = %e, "workload usage could not be saved");
        }
    }
}

/// A short random id for this run of the server; request ids it assigns start with it.
fn boot_id() -> String {
    let mut bytes = [0u8; 6];
    match kms_core::Rng::fill(&SystemRng::new(), &mut bytes) {
        Ok(()) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => "boot".into(),
    }
}

/// Installs the SIGTERM and SIGINT handlers at once (so that a signal arriving right after
/// start-up is not fatal) and resolves when either arrives.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGINT");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

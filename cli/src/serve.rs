//! `kms serve`: open the HSM and store, bind both planes, serve until SIGTERM or SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use hsm_bridge::{find_softhsm2_module, HsmConfig, HsmEvent, Pkcs11Hsm};
use kms_core::audit::{AuditEvent, AuditLog};
use kms_core::{AllowAuthenticated, Deps, Kms, Rng, RocksStore, SystemClock, SystemRng};
use server::{Audit, Bound, ListenConfig, Services};

use crate::config::Config;
use crate::dev::{self, DevLayout};
use crate::error::{write_public, Error};

/// Options of `kms serve`.
#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Config file (see the README); not needed with --dev.
    #[arg(long, conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Development mode: create (first start) or reuse a SoftHSM2 token, a RocksDB store and a
    /// development PKI under --data-dir (default ./.kms).
    #[arg(long)]
    dev: bool,
    /// Data-plane address, overriding the config (port 0 picks a free port).
    #[arg(long)]
    data_addr: Option<SocketAddr>,
    /// Admin-plane address, overriding the config (port 0 picks a free port).
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    /// Serve without recording requests in the audit log, to measure what auditing costs.
    /// Development instances only.
    #[arg(long, requires = "dev", hide = true)]
    unaudited: bool,
}

/// Everything opened before the async runtime starts.
pub(crate) struct Prepared {
    kms: Arc<Kms>,
    audit_log: Arc<AuditLog>,
    store: Arc<RocksStore>,
    unaudited: bool,
    listen: ListenConfig,
    endpoints: PathBuf,
    dev: bool,
}

/// Reads the config, opens the HSM and the store, loads every key. Runs before the async
/// runtime exists, because SoftHSM2's configuration is process-wide environment.
pub(crate) fn prepare(args: &ServeArgs, data_dir: &Path) -> Result<Prepared, Error> {
    let config_path = match (&args.config, args.dev) {
        (Some(path), false) => path.clone(),
        (None, true) => dev::ensure(&DevLayout::new(data_dir.to_path_buf()))?,
        _ => {
            return Err(Error::Usage(
                "kms serve needs --config FILE, or --dev for a development instance".into(),
            ))
        }
    };
    let config = Config::load(&config_path)?;
    if let Some(conf) = &config.hsm.softhsm2_conf {
        hsm_bridge::softhsm::use_conf(conf);
    }
    let module = match &config.hsm.module {
        Some(m) => m.clone(),
        None => find_softhsm2_module()?,
    };
    let mut hsm_config = HsmConfig::new(
        module,
        config.hsm.token_label.clone(),
        config.user_pin(&config_path)?,
    );
    if let Some(n) = config.hsm.max_sessions {
        hsm_config.max_sessions = n;
    }
    // The store and the audit log open first, so that a failure to open the HSM is on record.
    let store = Arc::new(RocksStore::open(&config.data_dir.join("store"))?);
    let clock = Arc::new(SystemClock);
    let audit_log = Arc::new(AuditLog::open(
        store.clone(),
        clock.clone(),
        config.audit.settings(),
    )?);
    let hsm = match Pkcs11Hsm::open(&hsm_config) {
        Ok(hsm) => Arc::new(hsm),
        Err(e) => {
            let mut event = AuditEvent::new("hsm.open_failed", "error");
            event.reason = Some(e.to_string());
            event
                .detail
                .insert("token".into(), hsm_config.token_label.clone());
            let _ = audit_log.submit(event).wait_blocking();
            audit_log.close();
            return Err(e.into());
        }
    };
    tracing::info!(token = %hsm.token_label(), module = %hsm.module().display(), "hsm ready");
    audit_log.attach_hsm(hsm.clone())?;
    let observer_log = Arc::downgrade(&audit_log);
    hsm.set_observer(Box::new(move |event| {
        let HsmEvent::Retry { error } = event else {
            return;
        };
        if let Some(log) = observer_log.upgrade() {
            let mut record = AuditEvent::new("hsm.retry", "retrying");
            record.reason = Some(error.clone());
            // Not awaited: the operation that met the failure is itself audited.
            drop(log.submit(record));
        }
    }));
    let kms = Kms::open(Deps {
        hsm,
        store: store.clone(),
        clock,
        rng: Arc::new(SystemRng::new()),
        authorizer: Arc::new(AllowAuthenticated),
    })?;
    if args.unaudited {
        tracing::warn!(
            "--unaudited: requests are NOT recorded in the audit log (measurement only)"
        );
    }
    Ok(Prepared {
        kms: Arc::new(kms),
        audit_log,
        store,
        unaudited: args.unaudited,
        listen: ListenConfig {
            data_addr: args.data_addr.unwrap_or(config.listen.data),
            admin_addr: args.admin_addr.unwrap_or(config.listen.admin),
            server_cert: config.tls.server_cert,
            server_key: config.tls.server_key,
            data_client_ca: config.tls.data_client_ca,
            admin_client_ca: config.tls.admin_client_ca,
        },
        endpoints: config.data_dir.join("endpoints.json"),
        dev: args.dev,
    })
}

/// Binds, announces the bound addresses, and serves until a shutdown signal.
pub(crate) async fn run(prepared: Prepared) -> Result<(), Error> {
    let shutdown = shutdown_signal();
    let bound = Bound::bind(&prepared.listen).await?;
    let (data, admin) = bound.local_addrs()?;
    let announce = serde_json::json!({ "event": "listening", "data": data.to_string(), "admin": admin.to_string() });
    let tmp = prepared.endpoints.with_extension("json.tmp");
    write_public(&tmp, announce.to_string().as_bytes())?;
    std::fs::rename(&tmp, &prepared.endpoints).map_err(|source| Error::File {
        what: "cannot write",
        path: prepared.endpoints.clone(),
        source,
    })?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{announce}");
        let _ = out.flush();
    }
    tracing::info!(%data, %admin, "serving");
    if prepared.dev {
        tracing::info!(
            "try: kms key create --alias demo && kms data generate-key --key demo --context app=demo"
        );
    }
    let boot = boot_id();
    let audit = if prepared.unaudited {
        Audit::disabled(boot.clone())
    } else {
        Audit::new(prepared.audit_log.clone(), boot.clone())
    };
    let mut start = AuditEvent::new("server.start", "ok");
    start
        .detail
        .insert("version".into(), env!("CARGO_PKG_VERSION").into());
    start.detail.insert("boot".into(), boot.clone());
    start.detail.insert("data".into(), data.to_string());
    start.detail.insert("admin".into(), admin.to_string());
    prepared
        .audit_log
        .submit(start)
        .wait()
        .await
        .map_err(|e| Error::Usage(format!("cannot start: {e}")))?;
    let services = Services {
        kms: prepared.kms,
        audit,
        store: prepared.store,
    };
    let result = bound.serve(services, shutdown).await;
    let _ = std::fs::remove_file(&prepared.endpoints);
    let mut stop = AuditEvent::new("server.stop", if result.is_ok() { "ok" } else { "error" });
    stop.detail.insert("boot".into(), boot);
    if prepared.audit_log.submit(stop).wait().await.is_err() {
        tracing::error!("the server stop could not be audited");
    }
    // Signs the final checkpoint; blocking, so off the async workers.
    let log = prepared.audit_log;
    let _ = tokio::task::spawn_blocking(move || log.close()).await;
    tracing::info!("stopped");
    Ok(result?)
}

/// A short random id for this run of the server; request ids it assigns start with it.
fn boot_id() -> String {
    let mut bytes = [0u8; 6];
    match SystemRng::new().fill(&mut bytes) {
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

//! `kms serve`: open the HSM and store, bind both planes, serve until SIGTERM or SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use hsm_bridge::{find_softhsm2_module, HsmConfig, Pkcs11Hsm};
use kms_core::{AllowAuthenticated, Deps, Kms, RocksStore, SystemClock, SystemRng};
use server::{Bound, ListenConfig};

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
}

/// Everything opened before the async runtime starts.
pub(crate) struct Prepared {
    kms: Arc<Kms>,
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
    let hsm = Pkcs11Hsm::open(&hsm_config)?;
    tracing::info!(token = %hsm.token_label(), module = %hsm.module().display(), "hsm ready");
    let store = RocksStore::open(&config.data_dir.join("store"))?;
    let kms = Kms::open(Deps {
        hsm: Arc::new(hsm),
        store: Arc::new(store),
        clock: Arc::new(SystemClock),
        rng: Arc::new(SystemRng::new()),
        authorizer: Arc::new(AllowAuthenticated),
    })?;
    Ok(Prepared {
        kms: Arc::new(kms),
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
    let result = bound.serve(prepared.kms, shutdown_signal()).await;
    let _ = std::fs::remove_file(&prepared.endpoints);
    tracing::info!("stopped");
    Ok(result?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        tracing::error!("cannot install SIGTERM handler; stop with SIGINT");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

//! Opening a deployment: the config, the data directory, the store, the audit log, the token
//! and governance, in one place and one order (the store and the audit log first, so that a
//! failure to open the token is on record).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hsm_bridge::{find_softhsm2_module, HsmConfig, HsmEvent, Pkcs11Hsm};
use kms_core::audit::AuditLog;
use kms_core::governance::approvals::Approvals;
use kms_core::governance::grants::Grants;
use kms_core::governance::inventory::Inventory;
use kms_core::governance::operators::Operators;
use kms_core::governance::policy::Policies;
use kms_core::{Clock, Rng, RocksStore, SystemClock, SystemRng};
use server::{Authenticator, Governance};

use crate::config::Config;
use crate::error::Error;

/// A deployment opened on this host: its config, store, audit log and token.
pub struct Deployment {
    /// The parsed config.
    pub config: Config,
    /// The config file (its directory anchors relative paths; errors name it).
    pub config_path: PathBuf,
    /// The store under `data_dir/store`.
    pub store: Arc<RocksStore>,
    /// The deployment's clock: the system clock, or a development server's clock.
    pub clock: Arc<dyn Clock>,
    /// The random source.
    pub rng: Arc<dyn Rng>,
    /// The audit log, signing checkpoints with the token's audit key.
    pub audit_log: Arc<AuditLog>,
    /// The token, logged in as the user.
    pub hsm: Arc<Pkcs11Hsm>,
}

/// Which clock a deployment runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClockKind {
    /// The development clock (`kms dev advance-clock`); only for development deployments.
    Dev,
    /// The system clock.
    System,
}

impl ClockKind {
    /// The clock of the deployment `config` (read from `config_path`) when no server says
    /// otherwise: a development layout's runs on the development clock.
    pub fn of(config_path: &Path, config: &Config) -> Self {
        if crate::dev::is_dev_config(config_path, config) {
            ClockKind::Dev
        } else {
            ClockKind::System
        }
    }

    /// The clock itself, for the deployment whose data directory is `data_dir`.
    pub fn clock(self, data_dir: &Path) -> Arc<dyn Clock> {
        match self {
            // Tests move this clock forward (`kms dev advance-clock`); never outside --dev.
            ClockKind::Dev => Arc::new(crate::dev::DevClock::new(data_dir)),
            ClockKind::System => Arc::new(SystemClock),
        }
    }
}

impl Deployment {
    /// Opens the deployment `config_path` names, as a server does: the data directory made
    /// owner-only, the store, the audit log (on `clock`), then the token.
    pub fn open(config_path: &Path, clock: ClockKind) -> Result<Self, Error> {
        Self::open_loaded(load(config_path)?, config_path, clock)
    }

    /// As [`Deployment::open`], with the config already [`load`]ed.
    pub fn open_loaded(
        config: Config,
        config_path: &Path,
        clock: ClockKind,
    ) -> Result<Self, Error> {
        // The PIN and the module are found first: a setting that cannot work leaves no data
        // directory or store behind.
        let token = hsm_config(&config, config_path)?;
        let store = Arc::new(RocksStore::open(&config.data_dir.join("store"))?);
        Self::assemble(config, config_path, token, store, clock)
    }

    /// Opens the deployment for a ceremony, with the server stopped: as [`Deployment::open`],
    /// on the deployment's own clock (a development layout's is the development clock, so that
    /// an approval's age is what the server saw), and the governance stores, so that the grant
    /// MAC key exists to be escrowed.
    pub fn open_offline(config_path: &Path) -> Result<Self, Error> {
        let config = load(config_path)?;
        let token = hsm_config(&config, config_path)?;
        let store = Arc::new(
            RocksStore::open(&config.data_dir.join("store")).map_err(|e| {
                Error::Usage(format!(
                    "cannot open the store under {} ({e}); ceremonies run with the server stopped",
                    config.data_dir.display()
                ))
            })?,
        );
        let clock = ClockKind::of(config_path, &config);
        let opened = Self::assemble(config, config_path, token, store, clock)?;
        opened.governance()?;
        Ok(opened)
    }

    fn assemble(
        config: Config,
        config_path: &Path,
        token: HsmConfig,
        store: Arc<RocksStore>,
        clock: ClockKind,
    ) -> Result<Self, Error> {
        let clock = clock.clock(&config.data_dir);
        let audit_log = Arc::new(AuditLog::open(
            store.clone(),
            clock.clone(),
            config.audit.settings(),
        )?);
        let hsm = open_hsm(&token, &audit_log)?;
        Ok(Self {
            config,
            config_path: config_path.to_path_buf(),
            store,
            clock,
            rng: Arc::new(SystemRng::new()),
            audit_log,
            hsm,
        })
    }

    /// The inventory, policies, grants, operators, approvals and authenticator, loaded from
    /// the store.
    pub fn governance(&self) -> Result<Governance, Error> {
        let (config, config_path) = (&self.config, self.config_path.as_path());
        let store = &self.store;
        let opened = Approvals::open(
            store.clone(),
            config.approvals.rules(config_path)?,
            self.clock.now_unix(),
        )?;
        if opened.config_differs {
            tracing::warn!(
                "the [approvals] settings in the config differ from the stored approval rules; \
                 the stored rules apply (change them with `kms approval set-rules`)"
            );
        }
        for r in &opened.interrupted {
            tracing::warn!(approval = %r.id, change = %r.action, target = %r.target,
                "an approved change was interrupted by a stop; it is marked failed");
        }
        let inventory = Arc::new(Inventory::open(
            store.clone(),
            self.clock.clone(),
            config.inventory.settings(),
        )?);
        let policies = Arc::new(Policies::open(store.clone(), self.clock.clone())?);
        let grants = Arc::new(Grants::open(
            store.clone(),
            self.clock.clone(),
            self.rng.clone(),
            self.hsm.as_ref(),
            config.grants.settings(),
        )?);
        Ok(Governance {
            inventory,
            policies,
            grants,
            authn: Arc::new(Authenticator::new(
                self.clock.clone(),
                config.jwt.settings(),
            )),
            operators: Arc::new(Operators::open(store.clone())?),
            approvals: Arc::new(opened.approvals),
            approval_lock: tokio::sync::Mutex::new(()),
            store: store.clone(),
            clock: self.clock.clone(),
            rng: self.rng.clone(),
            min_destroy_waiting_days: config.keys.min_destroy_waiting_days(config_path)?,
            deployment_settings: crate::config::deployment_settings(config),
        })
    }
}

/// Reads the config, points SoftHSM2 at its configuration (process-wide environment: call
/// before any other thread exists) and makes the data directory owner-only.
pub fn load(config_path: &Path) -> Result<Config, Error> {
    let config = Config::load(config_path)?;
    use_softhsm2_conf(&config);
    owner_only(&config.data_dir)?;
    Ok(config)
}

/// Points SoftHSM2 at the configuration the config names, if any.
pub fn use_softhsm2_conf(config: &Config) {
    if let Some(conf) = &config.hsm.softhsm2_conf {
        hsm_bridge::softhsm::use_conf(conf);
    }
}

/// Takes group and other permissions off everything under `dir` (files an earlier version
/// created 0644, say); what is created from now on is owner-only by the process umask.
/// Symbolic links are not followed.
pub fn owner_only(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let file_err = |source| Error::File {
            what: "cannot restrict the permissions of",
            path: path.clone(),
            source,
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(file_err(e)),
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
                .map_err(file_err)?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(file_err)? {
                pending.push(entry.map_err(file_err)?.path());
            }
        }
    }
    Ok(())
}

/// How to reach the token a config names, with the user PIN it points to.
pub fn hsm_config(config: &Config, config_path: &Path) -> Result<HsmConfig, Error> {
    let module = match &config.hsm.module {
        Some(m) => m.clone(),
        None => find_softhsm2_module()?,
    };
    let mut hsm_config = HsmConfig::new(
        module,
        config.hsm.token_label.clone(),
        config.user_pin(config_path)?,
    );
    if let Some(n) = config.hsm.max_sessions {
        hsm_config.max_sessions = n;
    }
    Ok(hsm_config)
}

/// Opens the token, recording a failure to open it and every retried HSM call in the audit
/// log, and attaches it to the log (which signs checkpoints with it).
fn open_hsm(hsm_config: &HsmConfig, audit_log: &Arc<AuditLog>) -> Result<Arc<Pkcs11Hsm>, Error> {
    let hsm = match Pkcs11Hsm::open(hsm_config) {
        Ok(hsm) => Arc::new(hsm),
        Err(e) => {
            let event = crate::events::hsm_open_failed(&hsm_config.token_label, &e);
            let _ = audit_log.submit(event).wait_blocking();
            audit_log.close();
            return Err(e.into());
        }
    };
    tracing::info!(token = %hsm.token_label(), module = %hsm.module().display(), "hsm ready");
    audit_log.attach_hsm(hsm.clone())?;
    let observer_log = Arc::downgrade(audit_log);
    hsm.set_observer(Box::new(move |event| {
        let HsmEvent::Retry { error } = event else {
            return;
        };
        if let Some(log) = observer_log.upgrade() {
            // Not awaited: the operation that met the failure is itself audited.
            drop(log.submit(crate::events::hsm_retry(error)));
        }
    }));
    Ok(hsm)
}

/// The config file of a command: `config`, or the development config under `data_dir` when
/// it exists.
pub fn config_path_or_dev(config: Option<&PathBuf>, data_dir: &Path) -> Result<PathBuf, Error> {
    if let Some(path) = config {
        return Ok(path.clone());
    }
    let layout = crate::dev::DevLayout::new(data_dir.to_path_buf());
    let dev = layout.config();
    if dev.exists() {
        layout.point_token_conf()?;
        return Ok(dev);
    }
    Err(Error::Usage(format!(
        "no config: pass --config FILE, or --data-dir of a development instance ({} not found)",
        dev.display()
    )))
}

/// Opens the store under a config's data directory read-only (beside a running server).
pub fn open_store_read_only(config: &Config) -> Result<RocksStore, Error> {
    Ok(RocksStore::open_read_only(&config.data_dir.join("store"))?)
}

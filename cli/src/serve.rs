//! `kms serve`: open the HSM and store, bind both planes, serve until SIGTERM or SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use hsm_bridge::{find_softhsm2_module, HsmConfig, HsmEvent, Pkcs11Hsm};
use kms_core::audit::{object_hash, AuditEvent, AuditLog};
use kms_core::governance::approvals::Approvals;
use kms_core::governance::grants::Grants;
use kms_core::governance::inventory::{Inventory, NewWorkload, Selector};
use kms_core::governance::operators::{NewOperator, Operators};
use kms_core::governance::policy::Policies;
use kms_core::governance::trust::TrustBundleRecord;
use kms_core::{Clock, Deps, Kms, Labels, Rng, RocksStore, Store, SystemClock, SystemRng};
use server::{
    Audit, Authenticator, Bound, Governance, ListenConfig, PolicyStats, Services, TimedAuthorizer,
};

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
    /// Allow every admitted workload every key, skipping Cedar, to measure what policy
    /// evaluation costs. Development instances only.
    #[arg(long, requires = "dev", hide = true)]
    no_policy: bool,
}

/// Everything opened before the async runtime starts.
pub(crate) struct Prepared {
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
}

/// Reads the config, opens the HSM and the store, loads every key. Runs before the async
/// runtime exists, because SoftHSM2's configuration is process-wide environment.
pub(crate) fn prepare(args: &ServeArgs, data_dir: &Path) -> Result<Prepared, Error> {
    let config_path = config_path(args, data_dir)?;
    let config = Config::load(&config_path)?;
    if let Some(conf) = &config.hsm.softhsm2_conf {
        hsm_bridge::softhsm::use_conf(conf);
    }
    owner_only(&config.data_dir)?;
    if args.dev {
        // Before the token is opened as the user: the ceremony's Security Officer step needs
        // a process with no user logged in.
        dev_custody(&config_path, &config.data_dir)?;
    }
    // The store and the audit log open first, so that a failure to open the HSM is on record.
    let store = Arc::new(RocksStore::open(&config.data_dir.join("store"))?);
    let clock: Arc<dyn Clock> = if args.dev {
        // Tests move this clock forward (`kms dev advance-clock`); never outside --dev.
        Arc::new(dev::DevClock::new(&config.data_dir))
    } else {
        Arc::new(SystemClock)
    };
    let audit_log = Arc::new(AuditLog::open(
        store.clone(),
        clock.clone(),
        config.audit.settings(),
    )?);
    let hsm = open_hsm(&config, &config_path, &audit_log)?;
    let rng: Arc<dyn Rng> = Arc::new(SystemRng::new());
    let gov = Arc::new(open_governance(
        &config,
        &config_path,
        &store,
        &clock,
        &rng,
        hsm.as_ref(),
    )?);
    seed_operators(&config, &config_path, &gov, &audit_log)?;
    report_approvals(&gov, &audit_log)?;
    seed_trust_bundles(
        &config,
        &config_path,
        store.as_ref(),
        clock.as_ref(),
        &audit_log,
    )?;
    if args.dev {
        seed_dev_governance(&gov, &audit_log)?;
    }
    gov.load_bundles()?;
    let stats = PolicyStats::new();
    let kms = Kms::open(Deps {
        hsm,
        store: store.clone(),
        clock,
        rng,
        authorizer: if args.no_policy {
            tracing::warn!("--no-policy: Cedar policies are NOT evaluated (measurement only)");
            Arc::new(kms_core::governance::authz::danger::AllowAuthenticated)
        } else {
            Arc::new(TimedAuthorizer::new(gov.policies.clone(), stats.clone()))
        },
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
        gov,
        stats,
        unaudited: args.unaudited,
        listen: ListenConfig {
            data_addr: args.data_addr.unwrap_or(config.listen.data),
            admin_addr: args.admin_addr.unwrap_or(config.listen.admin),
            server_cert: config.tls.server_cert,
            server_key: config.tls.server_key,
            admin_client_ca: config.tls.admin_client_ca,
        },
        reflection: match config.listen.reflection {
            Some(setting) => setting.into(),
            None if args.dev => server::Reflection::Open,
            None => server::Reflection::Authenticated,
        },
        endpoints: config.data_dir.join("endpoints.json"),
        dev: args.dev,
    })
}

/// Opens what a ceremony needs, with the server stopped: the store, the audit log and the
/// token (logged in as the user), and the governance stores, so that the grant MAC key exists
/// to be escrowed.
pub(crate) fn open_offline(config_path: &Path) -> Result<crate::ceremony::Offline, Error> {
    let config = Config::load(config_path)?;
    if let Some(conf) = &config.hsm.softhsm2_conf {
        hsm_bridge::softhsm::use_conf(conf);
    }
    owner_only(&config.data_dir)?;
    let store = Arc::new(
        RocksStore::open(&config.data_dir.join("store")).map_err(|e| {
            Error::Usage(format!(
                "cannot open the store under {} ({e}); ceremonies run with the server stopped",
                config.data_dir.display()
            ))
        })?,
    );
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let audit_log = Arc::new(AuditLog::open(
        store.clone(),
        clock.clone(),
        config.audit.settings(),
    )?);
    let hsm = open_hsm(&config, config_path, &audit_log)?;
    let rng: Arc<dyn Rng> = Arc::new(SystemRng::new());
    open_governance(&config, config_path, &store, &clock, &rng, hsm.as_ref())?;
    Ok(crate::ceremony::Offline {
        store,
        audit_log,
        hsm,
    })
}

/// The development custodians: `alice`, `bob` and `carol`, threshold 2, their age identities
/// and share files in `DATA_DIR/custodians/`. Runs the init ceremony on the first start.
const DEV_CUSTODIANS: [&str; 3] = ["alice", "bob", "carol"];

fn dev_custody(config_path: &Path, data_dir: &Path) -> Result<(), Error> {
    if crate::ceremony::recorded_ceremony(data_dir)?.is_some() {
        return Ok(());
    }
    let dir = data_dir.join("custodians");
    std::fs::create_dir_all(&dir).map_err(|source| Error::File {
        what: "cannot create",
        path: dir.clone(),
        source,
    })?;
    let mut specs = Vec::new();
    for name in DEV_CUSTODIANS {
        let key = dir.join(format!("{name}.key"));
        let identity = if key.exists() {
            let text = secrecy::SecretString::from(crate::input::text_file(&key)?);
            recovery::parse_identity(&text, &key).map_err(Error::from)?
        } else {
            let identity = age::x25519::Identity::generate();
            // The identity file's text holds the private key: kept in a secret type.
            let text = secrecy::SecretString::from(format!(
                "# development custodian {name} (never use outside development)\n# public key: {}\n{}\n",
                identity.to_public(),
                secrecy::ExposeSecret::expose_secret(&identity.to_string())
            ));
            std::fs::write(&key, secrecy::ExposeSecret::expose_secret(&text)).map_err(
                |source| Error::File {
                    what: "cannot write",
                    path: key.clone(),
                    source,
                },
            )?;
            identity
        };
        specs.push(format!("{name}={}", identity.to_public()));
    }
    let so_pin_file = data_dir.join("secrets/so.pin");
    let so_pin = secrecy::SecretString::from(crate::input::text_file(&so_pin_file)?);
    let summary = crate::ceremony::run_init(config_path, 2, &specs, &dir, &so_pin)?;
    tracing::info!(dir = %dir.display(), transcript_sha256 = %summary.get("transcript_sha256").unwrap_or(&serde_json::Value::Null), "development custody initialised: alice, bob, carol, threshold 2");
    Ok(())
}

/// Takes group and other permissions off everything under `dir` (files an earlier version
/// created 0644, say); what is created from now on is owner-only by the process umask.
/// Symbolic links are not followed.
fn owner_only(dir: &Path) -> Result<(), Error> {
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

/// The configuration file: `--config`, or the development layout's (created on first use).
fn config_path(args: &ServeArgs, data_dir: &Path) -> Result<PathBuf, Error> {
    match (&args.config, args.dev) {
        (Some(path), false) => Ok(path.clone()),
        (None, true) => dev::ensure(&DevLayout::new(data_dir.to_path_buf())),
        _ => Err(Error::Usage(
            "kms serve needs --config FILE, or --dev for a development instance".into(),
        )),
    }
}

/// How to reach the token a config names, with the user PIN it points to.
pub(crate) fn hsm_config(config: &Config, config_path: &Path) -> Result<HsmConfig, Error> {
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
pub(crate) fn open_hsm(
    config: &Config,
    config_path: &Path,
    audit_log: &Arc<AuditLog>,
) -> Result<Arc<Pkcs11Hsm>, Error> {
    let hsm_config = hsm_config(config, config_path)?;
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
    let observer_log = Arc::downgrade(audit_log);
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
    Ok(hsm)
}

/// The inventory, policies, grants and authenticator, loaded from the store.
pub(crate) fn open_governance(
    config: &Config,
    config_path: &Path,
    store: &Arc<RocksStore>,
    clock: &Arc<dyn Clock>,
    rng: &Arc<dyn Rng>,
    hsm: &dyn hsm_bridge::Hsm,
) -> Result<Governance, Error> {
    let opened = Approvals::open(
        store.clone(),
        config.approvals.rules(config_path)?,
        clock.now_unix(),
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
        clock.clone(),
        config.inventory.settings(),
    )?);
    let policies = Arc::new(Policies::open(store.clone(), clock.clone())?);
    let grants = Arc::new(Grants::open(
        store.clone(),
        clock.clone(),
        rng.clone(),
        hsm,
        config.grants.settings(),
    )?);
    Ok(Governance {
        inventory,
        policies,
        grants,
        authn: Arc::new(Authenticator::new(clock.clone(), config.jwt.settings())),
        operators: Arc::new(Operators::open(store.clone())?),
        approvals: Arc::new(opened.approvals),
        approval_lock: tokio::sync::Mutex::new(()),
        store: store.clone(),
        clock: clock.clone(),
        rng: rng.clone(),
        min_destroy_waiting_days: config.keys.min_destroy_waiting_days(config_path)?,
        deployment_settings: crate::config::deployment_settings(config),
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
        Audit::danger_disabled()
    } else {
        Audit::new(prepared.audit_log.clone())
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
        gov: prepared.gov.clone(),
        stats: prepared.stats,
        reflection: prepared.reflection,
    };
    let flusher = tokio::spawn(flush_usage_every(prepared.gov.clone(), USAGE_FLUSH));
    let result = bound.serve(services, shutdown).await;
    flusher.abort();
    let gov = prepared.gov.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || gov.inventory.flush_usage()).await {
        tracing::warn!(error = %e, "workload usage could not be saved at stop");
    }
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

/// Who the audit log names for changes the server makes itself at start.
const SEEDER: &str = "kms serve (start-up)";

/// Records a start-up change in the audit log, waiting until it is durable.
fn record_seed(
    log: &AuditLog,
    action: &str,
    target: &str,
    after: Option<String>,
) -> Result<(), Error> {
    record_offline_change(log, SEEDER, action, target, after)
}

/// Records a change made outside the admin plane (at start-up, or by a drill in its
/// recovered copy) as `principal`, waiting until it is durable.
pub(crate) fn record_offline_change(
    log: &AuditLog,
    principal: &str,
    action: &str,
    target: &str,
    after: Option<String>,
) -> Result<(), Error> {
    let mut event = AuditEvent::new(action, "ok");
    event.principal = Some(principal.into());
    event.detail.insert("target".into(), target.to_owned());
    event.after = after;
    log.submit(event)
        .wait_blocking()
        .map(|_| ())
        .map_err(|e| Error::Usage(format!("cannot record a change made by {principal}: {e}")))
}

/// Stores each configured trust bundle whose domain has none yet. Later changes are made on
/// the admin plane; the config never overwrites them.
fn seed_trust_bundles(
    config: &Config,
    config_path: &Path,
    store: &dyn Store,
    clock: &dyn Clock,
    log: &AuditLog,
) -> Result<(), Error> {
    for b in &config.trust_bundle {
        let bad = |problem: String| Error::Config {
            file: config_path.to_path_buf(),
            setting: "trust_bundle",
            problem,
        };
        kms_core::governance::trust::check_trust_domain(&b.trust_domain)
            .map_err(|e| bad(format!("{}: {e}", b.trust_domain)))?;
        if kms_core::governance::trust::get(store, &b.trust_domain)?.is_some() {
            continue;
        }
        let text = |path: &Path| {
            String::from_utf8(crate::error::read(path)?)
                .map_err(|_| bad(format!("{} is not text", path.display())))
        };
        let pem = match &b.bundle {
            Some(path) => {
                let pem = text(path)?;
                server::parse_bundle(&pem).map_err(|e| bad(format!("{}: {e}", path.display())))?;
                pem
            }
            None => String::new(),
        };
        let jwks = match &b.jwks {
            Some(path) => {
                let jwks = text(path)?;
                server::parse_jwks(&jwks).map_err(|e| bad(format!("{}: {e}", path.display())))?;
                Some(jwks)
            }
            None => None,
        };
        if pem.is_empty() && jwks.is_none() {
            return Err(bad(format!(
                "{}: give bundle (PEM), jwks (JWKS), or both",
                b.trust_domain
            )));
        }
        let record = TrustBundleRecord {
            trust_domain: b.trust_domain.clone(),
            pem,
            jwks,
            updated_at: clock.now_unix(),
            updated_by: SEEDER.into(),
        };
        kms_core::governance::trust::put(store, &record)?;
        record_seed(
            log,
            "admin.SetTrustBundle",
            &b.trust_domain,
            object_hash(&record),
        )?;
        tracing::info!(trust_domain = %b.trust_domain, "trust bundle stored from the config");
    }
    Ok(())
}

/// Registers the config's `[[operator]]` entries when the operator inventory is empty (the
/// bootstrap); afterwards the inventory changes only through approvals.
fn seed_operators(
    config: &Config,
    config_path: &Path,
    gov: &Governance,
    log: &AuditLog,
) -> Result<(), Error> {
    if !gov.operators.is_empty() {
        return Ok(());
    }
    let now = gov.clock.now_unix();
    let mut news = Vec::new();
    for o in &config.operator {
        let bad = |problem: String| Error::Config {
            file: config_path.to_path_buf(),
            setting: "operator",
            problem: format!("{}: {problem}", o.name),
        };
        let identity = match (&o.identity, &o.certificate) {
            (Some(id), None) => id
                .parse()
                .map_err(|e: kms_core::Error| bad(e.to_string()))?,
            (None, Some(path)) => {
                crate::operator::identity_of(path).map_err(|e| bad(e.to_string()))?
            }
            _ => return Err(bad("give exactly one of identity and certificate".into())),
        };
        let roles = o
            .roles
            .iter()
            .map(|r| r.parse())
            .collect::<Result<_, kms_core::Error>>()
            .map_err(|e| bad(e.to_string()))?;
        let new = NewOperator {
            identity,
            name: o
                .name
                .parse()
                .map_err(|e: kms_core::Error| bad(e.to_string()))?,
            owner: o.owner.clone(),
            roles,
            expires_at: now.saturating_add(o.expires_in.as_secs()),
        };
        gov.operators
            .check_new(&new, now)
            .map_err(|e| bad(e.to_string()))?;
        news.push(new);
    }
    for new in news {
        let name = new.name.to_string();
        let op = gov.operators.register(new, SEEDER, now)?;
        record_seed(
            log,
            "admin.RegisterOperator",
            &name,
            object_hash(op.as_ref()),
        )?;
        tracing::info!(operator = %name, identity = %op.identity, "operator registered from the config");
    }
    Ok(())
}

/// Says at start, in the log and the audit log, when no gated change can reach its quorum.
fn report_approvals(gov: &Governance, log: &AuditLog) -> Result<(), Error> {
    let Some(warning) = gov.quorum_warning() else {
        tracing::info!(
            required = gov.approvals.rules().required,
            "approvals: M-of-N in force"
        );
        return Ok(());
    };
    tracing::warn!("approvals: {warning}");
    let mut event = AuditEvent::new("approval.quorum_unreachable", "warning");
    event.principal = Some(SEEDER.into());
    event.reason = Some(warning);
    log.submit(event)
        .wait_blocking()
        .map(|_| ())
        .map_err(|e| Error::Usage(format!("cannot record a start-up warning: {e}")))
}

/// The development policy: the development workload may use every key.
pub(crate) const DEV_POLICY_ID: &str = "dev-workload";

fn dev_policy_text() -> String {
    format!(
        "// Written by `kms serve --dev` on first start: the development workload may use every\n\
         // key. Replace it with `kms policy put`, or see examples/policies/.\n\
         permit (\n  principal == Workload::\"{}\",\n  action,\n  resource\n);\n",
        dev::DEV_WORKLOAD_ID
    )
}

/// On a development instance's first start: register the development workload and let it use
/// every key, so that the quick start works; never touched again once they exist.
fn seed_dev_governance(gov: &Governance, log: &AuditLog) -> Result<(), Error> {
    let selector: Selector = dev::DEV_WORKLOAD_ID.parse()?;
    if gov.inventory.get(&selector).is_err() {
        let lifetime = gov.inventory.config().max_lifetime_secs;
        let w = gov.inventory.register(
            NewWorkload {
                selector: selector.clone(),
                owner: "development".into(),
                purpose: "the development workload certificate of kms serve --dev".into(),
                labels: Labels::default(),
                expires_at: gov.clock.now_unix().saturating_add(lifetime),
            },
            SEEDER,
        )?;
        record_seed(
            log,
            "admin.RegisterWorkload",
            &w.selector,
            object_hash(w.as_ref()),
        )?;
    }
    if gov.policies.list().is_empty() {
        let (v, _) = gov
            .policies
            .put(DEV_POLICY_ID, &dev_policy_text(), SEEDER)?;
        record_seed(log, "admin.PutPolicy", DEV_POLICY_ID, object_hash(&v))?;
    }
    Ok(())
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

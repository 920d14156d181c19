//! Start-up seeding: what a node writes into its store before it serves, each change audited
//! as made by `kms serve (start-up)`. The config's operators (bootstrap only) and trust bundles
//! (a domain with none yet), and on a development instance its workload, policy and custody.

use std::path::Path;

use kms_core::audit::{object_hash, AuditLog};
use kms_core::governance::actions::AdminAction;
use kms_core::governance::inventory::{NewWorkload, Selector};
use kms_core::governance::operators::NewOperator;
use kms_core::governance::trust::TrustBundleRecord;
use kms_core::{Clock, Labels, Store};
use server::Governance;

use crate::config::Config;
use crate::dev;
use crate::error::Error;

/// Who the audit log names for changes the server makes itself at start.
const SEEDER: &str = "kms serve (start-up)";

/// The development policy: the development workload may use every key.
pub const DEV_POLICY_ID: &str = "dev-workload";

/// The development custodians: `alice`, `bob` and `carol`, threshold 2, their age identities
/// and share files in `DATA_DIR/custodians/`.
const DEV_CUSTODIANS: [&str; 3] = ["alice", "bob", "carol"];

/// Records a change made outside the admin plane (at start-up, or by a drill in its
/// recovered copy) as `principal`, waiting until it is durable.
pub fn record_offline_change(
    log: &AuditLog,
    principal: &str,
    action: AdminAction,
    target: &str,
    after: Option<String>,
) -> Result<(), Error> {
    log.submit(crate::events::offline_change(
        principal, action, target, after,
    ))
    .wait_blocking()
    .map(|_| ())
    .map_err(|e| Error::Usage(format!("cannot record a change made by {principal}: {e}")))
}

/// Records a start-up change in the audit log, waiting until it is durable.
fn record_seed(
    log: &AuditLog,
    action: AdminAction,
    target: &str,
    after: Option<String>,
) -> Result<(), Error> {
    record_offline_change(log, SEEDER, action, target, after)
}

/// Runs the init ceremony on a development instance's first start, with the development
/// custodians (their identities and share files in `DATA_DIR/custodians/`). Runs before the
/// token is opened as the user: the ceremony's Security Officer step needs a process with no
/// user logged in.
pub fn dev_custody(config_path: &Path, data_dir: &Path) -> Result<(), Error> {
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
            let text = secrecy::SecretString::from(crate::error::text_file(&key)?);
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
    let so_pin = secrecy::SecretString::from(crate::error::text_file(&so_pin_file)?);
    let summary = crate::ceremony::run_init(config_path, 2, &specs, &dir, &so_pin)?;
    tracing::info!(dir = %dir.display(), transcript_sha256 = %summary.get("transcript_sha256").unwrap_or(&serde_json::Value::Null), "development custody initialised: alice, bob, carol, threshold 2");
    Ok(())
}

/// Stores each configured trust bundle whose domain has none yet. Later changes are made on
/// the admin plane; the config never overwrites them.
pub fn trust_bundles(
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
            AdminAction::SetTrustBundle,
            &b.trust_domain,
            object_hash(&record),
        )?;
        tracing::info!(trust_domain = %b.trust_domain, "trust bundle stored from the config");
    }
    Ok(())
}

/// The SPIFFE identity in an operator's certificate (PEM).
pub fn operator_identity_of(path: &Path) -> Result<kms_core::OperatorId, Error> {
    use rustls_pki_types::pem::PemObject;
    let pem = crate::error::read(path)?;
    let cert = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| Error::Usage(format!("{} holds no PEM certificate", path.display())))?;
    server::operator_identity(cert.as_ref())
        .ok_or_else(|| Error::Usage(format!("{} does not parse", path.display())))
}

/// Registers the config's `[[operator]]` entries when the operator inventory is empty (the
/// bootstrap); afterwards the inventory changes only through approvals.
pub fn operators(
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
            (None, Some(path)) => operator_identity_of(path).map_err(|e| bad(e.to_string()))?,
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
            AdminAction::RegisterOperator,
            &name,
            object_hash(op.as_ref()),
        )?;
        tracing::info!(operator = %name, identity = %op.identity, "operator registered from the config");
    }
    Ok(())
}

/// Says at start, in the log and the audit log, when no gated change can reach its quorum.
pub fn report_approvals(gov: &Governance, log: &AuditLog) -> Result<(), Error> {
    let Some(warning) = gov.quorum_warning() else {
        tracing::info!(
            required = gov.approvals.rules().required,
            "approvals: M-of-N in force"
        );
        return Ok(());
    };
    tracing::warn!("approvals: {warning}");
    let event = crate::events::start_up_warning(SEEDER, "approval.quorum_unreachable", warning);
    log.submit(event)
        .wait_blocking()
        .map(|_| ())
        .map_err(|e| Error::Usage(format!("cannot record a start-up warning: {e}")))
}

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
pub fn dev_governance(gov: &Governance, log: &AuditLog) -> Result<(), Error> {
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
            AdminAction::RegisterWorkload,
            &w.selector,
            object_hash(w.as_ref()),
        )?;
    }
    if gov.policies.list().is_empty() {
        let (v, _) = gov
            .policies
            .put(DEV_POLICY_ID, &dev_policy_text(), SEEDER)?;
        record_seed(log, AdminAction::PutPolicy, DEV_POLICY_ID, object_hash(&v))?;
    }
    Ok(())
}

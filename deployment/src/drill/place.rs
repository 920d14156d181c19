//! The drill's isolated place: a temporary directory with a token, PINs and TLS of its own,
//! the recovered copy's provisioning, and the checks made on the copy after it served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::ClientTls;
use hsm_bridge::Pkcs11Hsm;
use kms_core::audit::{AuditLog, VerifyOptions};
use kms_core::drill::{Additions, Facts, Report};
use kms_core::governance::actions::AdminAction;
use kms_core::governance::inventory::{Inventory, NewWorkload};
use kms_core::governance::policy::Policies;
use kms_core::governance::trust::TrustBundleRecord;
use kms_core::{Clock, Labels, RocksStore, SystemClock, SystemRng};
use rcgen::{ExtendedKeyUsagePurpose, SanType};

use super::{drill_policy_text, TargetToken, DRILL_PRINCIPAL, DRILL_WORKLOAD};
use crate::config::Config;
use crate::error::{read, write_private, write_public, Error};

/// The isolated place: a temporary directory (removed on drop) with its config.
pub(super) struct Place {
    pub(super) dir: tempfile::TempDir,
    pub(super) config: PathBuf,
    pub(super) so_pin_file: PathBuf,
    /// The drill workload's TLS material.
    pub(super) tls: ClientTls,
    /// Whether the token is the drill's own SoftHSM2 token (removed with the directory).
    pub(super) own_token: bool,
}

/// Makes the isolated place.
// long: one linear layout of the drill's place: token, TLS material, config.
pub(super) fn isolate(target: Option<&TargetToken>) -> Result<Place, Error> {
    let dir = tempfile::Builder::new()
        .prefix("kms-drill-")
        .tempdir()
        .map_err(|source| Error::File {
            what: "cannot create a temporary directory in",
            path: std::env::temp_dir(),
            source,
        })?;
    let root = dir.path().to_path_buf();
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| Error::File {
            what: "cannot create",
            path: p.to_path_buf(),
            source,
        })
    };
    mkdir(&root.join("secrets"))?;
    mkdir(&root.join("pki"))?;
    let (hsm_section, so_pin_file, own_token) = match target {
        None => {
            let mut tag = [0u8; 4];
            kms_core::Rng::fill(&SystemRng::new(), &mut tag)?;
            let label = format!("kms-drill-{}", hex::encode(tag));
            crate::dev::new_token(&root, &label)?;
            (
                format!(
                    "token_label = {}\npin_file = \"secrets/user.pin\"\nsofthsm2_conf = \"softhsm2.conf\"\n",
                    toml_str(&label)
                ),
                root.join("secrets/so.pin"),
                true,
            )
        }
        Some(TargetToken {
            module,
            label,
            pin_file: pin,
            so_pin_file: so,
        }) => {
            let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            (
                format!(
                    "module = {}\ntoken_label = {}\npin_file = {}\n",
                    toml_str(&abs(module).display().to_string()),
                    toml_str(label),
                    toml_str(&abs(pin).display().to_string())
                ),
                abs(so),
                false,
            )
        }
    };
    // TLS of the drill's own: a server certificate, the drill workload's certificate and an
    // admin-plane CA that issues nothing (no operator can reach the recovered copy).
    let server_ca = crate::dev::ca("kms drill server CA")?;
    let drill_ca = crate::dev::ca("kms drill workload CA")?;
    let admin_ca = crate::dev::ca("kms drill admin CA (issues nothing)")?;
    let (server_cert, server_key) = crate::dev::leaf(
        &server_ca,
        "localhost",
        vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (drill_cert, drill_key) = crate::dev::leaf(
        &drill_ca,
        "provider-exit drill",
        vec![SanType::URI(DRILL_WORKLOAD.try_into()?)],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let pki = |name: &str| root.join("pki").join(name);
    write_public(&pki("server-ca.pem"), server_ca.pem().as_bytes())?;
    write_public(&pki("drill-ca.pem"), drill_ca.pem().as_bytes())?;
    write_public(&pki("admin-ca.pem"), admin_ca.pem().as_bytes())?;
    write_public(&pki("server.pem"), server_cert.as_bytes())?;
    write_private(&pki("server.key"), server_key.as_bytes())?;
    let config = root.join("kms.toml");
    write_public(
        &config,
        format!(
            "# Written by `kms drill provider-exit`: the recovered copy, on loopback only.\n\
             data_dir = \".\"\n\n[hsm]\n{hsm_section}\n\
             [listen]\ndata = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nreflection = \"off\"\nmetrics = \"off\"\n\n\
             [tls]\nserver_cert = \"pki/server.pem\"\nserver_key = \"pki/server.key\"\n\
             admin_client_ca = \"pki/admin-ca.pem\"\n"
        )
        .as_bytes(),
    )?;
    Ok(Place {
        config,
        so_pin_file,
        tls: ClientTls {
            server_ca_pem: server_ca.pem().into_bytes(),
            cert_pem: drill_cert.into_bytes(),
            key_pem: drill_key.into_bytes(),
            server_name: "localhost".into(),
        },
        own_token,
        dir,
    })
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The config, and the number of objects in its token when it is not empty.
pub(super) fn target_is_empty(place: &Place) -> Result<(Config, Option<usize>), Error> {
    let config = Config::load(&place.config)?;
    crate::open::use_softhsm2_conf(&config);
    let hsm = crate::open::hsm_config(&config, &place.config)?;
    let found = hsm_bridge::token_objects(&hsm.module, &hsm.token_label, &hsm.user_pin)?;
    Ok((config, (found > 0).then_some(found)))
}

/// Adds the drill's trust domain, workload and policy to the recovered copy, each audited,
/// and returns the copy's facts with them left out.
pub(super) fn provision(
    place: &Place,
    config: &Config,
    additions: &Additions,
) -> Result<Facts, Error> {
    let store = Arc::new(RocksStore::open(&config.data_dir.join("store"))?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let log = AuditLog::open(store.clone(), clock.clone(), config.audit.settings())?;
    let record = |action: AdminAction, target: &str, after: Option<String>| {
        crate::seed::record_offline_change(&log, DRILL_PRINCIPAL, action, target, after)
    };
    let ca =
        String::from_utf8_lossy(&read(&place.dir.path().join("pki/drill-ca.pem"))?).into_owned();
    let bundle = TrustBundleRecord {
        trust_domain: additions.trust_domain.clone(),
        pem: ca,
        jwks: None,
        updated_at: clock.now_unix(),
        updated_by: DRILL_PRINCIPAL.into(),
    };
    kms_core::governance::trust::put(store.as_ref(), &bundle)?;
    record(
        AdminAction::SetTrustBundle,
        &additions.trust_domain,
        kms_core::audit::object_hash(&bundle),
    )?;
    let inventory = Inventory::open(store.clone(), clock.clone(), config.inventory.settings())?;
    let lifetime = inventory.config().max_lifetime_secs.min(86_400);
    let w = inventory.register(
        NewWorkload {
            selector: additions.workload.parse()?,
            owner: DRILL_PRINCIPAL.into(),
            purpose: "the provider-exit drill's identity, in the recovered copy only".into(),
            labels: Labels::default(),
            expires_at: clock.now_unix().saturating_add(lifetime),
        },
        DRILL_PRINCIPAL,
    )?;
    record(
        AdminAction::RegisterWorkload,
        &w.selector,
        kms_core::audit::object_hash(w.as_ref()),
    )?;
    let policies = Policies::open(store.clone(), clock.clone())?;
    let (v, _) = policies.put(&additions.policy_id, &drill_policy_text(), DRILL_PRINCIPAL)?;
    record(
        AdminAction::PutPolicy,
        &additions.policy_id,
        kms_core::audit::object_hash(&v),
    )?;
    let facts = Facts::of(store.as_ref(), Some(additions))?;
    log.close();
    drop(log);
    Ok(facts)
}

/// `kms audit verify` on the recovered copy, across its `custody.recovered` record.
pub(super) fn audit_chain(place: &Place) -> Result<String, String> {
    let store = RocksStore::open_read_only(&place.dir.path().join("store"))
        .map_err(|e| format!("cannot open the recovered store: {e}"))?;
    let report =
        kms_core::audit::verify_store(&store, None, VerifyOptions::new(None, None, vec![]))
            .map_err(|e| e.to_string())?;
    if !report.ok {
        return Err(format!(
            "broken at record {}: {}",
            report.first_bad_seq.unwrap_or_default(),
            report.problem.unwrap_or_default()
        ));
    }
    let Some(r) = &report.recovered else {
        return Err("the recovered log holds no custody.recovered record".into());
    };
    if report.unanchored > 0 {
        return Err(format!(
            "the last {} records are not covered by a signed checkpoint",
            report.unanchored
        ));
    }
    Ok(format!(
        "{} records and {} checkpoints verified; the chain continues the bundle's record {} at \
         record {} (custody.recovered)",
        report.records, report.checkpoints, r.bundle_head_seq, r.seq
    ))
}

/// The recovered copy reached nothing outside the drill: every path its config names is in
/// the drill's directory (or is the target module), and it listened on loopback only.
pub(super) fn self_contained(place: &Place, config: &Config) -> Result<String, String> {
    let root = place.dir.path();
    let mut outside = Vec::new();
    let mut paths = vec![
        config.data_dir.clone(),
        config.tls.server_cert.clone(),
        config.tls.server_key.clone(),
    ];
    paths.push(config.tls.admin_client_ca.clone());
    paths.extend(config.hsm.softhsm2_conf.clone());
    if place.own_token {
        paths.extend(config.hsm.pin_file.clone());
    }
    for p in paths {
        if !p.starts_with(root) {
            outside.push(p.display().to_string());
        }
    }
    if !outside.is_empty() {
        return Err(format!(
            "the recovered copy's config names paths outside the drill: {}",
            outside.join(", ")
        ));
    }
    if !config.trust_bundle.is_empty() || !config.operator.is_empty() {
        return Err("the recovered copy's config seeds trust bundles or operators".into());
    }
    Ok(format!(
        "inputs: the bundle, the shares and identities given; everything else (token, PINs, TLS, \
         the drill identity) was made by the drill under {}; the server listened on 127.0.0.1 \
         only",
        root.display()
    ))
}

/// Signs the report with the drill token's audit signing key.
pub(super) fn sign(report: &mut Report, place: &Place) -> Result<(), Error> {
    let config = Config::load(&place.config)?;
    let hsm = Pkcs11Hsm::open(&crate::open::hsm_config(&config, &place.config)?)?;
    report.sign(&hsm)?;
    Ok(())
}

//! The host side of the custody ceremonies (protocol: `docs/CUSTODY.md`), run on the data
//! directory with the server stopped: the init ceremony, share verification and custody
//! status. The ceremony's states are the `recovery` crate's and `kms_core::custody`'s; this
//! module opens the deployment, writes what the ceremony made, and audits it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hsm_bridge::Pkcs11Hsm;
use kms_core::audit::AuditLog;

use crate::events::{ceremony_done, ceremony_failed, Ceremony};
use kms_core::custody;
use kms_core::RocksStore;
use recovery::ceremony::{Sealed, ShareClaim};
use recovery::{Custodian, TokenInfo};
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::error::Error;
use crate::open::{ClockKind, Deployment};

/// The environment variable read for the Security Officer PIN unless told otherwise.
const SO_PIN_ENV: &str = "KMS_SO_PIN";

/// The Security Officer PIN, never a flag: from `file`, the variable `var` names (default
/// `KMS_SO_PIN`), or, for a development deployment, its `secrets/so.pin`. `needed_for` says
/// in the error why the PIN is needed.
pub fn so_pin(
    file: Option<&Path>,
    var: Option<&str>,
    config_path: &Path,
    needed_for: &str,
) -> Result<SecretString, Error> {
    let from_file = |path: &Path| -> Result<SecretString, Error> {
        let text = SecretString::from(crate::error::text_file(path)?);
        Ok(SecretString::from(
            secrecy::ExposeSecret::expose_secret(&text)
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ))
    };
    if let Some(path) = file {
        return from_file(path);
    }
    if let Ok(pin) = std::env::var(var.unwrap_or(SO_PIN_ENV)) {
        return Ok(SecretString::from(pin));
    }
    if let Some(var) = var {
        return Err(Error::Usage(format!(
            "the Security Officer PIN variable {var} is not set"
        )));
    }
    let dev_pin = config_path
        .parent()
        .map(|dir| dir.join("secrets/so.pin"))
        .filter(|p| p.is_file());
    match dev_pin {
        Some(path) => from_file(&path),
        None => Err(Error::Usage(format!(
            "{needed_for}: give --so-pin-file FILE or set {SO_PIN_ENV}"
        ))),
    }
}

/// The init ceremony on the deployment `config_path` names, server stopped; returns the
/// summary it prints.
///
/// Order (docs/CUSTODY.md): input and deployment checks; a fresh escrow key, imported by the
/// Security Officer before this process logs in as the user (the one step that cannot be
/// undone); then the token is opened as the user and everything else is made in memory; the
/// share files and transcript are written (removable); one synced store write commits.
pub fn run_init(
    config_path: &Path,
    threshold: usize,
    custodians: &[String],
    out_dir: &Path,
    so_pin: &SecretString,
) -> Result<Value, Error> {
    let custodians = custodians
        .iter()
        .map(|c| Custodian::parse(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::from)?;
    recovery::ceremony::Checked::new(threshold, custodians.clone()).map_err(Error::from)?;
    let config = crate::config::Config::load(config_path)?;
    crate::open::use_softhsm2_conf(&config);
    if let Some(ceremony) = recorded_ceremony(&config.data_dir)? {
        return Err(kms_core::Error::CustodyInitialised { ceremony }.into());
    }
    prepare_out_dir(out_dir, &custodians)?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let escrow_key = custody::NewEscrowKey::generate(&rng)?;
    let module = match &config.hsm.module {
        Some(m) => m.clone(),
        None => hsm_bridge::find_softhsm2_module()?,
    };
    escrow_key
        .import(&module, &config.hsm.token_label, so_pin)
        .map_err(|e| match e {
            kms_core::Error::Hsm(hsm_bridge::Error::Login {
                rv: hsm_bridge::RvError::UserAnotherAlreadyLoggedIn,
                ..
            }) => Error::Usage(
                "the token has a user logged in: stop the server before running a ceremony".into(),
            ),
            other => other.into(),
        })?;
    let pin = escrow_key.pin().clone();
    tracing::info!(escrow_key_id = %pin.id, check_value = %pin.check_value, "trusted escrow key imported by the security officer");
    let opened = Deployment::open_offline(config_path)?;
    let result = init(&opened, threshold, custodians, out_dir, escrow_key);
    if let Err(e) = &result {
        tracing::error!(escrow_key_id = %pin.id, "init failed after the escrow key import; the token keeps an unpinned escrow key, which `kms hsm inspect` flags and the KMS never wraps under");
        // The failure is on record, with the key it left behind.
        let event = ceremony_failed(Ceremony::Init, e)
            .with("escrow_key_id", pin.id.to_hex())
            .with("escrow_key_check_value", pin.check_value.to_hex());
        if opened.audit_log.submit(event).wait_blocking().is_err() {
            tracing::error!("the failed init could not be audited");
        }
    }
    opened.audit_log.close();
    result
}

/// What `C_GetTokenInfo` says of the token, as ceremony transcripts record it.
pub fn token_info(hsm: &Pkcs11Hsm) -> Result<TokenInfo, Error> {
    let t = hsm.token_info()?;
    Ok(TokenInfo {
        label: t.label,
        manufacturer: t.manufacturer,
        model: t.model,
        serial: t.serial,
    })
}

/// The ceremony on record in the store under `data_dir`, if any (read-only; no store yet is
/// none).
pub fn recorded_ceremony(data_dir: &Path) -> Result<Option<String>, Error> {
    let path = data_dir.join("store");
    if !path.exists() {
        return Ok(None);
    }
    let store = RocksStore::open_read_only(&path).map_err(|e| {
        Error::Usage(format!(
            "cannot open the store at {} ({e}); ceremonies run with the server stopped",
            path.display()
        ))
    })?;
    Ok(custody::load(&store)?.map(|c| c.record.ceremony_id.to_string()))
}

/// The in-memory steps, the files and the commit, on an open deployment.
// long: the ceremony's steps up to one commit point, then its audit record.
fn init(
    opened: &Deployment,
    threshold: usize,
    custodians: Vec<Custodian>,
    out_dir: &Path,
    escrow_key: custody::NewEscrowKey,
) -> Result<Value, Error> {
    let store = opened.store.as_ref();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let token = token_info(&opened.hsm)?;
    let plan = custody::InitPlan {
        threshold,
        custodians,
        audit_signer: opened.audit_log.signer().unwrap_or_default().to_owned(),
        time: opened.clock.now_unix(),
    };

    let prepared =
        custody::prepare_init(store, opened.hsm.as_ref(), token, &rng, plan, escrow_key)?;
    let sealed = prepared.sealed();
    let escrowed = prepared.escrowed();
    let files = write_ceremony_files(out_dir, sealed)?;
    let pin = prepared.escrow_pin().clone();
    // The commit point: before it, only the files above (removed here) and the imported
    // escrow key, whose value was never stored, exist.
    let sealed = match custody::commit_init(store, prepared) {
        Ok(sealed) => sealed,
        Err(e) => {
            remove_all(&files);
            return Err(e.into());
        }
    };
    let sha = hex::encode(sealed.transcript_sha256);
    let names = custodian_names(&sealed);
    let event = ceremony_done(Ceremony::Init)
        .with("ceremony_id", sealed.record.ceremony_id)
        .with("transcript_sha256", &sha)
        .with("threshold", threshold)
        .with("custodians", names.join(","))
        .with("escrowed", escrowed)
        .with("escrow_key_id", pin.id.to_hex())
        .with("escrow_key_check_value", pin.check_value.to_hex());
    opened
        .audit_log
        .submit(event)
        .wait_blocking()
        .map_err(|_| {
            Error::Usage("custody was initialised but its audit record could not be written".into())
        })?;
    tracing::info!(ceremony = %sealed.record.ceremony_id, threshold, custodians = names.len(), escrowed, "custody initialised");
    Ok(json!({
        "ceremony_id": sealed.record.ceremony_id.to_string(),
        "threshold": threshold,
        "custodians": names,
        "transcript_sha256": sha,
        "out_dir": out_dir.display().to_string(),
        "escrowed": escrowed,
        "escrow_key": {
            "label": pin.label,
            "id": pin.id.to_hex(),
            "check_value": pin.check_value.to_hex(),
        },
    }))
}

/// Makes `dir` if needed; refuses if it holds a share or transcript already; removes
/// temporary files an interrupted init left.
pub fn prepare_out_dir(dir: &Path, custodians: &[Custodian]) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::File {
        what: "cannot create",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut outputs: Vec<PathBuf> = custodians
        .iter()
        .map(|c| dir.join(format!("{}.share.age", c.name)))
        .collect();
    outputs.push(dir.join("transcript.json"));
    for path in &outputs {
        if path.exists() {
            return Err(Error::Usage(format!(
                "{} exists: a ceremony writes into an empty place (move the old files away)",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(tmp(path));
    }
    Ok(())
}

fn tmp(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes each file under a temporary name, syncs it, renames it, then syncs the directory.
/// On failure nothing of them is left.
fn write_all(files: &[(PathBuf, Vec<u8>)]) -> Result<(), Error> {
    let result = files.iter().try_for_each(|(path, bytes)| {
        let t = tmp(path);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&t)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&t, path)
        };
        write().map_err(|source| Error::File {
            what: "cannot write",
            path: path.clone(),
            source,
        })
    });
    if result.is_err() {
        for (path, _) in files {
            let _ = std::fs::remove_file(tmp(path));
            let _ = std::fs::remove_file(path);
        }
        return result;
    }
    if let Some(dir) = files.first().and_then(|(p, _)| p.parent()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::File {
                what: "cannot sync",
                path: dir.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

/// Writes what a ceremony made into `out_dir`: `NAME.share.age` for each custodian and
/// `transcript.json`, all or none. Returns their paths.
pub fn write_ceremony_files(out_dir: &Path, sealed: &Sealed) -> Result<Vec<PathBuf>, Error> {
    let mut files = Vec::with_capacity(sealed.share_files.len().saturating_add(1));
    for (name, bytes) in &sealed.share_files {
        files.push((out_dir.join(format!("{name}.share.age")), bytes.clone()));
    }
    files.push((
        out_dir.join("transcript.json"),
        sealed.transcript.canonical().map_err(Error::from)?,
    ));
    write_all(&files)?;
    Ok(files.into_iter().map(|(path, _)| path).collect())
}

/// Removes a ceremony's files again (its commit failed).
pub fn remove_all(paths: &[PathBuf]) {
    for path in paths {
        let _ = std::fs::remove_file(path);
    }
}

/// The custodians of a ceremony's shares, in custodian order.
pub fn custodian_names(sealed: &Sealed) -> Vec<String> {
    sealed
        .share_files
        .iter()
        .map(|(n, _)| n.to_string())
        .collect()
}

/// What a share verification found.
#[derive(Debug)]
#[non_exhaustive]
pub enum ShareVerification {
    /// Checked against the transcript on record and recorded, with the custodian's name and
    /// share index and the transcript's SHA-256 (hex).
    Recorded {
        /// The custodian.
        custodian: String,
        /// Their share index.
        index: u8,
        /// The transcript's SHA-256, hex.
        transcript_sha256: String,
    },
    /// A running server holds the store: it must record the verification (admin plane).
    ServerRunning,
}

/// Checks a custodian's share claim against the ceremony on record and records them as
/// verified, in the store under the config's data directory (server stopped).
pub fn verify_share(config_path: &Path, claim: &ShareClaim) -> Result<ShareVerification, Error> {
    let config = crate::config::Config::load(config_path)?;
    let store_path = config.data_dir.join("store");
    let store = match RocksStore::open(&store_path) {
        Ok(store) => Arc::new(store),
        // The server holds the store: it records the verification.
        Err(e) if held_by_server(&e) => return Ok(ShareVerification::ServerRunning),
        Err(e) => return Err(e.into()),
    };
    let custody = custody::load(store.as_ref())?.ok_or(kms_core::Error::CustodyMissing)?;
    let clock = ClockKind::of(config_path, &config).clock(&config.data_dir);
    let (name, index) = custody::verify_claim(store.as_ref(), claim, clock.now_unix())?;
    let audit_log = AuditLog::open(store.clone(), clock, config.audit.settings())?;
    let event = ceremony_done(Ceremony::ShareVerified)
        .with("custodian", &name)
        .with("index", index)
        .with("ceremony_id", custody.record.ceremony_id);
    let written = audit_log.submit(event).wait_blocking();
    audit_log.close();
    written
        .map_err(|_| Error::Usage("the verification's audit record could not be written".into()))?;
    Ok(ShareVerification::Recorded {
        custodian: name,
        index,
        transcript_sha256: hex::encode(custody.transcript.sha256().map_err(Error::from)?),
    })
}

/// Whether the store failed to open because another process (a running server) holds its
/// lock: RocksDB says so only in the error's source.
fn held_by_server(e: &kms_core::Error) -> bool {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if c.to_string().contains("lock") {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Custody as `kms ceremony status` shows it: threshold, custodians and who has verified,
/// epoch, transcript hash, and the key versions not yet escrowed.
pub fn status(config_path: &Path) -> Result<Value, Error> {
    let config = crate::config::Config::load(config_path)?;
    let store = RocksStore::open_read_only(&config.data_dir.join("store"))?;
    let unescrowed: Vec<Value> = custody::unescrowed(&store)?
        .into_iter()
        .map(|(id, version, protection)| {
            json!({"key_id": id.to_string(), "version": version.get(), "protection": protection})
        })
        .collect();
    let value = match custody::load(&store)? {
        None => json!({
            "initialised": false,
            "threshold": null,
            "custodians": [],
            "epoch": null,
            "transcript_sha256": null,
            "complete": false,
            "unescrowed_versions": unescrowed,
        }),
        Some(c) => {
            let custodians: Vec<Value> = c
                .transcript
                .custodians
                .iter()
                .map(|t| json!({"name": t.name, "index": t.index, "verified": c.verified.contains_key(&t.name)}))
                .collect();
            let complete = c
                .transcript
                .custodians
                .iter()
                .all(|t| c.verified.contains_key(&t.name));
            json!({
                "initialised": true,
                "ceremony_id": c.record.ceremony_id.to_string(),
                "threshold": c.transcript.threshold,
                "custodians": custodians,
                "epoch": c.record.epoch.get(),
                "transcript_sha256": hex::encode(c.transcript.sha256().map_err(Error::from)?),
                "complete": complete,
                "unescrowed_versions": unescrowed,
            })
        }
    };
    Ok(value)
}

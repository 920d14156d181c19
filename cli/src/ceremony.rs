//! `kms ceremony`: the custody init ceremony, share verification and custody status, run on
//! the data directory with the server stopped (protocol: `docs/CUSTODY.md`). The ceremony's
//! states are the `recovery` crate's; this module reads files and flags, opens the store and
//! the token, and writes what the ceremony made.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use hsm_bridge::Pkcs11Hsm;
use kms_core::audit::{AuditEvent, AuditLog};
use kms_core::custody;
use kms_core::{RocksStore, SystemClock};
use recovery::ceremony::ShareClaim;
use recovery::{parse_identity, Custodian, ShareEnvelope, TokenInfo};
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::dev::DevLayout;
use crate::error::read;
use crate::error::Error;
use crate::input::now_unix;
use crate::output::emit;

/// The custody ceremonies.
#[derive(Subcommand, Debug)]
pub(crate) enum CeremonyCommand {
    /// Create the recovery authority: import the trusted escrow key as the token's Security
    /// Officer, split a fresh recovery secret among custodians (one age share file each) and
    /// escrow every existing software key version. Server stopped.
    Init(InitArgs),
    /// Check a custodian's share against the ceremony transcript and record them as verified.
    #[command(name = "verify-share")]
    VerifyShare(VerifyArgs),
    /// Show the threshold, the custodians and who has verified, and unescrowed key versions.
    Status(ConfigArg),
    /// Restore a deployment from a backup bundle and k custodians' shares onto a new host and
    /// a new, empty token (docs/RECOVERY.md): every key, policy, registration and operator,
    /// with the audit chain continuing from the bundle's head.
    Recover(crate::recover::RecoverArgs),
    /// Ask for approval of a reshare (server running): the new threshold and custodians.
    /// Once approved, stop the server and run `kms ceremony reshare --approval ID`.
    #[command(name = "authorize-reshare")]
    AuthorizeReshare(crate::reshare::AuthorizeArgs),
    /// Replace the recovery authority (server stopped): k current shares rebuild the secret,
    /// a new secret is made and split to the new custodians at the next epoch, and every seal
    /// is made again; current shares stop working (docs/RECOVERY.md, "Reshare").
    Reshare(crate::reshare::ReshareArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ConfigArg {
    /// The deployment's config file (default: the development config under --data-dir).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct InitArgs {
    /// How many custodians together can recover (2 <= K <= custodians).
    #[arg(long, value_name = "K")]
    threshold: usize,
    /// A custodian and their own age X25519 recipient (`age-keygen -y KEYFILE`). Repeat.
    #[arg(long = "custodian", value_name = "NAME=AGE_RECIPIENT", required = true)]
    custodians: Vec<String>,
    /// Where to write NAME.share.age for each custodian and transcript.json.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// A file holding the token's Security Officer PIN (never a flag).
    #[arg(long, value_name = "FILE", conflicts_with = "so_pin_env")]
    so_pin_file: Option<PathBuf>,
    /// The environment variable holding the Security Officer PIN (default: KMS_SO_PIN;
    /// a development deployment uses its own secrets/so.pin).
    #[arg(long, value_name = "VAR")]
    so_pin_env: Option<String>,
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    /// The custodian's share file (age), opened with --identity.
    #[arg(long, requires = "identity", conflicts_with = "decrypted")]
    share: Option<PathBuf>,
    /// The custodian's age identity file.
    #[arg(long, requires = "share")]
    identity: Option<PathBuf>,
    /// A share the custodian decrypted with `age -d` themselves.
    #[arg(long, required_unless_present = "share")]
    decrypted: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArg,
}

/// Runs a ceremony command (blocking; before any async runtime exists).
pub(crate) fn run(
    cmd: CeremonyCommand,
    conn: &crate::connect::ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let data_dir = conn.data_dir.as_path();
    match cmd {
        CeremonyCommand::Init(args) => {
            let config_path = config_path(&args.config, data_dir)?;
            let so_pin = so_pin(&args, &config_path)?;
            let summary = run_init(
                &config_path,
                args.threshold,
                &args.custodians,
                &args.out_dir,
                &so_pin,
            )?;
            emit(as_json, &summary)
        }
        CeremonyCommand::VerifyShare(args) => verify(&args, conn, as_json),
        CeremonyCommand::Status(args) => status(&args, data_dir, as_json),
        CeremonyCommand::Recover(args) => crate::recover::run(&args, data_dir, as_json),
        CeremonyCommand::AuthorizeReshare(args) => crate::reshare::authorize(&args, conn, as_json),
        CeremonyCommand::Reshare(args) => crate::reshare::run(&args, data_dir, as_json),
    }
}

/// The environment variable read for the Security Officer PIN unless told otherwise.
const SO_PIN_ENV: &str = "KMS_SO_PIN";

/// The Security Officer PIN: from `--so-pin-file`, the variable `--so-pin-env` names,
/// `KMS_SO_PIN`, or, for a development deployment, its `secrets/so.pin`. Never a flag.
fn so_pin(args: &InitArgs, config_path: &Path) -> Result<SecretString, Error> {
    let from_file = |path: &Path| -> Result<SecretString, Error> {
        let text = SecretString::from(crate::input::text_file(path)?);
        Ok(SecretString::from(
            secrecy::ExposeSecret::expose_secret(&text)
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ))
    };
    if let Some(path) = &args.so_pin_file {
        return from_file(path);
    }
    let var = args.so_pin_env.as_deref().unwrap_or(SO_PIN_ENV);
    if let Ok(pin) = std::env::var(var) {
        return Ok(SecretString::from(pin));
    }
    if args.so_pin_env.is_some() {
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
            "init imports the trusted escrow key as the token's Security Officer: give \
             --so-pin-file FILE or set {SO_PIN_ENV}"
        ))),
    }
}

fn config_path(arg: &ConfigArg, data_dir: &Path) -> Result<PathBuf, Error> {
    config_path_or_dev(arg.config.as_ref(), data_dir)
}

/// `--config`, or the development config under `data_dir` when it exists.
pub(crate) fn config_path_or_dev(
    config: Option<&PathBuf>,
    data_dir: &Path,
) -> Result<PathBuf, Error> {
    if let Some(path) = config {
        return Ok(path.clone());
    }
    let dev = DevLayout::new(data_dir.to_path_buf()).config();
    if dev.exists() {
        return Ok(dev);
    }
    Err(Error::Usage(format!(
        "no config: pass --config FILE, or --data-dir of a development instance ({} not found)",
        dev.display()
    )))
}

/// What a ceremony needs open: the store, the audit log and the token.
pub(crate) struct Offline {
    pub(crate) store: Arc<RocksStore>,
    pub(crate) audit_log: Arc<AuditLog>,
    pub(crate) hsm: Arc<Pkcs11Hsm>,
}

/// The init ceremony on the deployment `config_path` names, server stopped; returns the
/// summary it prints.
///
/// Order (docs/CUSTODY.md): input and deployment checks; a fresh escrow key, imported by the
/// Security Officer before this process logs in as the user (the one step that cannot be
/// undone); then the token is opened as the user and everything else is made in memory; the
/// share files and transcript are written (removable); one synced store write commits.
pub(crate) fn run_init(
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
    if let Some(conf) = &config.hsm.softhsm2_conf {
        hsm_bridge::softhsm::use_conf(conf);
    }
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
    let opened = crate::serve::open_offline(config_path)?;
    let result = init(&opened, threshold, custodians, out_dir, escrow_key);
    if let Err(e) = &result {
        tracing::error!(escrow_key_id = %pin.id, "init failed after the escrow key import; the token keeps an unpinned escrow key, which `kms hsm inspect` flags and the KMS never wraps under");
        // The failure is on record, with the key it left behind.
        let mut event = AuditEvent::new("ceremony.init", "error");
        event.reason = Some(e.to_string());
        event.detail.insert("escrow_key_id".into(), pin.id.to_hex());
        event
            .detail
            .insert("escrow_key_check_value".into(), pin.check_value.to_hex());
        if opened.audit_log.submit(event).wait_blocking().is_err() {
            tracing::error!("the failed init could not be audited");
        }
    }
    opened.audit_log.close();
    result
}

/// What `C_GetTokenInfo` says of the token, as ceremony transcripts record it.
pub(crate) fn token_info(hsm: &Pkcs11Hsm) -> Result<TokenInfo, Error> {
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
pub(crate) fn recorded_ceremony(data_dir: &Path) -> Result<Option<String>, Error> {
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
fn init(
    opened: &Offline,
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
        time: now_unix(),
    };

    let prepared =
        custody::prepare_init(store, opened.hsm.as_ref(), token, &rng, plan, escrow_key)?;
    let sealed = prepared.sealed();
    let escrowed = prepared.escrowed();
    let mut files = Vec::new();
    for (name, bytes) in &sealed.share_files {
        files.push((out_dir.join(format!("{name}.share.age")), bytes.clone()));
    }
    files.push((
        out_dir.join("transcript.json"),
        sealed.transcript.canonical().map_err(Error::from)?,
    ));
    write_all(&files)?;
    let pin = prepared.escrow_pin().clone();
    // The commit point: before it, only the files above (removed here) and the imported
    // escrow key, whose value was never stored, exist.
    let sealed = match custody::commit_init(store, prepared) {
        Ok(sealed) => sealed,
        Err(e) => {
            for (path, _) in &files {
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
    };
    let sha = hex::encode(sealed.transcript_sha256);
    let names: Vec<String> = sealed
        .share_files
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    let mut event = AuditEvent::new("ceremony.init", "ok");
    event
        .detail
        .insert("ceremony_id".into(), sealed.record.ceremony_id.to_string());
    event.detail.insert("transcript_sha256".into(), sha.clone());
    event
        .detail
        .insert("threshold".into(), threshold.to_string());
    event.detail.insert("custodians".into(), names.join(","));
    event.detail.insert("escrowed".into(), escrowed.to_string());
    event.detail.insert("escrow_key_id".into(), pin.id.to_hex());
    event
        .detail
        .insert("escrow_key_check_value".into(), pin.check_value.to_hex());
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
pub(crate) fn prepare_out_dir(dir: &Path, custodians: &[Custodian]) -> Result<(), Error> {
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
pub(crate) fn write_all(files: &[(PathBuf, Vec<u8>)]) -> Result<(), Error> {
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

fn verify(
    args: &VerifyArgs,
    conn: &crate::connect::ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let envelope = match (&args.share, &args.identity, &args.decrypted) {
        (Some(share), Some(identity), None) => {
            let text = SecretString::from(crate::input::text_file(identity)?);
            let id = parse_identity(&text, identity).map_err(Error::from)?;
            ShareEnvelope::open(&read(share)?, &id, share).map_err(Error::from)?
        }
        (None, None, Some(file)) => {
            let mut bytes = read(file)?;
            let parsed = ShareEnvelope::parse(&bytes, file);
            zeroize::Zeroize::zeroize(&mut bytes);
            parsed.map_err(Error::from)?
        }
        _ => {
            return Err(Error::Usage(
                "give --share FILE --identity FILE, or --decrypted FILE".into(),
            ))
        }
    };
    let claim = ShareClaim::of(&envelope);
    drop(envelope);
    let config_path = config_path(&args.config, &conn.data_dir)?;
    let config = crate::config::Config::load(&config_path)?;
    let store_path = config.data_dir.join("store");
    let store = match RocksStore::open(&store_path) {
        Ok(store) => Arc::new(store),
        // The server holds the store: it records the verification.
        Err(e) if held_by_server(&e) => {
            tracing::info!("the store is in use by a running server; recording the verification through the admin plane");
            return verify_online(&claim, conn, as_json);
        }
        Err(e) => return Err(e.into()),
    };
    let custody = custody::load(store.as_ref())?.ok_or(kms_core::Error::CustodyMissing)?;
    let (name, index) = custody::verify_claim(store.as_ref(), &claim, now_unix())?;
    let audit_log = AuditLog::open(
        store.clone(),
        Arc::new(SystemClock),
        config.audit.settings(),
    )?;
    let mut event = AuditEvent::new("ceremony.share_verified", "ok");
    event.detail.insert("custodian".into(), name.clone());
    event.detail.insert("index".into(), index.to_string());
    event
        .detail
        .insert("ceremony_id".into(), custody.record.ceremony_id.to_string());
    let written = audit_log.submit(event).wait_blocking();
    audit_log.close();
    written
        .map_err(|_| Error::Usage("the verification's audit record could not be written".into()))?;
    emit(
        as_json,
        &json!({
            "custodian": name,
            "index": index,
            "verified": true,
            "transcript_sha256": hex::encode(custody.transcript.sha256().map_err(Error::from)?),
        }),
    )
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

/// Sends a checked claim to the running server (admin plane), which checks it against the
/// ceremony on record, records the custodian as verified and audits it. No share is sent.
fn verify_online(
    claim: &ShareClaim,
    conn: &crate::connect::ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let request = api::v1::ShareVerificationRequest {
        ceremony_id: claim.ceremony_id.to_string(),
        epoch: claim.epoch.get(),
        custodian: claim.custodian.clone(),
        index: u32::from(claim.index),
        transcript_sha256: hex::encode(claim.transcript_sha256),
        commitment: hex::encode(claim.commitment),
    };
    let answer = conn.admin_call(|mut client| async move {
        Ok(client
            .record_share_verification(request)
            .await?
            .into_inner())
    })?;
    emit(
        as_json,
        &json!({
            "custodian": answer.custodian,
            "index": answer.index,
            "verified": answer.verified,
            "transcript_sha256": hex::encode(claim.transcript_sha256),
        }),
    )
}

fn status(args: &ConfigArg, data_dir: &Path, as_json: bool) -> Result<(), Error> {
    let config = crate::config::Config::load(&config_path(args, data_dir)?)?;
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
    emit(as_json, &value)
}

//! `kms ceremony`: the custody init ceremony, share verification and custody status, run on
//! the data directory with the server stopped (protocol: `docs/CUSTODY.md`). The ceremony's
//! states are the `recovery` crate's; this module reads files and flags, opens the store and
//! the token, and writes what the ceremony made.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use hsm_bridge::Pkcs11Hsm;
use kms_core::audit::{AuditEvent, AuditLog};
use kms_core::custody::{self, Verified};
use kms_core::{RocksStore, SystemClock};
use recovery::ceremony::{check_share, Checked, EscrowInput, HostFacts};
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
    /// Create the recovery authority: split a fresh recovery secret among custodians (one age
    /// share file each) and escrow every existing software key version. Server stopped.
    Init(InitArgs),
    /// Check a custodian's share against the ceremony transcript and record them as verified.
    #[command(name = "verify-share")]
    VerifyShare(VerifyArgs),
    /// Show the threshold, the custodians and who has verified, and unescrowed key versions.
    Status(ConfigArg),
}

#[derive(Args, Debug)]
pub(crate) struct ConfigArg {
    /// The deployment's config file (default: the development config under --data-dir).
    #[arg(long)]
    config: Option<PathBuf>,
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
pub(crate) fn run(cmd: CeremonyCommand, data_dir: &Path, as_json: bool) -> Result<(), Error> {
    match cmd {
        CeremonyCommand::Init(args) => {
            let config_path = config_path(&args.config, data_dir)?;
            let opened = crate::serve::open_offline(&config_path)?;
            let result = init(&opened, args.threshold, &args.custodians, &args.out_dir);
            opened.audit_log.close();
            emit(as_json, &result?)
        }
        CeremonyCommand::VerifyShare(args) => verify(&args, data_dir, as_json),
        CeremonyCommand::Status(args) => status(&args, data_dir, as_json),
    }
}

fn config_path(arg: &ConfigArg, data_dir: &Path) -> Result<PathBuf, Error> {
    if let Some(path) = &arg.config {
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

/// The init ceremony on an open deployment; returns the summary it prints.
pub(crate) fn init(
    opened: &Offline,
    threshold: usize,
    custodians: &[String],
    out_dir: &Path,
) -> Result<Value, Error> {
    let custodians = custodians
        .iter()
        .map(|c| Custodian::parse(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::from)?;
    let checked = Checked::new(threshold, custodians.clone()).map_err(Error::from)?;
    let store = opened.store.as_ref();
    if let Some(existing) = custody::load(store)? {
        return Err(kms_core::Error::CustodyInitialised {
            ceremony: existing.record.ceremony_id.to_string(),
        }
        .into());
    }
    prepare_out_dir(out_dir, &custodians)?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let derived = checked.derive(&rng).map_err(Error::from)?;
    let items = custody::escrowable(store, opened.hsm.as_ref())?;
    let inputs: Vec<EscrowInput<'_>> = items
        .iter()
        .map(|i| EscrowInput {
            purpose: i.purpose,
            aad: i.aad.clone(),
            material: i.material(),
        })
        .collect();
    let token = opened.hsm.token_info()?;
    let facts = HostFacts {
        token: TokenInfo {
            label: token.label,
            manufacturer: token.manufacturer,
            model: token.model,
            serial: token.serial,
        },
        audit_signer: opened.audit_log.signer().unwrap_or_default().to_owned(),
        escrow_key: None,
        time: now_unix(),
    };
    let sealed = derived.seal(&rng, facts, &inputs).map_err(Error::from)?;
    drop(inputs);
    let escrowed = items.len();
    let mut files = Vec::new();
    for (name, bytes) in &sealed.share_files {
        files.push((out_dir.join(format!("{name}.share.age")), bytes.clone()));
    }
    files.push((
        out_dir.join("transcript.json"),
        sealed.transcript.canonical().map_err(Error::from)?,
    ));
    write_all(&files)?;
    // The commit point: before it, only the files written above exist (removed on failure).
    if let Err(e) = custody::commit_init(store, &sealed, items) {
        for (path, _) in &files {
            let _ = std::fs::remove_file(path);
        }
        return Err(e.into());
    }
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
    }))
}

/// Makes `dir` if needed; refuses if it holds a share or transcript already; removes
/// temporary files an interrupted init left.
fn prepare_out_dir(dir: &Path, custodians: &[Custodian]) -> Result<(), Error> {
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
                "{} exists: init writes into an empty place (move the old files away)",
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

fn verify(args: &VerifyArgs, data_dir: &Path, as_json: bool) -> Result<(), Error> {
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
    let config_path = config_path(&args.config, data_dir)?;
    let config = crate::config::Config::load(&config_path)?;
    let store = Arc::new(open_store(&config.data_dir)?);
    let custody = custody::load(store.as_ref())?.ok_or(kms_core::Error::CustodyMissing)?;
    let entry = check_share(&custody.transcript, &envelope).map_err(Error::from)?;
    let at = now_unix();
    custody::record_verified(
        store.as_ref(),
        &entry.name,
        &Verified {
            index: entry.index,
            at,
        },
    )?;
    let audit_log = AuditLog::open(
        store.clone(),
        Arc::new(SystemClock),
        config.audit.settings(),
    )?;
    let mut event = AuditEvent::new("ceremony.share_verified", "ok");
    event.detail.insert("custodian".into(), entry.name.clone());
    event.detail.insert("index".into(), entry.index.to_string());
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
            "custodian": entry.name,
            "index": entry.index,
            "verified": true,
            "transcript_sha256": hex::encode(custody.transcript.sha256().map_err(Error::from)?),
        }),
    )
}

fn open_store(data_dir: &Path) -> Result<RocksStore, Error> {
    let path = data_dir.join("store");
    RocksStore::open(&path).map_err(|e| {
        Error::Usage(format!(
            "cannot open the store at {} ({e}); ceremonies run with the server stopped",
            path.display()
        ))
    })
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

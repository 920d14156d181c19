//! The quorum recovery ceremony on a fresh host (docs/RECOVERY.md). The states are
//! `kms_core::restore`'s; this module reads the files, opens shares with the custodians' age
//! identities, checks and prepares the target (a new data directory and a new, empty token),
//! imports the escrow key as the Security Officer, and moves the restored store into place
//! only once everything in it is written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use hsm_bridge::Pkcs11Hsm;
use kms_core::audit::AuditLog;
use kms_core::restore::{self, Facts};
use kms_core::{Clock, RocksStore, SystemClock};
use recovery::{parse_identity, ShareEnvelope};
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::config::Config;
use crate::dev::DevLayout;
use crate::error::{read, Error};

/// The k custodians' shares, as recovery and reshare take them.
#[derive(Debug, Default, Clone)]
pub struct ShareFiles {
    /// Custodians' share files (age); each opened with whichever identity opens it.
    pub shares: Vec<PathBuf>,
    /// Custodians' age identity files.
    pub identities: Vec<PathBuf>,
    /// Shares their custodians decrypted beforehand (`age -d -i KEY NAME.share.age`).
    pub decrypted: Vec<PathBuf>,
}

#[expect(
    clippy::disallowed_methods,
    reason = "the ceremony reports the time of each phase"
)]
fn now() -> Instant {
    Instant::now()
}

/// What a recovery made.
pub struct Outcome {
    /// What the ceremony restored.
    pub recovered: restore::Recovered,
    /// Milliseconds per step, and `total`.
    pub timings: serde_json::Map<String, Value>,
    /// The new deployment's config.
    pub config_path: PathBuf,
    /// The token recovered into.
    pub token: recovery::TokenInfo,
}

/// The steps of a recovery, as `stage` is told of them: `bundle` (read and check it, and
/// that the target is empty), `shares` (open, check and combine them, and check the bundle's
/// signature), `unseal`, `target` (the new token and its escrow key), `restore`.
// long: one all-or-nothing sequence; every step after the target's first write rolls back.
pub fn recover(
    bundle: &Path,
    share_files: &ShareFiles,
    target: &Target,
    so_pin_file: Option<&Path>,
    stage: &mut dyn FnMut(&'static str),
) -> Result<Outcome, Error> {
    let start = now();
    let mut timings = serde_json::Map::new();
    let mut mark = |name: &str, since: &mut Instant| {
        let ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        timings.insert(name.to_owned(), json!(ms));
        *since = now();
    };
    let mut t = now();

    // Checked: the bundle parses, the target is empty.
    stage("bundle");
    let bytes = read(bundle)?;
    let checked = restore::check(bundle, &bytes)?;
    drop(bytes);
    target.check_empty()?;
    mark("check", &mut t);

    // SharesChecked, Combined, BundleVerified, Prepared: all in memory.
    stage("shares");
    let shares = open_shares(share_files)?;
    let verified = checked.check_shares(shares)?.combine()?;
    mark("shares", &mut t);
    stage("unseal");
    let prepared = verified.prepare()?;
    mark("unseal", &mut t);

    // From here the target is written; on failure it is put back as it was.
    stage("target");
    let result = (|| {
        let config_path = target.materialise()?;
        let config = Config::load(&config_path)?;
        crate::open::use_softhsm2_conf(&config);
        let hsm_config = crate::open::hsm_config(&config, &config_path)?;
        let found = hsm_bridge::token_objects(
            &hsm_config.module,
            &hsm_config.token_label,
            &hsm_config.user_pin,
        )?;
        if found > 0 {
            return Err(Error::Usage(format!(
                "token {} is not empty ({found} objects): a recovery needs a new, empty token \
                 (initialise one with softhsm2-util --init-token, or your HSM's tool)",
                hsm_config.token_label
            )));
        }
        if let Some((pin, value)) = prepared.escrow_key() {
            let so_pin = crate::ceremony::so_pin(
                so_pin_file,
                None,
                &config_path,
                "the recovery imports the trusted escrow key as the new token's Security Officer",
            )?;
            hsm_bridge::import_trusted_escrow_key(
                &hsm_config.module,
                &hsm_config.token_label,
                &so_pin,
                pin,
                value,
            )?;
            tracing::info!(escrow_key_id = %pin.id, "trusted escrow key imported into the new token by its security officer");
        }
        let hsm = Arc::new(Pkcs11Hsm::open(&hsm_config)?);
        let facts = crate::ceremony::token_info(&hsm)?;
        stage("restore");
        let store_dir = config.data_dir.join("store");
        let tmp = config.data_dir.join("store.recovering");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|source| Error::File {
                what: "cannot remove an earlier attempt's",
                path: tmp.clone(),
                source,
            })?;
        }
        let written = (|| {
            let store = Arc::new(RocksStore::open(&tmp)?);
            let mut phase_at = now();
            let mut phases = serde_json::Map::new();
            let mut last: Option<&'static str> = None;
            let mut phase = |name: &'static str| {
                if let Some(prev) = last.replace(name) {
                    let ms = u64::try_from(phase_at.elapsed().as_millis()).unwrap_or(u64::MAX);
                    phases.insert(prev.to_owned(), json!(ms));
                }
                phase_at = now();
            };
            let recovered = prepared.restore(
                &hsm,
                store.as_ref(),
                Facts {
                    time_ms: SystemClock.now_unix_ms(),
                    token: facts.clone(),
                },
                &mut phase,
            )?;
            phase("done");
            // The new signer signs a checkpoint over the recovered record, and the restored
            // context-digest key is proven to open under the new root key.
            let log = AuditLog::open(
                store.clone(),
                Arc::new(SystemClock),
                config.audit.settings(),
            )?;
            log.attach_hsm(hsm.clone())?;
            log.close();
            drop(log);
            drop(store);
            Ok::<_, Error>((recovered, phases))
        })();
        let (recovered, phases) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        // The commit point: the restored store takes its place.
        std::fs::rename(&tmp, &store_dir).map_err(|source| Error::File {
            what: "cannot move the restored store to",
            path: store_dir.clone(),
            source,
        })?;
        if let Ok(dir) = std::fs::File::open(&config.data_dir) {
            let _ = dir.sync_all();
        }
        Ok((recovered, phases, config_path, facts))
    })();
    let (recovered, phases, config_path, facts) = match result {
        Ok(r) => r,
        Err(e) => {
            target.roll_back();
            return Err(e);
        }
    };
    for (k, v) in phases {
        timings.insert(k, v);
    }
    let total = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    timings.insert("total".into(), json!(total));
    Ok(Outcome {
        recovered,
        timings,
        config_path,
        token: facts,
    })
}

/// Opens each `--share` with whichever identity opens it, and parses each `--decrypted`.
pub fn open_shares(files: &ShareFiles) -> Result<Vec<(PathBuf, ShareEnvelope)>, Error> {
    let ShareFiles {
        shares,
        identities,
        decrypted,
    } = files;
    if !shares.is_empty() && identities.is_empty() {
        return Err(Error::Usage(
            "--share files are age files: give the custodians' --identity files (or \
             --decrypted for shares decrypted with `age -d`)"
                .into(),
        ));
    }
    let mut opened_ids = Vec::new();
    for path in identities {
        let text = SecretString::from(crate::error::text_file(path)?);
        opened_ids.push(parse_identity(&text, path)?);
    }
    let identities = opened_ids;
    let mut out = Vec::new();
    for file in shares {
        let sealed = read(file)?;
        let mut opened = None;
        let mut last_err = None;
        for identity in &identities {
            match ShareEnvelope::open(&sealed, identity, file) {
                Ok(s) => {
                    opened = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        match (opened, last_err) {
            (Some(s), _) => out.push((file.clone(), s)),
            (None, Some(e)) => return Err(e.into()),
            (None, None) => return Err(Error::Usage("no --identity given".into())),
        }
    }
    for file in decrypted {
        let bytes = secrecy::SecretSlice::from(read(file)?);
        out.push((
            file.clone(),
            ShareEnvelope::parse(secrecy::ExposeSecret::expose_secret(&bytes), file)?,
        ));
    }
    if out.is_empty() {
        return Err(Error::Usage(
            "give the custodians' shares: --share FILE --identity KEY, or --decrypted FILE".into(),
        ));
    }
    Ok(out)
}

/// Where the recovery writes.
#[derive(Debug)]
#[non_exhaustive]
pub enum Target {
    /// An operator's config; its data directory must hold no store.
    Config(PathBuf),
    /// A fresh development layout in this directory, made by the recovery.
    Dev(PathBuf),
}

impl Target {
    fn check_empty(&self) -> Result<(), Error> {
        let not_empty = |dir: &Path| -> Result<bool, Error> {
            match std::fs::read_dir(dir) {
                Ok(mut entries) => Ok(entries.next().is_some()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(source) => Err(Error::File {
                    what: "cannot read",
                    path: dir.to_path_buf(),
                    source,
                }),
            }
        };
        match self {
            Target::Dev(dir) => {
                if not_empty(dir)? {
                    return Err(Error::Usage(format!(
                        "{} is not empty: a recovery needs a new, empty data directory",
                        dir.display()
                    )));
                }
            }
            Target::Config(path) => {
                let config = Config::load(path)?;
                let store = config.data_dir.join("store");
                if not_empty(&store)? {
                    return Err(Error::Usage(format!(
                        "{} holds a store: a recovery needs a new, empty data directory",
                        store.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Makes what the recovery writes into (the development layout), and returns the config.
    fn materialise(&self) -> Result<PathBuf, Error> {
        match self {
            Target::Config(path) => Ok(path.clone()),
            Target::Dev(dir) => crate::dev::ensure(&DevLayout::new(dir.clone())),
        }
    }

    /// Puts the target back as it was: a development directory made here is emptied; an
    /// operator's data directory has only the temporary store removed (already done).
    fn roll_back(&self) {
        if let Target::Dev(dir) = self {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let _ = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                }
            }
            tracing::warn!(dir = %dir.display(), "recovery failed: the development directory was emptied again");
        } else {
            tracing::warn!("recovery failed: the data directory is as it was; the token may keep the escrow key, root key and audit signing key this run made (initialise it again to retry)");
        }
    }
}

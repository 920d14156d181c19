//! `kms ceremony recover`: the quorum recovery ceremony on a fresh host (docs/RECOVERY.md),
//! run by `kms_deployment::recover`; this module reads the flags and prints the outcome.

use std::path::{Path, PathBuf};

use clap::Args;
use kms_deployment::recover::{recover, Outcome, ShareFiles, Target};
use serde_json::{json, Value};

use crate::error::Error;
use crate::output::emit;

/// The k custodians' shares, as recovery and reshare take them.
#[derive(Args, Debug)]
pub(crate) struct ShareArgs {
    /// A custodian's share file (age); opened with whichever --identity opens it. Repeat.
    #[arg(long = "share", value_name = "FILE")]
    shares: Vec<PathBuf>,
    /// A custodian's age identity file. Repeat.
    #[arg(long = "identity", value_name = "FILE")]
    identities: Vec<PathBuf>,
    /// A share its custodian decrypted beforehand (`age -d -i KEY NAME.share.age`). Repeat.
    #[arg(long = "decrypted", value_name = "FILE")]
    decrypted: Vec<PathBuf>,
}

impl ShareArgs {
    pub(crate) fn files(&self) -> ShareFiles {
        ShareFiles {
            shares: self.shares.clone(),
            identities: self.identities.clone(),
            decrypted: self.decrypted.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct RecoverArgs {
    /// The backup bundle (`kms backup export`).
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    #[command(flatten)]
    shares: ShareArgs,
    /// The new deployment's config: its data directory must hold no store, its token must
    /// be new and empty (user PIN as the config says; SO PIN from --so-pin-file or KMS_SO_PIN).
    #[arg(
        long,
        value_name = "NEW.toml",
        required_unless_present = "dev",
        conflicts_with = "dev"
    )]
    config: Option<PathBuf>,
    /// Recover into a fresh development layout in --data-dir (a new SoftHSM2 token with new
    /// PINs, a new server certificate and operator CA, kms.toml beside them), for drills and
    /// the README tour: then `kms --data-dir DIR serve --dev`.
    #[arg(long)]
    dev: bool,
    /// A file holding the new token's Security Officer PIN (never a flag).
    #[arg(long, value_name = "FILE")]
    so_pin_file: Option<PathBuf>,
}

/// Runs the ceremony; prints `{"key_versions_restored", "audit_head", ...}`.
pub(crate) fn run(args: &RecoverArgs, data_dir: &Path, as_json: bool) -> Result<(), Error> {
    let target = match (&args.config, args.dev) {
        (Some(c), false) => Target::Config(c.clone()),
        (None, true) => Target::Dev(data_dir.to_path_buf()),
        _ => return Err(Error::Usage("give --config NEW.toml or --dev".into())),
    };
    let done = recover(
        &args.bundle,
        &args.shares.files(),
        &target,
        args.so_pin_file.as_deref(),
        &mut |_| {},
    )?;
    let Outcome {
        recovered,
        timings,
        config_path,
        token: facts,
    } = done;
    tracing::info!(versions = recovered.key_versions_restored, token = %facts.label, "deployment recovered");
    let out: Value = json!({
        "key_versions_restored": recovered.key_versions_restored,
        "software": recovered.software,
        "hsm": recovered.hsm,
        "audit_head": { "seq": recovered.audit_head.seq, "hash": recovered.audit_head.hash },
        "bundle_sha256": recovered.bundle_sha256,
        "signer": recovered.signer,
        "token": { "label": facts.label, "serial": facts.serial },
        "config": config_path.display().to_string(),
        "timings_ms": timings,
        "next": if args.dev {
            format!("kms --data-dir {} serve --dev", data_dir.display())
        } else {
            format!("kms serve --config {}", config_path.display())
        },
    });
    emit(as_json, &out)
}

//! `kms ceremony`: the custody init ceremony, share verification and custody status, run on
//! the data directory with the server stopped (protocol: `docs/CUSTODY.md`). The host side is
//! `kms_deployment::ceremony`'s; this module reads the flags and prints.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use kms_deployment::ceremony::{self, ShareVerification};
use recovery::ceremony::ShareClaim;
use recovery::{parse_identity, ShareEnvelope};
use secrecy::SecretString;
use serde_json::json;

use crate::error::{read, Error};
use crate::input::ConfigArg;
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
            let so_pin = ceremony::so_pin(
                args.so_pin_file.as_deref(),
                args.so_pin_env.as_deref(),
                &config_path,
                "init imports the trusted escrow key as the token's Security Officer",
            )?;
            let summary = ceremony::run_init(
                &config_path,
                args.threshold,
                &args.custodians,
                &args.out_dir,
                &so_pin,
            )?;
            emit(as_json, &summary)
        }
        CeremonyCommand::VerifyShare(args) => verify(&args, conn, as_json),
        CeremonyCommand::Status(args) => {
            emit(as_json, &ceremony::status(&config_path(&args, data_dir)?)?)
        }
        CeremonyCommand::Recover(args) => crate::recover::run(&args, data_dir, as_json),
        CeremonyCommand::AuthorizeReshare(args) => crate::reshare::authorize(&args, conn, as_json),
        CeremonyCommand::Reshare(args) => crate::reshare::run(&args, data_dir, as_json),
    }
}

fn config_path(arg: &ConfigArg, data_dir: &Path) -> Result<PathBuf, Error> {
    kms_deployment::open::config_path_or_dev(arg.config.as_ref(), data_dir)
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
    let ShareVerification::Recorded {
        custodian,
        index,
        transcript_sha256,
    } = ceremony::verify_share(&config_path, &claim)?
    else {
        tracing::info!("the store is in use by a running server; recording the verification through the admin plane");
        return verify_online(&claim, conn, as_json);
    };
    emit(
        as_json,
        &json!({
            "custodian": custodian,
            "index": index,
            "verified": true,
            "transcript_sha256": transcript_sha256,
        }),
    )
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

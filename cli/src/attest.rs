//! `kms attest`: a signed sovereignty statement from the running deployment, and its offline
//! check with only the audit signer's public key (docs/DRILL.md, "The attestation").

use std::path::PathBuf;

use api::v1::AttestRequest;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::connect::ConnectArgs;
use crate::error::{read, Error};
use crate::output::emit;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct AttestArgs {
    #[command(subcommand)]
    command: Option<AttestCommand>,
    /// Where to write the attestation (refused if it exists); standard output otherwise.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum AttestCommand {
    /// Check an attestation offline against the audit signer's public key (PEM, from `kms
    /// audit public-key`); exits non-zero if any byte of it was changed.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// The attestation file.
    file: PathBuf,
    /// The audit signer's public key(s), PEM, kept away from the deployment.
    #[arg(long, value_name = "PEM")]
    public_key: PathBuf,
}

pub(crate) async fn run(args: AttestArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    if let Some(AttestCommand::Verify(v)) = &args.command {
        return verify(v, as_json);
    }
    if let Some(out) = &args.out {
        if out.exists() {
            return Err(Error::Usage(format!(
                "{} exists; choose another --out (an attestation is never overwritten)",
                out.display()
            )));
        }
    }
    let mut client = conn.admin().await?;
    let text = client.attest(AttestRequest {}).await?.into_inner().text;
    match &args.out {
        Some(out) => {
            crate::error::write_public(out, text.as_bytes())?;
            emit(
                as_json,
                &json!({
                    "out": out.display().to_string(),
                    "sha256": kms_core::audit::sha256_hex(text.as_bytes()),
                }),
            )
        }
        None => crate::output::raw(&text),
    }
}

/// Checks the attestation against every key in the PEM file; the first that verifies it wins.
fn verify(args: &VerifyArgs, as_json: bool) -> Result<(), Error> {
    use kms_core::attest::{verify, AttestError};
    let keys = kms_deployment::audit::trusted_keys(&args.public_key)?;
    let file = read(&args.file)?;
    let mut refusal = None;
    for point in keys.values() {
        match verify(&file, point) {
            Ok(a) => {
                let s = &a.statement;
                return emit(
                    as_json,
                    &json!({
                        "valid": true,
                        "signer": a.signature.key_id,
                        "issued_at": s.issued_at,
                        "token": s.root_of_trust.label,
                        "versions": s.escrow.versions,
                        "unescrowed": s.escrow.unescrowed.len(),
                        "epoch": s.custody.as_ref().map(|c| c.epoch),
                    }),
                );
            }
            Err(e @ AttestError::OtherSigner { .. }) => {
                refusal.get_or_insert(e);
            }
            Err(e) => refusal = Some(e),
        }
    }
    Err(match refusal {
        Some(e) => Error::Attest(e),
        None => Error::Usage("no public key to check the attestation with".into()),
    })
}

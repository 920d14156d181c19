//! `kms ceremony authorize-reshare` (online: asks for the gated approval) and `kms ceremony
//! reshare` (offline on the data directory, server stopped, run by
//! `kms_deployment::reshare`); this module reads the flags and prints.

use std::path::{Path, PathBuf};

use clap::Args;
use kms_deployment::reshare::{Reshare, ResharePlan};
use serde_json::json;

use crate::error::Error;
use crate::input::ConfigArg;
use crate::output::emit;

#[derive(Args, Debug)]
pub(crate) struct PlanArgs {
    /// How many of the new custodians together can recover (2 <= K <= custodians).
    #[arg(long, value_name = "K")]
    threshold: usize,
    /// A new custodian and their own age X25519 recipient (`age-keygen -y KEYFILE`). Repeat,
    /// in the same order as when the reshare was authorised.
    #[arg(long = "custodian", value_name = "NAME=AGE_RECIPIENT", required = true)]
    custodians: Vec<String>,
}

impl PlanArgs {
    fn plan(&self) -> ResharePlan {
        ResharePlan {
            threshold: self.threshold,
            custodians: self.custodians.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct AuthorizeArgs {
    #[command(flatten)]
    plan: PlanArgs,
}

#[derive(Args, Debug)]
pub(crate) struct ReshareArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// k current custodians' shares.
    #[command(flatten)]
    shares: crate::recover::ShareArgs,
    /// Where to write NAME.share.age for each new custodian and transcript.json.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// The executed approval of `kms ceremony authorize-reshare` with this plan (needed when
    /// the stored approval rules gate admin.Reshare, as they do by default).
    #[arg(long, value_name = "ID")]
    approval: Option<String>,
    #[command(flatten)]
    config: ConfigArg,
}

/// Asks the running server to authorise a reshare with this plan; prints the pending
/// approval (or, when the action is not gated, that none is needed).
pub(crate) fn authorize(
    args: &AuthorizeArgs,
    conn: &crate::connect::ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let plan = args.plan.plan();
    plan.parsed()?;
    let request = plan.request();
    let answer = conn.admin_call(|mut client| async move {
        Ok(client.authorize_reshare(request).await?.into_inner())
    })?;
    crate::approval::emit_change(as_json, answer.approval.as_ref(), || {
        json!({
            "gated": false,
            "approval_id": null,
            "next": "admin.Reshare is not gated: stop the server and run `kms ceremony reshare` without --approval",
        })
    })
}

/// Runs the reshare on the deployment the config names, server stopped.
pub(crate) fn run(args: &ReshareArgs, data_dir: &Path, as_json: bool) -> Result<(), Error> {
    let config_path =
        kms_deployment::open::config_path_or_dev(args.config.config.as_ref(), data_dir)?;
    let summary = kms_deployment::reshare::run(
        &config_path,
        &Reshare {
            plan: args.plan.plan(),
            shares: args.shares.files(),
            out_dir: args.out_dir.clone(),
            approval: args.approval.clone(),
        },
    )?;
    emit(as_json, &summary)
}

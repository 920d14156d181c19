//! `kms ceremony authorize-reshare` (online: asks for the gated approval) and `kms ceremony
//! reshare` (offline on the data directory, server stopped). The ceremony's states are
//! `kms_core::reshare`'s (docs/RECOVERY.md, "Reshare"); this module reads the files and flags,
//! checks the approval ticket against the plan, writes the share files and the transcript, and
//! audits the outcome.

use std::path::{Path, PathBuf};

use api::v1::AuthorizeReshareRequest;
use clap::Args;
use kms_core::audit::AuditEvent;
use kms_core::reshare::{self, Plan};
use prost::Message;
use recovery::Custodian;
use serde_json::{json, Value};

use crate::ceremony::ConfigArg;
use crate::error::Error;
use crate::input::now_unix;
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
    fn request(&self) -> AuthorizeReshareRequest {
        AuthorizeReshareRequest {
            threshold: u32::try_from(self.threshold).unwrap_or(u32::MAX),
            custodians: self.custodians.clone(),
        }
    }

    fn parsed(&self) -> Result<Vec<Custodian>, Error> {
        let custodians = self
            .custodians
            .iter()
            .map(|c| Custodian::parse(c))
            .collect::<Result<Vec<_>, _>>()?;
        recovery::ceremony::Checked::new(self.threshold, custodians.clone())?;
        Ok(custodians)
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
    shares: crate::recover::ShareFiles,
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
    args.plan.parsed()?;
    let request = args.plan.request();
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
    let custodians = args.plan.parsed()?;
    let config_path = crate::ceremony::config_path_or_dev(args.config.config.as_ref(), data_dir)?;
    crate::ceremony::prepare_out_dir(&args.out_dir, &custodians)?;
    let shares = crate::recover::open_shares(&args.shares)?;
    let opened = crate::serve::open_offline(&config_path)?;
    let store = opened.store.as_ref();
    let result = (|| {
        let ticket = check_ticket(store, args)?;
        let open = reshare::check_shares(store, shares)?.open(store)?;
        let plan = Plan {
            threshold: args.plan.threshold,
            custodians,
            audit_signer: opened.audit_log.signer().unwrap_or_default().to_owned(),
            token: crate::ceremony::token_info(&opened.hsm)?,
            time: now_unix(),
        };
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let resealed = open.reseal(plan, &rng)?;
        let sealed = resealed.sealed();
        let mut files = Vec::new();
        for (name, bytes) in &sealed.share_files {
            files.push((
                args.out_dir.join(format!("{name}.share.age")),
                bytes.clone(),
            ));
        }
        files.push((
            args.out_dir.join("transcript.json"),
            sealed.transcript.canonical().map_err(Error::from)?,
        ));
        crate::ceremony::write_all(&files)?;
        let extra = ticket
            .iter()
            .map(|id| reshare::TICKET.consume(id, "kms ceremony reshare"))
            .collect();
        // The commit point: before it, only the files above exist, and they are removed.
        let sealed = match resealed.commit(store, extra) {
            Ok(sealed) => sealed,
            Err(e) => {
                for (path, _) in &files {
                    let _ = std::fs::remove_file(path);
                }
                return Err(Error::from(e));
            }
        };
        Ok((sealed, ticket))
    })();
    let (sealed, ticket) = match result {
        Ok(done) => done,
        Err(e) => {
            let mut event = AuditEvent::new("ceremony.reshare", "error");
            event.reason = Some(e.to_string());
            if opened.audit_log.submit(event).wait_blocking().is_err() {
                tracing::error!("the refused reshare could not be audited");
            }
            opened.audit_log.close();
            return Err(e);
        }
    };
    let sha = hex::encode(sealed.transcript_sha256);
    let names: Vec<String> = sealed
        .share_files
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    let epoch = sealed.record.epoch.get();
    // What the new transcript and seals already say: the epoch it follows, the transcript it
    // replaces, how many seals were made again.
    let from_epoch = epoch.saturating_sub(1);
    let previous_sha = sealed
        .transcript
        .previous_sha256
        .clone()
        .unwrap_or_default();
    let resealed_count = sealed.seals.len();
    let mut event = AuditEvent::new("ceremony.reshare", "ok");
    for (k, v) in [
        ("ceremony_id", sealed.record.ceremony_id.to_string()),
        ("from_epoch", from_epoch.to_string()),
        ("epoch", epoch.to_string()),
        ("transcript_sha256", sha.clone()),
        ("previous_transcript_sha256", previous_sha.clone()),
        ("threshold", args.plan.threshold.to_string()),
        ("custodians", names.join(",")),
        ("resealed", resealed_count.to_string()),
        ("approval_id", ticket.clone().unwrap_or_default()),
    ] {
        event.detail.insert(k.into(), v);
    }
    let audited = opened.audit_log.submit(event).wait_blocking();
    opened.audit_log.close();
    audited.map_err(|_| {
        Error::Usage(format!(
            "the reshare to epoch {epoch} is committed, but its audit record could not be written"
        ))
    })?;
    tracing::info!(
        epoch,
        threshold = args.plan.threshold,
        custodians = names.len(),
        resealed = resealed_count,
        "recovery authority reshared"
    );
    let summary: Value = json!({
        "ceremony_id": sealed.record.ceremony_id.to_string(),
        "epoch": epoch,
        "previous_epoch": from_epoch,
        "threshold": args.plan.threshold,
        "custodians": names,
        "transcript_sha256": sha,
        "previous_transcript_sha256": previous_sha,
        "resealed": resealed_count,
        "approval_id": ticket,
        "out_dir": args.out_dir.display().to_string(),
    });
    emit(as_json, &summary)
}

/// The approval this reshare consumes, when the stored rules gate it: executed, recent,
/// unused, and naming exactly this plan.
fn check_ticket(
    store: &dyn kms_core::store::Store,
    args: &ReshareArgs,
) -> Result<Option<String>, Error> {
    if !reshare::gated(store)? {
        return Ok(None);
    }
    let Some(id) = &args.approval else {
        return Err(Error::Usage(
            "a reshare is gated by approvals: run `kms --as NAME ceremony authorize-reshare` with \
             this --threshold and these --custodian flags while the server runs, have it \
             approved, stop the server, and pass --approval ID"
                .into(),
        ));
    };
    let r = reshare::ticket(store, id, now_unix())?;
    let stored = AuthorizeReshareRequest::decode(r.request.as_slice())
        .map_err(|_| Error::Usage(format!("approval {id}: its stored request does not decode")))?;
    if stored != args.plan.request() {
        return Err(Error::Usage(format!(
            "approval {id} authorises threshold {} with custodians {}, not this plan",
            stored.threshold,
            stored.custodians.join(" ")
        )));
    }
    Ok(Some(id.clone()))
}

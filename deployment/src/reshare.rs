//! The host side of a reshare (docs/RECOVERY.md, "Reshare"), offline on the data directory
//! with the server stopped. The ceremony's states are `kms_core::reshare`'s; this module
//! checks the approval ticket against the plan, writes the share files and the transcript,
//! and audits the outcome.

use std::path::{Path, PathBuf};

use crate::events::{ceremony_done, ceremony_failed, Ceremony};
use api::v1::AuthorizeReshareRequest;
use kms_core::reshare::{self, Plan};
use prost::Message;
use recovery::Custodian;
use serde_json::{json, Value};

use crate::error::Error;
use crate::open::Deployment;
use crate::recover::ShareFiles;

/// A reshare's plan: the new threshold and custodians (`NAME=AGE_RECIPIENT`), in the order
/// the reshare was authorised with.
#[derive(Debug, Clone)]
pub struct ResharePlan {
    /// How many of the new custodians together can recover.
    pub threshold: usize,
    /// The new custodians, `NAME=AGE_RECIPIENT`.
    pub custodians: Vec<String>,
}

impl ResharePlan {
    /// The admin-plane request that authorises this plan.
    pub fn request(&self) -> AuthorizeReshareRequest {
        AuthorizeReshareRequest {
            threshold: u32::try_from(self.threshold).unwrap_or(u32::MAX),
            custodians: self.custodians.clone(),
        }
    }

    /// The custodians, parsed and checked with the threshold.
    pub fn parsed(&self) -> Result<Vec<Custodian>, Error> {
        let custodians = self
            .custodians
            .iter()
            .map(|c| Custodian::parse(c))
            .collect::<Result<Vec<_>, _>>()?;
        recovery::ceremony::Checked::new(self.threshold, custodians.clone())?;
        Ok(custodians)
    }
}

/// What an offline reshare is given.
#[derive(Debug)]
pub struct Reshare {
    /// The new threshold and custodians.
    pub plan: ResharePlan,
    /// k current custodians' shares.
    pub shares: ShareFiles,
    /// Where to write NAME.share.age for each new custodian and transcript.json.
    pub out_dir: PathBuf,
    /// The executed approval of `authorize-reshare` with this plan, when the rules gate it.
    pub approval: Option<String>,
}

/// Runs the reshare on the deployment the config names, server stopped.
// long: the ceremony up to its commit point and the audit of either outcome, in one place.
pub fn run(config_path: &Path, args: &Reshare) -> Result<Value, Error> {
    let custodians = args.plan.parsed()?;
    crate::ceremony::prepare_out_dir(&args.out_dir, &custodians)?;
    let shares = crate::recover::open_shares(&args.shares)?;
    let opened = Deployment::open_offline(config_path)?;
    let store = opened.store.as_ref();
    let result = (|| {
        let ticket = check_ticket(store, args, opened.clock.now_unix())?;
        let open = reshare::check_shares(store, shares)?.open(store)?;
        let plan = Plan {
            threshold: args.plan.threshold,
            custodians,
            audit_signer: opened.audit_log.signer().unwrap_or_default().to_owned(),
            token: crate::ceremony::token_info(&opened.hsm)?,
            time: opened.clock.now_unix(),
        };
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let resealed = open.reseal(plan, &rng)?;
        let sealed = resealed.sealed();
        let files = crate::ceremony::write_ceremony_files(&args.out_dir, sealed)?;
        let extra = ticket
            .iter()
            .map(|id| reshare::TICKET.consume(id, "kms ceremony reshare"))
            .collect();
        // The commit point: before it, only the files above exist, and they are removed.
        let sealed = match resealed.commit(store, extra) {
            Ok(sealed) => sealed,
            Err(e) => {
                crate::ceremony::remove_all(&files);
                return Err(Error::from(e));
            }
        };
        Ok((sealed, ticket))
    })();
    let (sealed, ticket) = match result {
        Ok(done) => done,
        Err(e) => {
            let event = ceremony_failed(Ceremony::Reshare, &e);
            if opened.audit_log.submit(event).wait_blocking().is_err() {
                tracing::error!("the refused reshare could not be audited");
            }
            opened.audit_log.close();
            return Err(e);
        }
    };
    let sha = hex::encode(sealed.transcript_sha256);
    let names = crate::ceremony::custodian_names(&sealed);
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
    let event = ceremony_done(Ceremony::Reshare)
        .with("ceremony_id", sealed.record.ceremony_id)
        .with("from_epoch", from_epoch)
        .with("epoch", epoch)
        .with("transcript_sha256", &sha)
        .with("previous_transcript_sha256", &previous_sha)
        .with("threshold", args.plan.threshold)
        .with("custodians", names.join(","))
        .with("resealed", resealed_count)
        .with("approval_id", ticket.as_deref().unwrap_or_default());
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
    Ok(summary)
}

/// The approval this reshare consumes, when the stored rules gate it: executed, recent,
/// unused, and naming exactly this plan.
fn check_ticket(
    store: &dyn kms_core::store::Store,
    args: &Reshare,
    now: u64,
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
    let r = reshare::ticket(store, id, now)?;
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

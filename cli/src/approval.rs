//! `kms approval`: M-of-N approvals of gated admin changes (docs/APPROVALS.md). A gated
//! command prints its pending request; other operators show, approve or reject it, and the
//! requester may cancel it. The change runs on the M-th approval.

use api::v1::{
    ApprovalId, ApprovalInfo, ApprovalRules, GetApprovalRulesRequest, ListApprovalsRequest,
    RejectChangeRequest, SetApprovalRulesRequest,
};
use clap::Subcommand;
use kms_core::governance::actions::GatedAction;
use serde_json::{json, Value};

use crate::connect::ConnectArgs;
use crate::error::Error;
use crate::output::{emit, rfc3339};

/// `kms approval`.
#[derive(Subcommand, Debug)]
pub(crate) enum ApprovalCommand {
    /// List approval requests, newest first.
    List(List),
    /// Show one request: what will run (as JSON, and a diff for policies), its hash, its
    /// approvals so far.
    Show(Id),
    /// Approve a request (not your own); the change runs on the last approval it needs.
    Approve(Id),
    /// Reject a request: it ends, and never runs.
    Reject(Reject),
    /// Withdraw your own pending request.
    Cancel(Id),
    /// Show the approval rules: how many approvals, how long requests wait, what is gated.
    Rules,
    /// Change the approval rules (itself gated, under the rules in force now).
    SetRules(SetRules),
}

#[derive(clap::Args, Debug)]
pub(crate) struct List {
    /// Only requests in this state.
    #[arg(long, value_parser = ["pending", "approved", "executed", "failed", "rejected", "cancelled", "expired"])]
    state: Option<String>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Id {
    /// The approval request's id.
    id: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Reject {
    /// The approval request's id.
    id: String,
    /// Why (recorded with the rejection).
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct SetRules {
    /// Approvals needed from operators other than the requester (1-16).
    #[arg(long)]
    required: u32,
    /// How long a request waits before it expires (e.g. 24h, 90m).
    #[arg(long, default_value = "24h")]
    expiry: humantime::Duration,
    /// Gated action (repeatable; default every gatable action). admin.SetApprovalRules is
    /// always gated.
    #[arg(long = "gate", value_name = "ACTION", value_parser = parse_gated)]
    gated: Vec<GatedAction>,
}

pub(crate) async fn run(
    cmd: ApprovalCommand,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let mut client = conn.admin().await?;
    match cmd {
        ApprovalCommand::List(List { state }) => {
            let state = state.unwrap_or_default();
            let r = client
                .list_approvals(ListApprovalsRequest { state })
                .await?;
            warn(&r.get_ref().warning);
            print_list(&r.get_ref().approvals, as_json)
        }
        ApprovalCommand::Show(Id { id }) => show(
            as_json,
            &client.get_approval(ApprovalId { id }).await?.into_inner(),
        ),
        ApprovalCommand::Approve(Id { id }) => show(
            as_json,
            &client.approve_change(ApprovalId { id }).await?.into_inner(),
        ),
        ApprovalCommand::Reject(Reject { id, reason }) => {
            let a = client
                .reject_change(RejectChangeRequest { id, reason })
                .await?
                .into_inner();
            show(as_json, &a)
        }
        ApprovalCommand::Cancel(Id { id }) => {
            let a = client.cancel_change(ApprovalId { id }).await?.into_inner();
            show(as_json, &a)
        }
        ApprovalCommand::Rules => {
            let r = client
                .get_approval_rules(GetApprovalRulesRequest {})
                .await?
                .into_inner();
            warn(&r.warning);
            emit(as_json, &rules_json(&r))
        }
        ApprovalCommand::SetRules(SetRules {
            required,
            expiry,
            gated,
        }) => {
            let r = client
                .set_approval_rules(SetApprovalRulesRequest {
                    required,
                    expiry_secs: expiry.as_secs(),
                    gated: gated.iter().map(|a| a.as_str().to_owned()).collect(),
                })
                .await?
                .into_inner();
            emit_change(as_json, r.approval.as_ref(), || rules_json(&r))
        }
    }
}

fn print_list(approvals: &[ApprovalInfo], as_json: bool) -> Result<(), Error> {
    if as_json {
        for a in approvals {
            emit(true, &approval_json(a))?;
        }
        return Ok(());
    }
    if approvals.is_empty() {
        return crate::output::raw("no approval requests\n");
    }
    for a in approvals {
        crate::output::raw(&format!(
            "{}  {:9}  {} {}  by {}  {}/{} approvals\n",
            a.id,
            a.state,
            a.action,
            a.target,
            shown_name(&a.requested_by_name, &a.requested_by),
            a.approvals.len(),
            a.required
        ))?;
    }
    Ok(())
}

/// A `--gate` value: one of the actions approvals can gate.
fn parse_gated(s: &str) -> Result<GatedAction, String> {
    s.parse().map_err(|_| {
        let names: Vec<&str> = GatedAction::ALL.iter().map(|a| a.as_str()).collect();
        format!(
            "not an action approvals can gate; one of: {}",
            names.join(", ")
        )
    })
}

fn warn(warning: &str) {
    if !warning.is_empty() {
        tracing::warn!("{warning}");
    }
}

fn shown_name<'a>(name: &'a str, identity: &'a str) -> &'a str {
    if name.is_empty() {
        identity
    } else {
        name
    }
}

/// Prints a gated command's answer: its pending approval request when it waits for
/// approvals (exit 0: waiting is not a failure), otherwise `done`.
pub(crate) fn emit_change(
    as_json: bool,
    pending: Option<&ApprovalInfo>,
    done: impl FnOnce() -> Value,
) -> Result<(), Error> {
    let Some(a) = pending else {
        return emit(as_json, &done());
    };
    if as_json {
        return emit(true, &approval_json(a));
    }
    crate::output::raw(&format!(
        "approval {id} pending: {action} {target} needs {n} approval(s) from other operators \
         before {expires}\n  review:  kms approval show {id}\n  approve: kms --as NAME approval \
         approve {id}\n",
        id = a.id,
        action = a.action,
        target = a.target,
        n = a.required,
        expires = rfc3339(a.expires_at).as_str().unwrap_or("-"),
    ))
}

/// The JSON form of an approval request, as every `kms approval` command and every pending
/// gated command print it.
pub(crate) fn approval_json(a: &ApprovalInfo) -> Value {
    let view: Value = serde_json::from_str(&a.view).unwrap_or(Value::String(a.view.clone()));
    let result: Value = if a.result.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&a.result).unwrap_or(Value::String(a.result.clone()))
    };
    let approvers: Vec<Value> = a
        .approvals
        .iter()
        .map(|v| json!({ "name": v.name, "identity": v.operator, "at": rfc3339(v.at) }))
        .collect();
    json!({
        "approval_id": a.id,
        "state": a.state,
        "action": a.action,
        "target": a.target,
        "request_hash": a.hash,
        "request": view,
        "diff": (!a.diff.is_empty()).then_some(&a.diff),
        "requested_by": shown_name(&a.requested_by_name, &a.requested_by),
        "requested_by_identity": a.requested_by,
        "requested_at": rfc3339(a.requested_at),
        "expires_at": rfc3339(a.expires_at),
        "required": a.required,
        "approvers": approvers,
        "ended_by": (!a.ended_by.is_empty()).then_some(&a.ended_by),
        "ended_at": rfc3339(a.ended_at),
        "reason": (!a.reason.is_empty()).then_some(&a.reason),
        "result": result,
    })
}

fn show(as_json: bool, a: &ApprovalInfo) -> Result<(), Error> {
    if as_json {
        return emit(true, &approval_json(a));
    }
    let approvers: Vec<&str> = a
        .approvals
        .iter()
        .map(|v| shown_name(&v.name, &v.operator))
        .collect();
    let mut text = format!(
        "approval      {}\nstate         {}\nchange        {} {}\nrequested by  {} at {}\n\
         expires       {}\napprovals     {}/{} {}\nrequest hash  {}\nrequest       {}\n",
        a.id,
        a.state,
        a.action,
        a.target,
        shown_name(&a.requested_by_name, &a.requested_by),
        rfc3339(a.requested_at).as_str().unwrap_or("-"),
        rfc3339(a.expires_at).as_str().unwrap_or("-"),
        a.approvals.len(),
        a.required,
        approvers.join(", "),
        a.hash,
        a.view,
    );
    if !a.reason.is_empty() {
        text.push_str(&format!("reason        {}\n", a.reason));
    }
    if !a.diff.is_empty() {
        text.push_str(&format!("diff\n{}", a.diff));
    }
    crate::output::raw(&text)
}

fn rules_json(r: &ApprovalRules) -> Value {
    json!({
        "required": r.required,
        "expiry_secs": r.expiry_secs,
        "gated": r.gated,
        "gatable": r.gatable,
        "operators": r.operators,
        "warning": (!r.warning.is_empty()).then_some(&r.warning),
    })
}

/// The development operators other than the requester, for tools that make gated changes on
/// a development server (`kms bench`): connected as `operator2` and `operator3` (the requester
/// is `operator1`, or `--as`), they approve each change until it runs.
pub(crate) async fn dev_approvers(conn: &ConnectArgs) -> Result<kms_loadgen::Approvers, Error> {
    let mut clients = Vec::new();
    for name in ["operator1", "operator2", "operator3"] {
        if conn.as_name.as_deref().unwrap_or("operator1") == name {
            continue;
        }
        let mut as_other = conn.clone();
        as_other.as_name = Some(name.into());
        as_other.client_cert = None;
        as_other.client_key = None;
        clients.push(as_other.admin().await?);
    }
    Ok(kms_loadgen::Approvers::new(clients))
}

//! `kms identity`: the inventory of workloads allowed to call the data plane (admin plane).

use api::v1::{
    KeyCoverageRequest, KeyCoverageResponse, ListWorkloadsRequest, RegisterWorkloadRequest,
    UpdateWorkloadRequest, WorkloadInfo, WorkloadRequest,
};
use api::AdminClient;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::approval::emit_change;
use crate::connect::ConnectArgs;
use crate::error::Error;
use crate::input::{now_unix, pairs, when};
use crate::output::{emit, rfc3339};

/// `kms identity`: the inventory of workloads allowed to call the data plane.
#[derive(Subcommand, Debug)]
pub(crate) enum IdentityCommand {
    /// Register a workload (a SPIFFE ID) or a fleet (a SPIFFE ID followed by /*).
    Register(Register),
    /// Change a registration (counts as an owner review).
    Update(Update),
    /// Deactivate a registration: its workloads are refused from the next request.
    Deactivate(Registration),
    /// Make a deactivated registration active again (counts as an owner review; its expiry
    /// still applies).
    Reactivate(Registration),
    /// Show a registration, with its last-seen time and calls by action.
    Describe(Registration),
    /// Report active registrations that need attention: not seen for --stale-days (or never
    /// seen since registration that long ago), expiring within --expiring-days, or without an
    /// owner review for --review-days; and enabled keys that no active registration may use
    /// under the current policies, whatever the request's context.
    Report(Report),
    /// List registrations, a page at a time.
    List(List),
}

#[derive(clap::Args, Debug)]
pub(crate) struct Register {
    /// spiffe://trust-domain/path, or spiffe://trust-domain/path/* for every ID under it.
    selector: String,
    /// The person or team answerable for it.
    #[arg(long)]
    owner: String,
    /// What it is for.
    #[arg(long)]
    purpose: String,
    /// When the registration ends: a duration from now (90d, 12h) or an RFC 3339 time.
    #[arg(long)]
    expires: String,
    /// A label, k=v; repeatable (visible to policy, e.g. --label tier=prod).
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Update {
    /// The registration's selector.
    selector: String,
    /// New owner.
    #[arg(long)]
    owner: Option<String>,
    /// New purpose.
    #[arg(long)]
    purpose: Option<String>,
    /// New expiry: a duration from now or an RFC 3339 time.
    #[arg(long)]
    expires: Option<String>,
    /// Replace all labels with these, k=v; repeatable.
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    /// Remove all labels.
    #[arg(long, conflicts_with = "labels")]
    clear_labels: bool,
}

/// One registration, named by its selector (`deactivate`, `reactivate`, `describe`).
#[derive(clap::Args, Debug)]
pub(crate) struct Registration {
    /// The registration's selector.
    selector: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Report {
    /// Days without a call after which a registration is stale.
    #[arg(long, default_value_t = 30)]
    stale_days: u64,
    /// Report registrations expiring within this many days.
    #[arg(long, default_value_t = 14)]
    expiring_days: u64,
    /// Days after which a registration's owner should review it again.
    #[arg(long, default_value_t = 90)]
    review_days: u64,
    /// Skip the key check (it evaluates each key against each registration until one may
    /// use it, so it is slow for unused keys in a large inventory).
    #[arg(long)]
    skip_keys: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct List {
    /// Only this owner.
    #[arg(long)]
    owner: Option<String>,
    /// Only registrations with this label, k=v.
    #[arg(long)]
    label: Option<String>,
    /// Only registrations expiring before this (duration from now, or RFC 3339 time).
    #[arg(long)]
    expiring_before: Option<String>,
    /// Include deactivated registrations.
    #[arg(long)]
    include_inactive: bool,
    /// Registrations per page (1-1000).
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// Continue from a previous page's next_page_token.
    #[arg(long, default_value = "")]
    page_token: String,
}

pub(crate) async fn run(
    cmd: IdentityCommand,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let mut client = conn.admin().await?;
    match cmd {
        IdentityCommand::Register(c) => c.run(&mut client, as_json).await,
        IdentityCommand::Update(c) => c.run(&mut client, as_json).await,
        IdentityCommand::Deactivate(Registration { selector }) => {
            let w = client.deactivate_workload(WorkloadRequest { selector });
            let w = w.await?.into_inner();
            emit_change(as_json, w.approval.as_ref(), || workload_json(&w))
        }
        IdentityCommand::Reactivate(Registration { selector }) => {
            let w = client.reactivate_workload(WorkloadRequest { selector });
            let w = w.await?.into_inner();
            emit_change(as_json, w.approval.as_ref(), || workload_json(&w))
        }
        IdentityCommand::Describe(Registration { selector }) => {
            let w = client.describe_workload(WorkloadRequest { selector });
            emit(as_json, &workload_json(&w.await?.into_inner()))
        }
        IdentityCommand::Report(c) => c.run(&mut client, as_json).await,
        IdentityCommand::List(c) => c.run(&mut client, as_json).await,
    }
}

impl Register {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self {
            selector,
            owner,
            purpose,
            expires,
            labels,
        } = self;
        let w = client
            .register_workload(RegisterWorkloadRequest {
                selector,
                owner,
                purpose,
                labels: pairs("--label", &labels)?,
                expires_at: when("--expires", &expires)?,
            })
            .await?
            .into_inner();
        emit_change(as_json, w.approval.as_ref(), || workload_json(&w))
    }
}

impl Update {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self {
            selector,
            owner,
            purpose,
            expires,
            labels,
            clear_labels,
        } = self;
        let w = client
            .update_workload(UpdateWorkloadRequest {
                selector,
                owner,
                purpose,
                replace_labels: clear_labels || !labels.is_empty(),
                labels: pairs("--label", &labels)?,
                expires_at: match expires {
                    Some(e) => when("--expires", &e)?,
                    None => 0,
                },
            })
            .await?
            .into_inner();
        emit_change(as_json, w.approval.as_ref(), || workload_json(&w))
    }
}

impl Report {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self {
            stale_days,
            expiring_days,
            review_days,
            skip_keys,
        } = self;
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let r = client
                .list_workloads(ListWorkloadsRequest {
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            all.extend(r.workloads);
            if r.next_page_token.is_empty() {
                break;
            }
            page_token = r.next_page_token;
        }
        let coverage = match skip_keys {
            true => None,
            false => Some(
                client
                    .key_coverage(KeyCoverageRequest::default())
                    .await?
                    .into_inner(),
            ),
        };
        emit(
            as_json,
            &report(
                &all,
                now_unix(),
                stale_days,
                expiring_days,
                review_days,
                coverage.as_ref(),
            ),
        )
    }
}

impl List {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self {
            owner,
            label,
            expiring_before,
            include_inactive,
            page_size,
            page_token,
        } = self;
        let r = client
            .list_workloads(ListWorkloadsRequest {
                page_size,
                page_token,
                owner: owner.unwrap_or_default(),
                label: label.unwrap_or_default(),
                expiring_before: match expiring_before {
                    Some(t) => when("--expiring-before", &t)?,
                    None => 0,
                },
                include_inactive,
            })
            .await?
            .into_inner();
        let list: Vec<Value> = r.workloads.iter().map(workload_json).collect();
        emit(
            as_json,
            &json!({ "workloads": list, "next_page_token": r.next_page_token }),
        )
    }
}

fn workload_json(w: &WorkloadInfo) -> Value {
    json!({
        "selector": w.selector,
        "owner": w.owner,
        "purpose": w.purpose,
        "labels": w.labels,
        "expires_at": rfc3339(w.expires_at),
        "active": w.active,
        "created_at": rfc3339(w.created_at),
        "created_by": w.created_by,
        "updated_at": rfc3339(w.updated_at),
        "updated_by": w.updated_by,
        "reviewed_at": rfc3339(w.reviewed_at),
        "last_seen": rfc3339(w.last_seen),
        "calls": w.calls,
    })
}

/// The attention report over active registrations.
fn report(
    all: &[WorkloadInfo],
    now: u64,
    stale_days: u64,
    expiring_days: u64,
    review_days: u64,
    coverage: Option<&KeyCoverageResponse>,
) -> Value {
    let days = |d: u64| d.saturating_mul(86_400);
    let brief = |w: &WorkloadInfo| {
        json!({
            "selector": w.selector,
            "owner": w.owner,
            "last_seen": rfc3339(w.last_seen),
            "expires_at": rfc3339(w.expires_at),
            "reviewed_at": rfc3339(w.reviewed_at),
        })
    };
    let stale: Vec<Value> = all
        .iter()
        .filter(|w| now.saturating_sub(w.last_seen.max(w.created_at)) >= days(stale_days))
        .map(brief)
        .collect();
    let expiring: Vec<Value> = all
        .iter()
        .filter(|w| w.expires_at.saturating_sub(now) <= days(expiring_days))
        .map(brief)
        .collect();
    let unreviewed: Vec<Value> = all
        .iter()
        .filter(|w| now.saturating_sub(w.reviewed_at) >= days(review_days))
        .map(brief)
        .collect();
    let unusable_keys = coverage.map(|c| {
        c.unusable_keys
            .iter()
            .map(|k| json!({"key_id": k.key_id, "alias": k.alias, "labels": k.labels}))
            .collect::<Vec<_>>()
    });
    json!({
        "active_registrations": all.len(),
        "stale": stale,
        "expiring": expiring,
        "unreviewed": unreviewed,
        "keys_checked": coverage.map(|c| c.keys_checked),
        "unusable_keys": unusable_keys,
    })
}

//! `kms policy`: Cedar policies deciding every data-plane request (admin plane).

use std::path::PathBuf;

use api::v1::{
    GetPolicyRequest, ListPoliciesRequest, PolicyInfo, PolicyRequest, PutPolicyRequest,
    TestPolicyRequest,
};
use api::AdminClient;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::approval::emit_change;
use crate::connect::ConnectArgs;
use crate::error::Error;
use crate::input::{pairs, text_file, when};
use crate::output::{emit, rfc3339};

/// `kms policy`: Cedar policies deciding every data-plane request.
#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCommand {
    /// Store a new version of a policy (validated against the schema with all others first).
    Put(Put),
    /// Print a policy's current (or a given) version.
    // `--version` here is the policy's version, so no auto-generated `--version` flag.
    #[command(disable_version_flag = true)]
    Get(Get),
    /// List policies with their current versions.
    List(List),
    /// Delete a policy (its history is kept).
    Delete(Delete),
    /// Show what changed between two versions, or between the current version and a file.
    Diff(Diff),
    /// Evaluate a request against the current policies and inventory, changing nothing.
    Test(Test),
    /// Print the Cedar schema policies are validated against.
    Schema,
    /// Authorisation times measured inside the server: Cedar evaluations, and every decision
    /// including those reused from the decision cache.
    Stats(Stats),
}

#[derive(clap::Args, Debug)]
pub(crate) struct Put {
    /// Policy id: 1-64 of a-z 0-9 _ -.
    id: String,
    /// Cedar policy file.
    #[arg(long)]
    file: PathBuf,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Get {
    /// Policy id.
    id: String,
    /// Version number; default the current one.
    #[arg(long)]
    version: Option<u32>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct List {
    /// Include deleted policies.
    #[arg(long)]
    include_deleted: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Delete {
    /// Policy id.
    id: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Diff {
    /// Policy id.
    id: String,
    /// Older version; default the one before --to.
    #[arg(long)]
    from: Option<u32>,
    /// Newer version; default the current one.
    #[arg(long, conflicts_with = "file")]
    to: Option<u32>,
    /// Compare the current version with this file instead.
    #[arg(long)]
    file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Test {
    /// The caller's SPIFFE ID.
    #[arg(long)]
    principal: String,
    /// GenerateDataKey, Decrypt, Encrypt or ReEncrypt.
    #[arg(long)]
    action: String,
    /// Key id or alias.
    #[arg(long)]
    key: String,
    /// Encryption context entry, k=v; repeatable.
    #[arg(long = "context", value_name = "K=V")]
    context: Vec<String>,
    /// The caller's declared purpose.
    #[arg(long)]
    purpose: Option<String>,
    /// Evaluate at this time (RFC 3339) instead of now.
    #[arg(long)]
    at: Option<String>,
    /// Authentication method to assume: mtls or jwt.
    #[arg(long, default_value = "mtls", value_parser = ["mtls", "jwt"])]
    auth_method: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Stats {
    /// Start a new measurement after printing.
    #[arg(long)]
    reset: bool,
}

pub(crate) async fn run(
    cmd: PolicyCommand,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    if let PolicyCommand::Schema = cmd {
        return crate::output::raw(kms_core::governance::policy::SCHEMA.trim_start());
    }
    let mut client = conn.admin().await?;
    match cmd {
        PolicyCommand::Put(c) => c.run(&mut client, as_json).await,
        PolicyCommand::Get(c) => c.run(&mut client, as_json).await,
        PolicyCommand::List(c) => c.run(&mut client, as_json).await,
        PolicyCommand::Delete(c) => c.run(&mut client, as_json).await,
        PolicyCommand::Diff(c) => c.run(&mut client, as_json).await,
        PolicyCommand::Test(c) => c.run(&mut client, as_json).await,
        PolicyCommand::Stats(c) => c.run(&mut client, as_json).await,
        PolicyCommand::Schema => Ok(()),
    }
}

impl Stats {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { reset } = self;
        let r = client
            .policy_stats(api::v1::PolicyStatsRequest { reset })
            .await?
            .into_inner();
        let us = |ns: u64| {
            let whole = ns / 1000;
            let frac = ns % 1000 / 10;
            format!("{whole}.{frac:02}")
        };
        emit(
            as_json,
            &json!({
                "evaluations": r.evaluations,
                "cached_decisions": r.cached_decisions,
                "statements": r.statements,
                "p50_us": us(r.p50_ns),
                "p99_us": us(r.p99_ns),
                "p999_us": us(r.p999_ns),
                "max_us": us(r.max_ns),
                "decision_p50_us": us(r.decision_p50_ns),
                "decision_p99_us": us(r.decision_p99_ns),
                "decision_max_us": us(r.decision_max_ns),
            }),
        )
    }
}

impl Put {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { id, file } = self;
        let text = text_file(&file)?;
        let p = client
            .put_policy(PutPolicyRequest { id, text })
            .await?
            .into_inner();
        emit_change(as_json, p.approval.as_ref(), || policy_json(&p))
    }
}

impl Get {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { id, version } = self;
        let p = client
            .get_policy(GetPolicyRequest {
                id,
                version: version.unwrap_or(0),
            })
            .await?
            .into_inner();
        if as_json {
            emit(true, &policy_json(&p))
        } else {
            crate::output::raw(&p.text)
        }
    }
}

impl List {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { include_deleted } = self;
        let r = client
            .list_policies(ListPoliciesRequest { include_deleted })
            .await?
            .into_inner();
        let list: Vec<Value> = r
            .policies
            .iter()
            .map(|p| {
                json!({
                    "id": p.id,
                    "version": p.version,
                    "deleted": p.deleted,
                    "created_at": rfc3339(p.created_at),
                    "created_by": p.created_by,
                })
            })
            .collect();
        emit(as_json, &json!({ "policies": list }))
    }
}

impl Delete {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { id } = self;
        let p = client
            .delete_policy(PolicyRequest { id })
            .await?
            .into_inner();
        emit_change(as_json, p.approval.as_ref(), || policy_json(&p))
    }
}

impl Diff {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { id, from, to, file } = self;
        let get = |version: u32| {
            let mut c = client.clone();
            let id = id.clone();
            async move {
                c.get_policy(GetPolicyRequest { id, version })
                    .await
                    .map(tonic::Response::into_inner)
            }
        };
        let (old_label, old_text, new_label, new_text) = match file {
            Some(path) => {
                let current = get(0).await?;
                (
                    format!("{id} v{}", current.version),
                    current.text,
                    path.display().to_string(),
                    text_file(&path)?,
                )
            }
            None => {
                let newer = get(to.unwrap_or(0)).await?;
                let older_v = match from {
                    Some(v) => v,
                    None if newer.version > 1 => newer.version - 1,
                    None => {
                        return Err(Error::Usage(format!(
                            "policy {id} has only version {}; give --from or --file",
                            newer.version
                        )))
                    }
                };
                let older = get(older_v).await?;
                (
                    format!("{id} v{}", older.version),
                    older.text,
                    format!("{id} v{}", newer.version),
                    newer.text,
                )
            }
        };
        let diff = similar::TextDiff::from_lines(&old_text, &new_text)
            .unified_diff()
            .header(&old_label, &new_label)
            .to_string();
        if as_json {
            emit(
                true,
                &json!({ "from": old_label, "to": new_label, "changed": old_text != new_text, "diff": diff }),
            )
        } else {
            crate::output::raw(&diff)
        }
    }
}

impl Test {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self {
            principal,
            action,
            key,
            context,
            purpose,
            at,
            auth_method,
        } = self;
        let r = client
            .test_policy(TestPolicyRequest {
                principal,
                action,
                key,
                encryption_context: pairs("--context", &context)?,
                purpose: purpose.unwrap_or_default(),
                at: match at {
                    Some(t) => when("--at", &t)?,
                    None => 0,
                },
                auth_method,
            })
            .await?
            .into_inner();
        emit(
            as_json,
            &json!({
                "decision": r.decision,
                "policies": r.policies,
                "identity_denial": if r.identity_denial.is_empty() { Value::Null } else { Value::String(r.identity_denial) },
                "matched_selector": if r.matched_selector.is_empty() { Value::Null } else { Value::String(r.matched_selector) },
                "key_id": r.key_id,
            }),
        )
    }
}

fn policy_json(p: &PolicyInfo) -> Value {
    json!({
        "id": p.id,
        "version": p.version,
        "deleted": p.deleted,
        "created_at": rfc3339(p.created_at),
        "created_by": p.created_by,
        "text": p.text,
    })
}

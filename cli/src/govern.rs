//! `kms trust-bundle`, `kms identity` and `kms policy`: who may call the data plane, on the
//! admin plane.

use std::path::{Path, PathBuf};

use api::v1::{
    GetPolicyRequest, KeyCoverageRequest, KeyCoverageResponse, ListPoliciesRequest,
    ListTrustBundlesRequest, ListWorkloadsRequest, PolicyInfo, PolicyRequest, PutPolicyRequest,
    RegisterWorkloadRequest, SetTrustBundleRequest, TestPolicyRequest, TrustBundle,
    TrustDomainRequest, UpdateWorkloadRequest, WorkloadInfo, WorkloadRequest,
};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::commands::pairs;
use crate::connect::{ConnectArgs, Plane};
use crate::error::{read, Error};
use crate::output::emit;

/// `kms trust-bundle`: the CA certificates of each workload trust domain.
#[derive(Subcommand, Debug)]
pub(crate) enum TrustBundleCommand {
    /// Set (or replace) a trust domain's bundle; applies from the next request.
    Set {
        /// The trust domain, e.g. prod.example.org.
        trust_domain: String,
        /// PEM file with the domain's CA certificates (X.509-SVIDs).
        #[arg(long, required_unless_present = "jwks")]
        file: Option<PathBuf>,
        /// JWKS file with the domain's JWT-SVID signing keys.
        #[arg(long)]
        jwks: Option<PathBuf>,
    },
    /// List trust domains and their bundles.
    List,
    /// Remove a trust domain: its workloads are refused from the next request.
    Remove {
        /// The trust domain.
        trust_domain: String,
    },
}

/// `kms identity`: the inventory of workloads allowed to call the data plane.
#[derive(Subcommand, Debug)]
pub(crate) enum IdentityCommand {
    /// Register a workload (a SPIFFE ID) or a fleet (a SPIFFE ID followed by /*).
    Register {
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
    },
    /// Change a registration (counts as an owner review).
    Update {
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
    },
    /// Deactivate a registration: its workloads are refused from the next request.
    Deactivate {
        /// The registration's selector.
        selector: String,
    },
    /// Show a registration, with its last-seen time and calls by action.
    Describe {
        /// The registration's selector.
        selector: String,
    },
    /// Report active registrations that need attention: not seen for --stale-days (or never
    /// seen since registration that long ago), expiring within --expiring-days, or without an
    /// owner review for --review-days; and enabled keys that no active registration may use
    /// under the current policies, whatever the request's context.
    Report {
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
    },
    /// List registrations, a page at a time.
    List {
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
    },
}

/// `kms policy`: Cedar policies deciding every data-plane request.
#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCommand {
    /// Store a new version of a policy (validated against the schema with all others first).
    Put {
        /// Policy id: 1-64 of a-z 0-9 _ -.
        id: String,
        /// Cedar policy file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Print a policy's current (or a given) version.
    Get {
        /// Policy id.
        id: String,
        /// Version number; default the current one.
        #[arg(long)]
        version: Option<u32>,
    },
    /// List policies with their current versions.
    List {
        /// Include deleted policies.
        #[arg(long)]
        include_deleted: bool,
    },
    /// Delete a policy (its history is kept).
    Delete {
        /// Policy id.
        id: String,
    },
    /// Show what changed between two versions, or between the current version and a file.
    Diff {
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
    },
    /// Evaluate a request against the current policies and inventory, changing nothing.
    Test {
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
    },
    /// Print the Cedar schema policies are validated against.
    Schema,
    /// Authorisation times measured inside the server: Cedar evaluations, and every decision
    /// including those reused from the decision cache.
    Stats {
        /// Start a new measurement after printing.
        #[arg(long)]
        reset: bool,
    },
}

#[expect(
    clippy::disallowed_methods,
    reason = "the CLI turns durations into absolute times"
)]
fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A time given as a duration from now (`90d`) or as an RFC 3339 time.
fn when(flag: &str, s: &str) -> Result<u64, Error> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now_unix().saturating_add(d.as_secs()));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        Error::Usage(format!(
            "{flag} expects a duration (90d, 12h) or an RFC 3339 time, got {s:?}"
        ))
    })?;
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| Error::Usage(format!("{flag}: {s:?} is before 1970")))
}

fn rfc3339(secs: u64) -> Value {
    if secs == 0 {
        return Value::Null;
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    Value::String(humantime::format_rfc3339_seconds(t).to_string())
}

fn bundle_json(b: &TrustBundle) -> Value {
    json!({
        "trust_domain": b.trust_domain,
        "certificates": b.certificates,
        "jwt_keys": b.jwt_keys,
        "updated_at": rfc3339(b.updated_at),
        "updated_by": b.updated_by,
    })
}

pub(crate) fn workload_json(w: &WorkloadInfo) -> Value {
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

fn text_file(path: &Path) -> Result<String, Error> {
    String::from_utf8(read(path)?)
        .map_err(|_| Error::Usage(format!("{} is not UTF-8 text", path.display())))
}

pub(crate) async fn trust_bundle(
    cmd: TrustBundleCommand,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let (addr, tls) = conn.resolve(Plane::Admin)?;
    let mut client = tls.admin(&addr).await?;
    match cmd {
        TrustBundleCommand::Set {
            trust_domain,
            file,
            jwks,
        } => {
            let pem = file
                .as_deref()
                .map(text_file)
                .transpose()?
                .unwrap_or_default();
            let jwks = jwks
                .as_deref()
                .map(text_file)
                .transpose()?
                .unwrap_or_default();
            let b = client
                .set_trust_bundle(SetTrustBundleRequest {
                    trust_domain,
                    pem,
                    jwks,
                })
                .await?
                .into_inner();
            emit(as_json, &bundle_json(&b))
        }
        TrustBundleCommand::List => {
            let r = client
                .list_trust_bundles(ListTrustBundlesRequest {})
                .await?
                .into_inner();
            let bundles: Vec<Value> = r.bundles.iter().map(bundle_json).collect();
            emit(as_json, &json!({ "bundles": bundles }))
        }
        TrustBundleCommand::Remove { trust_domain } => {
            let b = client
                .delete_trust_bundle(TrustDomainRequest { trust_domain })
                .await?
                .into_inner();
            emit(as_json, &bundle_json(&b))
        }
    }
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

pub(crate) async fn identity(
    cmd: IdentityCommand,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let (addr, tls) = conn.resolve(Plane::Admin)?;
    let mut client = tls.admin(&addr).await?;
    let w = match cmd {
        IdentityCommand::Register {
            selector,
            owner,
            purpose,
            expires,
            labels,
        } => client
            .register_workload(RegisterWorkloadRequest {
                selector,
                owner,
                purpose,
                labels: pairs("--label", &labels)?,
                expires_at: when("--expires", &expires)?,
            })
            .await?
            .into_inner(),
        IdentityCommand::Update {
            selector,
            owner,
            purpose,
            expires,
            labels,
            clear_labels,
        } => client
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
            .into_inner(),
        IdentityCommand::Deactivate { selector } => client
            .deactivate_workload(WorkloadRequest { selector })
            .await?
            .into_inner(),
        IdentityCommand::Describe { selector } => client
            .describe_workload(WorkloadRequest { selector })
            .await?
            .into_inner(),
        IdentityCommand::Report {
            stale_days,
            expiring_days,
            review_days,
            skip_keys,
        } => {
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
            return emit(
                as_json,
                &report(
                    &all,
                    now_unix(),
                    stale_days,
                    expiring_days,
                    review_days,
                    coverage.as_ref(),
                ),
            );
        }
        IdentityCommand::List {
            owner,
            label,
            expiring_before,
            include_inactive,
            page_size,
            page_token,
        } => {
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
            return emit(
                as_json,
                &json!({ "workloads": list, "next_page_token": r.next_page_token }),
            );
        }
    };
    emit(as_json, &workload_json(&w))
}

pub(crate) async fn policy(
    cmd: PolicyCommand,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    if let PolicyCommand::Schema = cmd {
        return crate::output::raw(kms_core::governance::policy::SCHEMA.trim_start());
    }
    let (addr, tls) = conn.resolve(Plane::Admin)?;
    let mut client = tls.admin(&addr).await?;
    match cmd {
        PolicyCommand::Schema => Ok(()),
        PolicyCommand::Stats { reset } => {
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
        PolicyCommand::Put { id, file } => {
            let text = text_file(&file)?;
            let p = client
                .put_policy(PutPolicyRequest { id, text })
                .await?
                .into_inner();
            emit(as_json, &policy_json(&p))
        }
        PolicyCommand::Get { id, version } => {
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
        PolicyCommand::List { include_deleted } => {
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
        PolicyCommand::Delete { id } => {
            let p = client
                .delete_policy(PolicyRequest { id })
                .await?
                .into_inner();
            emit(as_json, &policy_json(&p))
        }
        PolicyCommand::Diff { id, from, to, file } => {
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
        PolicyCommand::Test {
            principal,
            action,
            key,
            context,
            purpose,
            at,
            auth_method,
        } => {
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
}

/// `kms grant`: short-lived task grants. `create` and `revoke` run on the data plane as the
/// creating workload; `list` and `revoke-all` on the admin plane as an operator.
#[derive(Subcommand, Debug)]
pub(crate) enum GrantCommand {
    /// Mint a grant for another workload; prints its id and token (a secret: hand it to the
    /// grantee only).
    Create {
        /// The grantee's SPIFFE ID.
        #[arg(long)]
        grantee: String,
        /// Key id or alias.
        #[arg(long)]
        key: String,
        /// An operation to allow: GenerateDataKey, Decrypt, Encrypt or ReEncrypt; repeatable.
        #[arg(long = "op", required = true)]
        operations: Vec<String>,
        /// An encryption-context entry every use must carry, k=v; repeatable.
        #[arg(long = "require-context", value_name = "K=V")]
        required_context: Vec<String>,
        /// Time to live (e.g. 15m); default and maximum are the server's (one hour unless
        /// configured).
        #[arg(long)]
        ttl: Option<String>,
        /// At most this many uses.
        #[arg(long)]
        max_uses: Option<u64>,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        token_out: Option<PathBuf>,
    },
    /// Revoke a grant you created (by id), or all of them.
    Revoke {
        /// The grant's id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        grant_id: Option<String>,
        /// Every grant you created.
        #[arg(long)]
        all: bool,
    },
    /// List grants (admin plane).
    List {
        /// Only grants by this creator.
        #[arg(long)]
        creator: Option<String>,
        /// Only grants for this grantee.
        #[arg(long)]
        grantee: Option<String>,
        /// Only grants on this key (id or alias).
        #[arg(long)]
        key: Option<String>,
        /// Include revoked and expired grants.
        #[arg(long)]
        include_inactive: bool,
    },
    /// Revoke grants as an operator (admin plane): one by id, all by a creator, or all on a key.
    RevokeAll {
        /// One grant.
        #[arg(long, group = "which")]
        id: Option<String>,
        /// Every grant this workload created.
        #[arg(long, group = "which")]
        creator: Option<String>,
        /// Every grant on this key (id or alias).
        #[arg(long, group = "which")]
        key: Option<String>,
    },
}

pub(crate) async fn grant(
    cmd: GrantCommand,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    use api::v1::{CreateGrantRequest, ListGrantsRequest, RevokeGrantRequest, RevokeGrantsRequest};
    match cmd {
        GrantCommand::Create {
            grantee,
            key,
            operations,
            required_context,
            ttl,
            max_uses,
            token_out,
        } => {
            let ttl_seconds = match ttl {
                None => 0,
                Some(t) => {
                    let d = humantime::parse_duration(&t).map_err(|_| {
                        Error::Usage(format!("--ttl expects a duration (15m, 1h), got {t:?}"))
                    })?;
                    u32::try_from(d.as_secs())
                        .map_err(|_| Error::Usage("--ttl is too long".into()))?
                }
            };
            let (addr, tls) = conn.resolve(Plane::Data)?;
            let mut client = tls.data(&addr).await?;
            let r = client
                .create_grant(CreateGrantRequest {
                    grantee,
                    key,
                    operations,
                    required_context: pairs("--require-context", &required_context)?,
                    ttl_seconds,
                    max_uses: max_uses.unwrap_or(0),
                })
                .await?
                .into_inner();
            let mut out = serde_json::Map::new();
            out.insert("grant_id".into(), r.grant_id.clone().into());
            out.insert("key_id".into(), r.key_id.clone().into());
            out.insert("expires_at".into(), rfc3339(r.expires_at));
            let mut token = r.token;
            match token_out {
                Some(path) => {
                    crate::error::write_private(&path, token.as_bytes())?;
                    out.insert(
                        "token".into(),
                        format!("written to {}", path.display()).into(),
                    );
                }
                None => {
                    out.insert("token".into(), token.clone().into());
                }
            }
            zeroize::Zeroize::zeroize(&mut token);
            emit(as_json, &Value::Object(out))
        }
        GrantCommand::Revoke { grant_id, all } => {
            let (addr, tls) = conn.resolve(Plane::Data)?;
            let mut client = tls.data(&addr).await?;
            let r = client
                .revoke_grant(RevokeGrantRequest {
                    grant_id: grant_id.unwrap_or_default(),
                    all,
                })
                .await?
                .into_inner();
            emit(as_json, &json!({ "revoked": r.revoked }))
        }
        GrantCommand::List {
            creator,
            grantee,
            key,
            include_inactive,
        } => {
            let (addr, tls) = conn.resolve(Plane::Admin)?;
            let mut client = tls.admin(&addr).await?;
            let r = client
                .list_grants(ListGrantsRequest {
                    creator: creator.unwrap_or_default(),
                    grantee: grantee.unwrap_or_default(),
                    key: key.unwrap_or_default(),
                    include_inactive,
                })
                .await?
                .into_inner();
            let grants: Vec<Value> = r
                .grants
                .iter()
                .map(|g| {
                    json!({
                        "grant_id": g.grant_id,
                        "creator": g.creator,
                        "grantee": g.grantee,
                        "key_id": g.key_id,
                        "operations": g.operations,
                        "required_context": g.required_context,
                        "created_at": rfc3339(g.created_at),
                        "expires_at": rfc3339(g.expires_at),
                        "max_uses": if g.max_uses == 0 { Value::Null } else { g.max_uses.into() },
                        "uses": g.uses,
                        "revoked_at": rfc3339(g.revoked_at),
                        "revoked_by": if g.revoked_by.is_empty() { Value::Null } else { g.revoked_by.clone().into() },
                    })
                })
                .collect();
            emit(as_json, &json!({ "grants": grants }))
        }
        GrantCommand::RevokeAll { id, creator, key } => {
            if id.is_none() && creator.is_none() && key.is_none() {
                return Err(Error::Usage("give one of --id, --creator or --key".into()));
            }
            let (addr, tls) = conn.resolve(Plane::Admin)?;
            let mut client = tls.admin(&addr).await?;
            let r = client
                .revoke_grants(RevokeGrantsRequest {
                    grant_id: id.unwrap_or_default(),
                    creator: creator.unwrap_or_default(),
                    key: key.unwrap_or_default(),
                })
                .await?
                .into_inner();
            emit(as_json, &json!({ "revoked": r.revoked }))
        }
    }
}

//! `kms grant`: short-lived task grants. `create` and `revoke` run on the data plane as the
//! creating workload; `list` and `revoke-all` on the admin plane as an operator.

use std::path::PathBuf;

use api::v1::{CreateGrantRequest, ListGrantsRequest, RevokeGrantRequest, RevokeGrantsRequest};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::connect::{ConnectArgs, Plane};
use crate::error::Error;
use crate::input::pairs;
use crate::output::{emit, rfc3339};

/// `kms grant`: short-lived task grants. `create` and `revoke` run on the data plane as the
/// creating workload; `list` and `revoke-all` on the admin plane as an operator.
#[derive(Subcommand, Debug)]
pub(crate) enum GrantCommand {
    /// Mint a grant for another workload; prints its id and token (a secret: hand it to the
    /// grantee only).
    Create(Create),
    /// Revoke a grant you created (by id), or all of them.
    Revoke(Revoke),
    /// List grants (admin plane).
    List(List),
    /// Revoke grants as an operator (admin plane): one by id, all by a creator, or all on a key.
    RevokeAll(RevokeAll),
}

#[derive(clap::Args, Debug)]
pub(crate) struct Create {
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
}

#[derive(clap::Args, Debug)]
pub(crate) struct Revoke {
    /// The grant's id.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    grant_id: Option<String>,
    /// Every grant you created.
    #[arg(long)]
    all: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct List {
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
}

#[derive(clap::Args, Debug)]
pub(crate) struct RevokeAll {
    /// One grant.
    #[arg(long, group = "which")]
    id: Option<String>,
    /// Every grant this workload created.
    #[arg(long, group = "which")]
    creator: Option<String>,
    /// Every grant on this key (id or alias).
    #[arg(long, group = "which")]
    key: Option<String>,
}

pub(crate) async fn run(cmd: GrantCommand, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    match cmd {
        GrantCommand::Create(c) => c.run(conn, as_json).await,
        GrantCommand::Revoke(c) => c.run(conn, as_json).await,
        GrantCommand::List(c) => c.run(conn, as_json).await,
        GrantCommand::RevokeAll(c) => c.run(conn, as_json).await,
    }
}

impl Create {
    async fn run(self, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
        let Self {
            grantee,
            key,
            operations,
            required_context,
            ttl,
            max_uses,
            token_out,
        } = self;
        let ttl_seconds = match ttl {
            None => 0,
            Some(t) => {
                let d = humantime::parse_duration(&t).map_err(|_| {
                    Error::Usage(format!("--ttl expects a duration (15m, 1h), got {t:?}"))
                })?;
                u32::try_from(d.as_secs()).map_err(|_| Error::Usage("--ttl is too long".into()))?
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
        let mut r = r;
        let mut out = serde_json::Map::new();
        out.insert("grant_id".into(), r.grant_id.clone().into());
        out.insert("key_id".into(), r.key_id.clone().into());
        out.insert("expires_at".into(), rfc3339(r.expires_at));
        let mut token = std::mem::take(&mut r.token);
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
}

impl Revoke {
    async fn run(self, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
        let Self { grant_id, all } = self;
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
}

impl List {
    async fn run(self, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
        let Self {
            creator,
            grantee,
            key,
            include_inactive,
        } = self;
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
}

impl RevokeAll {
    async fn run(self, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
        let Self { id, creator, key } = self;
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

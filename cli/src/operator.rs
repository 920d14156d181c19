//! `kms operator`: the operator inventory (admin plane). Register, update and deactivate are
//! gated by approvals; list, describe and whoami are reads.

use std::path::PathBuf;

use api::v1::{
    ListOperatorsRequest, OperatorInfo, OperatorRequest, RegisterOperatorRequest,
    UpdateOperatorRequest, WhoAmIRequest,
};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::approval::emit_change;
use crate::connect::ConnectArgs;
use crate::error::Error;
use crate::input::when;
use crate::output::{emit, rfc3339};

/// `kms operator`.
#[derive(Subcommand, Debug)]
pub(crate) enum OperatorCommand {
    /// Register an operator certificate's identity with a name, owner, roles and expiry
    /// (gated).
    Register(Register),
    /// Change an operator's owner, roles or expiry (gated).
    Update(Update),
    /// Deactivate an operator: its certificate is refused from the next request (gated).
    Deactivate(Name),
    /// One operator's registration.
    Describe(Name),
    /// Every registered operator.
    List(List),
    /// The registration of the certificate this command presents.
    Whoami,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Register {
    /// Unique name: 1-64 of a-z 0-9 _ - .
    name: String,
    /// The certificate's identity: its URI SAN, or `x509-sha256:<hex>`.
    #[arg(long, required_unless_present = "cert", conflicts_with = "cert")]
    identity: Option<String>,
    /// The certificate (PEM) whose identity to register, taken as the admin plane takes it.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// The person or team answerable for it.
    #[arg(long)]
    owner: String,
    /// operator or auditor; repeatable.
    #[arg(long = "role", value_parser = ["operator", "auditor"], required = true)]
    roles: Vec<String>,
    /// End of the registration: a duration from now (90d) or an RFC 3339 time.
    #[arg(long, default_value = "365d")]
    expires: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Update {
    /// The operator's name.
    name: String,
    /// New owner.
    #[arg(long)]
    owner: Option<String>,
    /// New roles (replacing all); repeatable.
    #[arg(long = "role", value_parser = ["operator", "auditor"])]
    roles: Vec<String>,
    /// New expiry: a duration from now or an RFC 3339 time.
    #[arg(long)]
    expires: Option<String>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Name {
    /// The operator's name.
    name: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct List {
    /// Include deactivated operators.
    #[arg(long)]
    include_inactive: bool,
}

pub(crate) async fn run(
    cmd: OperatorCommand,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let mut client = conn.admin().await?;
    match cmd {
        OperatorCommand::Register(r) => {
            let o = client.register_operator(r.request()?).await?.into_inner();
            emit_change(as_json, o.approval.as_ref(), || operator_json(&o))
        }
        OperatorCommand::Update(Update {
            name,
            owner,
            roles,
            expires,
        }) => {
            let o = client
                .update_operator(UpdateOperatorRequest {
                    name,
                    owner,
                    roles,
                    expires_at: match expires {
                        Some(e) => when("--expires", &e)?,
                        None => 0,
                    },
                })
                .await?
                .into_inner();
            emit_change(as_json, o.approval.as_ref(), || operator_json(&o))
        }
        OperatorCommand::Deactivate(Name { name }) => {
            let o = client
                .deactivate_operator(OperatorRequest { name })
                .await?
                .into_inner();
            emit_change(as_json, o.approval.as_ref(), || operator_json(&o))
        }
        OperatorCommand::Describe(Name { name }) => {
            let o = client
                .describe_operator(OperatorRequest { name })
                .await?
                .into_inner();
            emit(as_json, &operator_json(&o))
        }
        OperatorCommand::List(List { include_inactive }) => {
            let r = client
                .list_operators(ListOperatorsRequest { include_inactive })
                .await?
                .into_inner();
            print_list(&r.operators, as_json)
        }
        OperatorCommand::Whoami => {
            let o = client.who_am_i(WhoAmIRequest {}).await?.into_inner();
            emit(as_json, &operator_json(&o))
        }
    }
}

impl Register {
    /// The request, with the identity read from `--cert` when it is not given.
    fn request(self) -> Result<RegisterOperatorRequest, Error> {
        let identity = match (self.identity, self.cert) {
            (Some(id), _) => id,
            (None, Some(path)) => kms_deployment::seed::operator_identity_of(&path)?.to_string(),
            (None, None) => return Err(Error::Usage("give --identity or --cert".into())),
        };
        Ok(RegisterOperatorRequest {
            name: self.name,
            identity,
            owner: self.owner,
            roles: self.roles,
            expires_at: when("--expires", &self.expires)?,
        })
    }
}

fn print_list(operators: &[OperatorInfo], as_json: bool) -> Result<(), Error> {
    if as_json {
        for o in operators {
            emit(true, &operator_json(o))?;
        }
        return Ok(());
    }
    for o in operators {
        crate::output::raw(&format!(
            "{:16}  {:16}  {}  {}  {}\n",
            o.name,
            o.roles.join(","),
            if o.active { "active  " } else { "inactive" },
            rfc3339(o.expires_at).as_str().unwrap_or("-"),
            o.identity
        ))?;
    }
    Ok(())
}

fn operator_json(o: &OperatorInfo) -> Value {
    json!({
        "name": o.name,
        "identity": o.identity,
        "owner": o.owner,
        "roles": o.roles,
        "active": o.active,
        "expires_at": rfc3339(o.expires_at),
        "created_at": rfc3339(o.created_at),
        "created_by": o.created_by,
        "updated_at": rfc3339(o.updated_at),
        "updated_by": o.updated_by,
    })
}

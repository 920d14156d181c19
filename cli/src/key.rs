//! `kms key`: key lifecycle on the admin plane.

use std::path::PathBuf;

use api::v1::{
    CreateAliasRequest, CreateKeyRequest, KeyMetadata, KeyRequest, ListKeysRequest,
    ScheduleKeyDestructionRequest,
};
use api::AdminClient;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::approval::emit_change;
use crate::connect::ConnectArgs;
use crate::error::{write_public, Error};
use crate::input::pairs;
use crate::output::{emit, rfc3339};

/// `kms key`: key lifecycle on the admin plane.
#[derive(Subcommand, Debug)]
pub(crate) enum KeyCommand {
    /// Create a key. Prints its metadata, including key_id.
    Create(Create),
    /// Show a key's metadata.
    Describe(Describe),
    /// List keys, a page at a time.
    List(List),
    /// Add a version; new encryptions use it and old versions still decrypt.
    Rotate(Rotate),
    /// Disable a key: no cryptographic operation is allowed until it is enabled again.
    Disable(Disable),
    /// Enable a disabled key.
    Enable(Enable),
    /// Point an alias at a key (replacing the key's previous alias).
    Alias(Alias),
    /// Ask to destroy a key after a waiting period (a gated change: prints the pending
    /// approval). Once it runs, the key refuses every cryptographic operation; when the
    /// period ends, the server deletes every version's material and signs a receipt.
    ScheduleDestroy(ScheduleDestroy),
    /// Cancel a scheduled destruction: the key returns to disabled (one operator is enough).
    CancelDestroy(CancelDestroy),
    /// Write a destroyed key's signed destruction receipt (check it with `kms audit
    /// verify-receipt`).
    DestructionReceipt(DestructionReceipt),
}

#[derive(clap::Args, Debug)]
pub(crate) struct ScheduleDestroy {
    /// Key id or alias.
    key: String,
    /// Days between the change's approval and the deletion: at least the server's
    /// `[keys] min_destroy_waiting_days` (default 7), at most 365.
    #[arg(long, value_name = "N")]
    waiting_days: u32,
}

#[derive(clap::Args, Debug)]
pub(crate) struct CancelDestroy {
    /// Key id or alias.
    key: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct DestructionReceipt {
    /// Key id or alias.
    key: String,
    /// Write the receipt to this file (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Create {
    /// Unique alias for the key.
    #[arg(long)]
    alias: Option<String>,
    /// Where the key's material lives: software (unwrapped in memory) or hsm (in the token).
    #[arg(long, default_value = "software", value_parser = ["software", "hsm"])]
    protection: String,
    /// A label, k=v; repeatable (e.g. --label owner=payments --label sensitivity=high).
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Describe {
    /// Key id or alias.
    key: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct List {
    /// Keys per page (1-1000).
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// Continue from a previous page's next_page_token.
    #[arg(long, default_value = "")]
    page_token: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Rotate {
    /// Key id or alias.
    key: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Disable {
    /// Key id or alias.
    key: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Enable {
    /// Key id or alias.
    key: String,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Alias {
    /// The alias.
    alias: String,
    /// Key id or alias of the target key.
    key: String,
}

pub(crate) async fn run(cmd: KeyCommand, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let mut client = conn.admin().await?;
    match cmd {
        KeyCommand::Create(c) => c.run(&mut client, as_json).await,
        KeyCommand::Describe(c) => c.run(&mut client, as_json).await,
        KeyCommand::List(c) => c.run(&mut client, as_json).await,
        KeyCommand::Rotate(c) => c.run(&mut client, as_json).await,
        KeyCommand::Disable(c) => c.run(&mut client, as_json).await,
        KeyCommand::Enable(c) => c.run(&mut client, as_json).await,
        KeyCommand::Alias(c) => c.run(&mut client, as_json).await,
        KeyCommand::ScheduleDestroy(c) => c.run(&mut client, as_json).await,
        KeyCommand::CancelDestroy(c) => c.run(&mut client, as_json).await,
        KeyCommand::DestructionReceipt(c) => c.run(&mut client, as_json).await,
    }
}

impl ScheduleDestroy {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { key, waiting_days } = self;
        let meta = client
            .schedule_key_destruction(ScheduleKeyDestructionRequest { key, waiting_days })
            .await?
            .into_inner();
        emit_change(as_json, meta.approval.as_ref(), || metadata_json(&meta))
    }
}

impl CancelDestroy {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { key } = self;
        let meta = client.cancel_key_destruction(KeyRequest { key }).await?;
        emit(as_json, &metadata_json(meta.get_ref()))
    }
}

impl DestructionReceipt {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { key, out } = self;
        let r = client
            .get_destruction_receipt(KeyRequest { key })
            .await?
            .into_inner();
        match out {
            Some(path) => {
                write_public(&path, r.receipt.as_bytes())?;
                emit(
                    as_json,
                    &json!({ "key_id": r.key_id, "receipt": path.display().to_string() }),
                )
            }
            None => crate::output::raw(&r.receipt),
        }
    }
}

impl Create {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self {
            alias,
            protection,
            labels,
        } = self;
        let protection = match protection.as_str() {
            "hsm" => api::v1::Protection::Hsm,
            _ => api::v1::Protection::Software,
        };
        let meta = client
            .create_key(CreateKeyRequest {
                alias: alias.unwrap_or_default(),
                protection: protection.into(),
                labels: pairs("--label", &labels)?,
            })
            .await?;
        emit(as_json, &metadata_json(meta.get_ref()))
    }
}

impl Describe {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { key } = self;
        let meta = client.describe_key(KeyRequest { key }).await?;
        emit(as_json, &metadata_json(meta.get_ref()))
    }
}

impl Rotate {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { key } = self;
        let meta = client.rotate_key(KeyRequest { key }).await?;
        emit(as_json, &metadata_json(meta.get_ref()))
    }
}

impl Disable {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { key } = self;
        let meta = client.disable_key(KeyRequest { key }).await?;
        emit(as_json, &metadata_json(meta.get_ref()))
    }
}

impl Enable {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { key } = self;
        let meta = client.enable_key(KeyRequest { key }).await?;
        emit(as_json, &metadata_json(meta.get_ref()))
    }
}

impl Alias {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { alias, key } = self;
        let meta = client
            .create_alias(CreateAliasRequest { alias, key })
            .await?;
        emit(as_json, &metadata_json(meta.get_ref()))
    }
}

impl List {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self {
            page_size,
            page_token,
        } = self;
        let page = client
            .list_keys(ListKeysRequest {
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        let keys: Vec<Value> = page.keys.iter().map(metadata_json).collect();
        emit(
            as_json,
            &json!({ "keys": keys, "next_page_token": page.next_page_token }),
        )
    }
}

fn metadata_json(m: &KeyMetadata) -> Value {
    let protection = match api::v1::Protection::try_from(m.protection) {
        Ok(api::v1::Protection::Hsm) => "hsm",
        _ => "software",
    };
    let state = match api::v1::KeyState::try_from(m.state) {
        Ok(api::v1::KeyState::Enabled) => "enabled",
        Ok(api::v1::KeyState::Disabled) => "disabled",
        Ok(api::v1::KeyState::PendingDestruction) => "pending_destruction",
        Ok(api::v1::KeyState::Destroyed) => "destroyed",
        _ => "unknown",
    };
    let destruction = m.destruction.as_ref().map_or(Value::Null, |d| {
        json!({
            "scheduled_at": d.scheduled_at,
            "destroy_at": d.destroy_at,
            "destroyed_at": if d.destroyed_at == 0 { Value::Null } else { d.destroyed_at.into() },
            "requested_by": d.requested_by,
            "approvers": d.approvers,
            "approval_id": if d.approval_id.is_empty() { Value::Null } else { Value::String(d.approval_id.clone()) },
            "receipt": d.receipt,
        })
    });
    json!({
        "key_id": m.key_id,
        "alias": if m.alias.is_empty() { Value::Null } else { Value::String(m.alias.clone()) },
        "labels": m.labels,
        "protection": protection,
        "state": state,
        "current_version": m.current_version,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "destroy_at": m.destruction.as_ref().map_or(Value::Null, |d| rfc3339(d.destroy_at)),
        "destruction": destruction,
    })
}

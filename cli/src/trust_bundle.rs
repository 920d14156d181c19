//! `kms trust-bundle`: the CA certificates and JWKS of each workload trust domain (admin plane).

use std::path::PathBuf;

use api::v1::{ListTrustBundlesRequest, SetTrustBundleRequest, TrustBundle, TrustDomainRequest};
use api::AdminClient;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::approval::emit_change;
use crate::connect::ConnectArgs;
use crate::error::Error;
use crate::input::text_file;
use crate::output::{emit, rfc3339};

/// `kms trust-bundle`: the CA certificates of each workload trust domain.
#[derive(Subcommand, Debug)]
pub(crate) enum TrustBundleCommand {
    /// Set (or replace) a trust domain's bundle; applies from the next request.
    Set(Set),
    /// List trust domains and their bundles.
    List,
    /// Remove a trust domain: its workloads are refused from the next request.
    Remove(Remove),
}

#[derive(clap::Args, Debug)]
pub(crate) struct Set {
    /// The trust domain, e.g. prod.example.org.
    trust_domain: String,
    /// PEM file with the domain's CA certificates (X.509-SVIDs).
    #[arg(long, required_unless_present = "jwks")]
    file: Option<PathBuf>,
    /// JWKS file with the domain's JWT-SVID signing keys.
    #[arg(long)]
    jwks: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Remove {
    /// The trust domain.
    trust_domain: String,
}

pub(crate) async fn run(
    cmd: TrustBundleCommand,
    conn: &ConnectArgs,
    as_json: bool,
) -> Result<(), Error> {
    let mut client = conn.admin().await?;
    match cmd {
        TrustBundleCommand::Set(c) => c.run(&mut client, as_json).await,
        TrustBundleCommand::Remove(c) => c.run(&mut client, as_json).await,
        TrustBundleCommand::List => list(&mut client, as_json).await,
    }
}

impl Set {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self {
            trust_domain,
            file,
            jwks,
        } = self;
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
        emit_change(as_json, b.approval.as_ref(), || bundle_json(&b))
    }
}

impl Remove {
    async fn run(self, client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
        let Self { trust_domain } = self;
        let b = client
            .delete_trust_bundle(TrustDomainRequest { trust_domain })
            .await?
            .into_inner();
        emit_change(as_json, b.approval.as_ref(), || bundle_json(&b))
    }
}

async fn list(client: &mut AdminClient, as_json: bool) -> Result<(), Error> {
    let r = client
        .list_trust_bundles(ListTrustBundlesRequest {})
        .await?
        .into_inner();
    let bundles: Vec<Value> = r.bundles.iter().map(bundle_json).collect();
    emit(as_json, &json!({ "bundles": bundles }))
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

//! How client commands find a server: by default the development directory (`./.kms`) that
//! `kms serve --dev` created, with its endpoints file and certificates; every part can be
//! given explicitly instead.

use std::path::PathBuf;

use api::ClientTls;
use clap::Args;
use kms_deployment::dev::DevLayout;

use crate::error::{read, Error};

/// Connection options shared by client commands.
#[derive(Args, Debug, Clone)]
pub(crate) struct ConnectArgs {
    /// Directory of a `kms serve --dev` instance: endpoints and dev certificates come from it.
    #[arg(long, global = true, default_value = ".kms", env = "KMS_DATA_DIR")]
    pub(crate) data_dir: PathBuf,
    /// Server address (host:port); defaults to the one the dev server recorded.
    #[arg(long, global = true, env = "KMS_SERVER")]
    pub(crate) server: Option<String>,
    /// Client certificate (PEM); defaults to the dev workload certificate on the data plane
    /// and to `operator1`'s on the admin plane.
    #[arg(long, global = true, requires = "client_key")]
    pub(crate) client_cert: Option<PathBuf>,
    /// Act as NAME: use DATA_DIR/pki/NAME.pem and NAME.key as the client certificate (the dev
    /// operators are operator1, operator2, operator3 and auditor).
    #[arg(long = "as", value_name = "NAME", global = true, conflicts_with_all = ["client_cert", "client_key"])]
    pub(crate) as_name: Option<String>,
    /// Client private key (PEM).
    #[arg(long, global = true, requires = "client_cert")]
    pub(crate) client_key: Option<PathBuf>,
    /// CA certificate that issued the server certificate.
    #[arg(long, global = true)]
    pub(crate) server_ca: Option<PathBuf>,
    /// Name the server certificate must carry.
    #[arg(long, global = true, default_value = "localhost")]
    pub(crate) server_name: String,
}

/// Which plane a command talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plane {
    Admin,
    Data,
}

impl ConnectArgs {
    /// Runs one admin-plane call from a command that otherwise needs no async runtime (the
    /// ceremonies, which run before one exists).
    pub(crate) fn admin_call<T, F>(
        &self,
        call: impl FnOnce(api::AdminClient) -> F,
    ) -> Result<T, Error>
    where
        F: std::future::Future<Output = Result<T, Error>>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::File {
                what: "cannot start the async runtime for",
                path: "the admin client".into(),
                source,
            })?;
        runtime.block_on(async {
            let client = self.admin().await?;
            call(client).await
        })
    }

    /// The address and server trust for `plane`, with no client certificate (for a workload
    /// authenticating with a JWT-SVID).
    pub(crate) fn resolve_without_certificate(
        &self,
        plane: Plane,
    ) -> Result<(String, ClientTls), Error> {
        let layout = DevLayout::new(self.data_dir.clone());
        let addr = match &self.server {
            Some(s) => s.clone(),
            None => recorded_addr(&layout, plane)?,
        };
        let ca = self
            .server_ca
            .clone()
            .unwrap_or_else(|| layout.pki("server-ca.pem"));
        Ok((
            addr,
            ClientTls {
                server_ca_pem: read(&ca)?,
                cert_pem: Vec::new(),
                key_pem: Vec::new(),
                server_name: self.server_name.clone(),
            },
        ))
    }

    /// The address and TLS material for `plane`.
    /// A client of the admin plane, with this invocation's certificate.
    pub(crate) async fn admin(&self) -> Result<api::AdminClient, Error> {
        let (addr, tls) = self.resolve(Plane::Admin)?;
        Ok(tls.admin(&addr).await?)
    }

    pub(crate) fn resolve(&self, plane: Plane) -> Result<(String, ClientTls), Error> {
        let layout = DevLayout::new(self.data_dir.clone());
        let addr = match &self.server {
            Some(s) => s.clone(),
            None => recorded_addr(&layout, plane)?,
        };
        let who = match (plane, &self.as_name) {
            // The names `kms dev issue-operator` gives certificates: no path can be built
            // from one.
            (_, Some(name)) => {
                if name
                    .parse::<kms_core::governance::operators::OperatorName>()
                    .is_err()
                {
                    return Err(Error::Usage(format!(
                        "--as {name:?}: a certificate name (1-64 of a-z 0-9 _ - ., starting \
                         with a letter or digit) under {}",
                        layout.pki("").display()
                    )));
                }
                name.as_str()
            }
            (Plane::Admin, None) => "operator1",
            (Plane::Data, None) => "workload",
        };
        let cert = self
            .client_cert
            .clone()
            .unwrap_or_else(|| layout.pki(&format!("{who}.pem")));
        let key = self
            .client_key
            .clone()
            .unwrap_or_else(|| layout.pki(&format!("{who}.key")));
        if let Some(name) = &self.as_name {
            if !cert.exists() {
                return Err(Error::Usage(format!(
                    "--as {name}: {} does not exist (on a dev server, `kms dev issue-operator \
                     {name}` makes it)",
                    cert.display()
                )));
            }
        }
        let ca = self
            .server_ca
            .clone()
            .unwrap_or_else(|| layout.pki("server-ca.pem"));
        Ok((
            addr,
            ClientTls {
                server_ca_pem: read(&ca)?,
                cert_pem: read(&cert)?,
                key_pem: read(&key)?,
                server_name: self.server_name.clone(),
            },
        ))
    }
}

fn recorded_addr(layout: &DevLayout, plane: Plane) -> Result<String, Error> {
    layout.recorded_addr(match plane {
        Plane::Admin => "admin",
        Plane::Data => "data",
    })
}

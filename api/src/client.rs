//! Client types for the two planes: an mTLS channel with the caller's certificate.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::v1::admin_client::AdminClient as GenAdmin;
use crate::v1::data_plane_client::DataPlaneClient;

/// PEM material a client presents and trusts.
#[derive(Clone)]
pub struct ClientTls {
    /// CA certificate(s) that issued the server certificate.
    pub server_ca_pem: Vec<u8>,
    /// The client's certificate chain; empty for none (a data-plane caller presenting a
    /// JWT-SVID instead).
    pub cert_pem: Vec<u8>,
    /// The client's private key. Redacted from `Debug`.
    pub key_pem: Vec<u8>,
    /// Name the server certificate must carry (e.g. `localhost`).
    pub server_name: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Connecting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The address is not a valid URI.
    #[error("invalid server address {addr:?}")]
    Address {
        /// The address.
        addr: String,
    },
    /// TLS set-up or the connection itself failed.
    #[error("cannot connect to {addr}")]
    Transport {
        /// The address.
        addr: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

async fn channel(addr: &str, tls: &ClientTls) -> Result<Channel, ConnectError> {
    let uri = format!("https://{addr}");
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.server_ca_pem))
        .domain_name(tls.server_name.clone());
    // No certificate: a data-plane caller authenticating with a JWT-SVID instead.
    if !tls.cert_pem.is_empty() {
        config = config.identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
    }
    let transport = |source| ConnectError::Transport {
        addr: addr.to_owned(),
        source,
    };
    Endpoint::from_shared(uri)
        .map_err(|_| ConnectError::Address {
            addr: addr.to_owned(),
        })?
        .tls_config(config)
        .map_err(transport)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_adaptive_window(true)
        .connect()
        .await
        .map_err(transport)
}

/// A data-plane client.
pub type DataClient = DataPlaneClient<Channel>;
/// An admin-plane client.
pub type AdminClient = GenAdmin<Channel>;

impl ClientTls {
    /// Connects to the data plane at `addr` (`host:port`).
    pub async fn data(&self, addr: &str) -> Result<DataClient, ConnectError> {
        Ok(DataPlaneClient::new(channel(addr, self).await?))
    }

    /// Connects to the admin plane at `addr` (`host:port`).
    pub async fn admin(&self, addr: &str) -> Result<AdminClient, ConnectError> {
        Ok(GenAdmin::new(channel(addr, self).await?))
    }

    /// A channel to `addr`, for callers that build their own clients (health, several stubs).
    pub async fn channel(&self, addr: &str) -> Result<Channel, ConnectError> {
        channel(addr, self).await
    }
}

//! The one error type of the server crate: start-up failures. Request failures are mapped to
//! gRPC statuses per plane (`data::to_status`, `admin::to_status`).

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listener could not bind.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Metrics were asked for on an address other than loopback, where they would be served
    /// in plain HTTP to anyone who can reach it.
    #[error(
        "{addr} is not a loopback address: metrics are served there only over TLS, with \
         [listen] metrics_client_ca naming the scrapers' CA"
    )]
    MetricsNotLoopback {
        /// The address.
        addr: SocketAddr,
    },
    /// A PEM file could not be read or held nothing usable.
    #[error("cannot use {what} from {}", path.display())]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause, when there is one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("tls configuration for the {plane} plane")]
    Tls {
        /// Which plane.
        plane: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The gRPC server failed.
    #[error("{plane} plane server")]
    Serve {
        /// Which plane.
        plane: &'static str,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// gRPC reflection could not be built from the descriptor set.
    #[error("grpc reflection")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The store could not be read at start.
    #[error("reading the store")]
    Core(#[source] kms_core::Error),
    /// A stored trust bundle is unusable.
    #[error("trust bundle")]
    TrustBundle(#[source] crate::authn::BadBundle),
}

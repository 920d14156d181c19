//! TLS for the two listeners: TLS 1.3 only. The admin plane requires a client certificate from
//! the operator CA; the data plane asks for one and leaves trusting it to each request.
//! Handshakes run in their own tasks so a slow client cannot stall accepts.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::authn::ProofOfPossession;
use crate::error::Error;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first pause after a failed accept (for example out of file descriptors); each further
/// failure in a row doubles it, up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The admin plane's rustls configuration: client certificates required and verified in the
/// handshake against the operator CA.
pub(crate) fn admin_server_config(
    cert_chain: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let plane = "admin";
    let mut roots = RootCertStore::empty();
    for ca in read_certs("client CA certificate", client_ca)? {
        roots.add(ca).map_err(|e| tls(plane, e))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| tls(plane, e))?;
    let mut config = server_config(plane, cert_chain, key, provider, verifier)?;
    // No session resumption on the admin plane: every connection presents and proves the
    // operator's certificate afresh (a resumed session would carry the first one's for a day).
    let config_mut = Arc::get_mut(&mut config)
        .ok_or_else(|| tls(plane, std::io::Error::other("TLS configuration is shared")))?;
    config_mut.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config_mut.send_tls13_tickets = 0;
    Ok(config)
}

/// The metrics listener's rustls configuration: the server certificate, and a client
/// certificate from `client_ca` required in the handshake (as on the admin plane, with no
/// session resumption), for HTTP/2 or HTTP/1.1.
pub(crate) fn metrics_server_config(
    cert_chain: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let mut config = admin_server_config(cert_chain, key, client_ca)?;
    let config_mut = Arc::get_mut(&mut config).ok_or_else(|| {
        tls(
            "metrics",
            std::io::Error::other("TLS configuration is shared"),
        )
    })?;
    config_mut.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The data plane's rustls configuration: a client certificate is requested and its key
/// proven in the handshake; whether it is trusted is decided per request (`authn.rs`).
pub(crate) fn data_server_config(
    cert_chain: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(ProofOfPossession::new(&provider));
    server_config("data", cert_chain, key, provider, verifier)
}

fn server_config(
    plane: &'static str,
    cert_chain: &Path,
    key: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let certs = read_certs("server certificate", cert_chain)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|_| Error::Pem {
        what: "server private key",
        path: key.to_path_buf(),
        source: None,
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(plane, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| tls(plane, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// When the first certificate in the PEM file `path` expires (seconds since the epoch), if it
/// reads and parses.
pub(crate) fn not_after(path: &Path) -> Option<u64> {
    let certs = read_certs("certificate", path).ok()?;
    crate::identity::svid_facts(certs.first()?.as_ref()).map(|f| f.not_after)
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem_err = |source| Error::Pem {
        what,
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(|e| pem_err(Some(e)))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| pem_err(None))?;
    if certs.is_empty() {
        return Err(pem_err(None));
    }
    Ok(certs)
}

fn tls(plane: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Tls {
        plane,
        source: Box::new(e),
    }
}

/// A TLS connection that holds one of its listener's connection permits until it closes.
#[derive(Debug)]
pub(crate) struct Counted {
    stream: TlsStream<TcpStream>,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Counted {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections, completes TLS handshakes concurrently, and yields the finished
/// streams. At most `max_connections` are open at once, handshakes included: a connection
/// over that is closed at once (and logged, at most once a second). Failed handshakes (wrong
/// CA, no certificate, TLS 1.2) are logged and dropped.
pub(crate) fn incoming(
    plane: &'static str,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    max_connections: usize,
) -> ReceiverStream<Result<Counted, std::io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        let mut turned_away = 0u64;
        let mut last_said = tokio::time::Instant::now();
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    conn
                }
                Err(e) => {
                    // Failing again at once is likely (descriptors do not free themselves):
                    // pause instead of spinning, and say for how long.
                    tracing::warn!(plane, error = %e, pause_ms = backoff.as_millis(), "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                drop(tcp);
                turned_away += 1;
                if last_said.elapsed() >= Duration::from_secs(1) {
                    tracing::warn!(
                        plane,
                        max_connections,
                        turned_away,
                        "connection limit reached; connections closed"
                    );
                    last_said = tokio::time::Instant::now();
                    turned_away = 0;
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx
                            .send(Ok(Counted {
                                stream,
                                _permit: permit,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::info!(plane, %peer, error = %e, "tls handshake refused"),
                    Err(_) => tracing::info!(plane, %peer, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

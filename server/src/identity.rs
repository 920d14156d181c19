//! The caller's identity as the TLS layer verified it.

use kms_core::PrincipalId;
use tonic::{Request, Status};

/// The verified client certificate's SHA-256 fingerprint, as `x509-sha256:<hex>`.
///
/// Both planes require a client certificate chained to their own CA, so a request without one
/// never reaches a handler; the check here is defence in depth.
pub(crate) fn principal<T>(request: &Request<T>) -> Result<PrincipalId, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("client certificate required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("client certificate required"))?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
    const PREFIX: &str = "x509-sha256:";
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(PREFIX.len() + 64);
    id.push_str(PREFIX);
    for byte in digest.as_ref() {
        for nibble in [byte >> 4, byte & 0x0f] {
            id.push(char::from(
                HEX.get(usize::from(nibble)).copied().unwrap_or(b'0'),
            ));
        }
    }
    Ok(PrincipalId::new(id))
}

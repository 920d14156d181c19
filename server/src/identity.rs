//! The caller's identity as the TLS layer verified it.

use kms_core::OperatorId;
use rustls_pki_types::CertificateDer;
use tonic::{Request, Status};

/// An operator, as the admin plane's TLS handshake verified it (chained to the operator CA):
/// the certificate's URI SAN when it has exactly one (a SPIFFE ID in the operators' trust
/// domain), otherwise its SHA-256 fingerprint as `x509-sha256:<hex>`.
///
/// The admin plane requires a client certificate, so a request without one never reaches a
/// handler; the check here is defence in depth.
pub(crate) fn operator<T>(request: &Request<T>) -> Result<OperatorId, Status> {
    let certs = request.peer_certs();
    operator_from(certs.as_deref().map(Vec::as_slice)).map(|o| o.id)
}

/// An operator's identity and its certificate's validity window (Unix seconds).
#[derive(Clone, Debug)]
pub(crate) struct OperatorCert {
    pub(crate) id: OperatorId,
    pub(crate) not_before: u64,
    pub(crate) not_after: u64,
}

/// The operator a verified certificate chain names, as [`operator`] describes.
pub(crate) fn operator_from(certs: Option<&[CertificateDer<'_>]>) -> Result<OperatorCert, Status> {
    let leaf = certs
        .and_then(<[CertificateDer<'_>]>::first)
        .ok_or_else(|| Status::unauthenticated("client certificate required"))?;
    let facts = svid_facts(leaf.as_ref())
        .ok_or_else(|| Status::unauthenticated("client certificate does not parse"))?;
    let (not_before, not_after) = (facts.not_before, facts.not_after);
    if let [uri] = facts.uri_sans.as_slice() {
        if let Some(id) = OperatorId::from_uri(uri) {
            return Ok(OperatorCert {
                id,
                not_before,
                not_after,
            });
        }
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
    let sha256: &[u8; 32] = digest
        .as_ref()
        .try_into()
        .map_err(|_| Status::internal("internal error"))?;
    Ok(OperatorCert {
        id: OperatorId::from_fingerprint(sha256),
        not_before,
        not_after,
    })
}

/// The operator identity a certificate (DER) names, as the admin plane derives it: its only
/// URI SAN, or its fingerprint. `None` when it does not parse.
pub fn operator_identity(der: &[u8]) -> Option<OperatorId> {
    let cert = CertificateDer::from(der.to_vec());
    operator_from(Some(std::slice::from_ref(&cert)))
        .ok()
        .map(|o| o.id)
}

/// What an X.509-SVID check needs from a certificate (DER): its URI SANs, whether it is a CA,
/// and its validity window. `None` when the certificate does not parse.
pub fn svid_facts(der: &[u8]) -> Option<kms_core::governance::spiffe::SvidFacts> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let uri_sans = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(uri) => Some((*uri).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return None,
    };
    let is_ca = match cert.basic_constraints() {
        Ok(Some(bc)) => bc.value.ca,
        Ok(None) => false,
        Err(_) => return None,
    };
    let validity = cert.validity();
    let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    Some(kms_core::governance::spiffe::SvidFacts::new(
        uri_sans,
        is_ca,
        secs(validity.not_before),
        secs(validity.not_after),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

    fn cert(sans: &[&str], ca: bool) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans
            .iter()
            .map(|s| SanType::URI(s.to_string().try_into().unwrap()))
            .collect();
        params
            .subject_alt_names
            .push(SanType::DnsName("localhost".try_into().unwrap()));
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 12, 31);
        if ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn facts_come_from_the_certificate() {
        let facts = svid_facts(&cert(&["spiffe://example.org/web"], false)).unwrap();
        assert_eq!(facts.uri_sans, vec!["spiffe://example.org/web".to_owned()]);
        assert!(!facts.is_ca);
        assert_eq!(facts.not_before, 1_767_225_600); // 2026-01-01T00:00:00Z
        assert_eq!(facts.not_after, 1_798_675_200); // 2026-12-31T00:00:00Z
        let two = svid_facts(&cert(&["spiffe://a.org/x", "spiffe://b.org/y"], false)).unwrap();
        assert_eq!(two.uri_sans.len(), 2);
        assert!(svid_facts(&cert(&[], true)).unwrap().is_ca);
        assert!(svid_facts(&cert(&[], false)).unwrap().uri_sans.is_empty());
        assert!(svid_facts(b"not a certificate").is_none());
    }
}

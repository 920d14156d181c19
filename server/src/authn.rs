//! Workload authentication on the data plane: X.509-SVIDs verified against the trust bundle
//! of their own trust domain.
//!
//! The TLS handshake asks for a client certificate and checks that the client holds the
//! private key of the certificate it presents (the TLS 1.3 CertificateVerify signature), but
//! accepts the certificate itself as presented. Each request then verifies it: the SPIFFE
//! checks of `kms_core::governance::spiffe` first (each failure with its own audit reason), then the
//! certificate path from the leaf to the bundle of the leaf's trust domain (RFC 5280, by
//! rustls-webpki). Deciding per request rather than in the handshake is what lets every
//! refusal be audited with its reason, and lets bundles change without dropping connections.
//!
//! Verified chains are cached by their SHA-256; the cache is emptied whenever the bundles
//! change, and a cached identity is re-checked against the clock on every use.
//!
//! A workload without an X.509-SVID may instead present a JWT-SVID (`authorization: Bearer`):
//! its `sub` names the SPIFFE ID, whose trust domain's JWKS must hold the signing key (`kid`);
//! ES256 and RS256 only; `aud` must include the server's audience; `exp` is required and at
//! most the configured lifetime away.

use std::collections::HashMap;
use std::sync::Arc;

use kms_core::governance::spiffe::{check_x509_svid, SpiffeId, SvidRejection};
use kms_core::Clock;
use parking_lot::{Mutex, RwLock};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};

use crate::identity::svid_facts;

/// Most verified chains kept.
const CACHE_MAX: usize = 100_000;

/// Why a data-plane caller's transport identity was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthFailure {
    /// A JWT-SVID rule is broken; the reason names which.
    Jwt(&'static str),
    /// No client certificate (and no other credential).
    Missing,
    /// The certificate does not parse.
    Malformed,
    /// An X.509-SVID rule is broken.
    Svid(SvidRejection),
    /// The path to the trust domain's bundle does not verify.
    Untrusted {
        /// The ID the certificate claims.
        claimed: kms_core::governance::spiffe::SpiffeId,
    },
}

impl AuthFailure {
    /// A short, stable reason for audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "auth.missing",
            AuthFailure::Jwt(reason) => reason,
            AuthFailure::Malformed => "svid.malformed",
            AuthFailure::Svid(r) => r.reason(),
            AuthFailure::Untrusted { .. } => "svid.untrusted",
        }
    }
}

/// One trust domain's bundle, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleSource {
    /// The trust domain, e.g. `prod.example.org`.
    pub trust_domain: String,
    /// Its CA certificates, PEM (empty: no X.509-SVIDs from this domain).
    pub pem: String,
    /// Its JWT-SVID signing keys, a JWKS document (none: no JWT-SVIDs from this domain).
    pub jwks: Option<String>,
}

/// Why a trust bundle's certificates or JWKS cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// No certificate in the PEM.
    #[error("no certificate in the bundle")]
    Empty,
    /// A JWKS key without a `kid`.
    #[error("every JWKS key needs a kid")]
    MissingKid,
    /// The JWKS has no keys.
    #[error("the JWKS has no keys")]
    NoKeys,
    /// The text is not a JWKS document.
    #[error("not a JWKS document: {0}")]
    NotJwks(#[source] serde_json::Error),
    /// The text is not PEM certificates.
    #[error("not PEM certificates: {0}")]
    NotPem(#[source] rustls_pki_types::pem::Error),
    /// A certificate that cannot be a trust anchor.
    #[error("unusable CA certificate: {0}")]
    UnusableCa(#[source] webpki::Error),
    /// A JWKS key that cannot verify ES256 or RS256.
    #[error("unusable JWKS key: {0}")]
    UnusableKey(#[source] jsonwebtoken::errors::Error),
}

/// A trust domain's bundle that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("trust domain {trust_domain}: {problem}")]
pub struct BadBundle {
    /// The trust domain.
    pub trust_domain: String,
    /// What is wrong.
    #[source]
    pub problem: BundleError,
}

/// Parses a JWKS document, keeping the keys usable for ES256 or RS256 and having a `kid`.
pub fn parse_jwks(json: &str) -> Result<jsonwebtoken::jwk::JwkSet, BundleError> {
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(json).map_err(BundleError::NotJwks)?;
    if set.keys.is_empty() {
        return Err(BundleError::NoKeys);
    }
    for k in &set.keys {
        if k.common.key_id.as_deref().is_none_or(str::is_empty) {
            return Err(BundleError::MissingKid);
        }
        jsonwebtoken::DecodingKey::from_jwk(k).map_err(BundleError::UnusableKey)?;
    }
    Ok(set)
}

/// JWT-SVID settings.
#[derive(Clone, Debug)]
pub struct JwtConfig {
    /// The audience every token must name.
    pub audience: String,
    /// Longest remaining lifetime a token may have, seconds.
    pub max_lifetime_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            audience: "sovereign-kms".into(),
            max_lifetime_secs: 900,
        }
    }
}

/// Parses a bundle's PEM into trust anchors, refusing an empty or unusable bundle.
pub fn parse_bundle(pem: &str) -> Result<Vec<TrustAnchor<'static>>, BundleError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(BundleError::NotPem)?;
    if certs.is_empty() {
        return Err(BundleError::Empty);
    }
    certs
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .map(|a| a.to_owned())
                .map_err(BundleError::UnusableCa)
        })
        .collect()
}

#[derive(Default)]
struct Bundles {
    by_domain: HashMap<String, Vec<TrustAnchor<'static>>>,
    jwks: HashMap<String, jsonwebtoken::jwk::JwkSet>,
}

#[derive(Clone)]
struct Verified {
    id: SpiffeId,
    not_before: u64,
    not_after: u64,
}

/// Verifies data-plane callers' certificates against the current trust bundles.
pub struct Authenticator {
    bundles: RwLock<Arc<Bundles>>,
    cache: Mutex<HashMap<[u8; 32], Verified>>,
    clock: Arc<dyn Clock>,
    algorithms: WebPkiSupportedAlgorithms,
    jwt: JwtConfig,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut domains: Vec<String> = self.bundles.read().by_domain.keys().cloned().collect();
        domains.sort();
        f.debug_struct("Authenticator")
            .field("trust_domains", &domains)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator with no trust domain: every caller is refused until bundles are set.
    pub fn new(clock: Arc<dyn Clock>, jwt: JwtConfig) -> Self {
        Self {
            bundles: RwLock::new(Arc::new(Bundles::default())),
            cache: Mutex::new(HashMap::new()),
            clock,
            algorithms: rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms,
            jwt,
        }
    }

    /// Replaces every bundle. Nothing changes if any bundle is unusable.
    pub fn set_bundles(&self, sources: &[BundleSource]) -> Result<(), BadBundle> {
        let mut by_domain = HashMap::new();
        let mut jwks = HashMap::new();
        for s in sources {
            let bad = |problem| BadBundle {
                trust_domain: s.trust_domain.clone(),
                problem,
            };
            if !s.pem.trim().is_empty() {
                by_domain.insert(s.trust_domain.clone(), parse_bundle(&s.pem).map_err(bad)?);
            }
            if let Some(j) = &s.jwks {
                jwks.insert(s.trust_domain.clone(), parse_jwks(j).map_err(bad)?);
            }
        }
        *self.bundles.write() = Arc::new(Bundles { by_domain, jwks });
        self.cache.lock().clear();
        Ok(())
    }

    /// The trust domains with a bundle, sorted.
    pub fn trust_domains(&self) -> Vec<String> {
        let mut d: Vec<String> = self.bundles.read().by_domain.keys().cloned().collect();
        d.sort();
        d
    }

    /// The SPIFFE ID proven by `certs` (leaf first), or why it is refused.
    pub fn authenticate(
        &self,
        certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<SpiffeId, AuthFailure> {
        let certs = certs
            .filter(|c| !c.is_empty())
            .ok_or(AuthFailure::Missing)?;
        let now = self.clock.now_unix();
        let digest = chain_digest(certs);
        if let Some(v) = self.cache.lock().get(&digest).cloned() {
            if now < v.not_before {
                return Err(AuthFailure::Svid(SvidRejection::NotYetValid));
            }
            if now > v.not_after {
                return Err(AuthFailure::Svid(SvidRejection::Expired));
            }
            return Ok(v.id);
        }
        let (leaf, intermediates) = certs.split_first().ok_or(AuthFailure::Missing)?;
        let facts = svid_facts(leaf.as_ref()).ok_or(AuthFailure::Malformed)?;
        let bundles = self.bundles.read().clone();
        let id = check_x509_svid(&facts, now, |td| bundles.by_domain.contains_key(td))
            .map_err(AuthFailure::Svid)?;
        let anchors = bundles.by_domain.get(id.trust_domain()).ok_or_else(|| {
            AuthFailure::Svid(SvidRejection::UnknownTrustDomain(
                id.trust_domain().to_owned(),
            ))
        })?;
        let ee = webpki::EndEntityCert::try_from(leaf).map_err(|_| AuthFailure::Malformed)?;
        ee.verify_for_usage(
            self.algorithms.all,
            anchors,
            intermediates,
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => AuthFailure::Svid(SvidRejection::Expired),
            webpki::Error::CertNotValidYet { .. } => AuthFailure::Svid(SvidRejection::NotYetValid),
            webpki::Error::CaUsedAsEndEntity => AuthFailure::Svid(SvidRejection::CaAsLeaf),
            _ => AuthFailure::Untrusted {
                claimed: id.clone(),
            },
        })?;
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(
            digest,
            Verified {
                id: id.clone(),
                not_before: facts.not_before,
                not_after: facts.not_after,
            },
        );
        Ok(id)
    }
}

impl Authenticator {
    /// The SPIFFE ID proven by a JWT-SVID, or why it is refused.
    pub fn authenticate_jwt(&self, token: &str) -> Result<SpiffeId, AuthFailure> {
        use base64::Engine;
        use jsonwebtoken::Algorithm;
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Jwt("jwt.malformed"))?;
        if !matches!(header.alg, Algorithm::ES256 | Algorithm::RS256) {
            return Err(AuthFailure::Jwt("jwt.algorithm_not_allowed"));
        }
        let kid = header.kid.ok_or(AuthFailure::Jwt("jwt.no_key_id"))?;
        // The subject picks the trust domain (and so the keys); it is trusted only once the
        // signature under that domain's key verifies below.
        let payload = token
            .split('.')
            .nth(1)
            .ok_or(AuthFailure::Jwt("jwt.malformed"))?;
        let claims: serde_json::Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(AuthFailure::Jwt("jwt.malformed"))?;
        let sub = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .ok_or(AuthFailure::Jwt("jwt.no_subject"))?;
        let id: SpiffeId = sub
            .parse()
            .map_err(|e| AuthFailure::Svid(SvidRejection::NotSpiffe(e)))?;
        let bundles = self.bundles.read().clone();
        let set = bundles.jwks.get(id.trust_domain()).ok_or_else(|| {
            AuthFailure::Svid(SvidRejection::UnknownTrustDomain(
                id.trust_domain().to_owned(),
            ))
        })?;
        let jwk = set.find(&kid).ok_or(AuthFailure::Jwt("jwt.unknown_key"))?;
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk)
            .map_err(|_| AuthFailure::Jwt("jwt.unknown_key"))?;
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.set_audience(&[&self.jwt.audience]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        // Time is checked below against the server's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| {
                AuthFailure::Jwt(match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidAudience => "jwt.wrong_audience",
                    jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(c) if c == "exp" => {
                        "jwt.no_expiry"
                    }
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => "jwt.bad_signature",
                    _ => "jwt.invalid",
                })
            })?;
        let now = self.clock.now_unix();
        let exp = data
            .claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .ok_or(AuthFailure::Jwt("jwt.no_expiry"))?;
        if now >= exp {
            return Err(AuthFailure::Jwt("jwt.expired"));
        }
        if exp - now > self.jwt.max_lifetime_secs {
            return Err(AuthFailure::Jwt("jwt.lifetime_too_long"));
        }
        if let Some(nbf) = data.claims.get("nbf").and_then(serde_json::Value::as_u64) {
            if now < nbf {
                return Err(AuthFailure::Jwt("jwt.not_yet_valid"));
            }
        }
        Ok(id)
    }
}

/// The SPIFFE ID a refused certificate chain claims (its leaf's only URI SAN), for the audit
/// record of the refusal. Nothing here is verified.
pub(crate) fn claimed_by_certificate(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    let facts = svid_facts(certs.first()?.as_ref())?;
    match facts.uri_sans.as_slice() {
        [uri] => uri.parse().ok(),
        _ => None,
    }
}

/// The SPIFFE ID a refused JWT-SVID claims (its `sub`), for the audit record of the refusal.
/// Nothing here is verified.
pub(crate) fn claimed_by_jwt(token: &str) -> Option<SpiffeId> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("sub")?.as_str()?.parse().ok()
}

fn chain_digest(certs: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for c in certs {
        ctx.update(&u64::try_from(c.len()).unwrap_or(u64::MAX).to_be_bytes());
        ctx.update(c.as_ref());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The data plane's handshake-level client certificate check: a certificate is requested
/// but optional, and if one is presented the client must prove it holds its key. Whether the
/// certificate is trusted is decided per request by [`Authenticator`].
#[derive(Debug)]
pub(crate) struct ProofOfPossession {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ProofOfPossession {
    pub(crate) fn new(provider: &CryptoProvider) -> Self {
        Self {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for ProofOfPossession {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

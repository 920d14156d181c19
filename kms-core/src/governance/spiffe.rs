//! SPIFFE workload identities: the `spiffe://<trust-domain>/<path>` ID, and the checks an
//! X.509-SVID must pass before its ID is trusted, each failure with its own reason for the
//! audit log.
//!
//! Sans-I/O: the server extracts [`SvidFacts`] from the TLS-verified leaf certificate and asks
//! [`check_x509_svid`]; this module parses no DER and reads no clock.
//!
//! ID syntax follows the SPIFFE ID specification (§2): scheme `spiffe` in lower case; a trust
//! domain of lower-case letters, digits, `.`, `-` and `_`; a path of `/`-separated segments of
//! letters, digits, `.`, `-` and `_`, none empty, `.` or `..`, and no trailing `/`; no port,
//! user info, query or fragment; at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted (SPIFFE ID specification §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A syntactically valid SPIFFE ID. Kept as its text (so that lookups and policy entities
/// borrow it) with the length of its trust domain. Ordered by trust domain, then path.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    /// `spiffe://<trust domain><path>`.
    text: String,
    /// Length of the trust domain in `text`, after the scheme.
    domain_len: usize,
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// The trust domain, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        let end = SCHEME.len().saturating_add(self.domain_len);
        self.text.get(SCHEME.len()..end).unwrap_or_default()
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        let start = SCHEME.len().saturating_add(self.domain_len);
        self.text.get(start..).unwrap_or_default()
    }

    /// The whole ID, `spiffe://<trust domain><path>`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The ID one path segment up (`/a/b` → `/a`, `/a` → the bare trust domain), or `None`
    /// for a bare trust domain.
    pub fn parent(&self) -> Option<SpiffeId> {
        let path = self.path();
        if path.is_empty() {
            return None;
        }
        let cut = path.rfind('/').unwrap_or(0);
        let keep = self
            .text
            .len()
            .saturating_sub(path.len())
            .saturating_add(cut);
        Some(SpiffeId {
            text: self.text.get(..keep).unwrap_or_default().to_owned(),
            domain_len: self.domain_len,
        })
    }

    /// True when this ID is `prefix` or lies under it (same trust domain, and the path equal
    /// to or below `prefix`'s path at a segment boundary): `/ns/prod` covers `/ns/prod/web`
    /// but not `/ns/production`.
    pub fn is_under(&self, prefix: &SpiffeId) -> bool {
        let (path, prefix_path) = (self.path(), prefix.path());
        self.trust_domain() == prefix.trust_domain()
            && (prefix_path.is_empty()
                || path == prefix_path
                || path
                    .strip_prefix(prefix_path)
                    .is_some_and(|rest| rest.starts_with('/')))
    }
}

impl PartialOrd for SpiffeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SpiffeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.trust_domain(), self.path()).cmp(&(other.trust_domain(), other.path()))
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, SpiffeIdError> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.text
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

/// Why a string is not a SPIFFE ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// Not `spiffe://` (the scheme is case-sensitive).
    #[error("not a spiffe:// URI")]
    Scheme,
    /// Longer than 2048 bytes.
    #[error("longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    /// Empty, too long, or a character outside `a-z 0-9 . - _` (this also rules out ports and
    /// user info).
    #[error("invalid trust domain")]
    TrustDomain,
    /// An empty, `.` or `..` segment, a trailing `/`, or a character outside
    /// `A-Z a-z 0-9 . - _` (this also rules out queries and fragments).
    #[error("invalid path")]
    Path,
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if domain.is_empty()
            || domain.len() > MAX_TRUST_DOMAIN_LEN
            || !domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b))
        {
            return Err(SpiffeIdError::TrustDomain);
        }
        if !path.is_empty() {
            let segments = path.get(1..).unwrap_or_default();
            let segment_ok = |seg: &str| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
            };
            if !segments.split('/').all(segment_ok) {
                return Err(SpiffeIdError::Path);
            }
        }
        Ok(Self {
            text: s.to_owned(),
            domain_len: domain.len(),
        })
    }
}

/// What the server read from a TLS-verified client leaf certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SvidFacts {
    /// Every URI subject alternative name, in order.
    pub uri_sans: Vec<String>,
    /// Basic constraints say CA.
    pub is_ca: bool,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: u64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: u64,
}

impl SvidFacts {
    /// Facts from their parts.
    pub fn new(uri_sans: Vec<String>, is_ca: bool, not_before: u64, not_after: u64) -> Self {
        Self {
            uri_sans,
            is_ca,
            not_before,
            not_after,
        }
    }
}

/// Why an X.509-SVID is refused. Each has a stable reason string for the audit log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidRejection {
    /// The certificate has no URI SAN.
    #[error("no URI SAN")]
    NoUriSan,
    /// The certificate has more than one URI SAN (an X.509-SVID has exactly one).
    #[error("several URI SANs")]
    SeveralUriSans,
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(SpiffeIdError),
    /// No trust bundle is configured for the ID's trust domain.
    #[error("no trust bundle for trust domain {0}")]
    UnknownTrustDomain(String),
    /// Past its validity.
    #[error("certificate expired")]
    Expired,
    /// Before its validity.
    #[error("certificate not yet valid")]
    NotYetValid,
    /// A CA certificate presented as a leaf.
    #[error("CA certificate used as a leaf")]
    CaAsLeaf,
}

impl SvidRejection {
    /// A short, stable reason for audit records and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SvidRejection::NoUriSan => "svid.no_uri_san",
            SvidRejection::SeveralUriSans => "svid.several_uri_sans",
            SvidRejection::NotSpiffe(_) => "svid.not_spiffe",
            SvidRejection::UnknownTrustDomain(_) => "svid.unknown_trust_domain",
            SvidRejection::Expired => "svid.expired",
            SvidRejection::NotYetValid => "svid.not_yet_valid",
            SvidRejection::CaAsLeaf => "svid.ca_as_leaf",
        }
    }
}

/// The checks of the X.509-SVID specification (§4, §5) that remain once TLS has verified the
/// chain: one URI SAN holding a SPIFFE ID, a trust domain with a configured bundle, a leaf that
/// is not a CA, and `now` (seconds since the Unix epoch) within its validity.
pub fn check_x509_svid(
    facts: &SvidFacts,
    now: u64,
    has_bundle: impl Fn(&str) -> bool,
) -> Result<SpiffeId, SvidRejection> {
    let uri = match facts.uri_sans.as_slice() {
        [] => return Err(SvidRejection::NoUriSan),
        [one] => one,
        _ => return Err(SvidRejection::SeveralUriSans),
    };
    let id: SpiffeId = uri.parse().map_err(SvidRejection::NotSpiffe)?;
    if facts.is_ca {
        return Err(SvidRejection::CaAsLeaf);
    }
    if now < facts.not_before {
        return Err(SvidRejection::NotYetValid);
    }
    if now > facts.not_after {
        return Err(SvidRejection::Expired);
    }
    if !has_bundle(id.trust_domain()) {
        return Err(SvidRejection::UnknownTrustDomain(
            id.trust_domain().to_owned(),
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse_and_print_back() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/ns/prod/sa/web",
            "spiffe://a-b_c.9/X.y-z_0",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
        let id: SpiffeId = "spiffe://example.org/ns/prod".parse().unwrap();
        assert_eq!((id.trust_domain(), id.path()), ("example.org", "/ns/prod"));
    }

    #[test]
    fn invalid_ids_say_why() {
        use SpiffeIdError::*;
        let cases = [
            ("https://example.org/x", Scheme),
            ("SPIFFE://example.org/x", Scheme),
            ("spiffe://", TrustDomain),
            ("spiffe://Example.org/x", TrustDomain),
            ("spiffe://example.org:443/x", TrustDomain),
            ("spiffe://user@example.org/x", TrustDomain),
            ("spiffe://example.org/", Path),
            ("spiffe://example.org//x", Path),
            ("spiffe://example.org/x/", Path),
            ("spiffe://example.org/./x", Path),
            ("spiffe://example.org/x/..", Path),
            ("spiffe://example.org/x?y=1", Path),
            ("spiffe://example.org/x#frag", Path),
            ("spiffe://example.org/x%20y", Path),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<SpiffeId>().unwrap_err(), want, "{s}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(long.parse::<SpiffeId>().unwrap_err(), TooLong);
    }

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        let fleet = id("spiffe://example.org/ns/prod");
        assert!(id("spiffe://example.org/ns/prod").is_under(&fleet));
        assert!(id("spiffe://example.org/ns/prod/web").is_under(&fleet));
        assert!(!id("spiffe://example.org/ns/production").is_under(&fleet));
        assert!(!id("spiffe://other.org/ns/prod/web").is_under(&fleet));
        assert!(id("spiffe://example.org/anything").is_under(&id("spiffe://example.org")));
    }

    #[test]
    fn each_svid_rejection_has_its_own_reason() {
        let ok = SvidFacts::new(vec!["spiffe://example.org/web".into()], false, 100, 200);
        let bundle = |td: &str| td == "example.org";
        assert_eq!(
            check_x509_svid(&ok, 150, bundle).unwrap().to_string(),
            "spiffe://example.org/web"
        );
        let with = |f: &dyn Fn(&mut SvidFacts)| {
            let mut facts = ok.clone();
            f(&mut facts);
            check_x509_svid(&facts, 150, bundle).unwrap_err().reason()
        };
        assert_eq!(with(&|f| f.uri_sans.clear()), "svid.no_uri_san");
        assert_eq!(
            with(&|f| f.uri_sans.push("spiffe://example.org/b".into())),
            "svid.several_uri_sans"
        );
        assert_eq!(
            with(&|f| f.uri_sans = vec!["https://example.org/web".into()]),
            "svid.not_spiffe"
        );
        assert_eq!(
            with(&|f| f.uri_sans = vec!["spiffe://other.org/web".into()]),
            "svid.unknown_trust_domain"
        );
        assert_eq!(with(&|f| f.not_after = 149), "svid.expired");
        assert_eq!(with(&|f| f.not_before = 151), "svid.not_yet_valid");
        assert_eq!(with(&|f| f.is_ca = true), "svid.ca_as_leaf");
        // The edges of the validity window are inside it.
        assert!(check_x509_svid(&ok, 100, bundle).is_ok());
        assert!(check_x509_svid(&ok, 200, bundle).is_ok());
    }
}

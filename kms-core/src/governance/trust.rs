//! Trust bundles as stored: one per trust domain, PEM text as an operator set it. Checking
//! that the certificates are usable is the server's part (it owns X.509 path validation); the
//! store keeps what passed that check, with who set it and when.

use serde::{Deserialize, Serialize};

use crate::error::{Error, InvalidInput};
use crate::governance::spiffe::SpiffeId;
use crate::store::{Change, Row, Store, Table};

/// Largest bundle accepted.
pub const MAX_BUNDLE_PEM: usize = 256 * 1024;

/// One trust domain's bundle.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TrustBundleRecord {
    /// The trust domain, e.g. `prod.example.org`.
    pub trust_domain: String,
    /// Its CA certificates, PEM (empty: none).
    pub pem: String,
    /// Its JWT-SVID keys, a JWKS document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// When it was set, seconds since the epoch.
    pub updated_at: u64,
    /// Who set it.
    pub updated_by: String,
}

/// Checks a trust domain name (the SPIFFE ID specification's syntax).
pub fn check_trust_domain(name: &str) -> Result<(), Error> {
    match format!("spiffe://{name}").parse::<SpiffeId>() {
        Ok(id) if id.path().is_empty() => Ok(()),
        _ => Err(Error::Invalid(InvalidInput::TrustDomain)),
    }
}

/// Every stored bundle, sorted by trust domain.
pub fn list(store: &dyn Store) -> Result<Vec<TrustBundleRecord>, Error> {
    store
        .scan(Table::TrustBundles)?
        .into_iter()
        .map(|Row { value: v, .. }| {
            serde_json::from_slice(&v).map_err(|source| Error::Record {
                table: "trust_bundles",
                source,
            })
        })
        .collect()
}

/// One stored bundle.
pub fn get(store: &dyn Store, trust_domain: &str) -> Result<Option<TrustBundleRecord>, Error> {
    store
        .get(Table::TrustBundles, trust_domain.as_bytes())?
        .map(|v| {
            serde_json::from_slice(&v).map_err(|source| Error::Record {
                table: "trust_bundles",
                source,
            })
        })
        .transpose()
}

/// Stores (or replaces) a bundle.
pub fn put(store: &dyn Store, record: &TrustBundleRecord) -> Result<(), Error> {
    check_trust_domain(&record.trust_domain)?;
    let len = record.pem.len() + record.jwks.as_ref().map_or(0, String::len);
    if len > MAX_BUNDLE_PEM {
        return Err(Error::TooLarge {
            what: "trust bundle",
            len,
            max: MAX_BUNDLE_PEM,
        });
    }
    let value =
        serde_json::to_vec(record).map_err(|_| Error::Internal("bundle does not serialise"))?;
    store.write(vec![Change::Put {
        table: Table::TrustBundles,
        key: record.trust_domain.as_bytes().to_vec(),
        value,
    }])
}

/// Removes a bundle.
pub fn delete(store: &dyn Store, trust_domain: &str) -> Result<(), Error> {
    store.write(vec![Change::Delete {
        table: Table::TrustBundles,
        key: trust_domain.as_bytes().to_vec(),
    }])
}

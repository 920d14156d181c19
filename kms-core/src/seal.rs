//! The emergency seal: one operator stops every key use at once, and the state survives a
//! restart. While sealed, no software key version is unwrapped in memory and no data-plane
//! operation runs; admin reads keep working. Unsealing is a gated change (M approvals).

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::store::{Change, Store, Table};

/// Key of the seal record in [`Table::ServiceState`].
const SEAL_KEY: &[u8] = b"seal";
/// Longest reason kept.
pub const MAX_REASON: usize = 1024;

/// Who sealed the service, when and why.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SealRecord {
    /// Seconds since the epoch.
    pub sealed_at: u64,
    /// The operator's identity.
    pub sealed_by: String,
    /// Their reason.
    pub reason: String,
}

impl SealRecord {
    /// A record, with the reason checked (1 to [`MAX_REASON`] bytes, no control characters).
    pub fn new(sealed_at: u64, sealed_by: String, reason: String) -> Result<Self, Error> {
        if reason.trim().is_empty()
            || reason.len() > MAX_REASON
            || reason.chars().any(char::is_control)
        {
            return Err(Error::Invalid(crate::error::InvalidInput::SealReason));
        }
        Ok(Self {
            sealed_at,
            sealed_by,
            reason,
        })
    }
}

/// The seal on record, if the service is sealed.
pub fn load(store: &dyn Store) -> Result<Option<SealRecord>, Error> {
    store
        .get(Table::ServiceState, SEAL_KEY)?
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|source| Error::Record {
                table: "service_state",
                source,
            })
        })
        .transpose()
}

pub(crate) fn put(record: &SealRecord) -> Result<Change, Error> {
    Ok(Change::Put {
        table: Table::ServiceState,
        key: SEAL_KEY.to_vec(),
        value: serde_json::to_vec(record).map_err(|_| Error::Internal("seal record"))?,
    })
}

pub(crate) fn remove() -> Change {
    Change::Delete {
        table: Table::ServiceState,
        key: SEAL_KEY.to_vec(),
    }
}

//! The operator inventory: which holders of an operator-CA certificate may use the admin plane
//! at all, with which role, answerable to whom, and until when.
//!
//! An operator is registered under the identity the admin plane's handshake verified (the
//! certificate's URI SAN, or its fingerprint: see [`OperatorId`]). The gate looks every admin
//! request's caller up here ([`Operators::admit`]) before the service sees it. Registrations
//! are few and read on every admin request: they are kept in memory and written through to
//! the store (synced) on every change.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::error::{Error, InvalidInput};
use crate::ids::OperatorId;
use crate::store::{Change, Row, Store, Table};

/// Longest owner text.
pub const MAX_OWNER: usize = 512;

/// What a registered operator may do.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Read-only: describe and list, query and export the audit log, see approvals.
    Auditor,
    /// Ask for changes and approve other operators' requests.
    Operator,
}

impl Role {
    /// The role's name, as configs and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Auditor => "auditor",
            Role::Operator => "operator",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auditor" => Ok(Role::Auditor),
            "operator" => Ok(Role::Operator),
            _ => Err(Error::Invalid(InvalidInput::OperatorRoles)),
        }
    }
}

/// A registered operator.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Operator {
    /// The identity its certificate carries (URI SAN or `x509-sha256:<hex>`).
    pub identity: String,
    /// Unique short name (`alice`, `operator1`).
    pub name: String,
    /// The person or team answerable for it.
    pub owner: String,
    /// What it may do; never empty.
    pub roles: BTreeSet<Role>,
    /// End of the registration, seconds since the Unix epoch.
    pub expires_at: u64,
    /// False once deactivated.
    pub active: bool,
    /// When it was registered.
    pub created_at: u64,
    /// Who registered it (an operator identity, or `config` for the bootstrap).
    pub created_by: String,
    /// Last change.
    pub updated_at: u64,
    /// Who made the last change.
    pub updated_by: String,
}

impl Operator {
    /// True when it holds `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// True when it is active and unexpired at `now` and holds `role`.
    pub fn may(&self, role: Role, now: u64) -> bool {
        self.active && now < self.expires_at && self.has(role)
    }
}

/// Why a verified operator certificate is refused on the admin plane.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorDenial {
    /// The registration has been deactivated.
    #[error("operator is deactivated in the operator inventory")]
    Deactivated,
    /// The registration has expired.
    #[error("operator registration has expired")]
    Expired,
    /// The caller lacks the `operator` role and asked for more than a read.
    #[error("this operator is an auditor: read-only requests only")]
    ReadOnly,
    /// No registration names the certificate's identity.
    #[error("operator certificate is not registered in the operator inventory")]
    Unregistered,
}

impl OperatorDenial {
    /// A short, stable reason for audit records.
    pub fn reason(self) -> &'static str {
        match self {
            OperatorDenial::Deactivated => "operator.deactivated",
            OperatorDenial::Expired => "operator.expired",
            OperatorDenial::ReadOnly => "operator.read_only",
            OperatorDenial::Unregistered => "operator.unregistered",
        }
    }
}

/// A valid operator name: 1-64 of `a-z 0-9 _ - .`, starting with a letter or digit.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct OperatorName(String);

impl OperatorName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for OperatorName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let first_ok = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
        if !first_ok || !rest_ok || s.len() > 64 {
            return Err(Error::Invalid(InvalidInput::OperatorName));
        }
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Display for OperatorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A new registration.
#[derive(Clone, Debug)]
pub struct NewOperator {
    /// The certificate identity.
    pub identity: OperatorId,
    /// Its name.
    pub name: OperatorName,
    /// Owner.
    pub owner: String,
    /// Roles; at least one.
    pub roles: BTreeSet<Role>,
    /// End of the registration.
    pub expires_at: u64,
}

/// Changes to a registration; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct OperatorUpdate {
    /// New owner.
    pub owner: Option<String>,
    /// New roles (replacing all).
    pub roles: Option<BTreeSet<Role>>,
    /// New expiry.
    pub expires_at: Option<u64>,
}

/// The operator inventory.
pub struct Operators {
    store: Arc<dyn Store>,
    by_identity: RwLock<HashMap<String, Arc<Operator>>>,
}

impl std::fmt::Debug for Operators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operators")
            .field("registrations", &self.by_identity.read().len())
            .finish_non_exhaustive()
    }
}

fn check_owner(text: &str) -> Result<(), Error> {
    if text.trim().is_empty() || text.len() > MAX_OWNER || text.chars().any(char::is_control) {
        return Err(Error::Invalid(InvalidInput::WorkloadText));
    }
    Ok(())
}

fn check_roles(roles: &BTreeSet<Role>) -> Result<(), Error> {
    if roles.is_empty() {
        return Err(Error::Invalid(InvalidInput::OperatorRoles));
    }
    Ok(())
}

impl Operators {
    /// Loads every registration from `store`.
    pub fn open(store: Arc<dyn Store>) -> Result<Self, Error> {
        let mut by_identity = HashMap::new();
        for Row { value, .. } in store.scan(Table::Operators)? {
            let op: Operator = serde_json::from_slice(&value).map_err(|source| Error::Record {
                table: "operators",
                source,
            })?;
            by_identity.insert(op.identity.clone(), Arc::new(op));
        }
        Ok(Self {
            store,
            by_identity: RwLock::new(by_identity),
        })
    }

    /// True when nothing is registered (the config's operators are registered then).
    pub fn is_empty(&self) -> bool {
        self.by_identity.read().is_empty()
    }

    /// The registration `id` names, if it may use the admin plane at `now`.
    pub fn admit(&self, id: &OperatorId, now: u64) -> Result<Arc<Operator>, OperatorDenial> {
        let op = self
            .by_identity
            .read()
            .get(id.as_str())
            .cloned()
            .ok_or(OperatorDenial::Unregistered)?;
        if !op.active {
            return Err(OperatorDenial::Deactivated);
        }
        if now >= op.expires_at {
            return Err(OperatorDenial::Expired);
        }
        Ok(op)
    }

    /// The registration of `identity`, whatever its state.
    pub fn by_identity(&self, identity: &str) -> Option<Arc<Operator>> {
        self.by_identity.read().get(identity).cloned()
    }

    /// How many registrations may act with `role` at `now`.
    pub fn count_with(&self, role: Role, now: u64) -> usize {
        self.by_identity
            .read()
            .values()
            .filter(|o| o.may(role, now))
            .count()
    }

    /// One registration by name.
    pub fn get(&self, name: &OperatorName) -> Result<Arc<Operator>, Error> {
        self.by_identity
            .read()
            .values()
            .find(|o| o.name == name.as_str())
            .cloned()
            .ok_or_else(|| Error::OperatorNotFound {
                name: name.to_string(),
            })
    }

    /// Every registration, by name; deactivated ones only when asked.
    pub fn list(&self, include_inactive: bool) -> Vec<Arc<Operator>> {
        let mut all: Vec<_> = self
            .by_identity
            .read()
            .values()
            .filter(|o| include_inactive || o.active)
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    fn save(&self, op: Operator) -> Result<Arc<Operator>, Error> {
        let value = serde_json::to_vec(&op).map_err(|_| Error::Internal("operator record"))?;
        self.store.write(vec![Change::Put {
            table: Table::Operators,
            key: op.identity.as_bytes().to_vec(),
            value,
        }])?;
        let op = Arc::new(op);
        self.by_identity
            .write()
            .insert(op.identity.clone(), op.clone());
        Ok(op)
    }

    /// Checks a registration without making it (for a request that waits for approval).
    pub fn check_new(&self, new: &NewOperator, now: u64) -> Result<(), Error> {
        check_owner(&new.owner)?;
        check_roles(&new.roles)?;
        if new.expires_at <= now {
            return Err(Error::Invalid(InvalidInput::Expiry));
        }
        let index = self.by_identity.read();
        if let Some(existing) = index.get(new.identity.as_str()) {
            return Err(Error::OperatorExists {
                name: existing.name.clone(),
            });
        }
        if index.values().any(|o| o.name == new.name.as_str()) {
            return Err(Error::OperatorExists {
                name: new.name.to_string(),
            });
        }
        Ok(())
    }

    /// Registers an operator.
    pub fn register(&self, new: NewOperator, by: &str, now: u64) -> Result<Arc<Operator>, Error> {
        self.check_new(&new, now)?;
        self.save(Operator {
            identity: new.identity.to_string(),
            name: new.name.to_string(),
            owner: new.owner,
            roles: new.roles,
            expires_at: new.expires_at,
            active: true,
            created_at: now,
            created_by: by.to_owned(),
            updated_at: now,
            updated_by: by.to_owned(),
        })
    }

    /// Checks a change as [`Operators::update`] would, making none.
    pub fn check_update(
        &self,
        name: &OperatorName,
        update: &OperatorUpdate,
        now: u64,
    ) -> Result<(), Error> {
        self.get(name)?;
        if let Some(owner) = &update.owner {
            check_owner(owner)?;
        }
        if let Some(roles) = &update.roles {
            check_roles(roles)?;
        }
        if update.expires_at.is_some_and(|e| e <= now) {
            return Err(Error::Invalid(InvalidInput::Expiry));
        }
        Ok(())
    }

    /// Changes a registration. Returns it before and after.
    pub fn update(
        &self,
        name: &OperatorName,
        update: OperatorUpdate,
        by: &str,
        now: u64,
    ) -> Result<(Arc<Operator>, Arc<Operator>), Error> {
        self.check_update(name, &update, now)?;
        let before = self.get(name)?;
        let mut op = Operator::clone(&before);
        if let Some(owner) = update.owner {
            op.owner = owner;
        }
        if let Some(roles) = update.roles {
            op.roles = roles;
        }
        if let Some(expires_at) = update.expires_at {
            op.expires_at = expires_at;
        }
        op.updated_at = now;
        op.updated_by = by.to_owned();
        Ok((before, self.save(op)?))
    }

    /// Deactivates a registration: its certificate is refused from the next request on.
    pub fn deactivate(
        &self,
        name: &OperatorName,
        by: &str,
        now: u64,
    ) -> Result<(Arc<Operator>, Arc<Operator>), Error> {
        let before = self.get(name)?;
        let mut op = Operator::clone(&before);
        op.active = false;
        op.updated_at = now;
        op.updated_by = by.to_owned();
        Ok((before, self.save(op)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_roles_parse_strictly() {
        assert!("operator1".parse::<OperatorName>().is_ok());
        assert!("a.b-c_d".parse::<OperatorName>().is_ok());
        for bad in ["", "-x", "Alice", "a b", &"x".repeat(65)] {
            assert!(bad.parse::<OperatorName>().is_err(), "{bad:?}");
        }
        assert_eq!("auditor".parse::<Role>().unwrap(), Role::Auditor);
        assert!("admin".parse::<Role>().is_err());
    }
}

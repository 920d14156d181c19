//! The Cedar entities of a request: the calling `Workload`, the `Key`, and their caches. An
//! entity is rebuilt only when the registration or key facts it was built from change.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cedar_policy::{Entities, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};

use super::reads::ENCRYPTION_TYPE;
use super::{BuildError, Policies};
use crate::governance::inventory::Workload;
use crate::governance::spiffe::SpiffeId;
use crate::ids::{Alias, KeyId};
use crate::key::{KeyRecord, Labels};
use crate::op::Op;

/// At most this many cached entities of each kind; the cache starts over when full.
const ENTITY_CACHE_MAX: usize = 10_000;

/// What policy sees of a caller's registration: its owner, purpose and labels.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct RegistrationFacts<'a> {
    pub(super) owner: &'a str,
    pub(super) purpose: &'a str,
    pub(super) labels: &'a Labels,
}

impl<'a> RegistrationFacts<'a> {
    pub(super) fn of(w: &'a Workload) -> Self {
        Self {
            owner: &w.owner,
            purpose: &w.purpose,
            labels: &w.labels,
        }
    }
}

/// What policy sees of a key: its id, alias and labels.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct KeyFacts<'a> {
    pub(super) id: KeyId,
    pub(super) alias: Option<&'a Alias>,
    pub(super) labels: &'a Labels,
}

impl<'a> KeyFacts<'a> {
    pub(super) fn of(key: &'a KeyRecord) -> Self {
        Self {
            id: key.id,
            alias: key.alias.as_ref(),
            labels: &key.labels,
        }
    }
}

/// Principal and resource entities, built once per registration and key state.
#[derive(Default)]
pub(super) struct EntityCache {
    workloads: HashMap<String, CachedWorkload>,
    keys: HashMap<KeyId, CachedKey>,
    pairs: HashMap<(EntityUid, EntityUid), CachedPair>,
}

/// An entity with the number of its build: a changed registration or key gets a new
/// entity under the same uid, and a new number. Shared, as a Cedar entity is a deep copy.
#[derive(Clone)]
pub(super) struct Built {
    pub(super) entity: Arc<Entity>,
    build: u64,
}

/// The `Entities` of one principal build and one resource build.
struct CachedPair {
    builds: (u64, u64),
    entities: Entities,
}

struct CachedWorkload {
    /// Owner, purpose and labels of the registration it was built from.
    facts: Option<(String, String, Labels)>,
    built: Built,
}

struct CachedKey {
    alias: Option<Alias>,
    labels: Labels,
    built: Built,
}

/// Entity type names and uids every request uses, parsed once (Cedar parses them from text).
pub(super) struct Names {
    pub(super) workload: EntityTypeName,
    key: EntityTypeName,
    pub(super) context: EntityUid,
    actions: Vec<(Op, EntityUid)>,
}

impl Names {
    pub(super) fn new() -> Result<Self, BuildError> {
        let actions = Op::ALL
            .into_iter()
            .filter(|op| op.is_policy_action())
            .map(|op| Ok((op, uid("Action", op.as_str())?)))
            .collect::<Result<_, BuildError>>()?;
        Ok(Self {
            workload: EntityTypeName::from_str("Workload")?,
            key: EntityTypeName::from_str("Key")?,
            context: uid(ENCRYPTION_TYPE, "request")?,
            actions,
        })
    }

    /// The Cedar action of `op`; operations no policy decides have none.
    pub(super) fn action(&self, op: Op) -> Result<EntityUid, BuildError> {
        self.actions
            .iter()
            .find(|(o, _)| *o == op)
            .map(|(_, uid)| uid.clone())
            .ok_or_else(|| BuildError::action(op))
    }
}

fn uid(type_name: &str, id: &str) -> Result<EntityUid, BuildError> {
    let t = EntityTypeName::from_str(type_name)?;
    Ok(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

pub(super) fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

pub(super) fn long(n: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The `Workload` entity for a caller with this SPIFFE ID, under its registration if it has
/// one.
pub(super) fn workload_entity(
    names: &Names,
    id: &SpiffeId,
    registration: Option<RegistrationFacts<'_>>,
) -> Result<Entity, BuildError> {
    Ok(Entity::new_with_tags(
        EntityUid::from_type_name_and_id(names.workload.clone(), EntityId::new(id.as_str())),
        [
            ("spiffe_id".to_owned(), string(id.as_str())),
            ("trust_domain".to_owned(), string(id.trust_domain())),
            (
                "owner".to_owned(),
                string(registration.map_or("", |r| r.owner)),
            ),
            (
                "purpose".to_owned(),
                string(registration.map_or("", |r| r.purpose)),
            ),
        ],
        [],
        registration
            .into_iter()
            .flat_map(|r| r.labels.entries())
            .map(|(k, v)| (k.to_owned(), string(v))),
    )?)
}

/// The `Key` entity for a key.
pub(super) fn key_entity(names: &Names, key: KeyFacts<'_>) -> Result<Entity, BuildError> {
    let key_id = key.id.to_string();
    Ok(Entity::new_with_tags(
        EntityUid::from_type_name_and_id(names.key.clone(), EntityId::new(&key_id)),
        [
            ("id".to_owned(), string(&key_id)),
            (
                "alias".to_owned(),
                string(key.alias.map_or("", |a| a.as_str())),
            ),
        ],
        [],
        key.labels.entries().map(|(k, v)| (k.to_owned(), string(v))),
    )?)
}

impl Policies {
    fn next_build(&self) -> u64 {
        self.builds.fetch_add(1, Ordering::Relaxed)
    }

    /// The `Workload` entity of the caller, from the cache while its registration's owner,
    /// purpose and labels are unchanged.
    pub(super) fn principal_entity(
        &self,
        id: &SpiffeId,
        registration: Option<RegistrationFacts<'_>>,
    ) -> Result<Built, BuildError> {
        if let Some(c) = self.entities.lock().workloads.get(id.as_str()) {
            let cached = c.facts.as_ref().map(|(o, p, l)| RegistrationFacts {
                owner: o,
                purpose: p,
                labels: l,
            });
            if cached == registration {
                return Ok(c.built.clone());
            }
        }
        let built = Built {
            entity: Arc::new(workload_entity(&self.names, id, registration)?),
            build: self.next_build(),
        };
        let mut cache = self.entities.lock();
        if cache.workloads.len() >= ENTITY_CACHE_MAX {
            cache.workloads.clear();
        }
        cache.workloads.insert(
            id.as_str().to_owned(),
            CachedWorkload {
                facts: registration
                    .map(|r| (r.owner.to_owned(), r.purpose.to_owned(), r.labels.clone())),
                built: built.clone(),
            },
        );
        Ok(built)
    }

    /// The `Key` entity of a key, from the cache while its alias and labels are unchanged.
    pub(super) fn resource_entity(&self, key: KeyFacts<'_>) -> Result<Built, BuildError> {
        if let Some(c) = self.entities.lock().keys.get(&key.id) {
            if c.alias.as_ref() == key.alias && &c.labels == key.labels {
                return Ok(c.built.clone());
            }
        }
        let built = Built {
            entity: Arc::new(key_entity(&self.names, key)?),
            build: self.next_build(),
        };
        let mut cache = self.entities.lock();
        if cache.keys.len() >= ENTITY_CACHE_MAX {
            cache.keys.clear();
        }
        cache.keys.insert(
            key.id,
            CachedKey {
                alias: key.alias.cloned(),
                labels: key.labels.clone(),
                built: built.clone(),
            },
        );
        Ok(built)
    }

    /// The principal and resource entities of a request as one `Entities` (Cedar computes
    /// the hierarchy's closure when building it), kept while both builds are current.
    pub(super) fn pair(&self, principal: &Built, resource: &Built) -> Result<Entities, BuildError> {
        let key = (principal.entity.uid(), resource.entity.uid());
        let builds = (principal.build, resource.build);
        if let Some(c) = self.entities.lock().pairs.get(&key) {
            if c.builds == builds {
                return Ok(c.entities.clone());
            }
        }
        let entities = Entities::from_entities(
            [
                Entity::clone(&principal.entity),
                Entity::clone(&resource.entity),
            ],
            None,
        )?;
        let mut cache = self.entities.lock();
        if cache.pairs.len() >= ENTITY_CACHE_MAX {
            cache.pairs.clear();
        }
        cache.pairs.insert(
            key,
            CachedPair {
                builds,
                entities: entities.clone(),
            },
        );
        Ok(entities)
    }
}

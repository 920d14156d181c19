//! M-of-N approvals: a change that moves a trust boundary runs only once M registered
//! operators other than its requester have approved it before it expires (docs/APPROVALS.md).
//!
//! An [`ApprovalRequest`] holds the request exactly as it will run (the protobuf bytes the
//! requester sent, and their hash); its state machine is the methods below, and the only way
//! to the [`QuorumReached`] token that [`ApprovalRequest::finish`] needs is an
//! [`ApprovalRequest::approve`] that completed the quorum. [`Approvals`] stores requests and
//! the rules. Running the stored request is the server's (it knows the messages); this module
//! knows none of them.
//!
//! ```text
//!  pending ─approve×M─▶ approved ─run─▶ executed | failed
//!     ├─reject─▶ rejected   ├─cancel─▶ cancelled   └─now ≥ expires_at─▶ expired
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::error::{Error, InvalidInput};
use crate::governance::actions::{AdminAction, GatedAction};
use crate::store::{Change, Row, Store, Table};

mod ticket;

pub use self::ticket::{Ticket, TicketRefusal};

/// The gatable actions added since rules were first stored (stored rules without `known`
/// knew every other one), so that they are gated when older rules are read.
const ADDED_AFTER_FIRST_RULES: [GatedAction; 3] = [
    GatedAction::ScheduleKeyDestruction,
    GatedAction::ExportBackup,
    GatedAction::Reshare,
];

fn first_gatable() -> BTreeSet<GatedAction> {
    GatedAction::ALL
        .iter()
        .filter(|a| !ADDED_AFTER_FIRST_RULES.contains(a))
        .copied()
        .collect()
}

fn all_gatable() -> BTreeSet<GatedAction> {
    GatedAction::ALL.iter().copied().collect()
}

/// The change of the rules themselves, which no rule can take off the list.
pub const SET_RULES: GatedAction = GatedAction::SetApprovalRules;

/// Most approvals a rule may require.
pub const MAX_REQUIRED: u32 = 16;
/// Shortest and longest time a request may wait for its approvals.
pub const EXPIRY_BOUNDS_SECS: (u64, u64) = (60, 30 * 86_400);
/// Longest rejection reason kept.
pub const MAX_REASON: usize = 512;

/// Domain separation of a request's hash.
const HASH_DOMAIN: &[u8] = b"sovereign-kms approval v1";

/// How many approvals a change needs, how long it may wait, and which changes need them.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ApprovalRules {
    /// Approvals needed from operators other than the requester (M).
    pub required: u32,
    /// Seconds a request may wait before it expires.
    pub expiry_secs: u64,
    /// Gated actions (always holding [`SET_RULES`]).
    pub gated: BTreeSet<GatedAction>,
    /// The gatable actions when these rules were set. An action added to [`GatedAction`]
    /// by a later release is not in it, and [`Approvals::open`] gates it: a new sensitive
    /// action starts gated, never silently open.
    #[serde(default = "first_gatable")]
    pub known: BTreeSet<GatedAction>,
}

impl Default for ApprovalRules {
    fn default() -> Self {
        Self {
            required: 2,
            expiry_secs: 86_400,
            gated: all_gatable(),
            known: all_gatable(),
        }
    }
}

impl ApprovalRules {
    /// Checked rules.
    pub fn new(
        required: u32,
        expiry_secs: u64,
        gated: BTreeSet<GatedAction>,
    ) -> Result<Self, Error> {
        if required == 0 || required > MAX_REQUIRED {
            return Err(Error::Invalid(InvalidInput::ApprovalRules));
        }
        if !(EXPIRY_BOUNDS_SECS.0..=EXPIRY_BOUNDS_SECS.1).contains(&expiry_secs) {
            return Err(Error::Invalid(InvalidInput::ApprovalRules));
        }
        if !gated.contains(&SET_RULES) {
            return Err(Error::Invalid(InvalidInput::ApprovalRules));
        }
        Ok(Self {
            required,
            expiry_secs,
            gated,
            known: all_gatable(),
        })
    }

    /// True when `action` waits for approvals.
    pub fn gates(&self, action: AdminAction) -> bool {
        action.gatable().is_some_and(|g| self.gated.contains(&g))
    }
}

/// Where a request stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ApprovalState {
    /// Quorum reached; the change is running.
    Approved,
    /// Withdrawn by its requester.
    Cancelled,
    /// The change ran.
    Executed,
    /// Its time ran out before quorum; it never runs.
    Expired,
    /// The change was run and refused, or the server stopped while running it.
    Failed,
    /// Waiting for approvals.
    Pending,
    /// Rejected by an operator.
    Rejected,
}

impl ApprovalState {
    /// The state's name, as the CLI and JSON spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Approved => "approved",
            ApprovalState::Cancelled => "cancelled",
            ApprovalState::Executed => "executed",
            ApprovalState::Expired => "expired",
            ApprovalState::Failed => "failed",
            ApprovalState::Pending => "pending",
            ApprovalState::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ApprovalState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "approved" => ApprovalState::Approved,
            "cancelled" => ApprovalState::Cancelled,
            "executed" => ApprovalState::Executed,
            "expired" => ApprovalState::Expired,
            "failed" => ApprovalState::Failed,
            "pending" => ApprovalState::Pending,
            "rejected" => ApprovalState::Rejected,
            _ => return Err(Error::Invalid(InvalidInput::ApprovalState)),
        })
    }
}

/// Why a step on an approval request is refused.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApprovalError {
    /// This operator has already approved it.
    #[error("approval {id}: you have already approved it")]
    AlreadyApproved {
        /// The request.
        id: String,
    },
    /// It is not pending any more.
    #[error("approval {id} is {state}, not pending")]
    NotPending {
        /// The request.
        id: String,
        /// Its state.
        state: ApprovalState,
    },
    /// Only the requester may cancel.
    #[error("approval {id}: only its requester may cancel it")]
    NotRequester {
        /// The request.
        id: String,
    },
    /// No request with this id.
    #[error("no approval request {id}")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// The requester's own vote never counts.
    #[error("approval {id}: you asked for this change; another operator must approve it")]
    OwnRequest {
        /// The request.
        id: String,
    },
}

/// One approval.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Vote {
    /// The approver's identity.
    pub operator: String,
    /// When, seconds since the epoch.
    pub at: u64,
}

/// A gated change waiting for, or done with, its approvals.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// Random id, 32 hex digits.
    pub id: String,
    /// What kind of change (`admin.PutPolicy`).
    pub action: GatedAction,
    /// What it changes (a policy id, a selector, a trust domain, an operator name).
    pub target: String,
    /// The request message exactly as it will run.
    #[serde(with = "crate::custody::b64")]
    pub request: Vec<u8>,
    /// SHA-256 over the action and the request (see [`request_hash`]), hex.
    pub hash: String,
    /// The request rendered for people (JSON text), derived from `request`.
    pub view: String,
    /// For a policy: the diff of the current text against the requested one.
    pub diff: Option<String>,
    /// The requester's identity.
    pub requested_by: String,
    /// When it was asked for.
    pub requested_at: u64,
    /// When it expires unless approved.
    pub expires_at: u64,
    /// Approvals it needs (M when it was asked for).
    pub required: u32,
    /// Approvals so far, in order.
    pub approvals: Vec<Vote>,
    /// Where it stands.
    pub state: ApprovalState,
    /// Who ended it (rejecter, canceller) and when.
    pub ended_by: Option<String>,
    /// When it left `pending` or `approved`.
    pub ended_at: Option<u64>,
    /// A rejection's reason, or why a run failed.
    pub reason: Option<String>,
    /// The executed change's answer (JSON text).
    pub result: Option<String>,
}

/// Proof that a request reached its quorum just now; only [`ApprovalRequest::approve`]
/// makes one.
#[derive(Debug)]
pub struct QuorumReached(());

/// What an approval did.
#[derive(Debug)]
#[non_exhaustive]
pub enum Progress {
    /// The quorum is complete: run the change, then [`ApprovalRequest::finish`] it.
    Quorum(QuorumReached),
    /// More approvals are needed.
    Waiting {
        /// Approvals so far.
        have: u32,
        /// Approvals needed.
        need: u32,
    },
}

/// A new request's fields the caller supplies.
#[derive(Clone, Debug)]
pub struct NewRequest {
    /// Action.
    pub action: GatedAction,
    /// Target.
    pub target: String,
    /// Request bytes.
    pub request: Vec<u8>,
    /// Rendered request.
    pub view: String,
    /// Policy diff.
    pub diff: Option<String>,
    /// Requester.
    pub requested_by: String,
}

/// SHA-256 over a domain string, the action and the request bytes, hex.
pub fn request_hash(action: GatedAction, request: &[u8]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(HASH_DOMAIN);
    ctx.update(&[0]);
    ctx.update(action.as_str().as_bytes());
    ctx.update(&[0]);
    ctx.update(request);
    hex::encode(ctx.finish().as_ref())
}

impl ApprovalRequest {
    /// A new pending request, under `rules` at `now`.
    pub fn new(id: String, new: NewRequest, rules: &ApprovalRules, now: u64) -> Self {
        Self {
            hash: request_hash(new.action, &new.request),
            id,
            action: new.action,
            target: new.target,
            request: new.request,
            view: new.view,
            diff: new.diff,
            requested_by: new.requested_by,
            requested_at: now,
            expires_at: now.saturating_add(rules.expiry_secs),
            required: rules.required,
            approvals: Vec::new(),
            state: ApprovalState::Pending,
            ended_by: None,
            ended_at: None,
            reason: None,
            result: None,
        }
    }

    /// Marks a pending request expired if its time is up; true when it just expired.
    pub fn expire_if_due(&mut self, now: u64) -> bool {
        if self.state == self.state_at(now) {
            return false;
        }
        self.state = ApprovalState::Expired;
        self.ended_at = Some(self.expires_at);
        true
    }

    /// Its state at `now`: a pending request past its expiry is expired, stored or not.
    fn state_at(&self, now: u64) -> ApprovalState {
        if self.state == ApprovalState::Pending && now >= self.expires_at {
            ApprovalState::Expired
        } else {
            self.state
        }
    }

    fn check_pending(&self, now: u64) -> Result<(), ApprovalError> {
        let state = self.state_at(now);
        if state != ApprovalState::Pending {
            return Err(ApprovalError::NotPending {
                id: self.id.clone(),
                state,
            });
        }
        Ok(())
    }

    /// Records `by`'s approval. `required_now` is M under the rules in force; the request
    /// needs the larger of it and the M it was asked under.
    pub fn approve(
        &mut self,
        by: &str,
        now: u64,
        required_now: u32,
    ) -> Result<Progress, ApprovalError> {
        self.check_pending(now)?;
        if by == self.requested_by {
            return Err(ApprovalError::OwnRequest {
                id: self.id.clone(),
            });
        }
        if self.approvals.iter().any(|v| v.operator == by) {
            return Err(ApprovalError::AlreadyApproved {
                id: self.id.clone(),
            });
        }
        self.approvals.push(Vote {
            operator: by.to_owned(),
            at: now,
        });
        let need = self.required.max(required_now);
        let have = u32::try_from(self.approvals.len()).unwrap_or(u32::MAX);
        if have < need {
            return Ok(Progress::Waiting { have, need });
        }
        self.state = ApprovalState::Approved;
        Ok(Progress::Quorum(QuorumReached(())))
    }

    /// Ends a pending request as rejected by `by` (any operator but the requester, who
    /// cancels instead).
    pub fn reject(&mut self, by: &str, now: u64, reason: &str) -> Result<(), ApprovalError> {
        self.check_pending(now)?;
        if by == self.requested_by {
            return Err(ApprovalError::OwnRequest {
                id: self.id.clone(),
            });
        }
        self.state = ApprovalState::Rejected;
        self.ended_by = Some(by.to_owned());
        self.ended_at = Some(now);
        let reason: String = reason.chars().take(MAX_REASON).collect();
        self.reason = (!reason.trim().is_empty()).then_some(reason);
        Ok(())
    }

    /// Ends a pending request as cancelled by its requester.
    pub fn cancel(&mut self, by: &str, now: u64) -> Result<(), ApprovalError> {
        self.check_pending(now)?;
        if by != self.requested_by {
            return Err(ApprovalError::NotRequester {
                id: self.id.clone(),
            });
        }
        self.state = ApprovalState::Cancelled;
        self.ended_by = Some(by.to_owned());
        self.ended_at = Some(now);
        Ok(())
    }

    /// Records the outcome of running an approved request: its answer, or why it failed.
    pub fn finish(&mut self, _quorum: QuorumReached, now: u64, outcome: Result<String, String>) {
        self.ended_at = Some(now);
        match outcome {
            Ok(answer) => {
                self.state = ApprovalState::Executed;
                self.result = Some(answer);
            }
            Err(why) => {
                self.state = ApprovalState::Failed;
                self.reason = Some(why);
            }
        }
    }
}

/// Stored requests and rules.
pub struct Approvals {
    store: Arc<dyn Store>,
    rules: RwLock<ApprovalRules>,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals")
            .field("rules", &*self.rules.read())
            .finish_non_exhaustive()
    }
}

/// Key of the rules in [`Table::Approvals`].
pub(crate) const RULES_KEY: &[u8] = b"rules";
/// Prefix of request keys.
const REQUEST_PREFIX: &[u8] = b"req/";

fn request_key(id: &str) -> Vec<u8> {
    [REQUEST_PREFIX, id.as_bytes()].concat()
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::Record {
        table: "approvals",
        source,
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|_| Error::Internal("approval record"))
}

fn put_rules(rules: &ApprovalRules) -> Result<Change, Error> {
    Ok(Change::Put {
        table: Table::Approvals,
        key: RULES_KEY.to_vec(),
        value: encode(rules)?,
    })
}

/// Gates every action stored `rules` did not know (a later release added it) and marks them
/// known; returns those actions. A new sensitive action starts gated, never silently open.
fn gate_new_actions(rules: &mut ApprovalRules) -> Vec<GatedAction> {
    let added: Vec<GatedAction> = all_gatable()
        .into_iter()
        .filter(|a| !rules.known.contains(a))
        .collect();
    rules.gated.extend(added.iter().copied());
    rules.known = all_gatable();
    added
}

/// The rules stored in `store`, read without opening the approvals (for offline ceremonies
/// and attestations), with every action they did not know gated as [`Approvals::open`] gates
/// it; the defaults (which gate all) when none are stored yet.
pub fn stored_rules(store: &dyn Store) -> Result<ApprovalRules, Error> {
    Ok(match store.get(Table::Approvals, RULES_KEY)? {
        Some(bytes) => {
            let mut stored: ApprovalRules = decode(&bytes)?;
            gate_new_actions(&mut stored);
            stored
        }
        None => ApprovalRules::default(),
    })
}

/// One stored request, read without opening the approvals (for ceremonies run offline).
pub fn read_request(store: &dyn Store, id: &str) -> Result<ApprovalRequest, Error> {
    let bytes = store
        .get(Table::Approvals, &request_key(id))?
        .ok_or_else(|| Error::Approval(ApprovalError::NotFound { id: id.to_owned() }))?;
    decode(&bytes)
}

/// What [`Approvals::open`] found.
#[derive(Debug)]
pub struct Opened {
    /// The approvals.
    pub approvals: Approvals,
    /// Stored rules that differ from the configured ones (the stored ones apply).
    pub config_differs: bool,
    /// Requests that were approved but whose outcome was never recorded (now `failed`).
    pub interrupted: Vec<ApprovalRequest>,
}

impl Approvals {
    /// Opens the approvals in `store`. On first start `configured` become the rules; after
    /// that the stored rules apply. Requests left `approved` by a stop are marked failed.
    pub fn open(
        store: Arc<dyn Store>,
        configured: ApprovalRules,
        now: u64,
    ) -> Result<Opened, Error> {
        let (rules, config_differs) = match store.get(Table::Approvals, RULES_KEY)? {
            Some(bytes) => {
                let mut stored: ApprovalRules = decode(&bytes)?;
                let added = gate_new_actions(&mut stored);
                if !added.is_empty() {
                    store.write(vec![put_rules(&stored)?])?;
                    let added: Vec<&str> = added.iter().map(|a| a.as_str()).collect();
                    tracing::warn!(actions = %added.join(", "), "actions this release can gate are now gated; `kms approval set-rules` changes that");
                }
                let differs = stored != configured;
                (stored, differs)
            }
            None => {
                store.write(vec![put_rules(&configured)?])?;
                (configured, false)
            }
        };
        let approvals = Self {
            store,
            rules: RwLock::new(rules),
        };
        let mut interrupted = Vec::new();
        for mut req in approvals.all()? {
            if req.state == ApprovalState::Approved {
                req.state = ApprovalState::Failed;
                req.ended_at = Some(now);
                req.reason = Some(
                    "interrupted: the server stopped while running it; check whether the \
                     change was made and ask again"
                        .into(),
                );
                approvals.save(&req)?;
                interrupted.push(req);
            }
        }
        Ok(Opened {
            approvals,
            config_differs,
            interrupted,
        })
    }

    /// The rules in force.
    pub fn rules(&self) -> ApprovalRules {
        self.rules.read().clone()
    }

    /// Replaces the rules (after their change was approved).
    pub fn set_rules(&self, rules: ApprovalRules) -> Result<(), Error> {
        self.store.write(vec![put_rules(&rules)?])?;
        *self.rules.write() = rules;
        Ok(())
    }

    /// Writes a request (new or after a step), synced.
    pub fn save(&self, req: &ApprovalRequest) -> Result<(), Error> {
        self.store.write(vec![Change::Put {
            table: Table::Approvals,
            key: request_key(&req.id),
            value: encode(req)?,
        }])
    }

    /// One request.
    pub fn get(&self, id: &str) -> Result<ApprovalRequest, Error> {
        let bytes = self
            .store
            .get(Table::Approvals, &request_key(id))?
            .ok_or_else(|| Error::Approval(ApprovalError::NotFound { id: id.to_owned() }))?;
        decode(&bytes)
    }

    /// Every request, newest first.
    pub fn all(&self) -> Result<Vec<ApprovalRequest>, Error> {
        let mut all = Vec::new();
        for Row { key, value } in self.store.scan(Table::Approvals)? {
            if key.starts_with(REQUEST_PREFIX) {
                all.push(decode::<ApprovalRequest>(&value)?);
            }
        }
        all.sort_by(|a, b| {
            b.requested_at
                .cmp(&a.requested_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(rules: &ApprovalRules) -> ApprovalRequest {
        ApprovalRequest::new(
            "00".repeat(16),
            NewRequest {
                action: GatedAction::PutPolicy,
                target: "p".into(),
                request: b"body".to_vec(),
                view: "{}".into(),
                diff: None,
                requested_by: "alice".into(),
            },
            rules,
            1000,
        )
    }

    #[test]
    fn quorum_needs_m_distinct_others_before_expiry() {
        let rules = ApprovalRules::default();
        let mut r = request(&rules);
        assert!(matches!(
            r.approve("alice", 1001, 2),
            Err(ApprovalError::OwnRequest { .. })
        ));
        assert!(matches!(
            r.approve("bob", 1001, 2),
            Ok(Progress::Waiting { have: 1, need: 2 })
        ));
        assert!(matches!(
            r.approve("bob", 1002, 2),
            Err(ApprovalError::AlreadyApproved { .. })
        ));
        let Ok(Progress::Quorum(q)) = r.approve("carol", 1003, 2) else {
            panic!("quorum expected");
        };
        assert_eq!(r.state, ApprovalState::Approved);
        r.finish(q, 1004, Ok("{}".into()));
        assert_eq!(r.state, ApprovalState::Executed);
        assert!(matches!(
            r.approve("dave", 1005, 2),
            Err(ApprovalError::NotPending { .. })
        ));
    }

    #[test]
    fn expired_rejected_and_cancelled_requests_never_reach_quorum() {
        let rules = ApprovalRules::default();
        let mut r = request(&rules);
        assert!(r.approve("bob", 1001, 2).is_ok());
        let late = 1000 + rules.expiry_secs;
        assert!(matches!(
            r.approve("carol", late, 2),
            Err(ApprovalError::NotPending {
                state: ApprovalState::Expired,
                ..
            })
        ));
        assert!(r.expire_if_due(late));
        assert_eq!(r.state, ApprovalState::Expired);

        let mut r = request(&rules);
        assert!(r.reject("alice", 1001, "").is_err());
        r.reject("bob", 1001, "no").unwrap();
        assert!(r.approve("carol", 1002, 2).is_err());

        let mut r = request(&rules);
        assert!(matches!(
            r.cancel("bob", 1001),
            Err(ApprovalError::NotRequester { .. })
        ));
        r.cancel("alice", 1001).unwrap();
        assert_eq!(r.state, ApprovalState::Cancelled);
    }

    #[test]
    fn a_raised_quorum_applies_to_pending_requests() {
        let rules = ApprovalRules::default();
        let mut r = request(&rules);
        assert!(matches!(
            r.approve("bob", 1001, 3),
            Ok(Progress::Waiting { have: 1, need: 3 })
        ));
        assert!(matches!(
            r.approve("carol", 1002, 3),
            Ok(Progress::Waiting { have: 2, need: 3 })
        ));
        // A lowered rule does not lower what a request was asked under.
        let mut r = request(&rules);
        assert!(matches!(
            r.approve("bob", 1001, 1),
            Ok(Progress::Waiting { have: 1, need: 2 })
        ));
    }

    #[test]
    fn rules_keep_their_own_gate_and_bounds() {
        let all: BTreeSet<GatedAction> = GatedAction::ALL.iter().copied().collect();
        assert!(ApprovalRules::new(2, 3600, all.clone()).is_ok());
        assert!(ApprovalRules::new(0, 3600, all.clone()).is_err());
        assert!(ApprovalRules::new(2, 10, all.clone()).is_err());
        let mut without = all.clone();
        without.remove(&SET_RULES);
        assert!(ApprovalRules::new(2, 3600, without).is_err());
        // An action that cannot be gated cannot be named in rules: it is not a GatedAction.
        assert!("admin.CreateKey".parse::<GatedAction>().is_err());
    }

    #[test]
    fn the_hash_covers_action_and_bytes() {
        let a = request_hash(GatedAction::PutPolicy, b"x");
        assert_ne!(a, request_hash(GatedAction::DeletePolicy, b"x"));
        assert_ne!(a, request_hash(GatedAction::PutPolicy, b"y"));
        assert_eq!(a.len(), 64);
    }
}

//! Single-use tickets: an approved change that is not made at once but used later, once
//! (a backup export, a reshare run offline).

use super::{ApprovalRequest, ApprovalState};
use crate::error::Error;
use crate::governance::actions::GatedAction;
use crate::store::{Change, Store, Table};

/// A gated action whose approved change is a single-use ticket rather than a change made at
/// once (a backup export, a reshare run offline): the executed request can be used once, for
/// [`Ticket::secs`] after it ran, and is consumed by a row `used_prefix + id` in the approvals
/// table, written in the same batch as what it allows when that is possible.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    /// The gated action.
    pub action: GatedAction,
    /// How long an executed request stays usable, in seconds.
    pub secs: u64,
    used_prefix: &'static [u8],
}

/// Why an approval request is not a usable ticket.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TicketRefusal {
    /// It approves another action.
    #[error("it approves {0}, not this")]
    OtherAction(GatedAction),
    /// It has not run (or was refused, cancelled, expired).
    #[error("it is {0}, not approved and executed")]
    NotExecuted(&'static str),
    /// It ran longer ago than the ticket lasts.
    #[error("it was approved more than {0} minutes ago; ask again")]
    Expired(u64),
    /// It was used already.
    #[error("it was used already; ask again")]
    Used,
}

impl Ticket {
    /// A ticket for `action`, usable `secs` after it ran, consumed under `used_prefix`.
    pub const fn new(action: GatedAction, secs: u64, used_prefix: &'static [u8]) -> Self {
        Self {
            action,
            secs,
            used_prefix,
        }
    }

    fn used_key(&self, id: &str) -> Vec<u8> {
        [self.used_prefix, id.as_bytes()].concat()
    }

    /// Whether `r` can be used as this ticket at `now`.
    pub fn check(
        &self,
        store: &dyn Store,
        r: &ApprovalRequest,
        now: u64,
    ) -> Result<Result<(), TicketRefusal>, Error> {
        if r.action != self.action {
            return Ok(Err(TicketRefusal::OtherAction(r.action)));
        }
        if r.state != ApprovalState::Executed {
            return Ok(Err(TicketRefusal::NotExecuted(r.state.as_str())));
        }
        if r.ended_at.unwrap_or(0).saturating_add(self.secs) < now {
            return Ok(Err(TicketRefusal::Expired(self.secs / 60)));
        }
        if store
            .get(Table::Approvals, &self.used_key(&r.id))?
            .is_some()
        {
            return Ok(Err(TicketRefusal::Used));
        }
        Ok(Ok(()))
    }

    /// The write that consumes ticket `id`, naming who used it.
    pub fn consume(&self, id: &str, by: &str) -> Change {
        Change::Put {
            table: Table::Approvals,
            key: self.used_key(id),
            value: by.as_bytes().to_vec(),
        }
    }

    /// What the executed request records as its result: the ticket, until when it is valid,
    /// and how to use it.
    pub fn result(&self, r: &ApprovalRequest, now: u64, usage: &str) -> String {
        serde_json::json!({
            "ticket": {
                "requested_by": r.requested_by,
                "valid_until": now.saturating_add(self.secs),
                "use": usage,
            }
        })
        .to_string()
    }
}

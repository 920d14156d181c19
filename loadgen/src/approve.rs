//! Approving the gated changes a load run makes on a development server.

use api::v1::{ApprovalId, ApprovalInfo};

use crate::Error;

/// Operators other than the requester, who approve each gated change until it runs.
#[derive(Clone, Debug)]
pub struct Approvers {
    clients: Vec<api::AdminClient>,
}

impl Approvers {
    /// Approvers connected as operators other than the one making the changes.
    pub fn new(clients: Vec<api::AdminClient>) -> Self {
        Self { clients }
    }

    /// Approves `pending` (if the change waits) until it has run; an error if it ended
    /// otherwise or needs more approvals than these operators can give.
    pub async fn settle(&self, pending: Option<&ApprovalInfo>) -> Result<(), Error> {
        let Some(a) = pending else {
            return Ok(());
        };
        for client in &self.clients {
            let r = client
                .clone()
                .approve_change(ApprovalId { id: a.id.clone() })
                .await?
                .into_inner();
            match r.state.as_str() {
                "executed" => return Ok(()),
                "pending" => continue,
                other => {
                    return Err(Error::Approval(format!(
                        "approval {} of {} {} ended {other}: {}",
                        r.id, r.action, r.target, r.reason
                    )))
                }
            }
        }
        Err(Error::Approval(format!(
            "approval {} needs more approvals than the development operators can give",
            a.id
        )))
    }
}

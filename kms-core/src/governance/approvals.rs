//! The approvals seam. Every admin change to trust bundles, the inventory and policies passes
//! through an [`Approvals`] before it is made. For now one authenticated operator may make
//! each change alone ([`SingleOperator`]); M-of-N approval replaces it behind this trait.

use crate::error::Error;

/// A change an operator asks for.
#[derive(Clone, Copy, Debug)]
pub struct ChangeRequest<'a> {
    /// The operator's identity.
    pub operator: &'a str,
    /// What kind of change, e.g. `admin.PutPolicy`.
    pub action: &'a str,
    /// What it changes: a policy id, a selector, a trust domain.
    pub target: &'a str,
}

/// Decides whether a change may be made now.
pub trait Approvals: Send + Sync + std::fmt::Debug {
    /// `Ok` when the change may go ahead.
    fn approve(&self, change: &ChangeRequest<'_>) -> Result<(), Error>;
}

/// Any authenticated operator may make any change alone; every change is audited with who
/// made it.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleOperator;

impl Approvals for SingleOperator {
    fn approve(&self, _change: &ChangeRequest<'_>) -> Result<(), Error> {
        Ok(())
    }
}

//! Who may use keys: workload identities (SPIFFE), their trust bundles, the inventory of
//! registered workloads, Cedar policies, task grants, and the approvals seam every admin change
//! to them passes.
//!
//! ```text
//!  SPIFFE ID (spiffe) ─▶ trust bundle (trust) ─▶ registration (inventory)
//!      ─▶ grant, if presented (grants) ─▶ Cedar decision (policy, behind authz::Authorizer)
//! ```

pub mod actions;
pub mod approvals;
pub mod authz;
pub mod grants;
pub mod inventory;
pub mod operators;
pub mod policy;
pub mod spiffe;
pub mod trust;

//! What the audit writer tells whoever watches it (a node's metrics): each batch made durable,
//! each batch that failed, each checkpoint signed. Called on the writer's own thread, after the
//! write and before the waiting callers are answered: an observer must be quick and must not
//! block.

use std::time::Duration;

/// A watcher of the audit writer.
pub trait AuditObserver: Send + Sync {
    /// `records` records (at least one) were written durably in one synced batch that took
    /// `took`.
    fn committed(&self, records: usize, took: Duration);
    /// A batch of `records` records could not be written; their requests were refused.
    fn failed(&self, records: usize);
    /// A checkpoint was signed at `time_ms` (milliseconds since the Unix epoch, on the
    /// deployment's clock). Also called once when the observer is attached, with the time of
    /// the last checkpoint in the store, if there is one.
    fn checkpointed(&self, time_ms: u64);
}

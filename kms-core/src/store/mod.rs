//! The storage seam. The core speaks to tables of byte keys and byte values through
//! [`Store`]; RocksDB is the embedded implementation, and a replicated engine can take its
//! place behind the same trait.

mod rocks;

pub use rocks::RocksStore;

use crate::error::Error;

/// Record kinds, one column family each.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Table {
    /// Alias → key id.
    Aliases,
    /// Key id → key record.
    Keys,
    /// Key id ‖ version (big-endian) → version record.
    Versions,
}

impl Table {
    /// Every table, for opening.
    pub const ALL: [Table; 3] = [Table::Aliases, Table::Keys, Table::Versions];

    /// Column family name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Aliases => "aliases",
            Table::Keys => "keys",
            Table::Versions => "versions",
        }
    }
}

/// One change in a write batch.
#[derive(Debug)]
#[non_exhaustive]
pub enum Change {
    /// Remove a key.
    Delete {
        /// The table.
        table: Table,
        /// The key.
        key: Vec<u8>,
    },
    /// Insert or replace a value.
    Put {
        /// The table.
        table: Table,
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
}

/// One stored entry.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Row {
    /// Its key.
    pub key: Vec<u8>,
    /// Its value.
    pub value: Vec<u8>,
}

/// A key-value store with atomic, durable batches.
pub trait Store: Send + Sync {
    /// Applies every change or none, and returns only once the batch is durable (synced).
    fn write(&self, changes: Vec<Change>) -> Result<(), Error>;

    /// Every entry of a table, in key order.
    fn scan(&self, table: Table) -> Result<Vec<Row>, Error>;
}

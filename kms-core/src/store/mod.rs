//! The storage seam. The core speaks to tables of byte keys and byte values through
//! [`Store`]; RocksDB is the embedded implementation, and a replicated engine can take its
//! place behind the same trait.

mod rocks;

pub use rocks::{RocksStore, StoreMeter};

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
    /// Audit sequence number (big-endian) → record hash ‖ record body.
    AuditRecords,
    /// Audit sequence number (big-endian) → signed checkpoint.
    AuditCheckpoints,
    /// Audit log settings: public keys of the checkpoint signers, the wrapped context key.
    AuditMeta,
    /// Trust domain → its trust bundle.
    TrustBundles,
    /// Workload selector (a SPIFFE ID, or a prefix ending in `/*`) → registration.
    Workloads,
    /// Workload selector → last-seen time and call counts.
    WorkloadUsage,
    /// Policy id → its versions.
    Policies,
    /// `grant/<id>` → grant, `uses/<id>` → uses so far, and the wrapped token key.
    Grants,
    /// The recovery authority: key record, transcript, escrow seals of the grant MAC and
    /// context-digest keys, and which custodians have verified their shares.
    Custody,
    /// Operator identity → registration.
    Operators,
    /// `rules` → approval rules; `req/<id>` → approval request.
    Approvals,
    /// `seal` → the emergency seal, while the service is sealed.
    ServiceState,
}

impl Table {
    /// Every table, for opening.
    pub const ALL: [Table; 15] = [
        Table::Aliases,
        Table::Keys,
        Table::Versions,
        Table::AuditRecords,
        Table::AuditCheckpoints,
        Table::AuditMeta,
        Table::TrustBundles,
        Table::Workloads,
        Table::WorkloadUsage,
        Table::Policies,
        Table::Grants,
        Table::Custody,
        Table::Operators,
        Table::Approvals,
        Table::ServiceState,
    ];

    /// Column family name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Aliases => "aliases",
            Table::Keys => "keys",
            Table::Versions => "versions",
            Table::AuditRecords => "audit_records",
            Table::AuditCheckpoints => "audit_checkpoints",
            Table::AuditMeta => "audit_meta",
            Table::TrustBundles => "trust_bundles",
            Table::Workloads => "workloads",
            Table::WorkloadUsage => "workload_usage",
            Table::Policies => "policies",
            Table::Grants => "grants",
            Table::Custody => "custody",
            Table::Operators => "operators",
            Table::Approvals => "approvals",
            Table::ServiceState => "service_state",
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
    /// Remove every key in `from..to` (`to` excluded).
    DeleteRange {
        /// The table.
        table: Table,
        /// First key removed.
        from: Vec<u8>,
        /// First key kept.
        to: Vec<u8>,
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

    /// Up to `limit` entries from `from` on (included), in key order.
    fn scan_from(&self, table: Table, from: &[u8], limit: usize) -> Result<Vec<Row>, Error>;

    /// The entry with the greatest key.
    fn last(&self, table: Table) -> Result<Option<Row>, Error>;

    /// One value.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;

    /// Applies `changes` in synced batches of at most `per_batch` (a large restore or
    /// backfill). Not atomic as a whole: each batch is, in order; callers that need all or
    /// nothing write into a store they can discard.
    fn write_in_batches(&self, mut changes: Vec<Change>, per_batch: usize) -> Result<(), Error> {
        while !changes.is_empty() {
            let tail = changes.split_off(changes.len().min(per_batch.max(1)));
            self.write(changes)?;
            changes = tail;
        }
        Ok(())
    }

    /// Every entry of each of `tables`, all read from one point in time (a write that lands
    /// meanwhile is wholly in or wholly out), for backups. A store without snapshots reads the
    /// tables one after another.
    fn snapshot_scan(&self, tables: &[Table]) -> Result<Vec<(Table, Vec<Row>)>, Error> {
        tables.iter().map(|t| Ok((*t, self.scan(*t)?))).collect()
    }

    /// Makes deleted entries of `table` leave the store's files, not only its index (for key
    /// destruction): flush, then rewrite the table's files. A store that keeps no deleted
    /// data has nothing to do.
    fn purge(&self, table: Table) -> Result<(), Error> {
        let _ = table;
        Ok(())
    }
}

/// A read-only view of some tables as one [`Store::snapshot_scan`] read them, so that a
/// statement gathered from several tables (an attestation) is of one point in time. Its
/// other tables are empty; writing to it is refused.
pub struct SnapshotView {
    tables: std::collections::HashMap<Table, Vec<Row>>,
}

impl SnapshotView {
    /// Reads `tables` from `store` at one point in time.
    pub fn read(store: &dyn Store, tables: &[Table]) -> Result<Self, Error> {
        Ok(Self {
            tables: store.snapshot_scan(tables)?.into_iter().collect(),
        })
    }

    /// A view of rows given one by one (a bundle's records, say), in key order per table.
    pub fn from_rows(rows: impl IntoIterator<Item = (Table, Row)>) -> Self {
        let mut tables: std::collections::HashMap<Table, Vec<Row>> =
            std::collections::HashMap::new();
        for (table, row) in rows {
            tables.entry(table).or_default().push(row);
        }
        for rows in tables.values_mut() {
            rows.sort_by(|a, b| a.key.cmp(&b.key));
        }
        Self { tables }
    }

    fn rows(&self, table: Table) -> &[Row] {
        self.tables.get(&table).map_or(&[], Vec::as_slice)
    }
}

impl std::fmt::Debug for SnapshotView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotView")
            .field("tables", &self.tables.len())
            .finish_non_exhaustive()
    }
}

impl Store for SnapshotView {
    fn write(&self, _changes: Vec<Change>) -> Result<(), Error> {
        Err(Error::Internal("a snapshot view is read-only"))
    }

    fn scan(&self, table: Table) -> Result<Vec<Row>, Error> {
        Ok(self.rows(table).to_vec())
    }

    fn scan_from(&self, table: Table, from: &[u8], limit: usize) -> Result<Vec<Row>, Error> {
        let rows = self.rows(table);
        let start = rows.partition_point(|r| r.key.as_slice() < from);
        Ok(rows.iter().skip(start).take(limit).cloned().collect())
    }

    fn last(&self, table: Table) -> Result<Option<Row>, Error> {
        Ok(self.rows(table).last().cloned())
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let rows = self.rows(table);
        Ok(rows
            .binary_search_by(|r| r.key.as_slice().cmp(key))
            .ok()
            .and_then(|i| rows.get(i))
            .map(|r| r.value.clone()))
    }
}

/// SHA-256 (hex) of a table's rows in key order: for each, the key's and the value's length
/// (4 bytes, big-endian) and bytes.
pub fn table_sha256(rows: &[Row]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for row in rows {
        for part in [&row.key, &row.value] {
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            ctx.update(&len.to_be_bytes());
            ctx.update(part);
        }
    }
    hex::encode(ctx.finish().as_ref())
}

//! The RocksDB store: one data directory, one column family per table, every write synced.
#![allow(clippy::disallowed_types, reason = "this is the RocksDB adapter")]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rocksdb::{
    BottommostLevelCompaction, ColumnFamilyDescriptor, CompactOptions, DBCompressionType,
    Direction, FlushOptions, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::{Change, Row, Store, Table};
use crate::error::Error;

/// RocksDB under one directory.
pub struct RocksStore {
    db: DB,
    path: PathBuf,
    meter: OnceLock<Arc<dyn StoreMeter>>,
}

/// What is told of each synced write (a node's metrics). Called on the writing thread, after
/// the write: keep it quick.
pub trait StoreMeter: Send + Sync {
    /// A write of `changes` changes took `took`; `ok` is false when it failed.
    fn written(&self, changes: usize, took: Duration, ok: bool);
}

impl RocksStore {
    /// Has `meter` told of every write from now on (only the first call has an effect).
    pub fn observe(&self, meter: Arc<dyn StoreMeter>) {
        let _ = self.meter.set(meter);
    }

    /// Opens the store, creating the directory and missing column families on first start.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(DBCompressionType::Lz4);
        let families = Table::ALL.iter().map(|t| {
            let mut cf = Options::default();
            cf.set_compression_type(DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(t.name(), cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, families).map_err(|e| store("open", e))?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
            meter: OnceLock::new(),
        })
    }

    /// Opens an existing store for reading only, beside a running server or on a stopped
    /// server's directory. Tables that do not exist yet read as empty.
    ///
    /// A running server may delete a file its compaction replaced between this open reading
    /// the manifest and opening that file; RocksDB then reports the missing file as corruption.
    /// The open is retried a few times (a real corruption fails every time, and is returned).
    pub fn open_read_only(path: &Path) -> Result<Self, Error> {
        const ATTEMPTS: u32 = 8;
        let opts = Options::default();
        let mut attempt = 1;
        loop {
            let opened = DB::list_cf(&opts, path)
                .and_then(|existing| DB::open_cf_for_read_only(&opts, path, existing, false));
            match opened {
                Ok(db) => {
                    return Ok(Self {
                        db,
                        path: path.to_path_buf(),
                        meter: OnceLock::new(),
                    })
                }
                Err(e)
                    if attempt < ATTEMPTS
                        && matches!(
                            e.kind(),
                            rocksdb::ErrorKind::Corruption | rocksdb::ErrorKind::IOError
                        ) =>
                {
                    // The server writes the new manifest before it deletes the files it
                    // replaces, so the next attempt reads a manifest naming files that exist.
                    tracing::debug!(attempt, error = %e, "read-only open raced the server's compaction; retrying");
                    attempt += 1;
                }
                Err(e) => return Err(store("open", e)),
            }
        }
    }

    /// How many entries and how many deletion markers the files of `table` hold (its live
    /// SST files; the memtable is not counted). Once [`Store::purge`] has run, the entries are
    /// exactly the table's rows and no deletion marker is left: deleted values are gone from
    /// the files, not only hidden. For checks and diagnostics.
    pub fn file_entries(&self, table: Table) -> Result<(u64, u64), Error> {
        let files = self.db.live_files().map_err(|e| store("live files", e))?;
        Ok(files
            .iter()
            .filter(|f| f.column_family_name == table.name())
            .fold((0, 0), |(e, d), f| {
                (
                    e.saturating_add(f.num_entries),
                    d.saturating_add(f.num_deletions),
                )
            }))
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, table: Table) -> Result<&rocksdb::ColumnFamily, Error> {
        self.db
            .cf_handle(table.name())
            .ok_or(Error::Internal("column family missing after open"))
    }
}

impl Store for RocksStore {
    fn write(&self, changes: Vec<Change>) -> Result<(), Error> {
        let count = changes.len();
        let started = stopwatch();
        let bytes = changes
            .iter()
            .map(|c| match c {
                Change::Put { key, value, .. } => key.len().saturating_add(value.len()),
                Change::Delete { key, .. } => key.len(),
                Change::DeleteRange { from, to, .. } => from.len().saturating_add(to.len()),
            })
            .fold(0usize, |a, b| a.saturating_add(b.saturating_add(16)));
        let mut batch = WriteBatch::with_capacity_bytes(bytes.saturating_add(64));
        for change in changes {
            match change {
                Change::Put { table, key, value } => batch.put_cf(self.cf(table)?, key, value),
                Change::Delete { table, key } => batch.delete_cf(self.cf(table)?, key),
                Change::DeleteRange { table, from, to } => {
                    batch.delete_range_cf(self.cf(table)?, from, to)
                }
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let written = self
            .db
            .write_opt(batch, &opts)
            .map_err(|e| store("write", e));
        if let Some(meter) = self.meter.get() {
            meter.written(count, started.elapsed(), written.is_ok());
        }
        written
    }

    fn scan(&self, table: Table) -> Result<Vec<Row>, Error> {
        let Some(cf) = self.db.cf_handle(table.name()) else {
            return Ok(Vec::new());
        };
        self.db
            .iterator_cf(cf, IteratorMode::Start)
            .map(row)
            .collect()
    }

    fn scan_from(&self, table: Table, from: &[u8], limit: usize) -> Result<Vec<Row>, Error> {
        let Some(cf) = self.db.cf_handle(table.name()) else {
            return Ok(Vec::new());
        };
        self.db
            .iterator_cf(cf, IteratorMode::From(from, Direction::Forward))
            .take(limit)
            .map(row)
            .collect()
    }

    fn last(&self, table: Table) -> Result<Option<Row>, Error> {
        let Some(cf) = self.db.cf_handle(table.name()) else {
            return Ok(None);
        };
        self.db
            .iterator_cf(cf, IteratorMode::End)
            .next()
            .map(row)
            .transpose()
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let Some(cf) = self.db.cf_handle(table.name()) else {
            return Ok(None);
        };
        self.db.get_cf(cf, key).map_err(|e| store("get", e))
    }

    fn snapshot_scan(&self, tables: &[Table]) -> Result<Vec<(Table, Vec<Row>)>, Error> {
        let snapshot = self.db.snapshot();
        tables
            .iter()
            .map(|t| {
                let rows = snapshot
                    .iterator_cf(self.cf(*t)?, IteratorMode::Start)
                    .map(row)
                    .collect::<Result<Vec<Row>, Error>>()?;
                Ok((*t, rows))
            })
            .collect()
    }

    /// Flushes every column family (the write-ahead log is shared, and a log file is deleted
    /// only once every family has flushed past it), then compacts `table` down to its last
    /// level, which rewrites its files without the deleted entries and deletes the old files.
    fn purge(&self, table: Table) -> Result<(), Error> {
        let families: Vec<&rocksdb::ColumnFamily> = Table::ALL
            .iter()
            .map(|t| self.cf(*t))
            .collect::<Result<_, _>>()?;
        let mut flush = FlushOptions::default();
        flush.set_wait(true);
        self.db
            .flush_cfs_opt(&families, &flush)
            .map_err(|e| store("flush", e))?;
        let mut compact = CompactOptions::default();
        compact.set_exclusive_manual_compaction(true);
        compact.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        self.db
            .compact_range_cf_opt(self.cf(table)?, None::<&[u8]>, None::<&[u8]>, &compact);
        self.db.flush_wal(true).map_err(|e| store("flush", e))
    }
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .finish()
    }
}

type RawItem = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>;

fn row(item: RawItem) -> Result<Row, Error> {
    item.map(|(k, v)| Row {
        key: k.into_vec(),
        value: v.into_vec(),
    })
    .map_err(|e| store("scan", e))
}

fn store(op: &'static str, e: rocksdb::Error) -> Error {
    Error::Store {
        op,
        source: Box::new(e),
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "a synced write's duration is measured wall time, for the node's metrics"
)]
fn stopwatch() -> Instant {
    Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_atomic_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RocksStore::open(dir.path()).unwrap();
            s.write(vec![
                Change::Put {
                    table: Table::Keys,
                    key: b"a".to_vec(),
                    value: b"1".to_vec(),
                },
                Change::Put {
                    table: Table::Aliases,
                    key: b"x".to_vec(),
                    value: b"a".to_vec(),
                },
            ])
            .unwrap();
            s.write(vec![Change::Delete {
                table: Table::Aliases,
                key: b"x".to_vec(),
            }])
            .unwrap();
        }
        let s = RocksStore::open(dir.path()).unwrap();
        assert_eq!(
            s.scan(Table::Keys).unwrap(),
            vec![Row {
                key: b"a".to_vec(),
                value: b"1".to_vec()
            }]
        );
        assert!(s.scan(Table::Aliases).unwrap().is_empty());
        assert!(s.scan(Table::Versions).unwrap().is_empty());
    }
}

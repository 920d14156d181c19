//! Filtered pages of the audit log. Bounded: one call reads at most [`MAX_SCAN`] records and
//! only the checkpoints within the records it read. Explicit: a record or checkpoint that
//! cannot be read stops the query with [`Error::AuditCorrupt`] naming it, rather than being
//! skipped (a verifier that is shown fewer records cannot know what it was not shown).

use super::chain::{key_seq, seq_key, split_record, Checkpoint, Hash, RecordBody};
use crate::error::Error;
use crate::store::{Store, Table};

/// Largest page.
pub const MAX_PAGE: usize = 1000;
/// Most records one query reads while looking for matches.
pub const MAX_SCAN: usize = 20_000;

/// What to look for. Empty strings and zero times match everything.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery<'a> {
    /// Records after this sequence number.
    pub after_seq: u64,
    /// At most this many matches (1 to [`MAX_PAGE`]).
    pub page: usize,
    /// The record's principal, exactly.
    pub principal: &'a str,
    /// The record's key, exactly.
    pub key: &'a str,
    /// The record's action, exactly.
    pub action: &'a str,
    /// The record's decision, exactly.
    pub decision: &'a str,
    /// From this time on, milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// Before this time, milliseconds since the Unix epoch.
    pub until_ms: u64,
}

/// One matching record, its body as it was hashed.
#[derive(Clone, Debug)]
pub struct FoundRecord {
    /// Its sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: Hash,
    /// Its body, byte for byte.
    pub body: String,
}

/// A page of matches, with the checkpoints over the records read.
#[derive(Clone, Debug)]
pub struct AuditPage {
    /// The matches, in sequence order.
    pub records: Vec<FoundRecord>,
    /// Checkpoints after the query's `after_seq` up to `next_after_seq`.
    pub checkpoints: Vec<Checkpoint>,
    /// Where the next page starts: the last sequence number read.
    pub next_after_seq: u64,
    /// True when records after `next_after_seq` exist.
    pub more: bool,
}

/// Reads from `after_seq` on, keeping records that match every filter, until a page is full
/// or [`MAX_SCAN`] records have been read.
pub fn query(store: &dyn Store, q: &AuditQuery<'_>) -> Result<AuditPage, Error> {
    let page = q.page.clamp(1, MAX_PAGE);
    let mut records = Vec::new();
    let mut next = q.after_seq;
    let mut scanned = 0usize;
    let mut more = true;
    while records.len() < page && scanned < MAX_SCAN {
        let rows = store.scan_from(
            Table::AuditRecords,
            &seq_key(next.saturating_add(1)),
            page.min(MAX_SCAN.saturating_sub(scanned)).max(1),
        )?;
        if rows.is_empty() {
            more = false;
            break;
        }
        for row in rows {
            scanned = scanned.saturating_add(1);
            let seq = key_seq(&row.key).ok_or(Error::AuditCorrupt { seq: next })?;
            next = seq;
            let (hash, body) = split_record(&row.value).ok_or(Error::AuditCorrupt { seq })?;
            let parsed: RecordBody =
                serde_json::from_slice(body).map_err(|_| Error::AuditCorrupt { seq })?;
            if matches(q, &parsed) {
                let body =
                    String::from_utf8(body.to_vec()).map_err(|_| Error::AuditCorrupt { seq })?;
                records.push(FoundRecord { seq, hash, body });
                if records.len() >= page {
                    break;
                }
            }
        }
    }
    if more {
        more = !store
            .scan_from(Table::AuditRecords, &seq_key(next.saturating_add(1)), 1)?
            .is_empty();
    }
    Ok(AuditPage {
        records,
        checkpoints: checkpoints_between(store, q.after_seq, next)?,
        next_after_seq: next,
        more,
    })
}

/// The checkpoints covering records `after + 1 ..= upto`: keyed by the sequence number they
/// cover, so at most one per record read.
fn checkpoints_between(store: &dyn Store, after: u64, upto: u64) -> Result<Vec<Checkpoint>, Error> {
    let mut found = Vec::new();
    if upto <= after {
        return Ok(found);
    }
    let span = usize::try_from(upto - after).unwrap_or(usize::MAX);
    for row in store.scan_from(
        Table::AuditCheckpoints,
        &seq_key(after.saturating_add(1)),
        span,
    )? {
        let seq = key_seq(&row.key).ok_or(Error::AuditCorrupt { seq: after })?;
        if seq > upto {
            break;
        }
        let cp: Checkpoint =
            serde_json::from_slice(&row.value).map_err(|_| Error::AuditCorrupt { seq })?;
        found.push(cp);
    }
    Ok(found)
}

fn matches(q: &AuditQuery<'_>, body: &RecordBody) -> bool {
    let e = &body.event;
    (q.principal.is_empty() || e.principal.as_deref() == Some(q.principal))
        && (q.key.is_empty() || e.key.as_deref() == Some(q.key))
        && (q.action.is_empty() || e.action == q.action)
        && (q.decision.is_empty() || e.decision.as_deref() == Some(q.decision))
        && (q.since_ms == 0 || body.time_ms >= q.since_ms)
        && (q.until_ms == 0 || body.time_ms < q.until_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Change, RocksStore};

    fn put(store: &RocksStore, table: Table, seq: u64, value: &[u8]) {
        store
            .write(vec![Change::Put {
                table,
                key: seq_key(seq).to_vec(),
                value: value.to_vec(),
            }])
            .unwrap();
    }

    #[test]
    fn an_unreadable_record_or_checkpoint_stops_the_query_and_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let q = AuditQuery {
            page: 10,
            ..AuditQuery::default()
        };
        let page = query(&store, &q).unwrap();
        assert!(page.records.is_empty() && !page.more);
        // Too short to hold a hash: damaged, and named rather than skipped.
        put(&store, Table::AuditRecords, 1, b"short");
        assert!(matches!(
            query(&store, &q),
            Err(Error::AuditCorrupt { seq: 1 })
        ));
        // A hash and a body that is not a record.
        let mut bad = vec![0u8; 32];
        bad.extend_from_slice(b"not json");
        put(&store, Table::AuditRecords, 1, &bad);
        assert!(matches!(
            query(&store, &q),
            Err(Error::AuditCorrupt { seq: 1 })
        ));
        // Past the records read, a damaged checkpoint is not read at all.
        store
            .write(vec![Change::Delete {
                table: Table::AuditRecords,
                key: seq_key(1).to_vec(),
            }])
            .unwrap();
        put(&store, Table::AuditCheckpoints, 5, b"garbage");
        assert!(query(&store, &q).unwrap().checkpoints.is_empty());
    }
}

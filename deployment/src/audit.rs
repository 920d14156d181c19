//! Reading the audit log off the host: the store under a data directory, an exported file
//! (one JSON line per signer, checkpoint or record, verified in two passes) and the public
//! keys an auditor trusts. The checks themselves are `kms_core::audit`'s.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use kms_core::audit::{
    for_each_record, public_key_from_pem, signer_id, split_record, stored_checkpoints,
    stored_signers, Checkpoint, ExpectedHead, ExportLine, RecordBody, Report, Signers, Verifier,
};
use kms_core::RocksStore;

use crate::error::{read, Error};

/// The RocksDB store under a data directory (`DIR/store`), or `DIR` itself if it is one,
/// opened read-only.
pub fn open_store(data_dir: &Path) -> Result<RocksStore, Error> {
    let nested = data_dir.join("store");
    let path = if nested.join("CURRENT").exists() {
        nested
    } else if data_dir.join("CURRENT").exists() {
        data_dir.to_path_buf()
    } else {
        return Err(Error::Usage(format!(
            "no store found in {} (expected {}/store)",
            data_dir.display(),
            data_dir.display()
        )));
    };
    Ok(RocksStore::open_read_only(&path)?)
}

/// The P-256 public keys (PEM, one or more) in `path`, by signer id.
pub fn trusted_keys(path: &Path) -> Result<Signers, Error> {
    let text = String::from_utf8_lossy(&read(path)?).into_owned();
    let mut keys = Signers::new();
    for block in text.split_inclusive("-----END PUBLIC KEY-----") {
        if let Some(point) = public_key_from_pem(block) {
            keys.insert(signer_id(&point), point);
        }
    }
    if keys.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no P-256 public key (PEM) found",
            path.display()
        )));
    }
    Ok(keys)
}

/// Verifies an exported file, in two passes: signers and checkpoints first, then the records
/// in file order. `trusted` replaces the signers the file names; `from`, `expected` and
/// `extra` are `kms audit verify`'s `--from`, `--expect-head` and `--expect-checkpoint`.
pub fn verify_file(
    path: &Path,
    trusted: Option<&Signers>,
    from: Option<u64>,
    expected: Option<ExpectedHead>,
    extra: Option<Checkpoint>,
) -> Result<Report, Error> {
    let mut signers = Signers::new();
    let mut checkpoints = Vec::new();
    let mut first_record = None;
    for_each_line(path, |n, line| {
        match line.kind.as_str() {
            "signer" => {
                let (id, point) = line.as_signer().ok_or_else(|| bad_line(path, n))?;
                signers.insert(id, point);
            }
            "checkpoint" => {
                checkpoints.push(line.as_checkpoint().ok_or_else(|| bad_line(path, n))?)
            }
            "record" => {
                first_record.get_or_insert(line.seq.unwrap_or(0));
            }
            _ => return Err(bad_line(path, n)),
        }
        Ok(())
    })?;
    // An export may start anywhere; it is checked from its first record.
    let from = from.or(first_record.filter(|&s| s > 1));
    let keys = trusted.unwrap_or(&signers);
    checkpoints.extend(extra);
    let mut verifier = Verifier::new(keys, checkpoints, from);
    if let Some(head) = expected {
        verifier = verifier.expect_head(head);
    }
    for_each_line(path, |n, line| {
        if line.kind == "record" {
            match line.as_record() {
                Some((seq, value)) => verifier.record(seq, &value),
                None => return Err(bad_line(path, n)),
            }
        }
        Ok(())
    })?;
    Ok(verifier.finish())
}

/// The error for line `n` of `path`, which is not an audit export line.
pub fn bad_line(path: &Path, n: usize) -> Error {
    Error::Usage(format!("{}:{n}: not an audit export line", path.display()))
}

/// Calls `f` with each non-empty line of an export, parsed, and its line number.
pub fn for_each_line(
    path: &Path,
    mut f: impl FnMut(usize, ExportLine) -> Result<(), Error>,
) -> Result<(), Error> {
    let file = std::fs::File::open(path).map_err(|source| Error::File {
        what: "cannot read",
        path: path.to_path_buf(),
        source,
    })?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i.saturating_add(1);
        let line = line.map_err(|source| Error::File {
            what: "cannot read",
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(&line).map_err(|_| bad_line(path, n))?;
        f(n, parsed)?;
    }
    Ok(())
}

/// Where `--since` starts: a sequence number, or a time in ms since the epoch.
#[derive(Clone, Copy, Debug)]
#[expect(
    clippy::exhaustive_enums,
    reason = "a position in the log is one or the other; the command matches both"
)]
pub enum Since {
    /// From this sequence number.
    Seq(u64),
    /// From the first record at or after this time, ms since the epoch.
    TimeMs(u64),
}

/// `--since`: a sequence number, or an RFC 3339 time.
pub fn parse_since(s: &str) -> Result<Since, Error> {
    if let Ok(seq) = s.parse::<u64>() {
        return Ok(Since::Seq(seq.max(1)));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        Error::Usage(format!(
            "--since {s}: expected a sequence number or an RFC 3339 time (2026-11-22T10:00:00Z)"
        ))
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Ok(Since::TimeMs(ms))
}

/// Every signer, record and checkpoint of the store under `data_dir` from `since`, in log
/// order (a checkpoint after the record it covers), one [`ExportLine`] at a time to `line`.
pub fn export_store(
    data_dir: &Path,
    since: Since,
    line: &mut dyn FnMut(&ExportLine) -> Result<(), Error>,
) -> Result<(), Error> {
    let store = open_store(data_dir)?;
    for (id, point) in stored_signers(&store)? {
        line(&ExportLine::signer(&id, &point))?;
    }
    let checkpoints: BTreeMap<u64, Checkpoint> = stored_checkpoints(&store)?
        .into_iter()
        .filter_map(Result::ok)
        .map(|c| (c.seq, c))
        .collect();
    let from = match since {
        Since::Seq(s) => s,
        Since::TimeMs(_) => 1,
    };
    let mut started = false;
    for_each_record(&store, from, |seq, row| {
        let Some(seq) = seq else {
            return Ok(());
        };
        if !started {
            if let Since::TimeMs(ms) = since {
                let time = split_record(&row.value)
                    .and_then(|(_, b)| serde_json::from_slice::<RecordBody>(b).ok())
                    .map(|b| b.time_ms);
                if time.is_some_and(|t| t < ms) {
                    return Ok(());
                }
            }
            started = true;
        }
        if let Some(record) = ExportLine::record(seq, &row.value) {
            line(&record)?;
        }
        if let Some(cp) = checkpoints.get(&seq) {
            line(&ExportLine::checkpoint(cp))?;
        }
        Ok::<(), Error>(())
    })?;
    Ok(())
}

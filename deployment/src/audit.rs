//! Reading the audit log off the host: the store under a data directory, an exported file
//! (one JSON line per signer, checkpoint or record, verified in two passes) and the public
//! keys an auditor trusts. The checks themselves are `kms_core::audit`'s.

use std::io::{BufRead, BufReader};
use std::path::Path;

use kms_core::audit::{
    public_key_from_pem, signer_id, Checkpoint, ExpectedHead, ExportLine, Report, Signers, Verifier,
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

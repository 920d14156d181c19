//! Backup bundles on the host: where an export is written (a `.partial` file, checked, synced
//! and renamed, never over an existing bundle), waiting for its approval, and reading a bundle
//! back for inspection. The format is `kms_core::bundle`'s.

use std::io::Write;
use std::path::{Path, PathBuf};

use api::v1::{ApprovalId, BackupChunk, BackupSummary};

use crate::error::Error;

/// Refuses `out` when it, or its `.partial` file, exists: a bundle is never overwritten.
/// Checked before the export is asked for, so that an approved ticket is not spent.
pub fn check_out(out: &Path) -> Result<(), Error> {
    for path in [out.to_path_buf(), partial(out)] {
        if path.exists() {
            return Err(Error::Usage(format!(
                "{} exists; choose another --out (a bundle is never overwritten)",
                path.display()
            )));
        }
    }
    Ok(())
}

fn partial(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Polls the approval until it has run; an error if it ends otherwise.
pub async fn wait_executed(client: &mut api::AdminClient, id: &str) -> Result<(), Error> {
    loop {
        let a = client
            .get_approval(ApprovalId { id: id.to_owned() })
            .await?
            .into_inner();
        match a.state.as_str() {
            "executed" => return Ok(()),
            "pending" => tokio::time::sleep(std::time::Duration::from_secs(2)).await,
            other => {
                return Err(Error::Usage(format!(
                    "approval {id} ended {other}: {}",
                    a.reason
                )))
            }
        }
    }
}

/// Receives a bundle into `out`: the chunks after `first` from `stream`, checked against the
/// SHA-256 the server sent in its summary and parsed, written to `out.partial`, synced and
/// renamed. On failure nothing is left at either path.
pub async fn download(
    out: &Path,
    first: BackupChunk,
    stream: &mut tonic::Streaming<BackupChunk>,
) -> Result<BackupSummary, Error> {
    let tmp = partial(out);
    let file_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::File { what, path, source }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(file_err("cannot create", &tmp))?;
    let result = async {
        let mut bytes = Vec::new();
        let mut next = Some(first);
        let summary = loop {
            let Some(chunk) = next.take() else {
                return Err(Error::Usage(
                    "the export ended before its summary: the bundle is incomplete".into(),
                ));
            };
            if let Some(summary) = chunk.summary {
                break summary;
            }
            bytes.extend_from_slice(&chunk.data);
            next = stream.message().await?;
        };
        let sha = kms_core::audit::sha256_hex(&bytes);
        if sha != summary.bundle_sha256 {
            return Err(Error::Usage(
                "the bundle received does not match the hash the server sent".into(),
            ));
        }
        kms_core::bundle::parse(&bytes).map_err(|source| Error::Bundle {
            file: tmp.clone(),
            source,
        })?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(file_err("cannot write", &tmp))?;
        std::fs::rename(&tmp, out).map_err(file_err("cannot write", out))?;
        Ok(summary)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A bundle read and checked for structure: the bundle, its SHA-256 (hex) and its size.
pub fn load(file: &Path) -> Result<(kms_core::bundle::Bundle, String, usize), Error> {
    let bytes = crate::error::read(file)?;
    let bundle = kms_core::bundle::parse(&bytes).map_err(|source| Error::Bundle {
        file: file.to_path_buf(),
        source,
    })?;
    let sha = kms_core::audit::sha256_hex(&bytes);
    Ok((bundle, sha, bytes.len()))
}

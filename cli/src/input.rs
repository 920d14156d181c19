//! Parsing what a user types: k=v pairs, times, text files.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;

pub(crate) use kms_deployment::error::text_file;

use crate::error::Error;

pub(crate) fn pairs(flag: &str, entries: &[String]) -> Result<HashMap<String, String>, Error> {
    let mut map = HashMap::new();
    for e in entries {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("{flag} expects K=V, got {e:?}")))?;
        if map.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(Error::Usage(format!("{flag}: {k:?} given twice")));
        }
    }
    Ok(map)
}

#[expect(
    clippy::disallowed_methods,
    reason = "the CLI turns durations into absolute times"
)]
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A time given as a duration from now (`90d`) or as an RFC 3339 time.
pub(crate) fn when(flag: &str, s: &str) -> Result<u64, Error> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now_unix().saturating_add(d.as_secs()));
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        Error::Usage(format!(
            "{flag} expects a duration (90d, 12h) or an RFC 3339 time, got {s:?}"
        ))
    })?;
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| Error::Usage(format!("{flag}: {s:?} is before 1970")))
}

/// `--config` of a command that runs on the data directory (offline).
#[derive(Args, Debug)]
pub(crate) struct ConfigArg {
    /// The deployment's config file (default: the development config under --data-dir).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
}

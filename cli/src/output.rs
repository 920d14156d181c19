//! Printing results: one JSON object per line with `--json`, aligned `name  value` lines
//! otherwise.

use std::io::Write;

use serde_json::Value;

use crate::error::Error;

pub(crate) fn emit(as_json: bool, value: &Value) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    let text = if as_json {
        format!("{value}\n")
    } else {
        human(value)
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| Error::File {
            what: "cannot write to",
            path: "stdout".into(),
            source,
        })
}

/// Prints text as it is (policy source, a schema, a diff).
pub(crate) fn raw(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| Error::File {
            what: "cannot write to",
            path: "stdout".into(),
            source,
        })
}

fn human(value: &Value) -> String {
    let Value::Object(map) = value else {
        return format!("{value}\n");
    };
    let width = map.keys().map(String::len).max().unwrap_or(0);
    let mut s = String::new();
    for (k, v) in map {
        let shown = match v {
            Value::String(text) => text.clone(),
            Value::Null => "-".to_owned(),
            other => other.to_string(),
        };
        s.push_str(&format!("{k:width$}  {shown}\n"));
    }
    s
}

/// Seconds since the epoch as an RFC 3339 time; `null` for 0 (never).
pub(crate) fn rfc3339(secs: u64) -> Value {
    if secs == 0 {
        return Value::Null;
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    Value::String(humantime::format_rfc3339_seconds(t).to_string())
}

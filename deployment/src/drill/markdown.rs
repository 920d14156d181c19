//! The drill report for a reader without tools (`report.md`).

use kms_core::drill::Report;

/// Seconds since the epoch as an RFC 3339 time (`?` for 0, never).
fn rfc3339(secs: u64) -> String {
    if secs == 0 {
        return "?".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The drill's phases, in order, as the report times them.
const PHASES: [&str; 8] = [
    "read",
    "isolate",
    "recover",
    "provision",
    "serve",
    "verify",
    "stop",
    "compare",
];

/// The report for a reader without tools.
// long: the report's template, line by line.
pub(super) fn markdown(report: &Report, teardown: &str) -> String {
    let mut md = String::new();
    md.push_str("# Provider-exit drill report\n\n");
    md.push_str(&format!(
        "**Result: {}** — {} of {} key versions verified through the data plane; state \
         reached: `{}`.\n\n",
        if report.passed { "PASSED" } else { "FAILED" },
        report.key_versions_verified,
        report.key_versions_expected,
        report.state.as_str()
    ));
    md.push_str("| | |\n|---|---|\n");
    md.push_str(&format!(
        "| bundle SHA-256 | `{}` |\n",
        report.bundle_sha256
    ));
    md.push_str(&format!(
        "| custody epoch | {} |\n",
        report
            .epoch
            .map_or_else(|| "unknown".to_owned(), |e| e.to_string())
    ));
    if let Some(t) = &report.target_token {
        md.push_str(&format!(
            "| recovered into | token `{}`, {} {}, serial `{}` |\n",
            t.label, t.manufacturer, t.model, t.serial
        ));
    }
    md.push_str(&format!(
        "| started / finished | {} / {} |\n",
        rfc3339(report.started_at),
        rfc3339(report.finished_at)
    ));
    md.push_str(&format!("| software | {} |\n", report.software_version));
    md.push_str(&format!(
        "| signed by | {} |\n\n",
        match (&report.signature, &report.signer) {
            (Some(s), Some(_)) => format!("drill token audit key `{}`", s.key_id),
            _ => "unsigned (the drill stopped before its token held a signing key)".into(),
        }
    ));
    md.push_str("## Checks\n\n| check | result | detail |\n|---|---|---|\n");
    for c in &report.checks {
        md.push_str(&format!(
            "| `{}` | {} | {} |\n",
            c.name,
            if c.passed { "pass" } else { "**FAIL**" },
            c.detail.replace('|', "\\|")
        ));
    }
    md.push_str("\n## Time per phase\n\n```text\n");
    let phases: Vec<(&str, u64)> = PHASES
        .iter()
        .filter_map(|p| Some((*p, *report.timings_ms.get(*p)?)))
        .collect();
    let longest = phases.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    for (name, value) in &phases {
        let width = usize::try_from(value.saturating_mul(40) / longest).unwrap_or(40);
        md.push_str(&format!(
            "{name:<10} {:<40} {value:>7} ms\n",
            "#".repeat(width.max(usize::from(*value > 0)))
        ));
    }
    for (name, what) in [("total", "total"), ("rto", "rto")] {
        if let Some(v) = report.timings_ms.get(name) {
            md.push_str(&format!("{what:<10} {:<40} {v:>7} ms\n", ""));
        }
    }
    md.push_str(
        "```\n\n`rto`: from the start of the drill to the first canary decrypted through the \
         data plane (the recovery time objective as measured here).\n\n",
    );
    md.push_str(&format!("Teardown: {teardown}.\n\n"));
    md.push_str(
        "## How to verify this report\n\n\
         `kms drill verify-report report.json` checks that no byte of it changed since the \
         drill signed it. To check that it was recorded by the production deployment, export \
         its audit log (`kms audit export --out audit.jsonl`) and keep its signer's public key \
         (`kms audit public-key --out signer.pem`), then run `kms drill verify-report \
         report.json --audit-export audit.jsonl --public-key signer.pem`.\n",
    );
    md
}

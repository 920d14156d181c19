//! A drill's signed report: its one canonical form, its signature with the drill token's
//! audit key, its verification, and its record in the live deployment's audit state.

use std::collections::BTreeMap;

use hsm_bridge::Hsm;
use serde::{Deserialize, Serialize};

use super::{Check, State, DOMAIN, FORMAT, LAST_DRILL_KEY};
use crate::error::Error;
use crate::receipt::{
    check_signature, document_message, sign_document, ReceiptError, ReceiptSignature,
};
use crate::store::{Store, Table};

/// A drill report. Its fields are declared in name order, so its JSON has sorted keys; the
/// file is that compact JSON and a newline, in that one form.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// SHA-256 of the bundle file, hex.
    pub bundle_sha256: String,
    /// Every check, in the order run.
    pub checks: Vec<Check>,
    /// The bundle's custody epoch (null if the bundle did not parse).
    pub epoch: Option<u32>,
    /// When the drill ended, Unix seconds.
    pub finished_at: u64,
    /// [`FORMAT`].
    pub format: String,
    /// Versions the bundle's keys imply, all levels.
    pub key_versions_expected: u64,
    /// Versions whose canary decrypted to its recorded hash through the data plane.
    pub key_versions_verified: u64,
    /// Whether every check passed.
    pub passed: bool,
    /// The signature over the domain line and this report's compact JSON without it; absent
    /// when the drill stopped before its token held a signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<ReceiptSignature>,
    /// The drill token's audit signing key: its uncompressed P-256 point, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The version of the software that ran the drill.
    pub software_version: String,
    /// When the drill started, Unix seconds.
    pub started_at: u64,
    /// The last state reached.
    pub state: State,
    /// The token recovered into (`C_GetTokenInfo`).
    pub target_token: Option<recovery::TokenInfo>,
    /// Milliseconds per phase, `rto` (start to the first canary decrypted) and `total`.
    pub timings_ms: BTreeMap<String, u64>,
}

/// Why a report does not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// Not a drill report.
    #[error("not a drill report: {0}")]
    Malformed(String),
    /// A report of a format this build does not know.
    #[error("unknown drill report format {0:?}")]
    Format(String),
    /// Parsed, but not byte for byte as written.
    #[error("the report is not in its canonical form: it was edited after it was written")]
    NotCanonical,
    /// No signature: the drill stopped before its token held a signing key.
    #[error("the report is unsigned (the drill stopped at state {0} before its token held a signing key): it proves nothing")]
    Unsigned(&'static str),
    /// The signature does not verify under the key the report names.
    #[error("the report's signature does not verify under the drill key it names: it was changed after it was signed")]
    BadSignature,
    /// The signature names another key than the report's signer.
    #[error("the report's signature is by key {found}, not by the signer it names ({expected})")]
    OtherSigner {
        /// The id of the key the report names.
        expected: String,
        /// The id the signature names.
        found: String,
    },
}

impl Report {
    /// The bytes the signature is over.
    pub fn message(&self) -> Result<Vec<u8>, Error> {
        let mut unsigned = self.clone();
        unsigned.signature = None;
        document_message(DOMAIN, &unsigned)
    }

    /// Signs the report with the audit signing key in `hsm`, and names that key.
    pub fn sign(&mut self, hsm: &dyn Hsm) -> Result<(), Error> {
        // The signer is named inside what is signed, so its point is read first.
        let key = hsm.p256_signing_key(crate::audit::SIGNING_KEY_LABEL)?;
        self.signer = Some(hex::encode(key.public_point()));
        self.signature = None;
        self.signature = Some(sign_document(hsm, &self.message()?)?);
        Ok(())
    }

    /// The report file's text, in its one form: compact JSON and a newline.
    pub fn to_text(&self) -> Result<String, Error> {
        let mut text =
            serde_json::to_string(self).map_err(|_| Error::Internal("report encoding"))?;
        text.push('\n');
        Ok(text)
    }
}

/// Checks a report file: its format, its one canonical form, and its signature under the
/// key it names. That proves it intact since it was signed; who ran it is proven by a
/// `drill.recorded` record in the production audit log (docs/DRILL.md).
pub fn verify(file: &[u8]) -> Result<Report, ReportError> {
    let report: Report =
        serde_json::from_slice(file).map_err(|e| ReportError::Malformed(e.to_string()))?;
    let canonical = report
        .to_text()
        .map_err(|e| ReportError::Malformed(e.to_string()))?;
    if canonical.as_bytes() != file {
        return Err(ReportError::NotCanonical);
    }
    if report.format != FORMAT {
        return Err(ReportError::Format(report.format));
    }
    let (Some(signature), Some(signer)) = (&report.signature, &report.signer) else {
        return Err(ReportError::Unsigned(report.state.as_str()));
    };
    let point =
        hex::decode(signer).map_err(|_| ReportError::Malformed("signer is not hex".into()))?;
    let message = report
        .message()
        .map_err(|e| ReportError::Malformed(e.to_string()))?;
    check_signature(signature, &message, &point).map_err(|e| match e {
        ReceiptError::OtherSigner { expected, found } => {
            ReportError::OtherSigner { expected, found }
        }
        ReceiptError::Malformed(m) => ReportError::Malformed(m),
        _ => ReportError::BadSignature,
    })?;
    if report.passed != report.checks.iter().all(|c| c.passed) || report.checks.is_empty() {
        return Err(ReportError::Malformed(
            "`passed` does not agree with the checks".into(),
        ));
    }
    Ok(report)
}

/// A recorded drill, as the live deployment keeps the last one and its attestation states it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedDrill {
    /// SHA-256 of the report file.
    pub report_sha256: String,
    /// Whether every check passed.
    pub passed: bool,
    /// When the drill ended, Unix seconds.
    pub finished_at: u64,
    /// The bundle it recovered.
    pub bundle_sha256: String,
    /// When it was recorded, Unix seconds.
    pub recorded_at: u64,
    /// Who recorded it.
    pub recorded_by: String,
}

/// Checks a report sent to be recorded (it must verify as [`verify`] does) and returns what
/// the deployment keeps of it.
pub fn to_record(
    file: &[u8],
    recorded_at: u64,
    recorded_by: &str,
) -> Result<RecordedDrill, ReportError> {
    let report = verify(file)?;
    Ok(RecordedDrill {
        report_sha256: crate::audit::sha256_hex(file),
        passed: report.passed,
        finished_at: report.finished_at,
        bundle_sha256: report.bundle_sha256,
        recorded_at,
        recorded_by: recorded_by.to_owned(),
    })
}

/// Stores `drill` as the last recorded drill.
pub fn store_record(store: &dyn Store, drill: &RecordedDrill) -> Result<(), Error> {
    let value = serde_json::to_vec(drill).map_err(|_| Error::Internal("drill encoding"))?;
    store.write(vec![crate::store::Change::Put {
        table: Table::ServiceState,
        key: LAST_DRILL_KEY.to_vec(),
        value,
    }])
}

/// The last recorded drill in `store`, if any.
pub fn last_recorded(store: &dyn Store) -> Result<Option<RecordedDrill>, Error> {
    match store.get(Table::ServiceState, LAST_DRILL_KEY)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Record {
                table: Table::ServiceState.name(),
                source,
            }),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        reason = "test code: a failed step is a failed test"
    )]

    use super::*;

    fn report() -> Report {
        Report {
            bundle_sha256: "ab".repeat(32),
            checks: vec![Check::new("canaries", true, "3 canaries")],
            epoch: Some(1),
            finished_at: 2,
            format: FORMAT.into(),
            key_versions_expected: 3,
            key_versions_verified: 3,
            passed: true,
            signature: Some(ReceiptSignature {
                algorithm: crate::receipt::ALGORITHM.into(),
                key_id: "00".repeat(16),
                value: "00".repeat(64),
            }),
            signer: Some("04".into()),
            software_version: "0.1.0".into(),
            started_at: 1,
            state: State::Done,
            target_token: Some(recovery::TokenInfo {
                label: "t".into(),
                manufacturer: "m".into(),
                model: "x".into(),
                serial: "s".into(),
            }),
            timings_ms: BTreeMap::from([("total".to_owned(), 5)]),
        }
    }

    /// The report's text is what `json.dumps(r, sort_keys=True, separators=(",", ":"))`
    /// gives, so another tool can rebuild the signed bytes: every object's keys in order.
    #[test]
    fn a_report_is_compact_json_with_sorted_keys_at_every_level() {
        let text = report().to_text().unwrap();
        assert!(text.ends_with("}\n") && !text.contains(": ") && !text.contains(", "));
        // Each top-level key's place, in a report whose checks (which have a `passed` of
        // their own) are empty.
        let mut bare = report();
        bare.checks.clear();
        let top = bare.to_text().unwrap();
        let at = |k: &str| top.find(&format!("\"{k}\":")).unwrap();
        let in_order = |keys: &[&str]| {
            for pair in keys.windows(2) {
                assert!(at(pair[0]) < at(pair[1]), "{} before {}", pair[0], pair[1]);
            }
        };
        in_order(&[
            "bundle_sha256",
            "checks",
            "epoch",
            "finished_at",
            "format",
            "key_versions_expected",
            "key_versions_verified",
            "passed",
            "signature",
            "signer",
            "software_version",
            "started_at",
            "state",
            "target_token",
            "timings_ms",
        ]);
        // Inside a check (its `passed` comes before the report's own).
        let check = text.find("{\"detail\":\"3 canaries\",\"name\":\"canaries\",\"passed\":true}");
        assert!(check.is_some(), "{text}");
        assert!(text.contains("{\"algorithm\":"));
        assert!(text
            .contains("{\"label\":\"t\",\"manufacturer\":\"m\",\"model\":\"x\",\"serial\":\"s\"}"));
    }

    #[test]
    fn a_report_not_as_written_unsigned_or_signed_by_another_key_is_refused() {
        let text = report().to_text().unwrap();
        let spaced = text.replacen("{", "{ ", 1);
        assert!(matches!(
            verify(spaced.as_bytes()),
            Err(ReportError::NotCanonical)
        ));
        let mut unsigned = report();
        unsigned.signature = None;
        assert!(matches!(
            verify(unsigned.to_text().unwrap().as_bytes()),
            Err(ReportError::Unsigned("done"))
        ));
        // A signature of the wrong key id is named as such, before any arithmetic.
        assert!(matches!(
            verify(text.as_bytes()),
            Err(ReportError::OtherSigner { .. })
        ));
    }
}

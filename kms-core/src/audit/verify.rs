//! Verification of a stored or exported log: every record's own hash, the chain of `prev`
//! hashes, sequence numbers without gaps, repeats or reordering, every checkpoint's signature
//! and head, and (when the verifier is given one) a head known from elsewhere.
//!
//! What it proves: records up to the last signed checkpoint (or the expected head) are exactly
//! the ones that were written. Records after it are chained but not signed: someone with
//! write access to the log could drop or rewrite that tail unseen, which the report states as
//! `unanchored`. When the chain was recomputed over an edit, only the signed head shows it,
//! so the break is named as the range from the last good anchor to that head.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::chain::{
    checkpoint_message, record_hash, split_record, Checkpoint, Hash, RecordBody, GENESIS, HASH_LEN,
    PRUNED_ACTION, RECOVERED_ACTION,
};

/// Most skipped sequence numbers remembered while the log is read.
const MAX_SKIPPED: usize = 65_536;

/// Public points of the checkpoint signers, by signer id.
pub type Signers = BTreeMap<String, Vec<u8>>;

/// What verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// True when nothing is wrong.
    pub ok: bool,
    /// Records read.
    pub records: u64,
    /// The first sequence number read.
    pub first_seq: Option<u64>,
    /// The last sequence number read.
    pub last_seq: Option<u64>,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// The last record a verified checkpoint signs.
    pub anchored_to: Option<u64>,
    /// Records after the last checkpoint: intact as a chain, but not yet signed.
    pub unanchored: u64,
    /// The last checkpoint whose signature verified and whose head is in the log.
    pub last_checkpoint: Option<CheckpointSeen>,
    /// Whether a head given from elsewhere (`--expect-head`) was found in the log, matching.
    pub expected_head: Option<bool>,
    /// The first sequence number where the log breaks (for a recomputed chain, the first
    /// record that is no longer proven).
    pub first_bad_seq: Option<u64>,
    /// What kind of break that is.
    pub kind: Option<BreakKind>,
    /// What is wrong there, in words.
    pub problem: Option<String>,
    /// Where the log continues a recovered deployment's chain (`custody.recovered`).
    pub recovered: Option<RecoverySeen>,
}

/// The record where a recovered deployment's log takes over from the backup bundle's head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RecoverySeen {
    /// The `custody.recovered` record.
    pub seq: u64,
    /// The bundle's head it follows: the last record of the old deployment in the bundle.
    pub bundle_head_seq: u64,
    /// That record's hash, hex (check it against a copy of the old log).
    pub bundle_head_hash: String,
    /// SHA-256 of the bundle restored, hex.
    pub bundle_sha256: String,
}

/// A signed checkpoint the verifier saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CheckpointSeen {
    /// The last record it covers.
    pub seq: u64,
    /// When it was signed, in milliseconds since the Unix epoch.
    pub time_ms: u64,
}

/// How a log breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BreakKind {
    /// A record's content changed (its hash, its place in the chain, or a signed head).
    Edited,
    /// Records are absent from the middle of the log.
    Missing,
    /// A record is out of its place.
    Reordered,
    /// A record appears more than once.
    Duplicated,
    /// Records a checkpoint or an expected head covers are absent from the end.
    Truncated,
    /// A record or checkpoint cannot be read.
    Unreadable,
    /// A checkpoint's signature does not verify, or its signer is unknown.
    Signature,
}

/// A head known from outside the log (a checkpoint kept by a SIEM, say): the hash of record
/// `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectedHead {
    /// The record.
    pub seq: u64,
    /// Its hash.
    pub hash: Hash,
}

/// Walks the log in sequence order.
pub struct Verifier<'a> {
    signers: &'a Signers,
    from: Option<u64>,
    checkpoints: BTreeMap<u64, Checkpoint>,
    prev: Option<(u64, Hash)>,
    /// Sequence numbers skipped so far (a later record may still fill one: then it was
    /// reordered, not missing).
    skipped: BTreeSet<u64>,
    expected: Option<ExpectedHead>,
    prune_claim: Option<u64>,
    report: Report,
}

impl<'a> Verifier<'a> {
    /// A verifier trusting `signers`, starting at `from` (the first record otherwise), that
    /// checks `checkpoints`.
    pub fn new(
        signers: &'a Signers,
        checkpoints: impl IntoIterator<Item = Checkpoint>,
        from: Option<u64>,
    ) -> Self {
        let mut v = Self {
            signers,
            from,
            checkpoints: BTreeMap::new(),
            prev: None,
            skipped: BTreeSet::new(),
            expected: None,
            prune_claim: None,
            report: Report::default(),
        };
        for cp in checkpoints {
            if from.is_some_and(|f| cp.seq < f) {
                continue;
            }
            match v.check_signature(&cp) {
                Ok(()) => {
                    v.checkpoints.insert(cp.seq, cp);
                }
                Err(problem) => v.bad(cp.seq, BreakKind::Signature, problem),
            }
        }
        v.report.checkpoints = u64::try_from(v.checkpoints.len()).unwrap_or(u64::MAX);
        v
    }

    /// Also checks that the log holds `head`, a head known from elsewhere: a log cut before
    /// it is reported as truncated, with the first missing sequence number.
    #[must_use]
    pub fn expect_head(mut self, head: ExpectedHead) -> Self {
        self.expected = Some(head);
        self
    }

    /// The first record not yet proven by an anchor.
    fn unproven_from(&self) -> u64 {
        match self.report.anchored_to {
            Some(a) => a.saturating_add(1),
            None => self.from.unwrap_or(1),
        }
    }

    fn anchor(&mut self, seq: u64) {
        self.report.anchored_to = Some(self.report.anchored_to.map_or(seq, |a| a.max(seq)));
    }

    fn check_signature(&self, cp: &Checkpoint) -> Result<(), String> {
        let point = self.signers.get(&cp.key_id).ok_or_else(|| {
            format!(
                "checkpoint {} is signed by unknown key {}",
                cp.seq, cp.key_id
            )
        })?;
        let head: Hash = hex::decode(&cp.head)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| format!("checkpoint {} has a malformed head", cp.seq))?;
        let signature = hex::decode(&cp.signature)
            .map_err(|_| format!("checkpoint {} has a malformed signature", cp.seq))?;
        let message = checkpoint_message(cp.seq, &head, cp.time_ms);
        if crate::signature::p256_verifies(point, &message, &signature) {
            Ok(())
        } else {
            Err(format!("checkpoint {} signature does not verify", cp.seq))
        }
    }

    fn bad(&mut self, seq: u64, kind: BreakKind, problem: String) {
        if self.report.first_bad_seq.is_none_or(|s| seq < s) {
            self.report.first_bad_seq = Some(seq);
            self.report.kind = Some(kind);
            self.report.problem = Some(problem);
        }
    }

    /// Checks the record stored under `seq` (`value` is hash ‖ body).
    // long: every check of one record, in the order a verification reports them.
    pub fn record(&mut self, seq: u64, value: &[u8]) {
        if self.from.is_some_and(|f| seq < f) {
            return;
        }
        self.report.records = self.report.records.saturating_add(1);
        self.report.first_seq.get_or_insert(seq);
        // `last_seq` is the highest read so far: a lower one returns early below.
        match self.report.last_seq {
            Some(max) if seq <= max => {
                if self.skipped.remove(&seq) {
                    self.bad(
                        seq,
                        BreakKind::Reordered,
                        format!("record {seq} is out of order: it comes after record {max}"),
                    );
                } else {
                    self.bad(
                        seq,
                        BreakKind::Duplicated,
                        format!("record {seq} appears more than once"),
                    );
                }
                return;
            }
            Some(max) if seq > max.saturating_add(1) => {
                // Remembered (within a bound) in case the skipped records come later, out of
                // order; beyond the bound a gap is reported as missing at once.
                let gap = max.saturating_add(1)..seq;
                let len = usize::try_from(seq - gap.start).unwrap_or(usize::MAX);
                if self.skipped.len().saturating_add(len) <= MAX_SKIPPED {
                    self.skipped.extend(gap);
                } else {
                    self.bad(
                        gap.start,
                        BreakKind::Missing,
                        format!(
                            "records {}..{} are missing",
                            gap.start,
                            seq.saturating_sub(1)
                        ),
                    );
                }
            }
            _ => {}
        }
        self.report.last_seq = Some(seq);
        let prev = self
            .prev
            .replace((seq, record_hash(value.get(HASH_LEN..).unwrap_or_default())));
        let Some((stored, body_bytes)) = split_record(value) else {
            self.bad(
                seq,
                BreakKind::Unreadable,
                format!("record {seq} is truncated"),
            );
            return;
        };
        let hash = record_hash(body_bytes);
        if hash != stored {
            self.bad(
                seq,
                BreakKind::Edited,
                format!("record {seq} was edited: it does not match its hash"),
            );
            return;
        }
        let Ok(body) = serde_json::from_slice::<RecordBody>(body_bytes) else {
            self.bad(
                seq,
                BreakKind::Unreadable,
                format!("record {seq} is unreadable"),
            );
            return;
        };
        if body.seq != seq {
            self.bad(
                seq,
                BreakKind::Reordered,
                format!("record {seq} is out of place: it holds record {}", body.seq),
            );
            return;
        }
        match prev {
            Some((prev_seq, prev_hash))
                if prev_seq.saturating_add(1) == seq && body.prev != hex::encode(prev_hash) =>
            {
                self.bad(
                    prev_seq,
                    BreakKind::Edited,
                    format!("record {prev_seq} is not the record that record {seq} follows"),
                );
            }
            Some(_) => {}
            None if seq == 1 && self.from.is_none() && body.prev != hex::encode(GENESIS) => {
                self.bad(
                    1,
                    BreakKind::Edited,
                    "record 1 does not start the chain".to_owned(),
                );
            }
            None => {}
        }
        if let Some(cp) = self.checkpoints.get(&seq) {
            if cp.head == hex::encode(hash) {
                let seen = CheckpointSeen {
                    seq,
                    time_ms: cp.time_ms,
                };
                self.report.last_checkpoint = Some(seen);
                self.anchor(seq);
            } else {
                let from = self.unproven_from();
                self.bad(
                    from,
                    BreakKind::Edited,
                    format!(
                        "records {from}..{seq} were changed after they were signed: record \
                         {seq} is not the one checkpoint {seq} signs (the chain was recomputed \
                         over them, so which of them cannot be told)"
                    ),
                );
            }
        }
        if let Some(expected) = self.expected.filter(|e| e.seq == seq) {
            if expected.hash == hash {
                self.report.expected_head = Some(true);
                self.anchor(seq);
            } else {
                self.report.expected_head = Some(false);
                let from = self.unproven_from();
                self.bad(
                    from,
                    BreakKind::Edited,
                    format!(
                        "records {from}..{seq} were changed: record {seq} is not the expected \
                         head"
                    ),
                );
            }
        }
        if body.event.action == RECOVERED_ACTION && self.report.records == 1 {
            let detail = |k: &str| body.event.detail.get(k).cloned().unwrap_or_default();
            let head_seq: Option<u64> = detail("bundle_head_seq").parse().ok();
            if head_seq.map(|h| h.saturating_add(1)) == Some(seq)
                && detail("bundle_head_hash") == body.prev
            {
                self.report.recovered = Some(RecoverySeen {
                    seq,
                    bundle_head_seq: seq.saturating_sub(1),
                    bundle_head_hash: body.prev.clone(),
                    bundle_sha256: detail("bundle_sha256"),
                });
            } else {
                self.bad(
                    seq,
                    BreakKind::Edited,
                    format!("record {seq} claims a recovery but does not follow the head it names"),
                );
            }
        }
        if body.event.action == PRUNED_ACTION {
            self.prune_claim = body
                .event
                .detail
                .get("first_retained")
                .and_then(|s| s.parse().ok());
        }
    }

    /// Reports on everything seen.
    pub fn finish(mut self) -> Report {
        let last = self.report.last_seq;
        if let Some((&cp_seq, _)) = self.checkpoints.iter().next_back() {
            if last.is_none_or(|l| cp_seq > l) {
                let missing = last.map_or(self.from.unwrap_or(1), |l| l.saturating_add(1));
                self.bad(
                    missing,
                    BreakKind::Truncated,
                    format!("the log is truncated: checkpoint {cp_seq} signs records from {missing} on that are gone"),
                );
            }
        }
        if let Some(expected) = self.expected {
            if last.is_none_or(|l| expected.seq > l) {
                let missing = last.map_or(self.from.unwrap_or(1), |l| l.saturating_add(1));
                self.report.expected_head = Some(false);
                self.bad(
                    missing,
                    BreakKind::Truncated,
                    format!(
                        "the log is truncated: it ends before the expected head, record {}; \
                         records from {missing} on are gone",
                        expected.seq
                    ),
                );
            }
        }
        if let Some(&gap) = self.skipped.first() {
            let mut to = gap;
            while self.skipped.contains(&to.saturating_add(1)) {
                to = to.saturating_add(1);
            }
            self.bad(
                gap,
                BreakKind::Missing,
                format!("records {gap}..{to} are missing"),
            );
        }
        // A recovered log starts at its `custody.recovered` record (the old records stay with
        // the old deployment and its SIEM copy), or later when pruned since.
        let recovered_from = self.report.recovered.as_ref().map(|r| r.seq);
        if self.from.is_none() && recovered_from.is_none() {
            if let Some(first) = self.report.first_seq {
                let expected = self.prune_claim.unwrap_or(1);
                if first > expected {
                    self.bad(
                        expected,
                        BreakKind::Missing,
                        format!(
                            "records {expected}..{} are missing",
                            first.saturating_sub(1)
                        ),
                    );
                } else if first > 1 && !self.checkpoints.contains_key(&first) {
                    self.bad(
                        first,
                        BreakKind::Missing,
                        format!("first retained record {first} is not anchored by a checkpoint"),
                    );
                }
            }
        }
        self.report.unanchored = match (last, self.report.anchored_to) {
            (Some(l), Some(a)) => l.saturating_sub(a),
            (Some(_), None) => self.report.records,
            _ => 0,
        };
        self.report.ok = self.report.first_bad_seq.is_none();
        self.report
    }
}

impl std::fmt::Debug for Verifier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

//! Verification of a stored or exported log: every record's own hash, the chain of `prev`
//! hashes, sequence numbers without gaps, and every checkpoint's signature and head.

use std::collections::BTreeMap;

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use serde::Serialize;

use super::chain::{
    checkpoint_message, record_hash, split_record, Checkpoint, Hash, RecordBody, GENESIS, HASH_LEN,
    PRUNED_ACTION,
};

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
    /// The first sequence number where the log breaks.
    pub first_bad_seq: Option<u64>,
    /// What is wrong there.
    pub problem: Option<String>,
}

/// Walks the log in sequence order.
pub struct Verifier<'a> {
    signers: &'a Signers,
    from: Option<u64>,
    checkpoints: BTreeMap<u64, Checkpoint>,
    prev: Option<(u64, Hash)>,
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
                Err(problem) => v.bad(cp.seq, problem),
            }
        }
        v.report.checkpoints = u64::try_from(v.checkpoints.len()).unwrap_or(u64::MAX);
        v
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
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(&checkpoint_message(cp.seq, &head, cp.time_ms), &signature)
            .map_err(|_| format!("checkpoint {} signature does not verify", cp.seq))
    }

    fn bad(&mut self, seq: u64, problem: String) {
        if self.report.first_bad_seq.is_none_or(|s| seq < s) {
            self.report.first_bad_seq = Some(seq);
            self.report.problem = Some(problem);
        }
    }

    /// Checks the record stored under `seq` (`value` is hash ‖ body).
    pub fn record(&mut self, seq: u64, value: &[u8]) {
        if self.from.is_some_and(|f| seq < f) {
            return;
        }
        self.report.records = self.report.records.saturating_add(1);
        self.report.first_seq.get_or_insert(seq);
        self.report.last_seq = Some(seq);
        let prev = self
            .prev
            .replace((seq, record_hash(value.get(HASH_LEN..).unwrap_or_default())));
        if let Some((prev_seq, _)) = prev {
            let expected = prev_seq.saturating_add(1);
            if seq != expected {
                self.bad(
                    expected,
                    format!("records {expected}..{} are missing", seq.saturating_sub(1)),
                );
            }
        }
        let Some((stored, body_bytes)) = split_record(value) else {
            self.bad(seq, format!("record {seq} is truncated"));
            return;
        };
        let hash = record_hash(body_bytes);
        if hash != stored {
            self.bad(
                seq,
                format!("record {seq} was edited: it does not match its hash"),
            );
            return;
        }
        let Ok(body) = serde_json::from_slice::<RecordBody>(body_bytes) else {
            self.bad(seq, format!("record {seq} is unreadable"));
            return;
        };
        if body.seq != seq {
            self.bad(
                seq,
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
                    format!("record {prev_seq} is not the record that record {seq} follows"),
                );
            }
            Some(_) => {}
            None if seq == 1 && self.from.is_none() && body.prev != hex::encode(GENESIS) => {
                self.bad(1, "record 1 does not start the chain".to_owned());
            }
            None => {}
        }
        if let Some(cp) = self.checkpoints.get(&seq) {
            if cp.head == hex::encode(hash) {
                self.report.anchored_to = Some(seq);
            } else {
                self.bad(
                    seq,
                    format!("record {seq} differs from the one its signed checkpoint covers"),
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
                    format!("the log is truncated: checkpoint {cp_seq} signs records from {missing} on that are gone"),
                );
            }
        }
        if self.from.is_none() {
            if let Some(first) = self.report.first_seq {
                let expected = self.prune_claim.unwrap_or(1);
                if first > expected {
                    self.bad(
                        expected,
                        format!(
                            "records {expected}..{} are missing",
                            first.saturating_sub(1)
                        ),
                    );
                } else if first > 1 && !self.checkpoints.contains_key(&first) {
                    self.bad(
                        first,
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

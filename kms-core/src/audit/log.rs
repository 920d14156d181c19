//! The audit writer. One thread owns the chain's head: it assigns sequence numbers, hashes
//! records, and writes every record waiting at that moment in one synced batch (group
//! commit), then answers each waiting caller. A caller learns its record's sequence number
//! only once the record is durable; if the write fails, every caller in the batch is told so
//! and the head does not move, so a failed write leaves no gap.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use hsm_bridge::{Hsm, SigningKey, GCM_NONCE_LEN};
use parking_lot::Mutex;
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};
use tokio::sync::oneshot;

use super::chain::{
    checkpoint_message, encode_chained, encode_record, key_seq, record_hash, seq_key, signer_id,
    split_record, AuditEvent, Checkpoint, Hash, RecordBody, GENESIS, PRUNED_ACTION,
};
use super::observe::AuditObserver;
use crate::clock::Clock;
use crate::context::EncryptionContext;
use crate::error::Error;
use crate::store::{Change, Store, Table};

/// Label of the checkpoint signing key pair in the HSM.
pub const SIGNING_KEY_LABEL: &str = "sovereign-kms-audit-signing-v1";
/// Most records written in one batch.
const MAX_BATCH: usize = 4096;
/// Store key of the wrapped context-digest key in [`Table::AuditMeta`].
pub(crate) const CONTEXT_KEY: &[u8] = b"context_key";
/// AAD of its wrap under the root key.
pub(crate) const CONTEXT_KEY_AAD: &[u8] = b"sovereign-kms/audit-context-key/v1";
const CONTEXT_KEY_LEN: usize = 32;
/// Store key prefix of the signers' public points in [`Table::AuditMeta`].
pub(crate) const SIGNER_PREFIX: &[u8] = b"signer/";

/// How often checkpoints are signed and how long records are kept.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct AuditConfig {
    /// Sign a checkpoint after this many records.
    pub checkpoint_every: u64,
    /// Sign a checkpoint at least this often while records arrive.
    pub checkpoint_interval: Duration,
    /// Prune records older than this, keeping the log verifiable; `None` keeps everything.
    pub retention: Option<Duration>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: 10_000,
            checkpoint_interval: Duration::from_secs(60),
            retention: None,
        }
    }
}

impl AuditConfig {
    /// A configuration with the given checkpoint cadence and retention.
    pub fn new(every: u64, interval: Duration, retention: Option<Duration>) -> Self {
        Self {
            checkpoint_every: every.max(1),
            checkpoint_interval: interval.max(Duration::from_millis(10)),
            retention,
        }
    }
}

/// Why a record could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The store refused the write; nothing may be served unaudited.
    #[error("audit log unavailable")]
    Unavailable,
    /// The log has been closed.
    #[error("audit log closed")]
    Closed,
}

/// A record on its way to the store.
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Result<u64, AuditError>>);

impl Pending {
    /// Waits until the record is durable; returns its sequence number.
    pub async fn wait(self) -> Result<u64, AuditError> {
        self.0.await.unwrap_or(Err(AuditError::Closed))
    }

    /// The same, for threads that may block (never an async worker, where it panics).
    pub fn wait_blocking(self) -> Result<u64, AuditError> {
        self.0.blocking_recv().unwrap_or(Err(AuditError::Closed))
    }
}

/// Where a record's sequence number (or the reason it has none) goes.
type Reply = oneshot::Sender<Result<u64, AuditError>>;

enum Msg {
    /// An event, already serialised to JSON.
    Append(Vec<u8>, Reply),
    /// The same, with a checkpoint signed over it in the same write.
    AppendCheckpointed(Vec<u8>, Reply),
    Signer(Signer),
    Observer(Arc<dyn AuditObserver>),
    Close(oneshot::Sender<()>),
}

struct Signer {
    hsm: Arc<dyn Hsm>,
    key: SigningKey,
    id: String,
}

/// The tamper-evident audit log.
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
    context_key: OnceLock<hmac::Key>,
    signer_id: OnceLock<String>,
    store: Arc<dyn Store>,
}

impl AuditLog {
    /// Opens the log on `store`, continuing its chain. Records can be appended at once;
    /// checkpoints are signed once [`attach_hsm`](Self::attach_hsm) has given it the HSM.
    /// Refuses to open a log whose last record does not match its own hash.
    pub fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: AuditConfig,
    ) -> Result<Self, Error> {
        let (next_seq, head) = match store.last(Table::AuditRecords)? {
            None => (1, GENESIS),
            Some(row) => {
                let seq = key_seq(&row.key).ok_or(Error::AuditCorrupt { seq: 0 })?;
                let (hash, body) = split_record(&row.value).ok_or(Error::AuditCorrupt { seq })?;
                if record_hash(body) != hash {
                    return Err(Error::AuditCorrupt { seq });
                }
                (seq.saturating_add(1), hash)
            }
        };
        let last_row = store.last(Table::AuditCheckpoints)?;
        let last_checkpoint = last_row
            .as_ref()
            .and_then(|row| key_seq(&row.key))
            .unwrap_or(0);
        let last_signed_ms = last_row
            .and_then(|row| serde_json::from_slice::<Checkpoint>(&row.value).ok())
            .map(|c| c.time_ms);
        let first_retained = store
            .scan_from(Table::AuditRecords, &seq_key(0), 1)?
            .first()
            .and_then(|r| key_seq(&r.key))
            .unwrap_or(next_seq);
        let (tx, rx) = mpsc::channel();
        let now = clock.now_unix_ms();
        let writer = Writer {
            store: store.clone(),
            clock,
            config,
            rx,
            next_seq,
            head,
            unanchored: next_seq.saturating_sub(1).saturating_sub(last_checkpoint),
            last_checkpoint_ms: now,
            last_prune_ms: 0,
            first_retained,
            signer: None,
            observer: None,
            last_signed_ms,
        };
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())
            .map_err(|_| Error::Internal("cannot start the audit writer thread"))?;
        tracing::info!(next_seq, "audit log open");
        Ok(Self {
            tx,
            thread: Mutex::new(Some(thread)),
            context_key: OnceLock::new(),
            signer_id: OnceLock::new(),
            store,
        })
    }

    /// Finds or creates the checkpoint signing key in the HSM and the context-digest key
    /// (random, wrapped under the root key), records the signer's public key, and signs a
    /// checkpoint over any records not yet anchored.
    pub fn attach_hsm(&self, hsm: Arc<dyn Hsm>) -> Result<(), Error> {
        let key = hsm.p256_signing_key(SIGNING_KEY_LABEL)?;
        let id = signer_id(key.public_point());
        let mut meta_key = SIGNER_PREFIX.to_vec();
        meta_key.extend_from_slice(id.as_bytes());
        if self.store.get(Table::AuditMeta, &meta_key)?.is_none() {
            self.store.write(vec![Change::Put {
                table: Table::AuditMeta,
                key: meta_key,
                value: key.public_point().to_vec(),
            }])?;
            tracing::info!(signer = %id, "audit checkpoint signing key recorded");
        }
        let context_key = self.context_key(hsm.as_ref())?;
        let _ = self.context_key.set(context_key);
        let _ = self.signer_id.set(id.clone());
        self.tx
            .send(Msg::Signer(Signer { hsm, key, id }))
            .map_err(|_| Error::Internal("audit writer stopped"))
    }

    fn context_key(&self, hsm: &dyn Hsm) -> Result<hmac::Key, Error> {
        let root = hsm.root_key();
        if let Some(wrapped) = self.store.get(Table::AuditMeta, CONTEXT_KEY)? {
            let (nonce, sealed) = wrapped
                .split_first_chunk::<GCM_NONCE_LEN>()
                .ok_or(Error::AuditCorrupt { seq: 0 })?;
            let raw = hsm.aes_gcm_decrypt(root, nonce, CONTEXT_KEY_AAD, sealed)?;
            return Ok(hmac::Key::new(hmac::HMAC_SHA256, raw.expose_secret()));
        }
        let mut raw = SecretBox::new(Box::new([0u8; CONTEXT_KEY_LEN]));
        hsm.random(raw.expose_secret_mut())?;
        let mut nonce = [0u8; GCM_NONCE_LEN];
        hsm.random(&mut nonce)?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend(hsm.aes_gcm_encrypt(root, &nonce, CONTEXT_KEY_AAD, raw.expose_secret())?);
        self.store.write(vec![Change::Put {
            table: Table::AuditMeta,
            key: CONTEXT_KEY.to_vec(),
            value: wrapped,
        }])?;
        Ok(hmac::Key::new(hmac::HMAC_SHA256, raw.expose_secret()))
    }

    /// Queues one record. Await the result before acting on the request it describes.
    pub fn submit(&self, event: AuditEvent) -> Pending {
        let (tx, rx) = oneshot::channel();
        match serde_json::to_vec(&event) {
            // If the writer is gone the sender is dropped with the message, and the wait says
            // Closed.
            Ok(json) => drop(self.tx.send(Msg::Append(json, tx))),
            Err(e) => {
                tracing::error!(error = %e, "audit event could not be encoded");
                let _ = tx.send(Err(AuditError::Unavailable));
            }
        }
        Pending(rx)
    }

    /// Queues one record and has a checkpoint signed over it (and everything before it) in
    /// the same write: a backup export names this record as the head its bundle continues
    /// from. Without a signer the record is written unsigned, as any other.
    pub fn submit_checkpointed(&self, event: AuditEvent) -> Pending {
        let (tx, rx) = oneshot::channel();
        match serde_json::to_vec(&event) {
            Ok(json) => drop(self.tx.send(Msg::AppendCheckpointed(json, tx))),
            Err(e) => {
                tracing::error!(error = %e, "audit event could not be encoded");
                let _ = tx.send(Err(AuditError::Unavailable));
            }
        }
        Pending(rx)
    }

    /// Has `observer` told of every batch, failure and checkpoint from now on (and at once of
    /// the last checkpoint in the store).
    pub fn observe(&self, observer: Arc<dyn AuditObserver>) {
        // A stopped writer has nothing more to tell.
        drop(self.tx.send(Msg::Observer(observer)));
    }

    /// Keyed digest of an encryption context, so that records can be correlated by context
    /// without holding its values. `None` for an empty context or before the HSM is attached.
    pub fn context_digest(&self, context: &EncryptionContext) -> Option<String> {
        if context.is_empty() {
            return None;
        }
        let key = self.context_key.get()?;
        let mut canonical = Vec::new();
        context.encode_canonical(&mut canonical).ok()?;
        Some(hex::encode(hmac::sign(key, &canonical).as_ref()))
    }

    /// The id of the key signing checkpoints, once attached.
    pub fn signer(&self) -> Option<&str> {
        self.signer_id.get().map(String::as_str)
    }

    /// Signs a final checkpoint over every record written and stops the writer. Records
    /// submitted afterwards are refused with [`AuditError::Closed`]. Blocks: call it from a
    /// thread that may block, never from an async worker.
    pub fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).is_ok() {
            let _ = rx.blocking_recv();
        }
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("signer", &self.signer_id.get())
            .finish_non_exhaustive()
    }
}

struct Writer {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: AuditConfig,
    rx: mpsc::Receiver<Msg>,
    next_seq: u64,
    head: Hash,
    /// Records written since the last checkpoint.
    unanchored: u64,
    last_checkpoint_ms: u64,
    last_prune_ms: u64,
    first_retained: u64,
    signer: Option<Signer>,
    observer: Option<Arc<dyn AuditObserver>>,
    /// When the last checkpoint in the store was signed.
    last_signed_ms: Option<u64>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let first = match self.until_checkpoint() {
                Some(wait) => self.rx.recv_timeout(wait),
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let mut msgs = Vec::new();
            match first {
                Ok(m) => msgs.push(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.write(Vec::new(), true);
                    return;
                }
            }
            while msgs.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
            let mut appends = Vec::with_capacity(msgs.len());
            let mut close = None;
            // A new signer first anchors whatever it finds unsigned (after a crash, say).
            let mut anchor = false;
            for m in msgs {
                match m {
                    Msg::Append(event, reply) => appends.push((event, reply)),
                    Msg::AppendCheckpointed(event, reply) => {
                        appends.push((event, reply));
                        anchor = true;
                    }
                    Msg::Signer(signer) => {
                        self.signer = Some(signer);
                        anchor |= self.unanchored > 0;
                    }
                    Msg::Observer(observer) => {
                        if let Some(t) = self.last_signed_ms {
                            observer.checkpointed(t);
                        }
                        self.observer = Some(observer);
                    }
                    Msg::Close(reply) => close = Some(reply),
                }
            }
            self.write(appends, close.is_some() || anchor);
            self.prune_if_due();
            if let Some(reply) = close {
                let _ = reply.send(());
                return;
            }
        }
    }

    /// How long until a time-based checkpoint is due; `None` when nothing needs one.
    fn until_checkpoint(&self) -> Option<Duration> {
        if self.unanchored == 0 || self.signer.is_none() {
            return None;
        }
        let elapsed = self
            .clock
            .now_unix_ms()
            .saturating_sub(self.last_checkpoint_ms);
        let interval =
            u64::try_from(self.config.checkpoint_interval.as_millis()).unwrap_or(u64::MAX);
        Some(Duration::from_millis(
            interval.saturating_sub(elapsed).max(1),
        ))
    }

    /// Writes `appends`; `checkpoint_now` signs a checkpoint even if none is due.
    fn write(&mut self, appends: Vec<(Vec<u8>, Reply)>, checkpoint_now: bool) {
        let now = self.clock.now_unix_ms();
        let mut changes = Vec::with_capacity(appends.len().saturating_add(1));
        let mut seq = self.next_seq;
        let mut head = self.head;
        let mut replies = Vec::with_capacity(appends.len());
        for (event, reply) in appends {
            let (hash, value) = encode_chained(seq, &head, now, &event);
            changes.push(Change::Put {
                table: Table::AuditRecords,
                key: seq_key(seq).to_vec(),
                value,
            });
            replies.push((reply, seq));
            head = hash;
            seq = seq.saturating_add(1);
        }
        let written = u64::try_from(replies.len()).unwrap_or(u64::MAX);
        let unanchored = self.unanchored.saturating_add(written);
        let interval =
            u64::try_from(self.config.checkpoint_interval.as_millis()).unwrap_or(u64::MAX);
        let due = unanchored > 0
            && (checkpoint_now
                || unanchored >= self.config.checkpoint_every
                || now.saturating_sub(self.last_checkpoint_ms) >= interval);
        let checkpoint = if due {
            self.sign(seq.saturating_sub(1), &head, now)
        } else {
            None
        };
        if let Some((cp_seq, value)) = &checkpoint {
            changes.push(Change::Put {
                table: Table::AuditCheckpoints,
                key: seq_key(*cp_seq).to_vec(),
                value: value.clone(),
            });
        }
        if changes.is_empty() {
            return;
        }
        let started = monotonic();
        let result = self.store.write(changes);
        let took = started.elapsed();
        match result {
            Ok(()) => {
                self.next_seq = seq;
                self.head = head;
                if checkpoint.is_some() {
                    self.unanchored = 0;
                    self.last_checkpoint_ms = now;
                    self.last_signed_ms = Some(now);
                } else {
                    self.unanchored = unanchored;
                }
                if let Some(o) = &self.observer {
                    if !replies.is_empty() {
                        o.committed(replies.len(), took);
                    }
                    if checkpoint.is_some() {
                        o.checkpointed(now);
                    }
                }
                for (reply, seq) in replies {
                    let _ = reply.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = written, "audit log write failed; requests are refused until it succeeds");
                if let Some(o) = &self.observer {
                    o.failed(replies.len());
                }
                for (reply, _) in replies {
                    let _ = reply.send(Err(AuditError::Unavailable));
                }
            }
        }
    }

    /// A signed checkpoint over `head` at `seq`, encoded for the store; `None` (and logged)
    /// when no signer is attached or the HSM refuses.
    fn sign(&self, seq: u64, head: &Hash, now: u64) -> Option<(u64, Vec<u8>)> {
        let signer = self.signer.as_ref()?;
        let message = checkpoint_message(seq, head, now);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &message).as_ref(),
        );
        match signer.hsm.ecdsa_sign_digest(&signer.key, &digest) {
            Ok(signature) => {
                let checkpoint = Checkpoint {
                    seq,
                    head: hex::encode(head),
                    time_ms: now,
                    key_id: signer.id.clone(),
                    signature: hex::encode(signature),
                };
                serde_json::to_vec(&checkpoint).ok().map(|v| (seq, v))
            }
            Err(e) => {
                tracing::error!(error = %e, seq, "audit checkpoint could not be signed; will retry");
                None
            }
        }
    }

    /// Drops records older than the retention window, at most once a minute. The cut is made
    /// at a signed checkpoint, which keeps the first retained record anchored, and an
    /// `audit.pruned` record says where the retained log starts.
    fn prune_if_due(&mut self) {
        let Some(retention) = self.config.retention else {
            return;
        };
        let now = self.clock.now_unix_ms();
        if now.saturating_sub(self.last_prune_ms) < 60_000 {
            return;
        }
        self.last_prune_ms = now;
        let cutoff = now.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let checkpoints = match self.store.scan(Table::AuditCheckpoints) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "audit retention: cannot read checkpoints");
                return;
            }
        };
        let cut = checkpoints
            .iter()
            .filter_map(|r| serde_json::from_slice::<Checkpoint>(&r.value).ok())
            .filter(|c| c.time_ms <= cutoff && c.seq > self.first_retained)
            .map(|c| c.seq)
            .max();
        let Some(cut) = cut else {
            return;
        };
        let mut event = AuditEvent::new(PRUNED_ACTION, "ok");
        event.detail = BTreeMap::from([
            ("first_retained".to_owned(), cut.to_string()),
            ("previous_first".to_owned(), self.first_retained.to_string()),
        ]);
        let body = RecordBody {
            seq: self.next_seq,
            prev: hex::encode(self.head),
            time_ms: now,
            event,
        };
        let Ok((hash, value)) = encode_record(&body) else {
            return;
        };
        let changes = vec![
            Change::DeleteRange {
                table: Table::AuditRecords,
                from: seq_key(0).to_vec(),
                to: seq_key(cut).to_vec(),
            },
            Change::DeleteRange {
                table: Table::AuditCheckpoints,
                from: seq_key(0).to_vec(),
                to: seq_key(cut).to_vec(),
            },
            Change::Put {
                table: Table::AuditRecords,
                key: seq_key(self.next_seq).to_vec(),
                value,
            },
        ];
        match self.store.write(changes) {
            Ok(()) => {
                tracing::info!(first_retained = cut, "audit records past retention pruned");
                self.first_retained = cut;
                self.next_seq = self.next_seq.saturating_add(1);
                self.head = hash;
                self.unanchored = self.unanchored.saturating_add(1);
            }
            Err(e) => tracing::warn!(error = %e, "audit retention: prune failed; will retry"),
        }
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "measures how long a durable write takes, for the node's metrics"
)]
fn monotonic() -> Instant {
    Instant::now()
}

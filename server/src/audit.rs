//! The server's side of the audit log: request ids, the record of each request, and failing
//! closed when the record cannot be written.

use std::sync::Arc;
use std::time::Instant;

use kms_core::audit::{AuditError, AuditEvent, AuditLog, Pending};
use kms_core::{Caller, EncryptionContext, Error, ErrorClass, KeyState, Principal};
use tonic::Status;

/// The request-id header, read from the caller and echoed on the response.
pub const REQUEST_ID: &str = "x-request-id";

/// What a caller is told when its request could not be audited (documented in SECURITY.md).
pub const AUDIT_UNAVAILABLE: &str = "audit log unavailable; the request was refused";

/// The audit log as the services use it.
#[derive(Clone, Debug)]
pub struct Audit {
    log: Option<Arc<AuditLog>>,
}

/// Longest request id a caller may send; a longer one, or one with other characters than
/// `A-Z a-z 0-9 . _ -`, is not recorded (the server's own id is).
pub const MAX_CLIENT_REQUEST_ID: usize = 64;

/// A request's ids: the server's own (128 random bits, so one request's id says nothing about
/// another's) and the caller's `x-request-id` when it is a sane token. Both go into the audit
/// record; the response echoes the caller's id, or the server's when the caller sent none.
#[derive(Clone, Debug)]
pub(crate) struct RequestTag {
    pub(crate) server: String,
    pub(crate) client: Option<String>,
}

impl RequestTag {
    /// Fresh ids for a request with these headers.
    pub(crate) fn new(headers: &tonic::codegen::http::HeaderMap) -> Self {
        let client = headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= MAX_CLIENT_REQUEST_ID
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            })
            .map(str::to_owned);
        let random = random_id();
        Self {
            server: hex::encode(random),
            client,
        }
    }

    /// The ids of a request the gate has passed (a fresh pair if, in a test, none did).
    pub(crate) fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<Self>()
            .cloned()
            .unwrap_or_else(|| Self::new(&tonic::codegen::http::HeaderMap::new()))
    }

    /// What the response's `x-request-id` carries.
    pub(crate) fn echoed(&self) -> &str {
        self.client.as_deref().unwrap_or(&self.server)
    }

    /// Writes both ids into `event`.
    pub(crate) fn stamp(&self, event: &mut AuditEvent) {
        event.request_id = Some(self.server.clone());
        event.client_request_id.clone_from(&self.client);
    }
}

/// 16 bytes from the system generator, drawn from a per-thread pool refilled 4 KiB at a
/// time: one generator call per 256 ids (a call per request cost 3% of the server's CPU on
/// health checks).
fn random_id() -> [u8; 16] {
    use std::cell::RefCell;
    const POOL: usize = 4096;
    thread_local! {
        static IDS: RefCell<(Box<[u8; POOL]>, usize)> = RefCell::new((Box::new([0; POOL]), POOL));
    }
    IDS.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (pool, used) = &mut *guard;
        if *used + 16 > POOL {
            // The system generator does not fail on Linux; if it ever did, the ids would be
            // repeated, not guessable from another request's (and still told apart by the
            // record's sequence number).
            let _ = aws_lc_rs::rand::fill(&mut pool[..]);
            *used = 0;
        }
        let mut id = [0u8; 16];
        if let Some(chunk) = pool.get(*used..*used + 16) {
            id.copy_from_slice(chunk);
        }
        *used += 16;
        id
    })
}

impl Audit {
    /// Every request is recorded in `log` before it is answered.
    pub fn new(log: Arc<AuditLog>) -> Self {
        Self { log: Some(log) }
    }

    /// Nothing is recorded. Only for measuring what auditing costs (`kms serve --dev
    /// --unaudited`); never in production.
    pub fn danger_disabled() -> Self {
        Self { log: None }
    }

    /// The keyed digest of a context.
    pub(crate) fn context_digest(&self, context: &EncryptionContext) -> Option<String> {
        self.log.as_ref()?.context_digest(context)
    }

    /// Has `observer` told of the log's batches, failures and checkpoints (nothing when
    /// auditing is disabled).
    pub(crate) fn observe(&self, observer: Arc<dyn kms_core::audit::AuditObserver>) {
        if let Some(log) = &self.log {
            log.observe(observer);
        }
    }

    /// Queues a record; the returned wait must finish before the request is answered.
    pub(crate) fn submit(&self, event: AuditEvent) -> Option<Pending> {
        self.log.as_ref().map(|log| log.submit(event))
    }

    /// Records `event` durably with a signed checkpoint over it; its sequence number, or
    /// `None` when auditing is disabled.
    pub(crate) async fn record_checkpointed(
        &self,
        event: AuditEvent,
    ) -> Result<Option<u64>, Status> {
        match &self.log {
            Some(log) => log
                .submit_checkpointed(event)
                .wait()
                .await
                .map(Some)
                .map_err(|_| Status::unavailable(AUDIT_UNAVAILABLE)),
            None => Ok(None),
        }
    }

    /// Records `event` durably, or refuses with the documented status.
    pub(crate) async fn record(&self, event: AuditEvent) -> Result<(), Status> {
        match self.submit(event) {
            Some(pending) => settle(pending.wait().await),
            None => Ok(()),
        }
    }
}

/// Turns an audit outcome into the caller's status.
pub(crate) fn settle(outcome: Result<u64, AuditError>) -> Result<(), Status> {
    outcome
        .map(|_| ())
        .map_err(|_| Status::unavailable(AUDIT_UNAVAILABLE))
}

/// What one data-plane request (or batch item) did, gathered as it runs.
#[derive(Debug, Default)]
pub(crate) struct Facts {
    pub(crate) key: Option<String>,
    pub(crate) key_version: Option<u32>,
    pub(crate) context_keys: Vec<String>,
    pub(crate) context_digest: Option<String>,
    pub(crate) decision: Option<&'static str>,
    pub(crate) reason: Option<&'static str>,
    /// The policies that determined the decision.
    pub(crate) policies: Vec<String>,
    /// A grant minted or revoked by the request.
    pub(crate) grant_id: Option<String>,
    /// More to record (never secrets).
    pub(crate) detail: Vec<(&'static str, String)>,
    /// For a re-encryption: the key and version that had sealed the source blob.
    pub(crate) source: Option<(String, u32)>,
}

impl Facts {
    /// Notes the context's keys and digest (never its values).
    pub(crate) fn context(&mut self, audit: &Audit, context: &EncryptionContext) {
        self.context_keys = context.entries().map(|(k, _)| k.to_owned()).collect();
        self.context_digest = audit.context_digest(context);
    }

    /// Notes an allowed request on `key`, version `version`.
    pub(crate) fn allowed(&mut self, key: String, version: u32, policies: Vec<String>) {
        self.key = Some(key);
        self.key_version = Some(version);
        self.decision = Some("allow");
        self.policies = policies;
    }

    /// Notes what a core error says about the decision: unknown keys and denials were
    /// refused by authorisation, malformed input never reached it, anything else failed after
    /// it allowed the request.
    pub(crate) fn failed(&mut self, e: &Error) {
        let (decision, reason) = match e.class() {
            ErrorClass::NotFoundOrDenied => (
                Some("deny"),
                match e {
                    Error::Denied { policies } => {
                        self.policies.clone_from(policies);
                        if policies.is_empty() {
                            "no policy allows it"
                        } else {
                            "forbidden by policy"
                        }
                    }
                    Error::GrantDelegation => "grant.no_delegation",
                    Error::GrantExceedsCreator { .. } => "grant.exceeds_creator",
                    Error::GrantRefused { reason } => reason,
                    Error::KeyNotFound { .. } => "no such key",
                    _ => "not found",
                },
            ),
            ErrorClass::BadInput => (
                None,
                match e {
                    Error::Blob(_) => "malformed ciphertext",
                    _ => "invalid request",
                },
            ),
            ErrorClass::Conflict => (None, "conflict"),
            ErrorClass::Precondition => (
                Some("allow"),
                match e {
                    Error::KeyState {
                        state: KeyState::PendingDestruction,
                        ..
                    } => "key pending destruction",
                    Error::KeyState {
                        state: KeyState::Destroyed,
                        ..
                    } => "key destroyed",
                    _ => "key not enabled",
                },
            ),
            ErrorClass::DecryptFailed => (Some("allow"), "ciphertext or context does not match"),
            ErrorClass::Unavailable | ErrorClass::Internal => (
                Some("allow"),
                match e {
                    Error::Hsm(_) => "hsm failure",
                    Error::Sealed => "service sealed",
                    _ => "internal error",
                },
            ),
        };
        self.decision = decision;
        self.reason = Some(reason);
    }
}

/// The record of one data-plane request.
pub(crate) fn data_event(
    action: &'static str,
    caller: &Caller,
    ids: &RequestTag,
    started: Instant,
    facts: Facts,
    status: Option<&Status>,
) -> AuditEvent {
    let mut event = AuditEvent::new(action, status_word(status));
    event.set_caller(
        Principal::Workload(caller.id.clone()),
        caller.method.as_str(),
    );
    event.policy_ids = facts.policies;
    event.grant_id = facts
        .grant_id
        .or_else(|| caller.grant.as_ref().map(|g| g.grant.id.to_string()));
    if let Some(purpose) = &caller.purpose {
        event.detail.insert("purpose".into(), purpose.clone());
    }
    event.decision = facts.decision.map(str::to_owned);
    event.reason = facts.reason.map(str::to_owned);
    event.key = facts.key;
    event.key_version = facts.key_version;
    event.context_keys = facts.context_keys;
    event.context_digest = facts.context_digest;
    for (name, value) in facts.detail {
        event.detail.insert(name.into(), value);
    }
    if let Some((key, version)) = facts.source {
        event.detail.insert("source_key".into(), key);
        event
            .detail
            .insert("source_key_version".into(), version.to_string());
    }
    ids.stamp(&mut event);
    event.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    event
}

/// `ok`, or the status code's name.
pub(crate) fn status_word(status: Option<&Status>) -> String {
    match status {
        None => "ok".into(),
        Some(s) => format!("{:?}", s.code()),
    }
}

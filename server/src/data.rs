//! The data plane: envelope encryption for workloads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use api::v1::data_plane_server::DataPlane;
use api::v1::{
    decrypt_result, generate_data_key_result, BatchDecryptRequest, BatchDecryptResponse,
    BatchGenerateDataKeyRequest, BatchGenerateDataKeyResponse, CreateGrantRequest,
    CreateGrantResponse, DataKeySpec, DecryptRequest, DecryptResponse, DecryptResult,
    EncryptRequest, EncryptResponse, GenerateDataKeyRequest, GenerateDataKeyResponse,
    GenerateDataKeyResult, GenerateDataKeyWithoutPlaintextResponse, ItemError, ReEncryptRequest,
    ReEncryptResponse, RevokeGrantRequest, RevokeGrantResponse,
};
use kms_core::audit::AuditEvent;
use kms_core::grants::NewGrant;
use kms_core::Op;
use kms_core::{Caller, EncryptionContext, Error, KeyRef, Kms, Plaintext};
use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};

use crate::audit::{data_event, settle, status_word, tag, Audit, Facts};
use crate::governance::Governance;

/// When a request started, for the latency in its audit record.
#[expect(
    clippy::disallowed_methods,
    reason = "request latency is measured wall time"
)]
fn request_clock() -> Instant {
    Instant::now()
}

/// Most items one batch call may carry.
pub const MAX_BATCH: usize = 1000;

/// The same status for "no such key" and "not allowed", so a caller who may not use a key
/// cannot learn whether it exists.
const NOT_FOUND_OR_DENIED: &str = "key not found or access denied";

/// The `DataPlane` gRPC service.
#[derive(Clone, Debug)]
pub struct DataService {
    kms: Arc<Kms>,
    audit: Audit,
    gov: Arc<Governance>,
}

impl DataService {
    /// A service over `kms` that admits callers through `gov` and records every request in
    /// `audit`.
    pub fn new(kms: Arc<Kms>, audit: Audit, gov: Arc<Governance>) -> Self {
        Self { kms, audit, gov }
    }

    /// The authenticated, admitted caller and the request's id. A refused caller's request is
    /// recorded (with the reason) and answered here.
    async fn admit<T>(
        &self,
        action: &'static str,
        request: &Request<T>,
        started: Instant,
        uses: usize,
    ) -> Result<(Caller, String), Status> {
        let request_id = self.audit.request_id(request.metadata());
        let certs = request.peer_certs();
        let uses = u64::try_from(uses).unwrap_or(u64::MAX);
        let identified = if request.metadata().contains_key(crate::GRANT_HEADER) {
            // Reserving grant uses is a synced store write: keep it off the async workers.
            let gov = self.gov.clone();
            let metadata = request.metadata().clone();
            tokio::task::spawn_blocking(move || {
                gov.identify(certs.as_ref().map(|c| c.as_slice()), &metadata, uses)
            })
            .await
            .map_err(|_| Status::internal("internal error"))?
        } else {
            self.gov.identify(
                certs.as_ref().map(|c| c.as_slice()),
                request.metadata(),
                uses,
            )
        };
        match identified {
            Ok(caller) => Ok((caller, request_id)),
            Err(refusal) => {
                let mut event = AuditEvent::new(action, status_word(Some(&refusal.status)));
                event.principal = Some(refusal.principal);
                event.auth = Some(refusal.auth.into());
                event.decision = Some("deny".into());
                event.reason = Some(refusal.reason.into());
                event.request_id = Some(request_id);
                event.latency_us =
                    Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                self.audit.record(event).await?;
                Err(refusal.status)
            }
        }
    }

    /// Gives back the grant uses reserved for `n` parts that failed. Only a grant caller has
    /// any, and giving them back is a synced store write, so it runs off the async workers.
    async fn release(&self, caller: &Caller, n: u64) {
        if caller.grant.is_none() || n == 0 {
            return;
        }
        let gov = self.gov.clone();
        let caller = caller.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || gov.release(&caller, n)).await {
            tracing::error!(error = %e, "giving back grant uses failed");
        }
    }

    /// Records the request and then answers it; if the record cannot be written the caller
    /// gets the audit status instead, and whatever the request produced is dropped.
    async fn answer<T>(
        &self,
        action: &'static str,
        caller: &Caller,
        request_id: String,
        started: Instant,
        facts: Facts,
        result: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        self.gov.note_call(caller, action);
        if result.is_err() {
            self.release(caller, 1).await;
        }
        let event = data_event(
            action,
            caller,
            request_id.clone(),
            started,
            facts,
            result.as_ref().err(),
        );
        self.audit.record(event).await?;
        result.map(|r| tag(Response::new(r), &request_id))
    }

    /// Records every item of a batch (one group-committed write for all of them), then
    /// answers; if any record cannot be written, the whole batch is refused.
    async fn answer_batch<T>(
        &self,
        action: &'static str,
        caller: &Caller,
        request_id: &str,
        started: Instant,
        items: Vec<(Result<T, Status>, Facts)>,
    ) -> Result<Vec<Result<T, Status>>, Status> {
        self.gov.note_call(caller, action);
        let failed = items.iter().filter(|(r, _)| r.is_err()).count();
        self.release(caller, u64::try_from(failed).unwrap_or(u64::MAX))
            .await;
        let mut pending = Vec::with_capacity(items.len());
        let mut results = Vec::with_capacity(items.len());
        for (i, (result, facts)) in items.into_iter().enumerate() {
            let event = data_event(
                action,
                caller,
                format!("{request_id}/{i}"),
                started,
                facts,
                result.as_ref().err(),
            );
            pending.extend(self.audit.submit(event));
            results.push(result);
        }
        for p in pending {
            settle(p.wait().await)?;
        }
        Ok(results)
    }

    /// Runs a core call. Calls that reach the HSM block, so they run on the blocking pool;
    /// software-key calls are a few microseconds of in-memory work and run in place.
    async fn call<T, F>(&self, in_hsm: bool, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Kms) -> T + Send + 'static,
    {
        if !in_hsm {
            return Ok(f(&self.kms));
        }
        let kms = self.kms.clone();
        tokio::task::spawn_blocking(move || f(&kms))
            .await
            .map_err(|_| Status::internal("internal error"))
    }

    /// Mints a grant for `caller` if it may do everything it delegates.
    fn create_grant_for(
        &self,
        caller: &Caller,
        req: CreateGrantRequest,
        facts: &mut Facts,
    ) -> Result<CreateGrantResponse, Status> {
        if caller.grant.is_some() {
            facts.reason = Some("grant.no_delegation");
            return Err(Status::permission_denied(
                "a grant cannot be used to create grants",
            ));
        }
        let key = parse_key(&req.key, facts)?;
        let grantee: kms_core::spiffe::SpiffeId = req
            .grantee
            .parse()
            .map_err(|e| Status::invalid_argument(format!("invalid grantee: {e}")))?;
        let mut operations = Vec::with_capacity(req.operations.len());
        for name in &req.operations {
            operations.push(match name.as_str() {
                "GenerateDataKey" => Op::GenerateDataKey,
                "Decrypt" => Op::Decrypt,
                "Encrypt" => Op::Encrypt,
                "ReEncrypt" => Op::ReEncrypt,
                other => {
                    return Err(Status::invalid_argument(format!(
                    "unknown operation {other:?}: GenerateDataKey, Decrypt, Encrypt or ReEncrypt"
                )))
                }
            });
        }
        if operations.is_empty() {
            return Err(Status::invalid_argument(
                "a grant needs at least one operation",
            ));
        }
        let required = context(req.required_context.clone())?;
        facts.context(&self.audit, &required);
        // The creator must be allowed to delegate on this key, and to do each operation itself
        // under the context the grant requires: a grant only narrows.
        let (record, mut policies) = self
            .kms
            .check_access(caller, &key, Op::CreateGrant, &required)
            .map_err(|e| {
                facts.failed(&e);
                to_status(&e)
            })?;
        facts.key = Some(record.id.to_string());
        for op in &operations {
            match self.kms.check_access(caller, &key, *op, &required) {
                Ok((_, p)) => policies.extend(p),
                Err(_) => {
                    facts.decision = Some("deny");
                    facts.reason = Some("grant.exceeds_creator");
                    return Err(Status::permission_denied(format!(
                        "the grant would allow more than you may do: {}",
                        kms_core::policy::action_name(*op)
                    )));
                }
            }
        }
        policies.sort();
        policies.dedup();
        let max_ttl = self.gov.grants.config().max_ttl_secs;
        let ttl = match u64::from(req.ttl_seconds) {
            0 => max_ttl,
            n => n,
        };
        let (grant, token) = self
            .gov
            .grants
            .create(
                NewGrant {
                    grantee: grantee.to_string(),
                    key_id: record.id,
                    operations,
                    required_context: req.required_context.into_iter().collect(),
                    ttl_secs: ttl,
                    max_uses: (req.max_uses != 0).then_some(req.max_uses),
                },
                caller.id.as_str(),
            )
            .map_err(|e| match e {
                Error::GrantTtl { max_secs } => {
                    Status::invalid_argument(format!("ttl_seconds must be 1 to {max_secs}"))
                }
                Error::Invalid(what) => Status::invalid_argument(format!("invalid {what}")),
                other => to_status(&other),
            })?;
        facts.decision = Some("allow");
        facts.policies = policies;
        facts.grant_id = Some(grant.id.clone());
        facts.detail.push(("grantee", grant.grantee.clone()));
        facts
            .detail
            .push(("operations", grant.operations.join(",")));
        facts
            .detail
            .push(("expires_at", grant.expires_at.to_string()));
        if let Some(max) = grant.max_uses {
            facts.detail.push(("max_uses", max.to_string()));
        }
        Ok(CreateGrantResponse {
            grant_id: grant.id.clone(),
            token: token.expose_secret().to_owned(),
            expires_at: grant.expires_at,
            key_id: grant.key_id.to_string(),
        })
    }

    /// Whether a call naming `key` reaches the HSM.
    fn key_in_hsm(&self, key: &str) -> bool {
        key.parse::<KeyRef>()
            .is_ok_and(|k| self.kms.runs_in_hsm(&k))
    }

    /// Whether opening `blob` reaches the HSM.
    fn blob_in_hsm(&self, blob: &[u8]) -> bool {
        kms_core::blob::Blob::parse(blob)
            .is_ok_and(|b| self.kms.runs_in_hsm(&KeyRef::Id(b.header.key_id)))
    }
}

/// Maps a core error to the data plane's status: the one place where the data plane decides
/// what a caller may learn. Anything not named here is an internal error, logged in full and
/// shown to the caller as "internal error".
pub(crate) fn to_status(e: &Error) -> Status {
    match e {
        Error::KeyNotFound { .. } | Error::Denied { .. } | Error::GrantRefused { .. } => {
            Status::permission_denied(NOT_FOUND_OR_DENIED)
        }
        Error::DecryptFailed | Error::VersionNotFound { .. } => Status::invalid_argument(
            "decryption failed: the ciphertext or encryption context does not match",
        ),
        Error::Blob(b) => Status::invalid_argument(format!("malformed ciphertext: {b}")),
        Error::Invalid(what) => Status::invalid_argument(format!("invalid {what}")),
        Error::TooLarge { what, len, max } => {
            Status::invalid_argument(format!("{what} too large: {len} bytes, at most {max}"))
        }
        Error::KeyState { state, .. } => {
            Status::failed_precondition(format!("key is {}", state_word(*state)))
        }
        Error::Hsm(h) if h.is_retryable() => {
            tracing::warn!(error = %h, "hsm unavailable");
            Status::unavailable("hsm temporarily unavailable; retry")
        }
        _ => {
            tracing::error!(error = %e, source = ?std::error::Error::source(e), "data plane request failed");
            Status::internal("internal error")
        }
    }
}

pub(crate) fn state_word(state: kms_core::KeyState) -> &'static str {
    match state {
        kms_core::KeyState::Enabled => "enabled",
        kms_core::KeyState::Disabled => "disabled",
        _ => "unavailable",
    }
}

pub(crate) fn key_ref(s: &str) -> Result<KeyRef, Status> {
    s.parse::<KeyRef>().map_err(|e| to_status(&e))
}

fn context(map: HashMap<String, String>) -> Result<EncryptionContext, Status> {
    EncryptionContext::from_pairs(map).map_err(|e| to_status(&e))
}

/// Parses the caller's key reference, noting it for the audit record only once it is known to
/// be well formed (a malformed one may be anything the caller sent, of any length).
fn parse_key(raw: &str, facts: &mut Facts) -> Result<KeyRef, Status> {
    match key_ref(raw) {
        Ok(key) => {
            facts.key = Some(key.to_string());
            Ok(key)
        }
        Err(status) => {
            facts.reason = Some("invalid key reference");
            Err(status)
        }
    }
}

fn check_spec(spec: i32) -> Result<(), Status> {
    match DataKeySpec::try_from(spec) {
        Ok(DataKeySpec::Unspecified | DataKeySpec::Aes256) => Ok(()),
        Err(_) => Err(Status::invalid_argument("unsupported data key spec")),
    }
}

fn generate_one(
    kms: &Kms,
    audit: &Audit,
    caller: &Caller,
    req: GenerateDataKeyRequest,
    with_plaintext: bool,
    facts: &mut Facts,
) -> Result<GenerateDataKeyResponse, Status> {
    check_spec(req.spec)?;
    let key = parse_key(&req.key, facts)?;
    let ctx = context(req.encryption_context)?;
    facts.context(audit, &ctx);
    let dk = kms.generate_data_key(caller, &key, &ctx).map_err(|e| {
        facts.failed(&e);
        to_status(&e)
    })?;
    facts.allowed(dk.key_id.to_string(), dk.key_version.get(), dk.policies);
    Ok(GenerateDataKeyResponse {
        key_id: dk.key_id.to_string(),
        key_version: dk.key_version.get(),
        plaintext: if with_plaintext {
            dk.plaintext.expose_secret().to_vec()
        } else {
            Vec::new()
        },
        ciphertext: dk.ciphertext,
    })
}

fn decrypt_one(
    kms: &Kms,
    audit: &Audit,
    caller: &Caller,
    req: DecryptRequest,
    facts: &mut Facts,
) -> Result<DecryptResponse, Status> {
    if let Ok(blob) = kms_core::blob::Blob::parse(&req.ciphertext) {
        facts.key = Some(blob.header.key_id.to_string());
        facts.key_version = Some(blob.header.key_version.get());
    }
    let ctx = context(req.encryption_context)?;
    facts.context(audit, &ctx);
    let opened = kms.decrypt(caller, &req.ciphertext, &ctx).map_err(|e| {
        facts.failed(&e);
        to_status(&e)
    })?;
    facts.allowed(
        opened.key_id.to_string(),
        opened.key_version.get(),
        opened.policies,
    );
    Ok(DecryptResponse {
        key_id: opened.key_id.to_string(),
        key_version: opened.key_version.get(),
        plaintext: opened.plaintext.expose_secret().to_vec(),
    })
}

fn item_error(status: &Status) -> ItemError {
    ItemError {
        code: i32::from(status.code()),
        message: status.message().to_owned(),
    }
}

fn check_batch(len: usize) -> Result<(), Status> {
    if len > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "batch too large: {len} items, at most {MAX_BATCH}"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl DataPlane for DataService {
    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        let started = request_clock();
        let (caller, request_id) = self
            .admit("data.GenerateDataKey", &request, started, 1)
            .await?;
        let req = request.into_inner();
        let in_hsm = self.key_in_hsm(&req.key);
        let audit = self.audit.clone();
        let who = caller.clone();
        let (result, facts) = self
            .call(in_hsm, move |kms| {
                let mut facts = Facts::default();
                let r = generate_one(kms, &audit, &who, req, true, &mut facts);
                (r, facts)
            })
            .await?;
        self.answer(
            "data.GenerateDataKey",
            &caller,
            request_id,
            started,
            facts,
            result,
        )
        .await
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let started = request_clock();
        let (caller, request_id) = self
            .admit("data.GenerateDataKeyWithoutPlaintext", &request, started, 1)
            .await?;
        let req = request.into_inner();
        let in_hsm = self.key_in_hsm(&req.key);
        let audit = self.audit.clone();
        let who = caller.clone();
        let (result, facts) = self
            .call(in_hsm, move |kms| {
                let mut facts = Facts::default();
                let r = generate_one(kms, &audit, &who, req, false, &mut facts).map(|resp| {
                    GenerateDataKeyWithoutPlaintextResponse {
                        key_id: resp.key_id,
                        key_version: resp.key_version,
                        ciphertext: resp.ciphertext,
                    }
                });
                (r, facts)
            })
            .await?;
        self.answer(
            "data.GenerateDataKeyWithoutPlaintext",
            &caller,
            request_id,
            started,
            facts,
            result,
        )
        .await
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let started = request_clock();
        let (caller, request_id) = self.admit("data.Decrypt", &request, started, 1).await?;
        let req = request.into_inner();
        let in_hsm = self.blob_in_hsm(&req.ciphertext);
        let audit = self.audit.clone();
        let who = caller.clone();
        let (result, facts) = self
            .call(in_hsm, move |kms| {
                let mut facts = Facts::default();
                let r = decrypt_one(kms, &audit, &who, req, &mut facts);
                (r, facts)
            })
            .await?;
        self.answer("data.Decrypt", &caller, request_id, started, facts, result)
            .await
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let started = request_clock();
        let (caller, request_id) = self.admit("data.Encrypt", &request, started, 1).await?;
        let req = request.into_inner();
        let in_hsm = self.key_in_hsm(&req.key);
        let audit = self.audit.clone();
        let who = caller.clone();
        let (result, facts) = self
            .call(in_hsm, move |kms| {
                let mut facts = Facts::default();
                let r = encrypt_one(kms, &audit, &who, req, &mut facts);
                (r, facts)
            })
            .await?;
        self.answer("data.Encrypt", &caller, request_id, started, facts, result)
            .await
    }

    async fn re_encrypt(
        &self,
        request: Request<ReEncryptRequest>,
    ) -> Result<Response<ReEncryptResponse>, Status> {
        let started = request_clock();
        let (caller, request_id) = self.admit("data.ReEncrypt", &request, started, 1).await?;
        let req = request.into_inner();
        let in_hsm = self.blob_in_hsm(&req.ciphertext) || self.key_in_hsm(&req.destination_key);
        let audit = self.audit.clone();
        let who = caller.clone();
        let (result, facts) = self
            .call(in_hsm, move |kms| {
                let mut facts = Facts::default();
                let r = re_encrypt_one(kms, &audit, &who, req, &mut facts);
                (r, facts)
            })
            .await?;
        self.answer(
            "data.ReEncrypt",
            &caller,
            request_id,
            started,
            facts,
            result,
        )
        .await
    }

    async fn batch_generate_data_key(
        &self,
        request: Request<BatchGenerateDataKeyRequest>,
    ) -> Result<Response<BatchGenerateDataKeyResponse>, Status> {
        let started = request_clock();
        check_batch(request.get_ref().items.len())?;
        let (caller, request_id) = self
            .admit(
                "data.BatchGenerateDataKey",
                &request,
                started,
                request.get_ref().items.len().min(MAX_BATCH),
            )
            .await?;
        let req = request.into_inner();
        let with_plaintext = !req.without_plaintext;
        let audit = self.audit.clone();
        let who = caller.clone();
        // A batch holds a worker for up to 1000 operations: always the blocking pool.
        let items = self
            .call(true, move |kms| {
                req.items
                    .into_iter()
                    .map(|item| {
                        let mut facts = Facts::default();
                        let r = generate_one(kms, &audit, &who, item, with_plaintext, &mut facts);
                        (r, facts)
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        let results = self
            .answer_batch(
                "data.BatchGenerateDataKey",
                &caller,
                &request_id,
                started,
                items,
            )
            .await?
            .into_iter()
            .map(|r| GenerateDataKeyResult {
                result: Some(match r {
                    Ok(ok) => generate_data_key_result::Result::Ok(ok),
                    Err(s) => generate_data_key_result::Result::Error(item_error(&s)),
                }),
            })
            .collect();
        Ok(tag(
            Response::new(BatchGenerateDataKeyResponse { results }),
            &request_id,
        ))
    }

    async fn batch_decrypt(
        &self,
        request: Request<BatchDecryptRequest>,
    ) -> Result<Response<BatchDecryptResponse>, Status> {
        let started = request_clock();
        check_batch(request.get_ref().items.len())?;
        let (caller, request_id) = self
            .admit(
                "data.BatchDecrypt",
                &request,
                started,
                request.get_ref().items.len().min(MAX_BATCH),
            )
            .await?;
        let req = request.into_inner();
        let audit = self.audit.clone();
        let who = caller.clone();
        let items = self
            .call(true, move |kms| {
                req.items
                    .into_iter()
                    .map(|item| {
                        let mut facts = Facts::default();
                        let r = decrypt_one(kms, &audit, &who, item, &mut facts);
                        (r, facts)
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        let results = self
            .answer_batch("data.BatchDecrypt", &caller, &request_id, started, items)
            .await?
            .into_iter()
            .map(|r| DecryptResult {
                result: Some(match r {
                    Ok(ok) => decrypt_result::Result::Ok(ok),
                    Err(s) => decrypt_result::Result::Error(item_error(&s)),
                }),
            })
            .collect();
        Ok(tag(
            Response::new(BatchDecryptResponse { results }),
            &request_id,
        ))
    }

    async fn create_grant(
        &self,
        request: Request<CreateGrantRequest>,
    ) -> Result<Response<CreateGrantResponse>, Status> {
        let started = request_clock();
        let (caller, request_id) = self.admit("data.CreateGrant", &request, started, 0).await?;
        let req = request.into_inner();
        let mut facts = Facts::default();
        let result = self.create_grant_for(&caller, req, &mut facts);
        self.answer(
            "data.CreateGrant",
            &caller,
            request_id,
            started,
            facts,
            result,
        )
        .await
    }

    async fn revoke_grant(
        &self,
        request: Request<RevokeGrantRequest>,
    ) -> Result<Response<RevokeGrantResponse>, Status> {
        let started = request_clock();
        let (caller, request_id) = self.admit("data.RevokeGrant", &request, started, 0).await?;
        let req = request.into_inner();
        let mut facts = Facts::default();
        let creator = caller.id.to_string();
        let result = if caller.grant.is_some() {
            Err(Status::permission_denied(
                "a grant cannot be used to revoke grants",
            ))
        } else if req.all != req.grant_id.is_empty() {
            Err(Status::invalid_argument("give a grant_id, or all"))
        } else {
            let id = req.grant_id.clone();
            if !id.is_empty() {
                facts.grant_id = Some(id.clone());
            }
            let by = creator.clone();
            self.gov
                .grants
                .revoke_where(&by, |g| g.creator == creator && (req.all || g.id == id))
                .map_err(|e| to_status(&e))
                .and_then(|revoked| {
                    if !req.all && revoked.is_empty() {
                        Err(Status::not_found("no such live grant of yours"))
                    } else {
                        facts.detail.push(("revoked", revoked.len().to_string()));
                        Ok(RevokeGrantResponse {
                            revoked: revoked.iter().map(|g| g.id.clone()).collect(),
                        })
                    }
                })
        };
        facts.decision = Some(if result.is_ok() { "allow" } else { "deny" });
        self.answer(
            "data.RevokeGrant",
            &caller,
            request_id,
            started,
            facts,
            result,
        )
        .await
    }
}

fn encrypt_one(
    kms: &Kms,
    audit: &Audit,
    caller: &Caller,
    req: EncryptRequest,
    facts: &mut Facts,
) -> Result<EncryptResponse, Status> {
    // Into a secret and wiped first, so that no error path below leaves it behind.
    let mut raw = req.plaintext;
    let plaintext = Plaintext::from_slice(&raw);
    zeroize::Zeroize::zeroize(&mut raw);
    let key = parse_key(&req.key, facts)?;
    let ctx = context(req.encryption_context)?;
    facts.context(audit, &ctx);
    let sealed = kms.encrypt(caller, &key, &plaintext, &ctx).map_err(|e| {
        facts.failed(&e);
        to_status(&e)
    })?;
    facts.allowed(
        sealed.key_id.to_string(),
        sealed.key_version.get(),
        sealed.policies,
    );
    Ok(EncryptResponse {
        key_id: sealed.key_id.to_string(),
        key_version: sealed.key_version.get(),
        ciphertext: sealed.ciphertext,
    })
}

/// One record for a re-encryption: the destination key and version, with the source key and
/// version in its details.
fn re_encrypt_one(
    kms: &Kms,
    audit: &Audit,
    caller: &Caller,
    req: ReEncryptRequest,
    facts: &mut Facts,
) -> Result<ReEncryptResponse, Status> {
    let dest = parse_key(&req.destination_key, facts)?;
    if let Ok(blob) = kms_core::blob::Blob::parse(&req.ciphertext) {
        facts.source = Some((
            blob.header.key_id.to_string(),
            blob.header.key_version.get(),
        ));
    }
    let source_ctx = context(req.source_encryption_context)?;
    let dest_ctx = if req.destination_context_set {
        context(req.destination_encryption_context)?
    } else {
        source_ctx.clone()
    };
    facts.context(audit, &dest_ctx);
    let done = kms
        .re_encrypt(caller, &req.ciphertext, &source_ctx, &dest, &dest_ctx)
        .map_err(|e| {
            facts.failed(&e);
            to_status(&e)
        })?;
    facts.allowed(
        done.sealed.key_id.to_string(),
        done.sealed.key_version.get(),
        done.sealed.policies,
    );
    Ok(ReEncryptResponse {
        source_key_id: done.source_key_id.to_string(),
        source_key_version: done.source_key_version.get(),
        key_id: done.sealed.key_id.to_string(),
        key_version: done.sealed.key_version.get(),
        ciphertext: done.sealed.ciphertext,
    })
}

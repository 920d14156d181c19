//! The data plane: envelope encryption for workloads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use api::v1::data_plane_server::DataPlane;
use api::v1::{
    decrypt_result, generate_data_key_result, BatchDecryptRequest, BatchDecryptResponse,
    BatchGenerateDataKeyRequest, BatchGenerateDataKeyResponse, DataKeySpec, DecryptRequest,
    DecryptResponse, DecryptResult, EncryptRequest, EncryptResponse, GenerateDataKeyRequest,
    GenerateDataKeyResponse, GenerateDataKeyResult, GenerateDataKeyWithoutPlaintextResponse,
    ItemError, ReEncryptRequest, ReEncryptResponse,
};
use kms_core::{EncryptionContext, Error, KeyRef, Kms, Plaintext, PrincipalId};
use tonic::{Request, Response, Status};

use crate::audit::{data_event, settle, tag, Audit, Facts};
use crate::identity::principal;

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
}

impl DataService {
    /// A service over `kms` that records every request in `audit`.
    pub fn new(kms: Arc<Kms>, audit: Audit) -> Self {
        Self { kms, audit }
    }

    /// The authenticated caller and the request's id.
    fn caller<T>(&self, request: &Request<T>) -> Result<(PrincipalId, String), Status> {
        Ok((
            principal(request)?,
            self.audit.request_id(request.metadata()),
        ))
    }

    /// Records the request and then answers it; if the record cannot be written the caller
    /// gets the audit status instead, and whatever the request produced is dropped.
    async fn answer<T>(
        &self,
        action: &'static str,
        caller: &PrincipalId,
        request_id: String,
        started: Instant,
        facts: Facts,
        result: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
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
        caller: &PrincipalId,
        request_id: &str,
        started: Instant,
        items: Vec<(Result<T, Status>, Facts)>,
    ) -> Result<Vec<Result<T, Status>>, Status> {
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
        Error::KeyNotFound { .. } | Error::Denied => Status::permission_denied(NOT_FOUND_OR_DENIED),
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
    caller: &PrincipalId,
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
    facts.allowed(dk.key_id.to_string(), dk.key_version.get());
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
    caller: &PrincipalId,
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
    facts.allowed(opened.key_id.to_string(), opened.key_version.get());
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
        let (caller, request_id) = self.caller(&request)?;
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
        let (caller, request_id) = self.caller(&request)?;
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
        let (caller, request_id) = self.caller(&request)?;
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
        let (caller, request_id) = self.caller(&request)?;
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
        let (caller, request_id) = self.caller(&request)?;
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
        let (caller, request_id) = self.caller(&request)?;
        let req = request.into_inner();
        check_batch(req.items.len())?;
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
        let (caller, request_id) = self.caller(&request)?;
        let req = request.into_inner();
        check_batch(req.items.len())?;
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
}

fn encrypt_one(
    kms: &Kms,
    audit: &Audit,
    caller: &PrincipalId,
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
    facts.allowed(sealed.key_id.to_string(), sealed.key_version.get());
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
    caller: &PrincipalId,
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
    );
    Ok(ReEncryptResponse {
        source_key_id: done.source_key_id.to_string(),
        source_key_version: done.source_key_version.get(),
        key_id: done.sealed.key_id.to_string(),
        key_version: done.sealed.key_version.get(),
        ciphertext: done.sealed.ciphertext,
    })
}

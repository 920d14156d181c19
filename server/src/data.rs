//! The data plane: envelope encryption for workloads.

use std::collections::HashMap;
use std::sync::Arc;

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

use crate::identity::principal;

/// Most items one batch call may carry.
pub const MAX_BATCH: usize = 1000;

/// The same status for "no such key" and "not allowed", so a caller who may not use a key
/// cannot learn whether it exists.
const NOT_FOUND_OR_DENIED: &str = "key not found or access denied";

/// The `DataPlane` gRPC service.
#[derive(Clone, Debug)]
pub struct DataService {
    kms: Arc<Kms>,
}

impl DataService {
    /// A service over `kms`.
    pub fn new(kms: Arc<Kms>) -> Self {
        Self { kms }
    }

    /// Runs a core call. Calls that reach the HSM block, so they run on the blocking pool;
    /// software-key calls are a few microseconds of in-memory work and run in place.
    async fn call<T, F>(&self, in_hsm: bool, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Kms) -> Result<T, Status> + Send + 'static,
    {
        if !in_hsm {
            return f(&self.kms);
        }
        let kms = self.kms.clone();
        tokio::task::spawn_blocking(move || f(&kms))
            .await
            .map_err(|_| Status::internal("internal error"))?
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

fn check_spec(spec: i32) -> Result<(), Status> {
    match DataKeySpec::try_from(spec) {
        Ok(DataKeySpec::Unspecified | DataKeySpec::Aes256) => Ok(()),
        Err(_) => Err(Status::invalid_argument("unsupported data key spec")),
    }
}

fn generate_one(
    kms: &Kms,
    caller: &PrincipalId,
    req: GenerateDataKeyRequest,
    with_plaintext: bool,
) -> Result<GenerateDataKeyResponse, Status> {
    check_spec(req.spec)?;
    let key = key_ref(&req.key)?;
    let ctx = context(req.encryption_context)?;
    let dk = kms
        .generate_data_key(caller, &key, &ctx)
        .map_err(|e| to_status(&e))?;
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
    caller: &PrincipalId,
    req: DecryptRequest,
) -> Result<DecryptResponse, Status> {
    let ctx = context(req.encryption_context)?;
    let opened = kms
        .decrypt(caller, &req.ciphertext, &ctx)
        .map_err(|e| to_status(&e))?;
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
        let caller = principal(&request)?;
        let req = request.into_inner();
        let in_hsm = self.key_in_hsm(&req.key);
        self.call(in_hsm, move |kms| generate_one(kms, &caller, req, true))
            .await
            .map(Response::new)
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let caller = principal(&request)?;
        let req = request.into_inner();
        let in_hsm = self.key_in_hsm(&req.key);
        let resp = self
            .call(in_hsm, move |kms| generate_one(kms, &caller, req, false))
            .await?;
        Ok(Response::new(GenerateDataKeyWithoutPlaintextResponse {
            key_id: resp.key_id,
            key_version: resp.key_version,
            ciphertext: resp.ciphertext,
        }))
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let caller = principal(&request)?;
        let req = request.into_inner();
        let in_hsm = self.blob_in_hsm(&req.ciphertext);
        self.call(in_hsm, move |kms| decrypt_one(kms, &caller, req))
            .await
            .map(Response::new)
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let caller = principal(&request)?;
        let req = request.into_inner();
        let in_hsm = self.key_in_hsm(&req.key);
        self.call(in_hsm, move |kms| {
            // Into a secret and wiped first, so that no error path below leaves it behind.
            let mut raw = req.plaintext;
            let plaintext = Plaintext::from_slice(&raw);
            zeroize::Zeroize::zeroize(&mut raw);
            let key = key_ref(&req.key)?;
            let ctx = context(req.encryption_context)?;
            let sealed = kms
                .encrypt(&caller, &key, &plaintext, &ctx)
                .map_err(|e| to_status(&e))?;
            Ok(EncryptResponse {
                key_id: sealed.key_id.to_string(),
                key_version: sealed.key_version.get(),
                ciphertext: sealed.ciphertext,
            })
        })
        .await
        .map(Response::new)
    }

    async fn re_encrypt(
        &self,
        request: Request<ReEncryptRequest>,
    ) -> Result<Response<ReEncryptResponse>, Status> {
        let caller = principal(&request)?;
        let req = request.into_inner();
        let in_hsm = self.blob_in_hsm(&req.ciphertext) || self.key_in_hsm(&req.destination_key);
        self.call(in_hsm, move |kms| {
            let source_ctx = context(req.source_encryption_context)?;
            let dest_ctx = if req.destination_context_set {
                context(req.destination_encryption_context)?
            } else {
                source_ctx.clone()
            };
            let dest = key_ref(&req.destination_key)?;
            let done = kms
                .re_encrypt(&caller, &req.ciphertext, &source_ctx, &dest, &dest_ctx)
                .map_err(|e| to_status(&e))?;
            Ok(ReEncryptResponse {
                source_key_id: done.source_key_id.to_string(),
                source_key_version: done.source_key_version.get(),
                key_id: done.sealed.key_id.to_string(),
                key_version: done.sealed.key_version.get(),
                ciphertext: done.sealed.ciphertext,
            })
        })
        .await
        .map(Response::new)
    }

    async fn batch_generate_data_key(
        &self,
        request: Request<BatchGenerateDataKeyRequest>,
    ) -> Result<Response<BatchGenerateDataKeyResponse>, Status> {
        let caller = principal(&request)?;
        let req = request.into_inner();
        check_batch(req.items.len())?;
        let with_plaintext = !req.without_plaintext;
        // A batch holds a worker for up to 1000 operations: always the blocking pool.
        self.call(true, move |kms| {
            let results = req
                .items
                .into_iter()
                .map(|item| GenerateDataKeyResult {
                    result: Some(match generate_one(kms, &caller, item, with_plaintext) {
                        Ok(ok) => generate_data_key_result::Result::Ok(ok),
                        Err(s) => generate_data_key_result::Result::Error(item_error(&s)),
                    }),
                })
                .collect();
            Ok(BatchGenerateDataKeyResponse { results })
        })
        .await
        .map(Response::new)
    }

    async fn batch_decrypt(
        &self,
        request: Request<BatchDecryptRequest>,
    ) -> Result<Response<BatchDecryptResponse>, Status> {
        let caller = principal(&request)?;
        let req = request.into_inner();
        check_batch(req.items.len())?;
        self.call(true, move |kms| {
            let results = req
                .items
                .into_iter()
                .map(|item| DecryptResult {
                    result: Some(match decrypt_one(kms, &caller, item) {
                        Ok(ok) => decrypt_result::Result::Ok(ok),
                        Err(s) => decrypt_result::Result::Error(item_error(&s)),
                    }),
                })
                .collect();
            Ok(BatchDecryptResponse { results })
        })
        .await
        .map(Response::new)
    }
}

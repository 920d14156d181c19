//! The data plane: envelope encryption for workloads.
//!
//! Every RPC takes one of two shapes: [`DataService::unary`] (admit the caller, run one core
//! call, record it, answer) or [`DataService::batch`] (the same for up to [`MAX_BATCH`]
//! items, with one record per item). The operations themselves are in `ops`, the status
//! mapper in `status`.

mod ops;
mod status;

use std::sync::Arc;
use std::time::Instant;

use api::v1::data_plane_server::DataPlane;
use api::v1::{
    decrypt_result, generate_data_key_result, BatchDecryptRequest, BatchDecryptResponse,
    BatchGenerateDataKeyRequest, BatchGenerateDataKeyResponse, CreateGrantRequest,
    CreateGrantResponse, DecryptRequest, DecryptResponse, DecryptResult, EncryptRequest,
    EncryptResponse, GenerateDataKeyRequest, GenerateDataKeyResponse, GenerateDataKeyResult,
    GenerateDataKeyWithoutPlaintextResponse, ReEncryptRequest, ReEncryptResponse,
    RevokeGrantRequest, RevokeGrantResponse,
};
use kms_core::audit::AuditEvent;
use std::collections::HashMap;

use kms_core::{Caller, EncryptionContext, KeyRef, Kms, Op, Principal};
use tonic::{Request, Response, Status};

pub(crate) use self::status::NOT_FOUND_OR_DENIED;
use crate::audit::{data_event, settle, status_word, Audit, Facts, RequestTag};
use crate::governance::{Authenticated, Governance, Refusal};

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

/// The `DataPlane` gRPC service.
#[derive(Clone, Debug)]
pub struct DataService {
    kms: Arc<Kms>,
    audit: Audit,
    gov: Arc<Governance>,
}

/// Where a call runs: operations that reach the HSM or write the store block, so they run on
/// the blocking pool; software-key operations are a few microseconds of in-memory work and run
/// in place.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Runs {
    Blocking,
    InPlace,
}

impl DataService {
    /// A service over `kms` that admits callers through `gov` and records every request in
    /// `audit`.
    pub fn new(kms: Arc<Kms>, audit: Audit, gov: Arc<Governance>) -> Self {
        Self { kms, audit, gov }
    }

    /// The admitted caller and the request's ids. The gate has authenticated the caller; here
    /// its registration (and grant, reserving `uses`) is checked. A refused caller's request is
    /// recorded (with the reason) and answered here.
    async fn admit<T>(
        &self,
        action: &'static str,
        request: &Request<T>,
        started: Instant,
        uses: usize,
    ) -> Result<(Caller, RequestTag), Status> {
        crate::gate::Taken::mark(request);
        let ids = RequestTag::of(request);
        let Some(who) = request.extensions().get::<Authenticated>().cloned() else {
            // The gate authenticates every data-plane request; without it, refuse.
            return Err(Status::internal("internal error"));
        };
        let uses = u64::try_from(uses).unwrap_or(u64::MAX);
        let identified = if request.metadata().contains_key(crate::GRANT_HEADER) {
            // Reserving grant uses is a synced store write: keep it off the async workers.
            let gov = self.gov.clone();
            let metadata = request.metadata().clone();
            tokio::task::spawn_blocking(move || gov.identify(who, &metadata, uses))
                .await
                .map_err(|_| Status::internal("internal error"))?
        } else {
            self.gov.identify(who, request.metadata(), uses)
        };
        match identified {
            Ok(caller) => Ok((caller, ids)),
            Err(refusal) => Err(self.refuse(action, refusal, &ids, started).await),
        }
    }

    /// Records a refused request (with the reason) and gives the status to answer: the
    /// refusal's, or the audit status if the record cannot be written.
    async fn refuse(
        &self,
        action: &'static str,
        refusal: Refusal,
        ids: &RequestTag,
        started: Instant,
    ) -> Status {
        let mut event = AuditEvent::new(action, status_word(Some(&refusal.status)));
        event.set_caller(refusal.principal, refusal.auth);
        event.decision = Some("deny".into());
        event.reason = Some(refusal.reason.into());
        ids.stamp(&mut event);
        event.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        match self.audit.record(event).await {
            Ok(()) => refusal.status,
            Err(unrecorded) => unrecorded,
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

    /// Runs `f` where `runs` says.
    async fn call<T, F>(&self, runs: Runs, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&DataService) -> T + Send + 'static,
    {
        if runs == Runs::InPlace {
            return Ok(f(self));
        }
        let svc = self.clone();
        tokio::task::spawn_blocking(move || f(&svc))
            .await
            .map_err(|_| Status::internal("internal error"))
    }

    /// Admits the caller (reserving `uses` grant uses), runs `op` where `runs` says, records
    /// the request, and only then answers; if the record cannot be written the caller gets the
    /// audit status instead, and whatever the request produced is dropped.
    async fn unary<Req, Resp, F>(
        &self,
        action: &'static str,
        request: Request<Req>,
        uses: usize,
        runs: impl FnOnce(&Self, &Caller, &Req) -> Runs,
        op: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        F: FnOnce(&DataService, &Caller, Req, &mut Facts) -> Result<Resp, Status> + Send + 'static,
    {
        let started = request_clock();
        let (caller, ids) = self.admit(action, &request, started, uses).await?;
        let req = request.into_inner();
        let runs = runs(self, &caller, &req);
        // The caller goes into the call and comes back with its result: no copy.
        let (result, facts, caller) = self
            .call(runs, move |svc| {
                let mut facts = Facts::default();
                let r = op(svc, &caller, req, &mut facts);
                (r, facts, caller)
            })
            .await?;
        self.gov.note_call(&caller, action);
        if result.is_err() {
            self.release(&caller, 1).await;
        }
        let event = data_event(action, &caller, &ids, started, facts, result.as_ref().err());
        self.audit.record(event).await?;
        result.map(Response::new)
    }

    /// A batch: refused whole (and recorded) if over [`MAX_BATCH`] items; otherwise the caller
    /// is admitted once (reserving a grant use per item), every item runs on the blocking pool (a batch
    /// holds a worker for up to 1000 operations), every item is recorded (one group-committed
    /// write for all of them), and the results are answered in order. If any record cannot be
    /// written, the whole batch is refused.
    async fn batch<Item, Out, F>(
        &self,
        action: &'static str,
        request: Request<Vec<Item>>,
        op: F,
    ) -> Result<Vec<Result<Out, Status>>, Status>
    where
        Item: Send + 'static,
        Out: Send + 'static,
        F: Fn(&DataService, &Caller, Item, &mut Facts) -> Result<Out, Status> + Send + 'static,
    {
        let started = request_clock();
        let uses = request.get_ref().len();
        if let Err(status) = ops::check_batch(uses) {
            // Authenticated by the gate, refused before any use of a grant is reserved.
            crate::gate::Taken::mark(&request);
            let who = request.extensions().get::<Authenticated>();
            let refusal = Refusal {
                principal: who.map_or(Principal::Anonymous, |a| Principal::Workload(a.id.clone())),
                auth: who.map_or("none", |a| a.method.as_str()),
                reason: "request.batch_too_large",
                status,
            };
            return Err(self
                .refuse(action, refusal, &RequestTag::of(&request), started)
                .await);
        }
        let (caller, ids) = self.admit(action, &request, started, uses).await?;
        let items = request.into_inner();
        let (done, caller) = self
            .call(Runs::Blocking, move |svc| {
                let done = items
                    .into_iter()
                    .map(|item| {
                        let mut facts = Facts::default();
                        let r = op(svc, &caller, item, &mut facts);
                        (r, facts)
                    })
                    .collect::<Vec<_>>();
                (done, caller)
            })
            .await?;
        self.gov.note_call(&caller, action);
        let failed = done.iter().filter(|(r, _)| r.is_err()).count();
        self.release(&caller, u64::try_from(failed).unwrap_or(u64::MAX))
            .await;
        let mut pending = Vec::with_capacity(done.len());
        let mut results = Vec::with_capacity(done.len());
        for (result, facts) in done {
            let event = data_event(action, &caller, &ids, started, facts, result.as_ref().err());
            pending.extend(self.audit.submit(event));
            results.push(result);
        }
        for p in pending {
            settle(p.wait().await)?;
        }
        Ok(results)
    }

    /// Where `caller`'s `op` on `key` runs: on the blocking pool only if it will reach the
    /// HSM. The core decides that with the same decision the operation makes, for every key
    /// (unknown ones included), so a refusal is answered in place whatever the key is.
    fn key_runs(
        &self,
        caller: &Caller,
        key: &str,
        op: Op,
        context: &HashMap<String, String>,
    ) -> Runs {
        let (Ok(key), Ok(context)) = (
            key.parse::<KeyRef>(),
            EncryptionContext::from_pairs(context.clone()),
        ) else {
            return Runs::InPlace;
        };
        if self.kms.reaches_hsm(caller, &key, op, &context) {
            Runs::Blocking
        } else {
            Runs::InPlace
        }
    }

    /// Where opening `blob` runs (to decrypt it, or as a re-encryption's source).
    fn blob_runs(
        &self,
        caller: &Caller,
        blob: &[u8],
        context: &HashMap<String, String>,
        for_re_encrypt: bool,
    ) -> Runs {
        let Ok(context) = EncryptionContext::from_pairs(context.clone()) else {
            return Runs::InPlace;
        };
        if self
            .kms
            .opening_reaches_hsm(caller, blob, &context, for_re_encrypt)
        {
            Runs::Blocking
        } else {
            Runs::InPlace
        }
    }
}

#[tonic::async_trait]
impl DataPlane for DataService {
    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        self.unary(
            "data.GenerateDataKey",
            request,
            1,
            |svc, caller, req| {
                svc.key_runs(
                    caller,
                    &req.key,
                    Op::GenerateDataKey,
                    &req.encryption_context,
                )
            },
            |svc, caller, req, facts| ops::generate(svc, caller, req, true, facts),
        )
        .await
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        self.unary(
            "data.GenerateDataKeyWithoutPlaintext",
            request,
            1,
            |svc, caller, req| {
                svc.key_runs(
                    caller,
                    &req.key,
                    Op::GenerateDataKey,
                    &req.encryption_context,
                )
            },
            |svc, caller, req, facts| {
                ops::generate(svc, caller, req, false, facts).map(|mut resp| {
                    GenerateDataKeyWithoutPlaintextResponse {
                        key_id: std::mem::take(&mut resp.key_id),
                        key_version: resp.key_version,
                        ciphertext: std::mem::take(&mut resp.ciphertext),
                    }
                })
            },
        )
        .await
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        self.unary(
            "data.Decrypt",
            request,
            1,
            |svc, caller, req| {
                svc.blob_runs(caller, &req.ciphertext, &req.encryption_context, false)
            },
            ops::decrypt,
        )
        .await
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        self.unary(
            "data.Encrypt",
            request,
            1,
            |svc, caller, req| svc.key_runs(caller, &req.key, Op::Encrypt, &req.encryption_context),
            ops::encrypt,
        )
        .await
    }

    async fn re_encrypt(
        &self,
        request: Request<ReEncryptRequest>,
    ) -> Result<Response<ReEncryptResponse>, Status> {
        self.unary(
            "data.ReEncrypt",
            request,
            1,
            |svc, caller, req| {
                let source = svc.blob_runs(
                    caller,
                    &req.ciphertext,
                    &req.source_encryption_context,
                    true,
                );
                let destination_context = if req.destination_context_set {
                    &req.destination_encryption_context
                } else {
                    &req.source_encryption_context
                };
                let destination = svc.key_runs(
                    caller,
                    &req.destination_key,
                    Op::ReEncrypt,
                    destination_context,
                );
                if source == Runs::Blocking || destination == Runs::Blocking {
                    Runs::Blocking
                } else {
                    Runs::InPlace
                }
            },
            ops::re_encrypt,
        )
        .await
    }

    async fn batch_generate_data_key(
        &self,
        request: Request<BatchGenerateDataKeyRequest>,
    ) -> Result<Response<BatchGenerateDataKeyResponse>, Status> {
        let with_plaintext = !request.get_ref().without_plaintext;
        let results = self
            .batch(
                "data.BatchGenerateDataKey",
                request.map(|r| r.items),
                move |svc, caller, item, facts| {
                    ops::generate(svc, caller, item, with_plaintext, facts)
                },
            )
            .await?;
        let results = results
            .into_iter()
            .map(|r| GenerateDataKeyResult {
                result: Some(match r {
                    Ok(ok) => generate_data_key_result::Result::Ok(ok),
                    Err(s) => generate_data_key_result::Result::Error(ops::item_error(&s)),
                }),
            })
            .collect();
        Ok(Response::new(BatchGenerateDataKeyResponse { results }))
    }

    async fn batch_decrypt(
        &self,
        request: Request<BatchDecryptRequest>,
    ) -> Result<Response<BatchDecryptResponse>, Status> {
        let results = self
            .batch("data.BatchDecrypt", request.map(|r| r.items), ops::decrypt)
            .await?;
        let results = results
            .into_iter()
            .map(|r| DecryptResult {
                result: Some(match r {
                    Ok(ok) => decrypt_result::Result::Ok(ok),
                    Err(s) => decrypt_result::Result::Error(ops::item_error(&s)),
                }),
            })
            .collect();
        Ok(Response::new(BatchDecryptResponse { results }))
    }

    async fn create_grant(
        &self,
        request: Request<CreateGrantRequest>,
    ) -> Result<Response<CreateGrantResponse>, Status> {
        // Storing the grant is a synced store write.
        self.unary(
            "data.CreateGrant",
            request,
            0,
            |_, _, _| Runs::Blocking,
            ops::create_grant,
        )
        .await
    }

    async fn revoke_grant(
        &self,
        request: Request<RevokeGrantRequest>,
    ) -> Result<Response<RevokeGrantResponse>, Status> {
        self.unary(
            "data.RevokeGrant",
            request,
            0,
            |_, _, _| Runs::Blocking,
            ops::revoke_grant,
        )
        .await
    }
}

//! The admin plane: key lifecycle, trust bundles, the workload inventory, policies, grants
//! and the audit log, for operators. No RPC here returns key material.
//!
//! One module per resource (`keys`, `trust`, `inventory`, `policy`, `grants`, `audit`), each
//! a set of handlers over the one [`AdminService`]; the `Admin` trait is implemented by the
//! routing table at the bottom of this file. Every handler goes through one of three paths:
//! [`AdminService::read`] (recorded with who read what), [`AdminService::change`] (key
//! changes) or [`AdminService::gov_change`] (governance changes, which wait for M-of-N
//! approvals when their action is gated: `approval.rs`).

mod approval;
mod audit;
mod backup;
mod custody;
mod grants;
mod inventory;
mod keys;
mod operators;
mod policy;
mod seal;
mod status;
mod trust;

use std::sync::Arc;

use api::v1::admin_server::Admin;
use api::v1::{
    ApprovalId, ApprovalInfo, ApprovalRules, GetApprovalRulesRequest, ListApprovalsRequest,
    ListApprovalsResponse, ListOperatorsRequest, ListOperatorsResponse, OperatorInfo,
    OperatorRequest, RegisterOperatorRequest, RejectChangeRequest, SetApprovalRulesRequest,
    UpdateOperatorRequest, WhoAmIRequest,
};
use api::v1::{
    AttestRequest, AttestResponse, AuthorizeReshareRequest, AuthorizeReshareResponse,
    RecordDrillRequest, RecordDrillResponse,
};
use api::v1::{
    CreateAliasRequest, CreateKeyRequest, GetPolicyRequest, KeyCoverageRequest,
    KeyCoverageResponse, KeyMetadata, KeyRequest, ListGrantsRequest, ListGrantsResponse,
    ListKeysRequest, ListKeysResponse, ListPoliciesRequest, ListPoliciesResponse,
    ListTrustBundlesRequest, ListTrustBundlesResponse, ListWorkloadsRequest, ListWorkloadsResponse,
    PolicyInfo, PolicyRequest, PolicyStatsRequest, PolicyStatsResponse, PutPolicyRequest,
    QueryAuditRequest, QueryAuditResponse, RegisterWorkloadRequest, RevokeGrantsRequest,
    RevokeGrantsResponse, SetTrustBundleRequest, ShareVerification, ShareVerificationRequest,
    TestPolicyRequest, TestPolicyResponse, TrustBundle, TrustDomainRequest, UpdateWorkloadRequest,
    WorkloadInfo, WorkloadRequest,
};
use api::v1::{DestructionReceipt, ScheduleKeyDestructionRequest};
use api::v1::{GetServiceStatusRequest, SealRequest, ServiceStatus, UnsealRequest};
use kms_core::audit::{object_hash, AuditEvent};
use kms_core::governance::actions::AdminAction;
use kms_core::governance::approvals::NewRequest;
use kms_core::{KeyRecord, KeyRef, Kms, OperatorId, Principal, Store};
use serde::Serialize;
use tonic::{Request, Response, Status};

pub(crate) use self::status::{core, to_status};
use crate::audit::{status_word, Audit, RequestTag};
use crate::governance::Governance;
use crate::identity::operator;
use crate::policy_stats::PolicyStats;

/// Largest page of any list.
const MAX_PAGE: usize = 1000;
/// Page size when the caller gives none.
const DEFAULT_PAGE: usize = 100;

/// The page size a caller asked for, bounded.
fn page_size(asked: u32) -> usize {
    match usize::try_from(asked).unwrap_or(MAX_PAGE) {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// The `Admin` gRPC service.
#[derive(Clone)]
pub struct AdminService {
    kms: Arc<Kms>,
    audit: Audit,
    store: Arc<dyn Store>,
    gov: Arc<Governance>,
    stats: PolicyStats,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService")
            .field("kms", &self.kms)
            .finish_non_exhaustive()
    }
}

/// What a governance change did: the object before (if it existed) and after, and the answer.
struct Changed<B, T> {
    before: Option<B>,
    after: Option<B>,
    answer: T,
}

impl AdminService {
    /// A service over `kms` and `gov`, recording every change in `audit`, reading the audit
    /// log from `store`, and reporting decision times from `stats`.
    pub fn new(
        kms: Arc<Kms>,
        audit: Audit,
        store: Arc<dyn Store>,
        gov: Arc<Governance>,
        stats: PolicyStats,
    ) -> Self {
        Self {
            kms,
            audit,
            store,
            gov,
            stats,
        }
    }

    /// Runs a read off the async workers and records who read what; the answer is given only
    /// once that record is durable.
    async fn read<T, R, F>(
        &self,
        action: AdminAction,
        request: &Request<R>,
        event: AuditEvent,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Kms, &dyn Store) -> Result<T, Status> + Send + 'static,
    {
        let (operator, ids) = self.who(request)?;
        let kms = self.kms.clone();
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || f(&kms, store.as_ref()))
            .await
            .map_err(|_| Status::internal("internal error"))?;
        let mut event = event;
        event.action = action.as_str().into();
        event.status = status_word(result.as_ref().err());
        event.set_caller(Principal::Operator(operator), "mtls");
        ids.stamp(&mut event);
        self.audit.record(event).await?;
        result.map(Response::new)
    }

    /// Runs one governance read, recorded with who read what.
    async fn gov_read<R, T, F>(
        &self,
        action: AdminAction,
        request: &Request<R>,
        target: String,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Governance) -> Result<T, Status> + Send + 'static,
    {
        let mut event = AuditEvent::default();
        if !target.is_empty() {
            event.detail.insert("target".into(), target);
        }
        let gov = self.gov.clone();
        self.read(action, request, event, move |_, _| f(&gov)).await
    }

    /// The operator making `request` (as the gate identified it) and the request's ids.
    fn who<R>(&self, request: &Request<R>) -> Result<(OperatorId, RequestTag), Status> {
        crate::gate::Taken::mark(request);
        let operator = match request.extensions().get::<OperatorId>() {
            Some(id) => id.clone(),
            None => operator(request)?,
        };
        Ok((operator, RequestTag::of(request)))
    }

    /// The record that `operator` asked for `action`, to be written before anything changes.
    fn intent<R>(
        &self,
        action: AdminAction,
        request: &Request<R>,
    ) -> Result<(OperatorId, AuditEvent), Status> {
        let (operator, ids) = self.who(request)?;
        let mut intent = AuditEvent::new(action.as_str(), "requested");
        intent.set_caller(Principal::Operator(operator.clone()), "mtls");
        ids.stamp(&mut intent);
        Ok((operator, intent))
    }

    /// Records a change's outcome. The change is made (or refused) and its request is on
    /// record; if only the outcome cannot be recorded, that is logged.
    async fn outcome<T>(&self, done: AuditEvent, who: &OperatorId, result: &Result<T, Status>) {
        let action = done.action.clone();
        match result {
            Ok(_) => tracing::info!(op = %action, operator = %who, "admin change done"),
            Err(s) => {
                tracing::info!(op = %action, operator = %who, code = ?s.code(), "admin change refused")
            }
        }
        if self.audit.record(done).await.is_err() {
            tracing::error!(op = %action, operator = %who, "admin change outcome could not be audited");
        }
    }

    /// Runs a key change. The request is recorded before anything changes (and refused if
    /// that record cannot be written); the outcome is recorded after, with SHA-256 hashes of
    /// the key record before and after.
    async fn change<T, F>(
        &self,
        action: AdminAction,
        request: &Request<T>,
        key: Option<KeyRef>,
        f: F,
    ) -> Result<Response<KeyMetadata>, Status>
    where
        F: FnOnce(&Kms) -> Result<KeyRecord, Status> + Send + 'static,
    {
        let (operator, mut intent) = self.intent(action, request)?;
        intent.key = key.as_ref().map(ToString::to_string);
        self.audit.record(intent.clone()).await?;

        let kms = self.kms.clone();
        let (before, result) = tokio::task::spawn_blocking(move || {
            let before = key.and_then(|k| kms.describe_key(&k).ok());
            (before, f(&kms))
        })
        .await
        .map_err(|_| Status::internal("internal error"))?;

        let mut done = intent;
        done.status = status_word(result.as_ref().err());
        done.before = before.as_ref().and_then(object_hash);
        if let Ok(after) = &result {
            done.key = Some(after.id.to_string());
            done.after = object_hash(after);
        }
        self.outcome(done, &operator, &result).await;
        result.map(|r| Response::new(keys::metadata(&r)))
    }

    /// Runs one governance change. When its action is gated, nothing changes: the request
    /// message is stored as an approval request (with `view` and `diff` for the approvers),
    /// and the answer carries only its pending approval; the change runs when the request is
    /// approved (`approval.rs`). Otherwise it runs now. Either way the request is recorded
    /// before anything changes, and its outcome after (with SHA-256 of the object before and
    /// after).
    async fn gov_change<R, B, T, F>(
        &self,
        action: AdminAction,
        request: &Request<R>,
        target: String,
        view: serde_json::Value,
        diff: Option<String>,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        R: prost::Message,
        B: Serialize + Send + 'static,
        T: approval::Pending + Send + 'static,
        F: FnOnce(&Governance, &str) -> Result<Changed<B, T>, Status> + Send + 'static,
    {
        let gated = action
            .gatable()
            .filter(|_| self.gov.approvals.rules().gates(action));
        let Some(gated) = gated else {
            return self.gov_apply(action, request, target, f).await;
        };
        let (operator, mut intent) = self.intent(action, request)?;
        intent.detail.insert("target".into(), target.clone());
        let new = NewRequest {
            action: gated,
            target,
            request: request.get_ref().encode_to_vec(),
            view: view.to_string(),
            diff,
            requested_by: operator.to_string(),
        };
        let req = self.ask(&operator, intent, new).await?;
        Ok(Response::new(T::pending(approval::info(&self.gov, &req))))
    }

    /// Stores a gated request for approval: `intent` is recorded first, and its outcome after
    /// (`pending`, with the approval id and request hash, or the refusal).
    async fn ask(
        &self,
        operator: &OperatorId,
        intent: AuditEvent,
        new: NewRequest,
    ) -> Result<kms_core::governance::approvals::ApprovalRequest, Status> {
        self.audit.record(intent.clone()).await?;
        let result = self.propose(operator, new).await;
        let mut done = intent;
        done.status = match &result {
            Ok(_) => "pending".into(),
            Err(s) => status_word(Some(s)),
        };
        if let Ok(req) = &result {
            done.detail.insert("approval_id".into(), req.id.clone());
            done.detail.insert("request_hash".into(), req.hash.clone());
        }
        self.outcome(done, operator, &result).await;
        result
    }

    /// Runs one governance change now (an ungated one, such as grant revocation), recorded as
    /// requested before it is made and with its outcome (SHA-256 of the object before and
    /// after) once it is.
    async fn gov_apply<R, B, T, F>(
        &self,
        action: AdminAction,
        request: &Request<R>,
        target: String,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        B: Serialize + Send + 'static,
        T: Send + 'static,
        F: FnOnce(&Governance, &str) -> Result<Changed<B, T>, Status> + Send + 'static,
    {
        let (operator, mut intent) = self.intent(action, request)?;
        intent.detail.insert("target".into(), target);
        self.audit.record(intent.clone()).await?;
        let who = operator.to_string();
        let gov = self.gov.clone();
        let result = tokio::task::spawn_blocking(move || f(&gov, &who))
            .await
            .map_err(|_| Status::internal("internal error"))?;

        let mut done = intent;
        done.status = status_word(result.as_ref().err());
        if let Ok(changed) = &result {
            done.before = changed.before.as_ref().and_then(object_hash);
            done.after = changed.after.as_ref().and_then(object_hash);
        }
        self.outcome(done, &operator, &result).await;
        result.map(|c| Response::new(c.answer))
    }
}

/// The `Admin` service: each RPC, its request and response, and the handler that serves it.
macro_rules! routes {
    ($($rpc:ident($req:ty) -> $resp:ty => $handler:path;)*) => {
        #[tonic::async_trait]
        impl Admin for AdminService {
            $(
                async fn $rpc(&self, request: Request<$req>) -> Result<Response<$resp>, Status> {
                    $handler(self, request).await
                }
            )*

            type ExportBackupStream = backup::ExportStream;

            async fn export_backup(
                &self,
                request: Request<api::v1::ExportBackupRequest>,
            ) -> Result<Response<Self::ExportBackupStream>, Status> {
                backup::export(self, request).await
            }
        }
    };
}

routes! {
    create_key(CreateKeyRequest) -> KeyMetadata => keys::create;
    describe_key(KeyRequest) -> KeyMetadata => keys::describe;
    list_keys(ListKeysRequest) -> ListKeysResponse => keys::list;
    rotate_key(KeyRequest) -> KeyMetadata => keys::rotate;
    disable_key(KeyRequest) -> KeyMetadata => keys::disable;
    enable_key(KeyRequest) -> KeyMetadata => keys::enable;
    create_alias(CreateAliasRequest) -> KeyMetadata => keys::create_alias;
    schedule_key_destruction(ScheduleKeyDestructionRequest) -> KeyMetadata => keys::schedule_destroy;
    cancel_key_destruction(KeyRequest) -> KeyMetadata => keys::cancel_destroy;
    get_destruction_receipt(KeyRequest) -> DestructionReceipt => keys::receipt;
    key_coverage(KeyCoverageRequest) -> KeyCoverageResponse => keys::coverage;
    query_audit(QueryAuditRequest) -> QueryAuditResponse => audit::query;
    set_trust_bundle(SetTrustBundleRequest) -> TrustBundle => trust::set;
    delete_trust_bundle(TrustDomainRequest) -> TrustBundle => trust::delete;
    list_trust_bundles(ListTrustBundlesRequest) -> ListTrustBundlesResponse => trust::list;
    register_workload(RegisterWorkloadRequest) -> WorkloadInfo => inventory::register;
    update_workload(UpdateWorkloadRequest) -> WorkloadInfo => inventory::update;
    deactivate_workload(WorkloadRequest) -> WorkloadInfo => inventory::deactivate;
    reactivate_workload(WorkloadRequest) -> WorkloadInfo => inventory::reactivate;
    describe_workload(WorkloadRequest) -> WorkloadInfo => inventory::describe;
    list_workloads(ListWorkloadsRequest) -> ListWorkloadsResponse => inventory::list;
    put_policy(PutPolicyRequest) -> PolicyInfo => policy::put;
    get_policy(GetPolicyRequest) -> PolicyInfo => policy::get;
    list_policies(ListPoliciesRequest) -> ListPoliciesResponse => policy::list;
    delete_policy(PolicyRequest) -> PolicyInfo => policy::delete;
    test_policy(TestPolicyRequest) -> TestPolicyResponse => policy::test;
    policy_stats(PolicyStatsRequest) -> PolicyStatsResponse => policy::stats;
    list_grants(ListGrantsRequest) -> ListGrantsResponse => grants::list;
    revoke_grants(RevokeGrantsRequest) -> RevokeGrantsResponse => grants::revoke;
    record_share_verification(ShareVerificationRequest) -> ShareVerification => custody::record_verification;
    authorize_reshare(AuthorizeReshareRequest) -> AuthorizeReshareResponse => custody::authorize_reshare;
    attest(AttestRequest) -> AttestResponse => custody::attest;
    record_drill(RecordDrillRequest) -> RecordDrillResponse => custody::record_drill;
    register_operator(RegisterOperatorRequest) -> OperatorInfo => operators::register;
    update_operator(UpdateOperatorRequest) -> OperatorInfo => operators::update;
    deactivate_operator(OperatorRequest) -> OperatorInfo => operators::deactivate;
    describe_operator(OperatorRequest) -> OperatorInfo => operators::describe;
    list_operators(ListOperatorsRequest) -> ListOperatorsResponse => operators::list;
    who_am_i(WhoAmIRequest) -> OperatorInfo => operators::who_am_i;
    list_approvals(ListApprovalsRequest) -> ListApprovalsResponse => approval::list;
    get_approval(ApprovalId) -> ApprovalInfo => approval::get;
    approve_change(ApprovalId) -> ApprovalInfo => approval::approve;
    reject_change(RejectChangeRequest) -> ApprovalInfo => approval::reject;
    cancel_change(ApprovalId) -> ApprovalInfo => approval::cancel;
    get_approval_rules(GetApprovalRulesRequest) -> ApprovalRules => approval::get_rules;
    set_approval_rules(SetApprovalRulesRequest) -> ApprovalRules => approval::set_rules;
    seal(SealRequest) -> ServiceStatus => seal::seal;
    unseal(UnsealRequest) -> ServiceStatus => seal::unseal;
    get_service_status(GetServiceStatusRequest) -> ServiceStatus => seal::status;
}

/// A key id or alias as an operator sent it.
fn key_ref(s: &str) -> Result<KeyRef, Status> {
    s.parse::<KeyRef>().map_err(|e| to_status(&e))
}

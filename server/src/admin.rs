//! The admin plane: key lifecycle for operators. No RPC here returns key material.

use std::sync::Arc;

use api::v1::admin_server::Admin;
use api::v1::{
    CreateAliasRequest, CreateKeyRequest, GetPolicyRequest, KeyMetadata, KeyRequest,
    ListKeysRequest, ListKeysResponse, ListPoliciesRequest, ListPoliciesResponse,
    ListTrustBundlesRequest, ListTrustBundlesResponse, ListWorkloadsRequest, ListWorkloadsResponse,
    PolicyInfo, PolicyRequest, PutPolicyRequest, QueryAuditRequest, QueryAuditResponse,
    RegisterWorkloadRequest, SetTrustBundleRequest, TestPolicyRequest, TestPolicyResponse,
    TrustBundle, TrustDomainRequest, UpdateWorkloadRequest, WorkloadInfo, WorkloadRequest,
};
use kms_core::audit::{object_hash, AuditEvent};
use kms_core::{
    Alias, Error, KeyId, KeyRecord, KeyRef, KeyState, Kms, Labels, NewKey, Protection, Store,
};
use tonic::{Request, Response, Status};

use crate::audit::{status_word, tag, Audit};
use crate::audit_query::query_audit;
use crate::data::{key_ref, state_word};
use crate::governance::Governance;
use crate::identity::principal;

/// Largest ListKeys page.
const MAX_PAGE: usize = 1000;
/// Longest QueryAudit filter value.
const MAX_FILTER: usize = 256;
/// ListKeys page size when the caller gives none.
const DEFAULT_PAGE: usize = 100;

/// The `Admin` gRPC service.
#[derive(Clone)]
pub struct AdminService {
    pub(crate) kms: Arc<Kms>,
    pub(crate) audit: Audit,
    store: Arc<dyn Store>,
    pub(crate) gov: Arc<Governance>,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService")
            .field("kms", &self.kms)
            .finish_non_exhaustive()
    }
}

impl AdminService {
    /// A service over `kms` and `gov`, recording every change in `audit`, and reading the
    /// audit log from `store`.
    pub fn new(kms: Arc<Kms>, audit: Audit, store: Arc<dyn Store>, gov: Arc<Governance>) -> Self {
        Self {
            kms,
            audit,
            store,
            gov,
        }
    }

    /// Runs a read off the async workers and records who read what; the answer is given only
    /// once that record is durable.
    pub(crate) async fn read<T, R, F>(
        &self,
        action: &'static str,
        request: &Request<R>,
        event: AuditEvent,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Kms, &dyn Store) -> Result<T, Status> + Send + 'static,
    {
        let operator = principal(request)?.to_string();
        let request_id = self.audit.request_id(request.metadata());
        let kms = self.kms.clone();
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || f(&kms, store.as_ref()))
            .await
            .map_err(|_| Status::internal("internal error"))?;
        let mut event = event;
        event.action = action.into();
        event.status = status_word(result.as_ref().err());
        event.principal = Some(operator);
        event.auth = Some("mtls".into());
        event.request_id = Some(request_id.clone());
        self.audit.record(event).await?;
        result.map(|r| tag(Response::new(r), &request_id))
    }

    /// Runs a key change. The request is recorded before anything changes (and refused if
    /// that record cannot be written); the outcome is recorded after, with SHA-256 hashes of
    /// the key record before and after.
    async fn change<T, F>(
        &self,
        action: &'static str,
        request: &Request<T>,
        key: Option<KeyRef>,
        f: F,
    ) -> Result<Response<KeyMetadata>, Status>
    where
        F: FnOnce(&Kms) -> Result<KeyRecord, Status> + Send + 'static,
    {
        let operator = principal(request)?.to_string();
        let request_id = self.audit.request_id(request.metadata());
        let mut intent = AuditEvent::new(action, "requested");
        intent.principal = Some(operator.clone());
        intent.auth = Some("mtls".into());
        intent.key = key.as_ref().map(ToString::to_string);
        intent.request_id = Some(request_id.clone());
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
        match &result {
            Ok(_) => tracing::info!(op = action, %operator, "admin change done"),
            Err(s) => {
                tracing::info!(op = action, %operator, code = ?s.code(), "admin change refused")
            }
        }
        if self.audit.record(done).await.is_err() {
            // The change is made and its request is on record; only the outcome is missing.
            tracing::error!(op = action, %operator, "admin change outcome could not be audited");
        }
        result.map(|r| tag(Response::new(metadata(&r)), &request_id))
    }
}

/// Maps a core error to the admin plane's status. Operators are authenticated by their own CA,
/// so the admin plane names keys in its errors.
pub(crate) fn to_status(e: &Error) -> Status {
    match e {
        Error::KeyNotFound { key } => Status::not_found(format!("key {key} not found")),
        Error::AliasTaken { alias } => {
            Status::already_exists(format!("alias {alias} is already in use"))
        }
        Error::Invalid(what) => Status::invalid_argument(format!("invalid {what}")),
        Error::WorkloadExists { .. } => Status::already_exists(e.to_string()),
        Error::WorkloadNotFound { .. } | Error::PolicyNotFound { .. } => {
            Status::not_found(e.to_string())
        }
        Error::PolicyInvalid { .. } | Error::ExpiryTooFar { .. } => {
            Status::invalid_argument(e.to_string())
        }
        Error::TooLarge { what, len, max } => {
            Status::invalid_argument(format!("{what} too large: {len} bytes, at most {max}"))
        }
        Error::KeyState { id, state, .. } => {
            Status::failed_precondition(format!("key {id} is {}", state_word(*state)))
        }
        Error::Hsm(h) if h.is_retryable() => {
            Status::unavailable("hsm temporarily unavailable; retry")
        }
        _ => {
            tracing::error!(error = %e, source = ?std::error::Error::source(e), "admin request failed");
            Status::internal("internal error")
        }
    }
}

pub(crate) fn metadata(r: &KeyRecord) -> KeyMetadata {
    KeyMetadata {
        key_id: r.id.to_string(),
        alias: r.alias.as_ref().map(|a| a.to_string()).unwrap_or_default(),
        labels: r
            .labels
            .entries()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        protection: match r.protection {
            Protection::Hsm => api::v1::Protection::Hsm,
            _ => api::v1::Protection::Software,
        }
        .into(),
        state: match r.state {
            KeyState::Enabled => api::v1::KeyState::Enabled,
            _ => api::v1::KeyState::Disabled,
        }
        .into(),
        current_version: r.current_version.get(),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

fn alias(s: String) -> Result<Alias, Status> {
    Alias::try_from(s).map_err(|e| to_status(&e))
}

fn core<T>(r: Result<T, Error>) -> Result<T, Status> {
    r.map_err(|e| to_status(&e))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        principal(&request)?;
        let req = request.get_ref().clone();
        let protection = match api::v1::Protection::try_from(req.protection) {
            Ok(api::v1::Protection::Hsm) => Protection::Hsm,
            Ok(api::v1::Protection::Software | api::v1::Protection::Unspecified) => {
                Protection::Software
            }
            Err(_) => return Err(Status::invalid_argument("unknown protection level")),
        };
        let spec = NewKey {
            alias: match req.alias.is_empty() {
                true => None,
                false => Some(alias(req.alias)?),
            },
            labels: core(Labels::from_pairs(req.labels))?,
            protection,
        };
        self.change("admin.CreateKey", &request, None, move |kms| {
            core(kms.create_key(spec))
        })
        .await
    }

    async fn describe_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.get_ref().key)?;
        let mut event = AuditEvent::default();
        event.key = Some(key.to_string());
        self.read("admin.DescribeKey", &request, event, move |kms, _| {
            core(kms.describe_key(&key)).map(|r| metadata(&r))
        })
        .await
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let req = request.get_ref().clone();
        let limit = match usize::try_from(req.page_size).unwrap_or(MAX_PAGE) {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let after = match req.page_token.is_empty() {
            true => None,
            false => Some(
                req.page_token
                    .parse::<KeyId>()
                    .map_err(|_| Status::invalid_argument("invalid page token"))?,
            ),
        };
        self.read(
            "admin.ListKeys",
            &request,
            AuditEvent::default(),
            move |kms, _| {
                let (page, next) = kms.list_keys(after, limit);
                Ok(ListKeysResponse {
                    keys: page.iter().map(metadata).collect(),
                    next_page_token: next.map(|id| id.to_string()).unwrap_or_default(),
                })
            },
        )
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.get_ref().key)?;
        let k = key.clone();
        self.change("admin.RotateKey", &request, Some(key), move |kms| {
            core(kms.rotate_key(&k))
        })
        .await
    }

    async fn disable_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.get_ref().key)?;
        let k = key.clone();
        self.change("admin.DisableKey", &request, Some(key), move |kms| {
            core(kms.set_key_state(&k, KeyState::Disabled))
        })
        .await
    }

    async fn enable_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.get_ref().key)?;
        let k = key.clone();
        self.change("admin.EnableKey", &request, Some(key), move |kms| {
            core(kms.set_key_state(&k, KeyState::Enabled))
        })
        .await
    }

    async fn create_alias(
        &self,
        request: Request<CreateAliasRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.get_ref().key)?;
        let new_alias = alias(request.get_ref().alias.clone())?;
        let k = key.clone();
        self.change("admin.CreateAlias", &request, Some(key), move |kms| {
            core(kms.set_alias(new_alias, &k))
        })
        .await
    }

    async fn query_audit(
        &self,
        request: Request<QueryAuditRequest>,
    ) -> Result<Response<QueryAuditResponse>, Status> {
        let req = request.get_ref().clone();
        if [&req.principal, &req.key, &req.action, &req.decision]
            .iter()
            .any(|f| f.len() > MAX_FILTER)
        {
            return Err(Status::invalid_argument(format!(
                "audit filters are at most {MAX_FILTER} bytes"
            )));
        }
        // Who searched the audit log, and for what, is itself on record.
        let mut event = AuditEvent::default();
        let filters = [
            ("after_seq", req.after_seq.to_string()),
            ("principal", req.principal.clone()),
            ("key", req.key.clone()),
            ("action", req.action.clone()),
            ("decision", req.decision.clone()),
            ("since_ms", req.since_ms.to_string()),
            ("until_ms", req.until_ms.to_string()),
        ];
        for (name, value) in filters {
            if !value.is_empty() && value != "0" {
                event.detail.insert(name.into(), value);
            }
        }
        self.read("admin.QueryAudit", &request, event, move |_, store| {
            query_audit(store, &req)
        })
        .await
    }

    async fn set_trust_bundle(
        &self,
        request: Request<SetTrustBundleRequest>,
    ) -> Result<Response<TrustBundle>, Status> {
        self.set_trust_bundle_impl(request).await
    }

    async fn delete_trust_bundle(
        &self,
        request: Request<TrustDomainRequest>,
    ) -> Result<Response<TrustBundle>, Status> {
        self.delete_trust_bundle_impl(request).await
    }

    async fn list_trust_bundles(
        &self,
        request: Request<ListTrustBundlesRequest>,
    ) -> Result<Response<ListTrustBundlesResponse>, Status> {
        self.list_trust_bundles_impl(request).await
    }

    async fn register_workload(
        &self,
        request: Request<RegisterWorkloadRequest>,
    ) -> Result<Response<WorkloadInfo>, Status> {
        self.register_workload_impl(request).await
    }

    async fn update_workload(
        &self,
        request: Request<UpdateWorkloadRequest>,
    ) -> Result<Response<WorkloadInfo>, Status> {
        self.update_workload_impl(request).await
    }

    async fn deactivate_workload(
        &self,
        request: Request<WorkloadRequest>,
    ) -> Result<Response<WorkloadInfo>, Status> {
        self.deactivate_workload_impl(request).await
    }

    async fn describe_workload(
        &self,
        request: Request<WorkloadRequest>,
    ) -> Result<Response<WorkloadInfo>, Status> {
        self.describe_workload_impl(request).await
    }

    async fn list_workloads(
        &self,
        request: Request<ListWorkloadsRequest>,
    ) -> Result<Response<ListWorkloadsResponse>, Status> {
        self.list_workloads_impl(request).await
    }

    async fn put_policy(
        &self,
        request: Request<PutPolicyRequest>,
    ) -> Result<Response<PolicyInfo>, Status> {
        self.put_policy_impl(request).await
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PolicyInfo>, Status> {
        self.get_policy_impl(request).await
    }

    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        self.list_policies_impl(request).await
    }

    async fn delete_policy(
        &self,
        request: Request<PolicyRequest>,
    ) -> Result<Response<PolicyInfo>, Status> {
        self.delete_policy_impl(request).await
    }

    async fn test_policy(
        &self,
        request: Request<TestPolicyRequest>,
    ) -> Result<Response<TestPolicyResponse>, Status> {
        self.test_policy_impl(request).await
    }

    async fn list_grants(
        &self,
        request: Request<api::v1::ListGrantsRequest>,
    ) -> Result<Response<api::v1::ListGrantsResponse>, Status> {
        self.list_grants_impl(request).await
    }

    async fn revoke_grants(
        &self,
        request: Request<api::v1::RevokeGrantsRequest>,
    ) -> Result<Response<api::v1::RevokeGrantsResponse>, Status> {
        self.revoke_grants_impl(request).await
    }

    async fn policy_stats(
        &self,
        request: Request<api::v1::PolicyStatsRequest>,
    ) -> Result<Response<api::v1::PolicyStatsResponse>, Status> {
        self.policy_stats_impl(request).await
    }

    async fn key_coverage(
        &self,
        request: Request<api::v1::KeyCoverageRequest>,
    ) -> Result<Response<api::v1::KeyCoverageResponse>, Status> {
        self.key_coverage_impl(request).await
    }
}

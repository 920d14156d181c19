//! The admin plane: key lifecycle for operators. No RPC here returns key material.

use std::sync::Arc;

use api::v1::admin_server::Admin;
use api::v1::{
    CreateAliasRequest, CreateKeyRequest, KeyMetadata, KeyRequest, ListKeysRequest,
    ListKeysResponse,
};
use kms_core::{Alias, Error, KeyId, KeyRecord, KeyState, Kms, Labels, NewKey, Protection};
use tonic::{Request, Response, Status};

use crate::data::{key_ref, state_word};
use crate::identity::principal;

/// Largest ListKeys page.
const MAX_PAGE: usize = 1000;
/// ListKeys page size when the caller gives none.
const DEFAULT_PAGE: usize = 100;

/// The `Admin` gRPC service.
#[derive(Clone, Debug)]
pub struct AdminService {
    kms: Arc<Kms>,
}

impl AdminService {
    /// A service over `kms`.
    pub fn new(kms: Arc<Kms>) -> Self {
        Self { kms }
    }

    /// Runs a blocking core call off the async workers, recording the operator who asked.
    async fn run<T, F>(
        &self,
        request_op: &'static str,
        operator: String,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Kms) -> Result<T, Status> + Send + 'static,
    {
        let kms = self.kms.clone();
        let result = tokio::task::spawn_blocking(move || f(&kms))
            .await
            .map_err(|_| Status::internal("internal error"))?;
        match &result {
            Ok(_) => tracing::info!(op = request_op, %operator, "admin request done"),
            Err(s) => {
                tracing::info!(op = request_op, %operator, code = ?s.code(), "admin request refused")
            }
        }
        result.map(Response::new)
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

fn metadata(r: &KeyRecord) -> KeyMetadata {
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
        let operator = principal(&request)?.to_string();
        let req = request.into_inner();
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
        self.run("CreateKey", operator, move |kms| {
            core(kms.create_key(spec)).map(|r| metadata(&r))
        })
        .await
    }

    async fn describe_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.get_ref().key)?;
        let operator = principal(&request)?.to_string();
        self.run("DescribeKey", operator, move |kms| {
            core(kms.describe_key(&key)).map(|r| metadata(&r))
        })
        .await
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let operator = principal(&request)?.to_string();
        let req = request.into_inner();
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
        self.run("ListKeys", operator, move |kms| {
            let (page, next) = kms.list_keys(after, limit);
            Ok(ListKeysResponse {
                keys: page.iter().map(metadata).collect(),
                next_page_token: next.map(|id| id.to_string()).unwrap_or_default(),
            })
        })
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.get_ref().key)?;
        let operator = principal(&request)?.to_string();
        self.run("RotateKey", operator, move |kms| {
            core(kms.rotate_key(&key)).map(|r| metadata(&r))
        })
        .await
    }

    async fn disable_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.get_ref().key)?;
        let operator = principal(&request)?.to_string();
        self.run("DisableKey", operator, move |kms| {
            core(kms.set_key_state(&key, KeyState::Disabled)).map(|r| metadata(&r))
        })
        .await
    }

    async fn enable_key(
        &self,
        request: Request<KeyRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let key = key_ref(&request.get_ref().key)?;
        let operator = principal(&request)?.to_string();
        self.run("EnableKey", operator, move |kms| {
            core(kms.set_key_state(&key, KeyState::Enabled)).map(|r| metadata(&r))
        })
        .await
    }

    async fn create_alias(
        &self,
        request: Request<CreateAliasRequest>,
    ) -> Result<Response<KeyMetadata>, Status> {
        let operator = principal(&request)?.to_string();
        let req = request.into_inner();
        let key = key_ref(&req.key)?;
        let new_alias = alias(req.alias)?;
        self.run("CreateAlias", operator, move |kms| {
            core(kms.set_alias(new_alias, &key)).map(|r| metadata(&r))
        })
        .await
    }
}

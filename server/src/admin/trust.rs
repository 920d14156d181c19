//! Trust bundles of workload trust domains: CA certificates and JWKS, applied from the next
//! request.

use api::v1::{
    ListTrustBundlesRequest, ListTrustBundlesResponse, SetTrustBundleRequest, TrustBundle,
    TrustDomainRequest,
};
use kms_core::governance::actions::AdminAction;
use kms_core::governance::trust::TrustBundleRecord;
use tonic::{Request, Response, Status};

use super::{core, AdminService, Changed};
use crate::authn::{parse_bundle, parse_jwks};
use crate::governance::Governance;

fn check_set(req: &SetTrustBundleRequest) -> Result<(), Status> {
    core(kms_core::governance::trust::check_trust_domain(
        &req.trust_domain,
    ))?;
    if req.pem.trim().is_empty() && req.jwks.trim().is_empty() {
        return Err(Status::invalid_argument(
            "a trust bundle needs CA certificates (pem), a JWKS (jwks), or both",
        ));
    }
    if !req.pem.trim().is_empty() {
        parse_bundle(&req.pem)
            .map_err(|e| Status::invalid_argument(format!("invalid trust bundle: {e}")))?;
    }
    if !req.jwks.trim().is_empty() {
        parse_jwks(&req.jwks)
            .map_err(|e| Status::invalid_argument(format!("invalid JWKS: {e}")))?;
    }
    Ok(())
}

pub(super) fn apply_set(
    gov: &Governance,
    req: SetTrustBundleRequest,
    who: &str,
) -> Result<Changed<TrustBundleRecord, TrustBundle>, Status> {
    check_set(&req)?;
    let store = gov.store.as_ref();
    let before = core(kms_core::governance::trust::get(store, &req.trust_domain))?;
    let record = TrustBundleRecord {
        trust_domain: req.trust_domain,
        pem: req.pem,
        jwks: (!req.jwks.trim().is_empty()).then_some(req.jwks),
        updated_at: gov.clock.now_unix(),
        updated_by: who.to_owned(),
    };
    core(kms_core::governance::trust::put(store, &record))?;
    reload_bundles(gov)?;
    Ok(Changed {
        before,
        after: Some(record.clone()),
        answer: bundle_info(&record),
    })
}

pub(super) async fn set(
    svc: &AdminService,
    request: Request<SetTrustBundleRequest>,
) -> Result<Response<TrustBundle>, Status> {
    let req = request.get_ref().clone();
    check_set(&req)?;
    let view = serde_json::json!({
        "trust_domain": req.trust_domain,
        "pem": req.pem,
        "jwks": req.jwks,
    });
    svc.gov_change(
        AdminAction::SetTrustBundle,
        &request,
        req.trust_domain.clone(),
        view,
        None,
        move |gov, who| apply_set(gov, req, who),
    )
    .await
}

/// The stored bundle of a well-formed trust domain, or `NOT_FOUND`.
fn existing(gov: &Governance, domain: &str) -> Result<TrustBundleRecord, Status> {
    core(kms_core::governance::trust::check_trust_domain(domain))?;
    core(kms_core::governance::trust::get(gov.store.as_ref(), domain))?
        .ok_or_else(|| Status::not_found(format!("no trust bundle for trust domain {domain}")))
}

pub(super) fn apply_delete(
    gov: &Governance,
    req: TrustDomainRequest,
    _who: &str,
) -> Result<Changed<TrustBundleRecord, TrustBundle>, Status> {
    let before = existing(gov, &req.trust_domain)?;
    core(kms_core::governance::trust::delete(
        gov.store.as_ref(),
        &req.trust_domain,
    ))?;
    reload_bundles(gov)?;
    Ok(Changed {
        answer: bundle_info(&before),
        before: Some(before),
        after: None,
    })
}

pub(super) async fn delete(
    svc: &AdminService,
    request: Request<TrustDomainRequest>,
) -> Result<Response<TrustBundle>, Status> {
    let req = request.get_ref().clone();
    let domain = req.trust_domain.clone();
    existing(&svc.gov, &domain)?;
    let view = serde_json::json!({ "trust_domain": domain, "remove": true });
    svc.gov_change(
        AdminAction::DeleteTrustBundle,
        &request,
        domain,
        view,
        None,
        move |gov, who| apply_delete(gov, req, who),
    )
    .await
}

pub(super) async fn list(
    svc: &AdminService,
    request: Request<ListTrustBundlesRequest>,
) -> Result<Response<ListTrustBundlesResponse>, Status> {
    svc.gov_read(
        AdminAction::ListTrustBundles,
        &request,
        String::new(),
        |gov| {
            let bundles = core(kms_core::governance::trust::list(gov.store.as_ref()))?
                .iter()
                .map(bundle_info)
                .collect();
            Ok(ListTrustBundlesResponse { bundles })
        },
    )
    .await
}

pub(super) fn reload_bundles(gov: &Governance) -> Result<(), Status> {
    gov.load_bundles().map_err(|e| {
        tracing::error!(error = %e, "trust bundles could not be reloaded");
        Status::internal("trust bundles could not be reloaded")
    })
}

pub(super) fn bundle_info(b: &TrustBundleRecord) -> TrustBundle {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    TrustBundle {
        trust_domain: b.trust_domain.clone(),
        pem: b.pem.clone(),
        certificates: count(parse_bundle(&b.pem).map_or(0, |a| a.len())),
        updated_at: b.updated_at,
        updated_by: b.updated_by.clone(),
        jwks: b.jwks.clone().unwrap_or_default(),
        jwt_keys: count(
            b.jwks
                .as_deref()
                .and_then(|j| parse_jwks(j).ok())
                .map_or(0, |s| s.keys.len()),
        ),
        approval: None,
    }
}

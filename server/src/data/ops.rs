//! One data-plane operation each: parse the request, call the core, note what the audit
//! record needs in [`Facts`], and build the response. No status is decided here except from
//! the plane's mapper.

use api::v1::{
    CreateGrantRequest, CreateGrantResponse, DataKeySpec, DecryptRequest, DecryptResponse,
    EncryptRequest, EncryptResponse, GenerateDataKeyRequest, GenerateDataKeyResponse, ItemError,
    ReEncryptRequest, ReEncryptResponse, RevokeGrantRequest, RevokeGrantResponse,
};
use kms_core::governance::grants::NewGrant;
use kms_core::governance::spiffe::SpiffeId;
use kms_core::{Caller, EncryptionContext, Error, KeyRef, Op, Plaintext};
use secrecy::ExposeSecret;
use tonic::Status;

use super::status::to_status;
use super::{DataService, MAX_BATCH};
use crate::audit::Facts;

/// Notes a core failure in the record, then maps it to the plane's status.
fn failed(facts: &mut Facts, e: &Error) -> Status {
    facts.failed(e);
    to_status(e)
}

/// Parses the caller's key reference, noting it for the audit record only once it is known to
/// be well formed (a malformed one may be anything the caller sent, of any length).
fn parse_key(raw: &str, facts: &mut Facts) -> Result<KeyRef, Status> {
    match raw.parse::<KeyRef>() {
        Ok(key) => {
            facts.key = Some(key.to_string());
            Ok(key)
        }
        Err(e) => {
            facts.reason = Some("invalid key reference");
            Err(to_status(&e))
        }
    }
}

fn check_spec(spec: i32) -> Result<(), Status> {
    match DataKeySpec::try_from(spec) {
        Ok(DataKeySpec::Unspecified | DataKeySpec::Aes256) => Ok(()),
        Err(_) => Err(Status::invalid_argument("unsupported data key spec")),
    }
}

/// Notes the key and version a well-formed blob names.
fn note_blob(ciphertext: &[u8]) -> Option<(String, u32)> {
    kms_core::blob::Blob::parse(ciphertext)
        .ok()
        .map(|b| (b.header.key_id.to_string(), b.header.key_version.get()))
}

pub(super) fn item_error(status: &Status) -> ItemError {
    ItemError {
        code: i32::from(status.code()),
        message: status.message().to_owned(),
    }
}

pub(super) fn check_batch(len: usize) -> Result<(), Status> {
    if len > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "batch too large: {len} items, at most {MAX_BATCH}"
        )));
    }
    Ok(())
}

pub(super) fn generate(
    svc: &DataService,
    caller: &Caller,
    req: GenerateDataKeyRequest,
    with_plaintext: bool,
    facts: &mut Facts,
) -> Result<GenerateDataKeyResponse, Status> {
    check_spec(req.spec)?;
    let key = parse_key(&req.key, facts)?;
    let ctx = EncryptionContext::from_pairs(req.encryption_context).map_err(|e| to_status(&e))?;
    facts.context(&svc.audit, &ctx);
    let dk = svc
        .kms
        .generate_data_key(caller, &key, &ctx)
        .map_err(|e| failed(facts, &e))?;
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

pub(super) fn decrypt(
    svc: &DataService,
    caller: &Caller,
    req: DecryptRequest,
    facts: &mut Facts,
) -> Result<DecryptResponse, Status> {
    if let Some((key, version)) = note_blob(&req.ciphertext) {
        facts.key = Some(key);
        facts.key_version = Some(version);
    }
    let ctx = EncryptionContext::from_pairs(req.encryption_context).map_err(|e| to_status(&e))?;
    facts.context(&svc.audit, &ctx);
    let opened = svc
        .kms
        .decrypt(caller, &req.ciphertext, &ctx)
        .map_err(|e| failed(facts, &e))?;
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

pub(super) fn encrypt(
    svc: &DataService,
    caller: &Caller,
    req: EncryptRequest,
    facts: &mut Facts,
) -> Result<EncryptResponse, Status> {
    // Into a secret and wiped first, so that no error path below leaves it behind (the
    // request wipes its own copy when dropped, too).
    let mut req = req;
    let plaintext = Plaintext::from_slice(&req.plaintext);
    zeroize::Zeroize::zeroize(&mut req.plaintext);
    let key = parse_key(&req.key, facts)?;
    let ctx = EncryptionContext::from_pairs(std::mem::take(&mut req.encryption_context))
        .map_err(|e| to_status(&e))?;
    facts.context(&svc.audit, &ctx);
    let sealed = svc
        .kms
        .encrypt(caller, &key, &plaintext, &ctx)
        .map_err(|e| failed(facts, &e))?;
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
pub(super) fn re_encrypt(
    svc: &DataService,
    caller: &Caller,
    req: ReEncryptRequest,
    facts: &mut Facts,
) -> Result<ReEncryptResponse, Status> {
    let dest = parse_key(&req.destination_key, facts)?;
    facts.source = note_blob(&req.ciphertext);
    let source_ctx =
        EncryptionContext::from_pairs(req.source_encryption_context).map_err(|e| to_status(&e))?;
    let dest_ctx = if req.destination_context_set {
        EncryptionContext::from_pairs(req.destination_encryption_context)
            .map_err(|e| to_status(&e))?
    } else {
        source_ctx.clone()
    };
    facts.context(&svc.audit, &dest_ctx);
    let done = svc
        .kms
        .re_encrypt(caller, &req.ciphertext, &source_ctx, &dest, &dest_ctx)
        .map_err(|e| failed(facts, &e))?;
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

/// Mints a grant for `caller`; the core decides whether it may (see
/// [`kms_core::Kms::authorize_grant`]).
pub(super) fn create_grant(
    svc: &DataService,
    caller: &Caller,
    req: CreateGrantRequest,
    facts: &mut Facts,
) -> Result<CreateGrantResponse, Status> {
    let key = parse_key(&req.key, facts)?;
    let grantee: SpiffeId = req
        .grantee
        .parse()
        .map_err(|e| Status::invalid_argument(format!("invalid grantee: {e}")))?;
    let operations = req
        .operations
        .iter()
        .map(|name| name.parse::<Op>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| to_status(&e))?;
    let required_context =
        EncryptionContext::from_pairs(req.required_context).map_err(|e| to_status(&e))?;
    facts.context(&svc.audit, &required_context);
    let new = NewGrant {
        grantee,
        key,
        operations,
        required_context,
        ttl_secs: (req.ttl_seconds != 0).then_some(u64::from(req.ttl_seconds)),
        max_uses: (req.max_uses != 0).then_some(req.max_uses),
    };
    let authorized = svc
        .kms
        .authorize_grant(caller, new)
        .map_err(|e| failed(facts, &e))?;
    facts.key = Some(authorized.key_id().to_string());
    let policies = authorized.policies().to_vec();
    let (grant, token) = svc
        .gov
        .grants
        .create(authorized)
        .map_err(|e| failed(facts, &e))?;
    facts.decision = Some("allow");
    facts.policies = policies;
    facts.grant_id = Some(grant.id.to_string());
    facts.detail.push(("grantee", grant.grantee.to_string()));
    let operations: Vec<&str> = grant.operations.iter().map(|op| op.as_str()).collect();
    facts.detail.push(("operations", operations.join(",")));
    facts
        .detail
        .push(("expires_at", grant.expires_at.to_string()));
    if let Some(max) = grant.max_uses {
        facts.detail.push(("max_uses", max.to_string()));
    }
    Ok(CreateGrantResponse {
        grant_id: grant.id.to_string(),
        token: token.expose_secret().to_owned(),
        expires_at: grant.expires_at,
        key_id: grant.key_id.to_string(),
    })
}

/// Revokes one or all of the caller's own grants.
pub(super) fn revoke_grant(
    svc: &DataService,
    caller: &Caller,
    req: RevokeGrantRequest,
    facts: &mut Facts,
) -> Result<RevokeGrantResponse, Status> {
    let result = revoke_own(svc, caller, req, facts);
    facts.decision = Some(if result.is_ok() { "allow" } else { "deny" });
    result
}

fn revoke_own(
    svc: &DataService,
    caller: &Caller,
    req: RevokeGrantRequest,
    facts: &mut Facts,
) -> Result<RevokeGrantResponse, Status> {
    if caller.grant.is_some() {
        return Err(Status::permission_denied(
            "a grant cannot be used to revoke grants",
        ));
    }
    if req.all != req.grant_id.is_empty() {
        return Err(Status::invalid_argument("give a grant_id, or all"));
    }
    if !req.grant_id.is_empty() {
        facts.grant_id = Some(req.grant_id.clone());
    }
    let by = caller.id.to_string();
    let revoked = svc
        .gov
        .grants
        .revoke_where(&by, |g| {
            g.creator == caller.id && (req.all || g.id.as_str() == req.grant_id)
        })
        .map_err(|e| to_status(&e))?;
    if !req.all && revoked.is_empty() {
        return Err(Status::not_found("no such live grant of yours"));
    }
    facts.detail.push(("revoked", revoked.len().to_string()));
    Ok(RevokeGrantResponse {
        revoked: revoked.iter().map(|g| g.id.to_string()).collect(),
    })
}

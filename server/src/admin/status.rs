//! The admin plane's one status mapper. Operators are authenticated by their own CA, so the
//! admin plane names keys, policies and workloads in its errors.

use kms_core::{Error, ErrorClass};
use tonic::Status;

use crate::wire::{bad_input, state_refusal};

/// Maps a core error to the admin plane's status, by its class.
pub(crate) fn to_status(e: &Error) -> Status {
    match e.class() {
        ErrorClass::NotFoundOrDenied => match e {
            Error::Denied { .. }
            | Error::GrantDelegation
            | Error::GrantExceedsCreator { .. }
            | Error::GrantRefused { .. } => Status::permission_denied(e.to_string()),
            _ => Status::not_found(e.to_string()),
        },
        ErrorClass::Conflict => Status::already_exists(e.to_string()),
        ErrorClass::BadInput => Status::invalid_argument(bad_input(e)),
        ErrorClass::Precondition => match e {
            Error::KeyState { id, state, .. } => {
                Status::failed_precondition(format!("{} ({id})", state_refusal(*state)))
            }
            _ => Status::failed_precondition(e.to_string()),
        },
        ErrorClass::DecryptFailed => Status::invalid_argument("decryption failed"),
        ErrorClass::Unavailable if matches!(e, Error::Sealed) => {
            Status::unavailable("service sealed: key changes wait until `kms unseal` is approved")
        }
        ErrorClass::Unavailable => Status::unavailable("hsm temporarily unavailable; retry"),
        ErrorClass::Internal => {
            tracing::error!(error = %e, source = ?std::error::Error::source(e), "admin request failed");
            Status::internal("internal error")
        }
    }
}

/// A core result as the admin plane answers it.
pub(crate) fn core<T>(r: Result<T, Error>) -> Result<T, Status> {
    r.map_err(|e| to_status(&e))
}

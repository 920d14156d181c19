//! The data plane's one status mapper: the only place where it decides what a caller may
//! learn from a failure.

use kms_core::{Error, ErrorClass};
use tonic::Status;

use crate::wire::{bad_input, state_refusal};

/// The same status for "no such key" and "not allowed", so a caller who may not use a key
/// cannot learn whether it exists.
pub(crate) const NOT_FOUND_OR_DENIED: &str = "key not found or access denied";

/// Maps a core error to the data plane's status, by its class. Absent and forbidden keys get
/// one fixed answer; internal failures are logged in full and shown as "internal error".
pub(crate) fn to_status(e: &Error) -> Status {
    match e.class() {
        ErrorClass::NotFoundOrDenied => match e {
            // Refused only after the caller was allowed to create grants on the key, or
            // before any key was looked up: these name no key.
            Error::GrantDelegation | Error::GrantExceedsCreator { .. } => {
                Status::permission_denied(e.to_string())
            }
            _ => Status::permission_denied(NOT_FOUND_OR_DENIED),
        },
        ErrorClass::DecryptFailed => Status::invalid_argument(
            "decryption failed: the ciphertext or encryption context does not match",
        ),
        ErrorClass::BadInput => Status::invalid_argument(bad_input(e)),
        ErrorClass::Precondition => match e {
            Error::KeyState { state, .. } => Status::failed_precondition(state_refusal(*state)),
            _ => Status::failed_precondition(e.to_string()),
        },
        ErrorClass::Unavailable if matches!(e, Error::Sealed) => {
            Status::unavailable(crate::gate::SEALED)
        }
        ErrorClass::Unavailable => {
            tracing::warn!(error = %e, "hsm unavailable");
            Status::unavailable("hsm temporarily unavailable; retry")
        }
        // The data plane creates no names, so a conflict here is the server's fault.
        ErrorClass::Conflict | ErrorClass::Internal => {
            tracing::error!(error = %e, source = ?std::error::Error::source(e), "data plane request failed");
            Status::internal("internal error")
        }
    }
}

//! Wire helpers both planes use and neither owns: why a key's state refuses an operation,
//! and the messages of bad-input errors.

use kms_core::{Error, KeyState};

/// Why a key in `state` refuses a cryptographic operation, as both planes word it: "key is
/// disabled", "key pending destruction", "key destroyed".
pub(crate) fn state_refusal(state: KeyState) -> &'static str {
    match state {
        KeyState::Disabled => "key is disabled",
        KeyState::PendingDestruction => "key pending destruction",
        KeyState::Destroyed => "key destroyed",
        _ => "key is not enabled",
    }
}

/// The message of an error of class `BadInput`, as both planes word it.
pub(crate) fn bad_input(e: &Error) -> String {
    match e {
        Error::TooLarge { what, len, max } => {
            format!("{what} too large: {len} bytes, at most {max}")
        }
        Error::GrantTtl { max_secs } => format!("ttl_seconds must be 1 to {max_secs}"),
        other => other.to_string(),
    }
}

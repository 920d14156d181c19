//! Wire helpers both planes use and neither owns: naming key states, and the messages of
//! bad-input errors.

use kms_core::{Error, KeyState};

/// The word for a key state on the wire.
pub(crate) fn state_word(state: KeyState) -> &'static str {
    match state {
        KeyState::Enabled => "enabled",
        KeyState::Disabled => "disabled",
        _ => "unavailable",
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

//! Wire helpers both planes use and neither owns: parsing key references and contexts,
//! naming key states, and the messages of bad-input errors.

use std::collections::HashMap;

use kms_core::{EncryptionContext, Error, KeyRef, KeyState};

/// The word for a key state on the wire.
pub(crate) fn state_word(state: KeyState) -> &'static str {
    match state {
        KeyState::Enabled => "enabled",
        KeyState::Disabled => "disabled",
        _ => "unavailable",
    }
}

/// A key id or alias as a caller sent it.
pub(crate) fn key_ref(s: &str) -> Result<KeyRef, Error> {
    s.parse::<KeyRef>()
}

/// An encryption context as a caller sent it.
pub(crate) fn context(map: HashMap<String, String>) -> Result<EncryptionContext, Error> {
    EncryptionContext::from_pairs(map)
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

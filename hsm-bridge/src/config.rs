//! How to reach a token: module path, token label and the user PIN.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;

use crate::error::{Error, Result};

/// Where Debian, Ubuntu and common source builds put SoftHSM2's module.
pub const SOFTHSM2_MODULE_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
];

/// Finds SoftHSM2's PKCS#11 module in the usual locations.
pub fn find_softhsm2_module() -> Result<PathBuf> {
    SOFTHSM2_MODULE_PATHS
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .map(Path::to_path_buf)
        .ok_or(Error::ModuleMissing {
            searched: SOFTHSM2_MODULE_PATHS,
        })
}

/// Settings for opening a token. The PIN is a `SecretString` from the moment it is read.
pub struct HsmConfig {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Label of the token that holds the root key.
    pub token_label: String,
    /// The user (CKU_USER) PIN.
    pub user_pin: SecretString,
    /// Label of the root wrapping key object on the token.
    pub root_key_label: String,
    /// Upper bound on concurrently open sessions; callers beyond it wait for a free one.
    pub max_sessions: usize,
}

impl HsmConfig {
    /// A configuration with the default root key label and session bound.
    pub fn new(module: PathBuf, token_label: String, user_pin: SecretString) -> Self {
        Self {
            module,
            token_label,
            user_pin,
            root_key_label: DEFAULT_ROOT_KEY_LABEL.to_owned(),
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
}

impl fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmConfig")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("user_pin", &"<redacted>")
            .field("root_key_label", &self.root_key_label)
            .field("max_sessions", &self.max_sessions)
            .finish()
    }
}

/// Label of the root wrapping key unless configured otherwise.
pub const DEFAULT_ROOT_KEY_LABEL: &str = "sovereign-kms-root-v1";
/// Default bound on open sessions: enough for the blocking pool on a small machine.
pub const DEFAULT_MAX_SESSIONS: usize = 64;

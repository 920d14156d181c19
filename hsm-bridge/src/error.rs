//! The one error type of the HSM bridge.

use std::path::PathBuf;

use cryptoki::context::Function;
use cryptoki::error::RvError;

/// Everything that can go wrong between the KMS and its PKCS#11 token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("cannot load PKCS#11 module {}", module.display())]
    ModuleLoad {
        /// Path of the module that failed.
        module: PathBuf,
        /// What the loader or `C_Initialize` said.
        #[source]
        source: cryptoki::error::Error,
    },
    /// No module path was given and none of the usual SoftHSM2 locations has one.
    #[error("no PKCS#11 module found; set hsm.module (looked in {searched:?})")]
    ModuleMissing {
        /// The locations that were tried.
        searched: &'static [&'static str],
    },
    /// No slot holds a token with the configured label.
    #[error("no token labelled {label:?} in PKCS#11 module {}", module.display())]
    TokenNotFound {
        /// The configured token label.
        label: String,
        /// The module that was searched.
        module: PathBuf,
    },
    /// `C_Login` refused the user PIN. The PIN itself is never part of the error.
    #[error("login to token {label:?} failed: {rv}")]
    Login {
        /// The token label.
        label: String,
        /// The PKCS#11 return value (`CKR_PIN_INCORRECT` for a wrong PIN).
        rv: RvError,
    },
    /// A PKCS#11 function returned an error.
    #[error("hsm {func}: {rv}")]
    Pkcs11 {
        /// The function that failed.
        func: Function,
        /// Its return value.
        rv: RvError,
    },
    /// The cryptoki wrapper failed outside a PKCS#11 call (conversion, missing symbol).
    #[error("cryptoki")]
    Cryptoki(#[source] cryptoki::error::Error),
    /// A named key object is not on the token.
    #[error("no key labelled {label:?} on the token")]
    KeyNotFound {
        /// The object label that was looked up.
        label: String,
    },
    /// No key object has this `CKA_ID`.
    #[error("no key with CKA_ID {id} on the token")]
    ObjectMissing {
        /// The id, hex.
        id: String,
    },
    /// Two objects answer to one name (a planted object would shadow the real one), or an
    /// object does not match what the KMS recorded of it. The KMS refuses to choose.
    #[error("token objects are ambiguous: {what}; remove the object that is not the KMS's")]
    ObjectAmbiguous {
        /// Which name or id, and what is wrong.
        what: String,
    },
    /// A key version's token object can do more than encrypt and decrypt: `CKA_WRAP`,
    /// `CKA_UNWRAP` or `CKA_DERIVE` was switched on after it was made, so it could let its value
    /// out under another key. The KMS refuses to use it.
    #[error(
        "the token key with CKA_ID {id} can wrap, unwrap or derive; a key version may only \
         encrypt and decrypt (see kms hsm inspect)"
    )]
    KeyWidened {
        /// Its `CKA_ID`, hex.
        id: String,
    },
    /// The trusted escrow key, or a key escrowed under it, is not as the ceremony pinned it.
    #[error("escrow: {what}")]
    Escrow {
        /// What is wrong, in fixed words.
        what: &'static str,
    },
    /// The token does not enforce what `hsm` escrow relies on (see `docs/CUSTODY.md`).
    #[error("token self-test failed: {what}; hsm protection is unavailable on this token")]
    SelfTest {
        /// What the token did wrong, in fixed words.
        what: &'static str,
    },
    /// Authenticated decryption failed. Opaque by design: no reason, no key identity.
    #[error("decryption failed")]
    DecryptFailed,
    /// A state the code rules out was reached (or the token broke its contract).
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// An argument is outside what the bridge accepts (nonce length, empty label).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// Which argument, in a few fixed words.
        what: &'static str,
    },
    /// A token utility (softhsm2-util) could not be run or failed.
    #[error("token setup: {what}")]
    TokenSetup {
        /// What failed, in fixed words.
        what: &'static str,
        /// The I/O cause, when there is one.
        #[source]
        source: Option<std::io::Error>,
    },
}

impl Error {
    /// True when the failure is tied to one session or a transient device state, so that
    /// dropping the session and retrying once on a fresh one may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Pkcs11 { rv, .. }
            if rv_is_session_loss(*rv) || rv_is_device_fault(*rv) || *rv == RvError::GeneralError)
    }
}

/// The session handle is gone; a new session will do.
pub(crate) fn rv_is_session_loss(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid | RvError::SessionClosed | RvError::UserNotLoggedIn
    )
}

/// The device misbehaved; every pooled session is suspect and the pool is drained.
pub(crate) fn rv_is_device_fault(rv: RvError) -> bool {
    matches!(rv, RvError::DeviceError | RvError::DeviceRemoved)
}

impl From<cryptoki::error::Error> for Error {
    fn from(e: cryptoki::error::Error) -> Self {
        match e {
            cryptoki::error::Error::Pkcs11(rv, func) => Error::Pkcs11 { func, rv },
            other => Error::Cryptoki(other),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

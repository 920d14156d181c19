//! Throwaway SoftHSM2 tokens for tests: each lives in its own temporary directory with its own
//! `SOFTHSM2_CONF`, so tests never touch a shared token.
//!
//! SoftHSM2 reads its configuration once per process, so one process opens one test token:
//! run the suite with `cargo nextest`, which gives every test its own process.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};

use crate::config::{find_softhsm2_module, HsmConfig};
use crate::error::{Error, Result};
use crate::softhsm;

/// A freshly initialised token in a temporary directory, removed on drop.
pub struct TestToken {
    dir: tempfile::TempDir,
    label: String,
    user_pin: SecretString,
    so_pin: SecretString,
}

impl TestToken {
    /// Creates the token. It is not yet the one this process's module will see: call
    /// [`TestToken::activate`] for that.
    pub fn create() -> Result<Self> {
        let dir = tempfile::tempdir().map_err(|e| Error::TokenSetup {
            what: "create temporary directory",
            source: Some(e),
        })?;
        let label = format!("test-{}", std::process::id());
        let user_pin = SecretString::from("1234-test-user");
        let so_pin = SecretString::from("5678-test-so");
        let conf = dir.path().join("softhsm2.conf");
        softhsm::write_conf(&conf, &dir.path().join("tokens"))?;
        softhsm::init_token(&conf, &label, &so_pin, &user_pin)?;
        Ok(Self {
            dir,
            label,
            user_pin,
            so_pin,
        })
    }

    /// Points this process's SoftHSM2 at the token's configuration.
    pub fn activate(&self) {
        softhsm::use_conf(&self.conf());
    }

    /// Path of the token's SoftHSM2 configuration file.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    /// The token's directory, for tests that store other state beside it.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The token label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The token's Security Officer PIN.
    pub fn so_pin(&self) -> &SecretString {
        &self.so_pin
    }

    /// A configuration that opens this token with the right PIN.
    pub fn config(&self) -> Result<HsmConfig> {
        Ok(HsmConfig::new(
            find_softhsm2_module()?,
            self.label.clone(),
            SecretString::from(self.user_pin.expose_secret().to_owned()),
        ))
    }

    /// A read-write session on this token, outside [`crate::Pkcs11Hsm`], logged in as the
    /// user (a login this process already holds is kept): for tests that change token objects
    /// as someone holding the user PIN could.
    pub fn user_session(&self) -> Result<cryptoki::session::Session> {
        let module = find_softhsm2_module()?;
        let ctx = crate::slot::load_module(&module)?;
        let slot = crate::slot::find_slot(&ctx, &self.label, &module)?;
        let session = ctx.open_rw_session(slot)?;
        match session.login(cryptoki::session::UserType::User, Some(&self.user_pin)) {
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => Ok(session),
            Err(e) => Err(e.into()),
        }
    }
}

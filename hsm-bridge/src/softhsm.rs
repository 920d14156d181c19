//! SoftHSM2 token set-up for development and tests: a private configuration file, a token
//! directory, and `softhsm2-util --init-token`.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` when the module is initialised, so a process points it at
//! its own configuration with [`use_conf`] before it opens the token.

use std::path::Path;
use std::process::Command;

use secrecy::{ExposeSecret, SecretString};

use crate::error::{Error, Result};

/// Writes a SoftHSM2 configuration that keeps tokens in `token_dir`.
pub fn write_conf(conf: &Path, token_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(token_dir).map_err(|e| setup("create token directory", e))?;
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        token_dir.display()
    );
    std::fs::write(conf, text).map_err(|e| setup("write softhsm2.conf", e))
}

/// Points this process's SoftHSM2 module at `conf`.
///
/// Call it before any thread starts and before the module is loaded: the environment is
/// process-wide and SoftHSM2 reads it once, in `C_Initialize`.
pub fn use_conf(conf: &Path) {
    std::env::set_var("SOFTHSM2_CONF", conf);
}

/// Creates a token labelled `label` in the first free slot of the configuration `conf`.
///
/// `softhsm2-util` takes the PINs as arguments; this is for development and test tokens only,
/// where the PINs are random and also sit in 0600 files beside the token.
pub fn init_token(
    conf: &Path,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<()> {
    let status = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args(["--init-token", "--free", "--label", label])
        .args(["--so-pin", so_pin.expose_secret()])
        .args(["--pin", user_pin.expose_secret()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| setup("run softhsm2-util (is softhsm2 installed?)", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::TokenSetup {
            what: "softhsm2-util --init-token failed",
            source: None,
        })
    }
}

fn setup(what: &'static str, e: std::io::Error) -> Error {
    Error::TokenSetup {
        what,
        source: Some(e),
    }
}

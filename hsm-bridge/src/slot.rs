//! Loading a PKCS#11 module and finding a token's slot by its label: the first steps of every
//! way in, shared by the token (a user session pool) and the escrow key's import (a Security
//! Officer session).

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::slot::Slot;

use crate::error::{Error, Result};

/// Loads and initialises a PKCS#11 module (a second initialisation in one process is fine).
pub(crate) fn load_module(module: &Path) -> Result<Pkcs11> {
    let ctx = Pkcs11::new(module).map_err(|source| Error::ModuleLoad {
        module: module.to_path_buf(),
        source,
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            Ok(ctx)
        }
        Err(source) => Err(Error::ModuleLoad {
            module: module.to_path_buf(),
            source,
        }),
    }
}

pub(crate) fn find_slot(ctx: &Pkcs11, label: &str, module: &Path) -> Result<Slot> {
    for slot in ctx.get_slots_with_token()? {
        let info = ctx.get_token_info(slot)?;
        if info.label().trim_end() == label {
            return Ok(slot);
        }
    }
    Err(Error::TokenNotFound {
        label: label.to_owned(),
        module: module.to_path_buf(),
    })
}

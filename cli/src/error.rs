//! The `kms` command's errors are the application layer's (`kms_deployment::Error`): every
//! command is one call into it or into a client, and prints what that call says.

pub(crate) use kms_deployment::error::{read, write_private, write_public, Error};

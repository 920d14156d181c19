//! # Design overview
//!
//! `kms-api` is the wire contract of sovereign-kms: the protobuf files under `proto/kms/v1`,
//! the tonic code generated from them, and small client types for each plane. It holds no
//! server logic.
//!
//! ```text
//!   proto/kms/v1/data.proto  ──▶ kms::v1::data_plane_{client,server}  (workloads)
//!   proto/kms/v1/admin.proto ──▶ kms::v1::admin_{client,server}       (operators)
//! ```

mod client;

pub use client::{AdminClient, ClientTls, ConnectError, DataClient};

/// Generated types and services of package `kms.v1`.
pub mod v1 {
    #![allow(
        missing_docs,
        unreachable_pub,
        clippy::all,
        clippy::pedantic,
        clippy::restriction
    )]
    tonic::include_proto!("kms.v1");
}

/// The data plane's file descriptor set, for its listener's reflection.
pub const DATA_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("kms_data_descriptor");
/// The admin plane's file descriptor set, for its listener's reflection.
pub const ADMIN_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("kms_admin_descriptor");

/// Plaintext-carrying messages wipe their secret fields when dropped, on both sides of the
/// wire: a server's response is dropped once encoded, a request once decoded and used. (The
/// encoded bytes themselves are in gRPC and HTTP/2 buffers this crate does not own; see
/// SECURITY.md.) Their fields are taken with `std::mem::take`, not moved out.
mod wiped_on_drop {
    use zeroize::Zeroize;

    use crate::v1::{
        CreateGrantResponse, DecryptResponse, EncryptRequest, GenerateDataKeyResponse,
    };

    impl Drop for GenerateDataKeyResponse {
        fn drop(&mut self) {
            self.plaintext.zeroize();
        }
    }

    impl Drop for DecryptResponse {
        fn drop(&mut self) {
            self.plaintext.zeroize();
        }
    }

    impl Drop for EncryptRequest {
        fn drop(&mut self) {
            self.plaintext.zeroize();
        }
    }

    impl Drop for CreateGrantResponse {
        fn drop(&mut self) {
            self.token.zeroize();
        }
    }
}

/// Plaintext-carrying messages print field lengths, never bytes.
mod redacted_debug {
    use std::fmt;

    use crate::v1::{
        CreateGrantResponse, DecryptResponse, EncryptRequest, GenerateDataKeyResponse,
    };

    impl fmt::Debug for GenerateDataKeyResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("GenerateDataKeyResponse")
                .field("key_id", &self.key_id)
                .field("key_version", &self.key_version)
                .field("plaintext_len", &self.plaintext.len())
                .field("ciphertext_len", &self.ciphertext.len())
                .finish()
        }
    }

    impl fmt::Debug for DecryptResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("DecryptResponse")
                .field("key_id", &self.key_id)
                .field("key_version", &self.key_version)
                .field("plaintext_len", &self.plaintext.len())
                .finish()
        }
    }

    impl fmt::Debug for CreateGrantResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateGrantResponse")
                .field("grant_id", &self.grant_id)
                .field("token", &"<redacted>")
                .field("expires_at", &self.expires_at)
                .field("key_id", &self.key_id)
                .finish()
        }
    }

    impl fmt::Debug for EncryptRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("EncryptRequest")
                .field("key", &self.key)
                .field("plaintext_len", &self.plaintext.len())
                .field("context_entries", &self.encryption_context.len())
                .finish()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn debug_never_prints_plaintext() {
            let canary = b"CANARY-PLAINTEXT-7f3a".to_vec();
            let mut gdk = GenerateDataKeyResponse::default();
            gdk.plaintext.clone_from(&canary);
            let mut dec = DecryptResponse::default();
            dec.plaintext.clone_from(&canary);
            let mut enc = EncryptRequest::default();
            enc.plaintext.clone_from(&canary);
            let batch = crate::v1::GenerateDataKeyResult {
                result: Some(crate::v1::generate_data_key_result::Result::Ok(gdk.clone())),
            };
            for text in [
                format!("{gdk:?}"),
                format!("{dec:?}"),
                format!("{enc:?}"),
                format!("{batch:?}"),
            ] {
                assert!(!text.contains("CANARY"), "{text}");
                assert!(!text.contains("67, 65, 78"), "{text}"); // the bytes of "CAN"
                assert!(text.contains("plaintext_len: 21"), "{text}");
            }
        }
    }
}

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

/// The encoded file descriptor set, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kms_descriptor");

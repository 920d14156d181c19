//! # Design overview
//!
//! `kms-core` is the domain of sovereign-kms: the key hierarchy, key versions and their
//! lifecycle, the ciphertext format, envelope operations, the authorisation seam, and the
//! storage trait with its RocksDB implementation.
//!
//! It does not open sockets, parse flags or know about gRPC. It reads neither the clock nor
//! an RNG directly: [`Deps`] injects a [`Clock`], an [`Rng`], a [`Store`], an
//! [`hsm_bridge::Hsm`] and an [`Authorizer`].
//!
//! Key hierarchy:
//!
//! ```text
//!  HSM token ── root wrapping key (AES-256, sensitive, non-extractable, never leaves)
//!                 │ wraps (AES-GCM, AAD = key id ‖ version)
//!                 ▼
//!  KEK versions ── software: 32 bytes wrapped in the store, unwrapped into memory
//!              └── hsm:      a non-extractable token object per version
//!                 │ seals (AES-256-GCM, AAD = blob header ‖ canonical context)
//!                 ▼
//!  DEKs ── returned once in plaintext, and as a blob (see [`blob`])
//! ```
//!
//! Data-plane flow for one request: resolve the key's metadata from the in-memory cache →
//! ask the [`Authorizer`] (a denial and an unknown key are both refused before any HSM
//! call) → check the key's state → seal or open with the version's key.

pub mod attest;
pub mod audit;
pub mod backup;
pub mod blob;
pub mod bundle;
mod clock;
pub mod context;
pub mod custody;
pub mod drill;
mod error;
pub mod governance;
mod ids;
pub mod inspect;
mod key;
mod kms;
mod op;
pub mod receipt;
pub mod reshare;
pub mod restore;
pub mod seal;
mod secret;
mod signature;
pub mod store;

pub use clock::{Clock, Rng, SystemClock, SystemRng};
pub use context::EncryptionContext;
pub use error::{Error, ErrorClass, InvalidInput};
pub use governance::authz::{
    AccessRequest, AuthMethod, Authorizer, Caller, Decision, GrantFacts, PolicyDecision, Verdict,
};
pub use ids::{Alias, KeyId, KeyRef, KeyVersion, OperatorId, Principal};
pub use key::{
    canary_context, kek_wrap_aad, Canary, DeletedVersion, Destruction, DestructionAuthority,
    Escrow, KeyRecord, KeyState, Labels, Protection, StoredMaterial, TokenObject, VersionRecord,
};
pub use kms::{
    DataKey, Deps, KeyCensus, Kms, NewKey, Opened, ReEncrypted, Sealed, MAX_DESTROY_WAITING_DAYS,
};
pub use op::Op;
pub use secret::{Dek, Kek, Plaintext, DEK_LEN, KEK_LEN};
pub use store::{RocksStore, Store};

//! # Design overview
//!
//! The application layer of sovereign-kms: the one place that knows how a deployment is laid
//! out on a host and opened. Every front end (the `kms` command today; the HTTP faces, the
//! HA nodes and the tests tomorrow) opens a deployment and starts a node through this crate.
//!
//! It owns the config file ([`config`]), the data directory and its file modes, opening the
//! token, the store, the audit log and governance in one order ([`open`]), start-up seeding
//! ([`seed`]), the development layout ([`dev`]), a node's start-up and shutdown around the
//! `server` crate ([`node`]), and the host side of the ceremonies ([`ceremony`], [`recover`],
//! [`reshare`]) and of the provider-exit drill ([`drill`]).
//!
//! It does **not** parse flags or print (the `kms` command does), and it decides no domain
//! question: what a ceremony, a restore or a drill check means is `kms-core`'s and
//! `recovery`'s; this crate reads and writes the files, opens what they need, and calls them.
//!
//! ```text
//!   kms (flags, printing) ─▶ deployment ─┬─▶ open: config ─▶ store ─▶ audit log ─▶ token ─▶ governance
//!                                        ├─▶ node: open + seed ─▶ server (both planes) ─▶ stop
//!                                        └─▶ ceremony / recover / reshare / drill ─▶ kms-core, recovery
//! ```

pub mod audit;
pub mod backup;
pub mod ceremony;
pub mod config;
pub mod dev;
pub mod drill;
pub mod error;
mod events;
pub mod node;
pub mod open;
pub mod recover;
pub mod reshare;
pub mod seed;

pub use error::Error;
pub use open::Deployment;

//! The reshare ceremony's core (docs/RECOVERY.md, "Reshare"): k current shares rebuild the
//! recovery secret, a new secret and key pair are made at the next epoch, every seal is made
//! again under the new public key, and the new secret is split to the new custodians.
//!
//! ```text
//! check_shares ─▶ SharesChecked ─open─▶ Opened (S rebuilt and checked, every seal opened
//!   in memory) ─reseal─▶ Resealed (S' made, every item sealed to it, shares and transcript
//!   e+1; S, S' and the opened items wiped) ─commit─▶ one synced batch
//! ```
//!
//! The host (the CLI) opens the shares, checks the approval ticket, writes the share files and
//! the transcript between `reseal` and `commit`, and audits the outcome.

use std::path::PathBuf;

use recovery::ceremony::{Checked, EscrowInput, HostFacts, Sealed};
use recovery::{Custodian, Purpose, RecoveryPrivateKey, ShareEnvelope, TokenInfo};
use secrecy::{ExposeSecret, SecretSlice};

use crate::custody::{
    authority_changes, escrow_pin, load, named_seal_binding, named_seal_change, sealed_version,
    version_records, Custody, RECOVER_TRANSCRIPT_PREFIX, SEAL_PREFIX, TRANSCRIPT, VERIFIED_PREFIX,
};
use crate::error::Error;
use crate::governance::actions::GatedAction;
use crate::governance::approvals::{ApprovalRequest, Ticket, TicketRefusal};
use crate::key::{kek_wrap_aad, Escrow, VersionRecord};
use crate::restore::{check_share_set, rebuild, RestoreError};
use crate::store::{Change, Store, Table};

/// Store key prefix (custody table) of what an earlier epoch recorded: `history/<epoch>/...`.
pub(crate) const HISTORY_PREFIX: &[u8] = b"history/";

/// The gated action that authorises a reshare.
pub const ACTION: GatedAction = GatedAction::Reshare;
/// An approved reshare: usable once, for an hour, by the offline ceremony.
pub const TICKET: Ticket = Ticket::new(ACTION, 3600, b"reshare-used/");

/// Whether the stored approval rules gate a reshare.
pub fn gated(store: &dyn Store) -> Result<bool, Error> {
    Ok(crate::governance::approvals::stored_rules(store)?.gates(ACTION.action()))
}

/// The approved reshare `id`, if the ceremony may use it now (see [`Ticket::check`]). The
/// caller checks that its stored request names the plan being run, and consumes it with
/// [`Ticket::consume`] in [`Resealed::commit`]'s batch.
pub fn ticket(store: &dyn Store, id: &str, now: u64) -> Result<ApprovalRequest, ReshareError> {
    let r = crate::governance::approvals::read_request(store, id)?;
    match TICKET.check(store, &r, now)? {
        Ok(()) => Ok(r),
        Err(refusal) => Err(ReshareError::Ticket {
            id: id.to_owned(),
            why: match refusal {
                TicketRefusal::OtherAction(a) => format!("it approves {a}, not a reshare"),
                TicketRefusal::Used => "it was used by an earlier reshare; ask again".into(),
                other => other.to_string(),
            },
        }),
    }
}

/// Why a reshare is refused. Nothing is written when one is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReshareError {
    /// A share, or the set of them, is refused (the same checks as recovery's).
    #[error(transparent)]
    Shares(#[from] RestoreError),
    /// A seal on record does not open with the rebuilt recovery key.
    #[error(
        "{what} does not open with the current recovery key (the custody records are damaged)"
    )]
    Unseal {
        /// What.
        what: String,
    },
    /// The approval given does not authorise this reshare.
    #[error("approval {id}: {why}")]
    Ticket {
        /// The approval id.
        id: String,
        /// Why it does not.
        why: String,
    },
    /// The custody records changed between the start of the ceremony and its commit.
    #[error("the custody records changed while the reshare ran (another ceremony?); nothing was written")]
    Changed,
    /// The store, the parameters or the recovery crate refused.
    #[error(transparent)]
    Core(#[from] Error),
}

impl From<recovery::Error> for ReshareError {
    fn from(e: recovery::Error) -> Self {
        ReshareError::Core(Error::from(e))
    }
}

/// Where a reseal puts its output.
enum Target {
    /// A software version's record gains the new seal.
    Version(VersionRecord),
    /// A named seal (`seal/NAME`).
    Named(String),
}

/// One opened item, to seal again.
struct Item {
    purpose: Purpose,
    aad: Vec<u8>,
    material: SecretSlice<u8>,
    target: Target,
}

/// The current custody, with k shares checked against it.
pub struct SharesChecked {
    custody: Custody,
    shares: Vec<(PathBuf, ShareEnvelope)>,
}

impl std::fmt::Debug for SharesChecked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharesChecked")
            .field("ceremony_id", &self.custody.record.ceremony_id)
            .field("epoch", &self.custody.record.epoch)
            .field("shares", &self.shares.len())
            .finish_non_exhaustive()
    }
}

/// Reads the custody on record and checks `shares` against its transcript.
pub fn check_shares(
    store: &dyn Store,
    shares: Vec<(PathBuf, ShareEnvelope)>,
) -> Result<SharesChecked, ReshareError> {
    let custody = load(store)?.ok_or(Error::CustodyMissing)?;
    check_share_set(&custody.transcript, &shares)?;
    Ok(SharesChecked { custody, shares })
}

impl SharesChecked {
    /// Rebuilds `S`, checks the transcript MAC with it, and opens every seal on record: each
    /// software version's, and each named seal (escrow key, grant MAC key, context-digest
    /// key). A seal of a kind this release does not know is refused rather than left sealed
    /// to a key that is about to lose its quorum.
    pub fn open(self, store: &dyn Store) -> Result<Opened, ReshareError> {
        let SharesChecked { custody, shares } = self;
        let (secret, private) = rebuild(shares, &custody.transcript, &custody.record)?;
        drop(secret);
        let mut items = Vec::new();
        for v in version_records(store)? {
            let Some(Escrow::Sealed { sealed, .. }) = &v.escrow else {
                continue;
            };
            let aad = kek_wrap_aad(v.key_id, v.version);
            let material = open_one(&private, Purpose::SoftwareVersion, &aad, sealed, || {
                format!("key {} version {}", v.key_id, v.version)
            })?;
            items.push(Item {
                purpose: Purpose::SoftwareVersion,
                aad,
                material,
                target: Target::Version(v),
            });
        }
        let pin = escrow_pin(&custody.transcript)?;
        for row in store.scan(Table::Custody)? {
            let Some(name) = row.key.strip_prefix(SEAL_PREFIX) else {
                continue;
            };
            let name = String::from_utf8_lossy(name).into_owned();
            let (purpose, aad) =
                named_seal_binding(&name, pin.as_ref()).ok_or_else(|| ReshareError::Unseal {
                    what: format!(
                        "the seal {name:?} (unknown to this release, or no escrow key is pinned)"
                    ),
                })?;
            let material = open_one(&private, purpose, &aad, &row.value, || {
                format!("the seal {name:?}")
            })?;
            items.push(Item {
                purpose,
                aad,
                material,
                target: Target::Named(name),
            });
        }
        drop(private);
        Ok(Opened { custody, items })
    }
}

fn open_one(
    private: &RecoveryPrivateKey,
    purpose: Purpose,
    aad: &[u8],
    sealed: &[u8],
    what: impl Fn() -> String,
) -> Result<SecretSlice<u8>, ReshareError> {
    private
        .open(purpose, aad, sealed)
        .map_err(|_| ReshareError::Unseal { what: what() })
}

/// `S` checked; every sealed item open in memory.
pub struct Opened {
    custody: Custody,
    items: Vec<Item>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("epoch", &self.custody.record.epoch)
            .field("items", &self.items.len())
            .finish_non_exhaustive()
    }
}

/// What the reshare is asked to make.
#[derive(Debug)]
pub struct Plan {
    /// The new k.
    pub threshold: usize,
    /// The new custodians.
    pub custodians: Vec<Custodian>,
    /// The current audit signer's id, pinned by the new transcript.
    pub audit_signer: String,
    /// The current token.
    pub token: TokenInfo,
    /// Now, Unix seconds.
    pub time: u64,
}

impl Opened {
    /// Makes `S'` and its key pair at the next epoch, seals every opened item to the new
    /// public key, splits `S'` to the new custodians and writes the transcript naming the
    /// one it replaces. `S'` and the opened items are wiped when this returns.
    pub fn reseal(self, plan: Plan, rng: &dyn recovery::Random) -> Result<Resealed, ReshareError> {
        let Opened { custody, items } = self;
        let checked = Checked::new(plan.threshold, plan.custodians)?;
        let derived = checked.derive_reshare(&custody.transcript, rng)?;
        let inputs: Vec<EscrowInput<'_>> = items
            .iter()
            .map(|i| EscrowInput {
                purpose: i.purpose,
                aad: i.aad.clone(),
                material: i.material.expose_secret(),
            })
            .collect();
        let facts = HostFacts {
            token: plan.token,
            audit_signer: plan.audit_signer,
            escrow_key: custody.transcript.escrow_key.clone(),
            time: plan.time,
        };
        let sealed = derived.seal(rng, facts, &inputs)?;
        drop(inputs);
        let targets = items.into_iter().map(|i| i.target).collect();
        Ok(Resealed {
            previous: custody,
            sealed,
            targets,
        })
    }
}

/// The new authority, made in memory; no secret is left in it.
pub struct Resealed {
    previous: Custody,
    sealed: Sealed,
    targets: Vec<Target>,
}

impl std::fmt::Debug for Resealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resealed")
            .field("epoch", &self.sealed.record.epoch)
            .field("items", &self.targets.len())
            .finish_non_exhaustive()
    }
}

impl Resealed {
    /// The new shares, transcript and record, to write out.
    pub fn sealed(&self) -> &Sealed {
        &self.sealed
    }

    /// The one synced write that makes the reshare take effect (see the module docs), with
    /// `extra` (the host's consumed approval ticket) in the same batch. Refused if the custody
    /// on record is no longer the one the shares were checked against.
    pub fn commit(self, store: &dyn Store, extra: Vec<Change>) -> Result<Sealed, ReshareError> {
        let Resealed {
            previous,
            sealed,
            targets,
        } = self;
        let now = load(store)?.ok_or(Error::CustodyMissing)?;
        if now.transcript != previous.transcript || now.record.epoch != previous.record.epoch {
            return Err(ReshareError::Changed);
        }
        if sealed.seals.len() != targets.len() {
            return Err(Error::Internal("one seal per resealed item").into());
        }
        let old_epoch = previous.record.epoch.get();
        let history =
            |rest: &[u8]| [HISTORY_PREFIX, format!("{old_epoch:04}/").as_bytes(), rest].concat();
        let ceremony = sealed.record.ceremony_id;
        let mut changes = Vec::from(authority_changes(&sealed)?);
        changes.push(Change::Put {
            table: Table::Custody,
            key: history(TRANSCRIPT),
            value: previous.transcript.canonical()?,
        });
        for row in store.scan(Table::Custody)? {
            if row.key.starts_with(RECOVER_TRANSCRIPT_PREFIX) {
                changes.push(Change::Put {
                    table: Table::Custody,
                    key: history(&row.key),
                    value: row.value,
                });
                changes.push(Change::Delete {
                    table: Table::Custody,
                    key: row.key,
                });
            } else if row.key.starts_with(VERIFIED_PREFIX) {
                changes.push(Change::Delete {
                    table: Table::Custody,
                    key: row.key,
                });
            }
        }
        for (target, seal) in targets.into_iter().zip(&sealed.seals) {
            changes.push(match target {
                Target::Version(record) => sealed_version(record, ceremony, seal)?,
                Target::Named(name) => named_seal_change(&name, seal),
            });
        }
        changes.extend(extra);
        store.write(changes)?;
        Ok(sealed)
    }
}

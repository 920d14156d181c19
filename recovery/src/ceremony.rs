//! The init ceremony as consumed-by-value states (see `docs/CUSTODY.md`).
//!
//! ```text
//! Checked ──derive──▶ Derived ──seal──▶ Sealed      (then the host writes files and commits)
//! Checked ──derive_reshare(previous)──▶ Derived ──seal──▶ Sealed      (reshare: epoch + 1)
//! ```
//!
//! Each step takes its state by value, so a step cannot run twice or out of order, and the
//! recovery secret lives only in `Derived`: `seal` consumes it, so it is wiped when the shares
//! and every escrow seal are made. Writing the share files and the one synced store write are
//! the host's (the crate opens neither files nor the store).

use std::collections::BTreeSet;
use std::fmt;

use crate::Random;

use crate::seal::{Purpose, RecoveryKeyRecord, RecoveryPublicKey};
use crate::share::{Custodian, CustodianName, Share, ShareEnvelope};
use crate::transcript::{
    CeremonyKind, EscrowPin, TokenInfo, Transcript, TranscriptCustodian, TRANSCRIPT_FORMAT,
};
use crate::{CeremonyId, Epoch, Error, RecoverySecret};

/// Parameters checked: 2 <= k <= n <= 255, names unique.
#[derive(Debug)]
pub struct Checked {
    threshold: u8,
    custodians: Vec<Custodian>,
}

impl Checked {
    /// Checks the threshold and the custodians.
    pub fn new(threshold: usize, custodians: Vec<Custodian>) -> Result<Self, Error> {
        let n = custodians.len();
        let bad = Error::Threshold {
            threshold,
            custodians: n,
        };
        if !(2 <= threshold && threshold <= n && n <= 255) {
            return Err(bad);
        }
        let mut names = BTreeSet::new();
        for c in &custodians {
            if !names.insert(c.name.clone()) {
                return Err(Error::CustodianTwice {
                    name: c.name.to_string(),
                });
            }
        }
        let threshold = u8::try_from(threshold).map_err(|_| bad)?;
        Ok(Self {
            threshold,
            custodians,
        })
    }

    /// Makes the recovery secret and the recovery key pair.
    pub fn derive(self, rng: &dyn Random) -> Result<Derived, Error> {
        let ceremony_id = CeremonyId::new_v4_from(rng)?;
        let secret = RecoverySecret::generate(rng)?;
        let record = RecoveryKeyRecord::create(&secret, ceremony_id, Epoch::FIRST, rng)?;
        Ok(Derived {
            checked: self,
            secret,
            record,
            kind: CeremonyKind::Init,
            previous_sha256: None,
        })
    }

    /// A reshare's new recovery secret and key pair: a fresh secret (never the old one
    /// re-split), the same ceremony id, the epoch after `previous`'s. The caller has checked
    /// `previous` with a quorum of its shares.
    pub fn derive_reshare(self, previous: &Transcript, rng: &dyn Random) -> Result<Derived, Error> {
        let epoch = previous
            .epoch
            .get()
            .checked_add(1)
            .and_then(Epoch::new)
            .ok_or(Error::Internal("epoch overflow"))?;
        let secret = RecoverySecret::generate(rng)?;
        let record = RecoveryKeyRecord::create(&secret, previous.ceremony_id, epoch, rng)?;
        Ok(Derived {
            checked: self,
            secret,
            record,
            kind: CeremonyKind::Reshare,
            previous_sha256: Some(hex::encode(previous.sha256()?)),
        })
    }
}

/// The secret exists; nothing is sealed yet.
pub struct Derived {
    checked: Checked,
    secret: RecoverySecret,
    record: RecoveryKeyRecord,
    kind: CeremonyKind,
    previous_sha256: Option<String>,
}

/// Something to escrow at init: material that exists before the ceremony (software versions,
/// the grant MAC key, the audit context-digest key).
pub struct EscrowInput<'a> {
    /// What it is.
    pub purpose: Purpose,
    /// What it is bound to.
    pub aad: Vec<u8>,
    /// The material; the caller keeps it in a secret type.
    pub material: &'a [u8],
}

/// What the host tells the ceremony about itself, for the transcript.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// The token.
    pub token: TokenInfo,
    /// The audit signer's public key, hex.
    pub audit_signer: String,
    /// The escrow key pin, when the token holds one.
    pub escrow_key: Option<EscrowPin>,
    /// Now, Unix seconds.
    pub time: u64,
}

impl Derived {
    /// The recovery public key, to seal to.
    pub fn public(&self) -> &RecoveryPublicKey {
        &self.record.public
    }

    /// The ceremony id.
    pub fn ceremony_id(&self) -> CeremonyId {
        self.record.ceremony_id
    }

    /// Seals every input to the recovery public key, splits the secret, seals each share to
    /// its custodian, and writes the transcript. Consumes the secret.
    pub fn seal(
        self,
        rng: &dyn Random,
        facts: HostFacts,
        inputs: &[EscrowInput<'_>],
    ) -> Result<Sealed, Error> {
        let Derived {
            checked,
            secret,
            record,
            kind,
            previous_sha256,
        } = self;
        let seals = inputs
            .iter()
            .map(|i| record.public.seal(rng, i.purpose, &i.aad, i.material))
            .collect::<Result<Vec<_>, _>>()?;
        let n = checked.custodians.len();
        let shares = Share::split(&secret, n, usize::from(checked.threshold))?;
        let mut nonce = [0u8; 32];
        rng.fill(&mut nonce).map_err(|_| Error::Random)?;
        let custodians = checked
            .custodians
            .iter()
            .zip(&shares)
            .map(|(c, s)| TranscriptCustodian {
                name: c.name.to_string(),
                index: s.index(),
                recipient: c.recipient.to_string(),
                commitment: hex::encode(s.commitment(record.ceremony_id)),
            })
            .collect();
        let mut transcript = Transcript {
            format: TRANSCRIPT_FORMAT.to_owned(),
            kind,
            ceremony_id: record.ceremony_id,
            epoch: record.epoch,
            threshold: checked.threshold,
            custodians,
            recovery_public_key: record.public.clone(),
            escrow_key: facts.escrow_key,
            token: facts.token,
            audit_signer: facts.audit_signer,
            nonce: hex::encode(nonce),
            time: facts.time,
            mac: String::new(),
            previous_sha256,
        };
        transcript.mac_with(&secret)?;
        drop(secret);
        let transcript_sha256 = transcript.sha256()?;
        let count = u8::try_from(n).map_err(|_| Error::Internal("custodian count"))?;
        let mut share_files = Vec::with_capacity(n);
        for (c, share) in checked.custodians.iter().zip(shares) {
            let envelope = ShareEnvelope {
                ceremony_id: record.ceremony_id,
                epoch: record.epoch,
                custodian: c.name.clone(),
                threshold: checked.threshold,
                custodians: count,
                transcript_sha256,
                share,
            };
            share_files.push((c.name.clone(), envelope.seal_to(&c.recipient)?));
        }
        Ok(Sealed {
            record,
            transcript,
            transcript_sha256,
            share_files,
            seals,
        })
    }
}

impl fmt::Debug for Derived {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Derived")
            .field("checked", &self.checked)
            .field("ceremony_id", &self.record.ceremony_id)
            .field("epoch", &self.record.epoch)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Everything the host writes: no secret is left in it.
#[derive(Debug)]
pub struct Sealed {
    /// The recovery key record for the store.
    pub record: RecoveryKeyRecord,
    /// The transcript.
    pub transcript: Transcript,
    /// Its hash.
    pub transcript_sha256: [u8; 32],
    /// One age file per custodian, in custodian order.
    pub share_files: Vec<(CustodianName, Vec<u8>)>,
    /// One seal per escrow input, in input order.
    pub seals: Vec<Vec<u8>>,
}

/// What a custodian states after checking their share on their own machine: which ceremony,
/// who, and the commitment they recomputed from the share. It holds no secret: the server
/// that records a verification never sees a share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareClaim {
    /// The ceremony.
    pub ceremony_id: CeremonyId,
    /// Its epoch.
    pub epoch: Epoch,
    /// The custodian's name.
    pub custodian: String,
    /// Their share's index.
    pub index: u8,
    /// The transcript hash the share carries.
    pub transcript_sha256: [u8; 32],
    /// The commitment recomputed from the share.
    pub commitment: [u8; 32],
}

impl ShareClaim {
    /// The claim a decrypted share supports.
    pub fn of(envelope: &ShareEnvelope) -> Self {
        Self {
            ceremony_id: envelope.ceremony_id,
            epoch: envelope.epoch,
            custodian: envelope.custodian.as_str().to_owned(),
            index: envelope.share.index(),
            transcript_sha256: envelope.transcript_sha256,
            commitment: envelope.share.commitment(envelope.ceremony_id),
        }
    }
}

/// Checks a decrypted share against a ceremony's transcript: same ceremony, epoch and
/// transcript hash, the custodian at that index, and the commitment recorded at init.
/// Returns the transcript's entry for the custodian.
pub fn check_share<'t>(
    transcript: &'t Transcript,
    envelope: &ShareEnvelope,
) -> Result<&'t TranscriptCustodian, Error> {
    check_claim(transcript, &ShareClaim::of(envelope))
}

/// Checks a custodian's claim against a ceremony's transcript (see [`check_share`]).
pub fn check_claim<'t>(
    transcript: &'t Transcript,
    claim: &ShareClaim,
) -> Result<&'t TranscriptCustodian, Error> {
    let fault = |fault| Err(Error::Transcript { fault });
    if claim.ceremony_id != transcript.ceremony_id {
        return fault("the share is of another ceremony (another deployment's share?)");
    }
    if claim.epoch < transcript.epoch {
        return fault("the share is of an earlier epoch: shares from before a reshare are refused");
    }
    if claim.epoch != transcript.epoch {
        return fault("the share is of another epoch than the ceremony on record");
    }
    if claim.transcript_sha256 != transcript.sha256()? {
        return fault("the share names another transcript");
    }
    let Some(entry) = transcript
        .custodians
        .iter()
        .find(|c| c.index == claim.index)
    else {
        return fault("no custodian has the share's index");
    };
    if entry.name != claim.custodian {
        return fault("the share's custodian is not the one at its index");
    }
    if entry.commitment != hex::encode(claim.commitment) {
        return fault("the share does not match the commitment recorded at init");
    }
    Ok(entry)
}

//! The recovery ceremony's core (docs/RECOVERY.md, "The recovery ceremony as a state
//! machine"): a backup bundle and k custodians' shares become a restored store on a new
//! token. Each state is a type consumed by the next step, so no step runs twice or out of
//! order; the recovery secret lives from [`SharesChecked::combine`] until [`Prepared::restore`]
//! ends, and is wiped with the state that holds it.
//!
//! ```text
//! check ─▶ Checked ─check_shares─▶ SharesChecked ─combine─▶ Verified (S rebuilt, transcript
//!   MAC and bundle signature checked) ─prepare─▶ Prepared (every seal opened, in memory)
//!   ─restore─▶ Recovered (hsm versions imported, software versions wrapped under the new root
//!   key, the store written, `custody.recovered` chained to the bundle's head)
//! ```
//!
//! The host (the CLI) reads files, opens shares with age identities, imports the trusted
//! escrow key as the Security Officer between `prepare` and `restore`, and owns the target
//! directory: it restores into a temporary store and moves it into place only on success.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{digest, SHA256};
use recovery::{
    Purpose, RecoveryKeyRecord, RecoveryPrivateKey, RecoverySecret, ShareEnvelope, Transcript,
};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox, SecretSlice};

use crate::bundle::{Bundle, BundleError, Header, Record};
use crate::custody::{
    escrow_key_aad, escrow_pin, DeploymentKey, DEPLOYMENT_KEYS, RECORD, RECOVER_TRANSCRIPT_PREFIX,
    SEAL_PREFIX, TRANSCRIPT,
};
use crate::key::{kek_wrap_aad, Escrow, StoredMaterial, VersionRecord};
use crate::secret::Kek;
use crate::store::Table;

mod apply;

pub use self::apply::{Facts, Recovered};

/// Store writes per batch while restoring.
const BATCH: usize = 2000;

/// Why a recovery is refused. Each names the file at fault where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The bundle is malformed, truncated, oversized or of an unknown version.
    #[error("{file}: {problem}")]
    Bundle {
        /// The bundle file.
        file: PathBuf,
        /// What is wrong.
        problem: BundleError,
    },
    /// The bundle lacks what a recovery needs (custody records, say).
    #[error("{file}: {what}")]
    BundleContent {
        /// The bundle file.
        file: PathBuf,
        /// What is missing or inconsistent.
        what: String,
    },
    /// The bundle is not signed by a signer the transcripts pin, or its signature fails.
    #[error("{file}: the bundle is not authentic: {problem} (it was changed, or made by someone who is not this deployment)")]
    NotAuthentic {
        /// The bundle file.
        file: PathBuf,
        /// The check that failed.
        problem: BundleError,
    },
    /// A share is of another ceremony (another deployment).
    #[error("{file}: this share is of ceremony {found}, not of ceremony {expected} (another deployment's share?)")]
    ShareCeremony {
        /// The share file.
        file: PathBuf,
        /// Its ceremony.
        found: String,
        /// The bundle's.
        expected: String,
    },
    /// A share is of another epoch than the bundle (older: from before a reshare).
    #[error("{file}: this share is of epoch {found}, not of the current epoch {expected} (shares from before a reshare are refused)")]
    ShareEpoch {
        /// The share file.
        file: PathBuf,
        /// Its epoch.
        found: u32,
        /// The bundle's.
        expected: u32,
    },
    /// Two shares of one custodian.
    #[error("{file}: custodian {custodian} is given twice")]
    ShareTwice {
        /// The second file.
        file: PathBuf,
        /// The custodian.
        custodian: String,
    },
    /// A share that does not match the transcript (tampered, or not issued by it).
    #[error("{file}: the share does not match the ceremony transcript: {fault}")]
    ShareInvalid {
        /// The share file.
        file: PathBuf,
        /// What does not match.
        fault: String,
    },
    /// Fewer than k shares.
    #[error("{given} of {threshold} shares given; {more} more needed")]
    TooFewShares {
        /// Given.
        given: usize,
        /// k.
        threshold: u8,
        /// k − given.
        more: usize,
    },
    /// The shares do not rebuild the secret the transcript was MACed with.
    #[error("the shares do not rebuild this deployment's recovery secret ({0})")]
    Secret(String),
    /// A sealed item in the bundle does not open.
    #[error("{file}: {what} does not open with the recovery key (the bundle is damaged)")]
    Unseal {
        /// The bundle file.
        file: PathBuf,
        /// What.
        what: String,
    },
    /// The new token refused a step.
    #[error("the new token: {0}")]
    Token(String),
    /// The new store refused a write.
    #[error("the new store: {0}")]
    Store(String),
}

/// A parsed bundle and the custody records it carries.
pub struct Checked {
    file: PathBuf,
    bundle: Bundle,
    sha256: [u8; 32],
    record: RecoveryKeyRecord,
    transcript: Transcript,
    recoveries: Vec<Transcript>,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("file", &self.file)
            .field("bundle_sha256", &hex::encode(self.sha256))
            .finish_non_exhaustive()
    }
}

fn find<'b>(bundle: &'b Bundle, table: Table, key: &[u8]) -> Option<&'b Record> {
    bundle
        .records
        .iter()
        .find(|r| r.table == table && r.key == key)
}

/// Parses a bundle (structure, bounds, body hash) and reads its custody records. No secret is
/// needed yet; the signature is checked once the quorum has rebuilt the secret.
pub fn check(file: &Path, bytes: &[u8]) -> Result<Checked, RestoreError> {
    let bundle = crate::bundle::parse(bytes).map_err(|problem| RestoreError::Bundle {
        file: file.to_owned(),
        problem,
    })?;
    let content = |what: &str| RestoreError::BundleContent {
        file: file.to_owned(),
        what: what.to_owned(),
    };
    let record_bytes = find(&bundle, Table::Custody, RECORD)
        .ok_or_else(|| content("the bundle holds no recovery key record"))?;
    let record = RecoveryKeyRecord::parse(&record_bytes.value)
        .map_err(|_| content("the bundle's recovery key record is malformed"))?;
    let transcript = find(&bundle, Table::Custody, TRANSCRIPT)
        .ok_or_else(|| content("the bundle holds no ceremony transcript"))?;
    let transcript = Transcript::parse(&transcript.value)
        .map_err(|e| content(&format!("the bundle's transcript is malformed: {e}")))?;
    let mut recoveries = Vec::new();
    for r in &bundle.records {
        if r.table == Table::Custody && r.key.starts_with(RECOVER_TRANSCRIPT_PREFIX) {
            recoveries.push(
                Transcript::parse(&r.value)
                    .map_err(|e| content(&format!("a recovery transcript is malformed: {e}")))?,
            );
        }
    }
    let h = &bundle.header;
    let sha = transcript
        .sha256()
        .map_err(|_| content("the transcript cannot be hashed"))?;
    if h.ceremony_id != transcript.ceremony_id.to_string()
        || h.epoch != transcript.epoch.get()
        || h.transcript_sha256 != hex::encode(sha)
        || record.ceremony_id != transcript.ceremony_id
        || record.public != transcript.recovery_public_key
    {
        return Err(content(
            "the header, the recovery key record and the transcript do not agree",
        ));
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(digest(&SHA256, bytes).as_ref());
    Ok(Checked {
        file: file.to_owned(),
        bundle,
        sha256,
        record,
        transcript,
        recoveries,
    })
}

impl Checked {
    /// The bundle's header.
    pub fn header(&self) -> &Header {
        &self.bundle.header
    }

    /// SHA-256 of the bundle file, hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// k.
    pub fn threshold(&self) -> u8 {
        self.transcript.threshold
    }

    /// Checks every share against the bundle's transcript: same ceremony and epoch, a
    /// distinct custodian, its commitment; and that there are at least k.
    pub fn check_shares(
        self,
        shares: Vec<(PathBuf, ShareEnvelope)>,
    ) -> Result<SharesChecked, RestoreError> {
        check_share_set(&self.transcript, &shares)?;
        Ok(SharesChecked {
            checked: self,
            shares,
        })
    }
}

/// Checks every share against a transcript: same ceremony and epoch, a distinct custodian,
/// its commitment; and that there are at least k. Recovery and reshare both run it.
pub(crate) fn check_share_set(
    t: &Transcript,
    shares: &[(PathBuf, ShareEnvelope)],
) -> Result<(), RestoreError> {
    let mut seen = BTreeSet::new();
    for (file, share) in shares {
        if share.ceremony_id != t.ceremony_id {
            return Err(RestoreError::ShareCeremony {
                file: file.clone(),
                found: share.ceremony_id.to_string(),
                expected: t.ceremony_id.to_string(),
            });
        }
        if share.epoch != t.epoch {
            return Err(RestoreError::ShareEpoch {
                file: file.clone(),
                found: share.epoch.get(),
                expected: t.epoch.get(),
            });
        }
        if !seen.insert(share.custodian.as_str().to_owned()) {
            return Err(RestoreError::ShareTwice {
                file: file.clone(),
                custodian: share.custodian.as_str().to_owned(),
            });
        }
        recovery::ceremony::check_share(t, share).map_err(|e| RestoreError::ShareInvalid {
            file: file.clone(),
            fault: match e {
                recovery::Error::Transcript { fault } => fault.to_owned(),
                other => other.to_string(),
            },
        })?;
    }
    let k = usize::from(t.threshold);
    if shares.len() < k {
        return Err(RestoreError::TooFewShares {
            given: shares.len(),
            threshold: t.threshold,
            more: k - shares.len(),
        });
    }
    Ok(())
}

/// Combines checked shares into the recovery secret (the shares are wiped), checks the
/// transcript's MAC with it, and opens the recovery private key. Recovery and reshare both
/// run it.
pub(crate) fn rebuild(
    shares: Vec<(PathBuf, ShareEnvelope)>,
    transcript: &Transcript,
    record: &RecoveryKeyRecord,
) -> Result<(RecoverySecret, RecoveryPrivateKey), RestoreError> {
    let secret = recovery::combine(&shares).map_err(|e| RestoreError::Secret(e.to_string()))?;
    drop(shares);
    transcript
        .verify_mac(&secret)
        .map_err(|e| RestoreError::Secret(e.to_string()))?;
    let private = record
        .private_key(&secret)
        .map_err(|e| RestoreError::Secret(e.to_string()))?;
    Ok((secret, private))
}

/// Shares checked, not yet combined.
pub struct SharesChecked {
    checked: Checked,
    shares: Vec<(PathBuf, ShareEnvelope)>,
}

impl std::fmt::Debug for SharesChecked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharesChecked")
            .field("shares", &self.shares.len())
            .finish_non_exhaustive()
    }
}

impl SharesChecked {
    /// Rebuilds the recovery secret, checks the transcript's MAC with it (and every recovery
    /// transcript's), then the bundle's signature under the signer they pin.
    pub fn combine(self) -> Result<Verified, RestoreError> {
        let SharesChecked { checked, shares } = self;
        let (secret, private) = rebuild(shares, &checked.transcript, &checked.record)?;
        // The signers the quorum trusts, by id: the init transcript's, and each recovery's
        // since. The bundle names its signer's point; its id must be one of them.
        let mut pinned = vec![checked.transcript.audit_signer.clone()];
        for r in &checked.recoveries {
            if r.ceremony_id != checked.transcript.ceremony_id || r.verify_mac(&secret).is_err() {
                return Err(RestoreError::BundleContent {
                    file: checked.file.clone(),
                    what: "a recovery transcript is not MACed by this recovery secret".into(),
                });
            }
            pinned.push(r.audit_signer.clone());
        }
        let signer = &checked.bundle.header.signer;
        let not_authentic = |problem| RestoreError::NotAuthentic {
            file: checked.file.clone(),
            problem,
        };
        if !pinned.contains(&signer.id) {
            return Err(not_authentic(BundleError::OtherSigner {
                expected: pinned.join(" or "),
                found: signer.id.clone(),
            }));
        }
        let point =
            hex::decode(&signer.public_point).map_err(|_| not_authentic(BundleError::Signature))?;
        checked.bundle.verify(&point).map_err(not_authentic)?;
        Ok(Verified {
            checked,
            secret,
            private,
        })
    }
}

/// The bundle is genuine and the secret rebuilt.
pub struct Verified {
    checked: Checked,
    secret: RecoverySecret,
    private: RecoveryPrivateKey,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("checked", &self.checked)
            .finish_non_exhaustive()
    }
}

/// A version's material, opened.
enum Opened {
    Software(Kek),
    Hsm(SecretBox<[u8; 32]>),
}

impl Verified {
    /// Opens every seal in memory: each version's escrow, the escrow key, the grant MAC key
    /// and the context-digest key. Nothing is written.
    // long: one state-machine step: every seal opened in one pass, nothing written.
    pub fn prepare(self) -> Result<Prepared, RestoreError> {
        let Verified {
            checked,
            secret,
            private,
        } = self;
        let file = checked.file.clone();
        let unseal = |what: String| RestoreError::Unseal {
            file: file.clone(),
            what,
        };
        let seal_of = |name: &str| {
            let key = [SEAL_PREFIX, name.as_bytes()].concat();
            find(&checked.bundle, Table::Custody, &key).map(|r| r.value.clone())
        };
        let pin = escrow_pin(&checked.transcript).map_err(|e| unseal(e.to_string()))?;
        let escrow = match (&pin, seal_of(crate::custody::ESCROW_KEY_SEAL)) {
            (Some(pin), Some(seal)) => {
                let raw = private
                    .open(Purpose::EscrowKey, &escrow_key_aad(&pin.id), &seal)
                    .map_err(|_| unseal("the trusted escrow key".into()))?;
                Some((
                    pin.clone(),
                    to_key32(&raw).map_err(|_| unseal("the escrow key".into()))?,
                ))
            }
            _ => None,
        };
        let mut versions = Vec::new();
        for (at, r) in checked.bundle.records.iter().enumerate() {
            if r.table != Table::Versions {
                continue;
            }
            let v: VersionRecord =
                serde_json::from_slice(&r.value).map_err(|_| RestoreError::BundleContent {
                    file: file.clone(),
                    what: format!("version record {at} is malformed"),
                })?;
            let what = || format!("key {} version {}", v.key_id, v.version);
            let opened = match (&v.material, &v.escrow) {
                (StoredMaterial::Software { .. }, Some(Escrow::Sealed { sealed, .. })) => {
                    let aad = kek_wrap_aad(v.key_id, v.version);
                    let raw = private
                        .open(Purpose::SoftwareVersion, &aad, sealed)
                        .map_err(|_| unseal(what()))?;
                    Opened::Software(
                        Kek::init_with(|buf| {
                            let bytes: &[u8; 32] = raw
                                .expose_secret()
                                .try_into()
                                .map_err(|_| crate::Error::Internal("escrow length"))?;
                            buf.copy_from_slice(bytes);
                            Ok(())
                        })
                        .map_err(|_| unseal(what()))?,
                    )
                }
                (StoredMaterial::Hsm { .. }, Some(Escrow::Wrapped { wrapped, .. })) => {
                    let (_, value) = escrow.as_ref().ok_or_else(|| unseal(what()))?;
                    Opened::Hsm(unwrap_escrowed(value, wrapped).map_err(|_| unseal(what()))?)
                }
                _ => {
                    return Err(RestoreError::BundleContent {
                        file: file.clone(),
                        what: format!("{} has no escrow the recovery key opens", what()),
                    })
                }
            };
            versions.push((at, v, opened));
        }
        let mut deployment_keys = Vec::new();
        for dk in &DEPLOYMENT_KEYS {
            if let Some(seal) = seal_of(dk.seal) {
                let raw = private
                    .open(dk.purpose, dk.seal.as_bytes(), &seal)
                    .map_err(|_| unseal(dk.seal.to_owned()))?;
                deployment_keys.push((dk, raw));
            }
        }
        drop(private);
        Ok(Prepared {
            checked,
            secret,
            versions,
            escrow,
            deployment_keys,
        })
    }
}

fn to_key32(raw: &SecretSlice<u8>) -> Result<SecretBox<[u8; 32]>, ()> {
    let bytes: &[u8; 32] = raw.expose_secret().try_into().map_err(|_| ())?;
    let mut out = SecretBox::new(Box::new([0u8; 32]));
    out.expose_secret_mut().copy_from_slice(bytes);
    Ok(out)
}

/// RFC 5649 unwrap of an `hsm` version's escrow copy with the escrow key's value.
fn unwrap_escrowed(
    escrow_key: &SecretBox<[u8; 32]>,
    wrapped: &[u8],
) -> Result<SecretBox<[u8; 32]>, ()> {
    use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_256};
    let kek = AesKek::new(&AES_256, escrow_key.expose_secret()).map_err(|_| ())?;
    let mut out = SecretBox::new(Box::new([0u8; 48]));
    let len = kek
        .unwrap_with_padding(wrapped, out.expose_secret_mut())
        .map_err(|_| ())?
        .len();
    if len != 32 {
        return Err(());
    }
    let mut key = SecretBox::new(Box::new([0u8; 32]));
    key.expose_secret_mut()
        .copy_from_slice(out.expose_secret().get(..32).ok_or(())?);
    Ok(key)
}

/// Every secret opened in memory; nothing written yet.
pub struct Prepared {
    checked: Checked,
    secret: RecoverySecret,
    versions: Vec<(usize, VersionRecord, Opened)>,
    escrow: Option<(hsm_bridge::EscrowPin, SecretBox<[u8; 32]>)>,
    /// Each deployment key found sealed in the bundle, opened.
    deployment_keys: Vec<(&'static DeploymentKey, SecretSlice<u8>)>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("checked", &self.checked)
            .field("versions", &self.versions.len())
            .finish_non_exhaustive()
    }
}

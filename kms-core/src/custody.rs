//! Custody in the store: the recovery authority's records, what the init ceremony escrows, and
//! which custodians have verified their shares (protocol: `docs/CUSTODY.md`).
//!
//! The ceremony itself (secret, shares, seals, transcript) is the `recovery` crate's; this
//! module gives it what the deployment holds and commits what it made in one synced write.

use std::collections::BTreeMap;

use hsm_bridge::{CheckValue, Hsm, ObjectId, GCM_NONCE_LEN};
use recovery::ceremony::{Checked, EscrowInput, HostFacts, Sealed};
use recovery::{Custodian, Purpose, RecoveryKeyRecord, RecoveryPrivateKey, TokenInfo, Transcript};
use secrecy::{ExposeSecret, SecretBox, SecretSlice, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ids::{KeyId, KeyVersion};
use crate::key::{
    kek_wrap_aad, put_version, unwrap_software, Escrow, Protection, StoredMaterial, VersionRecord,
};
use crate::store::{Change, Store, Table};
use crate::Rng;

/// Store key of the recovery key record.
pub(crate) const RECORD: &[u8] = b"recovery";
/// Store key of the init transcript.
pub(crate) const TRANSCRIPT: &[u8] = b"transcript";
/// Store key prefix of the transcripts of recoveries since (each pins a successor signer).
pub(crate) const RECOVER_TRANSCRIPT_PREFIX: &[u8] = b"recover-transcript/";
pub(crate) const SEAL_PREFIX: &[u8] = b"seal/";
pub(crate) const VERIFIED_PREFIX: &[u8] = b"verified/";
/// Name of the trusted escrow key's seal.
pub const ESCROW_KEY_SEAL: &str = "escrow-key";

/// A deployment key: kept wrapped under the root key at `table`/`key` (bound to `wrap_aad`),
/// and escrowed as the named seal `seal/SEAL` (purpose `purpose`, bound to the name).
#[derive(Debug)]
pub(crate) struct DeploymentKey {
    pub(crate) purpose: Purpose,
    pub(crate) seal: &'static str,
    pub(crate) table: Table,
    pub(crate) key: &'static [u8],
    pub(crate) wrap_aad: &'static [u8],
}

/// Every deployment key init escrows, recovery restores and reshare seals again.
pub(crate) const DEPLOYMENT_KEYS: [DeploymentKey; 2] = [
    DeploymentKey {
        purpose: Purpose::GrantMacKey,
        seal: "grant-mac-key",
        table: Table::Grants,
        key: crate::governance::grants::MAC_KEY,
        wrap_aad: crate::governance::grants::MAC_KEY_AAD,
    },
    DeploymentKey {
        purpose: Purpose::ContextDigestKey,
        seal: "context-digest-key",
        table: Table::AuditMeta,
        key: crate::audit::CONTEXT_KEY,
        wrap_aad: crate::audit::CONTEXT_KEY_AAD,
    },
];

/// What the named seal `name` holds and what it is bound to: a deployment key, or the escrow
/// key pinned by `pin`. `None` for a name this release does not know (or the escrow key's
/// seal with no pin).
pub(crate) fn named_seal_binding(
    name: &str,
    pin: Option<&hsm_bridge::EscrowPin>,
) -> Option<(Purpose, Vec<u8>)> {
    if name == ESCROW_KEY_SEAL {
        return pin.map(|p| (Purpose::EscrowKey, escrow_key_aad(&p.id)));
    }
    DEPLOYMENT_KEYS
        .iter()
        .find(|dk| dk.seal == name)
        .map(|dk| (dk.purpose, dk.seal.as_bytes().to_vec()))
}

/// The recovery authority on record.
#[derive(Debug)]
pub struct Custody {
    /// The recovery key record (public halves and the sealed ML-KEM key).
    pub record: RecoveryKeyRecord,
    /// The init transcript.
    pub transcript: Transcript,
    /// Custodians who have verified their share, by name.
    pub verified: BTreeMap<String, Verified>,
}

/// A custodian's verification of their share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// Their share's index.
    pub index: u8,
    /// When, Unix seconds.
    pub at: u64,
}

/// Reads the recovery authority, if custody is initialised.
pub fn load(store: &dyn Store) -> Result<Option<Custody>, Error> {
    let Some(bytes) = store.get(Table::Custody, RECORD)? else {
        return Ok(None);
    };
    let record = RecoveryKeyRecord::parse(&bytes)?;
    let transcript = store
        .get(Table::Custody, TRANSCRIPT)?
        .ok_or(Error::Internal("custody record without its transcript"))?;
    let transcript = Transcript::parse(&transcript)?;
    let mut verified = BTreeMap::new();
    for row in store.scan(Table::Custody)? {
        let Some(name) = row.key.strip_prefix(VERIFIED_PREFIX) else {
            continue;
        };
        let v: Verified = serde_json::from_slice(&row.value).map_err(|source| Error::Record {
            table: Table::Custody.name(),
            source,
        })?;
        verified.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    Ok(Some(Custody {
        record,
        transcript,
        verified,
    }))
}

/// Something that exists before init and must be escrowed by it.
pub struct Escrowable {
    /// What it is.
    pub purpose: Purpose,
    /// What its seal is bound to.
    pub aad: Vec<u8>,
    material: SecretSlice<u8>,
    target: Target,
}

enum Target {
    /// A software version: its record gains the escrow.
    Version(VersionRecord),
    /// A deployment key: its seal is stored under this name.
    Named(&'static str),
}

impl Escrowable {
    /// The material to seal.
    pub fn material(&self) -> &[u8] {
        self.material.expose_secret()
    }
}

impl std::fmt::Debug for Escrowable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Escrowable")
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

/// Everything init must escrow: every unescrowed software version (unwrapped under the root
/// key), the grant MAC key and the audit context-digest key.
pub fn escrowable(store: &dyn Store, hsm: &dyn Hsm) -> Result<Vec<Escrowable>, Error> {
    let mut out = Vec::new();
    for record in versions(store)? {
        if record.escrow.is_some() || !matches!(record.material, StoredMaterial::Software { .. }) {
            continue;
        }
        let kek = unwrap_software(hsm, &record)?;
        out.push(Escrowable {
            purpose: Purpose::SoftwareVersion,
            aad: kek_wrap_aad(record.key_id, record.version),
            material: SecretSlice::from(kek.expose_secret().to_vec()),
            target: Target::Version(record),
        });
    }
    for dk in &DEPLOYMENT_KEYS {
        let Some(wrapped) = store.get(dk.table, dk.key)? else {
            continue;
        };
        let (nonce, sealed) = wrapped
            .split_first_chunk::<GCM_NONCE_LEN>()
            .ok_or(Error::Internal("wrapped deployment key is truncated"))?;
        let raw = hsm.aes_gcm_decrypt(hsm.root_key(), nonce, dk.wrap_aad, sealed)?;
        out.push(Escrowable {
            purpose: dk.purpose,
            aad: dk.seal.as_bytes().to_vec(),
            material: raw,
            target: Target::Named(dk.seal),
        });
    }
    Ok(out)
}

/// Every version without escrow, and its protection level.
pub fn unescrowed(store: &dyn Store) -> Result<Vec<(KeyId, KeyVersion, Protection)>, Error> {
    Ok(versions(store)?
        .into_iter()
        .filter(|v| v.escrow.is_none())
        .map(|v| {
            let protection = match v.material {
                StoredMaterial::Hsm { .. } => Protection::Hsm,
                StoredMaterial::Software { .. } => Protection::Software,
            };
            (v.key_id, v.version, protection)
        })
        .collect())
}

/// Every key version record in the store.
pub fn version_records(store: &dyn Store) -> Result<Vec<VersionRecord>, Error> {
    versions(store)
}

fn versions(store: &dyn Store) -> Result<Vec<VersionRecord>, Error> {
    store
        .scan(Table::Versions)?
        .into_iter()
        .map(|row| {
            serde_json::from_slice(&row.value).map_err(|source| Error::Record {
                table: Table::Versions.name(),
                source,
            })
        })
        .collect()
}

/// What the init ceremony is asked to do.
#[derive(Debug)]
pub struct InitPlan {
    /// k.
    pub threshold: usize,
    /// The n custodians.
    pub custodians: Vec<Custodian>,
    /// The audit signer's public key, hex, for the transcript.
    pub audit_signer: String,
    /// Now, Unix seconds.
    pub time: u64,
}

/// A fresh trusted escrow key, made on the ceremony host: its value (a secret, wiped on drop)
/// and the pin the transcript will carry.
pub struct NewEscrowKey {
    pin: hsm_bridge::EscrowPin,
    value: SecretBox<[u8; 32]>,
}

impl NewEscrowKey {
    /// 32 random bytes from the host's generator, a random `CKA_ID`, and the check value.
    pub fn generate(rng: &dyn recovery::Random) -> Result<Self, Error> {
        let mut id = [0u8; hsm_bridge::OBJECT_ID_LEN];
        rng.fill(&mut id)?;
        let id = ObjectId(id);
        let mut value = SecretBox::new(Box::new([0u8; 32]));
        rng.fill(secrecy::ExposeSecretMut::expose_secret_mut(&mut value))?;
        let pin = hsm_bridge::EscrowPin {
            label: format!("sovereign-kms/escrow/{id}"),
            id,
            check_value: check_value(value.expose_secret())?,
        };
        Ok(Self { pin, value })
    }

    /// What pins it.
    pub fn pin(&self) -> &hsm_bridge::EscrowPin {
        &self.pin
    }

    /// The step that cannot be undone: the token's Security Officer imports the key. Run it
    /// before this process logs in as the user (see [`hsm_bridge::import_trusted_escrow_key`]).
    pub fn import(
        &self,
        module: &std::path::Path,
        token_label: &str,
        so_pin: &SecretString,
    ) -> Result<(), Error> {
        hsm_bridge::import_trusted_escrow_key(module, token_label, so_pin, &self.pin, &self.value)?;
        Ok(())
    }
}

impl std::fmt::Debug for NewEscrowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewEscrowKey")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

/// An init ceremony made in memory: the secret is already gone; only the seals, shares and
/// transcript remain, to be written.
pub struct Prepared {
    sealed: Sealed,
    items: Vec<Escrowable>,
    escrow_pin: hsm_bridge::EscrowPin,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("ceremony_id", &self.sealed.record.ceremony_id)
            .field("escrow_pin", &self.escrow_pin)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// The shares, transcript and seals, to write out.
    pub fn sealed(&self) -> &Sealed {
        &self.sealed
    }

    /// How many items are escrowed (existing software versions, deployment keys and the
    /// escrow key itself).
    pub fn escrowed(&self) -> usize {
        self.items.len()
    }

    /// The trusted escrow key the transcript pins.
    pub fn escrow_pin(&self) -> &hsm_bridge::EscrowPin {
        &self.escrow_pin
    }
}

/// The PKCS#11 check value of an AES-256 key, in software: the first three bytes of AES-ECB
/// over a zero block. The ceremony pins the escrow key by it before the token sees the key.
pub fn check_value(key: &[u8; 32]) -> Result<CheckValue, Error> {
    use aws_lc_rs::cipher::{EncryptingKey, UnboundCipherKey, AES_256};
    let enc = UnboundCipherKey::new(&AES_256, key)
        .and_then(EncryptingKey::ecb)
        .map_err(|_| Error::Internal("aes-256-ecb key setup"))?;
    let mut block = [0u8; 16];
    enc.encrypt(&mut block)
        .map_err(|_| Error::Internal("aes-256-ecb"))?;
    let [a, b, c, ..] = block;
    Ok(CheckValue([a, b, c]))
}

/// The associated data of the escrow key's seal: its name and `CKA_ID`.
pub fn escrow_key_aad(id: &ObjectId) -> Vec<u8> {
    let mut aad = ESCROW_KEY_SEAL.as_bytes().to_vec();
    aad.push(b'/');
    aad.extend_from_slice(&id.0);
    aad
}

/// The init ceremony in memory (protocol: `docs/CUSTODY.md`): checks, the token self-test
/// with the imported escrow key, the recovery secret and key pair, every seal (the escrow
/// key's value among them), the shares and the transcript. Nothing is written.
pub fn prepare_init(
    store: &dyn Store,
    hsm: &dyn Hsm,
    token: TokenInfo,
    rng: &dyn recovery::Random,
    plan: InitPlan,
    escrow_key: NewEscrowKey,
) -> Result<Prepared, Error> {
    let checked = Checked::new(plan.threshold, plan.custodians)?;
    if let Some(existing) = load(store)? {
        return Err(Error::CustodyInitialised {
            ceremony: existing.record.ceremony_id.to_string(),
        });
    }
    let NewEscrowKey {
        pin: escrow_pin,
        value: escrow_value,
    } = escrow_key;
    hsm.escrow_self_test(Some(&escrow_pin))?;
    let derived = checked.derive(rng)?;
    let mut items = escrowable(store, hsm)?;
    items.push(Escrowable {
        purpose: Purpose::EscrowKey,
        aad: escrow_key_aad(&escrow_pin.id),
        material: SecretSlice::from(escrow_value.expose_secret().to_vec()),
        target: Target::Named(ESCROW_KEY_SEAL),
    });
    drop(escrow_value);
    let inputs: Vec<EscrowInput<'_>> = items
        .iter()
        .map(|i| EscrowInput {
            purpose: i.purpose,
            aad: i.aad.clone(),
            material: i.material(),
        })
        .collect();
    let facts = HostFacts {
        token,
        audit_signer: plan.audit_signer,
        escrow_key: Some(recovery::EscrowPin {
            label: escrow_pin.label.clone(),
            id: escrow_pin.id.to_hex(),
            check_value: escrow_pin.check_value.to_hex(),
        }),
        time: plan.time,
    };
    let sealed = derived.seal(rng, facts, &inputs)?;
    drop(inputs);
    Ok(Prepared {
        sealed,
        items,
        escrow_pin,
    })
}

/// The trusted escrow key a transcript pins, in the token's terms.
pub fn escrow_pin(transcript: &Transcript) -> Result<Option<hsm_bridge::EscrowPin>, Error> {
    let Some(pin) = &transcript.escrow_key else {
        return Ok(None);
    };
    let bad = |_| Error::Internal("the transcript's escrow pin is malformed");
    Ok(Some(hsm_bridge::EscrowPin {
        label: pin.label.clone(),
        id: ObjectId::from_hex(&pin.id).map_err(bad)?,
        check_value: CheckValue::from_hex(&pin.check_value).map_err(bad)?,
    }))
}

/// Opens a version's escrow with the recovery private key and the store alone (no HSM): a
/// software version's seal, or an `hsm` version's wrap under the escrow key, whose own seal
/// is opened first. The recovery ceremony restores keys from this.
pub fn open_escrow(
    store: &dyn Store,
    private: &RecoveryPrivateKey,
    record: &VersionRecord,
) -> Result<crate::secret::Kek, Error> {
    let aad = kek_wrap_aad(record.key_id, record.version);
    let raw: SecretSlice<u8> = match &record.escrow {
        None => return Err(Error::Internal("the version is not escrowed")),
        Some(Escrow::Sealed { sealed, .. }) => {
            private.open(Purpose::SoftwareVersion, &aad, sealed)?
        }
        Some(Escrow::Wrapped {
            escrow_key_id,
            wrapped,
            ..
        }) => {
            let id = ObjectId::from_hex(escrow_key_id)
                .map_err(|_| Error::Internal("malformed escrow key id"))?;
            let seal = named_seal(store, ESCROW_KEY_SEAL)?
                .ok_or(Error::Internal("no escrow key seal on record"))?;
            let value = private.open(Purpose::EscrowKey, &escrow_key_aad(&id), &seal)?;
            use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_256};
            let kek = AesKek::new(&AES_256, value.expose_secret())
                .map_err(|_| Error::Internal("escrow key setup"))?;
            let mut out = SecretBox::new(Box::new([0u8; 48]));
            let len = kek
                .unwrap_with_padding(
                    wrapped,
                    secrecy::ExposeSecretMut::expose_secret_mut(&mut out),
                )
                .map_err(|_| Error::Internal("the escrowed wrap does not open"))?
                .len();
            SecretSlice::from(
                out.expose_secret()
                    .get(..len)
                    .ok_or(Error::Internal("unwrap length"))?
                    .to_vec(),
            )
        }
    };
    crate::secret::Kek::init_with(|buf| {
        let bytes: &[u8; crate::secret::KEK_LEN] = raw
            .expose_secret()
            .try_into()
            .map_err(|_| Error::Internal("escrowed material has the wrong length"))?;
        buf.copy_from_slice(bytes);
        Ok(())
    })
}

/// The one synced write that makes init take effect: the recovery key record, the
/// transcript, and every seal the ceremony made. Refused if custody exists.
pub fn commit_init(store: &dyn Store, prepared: Prepared) -> Result<Sealed, Error> {
    let Prepared { sealed, items, .. } = prepared;
    commit_sealed(store, &sealed, items)?;
    Ok(sealed)
}

fn commit_sealed(store: &dyn Store, sealed: &Sealed, items: Vec<Escrowable>) -> Result<(), Error> {
    if let Some(existing) = load(store)? {
        return Err(Error::CustodyInitialised {
            ceremony: existing.record.ceremony_id.to_string(),
        });
    }
    if sealed.seals.len() != items.len() {
        return Err(Error::Internal("one seal per escrowed item"));
    }
    let ceremony = sealed.record.ceremony_id;
    let mut changes = Vec::from(authority_changes(sealed)?);
    for (item, seal) in items.into_iter().zip(&sealed.seals) {
        changes.push(match item.target {
            Target::Version(record) => sealed_version(record, ceremony, seal)?,
            Target::Named(name) => named_seal_change(name, seal),
        });
    }
    store.write(changes)
}

/// The writes that make a ceremony's recovery key record and transcript the ones on record.
pub(crate) fn authority_changes(sealed: &Sealed) -> Result<[Change; 2], Error> {
    Ok([
        Change::Put {
            table: Table::Custody,
            key: RECORD.to_vec(),
            value: sealed.record.to_json()?,
        },
        Change::Put {
            table: Table::Custody,
            key: TRANSCRIPT.to_vec(),
            value: sealed.transcript.canonical()?,
        },
    ])
}

/// The write of a software version with its escrow seal under `ceremony`.
pub(crate) fn sealed_version(
    mut record: VersionRecord,
    ceremony: recovery::CeremonyId,
    seal: &[u8],
) -> Result<Change, Error> {
    record.escrow = Some(Escrow::Sealed {
        ceremony,
        sealed: seal.to_vec(),
    });
    put_version(&record)
}

/// The write of a named seal (`seal/NAME`).
pub(crate) fn named_seal_change(name: &str, seal: &[u8]) -> Change {
    Change::Put {
        table: Table::Custody,
        key: [SEAL_PREFIX, name.as_bytes()].concat(),
        value: seal.to_vec(),
    }
}

/// The seal of a deployment key (`grant-mac-key`, `context-digest-key`).
pub fn named_seal(store: &dyn Store, name: &str) -> Result<Option<Vec<u8>>, Error> {
    let mut key = SEAL_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    store.get(Table::Custody, &key)
}

/// Checks a custodian's claim (see [`recovery::ceremony::ShareClaim`]) against the ceremony
/// on record and records them as verified at `at`; returns their name and index.
pub fn verify_claim(
    store: &dyn Store,
    claim: &recovery::ceremony::ShareClaim,
    at: u64,
) -> Result<(String, u8), Error> {
    let custody = load(store)?.ok_or(Error::CustodyMissing)?;
    let entry = recovery::ceremony::check_claim(&custody.transcript, claim)?;
    record_verified(
        store,
        &entry.name,
        &Verified {
            index: entry.index,
            at,
        },
    )?;
    Ok((entry.name.clone(), entry.index))
}

/// Records that a custodian verified their share.
pub fn record_verified(store: &dyn Store, name: &str, verified: &Verified) -> Result<(), Error> {
    let mut key = VERIFIED_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    let value = serde_json::to_vec(verified).map_err(|_| Error::Internal("record encoding"))?;
    store.write(vec![Change::Put {
        table: Table::Custody,
        key,
        value,
    }])
}

/// The KMS's generator, as the recovery crate takes one.
pub(crate) struct RecoveryRng<'a>(pub(crate) &'a dyn Rng);

impl recovery::Random for RecoveryRng<'_> {
    fn fill(&self, out: &mut [u8]) -> Result<(), recovery::Error> {
        self.0.fill(out).map_err(|_| recovery::Error::Random)
    }
}

/// Base64 for sealed bytes in JSON records.
pub(crate) mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;

    pub(crate) fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

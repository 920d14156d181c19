//! The recovery authority end to end in memory: init, share files, combine, open.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::as_conversions,
    reason = "test code: a failed step is a failed test"
)]

use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret as _;
use aws_lc_rs::rand::SystemRandom;
use proptest::prelude::*;
use recovery::ceremony::{check_share, Checked, EscrowInput, HostFacts, Sealed};
use recovery::{
    combine, parse_identity, Custodian, Error, Purpose, ShareEnvelope, ShareFault, TokenInfo,
    Transcript,
};
use secrecy::SecretString;

struct Ceremony {
    identities: Vec<age::x25519::Identity>,
    sealed: Sealed,
}

fn facts() -> HostFacts {
    HostFacts {
        token: TokenInfo {
            label: "test".into(),
            manufacturer: "SoftHSM project".into(),
            model: "SoftHSM v2".into(),
            serial: "1".into(),
        },
        audit_signer: "04".into(),
        escrow_key: None,
        time: 1_764_633_600,
    }
}

fn init(n: usize, k: usize, inputs: &[EscrowInput<'_>]) -> Ceremony {
    let rng = SystemRandom::new();
    let identities: Vec<_> = (0..n).map(|_| age::x25519::Identity::generate()).collect();
    let custodians = identities
        .iter()
        .enumerate()
        .map(|(i, id)| Custodian::parse(&format!("c{i}={}", id.to_public())).unwrap())
        .collect();
    let sealed = Checked::new(k, custodians)
        .unwrap()
        .derive(&rng)
        .unwrap()
        .seal(&rng, facts(), inputs)
        .unwrap();
    Ceremony { identities, sealed }
}

impl Ceremony {
    fn envelope(&self, i: usize) -> (PathBuf, ShareEnvelope) {
        let file = PathBuf::from(format!("c{i}.share.age"));
        let env =
            ShareEnvelope::open(&self.sealed.share_files[i].1, &self.identities[i], &file).unwrap();
        (file, env)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn any_k_of_n_rebuild_and_any_k_minus_one_fail(n in 2usize..=6, k_off in 0usize..5, pick in any::<u64>()) {
        let k = 2 + k_off % (n - 1);
        let material = [7u8; 32];
        let c = init(n, k, &[EscrowInput { purpose: Purpose::SoftwareVersion, aad: b"v1".to_vec(), material: &material }]);
        // A pseudo-random choice of k distinct custodians.
        let mut order: Vec<usize> = (0..n).collect();
        let mut p = pick;
        for i in (1..n).rev() {
            order.swap(i, usize::try_from(p % (i as u64 + 1)).unwrap());
            p /= 7;
        }
        let chosen: Vec<_> = order[..k].iter().map(|&i| c.envelope(i)).collect();
        let secret = combine(&chosen).unwrap();
        let private = c.sealed.record.private_key(&secret).unwrap();
        let opened = private.open(Purpose::SoftwareVersion, b"v1", &c.sealed.seals[0]).unwrap();
        prop_assert_eq!(opened.expose_secret(), &material[..]);
        c.sealed.transcript.verify_mac(&secret).unwrap();
        let fewer = &chosen[..k - 1];
        let short = combine(fewer);
        prop_assert!(matches!(short, Err(Error::TooFewShares { .. })), "k-1 shares were not refused");
    }
}

#[test]
fn k_minus_one_shares_with_a_claimed_lower_threshold_do_not_combine() {
    // A share set below the real threshold fails inside Shamir too, not only by count.
    let c = init(3, 3, &[]);
    let shares: Vec<_> = (0..2).map(|i| c.envelope(i)).collect();
    let raw: Vec<Vec<u8>> = shares
        .iter()
        .map(|(_, e)| {
            let json = e.to_json();
            let v: serde_json::Value = serde_json::from_slice(json.expose_secret()).unwrap();
            base64_decode(v["share"].as_str().unwrap())
        })
        .collect();
    assert_eq!(shamirsecretsharing::combine_shares(&raw).unwrap(), None);
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn shares_of_different_ceremonies_do_not_combine() {
    let a = init(3, 2, &[]);
    let b = init(3, 2, &[]);
    let mixed = vec![a.envelope(0), b.envelope(1)];
    assert!(
        matches!(combine(&mixed), Err(Error::ShareMismatch { file, .. }) if file == Path::new("c1.share.age"))
    );
    // Even with the envelope fields made to agree, the share bytes do not combine.
    let (f0, e0) = a.envelope(0);
    let (f1, mut e1) = b.envelope(1);
    e1.ceremony_id = e0.ceremony_id;
    e1.transcript_sha256 = e0.transcript_sha256;
    assert!(matches!(
        combine(&[(f0, e0), (f1, e1)]),
        Err(Error::Combine)
    ));
}

#[test]
fn a_repeated_share_is_refused() {
    let c = init(3, 2, &[]);
    let twice = vec![c.envelope(0), c.envelope(0)];
    assert!(matches!(
        combine(&twice),
        Err(Error::ShareTwice { index: 1, .. })
    ));
}

#[test]
fn a_flipped_byte_in_a_share_file_fails_naming_that_file() {
    let c = init(3, 2, &[]);
    let file = Path::new("/custodians/c0.share.age");
    let len = c.sealed.share_files[0].1.len();
    for at in [len / 2, len - 20, len - 1] {
        let mut bad = c.sealed.share_files[0].1.clone();
        bad[at] ^= 0x01;
        let err = ShareEnvelope::open(&bad, &c.identities[0], file).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ShareFile {
                    fault: ShareFault::Decrypt,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("/custodians/c0.share.age"),
            "{err}"
        );
    }
    // The wrong custodian's identity does not open it either.
    let err = ShareEnvelope::open(&c.sealed.share_files[0].1, &c.identities[1], file).unwrap_err();
    assert!(matches!(
        err,
        Error::ShareFile {
            fault: ShareFault::Decrypt,
            ..
        }
    ));
}

#[test]
fn each_share_checks_against_the_transcript_and_its_commitment() {
    let c = init(3, 2, &[]);
    let transcript = Transcript::parse(&c.sealed.transcript.canonical().unwrap()).unwrap();
    assert_eq!(transcript.sha256().unwrap(), c.sealed.transcript_sha256);
    for i in 0..3 {
        let (_, env) = c.envelope(i);
        let entry = check_share(&transcript, &env).unwrap();
        assert_eq!(entry.name, format!("c{i}"));
    }
    // A share from another ceremony, and a transcript with a changed commitment, fail.
    let other = init(3, 2, &[]);
    assert!(check_share(&transcript, &other.envelope(0).1).is_err());
    let mut edited = transcript.clone();
    edited.custodians[0].commitment = "00".repeat(32);
    assert!(check_share(&edited, &c.envelope(0).1).is_err());
    // An edited transcript.json is refused, and its MAC needs the secret.
    let mut text = String::from_utf8(c.sealed.transcript.canonical().unwrap()).unwrap();
    text = text.replacen("\"threshold\":2", "\"threshold\":1", 1);
    let forged = Transcript::parse(text.as_bytes()).unwrap();
    let secret = combine(&[c.envelope(0), c.envelope(2)]).unwrap();
    assert!(forged.verify_mac(&secret).is_err());
    assert!(Transcript::parse(b"{}").is_err());
}

#[test]
fn share_envelope_known_answer() {
    let text = include_str!("vectors/share-envelope.json");
    let env = ShareEnvelope::parse(text.as_bytes(), Path::new("kat")).unwrap();
    assert_eq!(env.custodian.as_str(), "alice");
    assert_eq!(env.share.index(), 2);
    assert_eq!(env.to_json().expose_secret(), text.as_bytes());
    // Computed independently (Python hashlib) from the same fields.
    assert_eq!(
        hex::encode(env.share.commitment(env.ceremony_id)),
        "84a01d419b74cd82e9cf7be545b8e60583d7cfbbe5f0b31f6119af85882388b0"
    );
    // Strict parsing: an unknown field, another format, a bad index.
    for bad in [
        text.replacen("{", "{\"extra\":1,", 1),
        text.replacen("share-v1", "share-v2", 1),
        text.replacen("\"index\":2", "\"index\":4", 1),
        text.replacen("\"threshold\":2", "\"threshold\":1", 1),
        text.replacen("ERER", "ER", 1),
    ] {
        assert!(matches!(
            ShareEnvelope::parse(bad.as_bytes(), Path::new("kat")),
            Err(Error::ShareFile { .. })
        ));
    }
}

#[test]
fn transcript_known_answer() {
    let text = include_str!("vectors/transcript.json");
    let t = Transcript::parse(text.as_bytes()).unwrap();
    // SHA-256 of Python's json.dumps(sort_keys=True, separators=(",", ":")) of the same object.
    assert_eq!(
        hex::encode(t.sha256().unwrap()),
        "4e874c1d0c9d28d99e5a2a23d8860c249aa553ddb7a9bdc59f99a30b156bac8a"
    );
    assert_eq!(t.canonical().unwrap(), text.as_bytes());
}

#[test]
fn identity_files_parse_as_age_keygen_writes_them() {
    let id = age::x25519::Identity::generate();
    let text = format!(
        "# created: 2026-12-02T00:00:00Z\n# public key: {}\n{}\n",
        id.to_public(),
        id.to_string().expose_secret()
    );
    let parsed = parse_identity(&SecretString::from(text), Path::new("alice.key")).unwrap();
    assert_eq!(parsed.to_public().to_string(), id.to_public().to_string());
    let Err(err) = parse_identity(
        &SecretString::from("nothing".to_owned()),
        Path::new("x.key"),
    ) else {
        panic!("parsed an identity from nothing")
    };
    assert!(err.to_string().contains("x.key"));
}

#[test]
fn bad_parameters_are_refused() {
    let id = age::x25519::Identity::generate();
    let one = |name: &str| Custodian::parse(&format!("{name}={}", id.to_public())).unwrap();
    assert!(matches!(
        Checked::new(1, vec![one("a"), one("b")]),
        Err(Error::Threshold { .. })
    ));
    assert!(matches!(
        Checked::new(3, vec![one("a"), one("b")]),
        Err(Error::Threshold { .. })
    ));
    assert!(matches!(
        Checked::new(2, vec![one("a"), one("a")]),
        Err(Error::CustodianTwice { .. })
    ));
    assert!(matches!(
        Custodian::parse("../x=age1abc"),
        Err(Error::CustodianName { .. })
    ));
    assert!(matches!(
        Custodian::parse("bob=age1notakey"),
        Err(Error::Recipient { .. })
    ));
    assert!(matches!(
        Custodian::parse("bob"),
        Err(Error::CustodianName { .. })
    ));
}

#[test]
fn debug_never_shows_secret_bytes() {
    let material = [0x5au8; 32];
    let c = init(
        2,
        2,
        &[EscrowInput {
            purpose: Purpose::GrantMacKey,
            aad: vec![],
            material: &material,
        }],
    );
    let (_, env) = c.envelope(0);
    let shown = format!("{env:?} {:?}", c.sealed);
    let json = env.to_json();
    let v: serde_json::Value = serde_json::from_slice(json.expose_secret()).unwrap();
    let share_b64 = v["share"].as_str().unwrap();
    assert!(!shown.contains(share_b64));
    assert!(!shown.contains(&hex::encode(base64_decode(share_b64))));
    let secret = combine(&[c.envelope(0), c.envelope(1)]).unwrap();
    assert_eq!(format!("{secret:?}"), "RecoverySecret(<redacted>)");
    let private = c.sealed.record.private_key(&secret).unwrap();
    assert_eq!(format!("{private:?}"), "RecoveryPrivateKey(<redacted>)");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The share parser survives random flips of a valid envelope: a typed error, or (for a
    /// flip that keeps the JSON valid, such as a hex digit's case) an envelope whose canonical
    /// form parses back to itself, so the commitment check sees exactly what was parsed.
    #[test]
    fn flipped_share_envelopes_never_panic(
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), 1u8..=255), 1..4)
    ) {
        let text = include_bytes!("vectors/share-envelope.json");
        let mut bad = text.to_vec();
        for (at, mask) in &flips {
            let i = at.index(bad.len());
            bad[i] ^= mask;
        }
        if let Ok(env) = ShareEnvelope::parse(&bad, Path::new("kat")) {
            let canonical = env.to_json();
            let again = ShareEnvelope::parse(canonical.expose_secret(), Path::new("kat")).unwrap();
            prop_assert!(again.to_json().expose_secret() == canonical.expose_secret());
        }
    }

    /// A share file (age) with random flips never opens and never panics.
    #[test]
    fn flipped_share_files_never_open(
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), 1u8..=255), 1..4)
    ) {
        let c = sample();
        let mut bad = c.sealed.share_files[0].1.clone();
        for (at, mask) in &flips {
            let i = at.index(bad.len());
            bad[i] ^= mask;
        }
        let opened = ShareEnvelope::open(&bad, &c.identities[0], Path::new("c0.share.age"));
        prop_assert!(matches!(opened, Err(Error::ShareFile { .. })), "{:?}", opened.err());
    }
}

/// One 2-of-3 ceremony, made once for the properties.
fn sample() -> &'static Ceremony {
    static SAMPLE: std::sync::OnceLock<Ceremony> = std::sync::OnceLock::new();
    SAMPLE.get_or_init(|| init(3, 2, &[]))
}

#[test]
fn every_truncation_of_a_share_file_and_envelope_is_a_typed_error() {
    let c = sample();
    let file = &c.sealed.share_files[0].1;
    for len in 0..file.len() {
        let opened = ShareEnvelope::open(&file[..len], &c.identities[0], Path::new("c0.share.age"));
        assert!(
            matches!(opened, Err(Error::ShareFile { .. })),
            "cut at {len}"
        );
    }
    let text = include_bytes!("vectors/share-envelope.json");
    for len in 0..text.len() {
        assert!(
            matches!(
                ShareEnvelope::parse(&text[..len], Path::new("kat")),
                Err(Error::ShareFile { .. })
            ),
            "cut at {len}"
        );
    }
}

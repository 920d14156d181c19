//! Ciphertext blob, format version 1.
//!
//! Every data key and every small secret the KMS encrypts comes back as one self-describing
//! blob. Decrypt needs only the blob and the same encryption context.
//!
//! ```text
//! offset  size  field
//!      0     4  magic, ASCII "skms" (0x73 0x6b 0x6d 0x73)
//!      4     1  format version, 0x01
//!      5     1  algorithm, 0x01 = AES-256-GCM
//!      6    16  key id (UUID, network byte order)
//!     22     4  key version, u32 big-endian, >= 1
//!     26    12  GCM nonce
//!     38     n  AES-256-GCM ciphertext (0 <= n <= 4096)
//!   38+n    16  GCM tag
//! ```
//!
//! Bytes 0..38 are the *header*. The GCM additional authenticated data is the header followed
//! by the canonical encoding of the encryption context (see [`crate::context`]), so changing
//! any header byte, the key version, or any context entry makes decryption fail.
//!
//! Parsing is strict and bounded: a blob shorter than 54 bytes, longer than 4150 bytes, with
//! another magic, format version or algorithm, or with key version 0, is a typed error.

use crate::context::EncryptionContext;
use crate::error::Error;
use crate::ids::{KeyId, KeyVersion};

/// The four magic bytes.
pub const MAGIC: [u8; 4] = *b"skms";
/// The only format version this build writes and reads.
pub const FORMAT_V1: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 38;
/// GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// GCM tag length.
pub const TAG_LEN: usize = 16;
/// Largest plaintext a blob may carry.
pub const MAX_PLAINTEXT_LEN: usize = 4096;
/// Smallest well-formed blob.
pub const MIN_BLOB_LEN: usize = HEADER_LEN + TAG_LEN;
/// Largest well-formed blob.
pub const MAX_BLOB_LEN: usize = HEADER_LEN + MAX_PLAINTEXT_LEN + TAG_LEN;

/// Encryption algorithms a blob can name.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Algorithm {
    /// AES-256-GCM with a 96-bit nonce and 128-bit tag.
    Aes256Gcm,
}

impl Algorithm {
    fn id(self) -> u8 {
        match self {
            Algorithm::Aes256Gcm => 1,
        }
    }
}

/// Why a blob was refused before any key was touched.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The algorithm byte names no algorithm this build knows.
    #[error("unknown algorithm {0}")]
    Algorithm(u8),
    /// The blob does not start with the magic bytes.
    #[error("not a sovereign-kms ciphertext")]
    Magic,
    /// Longer than [`MAX_BLOB_LEN`].
    #[error("ciphertext too long: {len} bytes, at most {max}")]
    TooLong {
        /// Actual length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Shorter than [`MIN_BLOB_LEN`].
    #[error("ciphertext truncated: {len} bytes, at least {min}")]
    Truncated {
        /// Actual length.
        len: usize,
        /// The bound.
        min: usize,
    },
    /// A format version this build cannot read.
    #[error("unsupported ciphertext format version {0}")]
    Version(u8),
    /// Key version zero.
    #[error("invalid key version")]
    ZeroKeyVersion,
}

/// The parsed, fixed-size header of a blob.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    /// Algorithm of the body.
    pub algorithm: Algorithm,
    /// Key that sealed the body.
    pub key_id: KeyId,
    /// Version of that key.
    pub key_version: KeyVersion,
    /// GCM nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Header {
    /// The 38 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let parts: [&[u8]; 6] = [
            &MAGIC,
            &[FORMAT_V1],
            &[self.algorithm.id()],
            &self.key_id.to_bytes(),
            &self.key_version.get().to_be_bytes(),
            &self.nonce,
        ];
        let mut at = 0;
        for part in parts {
            if let Some(dst) = out.get_mut(at..at + part.len()) {
                dst.copy_from_slice(part);
            }
            at += part.len();
        }
        out
    }

    /// The additional authenticated data: header bytes then the canonical context.
    pub fn aad(&self, context: &EncryptionContext) -> Result<Vec<u8>, Error> {
        let mut aad = Vec::with_capacity(HEADER_LEN + 2 + context.len() * 16);
        aad.extend_from_slice(&self.encode());
        context.encode_canonical(&mut aad)?;
        Ok(aad)
    }
}

/// A parsed blob: its header and a borrow of the ciphertext with tag.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Blob<'a> {
    /// The header.
    pub header: Header,
    /// Ciphertext followed by the 16-byte tag.
    pub sealed: &'a [u8],
}

impl<'a> Blob<'a> {
    /// Parses a blob. Never panics; every malformed input is a [`BlobError`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BlobError> {
        if bytes.len() < MIN_BLOB_LEN {
            return Err(BlobError::Truncated {
                len: bytes.len(),
                min: MIN_BLOB_LEN,
            });
        }
        if bytes.len() > MAX_BLOB_LEN {
            return Err(BlobError::TooLong {
                len: bytes.len(),
                max: MAX_BLOB_LEN,
            });
        }
        let (head, sealed) = bytes.split_at(HEADER_LEN);
        let mut r = Reader(head);
        if r.take::<4>() != Some(MAGIC) {
            return Err(BlobError::Magic);
        }
        let [version] = r.take::<1>().unwrap_or_default();
        if version != FORMAT_V1 {
            return Err(BlobError::Version(version));
        }
        let algorithm = match r.take::<1>().unwrap_or_default() {
            [1] => Algorithm::Aes256Gcm,
            [other] => return Err(BlobError::Algorithm(other)),
        };
        let key_id = KeyId::from_bytes(r.take::<16>().unwrap_or_default());
        let raw_version = u32::from_be_bytes(r.take::<4>().unwrap_or_default());
        let key_version = KeyVersion::new(raw_version).ok_or(BlobError::ZeroKeyVersion)?;
        let nonce = r.take::<NONCE_LEN>().unwrap_or_default();
        Ok(Self {
            header: Header {
                algorithm,
                key_id,
                key_version,
                nonce,
            },
            sealed,
        })
    }

    /// Concatenates a header and a sealed body into blob bytes.
    pub fn assemble(header: &Header, sealed: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(sealed);
        out
    }
}

/// A cursor over a slice whose length the caller has already checked.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header(id: [u8; 16], version: u32, nonce: [u8; 12]) -> Header {
        Header {
            algorithm: Algorithm::Aes256Gcm,
            key_id: KeyId::from_bytes(id),
            key_version: KeyVersion::new(version).unwrap(),
            nonce,
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let h = header([7; 16], 0x0102_0304, [9; 12]);
        let bytes = Blob::assemble(&h, &[0xAA; 48]);
        assert_eq!(&bytes[0..4], b"skms");
        assert_eq!(bytes[4], 1);
        assert_eq!(bytes[5], 1);
        assert_eq!(&bytes[6..22], &[7; 16]);
        assert_eq!(&bytes[22..26], &[1, 2, 3, 4]);
        assert_eq!(&bytes[26..38], &[9; 12]);
        assert_eq!(bytes.len(), 38 + 48);
    }

    #[test]
    fn bad_fixed_fields_are_typed_errors() {
        let good = Blob::assemble(&header([1; 16], 1, [0; 12]), &[0; 16]);
        let mut b = good.clone();
        b[0] = b'x';
        assert_eq!(Blob::parse(&b), Err(BlobError::Magic));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(Blob::parse(&b), Err(BlobError::Version(2)));
        let mut b = good.clone();
        b[5] = 9;
        assert_eq!(Blob::parse(&b), Err(BlobError::Algorithm(9)));
        let mut b = good.clone();
        b[22..26].copy_from_slice(&[0; 4]);
        assert_eq!(Blob::parse(&b), Err(BlobError::ZeroKeyVersion));
        assert!(matches!(
            Blob::parse(&good[..53]),
            Err(BlobError::Truncated { .. })
        ));
        let long = vec![0u8; MAX_BLOB_LEN + 1];
        assert!(matches!(Blob::parse(&long), Err(BlobError::TooLong { .. })));
    }

    proptest! {
        #[test]
        fn round_trip(id in any::<[u8; 16]>(), version in 1u32.., nonce in any::<[u8; 12]>(),
                      body in proptest::collection::vec(any::<u8>(), TAG_LEN..=TAG_LEN + MAX_PLAINTEXT_LEN)) {
            let h = header(id, version, nonce);
            let bytes = Blob::assemble(&h, &body);
            let parsed = Blob::parse(&bytes).unwrap();
            prop_assert_eq!(parsed.header, h);
            prop_assert_eq!(parsed.sealed, &body[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Blob::parse(&bytes);
        }
    }
}

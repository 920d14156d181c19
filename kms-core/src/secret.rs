//! Secret-holding types. None derives `Debug`, `Clone`, `PartialEq` or `Serialize`; access is
//! through one greppable `expose_secret()`.

use std::fmt;

use secrecy::{ExposeSecret, SecretBox, SecretSlice};

/// Length of a data key in bytes (AES-256).
pub const DEK_LEN: usize = 32;

/// Length of a software-protection KEK version in bytes (AES-256).
pub const KEK_LEN: usize = 32;

/// Builds a fixed-size secret in place: `fill` writes straight into the secret box, so no
/// copy of the bytes is left behind on the stack.
fn secret_array<const N: usize>(
    fill: impl FnOnce(&mut [u8; N]) -> Result<(), crate::Error>,
) -> Result<SecretBox<[u8; N]>, crate::Error>
where
    [u8; N]: Default + zeroize::Zeroize,
{
    let mut result = Ok(());
    let boxed = SecretBox::init_with_mut(|buf: &mut [u8; N]| result = fill(buf));
    result.map(|()| boxed)
}

/// The material of a software-protection key version, only ever in memory.
pub struct Kek(SecretBox<[u8; KEK_LEN]>);

impl Kek {
    /// Builds the KEK in place from `fill`.
    pub fn init_with(
        fill: impl FnOnce(&mut [u8; KEK_LEN]) -> Result<(), crate::Error>,
    ) -> Result<Self, crate::Error> {
        secret_array(fill).map(Self)
    }

    /// The key bytes.
    pub fn expose_secret(&self) -> &[u8; KEK_LEN] {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

/// A plaintext data key, returned once to the caller that asked for it.
pub struct Dek(SecretBox<[u8; DEK_LEN]>);

impl Dek {
    /// Builds a DEK in place from `fill`.
    pub fn init_with(
        fill: impl FnOnce(&mut [u8; DEK_LEN]) -> Result<(), crate::Error>,
    ) -> Result<Self, crate::Error> {
        secret_array(fill).map(Self)
    }

    /// The key bytes.
    pub fn expose_secret(&self) -> &[u8; DEK_LEN] {
        self.0.expose_secret()
    }

    /// Turns the DEK into a general plaintext (as a decrypted blob yields it).
    pub fn into_plaintext(self) -> Plaintext {
        Plaintext::from_slice(self.expose_secret())
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

/// Plaintext bytes: a decrypted DEK or small secret.
pub struct Plaintext(SecretSlice<u8>);

impl Plaintext {
    /// Copies `bytes` into a new secret buffer of exactly that length.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let boxed: Box<[u8]> = bytes.into();
        Self(SecretSlice::new(boxed))
    }

    /// Takes ownership of an existing secret buffer.
    pub fn from_secret(secret: SecretSlice<u8>) -> Self {
        Self(secret)
    }

    /// The bytes.
    pub fn expose_secret(&self) -> &[u8] {
        self.0.expose_secret()
    }

    /// Length in bytes; safe to log.
    pub fn len(&self) -> usize {
        self.0.expose_secret().len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Plaintext(<{} bytes redacted>)", self.len())
    }
}

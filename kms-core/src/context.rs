//! Encryption context: the caller's string→string map that is authenticated with every
//! ciphertext, and its canonical, order-independent byte encoding.
//!
//! Canonical encoding (all integers big-endian):
//!
//! ```text
//! u16 entry count
//! per entry, sorted by key bytes:  u16 key length | key bytes | u16 value length | value bytes
//! ```

use std::collections::BTreeMap;

use crate::error::{Error, InvalidInput};

/// At most this many entries.
pub const MAX_CONTEXT_ENTRIES: usize = 64;
/// Keys are 1 to this many bytes.
pub const MAX_CONTEXT_KEY_LEN: usize = 128;
/// Values are 0 to this many bytes.
pub const MAX_CONTEXT_VALUE_LEN: usize = 1024;

/// A bounded encryption context. Entry order never matters: the map is sorted. Its `Debug`
/// names the keys only: values may identify tenants, users or messages, and never reach logs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl std::fmt::Debug for EncryptionContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("EncryptionContext")
            .field(&KeysOnly(self.0.keys()))
            .finish()
    }
}

/// Debug-prints the keys of a context-like map, never its values.
pub(crate) struct KeysOnly<I>(pub(crate) I);

impl<'a, I> std::fmt::Debug for KeysOnly<I>
where
    I: Iterator<Item = &'a String> + Clone,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.clone()).finish()
    }
}

impl EncryptionContext {
    /// The empty context.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builds a context from pairs, rejecting duplicates and anything over the bounds.
    pub fn from_pairs<I>(pairs: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if k.is_empty() || k.len() > MAX_CONTEXT_KEY_LEN || v.len() > MAX_CONTEXT_VALUE_LEN {
                return Err(Error::Invalid(InvalidInput::Context));
            }
            if map.insert(k, v).is_some() || map.len() > MAX_CONTEXT_ENTRIES {
                return Err(Error::Invalid(InvalidInput::Context));
            }
        }
        Ok(Self(map))
    }

    /// The entries, sorted by key.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The value of entry `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends the canonical encoding to `out`.
    pub fn encode_canonical(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        let count =
            u16::try_from(self.0.len()).map_err(|_| Error::Invalid(InvalidInput::Context))?;
        out.extend_from_slice(&count.to_be_bytes());
        for (k, v) in &self.0 {
            for part in [k.as_bytes(), v.as_bytes()] {
                let len =
                    u16::try_from(part.len()).map_err(|_| Error::Invalid(InvalidInput::Context))?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap()
    }

    fn canon(c: &EncryptionContext) -> Vec<u8> {
        let mut out = Vec::new();
        c.encode_canonical(&mut out).unwrap();
        out
    }

    #[test]
    fn debug_names_keys_never_values() {
        let c = ctx(&[
            ("tenant", "canary-tenant-value"),
            ("message", "canary-message"),
        ]);
        let printed = format!("{c:?}");
        assert_eq!(printed, r#"EncryptionContext({"message", "tenant"})"#);
        assert!(!printed.contains("canary"));
    }

    #[test]
    fn order_does_not_matter() {
        let a = ctx(&[("tenant", "acme"), ("app", "chat"), ("z", "")]);
        let b = ctx(&[("z", ""), ("app", "chat"), ("tenant", "acme")]);
        assert_eq!(canon(&a), canon(&b));
    }

    #[test]
    fn encoding_is_unambiguous() {
        // "ab"="c" and "a"="bc" must not encode alike.
        assert_ne!(canon(&ctx(&[("ab", "c")])), canon(&ctx(&[("a", "bc")])));
        assert_eq!(canon(&EncryptionContext::empty()), vec![0, 0]);
    }

    #[test]
    fn bounds_and_duplicates_are_rejected() {
        let dup = vec![
            ("a".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
        ];
        assert!(EncryptionContext::from_pairs(dup).is_err());
        assert!(EncryptionContext::from_pairs([(String::new(), "v".to_string())]).is_err());
        let long_key = "k".repeat(MAX_CONTEXT_KEY_LEN + 1);
        assert!(EncryptionContext::from_pairs([(long_key, String::new())]).is_err());
        let long_val = "v".repeat(MAX_CONTEXT_VALUE_LEN + 1);
        assert!(EncryptionContext::from_pairs([("k".to_string(), long_val)]).is_err());
        let many = (0..=MAX_CONTEXT_ENTRIES).map(|i| (format!("k{i}"), String::new()));
        assert!(EncryptionContext::from_pairs(many).is_err());
    }
}

//! The operations a caller can ask of a key, by the names policies and grants use.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, InvalidInput};

/// A key operation: the Cedar action a data-plane request is decided as, the word grants
/// store, and what errors name. Serialised by its name (`"Decrypt"`), as grants are stored.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Op {
    /// Mint a task grant on a key.
    CreateGrant,
    /// Decrypt a blob.
    Decrypt,
    /// Encrypt a small secret.
    Encrypt,
    /// Generate a data key.
    GenerateDataKey,
    /// Re-encrypt a blob.
    ReEncrypt,
    /// Rotate a key (an admin change; no policy decides it).
    Rotate,
}

impl Op {
    /// Every operation, in name order.
    pub const ALL: [Op; 6] = [
        Op::CreateGrant,
        Op::Decrypt,
        Op::Encrypt,
        Op::GenerateDataKey,
        Op::ReEncrypt,
        Op::Rotate,
    ];

    /// The data-plane operations that use a key (creating a grant does not, by itself): what
    /// a grant may allow.
    pub const USES: [Op; 4] = [Op::GenerateDataKey, Op::Decrypt, Op::Encrypt, Op::ReEncrypt];

    /// The name: the Cedar action, and the word in grants and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::CreateGrant => "CreateGrant",
            Op::Decrypt => "Decrypt",
            Op::Encrypt => "Encrypt",
            Op::GenerateDataKey => "GenerateDataKey",
            Op::ReEncrypt => "ReEncrypt",
            Op::Rotate => "Rotate",
        }
    }

    /// True for the operations Cedar policies decide (the schema's actions).
    pub fn is_policy_action(self) -> bool {
        match self {
            Op::CreateGrant | Op::Decrypt | Op::Encrypt | Op::GenerateDataKey | Op::ReEncrypt => {
                true
            }
            Op::Rotate => false,
        }
    }

    /// True for the operations that use a key's material ([`Op::USES`]).
    pub fn is_key_use(self) -> bool {
        match self {
            Op::Decrypt | Op::Encrypt | Op::GenerateDataKey | Op::ReEncrypt => true,
            Op::CreateGrant | Op::Rotate => false,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Op {
    type Err = Error;

    /// The inverse of [`Op::as_str`], exactly (names are case-sensitive, as in Cedar).
    fn from_str(s: &str) -> Result<Self, Error> {
        Op::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or(Error::Invalid(InvalidInput::Operation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        for op in Op::ALL {
            assert_eq!(op.as_str().parse::<Op>().unwrap(), op);
            assert_eq!(serde_json::to_string(&op).unwrap(), format!("\"{op}\""));
        }
        for bad in ["", "decrypt", "DECRYPT", "Decrypt ", "None", "Sign"] {
            assert!(bad.parse::<Op>().is_err(), "{bad:?}");
        }
        assert!(Op::USES
            .iter()
            .all(|op| op.is_key_use() && op.is_policy_action()));
        assert!(Op::CreateGrant.is_policy_action() && !Op::CreateGrant.is_key_use());
        assert!(!Op::Rotate.is_policy_action());
    }
}

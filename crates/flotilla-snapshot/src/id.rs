//! [`LayerId`]: 16 random lowercase hex characters, safe to use as a
//! directory name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::SnapshotError;

const ID_LEN: usize = 16;

/// The id of a layer. The field is public so callers can build one from a
/// stored string; every store method checks its form before it touches a
/// path, so an id like `../x` is refused, never followed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LayerId(pub String);

impl LayerId {
    /// A new random id.
    pub fn generate() -> LayerId {
        LayerId(format!("{:016x}", rand::random::<u64>()))
    }

    /// Parses and checks an id.
    pub fn parse(s: &str) -> Result<LayerId, SnapshotError> {
        let id = LayerId(s.to_string());
        id.check()?;
        Ok(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the id has the form of a generated one.
    pub fn is_valid(&self) -> bool {
        self.0.len() == ID_LEN
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    pub(crate) fn check(&self) -> Result<(), SnapshotError> {
        if self.is_valid() {
            Ok(())
        } else {
            Err(SnapshotError::InvalidId { id: self.0.clone() })
        }
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LayerId {
    type Err = SnapshotError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LayerId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = LayerId::generate();
        let b = LayerId::generate();
        assert!(a.is_valid(), "{a}");
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 16);
    }

    #[test]
    fn parse_refuses_paths_and_odd_forms() {
        assert!(LayerId::parse("0123456789abcdef").is_ok());
        for bad in [
            "",
            "../../etc/passw",
            "0123456789ABCDEF",
            "0123456789abcde",
            ".tmp-0123456789ab",
        ] {
            assert!(
                matches!(LayerId::parse(bad), Err(SnapshotError::InvalidId { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn serializes_as_a_plain_string() {
        let id = LayerId("00000000000000ff".into());
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"00000000000000ff\"");
    }
}

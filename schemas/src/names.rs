//! Container names: the identity clients use, and a path component and an Apptainer instance
//! name on the host, so they are parsed once, at the edge, by an allow-list.

use std::borrow::Cow;
use std::fmt;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// A container name: 1 to 64 characters of `[A-Za-z0-9_.-]`, starting with a letter or a digit.
///
/// Stricter than Apptainer's own instance-name rule (`[a-zA-Z0-9._-]+`): the first character
/// rules out `.`, `..` and names that read as command-line options, and the length keeps file
/// names and log lines bounded.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerName(String);

impl ContainerName {
    pub const MAX_LEN: usize = 64;
    /// The rule above as a regular expression, for the JSON Schema and for error messages.
    pub const PATTERN: &'static str = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$";

    pub fn parse(name: &str) -> Result<Self, InvalidContainerName> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        let starts_well = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        if name.len() <= Self::MAX_LEN && starts_well && name.chars().all(valid_char) {
            Ok(Self(name.to_owned()))
        } else {
            Err(InvalidContainerName(name.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ContainerName {
    type Error = InvalidContainerName;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<ContainerName> for String {
    fn from(name: ContainerName) -> Self {
        name.0
    }
}

impl AsRef<str> for ContainerName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl JsonSchema for ContainerName {
    fn schema_name() -> Cow<'static, str> {
        "ContainerName".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": Self::PATTERN,
            "maxLength": Self::MAX_LEN,
            "description": "1 to 64 characters of A-Z a-z 0-9 _ . -, starting with a letter or a digit."
        })
    }
}

/// A name outside the rule of [`ContainerName`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidContainerName(String);

impl fmt::Display for InvalidContainerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid container name {:?}: use 1 to {} characters of A-Z a-z 0-9 _ . -, starting with a letter or a digit",
            self.0,
            ContainerName::MAX_LEN
        )
    }
}

impl std::error::Error for InvalidContainerName {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_allow_list() {
        for good in ["nb1", "a", "user.name_x-1", &"x".repeat(64)] {
            assert!(
                ContainerName::parse(good).is_ok(),
                "{good} should be accepted"
            );
        }
        for bad in [
            "",
            ".",
            "..",
            "-rf",
            "a/b",
            "a b",
            "é",
            "nb1\n",
            &"x".repeat(65),
        ] {
            assert!(
                ContainerName::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}

//! The rules of a request, in one room: every check of a field (names, paths, script lines,
//! environment) and the one shape of a refusal. A foundation: it knows nothing of the request
//! path, so the intake, the operations and the definition-file renderer all use it.

pub mod request;
pub mod script;

use schemas::ErrorCode;

/// A refused request or a failed operation: a stable code and a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
}

/// At most 80 characters of a value, for error messages: a refused 1 MiB value is not echoed.
pub fn shorten(value: &str) -> String {
    let mut short: String = value.chars().take(80).collect();
    if short.len() < value.len() {
        short.push('…');
    }
    short
}

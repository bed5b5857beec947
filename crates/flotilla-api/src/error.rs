//! The error body every failed request returns.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Machine-readable error category; the HTTP status follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidArgument,
    /// No token, or a token nobody issued.
    Unauthenticated,
    /// A valid token without the right (e.g. a tenant token on admin paths).
    PermissionDenied,
    NotFound,
    AlreadyExists,
    Conflict,
    InsufficientCapacity,
    GuestError,
    /// A host (its agent) could not be reached.
    Unavailable,
    Timeout,
    Internal,
}

impl ErrorCode {
    /// The HTTP status code for this category (the one mapping, used by every server).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists | ErrorCode::Conflict => 409,
            ErrorCode::InsufficientCapacity => 409,
            ErrorCode::GuestError => 502,
            ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Internal => 500,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// One line: what went wrong.
    pub message: String,
    /// What to do about it, when there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// `{"error": {...}}`, the body of every 4xx and 5xx response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_4xx() {
        for code in [
            ErrorCode::InvalidArgument,
            ErrorCode::NotFound,
            ErrorCode::AlreadyExists,
            ErrorCode::Conflict,
        ] {
            assert!((400..500).contains(&code.http_status()), "{code:?}");
        }
        assert_eq!(ErrorCode::Internal.http_status(), 500);
    }
}

//! The agent's errors as HTTP responses (the shared [`ApiError`]); internal
//! details are logged, not hidden.

pub use flotilla_api::http::{method_not_allowed, no_such_route, ApiError};
use flotilla_api::ErrorCode;

use crate::AgentError;

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        if e.code() == ErrorCode::Internal {
            tracing::error!(error = %e, "request failed");
        }
        ApiError(e.to_detail())
    }
}

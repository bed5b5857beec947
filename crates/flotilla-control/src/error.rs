//! The control plane's errors: each carries the API error code its HTTP
//! status follows from.

use flotilla_api::{ErrorCode, ErrorDetail};

use crate::placement::PolicyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub code: ErrorCode,
    pub message: String,
    pub hint: Option<String>,
}

pub type ControlResult<T> = Result<T, ControlError>;

impl ControlError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ControlError {
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code,
            message: self.message.clone(),
            hint: self.hint.clone(),
        }
    }
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Duplicate(what) => {
                ControlError::new(ErrorCode::AlreadyExists, format!("{what} already exists"))
            }
            StoreError::Contended => ControlError::conflict(e.to_string())
                .with_hint("the request raced with another; send it again"),
            StoreError::Refused(why) => ControlError::conflict(why),
            other => {
                tracing::error!(error = %other, "state store");
                ControlError::new(ErrorCode::Internal, other.to_string())
            }
        }
    }
}

impl From<PolicyError> for ControlError {
    fn from(e: PolicyError) -> Self {
        ControlError::invalid(e.to_string())
    }
}

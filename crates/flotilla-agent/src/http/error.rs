//! Errors as HTTP responses: the status follows from the error's code, the
//! body is `{"error": {...}}`; internal details are logged, not hidden.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flotilla_api::{ErrorBody, ErrorCode, ErrorDetail};

use crate::AgentError;

#[derive(Debug)]
pub struct ApiError(pub ErrorDetail);

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        if e.code() == ErrorCode::Internal {
            tracing::error!(error = %e, "request failed");
        }
        ApiError(e.to_detail())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError(ErrorDetail {
            code: ErrorCode::InvalidArgument,
            message: format!("invalid request body: {}", e.body_text()),
            hint: Some("see /v1/openapi.json for the accepted fields".into()),
        })
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError(ErrorDetail {
            code: ErrorCode::InvalidArgument,
            message: format!("invalid query: {}", e.body_text()),
            hint: None,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody { error: self.0 })).into_response()
    }
}

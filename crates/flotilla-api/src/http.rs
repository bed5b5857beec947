//! Errors as HTTP responses, for every server that speaks these types (the
//! host agent, the control plane): the status follows from the error's
//! code, the body is `{"error": {...}}`. Behind the `axum` feature, so
//! clients need no web framework.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::{ErrorBody, ErrorCode, ErrorDetail};

/// An error answered to an HTTP request. Each server converts its own
/// error type into it.
#[derive(Debug)]
pub struct ApiError(pub ErrorDetail);

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

/// Unknown paths answer with the same error body as everything else.
pub async fn no_such_route(uri: Uri) -> ApiError {
    ApiError(ErrorDetail {
        code: ErrorCode::NotFound,
        message: format!("no such API path: {}", uri.path()),
        hint: Some("see /v1/openapi.json for the API's paths".into()),
    })
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let detail = ErrorDetail {
        code: ErrorCode::InvalidArgument,
        message: format!("{method} is not allowed on {}", uri.path()),
        hint: Some("see /v1/openapi.json for the methods each path takes".into()),
    };
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody { error: detail }),
    )
        .into_response()
}

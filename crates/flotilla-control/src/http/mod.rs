//! The control plane's REST API under `/v1`. Handlers parse, authenticate
//! and call [`ControlPlane`]; errors become `{"error": {...}}` with the
//! status their code maps to.

mod convert;
mod handlers;

pub use handlers::openapi_document;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_api::{ErrorBody, ErrorCode, ErrorDetail};

use crate::auth::{bearer, Caller};
use crate::error::ControlError;
use crate::service::ControlPlane;

pub fn router(cp: ControlPlane) -> Router {
    use handlers::*;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tokens", post(create_token))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{name}", get(get_host))
        .route("/v1/hosts/{name}/heartbeat", post(heartbeat))
        .route("/v1/hosts/{name}/cordon", post(cordon))
        .route("/v1/hosts/{name}/uncordon", post(uncordon))
        .route("/v1/instances", get(list_instances).post(run_instances))
        .route(
            "/v1/instances/{name}",
            get(get_instance).delete(terminate_instance),
        )
        .route("/v1/instances/{name}/start", post(start_instance))
        .route("/v1/instances/{name}/stop", post(stop_instance))
        .route("/v1/instances/{name}/exec", post(exec_instance))
        .route("/v1/instances/{name}/suspend", post(suspend_instance))
        .route("/v1/instances/{name}/resume", post(resume_instance))
        .route("/v1/instances/{name}/clone", post(clone_instance))
        .route("/v1/fleet/suspend", post(fleet_suspend))
        .route("/v1/fleet/resume", post(fleet_resume))
        .route("/v1/placement/explain", post(explain))
        .route("/v1/policies", get(list_policies))
        .route(
            "/v1/policies/{name}",
            axum::routing::put(put_policy).delete(delete_policy),
        )
        .route("/v1/operations", get(list_operations))
        .route("/v1/operations/{id}", get(get_operation))
        .fallback(no_such_route)
        .with_state(cp)
}

/// An error as an HTTP response.
#[derive(Debug)]
pub struct ApiError(pub ErrorDetail);

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        ApiError(e.detail())
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

async fn no_such_route(uri: axum::http::Uri) -> ApiError {
    ApiError(ErrorDetail {
        code: ErrorCode::NotFound,
        message: format!("no such API path: {}", uri.path()),
        hint: Some("see /v1/openapi.json for the API's paths".into()),
    })
}

impl FromRequestParts<ControlPlane> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        cp: &ControlPlane,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(secret) = header.and_then(bearer) else {
            return Err(
                ControlError::new(ErrorCode::Unauthenticated, "missing API token")
                    .with_hint("send `Authorization: Bearer <token>`")
                    .into(),
            );
        };
        Ok(cp.authenticate(secret).await?)
    }
}

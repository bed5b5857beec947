//! The control plane's REST API under `/v1`. Handlers parse, authenticate
//! and call [`ControlPlane`]; errors become `{"error": {...}}` with the
//! status their code maps to.

mod convert;
mod handlers;
mod volumes;

pub use handlers::openapi_document;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::Router;
pub use flotilla_api::http::ApiError;
use flotilla_api::http::{method_not_allowed, no_such_route};
use flotilla_api::ErrorCode;

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
        .route("/v1/hosts/{name}/drain", post(drain))
        .route("/v1/instances/{name}/migrate", post(migrate_instance))
        .route("/v1/instances", get(list_instances).post(run_instances))
        .route(
            "/v1/instances/{name}",
            get(get_instance)
                .patch(update_instance)
                .delete(terminate_instance),
        )
        .route("/v1/instances/{name}/start", post(start_instance))
        .route("/v1/instances/{name}/stop", post(stop_instance))
        .route("/v1/instances/{name}/exec", post(exec_instance))
        .route("/v1/instances/{name}/suspend", post(suspend_instance))
        .route("/v1/instances/{name}/resume", post(resume_instance))
        .route("/v1/instances/{name}/clone", post(clone_instance))
        .route("/v1/instances/{name}/snapshots", post(create_snapshot))
        .route("/v1/snapshots", get(list_snapshots))
        .route(
            "/v1/snapshots/{name}",
            get(get_snapshot).delete(delete_snapshot),
        )
        .route(
            "/v1/volumes",
            get(volumes::list_volumes).post(volumes::create_volume),
        )
        .route(
            "/v1/volumes/{name}",
            get(volumes::get_volume).delete(volumes::delete_volume),
        )
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
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(cp)
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        ApiError(e.detail())
    }
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

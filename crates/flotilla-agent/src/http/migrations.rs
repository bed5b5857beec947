//! `/v1/migrations` and `/v1/vms/{name}/migrate`: live migration between
//! agents. The source's agent is called by users (and the control plane);
//! `incoming`, `switch-over` and `DELETE` are called by the source's agent
//! on the target's.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use flotilla_api::migration::{
    IncomingMigrationReady, IncomingMigrationRequest, MigrateVmRequest, MigrationInfo,
    MigrationPhase,
};
use flotilla_api::ErrorBody;
use serde::Deserialize;

use super::vms::{detached, JsonBody};
use super::ApiError;
use crate::error::AgentError;
use crate::VmManager;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    #[serde(default)]
    wait: bool,
}

#[utoipa::path(post, path = "/v1/vms/{name}/migrate", request_body = MigrateVmRequest,
    params(("wait" = Option<bool>, Query, description = "answer when the migration has ended")),
    responses((status = 202, body = MigrationInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn migrate(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    body: JsonBody<MigrateVmRequest>,
) -> Result<(StatusCode, Json<MigrationInfo>), ApiError> {
    let Query(q) = query?;
    let Json(req) = body?;
    let started = {
        let m = m.clone();
        detached(async move { m.migrate(&name, req).await }).await?
    };
    if !q.wait {
        return Ok((StatusCode::ACCEPTED, Json(started)));
    }
    let mut now = started;
    loop {
        now = m
            .migration_past(&now.id, now.phase, Duration::from_secs(10))
            .await?;
        if now.phase.is_finished() {
            return Ok((StatusCode::OK, Json(now)));
        }
    }
}

/// Longest wait a `GET /v1/migrations/{id}?phase=` may ask for.
const MAX_PHASE_WAIT_MS: u64 = 10_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectQuery {
    /// The phase the caller last saw: the answer comes once the migration
    /// has left it (or after `wait_ms`).
    phase: Option<MigrationPhase>,
    wait_ms: Option<u64>,
}

#[utoipa::path(get, path = "/v1/migrations", responses((status = 200, body = Vec<MigrationInfo>)))]
pub async fn list(State(m): State<VmManager>) -> Json<Vec<MigrationInfo>> {
    Json(m.migrations())
}

#[utoipa::path(get, path = "/v1/migrations/{id}",
    params(
        ("phase" = Option<MigrationPhase>, Query, description = "answer once the migration has left this phase (or after wait_ms)"),
        ("wait_ms" = Option<u64>, Query, description = "longest wait for a phase change, in ms (default 1000, at most 10000)"),
    ),
    responses((status = 200, body = MigrationInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn inspect(
    State(m): State<VmManager>,
    Path(id): Path<String>,
    query: Result<Query<InspectQuery>, QueryRejection>,
) -> Result<Json<MigrationInfo>, ApiError> {
    let Query(q) = query?;
    match (q.phase, q.wait_ms) {
        (None, None) => Ok(Json(m.migration(&id)?)),
        (None, Some(_)) => Err(AgentError::InvalidArgument(
            "wait_ms needs phase: the phase to wait past (e.g. ?phase=disk_sync&wait_ms=1000)"
                .into(),
        )
        .into()),
        (Some(_), Some(ms)) if ms > MAX_PHASE_WAIT_MS => Err(AgentError::InvalidArgument(format!(
            "wait_ms {ms} is too long: at most {MAX_PHASE_WAIT_MS}"
        ))
        .into()),
        (Some(phase), wait_ms) => {
            let wait = Duration::from_millis(wait_ms.unwrap_or(1000));
            Ok(Json(m.migration_past(&id, phase, wait).await?))
        }
    }
}

#[utoipa::path(post, path = "/v1/migrations/{id}/cancel", responses((status = 202, body = MigrationInfo),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel(
    State(m): State<VmManager>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<MigrationInfo>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(m.cancel_migration(&id)?)))
}

#[utoipa::path(post, path = "/v1/migrations/incoming", request_body = IncomingMigrationRequest,
    responses((status = 201, body = IncomingMigrationReady), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn incoming(
    State(m): State<VmManager>,
    body: JsonBody<IncomingMigrationRequest>,
) -> Result<(StatusCode, Json<IncomingMigrationReady>), ApiError> {
    let Json(req) = body?;
    let ready = detached(async move { m.prepare_incoming(req).await }).await?;
    Ok((StatusCode::CREATED, Json(ready)))
}

#[utoipa::path(post, path = "/v1/migrations/{id}/switch-over", responses((status = 200, body = MigrationInfo),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn switch_over(
    State(m): State<VmManager>,
    Path(id): Path<String>,
) -> Result<Json<MigrationInfo>, ApiError> {
    Ok(Json(
        detached(async move { m.switch_over(&id).await }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/migrations/{id}/recover", responses((status = 200, body = IncomingMigrationReady),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn recover(
    State(m): State<VmManager>,
    Path(id): Path<String>,
) -> Result<Json<IncomingMigrationReady>, ApiError> {
    Ok(Json(
        detached(async move { m.recover_incoming(&id).await }).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/migrations/{id}", responses((status = 204),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(m): State<VmManager>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    detached(async move { m.abort_incoming(&id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

//! `/v1/snapshots` and `/v1/vms/{name}/clone`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use flotilla_api::{
    CloneResult, CloneVmRequest, CreateSnapshotRequest, ErrorBody, MoveDiskRequest,
    SnapshotCreated, SnapshotInfo, VmInfo,
};

use super::vms::{detached, off_thread, JsonBody};
use super::ApiError;
use crate::VmManager;

#[utoipa::path(get, path = "/v1/snapshots", responses((status = 200, body = Vec<SnapshotInfo>)))]
pub async fn list(State(m): State<VmManager>) -> Result<Json<Vec<SnapshotInfo>>, ApiError> {
    Ok(Json(off_thread(move || m.snapshot_list()).await?))
}

#[utoipa::path(post, path = "/v1/snapshots", request_body = CreateSnapshotRequest, responses(
    (status = 201, body = SnapshotCreated), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody)))]
pub async fn create(
    State(m): State<VmManager>,
    body: JsonBody<CreateSnapshotRequest>,
) -> Result<(StatusCode, Json<SnapshotCreated>), ApiError> {
    let Json(req) = body?;
    let made = detached(async move { m.snapshot_create(&req.vm, &req.name).await }).await?;
    Ok((StatusCode::CREATED, Json(made)))
}

#[utoipa::path(get, path = "/v1/snapshots/{name}", responses((status = 200, body = SnapshotInfo), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "being taken")))]
pub async fn inspect(
    State(m): State<VmManager>,
    Path(name): Path<String>,
) -> Result<Json<SnapshotInfo>, ApiError> {
    Ok(Json(off_thread(move || m.snapshot_get(&name)).await?))
}

#[utoipa::path(delete, path = "/v1/snapshots/{name}",
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(m): State<VmManager>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    off_thread(move || m.snapshot_remove(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/vms/{name}/clone", request_body = CloneVmRequest, responses(
    (status = 201, body = CloneResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody)))]
pub async fn clone_vm(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    body: JsonBody<CloneVmRequest>,
) -> Result<(StatusCode, Json<CloneResult>), ApiError> {
    let Json(req) = body?;
    let made = detached(async move { m.clone_vm(&name, req).await }).await?;
    Ok((StatusCode::CREATED, Json(made)))
}

#[utoipa::path(post, path = "/v1/vms/{name}/move-disk", request_body = MoveDiskRequest, responses(
    (status = 200, body = VmInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody)))]
pub async fn move_disk(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    body: JsonBody<MoveDiskRequest>,
) -> Result<Json<VmInfo>, ApiError> {
    let Json(req) = body?;
    Ok(Json(
        detached(async move { m.move_disk(&name, req.volume.as_deref()).await }).await?,
    ))
}

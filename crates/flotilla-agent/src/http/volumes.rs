//! `/v1/volumes`: the host's volumes, data disks that outlive VMs.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use flotilla_api::{CreateVolumeRequest, ErrorBody, VolumeInfo};

use super::vms::{detached, off_thread, JsonBody};
use super::ApiError;
use crate::VmManager;

#[utoipa::path(get, path = "/v1/volumes", responses((status = 200, body = Vec<VolumeInfo>)))]
pub async fn list(State(m): State<VmManager>) -> Result<Json<Vec<VolumeInfo>>, ApiError> {
    Ok(Json(off_thread(move || m.volume_list()).await?))
}

#[utoipa::path(post, path = "/v1/volumes", request_body = CreateVolumeRequest, responses(
    (status = 201, body = VolumeInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(m): State<VmManager>,
    body: JsonBody<CreateVolumeRequest>,
) -> Result<(StatusCode, Json<VolumeInfo>), ApiError> {
    let Json(req) = body?;
    let made = detached(async move { m.volume_create(req).await }).await?;
    Ok((StatusCode::CREATED, Json(made)))
}

#[utoipa::path(get, path = "/v1/volumes/{name}", responses((status = 200, body = VolumeInfo), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "being made or removed")))]
pub async fn inspect(
    State(m): State<VmManager>,
    Path(name): Path<String>,
) -> Result<Json<VolumeInfo>, ApiError> {
    Ok(Json(off_thread(move || m.volume_get(&name)).await?))
}

#[utoipa::path(delete, path = "/v1/volumes/{name}",
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(m): State<VmManager>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    detached(async move { m.volume_remove(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

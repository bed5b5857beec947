//! `/v1/images`: list, inspect, register and remove guest images.

use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use flotilla_api::{ErrorBody, ImageInfo, RegisterImageRequest};
use flotilla_image::{Image, RegisterImage};

use super::ApiError;
use crate::{AgentError, VmManager};

pub fn image_info(i: &Image) -> ImageInfo {
    ImageInfo {
        name: i.name.clone(),
        kernel: i.kernel.display().to_string(),
        initrd: i.initrd.as_ref().map(|p| p.display().to_string()),
        rootfs: i.rootfs.as_ref().map(|p| p.display().to_string()),
        kernel_format: match i.kernel_format {
            flotilla_image::KernelFormat::ElfPvh => "elf-pvh".to_string(),
            flotilla_image::KernelFormat::BzImage => "bzimage".to_string(),
        },
        builtin: i.builtin,
        created_at: i.created_at.clone(),
        size_bytes: i.size_bytes,
    }
}

#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = Vec<ImageInfo>)))]
pub async fn list(State(m): State<VmManager>) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    let images = m.images().list().map_err(AgentError::from)?;
    Ok(Json(images.iter().map(image_info).collect()))
}

#[utoipa::path(get, path = "/v1/images/{name}", responses((status = 200, body = ImageInfo), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(m): State<VmManager>,
    Path(name): Path<String>,
) -> Result<Json<ImageInfo>, ApiError> {
    let image = m.images().get(&name).map_err(AgentError::from)?;
    Ok(Json(image_info(&image)))
}

#[utoipa::path(post, path = "/v1/images", request_body = RegisterImageRequest,
    responses((status = 201, body = ImageInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn register(
    State(m): State<VmManager>,
    body: Result<Json<RegisterImageRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<ImageInfo>), ApiError> {
    let Json(req) = body?;
    for (field, path) in [
        ("kernel", Some(&req.kernel)),
        ("initrd", req.initrd.as_ref()),
        ("rootfs", req.rootfs.as_ref()),
    ] {
        if let Some(p) = path {
            let p = std::path::Path::new(p);
            if !p.is_absolute() || !p.is_file() {
                return Err(AgentError::InvalidArgument(format!(
                    "{field}: {} is not an existing file (give an absolute path on the agent's host)",
                    p.display()
                ))
                .into());
            }
        }
    }
    let store = m.images().clone();
    let image = tokio::task::spawn_blocking(move || {
        store.register(RegisterImage {
            name: req.name,
            kernel: PathBuf::from(req.kernel),
            initrd: req.initrd.map(PathBuf::from),
            rootfs: req.rootfs.map(PathBuf::from),
            builtin: false,
            replace: req.replace,
        })
    })
    .await
    .map_err(|e| AgentError::io("registering image", std::io::Error::other(e)))?
    .map_err(AgentError::from)?;
    m.forget_stale_bases().await;
    Ok((StatusCode::CREATED, Json(image_info(&image))))
}

#[utoipa::path(delete, path = "/v1/images/{name}", responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(m): State<VmManager>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let users: Vec<String> = m
        .list()
        .into_iter()
        .filter(|vm| vm.image == name)
        .map(|vm| vm.name)
        .collect();
    if !users.is_empty() {
        return Err(AgentError::conflict(
            format!("image {name:?} is used by VMs: {}", users.join(", ")),
            Some("remove those VMs first".to_string()),
        )
        .into());
    }
    m.images().remove(&name).map_err(AgentError::from)?;
    m.drop_bases_of(&name).await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/images/{name}/base-snapshot", request_body = flotilla_api::BaseSnapshotRequest,
    responses((status = 200, body = flotilla_api::SnapshotInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn base_snapshot(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    body: Result<Json<flotilla_api::BaseSnapshotRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<flotilla_api::SnapshotInfo>, ApiError> {
    let Json(req) = body?;
    let made = tokio::spawn(async move { m.image_base(&name, req).await })
        .await
        .map_err(|e| AgentError::io("base snapshot task", std::io::Error::other(e)))??;
    Ok(Json(made))
}

//! `/v1/volumes`: the tenant's volumes.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use flotilla_api::control::{CreateVolumeRequest, Page, Volume};

use super::convert;
use super::handlers::{
    body, idempotent, name_token, page_of, page_size, query, ApiResult, NamedPageQuery, TenantQuery,
};
use crate::auth::Caller;
use crate::service::ControlPlane;

#[utoipa::path(post, path = "/v1/volumes", request_body = CreateVolumeRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key gets the first answer again")),
    responses((status = 201, body = Volume), (status = 400, body = flotilla_api::ErrorBody),
        (status = 409, body = flotilla_api::ErrorBody), (status = 503, body = flotilla_api::ErrorBody)))]
pub async fn create_volume(
    State(cp): State<ControlPlane>,
    caller: Caller,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    req: Result<Json<CreateVolumeRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let req = body(req)?;
    let tenant = q.tenant.as_deref();
    let what = format!("volume {}", req.name);
    idempotent(&cp, &caller, tenant, &headers, &what, &req, || async {
        let vol = cp.create_volume(&caller, tenant, &req).await?;
        Ok(convert::volume(vol))
    })
    .await
}

#[utoipa::path(get, path = "/v1/volumes",
    params(("page_size" = Option<u32>, Query, description = "at most this many (default 100, at most 1000)"),
        ("page_token" = Option<String>, Query, description = "the previous page's next_page_token")),
    responses((status = 200, body = Page<Volume>)))]
pub async fn list_volumes(
    State(cp): State<ControlPlane>,
    caller: Caller,
    q: Result<Query<NamedPageQuery>, QueryRejection>,
) -> ApiResult<Json<Page<Volume>>> {
    let q = query(q)?;
    let size = page_size(q.page_size)?;
    let after = name_token(q.page_token.as_deref())?;
    let list = cp
        .list_volumes(&caller, q.tenant.as_deref(), after, size + 1)
        .await?;
    Ok(Json(page_of(
        list,
        size,
        |v| format!("{}:{}", v.name, v.id),
        convert::volume,
    )))
}

#[utoipa::path(get, path = "/v1/volumes/{name}", responses((status = 200, body = Volume),
    (status = 404, body = flotilla_api::ErrorBody)))]
pub async fn get_volume(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<Json<Volume>> {
    let q = query(q)?;
    let vol = cp.volume(&caller, q.tenant.as_deref(), &name).await?;
    Ok(Json(convert::volume(vol)))
}

#[utoipa::path(delete, path = "/v1/volumes/{name}", responses((status = 204),
    (status = 404, body = flotilla_api::ErrorBody), (status = 409, body = flotilla_api::ErrorBody)))]
pub async fn delete_volume(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let q = query(q)?;
    cp.delete_volume(&caller, q.tenant.as_deref(), &name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

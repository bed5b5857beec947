//! Host-level endpoints.

use axum::extract::State;
use axum::Json;
use flotilla_api::HostInfo;

use crate::VmManager;

pub async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/v1/host", responses((status = 200, body = HostInfo)))]
pub async fn host_info(State(m): State<VmManager>) -> Json<HostInfo> {
    Json(m.host_info())
}

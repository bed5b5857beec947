//! `/v1/vms`: the VM lifecycle, exec and console logs.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flotilla_api::{
    CreateVmRequest, ErrorBody, ExecRequest, ExecResult, FleetRequest, FleetResult, StopVmRequest,
    VmInfo,
};
use serde::Deserialize;
use tokio_stream_shim::ReceiverLines;

use super::ApiError;
use crate::manager::fleet::FleetOp;
use crate::VmManager;

pub(super) type JsonBody<T> = Result<Json<T>, JsonRejection>;

#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = Vec<VmInfo>)))]
pub async fn list(State(m): State<VmManager>) -> Json<Vec<VmInfo>> {
    Json(m.list())
}

#[utoipa::path(post, path = "/v1/vms", request_body = CreateVmRequest, responses(
    (status = 201, body = VmInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody)))]
pub async fn create(
    State(m): State<VmManager>,
    body: JsonBody<CreateVmRequest>,
) -> Result<(StatusCode, Json<VmInfo>), ApiError> {
    let Json(req) = body?;
    let vm = detached(async move { m.create(req).await }).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}

#[utoipa::path(get, path = "/v1/vms/{name}", responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody)))]
pub async fn inspect(
    State(m): State<VmManager>,
    Path(name): Path<String>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(m.inspect(&name).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/v1/vms/{name}", params(("force" = Option<bool>, Query, description = "stop a running VM first")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    query: Result<Query<RemoveQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let Query(q) = query?;
    detached(async move { m.delete(&name, q.force).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartQuery {
    #[serde(default)]
    wait: bool,
}

#[utoipa::path(post, path = "/v1/vms/{name}/start", params(("wait" = Option<bool>, Query, description = "answer once the guest agent is ready")),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn start(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    query: Result<Query<StartQuery>, QueryRejection>,
) -> Result<Json<VmInfo>, ApiError> {
    let Query(q) = query?;
    Ok(Json(
        detached(async move { m.start(&name, q.wait).await }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/vms/{name}/stop", request_body(content = Option<StopVmRequest>),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody)))]
pub async fn stop(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    body: Result<Option<Json<StopVmRequest>>, JsonRejection>,
) -> Result<Json<VmInfo>, ApiError> {
    let req = body?.map(|Json(b)| b).unwrap_or_default();
    let timeout = req.timeout_ms.map(Duration::from_millis);
    Ok(Json(
        detached(async move { m.stop(&name, req.force, timeout).await }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/fleet/suspend", request_body = FleetRequest,
    responses((status = 200, body = FleetResult), (status = 400, body = ErrorBody)))]
pub async fn fleet_suspend(
    State(m): State<VmManager>,
    body: JsonBody<FleetRequest>,
) -> Result<Json<FleetResult>, ApiError> {
    let Json(req) = body?;
    Ok(Json(
        detached(async move { m.fleet(FleetOp::Suspend, req).await }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/fleet/resume", request_body = FleetRequest,
    responses((status = 200, body = FleetResult), (status = 400, body = ErrorBody)))]
pub async fn fleet_resume(
    State(m): State<VmManager>,
    body: JsonBody<FleetRequest>,
) -> Result<Json<FleetResult>, ApiError> {
    let Json(req) = body?;
    Ok(Json(
        detached(async move { m.fleet(FleetOp::Resume, req).await }).await?,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuspendQuery {
    #[serde(default)]
    warm: bool,
}

#[utoipa::path(post, path = "/v1/vms/{name}/suspend",
    params(("warm" = Option<bool>, Query, description = "keep a QEMU waiting for the resume (no guest memory): the resume skips QEMU's start")),
    responses((status = 200, body = VmInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn suspend(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    query: Result<Query<SuspendQuery>, QueryRejection>,
) -> Result<Json<VmInfo>, ApiError> {
    let Query(q) = query?;
    Ok(Json(
        detached(async move { m.suspend(&name, q.warm).await }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/vms/{name}/resume", params(("wait" = Option<bool>, Query, description = "answer once the guest agent is ready")),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    query: Result<Query<StartQuery>, QueryRejection>,
) -> Result<Json<VmInfo>, ApiError> {
    let Query(q) = query?;
    Ok(Json(
        detached(async move { m.resume(&name, q.wait).await }).await?,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecQuery {
    #[serde(default)]
    stream: bool,
}

#[utoipa::path(post, path = "/v1/vms/{name}/exec", request_body = ExecRequest,
    params(("stream" = Option<bool>, Query, description = "stream newline-delimited ExecEvent JSON")),
    responses((status = 200, body = ExecResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub async fn exec(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    query: Result<Query<ExecQuery>, QueryRejection>,
    body: JsonBody<ExecRequest>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let Json(req) = body?;
    if !q.stream {
        return Ok(Json(m.exec(&name, req).await?).into_response());
    }
    let rx = m.exec_stream(&name, req).await?;
    let body = Body::from_stream(ReceiverLines::new(rx));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    tail_bytes: Option<u64>,
    offset: Option<u64>,
}

/// The console log's full size, sent with every logs response so a client
/// can follow the log by asking from that offset next time.
pub const LOG_SIZE_HEADER: &str = "x-flotilla-log-size";

#[utoipa::path(get, path = "/v1/vms/{name}/logs", params(("tail_bytes" = Option<u64>, Query, description = "only the last N bytes"),
    ("offset" = Option<u64>, Query, description = "only the bytes from this offset on")),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorBody)))]
pub async fn logs(
    State(m): State<VmManager>,
    Path(name): Path<String>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let (bytes, size) = m.logs(&name, q.tail_bytes, q.offset)?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::HeaderName::from_static(LOG_SIZE_HEADER),
                size.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// Runs a lifecycle operation to its end even if the client goes away: hyper
/// drops a handler's future on disconnect, and a stop or start cut in the
/// middle would leave the VM half way.
pub(super) async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, crate::AgentError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(op).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(crate::AgentError::io("lifecycle task", std::io::Error::other(e)).into()),
    }
}

/// Runs blocking work (file reads, `qemu-img`) off the async threads.
pub(super) async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::AgentError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(crate::AgentError::io("blocking task", std::io::Error::other(e)).into()),
    }
}

/// Turns a channel of exec events into a stream of JSON lines.
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use flotilla_api::ExecEvent;
    use futures::Stream;
    use tokio::sync::mpsc;

    pub struct ReceiverLines(mpsc::Receiver<ExecEvent>);

    impl ReceiverLines {
        pub fn new(rx: mpsc::Receiver<ExecEvent>) -> Self {
            ReceiverLines(rx)
        }
    }

    impl Stream for ReceiverLines {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx).map(|ev| {
                ev.map(|ev| {
                    let mut line = serde_json::to_vec(&ev).map_err(std::io::Error::other)?;
                    line.push(b'\n');
                    Ok(line)
                })
            })
        }
    }
}

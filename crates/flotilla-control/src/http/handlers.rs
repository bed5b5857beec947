//! One handler per route: parse, authenticate, call the control plane.

use std::collections::BTreeMap;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flotilla_api::control::{
    CloneInstanceRequest, CreateSnapshotRequest, CreateTenantRequest, CreateTokenRequest,
    FleetSelector, HeartbeatReply, Host, HostHeartbeat, Instance, MigrateInstanceRequest,
    ObservedState, Operation, Page, PlacementExplanation, Policy, PolicyDocument,
    RunInstancesRequest, RunInstancesResult, Snapshot, Tenant, TokenCreated, UpdateInstanceRequest,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::OpenApi;

use super::{convert, ApiError};
use crate::auth::Caller;
use crate::error::ControlError;
use crate::service::ControlPlane;
use crate::store::InstanceFilter;
use crate::workflows::OperationInput;

pub(super) type ApiResult<T> = Result<T, ApiError>;

pub(super) fn body<T>(b: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    Ok(b?.0)
}

pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    Ok(q?.0)
}

pub async fn healthz() -> &'static str {
    "ok"
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Flotilla control plane",
        description = "Tenants, hosts, instances, volumes, snapshots, placement and operations"
    ),
    paths(
        create_tenant,
        list_tenants,
        create_token,
        list_hosts,
        get_host,
        heartbeat,
        cordon,
        uncordon,
        run_instances,
        list_instances,
        get_instance,
        terminate_instance,
        update_instance,
        migrate_instance,
        drain,
        start_instance,
        stop_instance,
        exec_instance,
        suspend_instance,
        resume_instance,
        clone_instance,
        create_snapshot,
        list_snapshots,
        get_snapshot,
        delete_snapshot,
        super::volumes::create_volume,
        super::volumes::list_volumes,
        super::volumes::get_volume,
        super::volumes::delete_volume,
        fleet_suspend,
        fleet_resume,
        explain,
        list_operations,
        get_operation,
        list_policies,
        put_policy,
        delete_policy
    ),
    components(schemas(flotilla_api::ErrorBody))
)]
struct ControlApi;

pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ControlApi::openapi())
}

/// The OpenAPI document, for tests and docs.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ControlApi::openapi()
}

// ---- tenants and tokens ----

#[utoipa::path(post, path = "/v1/tenants", request_body = CreateTenantRequest,
    responses((status = 201, body = Tenant), (status = 409, body = flotilla_api::ErrorBody)))]
pub async fn create_tenant(
    State(cp): State<ControlPlane>,
    caller: Caller,
    req: Result<Json<CreateTenantRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Tenant>)> {
    let req = body(req)?;
    let t = cp.create_tenant(&caller, &req.name).await?;
    Ok((StatusCode::CREATED, Json(convert::tenant(t))))
}

#[utoipa::path(get, path = "/v1/tenants", responses((status = 200, body = Vec<Tenant>)))]
pub async fn list_tenants(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<Vec<Tenant>>> {
    let list = cp.list_tenants(&caller).await?;
    Ok(Json(list.into_iter().map(convert::tenant).collect()))
}

#[utoipa::path(post, path = "/v1/tokens", request_body = CreateTokenRequest,
    responses((status = 201, body = TokenCreated)))]
pub async fn create_token(
    State(cp): State<ControlPlane>,
    caller: Caller,
    req: Result<Json<CreateTokenRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<TokenCreated>)> {
    let req = body(req)?;
    let (id, tenant, token) = cp.create_token(&caller, &req).await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            id,
            tenant,
            admin: req.admin,
            host: req.host.clone(),
            token,
        }),
    ))
}

// ---- hosts ----

#[utoipa::path(get, path = "/v1/hosts", responses((status = 200, body = Vec<Host>)))]
pub async fn list_hosts(
    State(cp): State<ControlPlane>,
    caller: Caller,
) -> ApiResult<Json<Vec<Host>>> {
    let hosts = cp.list_hosts(&caller).await?;
    Ok(Json(hosts.into_iter().map(convert::host).collect()))
}

#[utoipa::path(get, path = "/v1/hosts/{name}", responses((status = 200, body = Host)))]
pub async fn get_host(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Host>> {
    Ok(Json(convert::host(cp.host(&caller, &name).await?)))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/heartbeat", request_body = HostHeartbeat,
    responses((status = 200, body = HeartbeatReply,
        description = "recorded; the VM routes when they changed")))]
pub async fn heartbeat(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    req: Result<Json<HostHeartbeat>, JsonRejection>,
) -> ApiResult<Json<HeartbeatReply>> {
    let beat = body(req)?;
    Ok(Json(cp.heartbeat(&caller, &name, &beat).await?))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/cordon", responses((status = 200, body = Host)))]
pub async fn cordon(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Host>> {
    Ok(Json(convert::host(
        cp.set_cordoned(&caller, &name, true).await?,
    )))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/drain", responses((status = 202, body = Operation),
    (status = 404, body = flotilla_api::ErrorBody), (status = 409, body = flotilla_api::ErrorBody)))]
pub async fn drain(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let op = cp.drain_host(&caller, &name).await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}

#[utoipa::path(post, path = "/v1/instances/{name}/migrate", request_body = MigrateInstanceRequest,
    responses((status = 202, body = Operation), (status = 404, body = flotilla_api::ErrorBody),
              (status = 409, body = flotilla_api::ErrorBody)))]
pub async fn migrate_instance(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
    req: Result<Json<MigrateInstanceRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let q = query(q)?;
    let req = body(req)?;
    let op = cp
        .migrate_instance(&caller, q.tenant.as_deref(), &name, req.to, req.options)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/uncordon", responses((status = 200, body = Host)))]
pub async fn uncordon(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Host>> {
    Ok(Json(convert::host(
        cp.set_cordoned(&caller, &name, false).await?,
    )))
}

// ---- instances ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    /// For admin tokens: the tenant (id) to act for.
    #[serde(default)]
    pub(super) tenant: Option<String>,
}

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

#[utoipa::path(post, path = "/v1/instances", request_body = RunInstancesRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key gets the first answer again")),
    responses((status = 201, body = RunInstancesResult), (status = 409, body = flotilla_api::ErrorBody)))]
pub async fn run_instances(
    State(cp): State<ControlPlane>,
    caller: Caller,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    req: Result<Json<RunInstancesRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let req = body(req)?;
    let tenant = q.tenant.as_deref();
    idempotent(&cp, &caller, tenant, &headers, "", &req, || {
        run(&cp, &caller, tenant, &req)
    })
    .await
}

/// Answers a create once per `Idempotency-Key` (if the request has one):
/// the same key with the same request gets the first answer again, with
/// another request a 409. `what` tells creates of different kinds apart
/// (empty for runs, as keys were stored before there were others).
pub(super) async fn idempotent<Req, Res, Fut>(
    cp: &ControlPlane,
    caller: &Caller,
    tenant: Option<&str>,
    headers: &HeaderMap,
    what: &str,
    req: &Req,
    make: impl FnOnce() -> Fut,
) -> ApiResult<Response>
where
    Req: serde::Serialize,
    Res: serde::Serialize,
    Fut: std::future::Future<Output = ApiResult<Res>>,
{
    let key = match headers.get(IDEMPOTENCY_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ControlError::invalid("Idempotency-Key must be visible ASCII"))?
                .to_string(),
        ),
    };
    let Some(key) = key else {
        let result = make().await?;
        return Ok((StatusCode::CREATED, Json(result)).into_response());
    };
    if key.is_empty() || key.len() > 200 {
        return Err(ControlError::invalid("Idempotency-Key must be 1 to 200 characters").into());
    }
    // Keys live in the tenant the call acts for (checked first: a token
    // that acts for no tenant reaches no tenant's keys).
    let scope = cp.tenant_of(caller, tenant)?;
    let mut hashed = what.as_bytes().to_vec();
    hashed.extend(serde_json::to_vec(req).unwrap_or_default());
    let hash = hex::encode(Sha256::digest(&hashed));
    let store = cp.store();
    if !store
        .reserve_idempotency_key(&scope, &key, &hash)
        .await
        .map_err(ControlError::from)?
    {
        let Some((stored_hash, status, response)) = store
            .idempotent_response(&scope, &key)
            .await
            .map_err(ControlError::from)?
        else {
            return Err(ControlError::conflict(
                "the idempotency key was just released; send again",
            )
            .into());
        };
        if stored_hash != hash {
            return Err(ControlError::conflict(format!(
                "idempotency key {key:?} was used for a different request"
            ))
            .into());
        }
        if status == 0 {
            return Err(ControlError::conflict(format!(
                "a request with idempotency key {key:?} is in progress"
            ))
            .into());
        }
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        let body: serde_json::Value = serde_json::from_str(&response).unwrap_or_default();
        return Ok((status, Json(body)).into_response());
    }
    match make().await {
        Ok(result) => {
            let text = serde_json::to_string(&result).unwrap_or_default();
            store
                .complete_idempotency_key(&scope, &key, 201, &text)
                .await
                .map_err(ControlError::from)?;
            Ok((StatusCode::CREATED, Json(result)).into_response())
        }
        Err(e) => {
            let _ = store.release_idempotency_key(&scope, &key).await;
            Err(e)
        }
    }
}

async fn run(
    cp: &ControlPlane,
    caller: &Caller,
    tenant: Option<&str>,
    req: &RunInstancesRequest,
) -> ApiResult<RunInstancesResult> {
    let (op, instances) = cp.run_instances(caller, tenant, req).await?;
    Ok(RunInstancesResult {
        operation: op.id,
        instances: instances.into_iter().map(convert::instance).collect(),
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    state: Option<ObservedState>,
    /// `key=value[,key=value...]`: instances carrying every one.
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    page_size: Option<u32>,
    #[serde(default)]
    page_token: Option<String>,
}

#[utoipa::path(get, path = "/v1/instances",
    params(("tenant" = Option<String>, Query), ("host" = Option<String>, Query), ("state" = Option<String>, Query),
           ("tag" = Option<String>, Query, description = "key=value[,key=value]"),
           ("page_size" = Option<u32>, Query, description = "1 to 1000, default 100"), ("page_token" = Option<String>, Query)),
    responses((status = 200, body = Page<Instance>)))]
pub async fn list_instances(
    State(cp): State<ControlPlane>,
    caller: Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Page<Instance>>> {
    let q = query(q)?;
    let size = page_size(q.page_size)?;
    let mut tags = BTreeMap::new();
    for pair in q
        .tag
        .iter()
        .flat_map(|t| t.split(','))
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ControlError::invalid(format!("invalid tag filter {pair:?}: expected key=value"))
        })?;
        tags.insert(k.to_string(), v.to_string());
    }
    let filter = InstanceFilter {
        tenant_id: q.tenant,
        host: q.host,
        observed: q.state,
        tags,
        after: q.page_token,
        limit: size + 1,
    };
    let rows = cp.list_instances(&caller, filter).await?;
    Ok(Json(page_of(
        rows,
        size,
        |r| format!("{}:{}", r.name, r.id),
        convert::instance,
    )))
}

#[utoipa::path(get, path = "/v1/instances/{name}", responses((status = 200, body = Instance), (status = 404, body = flotilla_api::ErrorBody)))]
pub async fn get_instance(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<Json<Instance>> {
    let q = query(q)?;
    let row = cp.instance(&caller, q.tenant.as_deref(), &name).await?;
    let volumes = cp
        .store()
        .volume_names_of(&row.id)
        .await
        .map_err(ControlError::from)?;
    Ok(Json(flotilla_api::control::Instance {
        volumes,
        ..convert::instance(row)
    }))
}

#[utoipa::path(patch, path = "/v1/instances/{name}", request_body = UpdateInstanceRequest,
    responses((status = 200, body = Instance), (status = 400, body = flotilla_api::ErrorBody),
              (status = 404, body = flotilla_api::ErrorBody), (status = 409, body = flotilla_api::ErrorBody)))]
pub async fn update_instance(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
    req: Result<Json<UpdateInstanceRequest>, JsonRejection>,
) -> ApiResult<Json<Instance>> {
    let q = query(q)?;
    let req = body(req)?;
    let inst = cp
        .update_instance(&caller, q.tenant.as_deref(), &name, &req)
        .await?;
    Ok(Json(convert::instance(inst)))
}

async fn act(
    cp: ControlPlane,
    caller: Caller,
    name: String,
    q: Result<Query<TenantQuery>, QueryRejection>,
    input: OperationInput,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let q = query(q)?;
    let op = cp
        .act_on_instance(&caller, q.tenant.as_deref(), &name, input)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}

#[utoipa::path(delete, path = "/v1/instances/{name}", responses((status = 202, body = Operation)))]
pub async fn terminate_instance(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    act(cp, caller, name, q, OperationInput::Terminate).await
}

#[utoipa::path(post, path = "/v1/instances/{name}/start", responses((status = 202, body = Operation)))]
pub async fn start_instance(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    act(cp, caller, name, q, OperationInput::Start).await
}

#[utoipa::path(post, path = "/v1/instances/{name}/stop", responses((status = 202, body = Operation)))]
pub async fn stop_instance(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    act(cp, caller, name, q, OperationInput::Stop).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuspendQuery {
    /// For admin tokens: the tenant (id) to act for.
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    warm: bool,
}

impl SuspendQuery {
    fn input(&self) -> OperationInput {
        match self.warm {
            true => OperationInput::SuspendWarm,
            false => OperationInput::Suspend,
        }
    }
}

#[utoipa::path(post, path = "/v1/instances/{name}/suspend",
    params(("warm" = Option<bool>, Query, description = "then keep a QEMU waiting on the host for the resume (no guest memory): the resume skips QEMU's start")),
    responses((status = 202, body = Operation)))]
pub async fn suspend_instance(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<SuspendQuery>, QueryRejection>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let q = query(q)?;
    let op = cp
        .act_on_instance(&caller, q.tenant.as_deref(), &name, q.input())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}

#[utoipa::path(post, path = "/v1/instances/{name}/resume", responses((status = 202, body = Operation)))]
pub async fn resume_instance(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    act(cp, caller, name, q, OperationInput::Resume).await
}

// ---- snapshots ----

#[utoipa::path(post, path = "/v1/instances/{name}/snapshots", request_body = CreateSnapshotRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key gets the first answer again")),
    responses((status = 201, body = Snapshot), (status = 409, body = flotilla_api::ErrorBody)))]
pub async fn create_snapshot(
    State(cp): State<ControlPlane>,
    caller: Caller,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
    req: Result<Json<CreateSnapshotRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let req = body(req)?;
    let tenant = q.tenant.as_deref();
    let what = format!("snapshot {name}");
    idempotent(&cp, &caller, tenant, &headers, &what, &req, || async {
        let snap = cp.create_snapshot(&caller, tenant, &name, &req).await?;
        Ok(convert::snapshot(snap))
    })
    .await
}

/// A page of a tenant's resources listed by name (snapshots, volumes).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedPageQuery {
    #[serde(default)]
    pub(super) tenant: Option<String>,
    #[serde(default)]
    pub(super) page_size: Option<u32>,
    #[serde(default)]
    pub(super) page_token: Option<String>,
}

#[utoipa::path(get, path = "/v1/snapshots",
    params(("tenant" = Option<String>, Query),
           ("page_size" = Option<u32>, Query, description = "by name; 1 to 1000, default 100"),
           ("page_token" = Option<String>, Query)),
    responses((status = 200, body = Page<Snapshot>)))]
pub async fn list_snapshots(
    State(cp): State<ControlPlane>,
    caller: Caller,
    q: Result<Query<NamedPageQuery>, QueryRejection>,
) -> ApiResult<Json<Page<Snapshot>>> {
    let q = query(q)?;
    let size = page_size(q.page_size)?;
    let after = name_token(q.page_token.as_deref())?;
    let list = cp
        .list_snapshots(&caller, q.tenant.as_deref(), after, size + 1)
        .await?;
    Ok(Json(page_of(
        list,
        size,
        |s| format!("{}:{}", s.name, s.id),
        convert::snapshot,
    )))
}

#[utoipa::path(get, path = "/v1/snapshots/{name}", responses((status = 200, body = Snapshot),
    (status = 404, body = flotilla_api::ErrorBody)))]
pub async fn get_snapshot(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<Json<Snapshot>> {
    let q = query(q)?;
    let snap = cp.snapshot(&caller, q.tenant.as_deref(), &name).await?;
    Ok(Json(convert::snapshot(snap)))
}

#[utoipa::path(delete, path = "/v1/snapshots/{name}", responses((status = 204),
    (status = 409, body = flotilla_api::ErrorBody)))]
pub async fn delete_snapshot(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let q = query(q)?;
    cp.delete_snapshot(&caller, q.tenant.as_deref(), &name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/instances/{name}/clone", request_body = CloneInstanceRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key gets the first answer again")),
    responses((status = 201, body = RunInstancesResult), (status = 409, body = flotilla_api::ErrorBody)))]
pub async fn clone_instance(
    State(cp): State<ControlPlane>,
    caller: Caller,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
    req: Result<Json<CloneInstanceRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let req = body(req)?;
    let tenant = q.tenant.as_deref();
    let what = format!("clone {name}");
    idempotent(&cp, &caller, tenant, &headers, &what, &req, || async {
        let (op, inst) = cp.clone_instance(&caller, tenant, &name, &req).await?;
        Ok(RunInstancesResult {
            operation: op.id,
            instances: vec![convert::instance(inst)],
        })
    })
    .await
}

async fn fleet(
    cp: ControlPlane,
    caller: Caller,
    q: Result<Query<TenantQuery>, QueryRejection>,
    req: Result<Json<FleetSelector>, JsonRejection>,
    input: OperationInput,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let q = query(q)?;
    let selector = body(req)?;
    let op = cp
        .fleet_action(&caller, q.tenant.as_deref(), &selector, input)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}

#[utoipa::path(post, path = "/v1/fleet/suspend", request_body = FleetSelector,
    params(("warm" = Option<bool>, Query, description = "then keep a QEMU waiting for each resume")),
    responses((status = 202, body = Operation)))]
pub async fn fleet_suspend(
    State(cp): State<ControlPlane>,
    caller: Caller,
    q: Result<Query<SuspendQuery>, QueryRejection>,
    req: Result<Json<FleetSelector>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let q = query(q)?;
    let input = q.input();
    let tenant = TenantQuery { tenant: q.tenant };
    fleet(cp, caller, Ok(Query(tenant)), req, input).await
}

#[utoipa::path(post, path = "/v1/fleet/resume", request_body = FleetSelector, responses((status = 202, body = Operation)))]
pub async fn fleet_resume(
    State(cp): State<ControlPlane>,
    caller: Caller,
    q: Result<Query<TenantQuery>, QueryRejection>,
    req: Result<Json<FleetSelector>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    fleet(cp, caller, q, req, OperationInput::Resume).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecQuery {
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    stream: bool,
}

#[utoipa::path(post, path = "/v1/instances/{name}/exec", request_body = flotilla_api::ExecRequest,
    params(("stream" = Option<bool>, Query, description = "stream newline-delimited ExecEvent JSON"),
           ("tenant" = Option<String>, Query)),
    responses((status = 200, body = flotilla_api::ExecResult), (status = 404, body = flotilla_api::ErrorBody),
              (status = 409, body = flotilla_api::ErrorBody)))]
pub async fn exec_instance(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<ExecQuery>, QueryRejection>,
    req: Result<Json<flotilla_api::ExecRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let req = body(req)?;
    let (agent, vm) = cp.exec_target(&caller, q.tenant.as_deref(), &name).await?;
    let answer = cp
        .agents()
        .exec_raw(&agent, &vm, &req, q.stream)
        .await
        .map_err(|e| ControlError::new(flotilla_api::ErrorCode::Unavailable, e.to_string()))?;
    // The agent's answer as is: its status, its type, its (streamed) body.
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let body = axum::body::Body::from_stream(answer.bytes_stream());
    Ok((
        status,
        [(axum::http::header::CONTENT_TYPE, content_type)],
        body,
    )
        .into_response())
}

#[utoipa::path(post, path = "/v1/placement/explain", request_body = RunInstancesRequest,
    responses((status = 200, body = PlacementExplanation)))]
pub async fn explain(
    State(cp): State<ControlPlane>,
    caller: Caller,
    q: Result<Query<TenantQuery>, QueryRejection>,
    req: Result<Json<RunInstancesRequest>, JsonRejection>,
) -> ApiResult<Json<PlacementExplanation>> {
    let q = query(q)?;
    let req = body(req)?;
    Ok(Json(cp.explain(&caller, q.tenant.as_deref(), &req).await?))
}

// ---- policies ----

#[utoipa::path(get, path = "/v1/policies", params(("tenant" = Option<String>, Query)),
    responses((status = 200, body = Vec<Policy>)))]
pub async fn list_policies(
    State(cp): State<ControlPlane>,
    caller: Caller,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<Policy>>> {
    let q = query(q)?;
    let list = cp.list_policies(&caller, q.tenant.as_deref()).await?;
    Ok(Json(list.into_iter().map(convert::policy).collect()))
}

#[utoipa::path(put, path = "/v1/policies/{name}", request_body = PolicyDocument,
    params(("tenant" = Option<String>, Query, description = "admin: the tenant; none stores a global policy")),
    responses((status = 200, body = Policy), (status = 400, body = flotilla_api::ErrorBody)))]
pub async fn put_policy(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
    req: Result<Json<PolicyDocument>, JsonRejection>,
) -> ApiResult<Json<Policy>> {
    let q = query(q)?;
    let doc = body(req)?;
    Ok(Json(convert::policy(
        cp.put_policy(&caller, q.tenant.as_deref(), &name, &doc)
            .await?,
    )))
}

#[utoipa::path(delete, path = "/v1/policies/{name}", params(("tenant" = Option<String>, Query)),
    responses((status = 204, description = "removed")))]
pub async fn delete_policy(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let q = query(q)?;
    cp.delete_policy(&caller, q.tenant.as_deref(), &name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- operations ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsQuery {
    /// The page size (older name).
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    page_size: Option<u32>,
    #[serde(default)]
    page_token: Option<String>,
}

/// A page size given, 1 to 1000 (default 100).
/// A page of `size` from `rows` (read with a limit of `size + 1`): the
/// items, and the token of the next page (its last row's `key`) if more
/// rows follow.
pub(super) fn page_of<R, T>(
    mut rows: Vec<R>,
    size: u32,
    key: impl Fn(&R) -> String,
    item: impl Fn(R) -> T,
) -> Page<T> {
    let next_page_token = if rows.len() > size as usize {
        rows.truncate(size as usize);
        rows.last().map(key)
    } else {
        None
    };
    Page {
        items: rows.into_iter().map(item).collect(),
        next_page_token,
    }
}

/// A `NAME:ID` page token, as names-then-ids pages use.
pub(super) fn name_token(token: Option<&str>) -> ApiResult<Option<(&str, &str)>> {
    token
        .map(|t| {
            t.split_once(':')
                .ok_or_else(|| ControlError::invalid(format!("invalid page_token {t:?}")).into())
        })
        .transpose()
}

pub(super) fn page_size(size: Option<u32>) -> ApiResult<u32> {
    let size = size.unwrap_or(100);
    if !(1..=1000).contains(&size) {
        return Err(
            ControlError::invalid(format!("page_size {size} is out of range (1 to 1000)")).into(),
        );
    }
    Ok(size)
}

#[utoipa::path(get, path = "/v1/operations",
    params(("page_size" = Option<u32>, Query, description = "newest first; 1 to 1000, default 100"),
           ("page_token" = Option<String>, Query)),
    responses((status = 200, body = Page<Operation>)))]
pub async fn list_operations(
    State(cp): State<ControlPlane>,
    caller: Caller,
    q: Result<Query<OpsQuery>, QueryRejection>,
) -> ApiResult<Json<Page<Operation>>> {
    let q = query(q)?;
    let size = page_size(q.page_size.or(q.limit))?;
    let after = match &q.page_token {
        None => None,
        Some(t) => Some(
            t.split_once(':')
                .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id)))
                .ok_or_else(|| ControlError::invalid(format!("invalid page_token {t:?}")))?,
        ),
    };
    let ops = cp.list_operations(&caller, after, size + 1).await?;
    Ok(Json(page_of(
        ops,
        size,
        |o| format!("{}:{}", o.created_at, o.id),
        convert::operation,
    )))
}

#[utoipa::path(get, path = "/v1/operations/{id}", responses((status = 200, body = Operation)))]
pub async fn get_operation(
    State(cp): State<ControlPlane>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Operation>> {
    Ok(Json(convert::operation(cp.operation(&caller, &id).await?)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    /// The committed `docs/control-openapi.json` must match the code; run
    /// with `FLOTILLA_UPDATE_OPENAPI=1` to rewrite it after an API change.
    #[test]
    fn committed_openapi_document_matches_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../docs/control-openapi.json");
        let generated = serde_json::to_string_pretty(&super::openapi_document()).unwrap() + "\n";
        if std::env::var_os("FLOTILLA_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/control-openapi.json is out of date: run FLOTILLA_UPDATE_OPENAPI=1 cargo test -p flotilla-control openapi"
        );
    }
}

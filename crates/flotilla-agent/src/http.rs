//! The agent's HTTP/JSON API. Handlers only parse, validate and call the
//! [`VmManager`](crate::VmManager); errors become responses in one place
//! ([`error::ApiError`]).

mod error;
mod host;
mod images;
mod migrations;
mod openapi;
mod snapshots;
mod vms;
mod volumes;

use axum::routing::{get, post};
use axum::Router;

use crate::VmManager;

pub use error::ApiError;
pub use images::image_info;
pub use openapi::openapi_document;

/// The API's routes, ready to be served or called in tests without a socket.
pub fn router(manager: VmManager, token: crate::auth::TokenCheck) -> Router {
    Router::new()
        .route("/healthz", get(host::healthz))
        .route("/v1/host", get(host::host_info))
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/v1/images", get(images::list).post(images::register))
        .route("/v1/images/{name}", get(images::get).delete(images::remove))
        .route(
            "/v1/images/{name}/base-snapshot",
            post(images::base_snapshot),
        )
        .route("/v1/vms", get(vms::list).post(vms::create))
        .route("/v1/vms/{name}", get(vms::inspect).delete(vms::remove))
        .route("/v1/vms/{name}/start", post(vms::start))
        .route("/v1/vms/{name}/stop", post(vms::stop))
        .route("/v1/vms/{name}/exec", post(vms::exec))
        .route("/v1/fleet/suspend", post(vms::fleet_suspend))
        .route("/v1/fleet/resume", post(vms::fleet_resume))
        .route("/v1/vms/{name}/suspend", post(vms::suspend))
        .route("/v1/vms/{name}/resume", post(vms::resume))
        .route("/v1/vms/{name}/logs", get(vms::logs))
        .route("/v1/vms/{name}/migrate", post(migrations::migrate))
        .route("/v1/migrations", get(migrations::list))
        .route("/v1/migrations/incoming", post(migrations::incoming))
        .route(
            "/v1/migrations/{id}",
            get(migrations::inspect).delete(migrations::remove),
        )
        .route("/v1/migrations/{id}/cancel", post(migrations::cancel))
        .route(
            "/v1/migrations/{id}/switch-over",
            post(migrations::switch_over),
        )
        .route("/v1/migrations/{id}/recover", post(migrations::recover))
        .route("/v1/vms/{name}/clone", post(snapshots::clone_vm))
        .route("/v1/vms/{name}/move-disk", post(snapshots::move_disk))
        .route(
            "/v1/snapshots",
            get(snapshots::list).post(snapshots::create),
        )
        .route(
            "/v1/snapshots/{name}",
            get(snapshots::inspect).delete(snapshots::remove),
        )
        .route("/v1/volumes", get(volumes::list).post(volumes::create))
        .route(
            "/v1/volumes/{name}",
            get(volumes::inspect).delete(volumes::remove),
        )
        .fallback(error::no_such_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(manager)
        .layer(axum::middleware::from_fn_with_state(
            token,
            crate::auth::require_token,
        ))
}

//! The OpenAPI document, generated from the handlers and the API types so it
//! cannot drift from the code.

use axum::Json;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Flotilla host agent API",
        description = "VMs of one host: lifecycle, exec, console, images, snapshots, volumes, live migration."
    ),
    paths(
        super::host::host_info,
        super::images::list,
        super::images::get,
        super::images::register,
        super::images::remove,
        super::images::base_snapshot,
        super::vms::list,
        super::vms::create,
        super::vms::inspect,
        super::vms::remove,
        super::vms::start,
        super::vms::stop,
        super::vms::exec,
        super::vms::suspend,
        super::vms::fleet_suspend,
        super::vms::fleet_resume,
        super::vms::resume,
        super::vms::logs,
        super::snapshots::clone_vm,
        super::snapshots::move_disk,
        super::snapshots::list,
        super::snapshots::create,
        super::snapshots::inspect,
        super::snapshots::remove,
        super::migrations::migrate,
        super::migrations::list,
        super::migrations::inspect,
        super::migrations::cancel,
        super::migrations::incoming,
        super::migrations::switch_over,
        super::migrations::recover,
        super::migrations::remove,
        super::volumes::list,
        super::volumes::create,
        super::volumes::inspect,
        super::volumes::remove,
    ),
    components(schemas(
        flotilla_api::VmInfo,
        flotilla_api::VmState,
        flotilla_api::CreateVmRequest,
        flotilla_api::DiskSpec,
        flotilla_api::CreateVolumeRequest,
        flotilla_api::VolumeInfo,
        flotilla_api::NicInfo,
        flotilla_api::DiskInfo,
        flotilla_api::GuestInfo,
        flotilla_api::FleetRequest,
        flotilla_api::FleetResult,
        flotilla_api::FleetItem,
        flotilla_api::StopVmRequest,
        flotilla_api::ExecRequest,
        flotilla_api::ExecResult,
        flotilla_api::ExecEvent,
        flotilla_api::ImageInfo,
        flotilla_api::RegisterImageRequest,
        flotilla_api::HostInfo,
        flotilla_api::Resources,
        flotilla_api::DiskSpace,
        flotilla_api::ErrorBody,
        flotilla_api::ErrorDetail,
        flotilla_api::ErrorCode,
        flotilla_api::SnapshotInfo,
        flotilla_api::SnapshotKind,
        flotilla_api::CreateSnapshotRequest,
        flotilla_api::SnapshotCreated,
        flotilla_api::CloneVmRequest,
        flotilla_api::CloneDisk,
        flotilla_api::CloneResult,
        flotilla_api::MoveDiskRequest,
        flotilla_api::BaseSnapshotRequest,
        flotilla_api::migration::MigrateVmRequest,
        flotilla_api::migration::MigratingVm,
        flotilla_api::migration::MigratingNic,
        flotilla_api::migration::MigratingDisk,
        flotilla_api::migration::IncomingMigrationRequest,
        flotilla_api::migration::IncomingMigrationReady,
        flotilla_api::migration::MigrationInfo,
        flotilla_api::migration::MigrationPhase,
        flotilla_api::migration::MigrationRole,
    ))
)]
struct ApiDoc;

pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi_document())
}

#[cfg(test)]
mod tests {
    /// The committed `docs/agent-openapi.json` must match the code; run with
    /// `FLOTILLA_UPDATE_OPENAPI=1` to rewrite it after an API change.
    #[test]
    fn committed_document_matches_the_code() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/agent-openapi.json");
        let generated = serde_json::to_string_pretty(&super::openapi_document()).unwrap() + "\n";
        if std::env::var_os("FLOTILLA_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/agent-openapi.json is out of date: run FLOTILLA_UPDATE_OPENAPI=1 cargo test -p flotilla-agent openapi"
        );
    }

    #[test]
    fn document_lists_every_vm_route() {
        let doc = serde_json::to_value(super::openapi_document()).unwrap();
        for p in [
            "/v1/vms",
            "/v1/vms/{name}",
            "/v1/vms/{name}/exec",
            "/v1/vms/{name}/logs",
            "/v1/images",
        ] {
            assert!(doc["paths"].get(p).is_some(), "missing {p}");
        }
    }
}

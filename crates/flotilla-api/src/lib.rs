//! Flotilla's REST resource types: the JSON bodies that the host agent serves
//! and the CLI (and later the control plane) sends and reads.
//!
//! This crate is the one place that defines the wire shape of a VM, an image,
//! an exec request and an error. It has no logic beyond defaults and
//! validation of field syntax, so every front end can share it.

pub mod control;
pub mod error;
pub mod exec;
pub mod fleet;
pub mod host;
#[cfg(feature = "axum")]
pub mod http;
pub mod image;
pub mod migration;
pub mod net;
pub mod snapshot;
pub mod vm;
pub mod volume;

pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use exec::{ExecEvent, ExecRequest, ExecResult};
pub use fleet::{FleetItem, FleetRequest, FleetResult};
pub use host::{DiskSpace, HostInfo, Resources};
pub use image::{ImageInfo, RegisterImageRequest};
pub use snapshot::{
    BaseSnapshotRequest, CloneDisk, CloneResult, CloneVmRequest, CreateSnapshotRequest,
    MoveDiskRequest, SnapshotCreated, SnapshotInfo, SnapshotKind,
};
pub use vm::{
    CreateVmRequest, DiskInfo, DiskSpec, GuestInfo, NicInfo, StopVmRequest, VmInfo, VmState,
};
pub use volume::{CreateVolumeRequest, VolumeInfo};

/// Version prefix of every REST path.
pub const API_PREFIX: &str = "/v1";

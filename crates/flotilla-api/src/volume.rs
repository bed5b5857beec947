//! Volumes: data disks that belong to the host rather than to a VM. A
//! volume is made empty, attached to one VM at a time as one of its disks
//! (`DiskSpec::volume`), and outlives the VMs it was attached to.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// Unique on the host: `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    pub size_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size_mib: u64,
    /// What it takes on the host's disk now (it grows as it is written).
    pub allocated_mib: u64,
    pub path: String,
    /// The VM it is attached to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<String>,
}

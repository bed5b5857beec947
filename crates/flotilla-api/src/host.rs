//! What a host agent reports about its host.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// The disk space of a host's data directory, in MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskSpace {
    /// What VMs' disks and snapshots may take in all (the file system's
    /// size unless the agent was given less).
    pub capacity_mib: u64,
    /// Free on the file system now.
    pub free_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    pub hostname: String,
    pub agent_version: String,
    pub qemu_version: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Why that accelerator was chosen.
    pub accel_reason: String,
    pub capacity: Resources,
    /// Held by VMs that are running or starting.
    pub allocated: Resources,
    pub bridge: String,
    /// The host's VM subnet in CIDR form; the bridge holds its first address.
    pub subnet: String,
    pub vm_count: usize,
    pub data_dir: String,
    /// SHA-256 of the certificate the API is served with (HTTPS), which
    /// clients pin; none when it is served over plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
    /// Whether VMs of different network groups (tenants) are kept apart
    /// (needs nftables on the host).
    #[serde(default)]
    pub network_isolation: bool,
    /// The data directory's disk space (none if it cannot be measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskSpace>,
}

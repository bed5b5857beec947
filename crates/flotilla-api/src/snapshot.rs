//! Snapshots (layers of a VM's memory and disk) and clones of running VMs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::VmInfo;

/// Why a snapshot layer exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    /// An image booted to guest-agent ready, once per image and VM shape:
    /// what `vm run --from-snapshot` starts from and first snapshots diff against.
    Base,
    /// Written by a suspend: where a suspended VM lives.
    Suspend,
    /// Taken on request (`snapshot create`), with a name.
    Named,
    /// Taken from a running VM to start a clone from.
    Clone,
}

/// One stored snapshot layer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    pub id: String,
    /// Set for named snapshots.
    pub name: Option<String>,
    pub kind: SnapshotKind,
    /// The layer this one is a diff against.
    pub parent: Option<String>,
    /// The VM it was taken from.
    pub vm: Option<String>,
    pub image: Option<String>,
    pub created_at: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// Bytes of memory pages this layer stores (changes against its parent).
    pub stored_bytes: u64,
    /// Size of this layer's disk file (the disk's changes against its parent).
    pub disk_bytes: u64,
    /// Layers from the root of the chain to this one, inclusive.
    pub chain_length: usize,
    /// What keeps the layer: `vm:NAME`, `snapshot:NAME`, `base:KEY`.
    pub used_by: Vec<String>,
    /// Layers that are diffs against this one.
    pub children: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// The VM to snapshot: running (paused briefly, then it runs on) or suspended.
    pub vm: String,
    /// Unique among snapshots: `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotCreated {
    pub snapshot: SnapshotInfo,
    /// How long the VM was paused (absent for a suspended VM).
    pub pause_ms: Option<u64>,
}

/// How a clone gets its root disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CloneDisk {
    /// Its own copy-on-write volume on the source's disk as it was at the
    /// clone: writes stay in the clone.
    #[default]
    Cow,
    /// Attached read-only to the source's volume as it was at the clone: the
    /// guest's writes to its root disk fail; for clones that only read.
    ReadOnly,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneVmRequest {
    /// The new VM's name.
    pub name: String,
    #[serde(default)]
    pub disk: CloneDisk,
    /// Tags of the clone (default: the source's).
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CloneResult {
    pub vm: VmInfo,
    /// The snapshot layer the clone started from.
    pub snapshot: String,
    /// How long the source was paused (0 when it was suspended).
    pub source_pause_ms: u64,
    /// From the request until the clone's guest agent answered.
    pub total_ms: u64,
}

/// Moves a VM's root disk into a volume of its own.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveDiskRequest {
    /// Volume (a directory in the agent's data dir): `default` when absent.
    #[serde(default)]
    pub volume: Option<String>,
}

/// The VM shape an image's base snapshot is made for; each field defaults
/// as in a VM create.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BaseSnapshotRequest {
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub nics: Option<u32>,
}

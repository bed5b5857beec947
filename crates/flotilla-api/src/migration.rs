//! Live migration of a VM from one host's agent to another's. The source
//! agent drives it: it asks the target to prepare, streams memory, switches
//! over, and waits for the target's disk sync before it lets go.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/vms/{name}/migrate` on the source host's agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVmRequest {
    /// The target agent's API, e.g. `http://10.0.0.6:7777`.
    pub target: String,
    /// The target agent's API token.
    #[serde(default)]
    pub target_token: Option<String>,
    /// SHA-256 of the target agent's TLS certificate (needed for an
    /// `https://` target: the certificate is pinned).
    #[serde(default)]
    pub target_fingerprint: Option<String>,
    /// The longest guest pause to plan for at the switch-over (30 ms when
    /// not given; QEMU's own default is 300 ms).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Memory stream bandwidth limit in MiB/s (none when not given).
    #[serde(default)]
    pub max_bandwidth_mibps: Option<u64>,
    /// Bandwidth limit of the disk copy after the switch-over, in MiB/s
    /// (unlimited when not given): a slow link is left room for the VM.
    #[serde(default)]
    pub disk_sync_mibps: Option<u64>,
    /// What to do when the pre-copy is predicted not to converge.
    #[serde(default)]
    pub on_no_convergence: ConvergencePolicy,
    /// Encrypt the memory stream and the disk exports with TLS (a key made
    /// for this migration alone). Turn off only on a migration network
    /// that is trusted: TLS costs CPU time, and under TCG a longer pause.
    #[serde(default = "encrypted_by_default")]
    pub tls: bool,
}

fn encrypted_by_default() -> bool {
    true
}

fn at_most_one(n: &u32) -> bool {
    *n <= 1
}

/// How a migration is to go, as a control plane asks for it (the same
/// fields as in [`MigrateVmRequest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationOptions {
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    #[serde(default)]
    pub max_bandwidth_mibps: Option<u64>,
    #[serde(default)]
    pub disk_sync_mibps: Option<u64>,
    #[serde(default)]
    pub on_no_convergence: ConvergencePolicy,
    #[serde(default = "encrypted_by_default")]
    pub tls: bool,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            max_downtime_ms: None,
            max_bandwidth_mibps: None,
            disk_sync_mibps: None,
            on_no_convergence: ConvergencePolicy::default(),
            tls: true,
        }
    }
}

impl MigrateVmRequest {
    /// A request to move a VM to the agent at `target` (with its token and
    /// certificate fingerprint) with `options`.
    pub fn new(
        target: String,
        target_token: Option<String>,
        target_fingerprint: Option<String>,
        options: MigrationOptions,
    ) -> Self {
        MigrateVmRequest {
            target,
            target_token,
            target_fingerprint,
            max_downtime_ms: options.max_downtime_ms,
            max_bandwidth_mibps: options.max_bandwidth_mibps,
            disk_sync_mibps: options.disk_sync_mibps,
            on_no_convergence: options.on_no_convergence,
            tls: options.tls,
        }
    }
}

/// What a migration does when its pre-copy will not converge within the
/// pause allowed (the guest dirties memory about as fast as it is sent).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConvergencePolicy {
    /// Slow the guest's vCPUs down step by step (QEMU's auto-converge)
    /// until it converges; cancel if even the strongest throttle does not.
    #[default]
    AutoConverge,
    /// Cancel at once: the VM runs on where it was.
    Cancel,
    /// Switch to post-copy: the VM continues on the target at once and
    /// fetches the pages it has not received from the source as it touches
    /// them, while the source sends the rest. It always converges, but
    /// from the switch until the last page has arrived the VM needs both
    /// hosts: losing either loses the VM.
    PostCopy,
}

/// A VM as the target must recreate it: its identity and shape.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigratingVm {
    pub id: String,
    pub name: String,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cmdline_extra: String,
    pub tags: std::collections::BTreeMap<String, String>,
    pub machine_id: Option<String>,
    pub created_at: String,
    pub nics: Vec<MigratingNic>,
    pub disks: Vec<MigratingDisk>,
    /// SHA-256 of the kernel (and initramfs) the VM runs: the target's image
    /// must have the same, for the VM's next boot.
    pub kernel_sha256: String,
    #[serde(default)]
    pub initrd_sha256: Option<String>,
    /// The accelerator and QEMU version it runs under: the target's must
    /// match (device state is only portable between alike QEMUs).
    pub accel: String,
    pub qemu_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigratingNic {
    pub mac: String,
    pub ip: String,
    pub prefix_len: u8,
    pub gateway: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigratingDisk {
    pub name: String,
    pub format: String,
    pub size_mib: u64,
    /// The exact virtual size: the target's disk must be no smaller.
    pub size_bytes: u64,
    pub read_only: bool,
    /// Where the source exports the disk until the target has it all.
    pub nbd_host: String,
    pub nbd_port: u16,
    pub nbd_export: String,
    /// The disk is an overlay over its image's root disk, also exported as
    /// its own bytes: a target with the same base copies only the overlay.
    #[serde(default)]
    pub layer: Option<MigratingLayer>,
    /// The disk is the source host's volume of this name: it becomes the
    /// target's volume of the same name once synced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

/// A disk's own clusters, exported apart from its base.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigratingLayer {
    /// Export (on the same server) of the overlay's qcow2 bytes.
    pub nbd_export: String,
    /// SHA-256 of the base image file under it.
    pub base_sha256: String,
}

/// `POST /v1/migrations/incoming` on the target: make a QEMU ready to
/// receive the VM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingMigrationRequest {
    pub id: String,
    /// The source agent's API, for the record.
    pub source: String,
    pub vm: MigratingVm,
    /// Bytes per second the disk copy may use (unlimited when not given).
    #[serde(default)]
    pub disk_sync_bps: Option<u64>,
    /// The pre-shared key (hex) the stream and the disk exports use for
    /// TLS; made by the source for this migration alone.
    #[serde(default)]
    pub tls_psk: Option<String>,
    /// The stream may switch to post-copy (both QEMUs must allow it).
    #[serde(default)]
    pub post_copy: bool,
    /// Connections the memory stream comes over (QEMU's multifd when more
    /// than one, at most 16; 0, from an older source, is one). Left out
    /// when one, so an older target takes such a request.
    #[serde(default, skip_serializing_if = "at_most_one")]
    pub stream_channels: u32,
    /// The memory stream comes in the clear from QEMU to the source's
    /// agent, which carries it here over TLS to this agent's certificate,
    /// each connection opening with the first 32 bytes of `tls_psk`
    /// (required with it). Left out when false, so an older target takes
    /// such a request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream_tunnel: bool,
}

/// The target's answer: where its QEMU listens for the memory stream.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IncomingMigrationReady {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MigrationRole {
    Source,
    Target,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// The target is being prepared.
    Preparing,
    /// Memory is copied while the VM runs on the source.
    PreCopy,
    /// The VM runs on the target, which copies the rest of the disks.
    DiskSync,
    /// The VM runs on the target alone; the source let go.
    Completed,
    /// Stopped on request; the VM runs on the source.
    Cancelled,
    /// Failed; the VM runs where `error` says.
    Failed,
}

impl MigrationPhase {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Cancelled | MigrationPhase::Failed
        )
    }
}

/// A migration as one agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct MigrationInfo {
    pub id: String,
    pub vm: String,
    pub role: MigrationRole,
    /// The other agent's API.
    pub peer: String,
    pub phase: MigrationPhase,
    /// RFC 3339.
    pub started_at: String,
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Memory stream: bytes sent (source) and left, rounds over memory,
    /// pages dirtied per second, the pause QEMU expects, and the pause it
    /// had at the switch-over.
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub transferred_bytes: u64,
    #[serde(default)]
    pub remaining_bytes: u64,
    #[serde(default)]
    pub rounds: u64,
    #[serde(default)]
    pub dirty_pages_rate: u64,
    #[serde(default)]
    pub expected_downtime_ms: Option<u64>,
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Why the pre-copy was predicted not to converge, when it was.
    #[serde(default)]
    pub prediction: Option<String>,
    /// How much the guest's vCPUs are throttled (auto-converge), percent.
    #[serde(default)]
    pub throttle_percent: Option<u64>,
    /// Disk sync on the target: bytes done of the disks' total.
    #[serde(default)]
    pub disk_synced_bytes: u64,
    /// The disk copy's bandwidth limit, bytes per second.
    #[serde(default)]
    pub disk_sync_limit_bps: Option<u64>,
    /// Whether the stream and the disk exports use TLS.
    #[serde(default = "encrypted_by_default")]
    pub tls: bool,
    /// Whether memory switched to post-copy (the VM ran on the target
    /// while the source still sent pages).
    #[serde(default)]
    pub post_copy: bool,
    #[serde(default)]
    pub disk_total_bytes: u64,
    /// Milliseconds from the start to the switch-over, and to the end.
    #[serde(default)]
    pub switch_over_ms: Option<u64>,
    #[serde(default)]
    pub total_ms: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stream_channels: u32, stream_tunnel: bool) -> serde_json::Value {
        let vm: MigratingVm = serde_json::from_value(serde_json::json!({
            "id": "0123456789abcdef", "name": "vm", "image": "default", "vcpus": 1,
            "memory_mib": 256, "cmdline_extra": "", "tags": {}, "machine_id": null,
            "created_at": "2026-11-29T00:00:00Z", "nics": [], "disks": [],
            "kernel_sha256": "00", "initrd_sha256": null, "accel": "tcg",
            "qemu_version": "10.0.2"
        }))
        .expect("a migrating VM");
        serde_json::to_value(IncomingMigrationRequest {
            id: "m-0123456789abcdef".into(),
            source: "https://10.0.0.5:7777".into(),
            vm,
            disk_sync_bps: None,
            tls_psk: None,
            post_copy: false,
            stream_channels,
            stream_tunnel,
        })
        .expect("json")
    }

    #[test]
    fn one_stream_connection_is_left_out_for_older_targets() {
        assert!(request(1, false).get("stream_channels").is_none());
        assert!(request(0, false).get("stream_channels").is_none());
        assert_eq!(request(2, false)["stream_channels"], 2);
    }

    #[test]
    fn an_untunnelled_stream_is_left_out_for_older_targets() {
        assert!(request(2, false).get("stream_tunnel").is_none());
        assert_eq!(request(2, true)["stream_tunnel"], true);
    }
}

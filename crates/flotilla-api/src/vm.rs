//! Virtual machines: the create request, the VM's description and its states.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 256;
pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_VCPUS: u32 = 64;

/// The life of a VM on a host.
///
/// `Crashed` means QEMU went away without being asked to; the VM's disk and
/// record are kept so it can be started again or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Creating,
    Starting,
    Running,
    Stopping,
    Stopped,
    Crashed,
    /// Its state is being written to a snapshot; it takes no new work.
    Suspending,
    /// Its memory and disk are in a snapshot; no QEMU runs.
    Suspended,
    /// Being brought back from its snapshot.
    Resuming,
    /// Running here while it is live-migrated to another host.
    Migrating,
    /// A QEMU on this host receiving a VM live-migrated from another host.
    Incoming,
}

impl VmState {
    /// Every state, for exhaustive tests and docs.
    pub const ALL: [VmState; 11] = [
        VmState::Creating,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Crashed,
        VmState::Suspending,
        VmState::Suspended,
        VmState::Resuming,
        VmState::Migrating,
        VmState::Incoming,
    ];

    /// Whether a VM may move from `self` to `next`. Every state change on a
    /// host goes through this check.
    pub fn can_transition_to(self, next: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, next),
            (Creating, Starting)
                | (Creating, Stopped)
                | (Starting, Running)
                | (Starting, Stopping)
                | (Starting, Crashed)
                | (Starting, Stopped)
                | (Running, Stopping)
                | (Running, Crashed)
                | (Running, Stopped)
                | (Stopping, Stopped)
                | (Stopping, Crashed)
                | (Stopped, Starting)
                | (Crashed, Starting)
                | (Crashed, Stopped)
                | (Running, Suspending)
                // Done, rolled back, or QEMU died half way.
                | (Suspending, Suspended)
                | (Suspending, Running)
                | (Suspending, Crashed)
                | (Suspended, Resuming)
                | (Resuming, Running)
                | (Resuming, Suspended)
                // Cancelled or failed (it runs on here), or QEMU died; a
                // VM that left is removed, not moved to a state.
                | (Running, Migrating)
                | (Migrating, Running)
                | (Migrating, Crashed)
                | (Creating, Incoming)
                | (Incoming, Running)
                | (Incoming, Crashed)
                // Gone to the other host, about to be removed here.
                | (Migrating, Stopped)
                | (Incoming, Stopped)
        )
    }

    /// A VM in this state holds its vCPUs and memory on the host.
    pub fn holds_resources(self) -> bool {
        matches!(
            self,
            VmState::Creating
                | VmState::Starting
                | VmState::Running
                | VmState::Stopping
                | VmState::Suspending
                | VmState::Resuming
                | VmState::Migrating
                | VmState::Incoming
        )
    }

    /// QEMU may be running for a VM in this state.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Stopping
                | VmState::Suspending
                | VmState::Resuming
                | VmState::Migrating
                | VmState::Incoming
        )
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            VmState::Creating => "creating",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Suspending => "suspending",
            VmState::Suspended => "suspended",
            VmState::Resuming => "resuming",
            VmState::Migrating => "migrating",
            VmState::Incoming => "incoming",
        };
        f.write_str(s)
    }
}

/// An extra data disk: a new empty one of `size_mib`, the VM's own, or
/// the host's volume `volume`, attached as it is and kept when the VM goes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// A short name, unique within the VM (`[a-z0-9-]`, up to 16 characters).
    pub name: String,
    /// Size of a new disk; absent with `volume`.
    #[serde(default)]
    pub size_mib: u64,
    /// A volume of the host (`flotilla volume create`), attached to no
    /// other VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// Unique on the host: `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// Image name; the host's default image when absent.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Appended to the kernel command line.
    #[serde(default)]
    pub cmdline_extra: Option<String>,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Number of NICs on the host bridge (default 1, at most 4).
    #[serde(default)]
    pub nics: Option<u32>,
    /// The first NIC's address, in the host's VM subnet (default: the next
    /// free one). A control plane hands out addresses unique across hosts.
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Start the VM right away (default true).
    #[serde(default)]
    pub start: Option<bool>,
    /// Answer only once the guest agent is ready (default false).
    #[serde(default)]
    pub wait_ready: Option<bool>,
    /// Start from a snapshot instead of booting: `base` for the image's base
    /// snapshot (made on first use for this image and shape), or the name
    /// or id of a snapshot. The VM gets its own identity (MAC, IP,
    /// hostname, machine-id, a reseeded RNG) from its guest agent, so the
    /// answer always comes once the guest agent is ready (`wait_ready` is
    /// implied); `start: false` leaves it suspended at the snapshot.
    #[serde(default)]
    pub from_snapshot: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopVmRequest {
    /// How long to wait for the guest to shut down before killing QEMU.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Kill QEMU at once.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct NicInfo {
    pub mac: String,
    pub ip: String,
    pub prefix_len: u8,
    pub gateway: String,
    pub tap: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct DiskInfo {
    pub name: String,
    pub path: String,
    pub format: String,
    pub virtual_size_mib: u64,
    /// The read-only image this disk is an overlay of.
    pub backing: Option<String>,
    /// The host's volume this disk is (kept when the VM is removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    pub name: String,
    pub id: String,
    pub state: VmState,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub tags: BTreeMap<String, String>,
    pub nics: Vec<NicInfo>,
    pub disks: Vec<DiskInfo>,
    pub created_at: String,
    pub started_at: Option<String>,
    /// QEMU's process id while it runs.
    pub pid: Option<i32>,
    /// QEMU's own run state (`running`, `paused`, ...), asked over QMP.
    pub qemu_status: Option<String>,
    /// `kvm` or `tcg`, for the current or last run.
    pub accel: Option<String>,
    /// Whether the guest agent answered since the last start.
    pub guest_ready: bool,
    /// Guest uptime when its agent became ready (the guest's boot time).
    pub guest_boot_ms: Option<u64>,
    /// From the last start or resume request to the guest agent's first
    /// answer, seen by the host.
    pub ready_ms: Option<u64>,
    /// Why the VM last failed or crashed.
    pub last_error: Option<String>,
    /// The snapshot layer the VM was last suspended to (the head of its chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Suspended with a QEMU waiting for its resume (a warm suspend; true
    /// once that QEMU has started, shortly after the suspend answered): the
    /// resume only loads the state into it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm: bool,
    /// What the guest agent reports, asked live by `inspect` (absent in lists
    /// and while the guest is not ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInfo>,
}

/// The guest's own view of itself, from its agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct GuestInfo {
    pub kernel_release: String,
    pub kernel_version: String,
    pub hostname: String,
    pub uptime_ms: u64,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    /// `interface address/prefix`, e.g. `eth0 10.77.0.2/24`.
    pub addresses: Vec<String>,
    pub machine_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition_is_decided_and_no_state_loops_to_itself() {
        for a in VmState::ALL {
            assert!(!a.can_transition_to(a), "{a} -> {a}");
        }
        assert!(VmState::Running.can_transition_to(VmState::Crashed));
        assert!(!VmState::Stopped.can_transition_to(VmState::Running));
        assert!(!VmState::Crashed.can_transition_to(VmState::Running));
    }

    #[test]
    fn a_suspended_vm_holds_no_process_and_comes_back_only_by_resuming() {
        let s = VmState::Suspended;
        assert!(!s.has_process() && !s.holds_resources());
        let next: Vec<_> = VmState::ALL
            .into_iter()
            .filter(|n| s.can_transition_to(*n))
            .collect();
        assert_eq!(next, vec![VmState::Resuming]);
        assert!(
            VmState::Suspending.can_transition_to(VmState::Running),
            "rollback"
        );
    }

    #[test]
    fn every_state_can_reach_stopped() {
        for s in VmState::ALL {
            let mut seen = vec![s];
            let mut frontier = vec![s];
            while let Some(x) = frontier.pop() {
                for y in VmState::ALL {
                    if x.can_transition_to(y) && !seen.contains(&y) {
                        seen.push(y);
                        frontier.push(y);
                    }
                }
            }
            // A suspended VM leaves that state by being resumed or removed.
            assert!(
                seen.contains(&VmState::Stopped) || seen.contains(&VmState::Suspended),
                "{s} cannot reach stopped"
            );
        }
    }

    #[test]
    fn create_request_rejects_unknown_fields() {
        let err = serde_json::from_str::<CreateVmRequest>(r#"{"name":"a","memroy_mib":5}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("memroy_mib"), "{err}");
    }
}

//! The host agent's configuration: where it keeps its state, how it reaches
//! QEMU, its network and its capacity.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use flotilla_api::Resources;
use flotilla_qemu::AccelChoice;

use crate::network::Subnet;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// VM records, disks, sockets and images live under here.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Serve the API over HTTPS with the agent's own certificate (made on
    /// first start under `tls/`); plain HTTP only on a trusted network.
    pub tls: bool,
    /// SHA-256 of the certificate served, once the agent has loaded it.
    pub tls_fingerprint: Option<String>,
    pub qemu_binary: PathBuf,
    pub accel: AccelChoice,
    /// Where `auto` remembers its KVM probe's decision for the rest of the
    /// host's boot, so later starts skip the probe; `None` probes each time.
    pub accel_probe_cache: Option<PathBuf>,
    /// The host bridge every VM NIC joins.
    pub bridge: String,
    /// The VM subnet; the bridge takes its first host address.
    pub subnet: Subnet,
    pub capacity: Resources,
    /// How long a start waits for the guest agent when asked to wait.
    pub ready_timeout: Duration,
    /// Default grace period of a graceful stop before QEMU is killed.
    pub stop_timeout: Duration,
    /// Where other hosts reach this one's migration streams and disk
    /// exports (default: the API's listen address, unless that is 0.0.0.0).
    pub migration_address: Option<std::net::IpAddr>,
    /// Migrations this host takes part in at once, as source or target.
    pub max_migrations: usize,
    /// How long this host forwards a VM's address to the host it moved to.
    pub forward_moved_for: Duration,
    /// The control plane to heartbeat to, if any.
    pub control: Option<crate::control_link::ControlLink>,
    /// How a resume or a start from a snapshot brings back guest memory.
    pub restore_memory: RestoreMemory,
    /// Warm suspends' standby QEMUs kept at once (the oldest goes first).
    pub max_standbys: usize,
    /// Disk space VMs may take in all, reported to a control plane for
    /// placement (default: the data directory's file system size).
    pub disk_capacity_mib: Option<u64>,
    /// Whether guest memory may take transparent huge pages.
    pub guest_huge_pages: GuestHugePages,
}

/// Whether guest memory may take transparent huge pages (see
/// [`flotilla_qemu::QemuConfig::huge_pages`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GuestHugePages {
    /// Yes, except for a QEMU that receives a live migration under TCG:
    /// there each page that arrives made the kernel zero the 2 MiB around
    /// it, the loader fell behind the stream and the guest's pause grew by
    /// up to 60 ms. That QEMU keeps running the VM without them until the
    /// VM's next start or resume (its saves and outgoing streams are then
    /// slower: memory the guest never touched is read 4 KiB fault by fault,
    /// which is why they are not off everywhere).
    #[default]
    Auto,
    On,
    Off,
}

impl GuestHugePages {
    /// Whether a QEMU under `accel` gets them; `receiving` a migration.
    pub fn enabled(self, accel: flotilla_qemu::Accel, receiving: bool) -> bool {
        match self {
            GuestHugePages::Auto => accel == flotilla_qemu::Accel::Kvm || !receiving,
            GuestHugePages::On => true,
            GuestHugePages::Off => false,
        }
    }
}

/// How guest memory comes back from a snapshot's memory image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RestoreMemory {
    /// QEMU reads it all into the VM's own memory before the VM runs: the
    /// fastest resume and suspend.
    #[default]
    Load,
    /// The image is mapped copy-on-write as guest memory: pages the guest
    /// only reads stay page cache, shared by every VM mapping the same image
    /// (VMs started from one base snapshot) and reclaimable, so a VM holds
    /// about a third of the private memory; its suspends are slower (the
    /// save reads the whole mapping through the page cache).
    Map,
}

impl AgentConfig {
    /// Defaults for a single host: data under `data_dir`, API on loopback.
    pub fn with_defaults(data_dir: PathBuf) -> Self {
        AgentConfig {
            data_dir,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 7777)),
            tls: true,
            tls_fingerprint: None,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel: AccelChoice::Auto,
            accel_probe_cache: Some(PathBuf::from(flotilla_qemu::DEFAULT_PROBE_CACHE)),
            bridge: "flbr0".to_string(),
            subnet: Subnet::new(Ipv4Addr::new(10, 77, 0, 0), 24),
            capacity: default_capacity(),
            ready_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(10),
            migration_address: None,
            max_migrations: crate::manager::migrate::DEFAULT_MAX_MIGRATIONS,
            forward_moved_for: crate::routes::DEFAULT_FORWARD_FOR,
            control: None,
            restore_memory: RestoreMemory::Load,
            max_standbys: crate::manager::DEFAULT_MAX_STANDBYS,
            disk_capacity_mib: None,
            guest_huge_pages: GuestHugePages::Auto,
        }
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.data_dir.join("vms")
    }

    /// Short paths for QEMU's unix sockets (a socket path is limited to 108 bytes).
    pub fn sockets_dir(&self) -> PathBuf {
        self.data_dir.join("sock")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.data_dir.join("snapshots")
    }

    /// The host's volumes (data disks that outlive VMs). Not `volumes/`:
    /// that holds root disks moved out of their VMs' directories.
    pub fn data_volumes_dir(&self) -> PathBuf {
        self.data_dir.join("data-volumes")
    }

    /// The API's TLS certificate and key.
    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    /// `https` or `http`, as the API is served.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// vCPUs overcommitted on host CPUs by this factor by default: microVMs are
/// mostly idle, and a vCPU is only a thread.
pub const DEFAULT_VCPU_OVERCOMMIT: u32 = 16;

/// Host CPUs times [`DEFAULT_VCPU_OVERCOMMIT`], and host memory less 1 GiB
/// for the host itself (memory is not overcommitted).
pub fn default_capacity() -> Resources {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let vcpus = cpus * DEFAULT_VCPU_OVERCOMMIT;
    let memory_mib = host_memory_mib().saturating_sub(1024).max(256);
    Resources { vcpus, memory_mib }
}

fn host_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::GuestHugePages;
    use flotilla_qemu::Accel;

    #[test]
    fn huge_pages_are_off_only_for_tcg_targets_unless_set() {
        assert!(GuestHugePages::Auto.enabled(Accel::Kvm, true));
        assert!(GuestHugePages::Auto.enabled(Accel::Tcg, false));
        assert!(!GuestHugePages::Auto.enabled(Accel::Tcg, true));
        assert!(GuestHugePages::On.enabled(Accel::Tcg, true));
        assert!(!GuestHugePages::Off.enabled(Accel::Kvm, false));
    }
}

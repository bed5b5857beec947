//! The VM manager: the typed core behind the agent's API. Every operation on
//! a VM goes through here.
//!
//! Locking: a short-held `std` mutex guards the map of VMs and each VM's
//! shared state (reads never wait for a boot); a per-VM async `op_lock`
//! serialises lifecycle operations on one VM; the manager-wide `admission`
//! lock makes the capacity check and the resource reservation one step.

mod bases;
mod capture;
mod clone;
mod create;
mod exec;
pub mod fleet;
mod from_layer;
mod layers;
mod lifecycle;
pub mod migrate;
mod move_disk;
mod snapshots;
mod standby;
pub use standby::DEFAULT_MAX_STANDBYS;
pub mod suspend;
mod volumes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_api::{HostInfo, Resources, VmInfo, VmState};
use flotilla_image::ImageStore;
use flotilla_qemu::AccelDecision;

use crate::config::AgentConfig;
use crate::error::{AgentError, AgentResult};
use crate::record::VmRecord;
use crate::runtime::{ReadinessChannel, VmRuntime};

pub use bases::BASE_VM_PREFIX;
pub use capture::remove_capture_leftovers;
pub use exec::ExecOutcome;
pub use from_layer::STAGING_PREFIX;

/// One VM known to the agent.
pub(crate) struct VmEntry {
    pub shared: Mutex<VmShared>,
    pub readiness: ReadinessChannel,
    pub op_lock: tokio::sync::Mutex<()>,
}

pub(crate) struct VmShared {
    pub record: VmRecord,
    pub runtime: VmRuntime,
}

impl VmEntry {
    pub fn new(record: VmRecord) -> Arc<VmEntry> {
        Arc::new(VmEntry {
            shared: Mutex::new(VmShared {
                record,
                runtime: VmRuntime::default(),
            }),
            readiness: ReadinessChannel::default(),
            op_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Locks the shared state; a poisoned lock (a panic elsewhere) still gives
    /// the data, which stays consistent because every writer saves whole records.
    pub fn lock(&self) -> MutexGuard<'_, VmShared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) struct Inner {
    pub config: AgentConfig,
    pub accel: AccelDecision,
    pub qemu_version: String,
    pub images: ImageStore,
    pub snapshots: flotilla_snapshot::SnapshotStore,
    pub vms: Mutex<BTreeMap<String, Arc<VmEntry>>>,
    pub admission: tokio::sync::Mutex<()>,
    /// One base snapshot is made at a time.
    pub bases_lock: tokio::sync::Mutex<()>,
    /// Names taken by operations still making their VM, snapshot or
    /// volume (`vm:NAME`, `snapshot:NAME`, `volume:NAME`), so two at once
    /// cannot both take one.
    pub pending_names: Mutex<std::collections::HashSet<String>>,
    /// Live migrations this host takes part in, as source or target.
    pub migrations: migrate::MigrationBook,
    /// Routes to VM addresses on other hosts (the cluster's, and forwards
    /// of VMs that moved away).
    pub routes: Arc<crate::routes::Routes>,
    /// The filter keeping network groups (tenants) apart.
    pub isolation: crate::isolation::Isolation,
    /// Held while the routes are brought up to date, so an older view of
    /// the VMs never undoes a newer one.
    pub network_sync: Mutex<()>,
    /// Held while standbys beyond `--max-warm` are chosen and killed, so
    /// two evictions never count the same standbys.
    pub standby_eviction: tokio::sync::Mutex<()>,
    /// Some VM records could not be read at start: a volume may be
    /// attached to one of those VMs, so none is removed or attached.
    pub unreadable_records: std::sync::atomic::AtomicBool,
    /// The agent's TLS server side (its API's certificate), for the
    /// encrypted memory streams it receives; unset on a plain-HTTP agent.
    pub stream_tls: std::sync::OnceLock<Arc<rustls::ServerConfig>>,
}

/// A name held for an operation in flight; released when dropped.
pub(crate) struct NameReservation {
    manager: VmManager,
    key: String,
}

impl Drop for NameReservation {
    fn drop(&mut self) {
        self.manager
            .inner
            .pending_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Cheap to clone; all clones share one host's state.
#[derive(Clone)]
pub struct VmManager {
    pub(crate) inner: Arc<Inner>,
}

impl VmManager {
    pub(crate) fn new(
        config: AgentConfig,
        accel: AccelDecision,
        qemu_version: String,
        images: ImageStore,
        snapshots: flotilla_snapshot::SnapshotStore,
    ) -> Self {
        let config_migrations_dir = config.data_dir.join("migrations");
        let max_migrations = config.max_migrations;
        let routes = Arc::new(crate::routes::Routes::open(&config.data_dir));
        let config_subnet = config.subnet;
        VmManager {
            inner: Arc::new(Inner {
                config,
                accel,
                qemu_version,
                images,
                snapshots,
                vms: Mutex::new(BTreeMap::new()),
                admission: tokio::sync::Mutex::new(()),
                bases_lock: tokio::sync::Mutex::new(()),
                pending_names: Mutex::new(Default::default()),
                migrations: migrate::MigrationBook::open(&config_migrations_dir, max_migrations),
                routes,
                isolation: crate::isolation::Isolation::new(config_subnet),
                network_sync: Mutex::new(()),
                standby_eviction: tokio::sync::Mutex::new(()),
                unreadable_records: std::sync::atomic::AtomicBool::new(false),
                stream_tls: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.inner.config
    }

    pub fn images(&self) -> &ImageStore {
        &self.inner.images
    }

    pub(crate) fn vms(&self) -> MutexGuard<'_, BTreeMap<String, Arc<VmEntry>>> {
        self.inner.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn entry(&self, name: &str) -> AgentResult<Arc<VmEntry>> {
        self.vms()
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::VmNotFound {
                name: name.to_string(),
            })
    }

    /// Holds `key` (`vm:NAME` or `snapshot:NAME`) for an operation in flight;
    /// fails if another operation holds it.
    pub(crate) fn reserve_name(&self, key: String) -> Option<NameReservation> {
        let mut pending = self
            .inner
            .pending_names
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.insert(key.clone()).then(|| NameReservation {
            manager: self.clone(),
            key,
        })
    }

    /// Whether `key` is held by a reservation now.
    pub(crate) fn name_pending(&self, key: &str) -> bool {
        self.inner
            .pending_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// A new VM's name: free now and held until the returned reservation
    /// is dropped (the VM is in the map by then, or was never made).
    pub(crate) fn reserve_vm_name(&self, name: &str) -> AgentResult<NameReservation> {
        if self.vms().contains_key(name) {
            return Err(AgentError::VmExists {
                name: name.to_string(),
            });
        }
        self.reserve_name(format!("vm:{name}"))
            .ok_or_else(|| AgentError::VmExists {
                name: name.to_string(),
            })
    }

    pub(crate) fn vm_dir(&self, name: &str) -> PathBuf {
        self.inner.config.vms_dir().join(name)
    }

    /// Saves the record of a VM whose shared state the caller holds.
    pub(crate) fn save(&self, shared: &VmShared) -> AgentResult<()> {
        shared.record.save(&self.vm_dir(&shared.record.name))?;
        Ok(())
    }

    /// Moves a VM to `next`, refusing transitions the state machine forbids.
    pub(crate) fn transition(&self, shared: &mut VmShared, next: VmState) -> AgentResult<()> {
        let current = shared.record.state;
        if !current.can_transition_to(next) {
            return Err(AgentError::conflict(
                format!(
                    "VM {:?} is {current}; it cannot become {next}",
                    shared.record.name
                ),
                None,
            ));
        }
        tracing::info!(vm = %shared.record.name, from = %current, to = %next, "state change");
        shared.record.state = next;
        Ok(())
    }

    /// Resources held by VMs in states that hold them.
    pub fn allocated(&self) -> Resources {
        self.allocated_where(|_| true)
    }

    /// Resources held by every VM but `entry`. Call without holding any VM's lock.
    pub(crate) fn allocated_excluding(&self, entry: &Arc<VmEntry>) -> Resources {
        self.allocated_where(|e| !Arc::ptr_eq(e, entry))
    }

    fn allocated_where(&self, keep: impl Fn(&Arc<VmEntry>) -> bool) -> Resources {
        let entries: Vec<_> = self.vms().values().filter(|e| keep(e)).cloned().collect();
        crate::capacity::allocated(entries.iter().filter_map(|e| {
            let s = e.lock();
            s.record.state.holds_resources().then_some(Resources {
                vcpus: s.record.vcpus,
                memory_mib: s.record.memory_mib,
            })
        }))
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let entries: Vec<_> = self.vms().values().cloned().collect();
        entries.iter().map(|e| self.info_of(e)).collect()
    }

    pub(crate) fn info_of(&self, entry: &VmEntry) -> VmInfo {
        let ready = entry.readiness.get() == crate::runtime::Readiness::Ready;
        let s = entry.lock();
        let mut info = s.record.to_info(None, ready);
        info.warm = s
            .runtime
            .standby
            .as_ref()
            .is_some_and(|w| w.process.exit_info().is_none());
        info
    }

    /// A VM's description, with QEMU's own status asked over QMP.
    pub async fn inspect(&self, name: &str) -> AgentResult<VmInfo> {
        let entry = self.entry(name)?;
        let (qmp, guest) = {
            let s = entry.lock();
            (s.runtime.qmp.clone(), s.runtime.guest.clone())
        };
        let mut info = self.info_of(&entry);
        if let Some(qmp) = qmp {
            match qmp.query_status().await {
                Ok(st) => info.qemu_status = Some(st.status),
                Err(e) => tracing::debug!(vm = name, error = %e, "query-status failed"),
            }
        }
        if let Some(guest) = guest.filter(|g| g.is_connected()) {
            match guest.info(GUEST_INFO_TIMEOUT).await {
                Ok(g) => {
                    info.guest = Some(flotilla_api::GuestInfo {
                        kernel_release: g.kernel_release,
                        kernel_version: g.kernel_version,
                        hostname: g.hostname,
                        uptime_ms: g.uptime_ms,
                        mem_total_kib: g.mem_total_kib,
                        mem_available_kib: g.mem_available_kib,
                        addresses: g
                            .addresses
                            .iter()
                            .map(|a| format!("{} {}/{}", a.interface, a.address, a.prefix_len))
                            .collect(),
                        machine_id: g.machine_id,
                    })
                }
                Err(e) => tracing::debug!(vm = name, error = %e, "guest info failed"),
            }
        }
        Ok(info)
    }

    /// Every VM address this host knows with its network group (its own
    /// VMs', then those elsewhere: routes and forwards), and its taps with
    /// the address each may send from.
    pub fn membership(&self) -> crate::isolation::Membership {
        let mut m = crate::isolation::Membership {
            groups: self.inner.routes.groups(),
            ports: BTreeMap::new(),
        };
        for e in self.vms().values() {
            let s = e.lock();
            let group = crate::isolation::group_of(&s.record.tags);
            for n in &s.record.nics {
                m.groups.insert(n.ip, group.clone());
                m.ports.insert(n.tap.clone(), n.ip);
            }
        }
        m
    }

    /// Brings the network groups' filter up to date (blocking: runs `nft`
    /// when something changed).
    pub fn sync_isolation(&self) -> Result<(), crate::network::NetworkError> {
        self.inner.isolation.apply(|| self.membership())
    }

    /// Brings the host's routes to VMs elsewhere and the network groups'
    /// filter up to date (blocking: runs `ip` and `nft` when something
    /// changed).
    pub fn sync_network(&self) {
        {
            let _one_at_a_time = self
                .inner
                .network_sync
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.inner.routes.reconcile(&self.running_here());
        }
        if let Err(e) = self.sync_isolation() {
            tracing::warn!(error = %e, "could not apply the network groups");
        }
    }

    /// The addresses of the VMs that run on this host: not one still
    /// arriving by migration (it runs on its source until the switch-over).
    fn running_here(&self) -> std::collections::HashSet<std::net::Ipv4Addr> {
        self.vms()
            .values()
            .filter_map(|e| {
                let s = e.lock();
                let arriving = s.record.state == VmState::Incoming
                    || (s.record.state == VmState::Creating && s.record.migration.is_some());
                (!arriving).then(|| s.record.nics.iter().map(|n| n.ip).collect::<Vec<_>>())
            })
            .flatten()
            .collect()
    }

    /// A VM that arrived by migration now runs here (recorded as running):
    /// its addresses are no longer routed to its source nor forwarded away.
    pub fn vm_arrived(&self, addrs: &[std::net::Ipv4Addr]) {
        let _one_at_a_time = self
            .inner
            .network_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for addr in addrs {
            self.inner.routes.arrived(*addr);
        }
    }

    pub fn host_info(&self) -> HostInfo {
        let cfg = &self.inner.config;
        HostInfo {
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            qemu_version: self.inner.qemu_version.clone(),
            accel: self.inner.accel.accel.to_string(),
            accel_reason: self.inner.accel.reason.clone(),
            capacity: cfg.capacity,
            allocated: self.allocated(),
            bridge: cfg.bridge.clone(),
            subnet: cfg.subnet.to_string(),
            vm_count: self.vms().len(),
            data_dir: cfg.data_dir.display().to_string(),
            tls_fingerprint: cfg.tls_fingerprint.clone(),
            network_isolation: self.inner.isolation.available(),
            disk: self.disk_space(),
        }
    }

    /// The data directory's file system: its size (or the configured
    /// capacity, if smaller) and what is free on it now.
    pub fn disk_space(&self) -> Option<flotilla_api::DiskSpace> {
        let cfg = &self.inner.config;
        let fs = nix::sys::statvfs::statvfs(&cfg.data_dir).ok()?;
        let unit = fs.fragment_size() as u64;
        // Whole GiB: a file system whose size drifts (ZFS, btrfs) would
        // otherwise change the host's capacity, and so its placement
        // version, at every heartbeat.
        let size_mib = ((fs.blocks() as u64 * unit) >> 30) << 10;
        Some(flotilla_api::DiskSpace {
            capacity_mib: cfg.disk_capacity_mib.map_or(size_mib, |c| c.min(size_mib)),
            free_mib: (fs.blocks_available() as u64 * unit) >> 20,
        })
    }

    /// Console output of a VM: its serial log from `offset`, or its last
    /// `tail_bytes`, at most [`MAX_LOG_READ`] bytes (the newest), with the
    /// log's full size.
    pub fn logs(
        &self,
        name: &str,
        tail_bytes: Option<u64>,
        offset: Option<u64>,
    ) -> AgentResult<(Vec<u8>, u64)> {
        use std::io::{Read, Seek, SeekFrom};
        self.entry(name)?;
        let path = self.vm_dir(name).join(lifecycle::CONSOLE_LOG);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(AgentError::io(format!("reading {}", path.display()), e)),
        };
        let read_err = |e| AgentError::io(format!("reading {}", path.display()), e);
        let len = file.metadata().map_err(read_err)?.len();
        let mut start = match (offset, tail_bytes) {
            (Some(o), _) => o.min(len),
            (None, Some(n)) => len.saturating_sub(n),
            (None, None) => 0,
        };
        start = start.max(len.saturating_sub(MAX_LOG_READ));
        file.seek(SeekFrom::Start(start)).map_err(read_err)?;
        let mut bytes = Vec::with_capacity((len - start) as usize);
        file.take(len - start)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        Ok((bytes, len))
    }
}

/// How long `inspect` waits for the guest agent's own report.
const GUEST_INFO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The most console log one request returns.
pub const MAX_LOG_READ: u64 = 4 * 1024 * 1024;

//! The target side: a QEMU waiting for the memory stream, with disks that
//! read from the source's exports; at the switch-over the VM runs here at
//! once and the disks are copied in the background.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::migration::{
    IncomingMigrationReady, IncomingMigrationRequest, MigratingVm, MigrationInfo, MigrationPhase,
    MigrationRole,
};
use flotilla_api::{Resources, VmState};
use flotilla_qemu::live::{self, StreamAddr};
use flotilla_qemu::{LayerBacking, NbdBacking};

use super::{file_sha256, new_record, tunnel};
use crate::error::{AgentError, AgentResult};
use crate::fsutil::sync_dir;
use crate::manager::create::{pin, BASE_DISK, INITRD, KERNEL, ROOT_DISK};
use crate::manager::{VmEntry, VmManager};
use crate::network::tap_name;
use crate::record::{
    now_rfc3339, DiskRecord, NicRecord, VmRecord, CREATING_PREFIX, RECORD_FORMAT_VERSION,
};
use crate::runtime::Readiness;

/// How long a tunnelled stream's connections may outlive the stream's end
/// on this side (a source that vanished never closes them).
const TUNNEL_AFTER_STREAM: Duration = Duration::from_secs(10);

/// What the target needs to receive a tunnelled stream.
struct TunnelIn {
    key: [u8; tunnel::KEY_BYTES],
    tls: Arc<rustls::ServerConfig>,
}

/// How long the memory stream may take to arrive in full after the source
/// saw it complete.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a prepared target waits for its source's stream to begin.
const NO_STREAM_TIMEOUT: Duration = Duration::from_secs(120);

/// This host's copy of a migrating VM's base image.
struct LocalBase {
    sha256: String,
    format: String,
}

/// The most connections a memory stream may ask for (each is a thread in
/// the receiving QEMU).
const MAX_STREAM_CHANNELS: u32 = 16;

/// How long a VM that has just switched over here is left alone before its
/// guest agent is reconnected, and before its disks start syncing. Under
/// TCG its first moments on a new QEMU are its slowest (all its code is
/// translated afresh): the guest agent's reconnection, run by the same
/// vCPU, had lengthened the pause its network traffic saw from about 40 to
/// 55-85 ms. The disks' first steps (an NBD connection, a reopen) run on
/// QEMU's main thread and hold it less: started at once they added about
/// 10 ms to that pause; after 25 ms, nothing measurable, and the sync ends
/// 25 ms sooner than after the full 50.
fn after_cont(accel: flotilla_qemu::Accel) -> (Duration, Duration) {
    match accel {
        flotilla_qemu::Accel::Tcg => (Duration::from_millis(50), Duration::from_millis(25)),
        flotilla_qemu::Accel::Kvm => (Duration::ZERO, Duration::ZERO),
    }
}

impl VmManager {
    /// Prepares to receive `req.vm`: checks it can take it, makes its
    /// directory and disks, and starts a QEMU listening for the stream.
    pub async fn prepare_incoming(
        &self,
        req: IncomingMigrationRequest,
    ) -> AgentResult<IncomingMigrationReady> {
        super::check_id(&req.id)?;
        let id = req.id.clone();
        self.inner.migrations.take_slot(&id)?;
        let prepared = self.prepare_incoming_in_slot(req).await;
        if prepared.is_err() {
            self.inner.migrations.release_slot(&id);
        }
        prepared
    }

    async fn prepare_incoming_in_slot(
        &self,
        req: IncomingMigrationRequest,
    ) -> AgentResult<IncomingMigrationReady> {
        let began = std::time::Instant::now();
        let ip = self.migration_ip()?;
        let vm = req.vm.clone();
        crate::spec::validate_name("vm.name", &vm.name, 63)?;
        if vm.id.len() != 16 || !vm.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AgentError::InvalidArgument(format!(
                "invalid VM id {:?}: expected 16 hex digits",
                vm.id
            )));
        }
        crate::manager::from_layer::check_not_reserved(&vm.name)?;
        if req.stream_channels > MAX_STREAM_CHANNELS {
            return Err(AgentError::InvalidArgument(format!(
                "stream_channels {}: at most {MAX_STREAM_CHANNELS}",
                req.stream_channels
            )));
        }
        let tunnel_in = match req.stream_tunnel {
            false => None,
            true => Some(self.check_tunnel(&req)?),
        };
        if self.inner.migrations.get(&req.id).is_ok() {
            return Err(AgentError::conflict(
                format!("migration {} is already known here", req.id),
                None,
            ));
        }
        let (accel, qemu) = (self.inner.accel.accel.to_string(), &self.inner.qemu_version);
        if vm.accel != accel || &vm.qemu_version != qemu {
            return Err(AgentError::conflict(
                format!(
                    "the VM runs under {} on QEMU {}; this host has {accel} on QEMU {qemu}",
                    vm.accel, vm.qemu_version
                ),
                Some("migrate between hosts with the same accelerator and QEMU version".into()),
            ));
        }
        let image = self.inner.images.get(&vm.image).map_err(|_| {
            AgentError::conflict(
                format!(
                    "this host has no image {:?}, which the VM was made from",
                    vm.image
                ),
                Some("register the same image on the target host first".into()),
            )
        })?;
        let (kernel, initrd) = (image.kernel.clone(), image.initrd.clone());
        let sums = tokio::task::spawn_blocking(move || {
            Ok::<_, AgentError>((
                file_sha256(&kernel)?,
                initrd.as_deref().map(file_sha256).transpose()?,
            ))
        })
        .await
        .map_err(|e| AgentError::io("hashing the kernel", std::io::Error::other(e)))??;
        if sums != (vm.kernel_sha256.clone(), vm.initrd_sha256.clone()) {
            return Err(AgentError::conflict(
                format!(
                    "image {:?} here has another kernel or initramfs than the VM runs",
                    vm.image
                ),
                Some("both hosts need the same image (same kernel and initramfs)".into()),
            ));
        }
        // The same base image here: layered disks copy only their overlay.
        let local_base = match (&image.rootfs, vm.disks.iter().any(|d| d.layer.is_some())) {
            (Some(rootfs), true) => {
                // Not hashable: the disks are copied whole.
                let rootfs = rootfs.clone();
                let sum = tokio::task::spawn_blocking(move || file_sha256(&rootfs).ok())
                    .await
                    .ok()
                    .flatten();
                sum.map(|sha256| LocalBase {
                    sha256,
                    format: image
                        .rootfs_format
                        .clone()
                        .unwrap_or_else(|| "qcow2".into()),
                })
            }
            _ => None,
        };
        let step = |what: &str| {
            tracing::debug!(migration = %req.id, ms = began.elapsed().as_millis() as u64, "prepared: {what}");
        };
        step("checks");
        let _name = self.reserve_vm_name(&vm.name)?;
        let entry = {
            let _admission = self.inner.admission.lock().await;
            self.check_name_free(&vm.name)?;
            crate::capacity::check_fits(
                self.inner.config.capacity,
                self.allocated(),
                Resources {
                    vcpus: vm.vcpus,
                    memory_mib: vm.memory_mib,
                },
            )?;
            self.check_identity_free(&vm)?;
            let record =
                self.incoming_record(&vm, &req.id, req.tls_psk.is_some(), local_base.as_ref())?;
            let sizes: Vec<u64> = vm.disks.iter().map(|d| d.size_bytes).collect();
            self.materialize_incoming(&record, &sizes, &image)?;
            let entry = VmEntry::new(record);
            self.vms().insert(vm.name.clone(), entry.clone());
            entry
        };
        step("disks");
        // Recorded before QEMU starts, so the source can always have this
        // half removed by the migration's id.
        let mut info = new_record(&req.id, &vm.name, MigrationRole::Target, &req.source);
        info.tls = req.tls_psk.is_some();
        info.disk_sync_limit_bps = req.disk_sync_bps;
        if let Err(e) = self.inner.migrations.put(info, None, None) {
            self.remove_incoming(&entry).await;
            return Err(e);
        }
        let tls = req.tls_psk.is_some();
        let keyed = match &req.tls_psk {
            Some(key) => super::write_psk(&self.vm_dir(&vm.name), key).map(|_| ()),
            None => Ok(()),
        };
        if let Err(e) = keyed {
            self.remove_incoming(&entry).await;
            self.inner
                .migrations
                .finish(&req.id, MigrationPhase::Failed, Some(e.to_string()), 0);
            return Err(e);
        }
        step("record");
        let channels = req.stream_channels.max(1);
        let listening = async {
            match tunnel_in {
                None => {
                    let at = StreamAddr::Tcp(std::net::SocketAddr::new(ip, 0));
                    let at = self
                        .start_incoming(&entry, &at, tls, req.post_copy, channels)
                        .await?;
                    at.tcp_port().ok_or_else(|| {
                        AgentError::Qmp(flotilla_qemu::QmpError::Protocol(format!(
                            "QEMU listens at {at:?}, not on TCP"
                        )))
                    })
                }
                // A tunnelled stream reaches QEMU in the clear from this
                // agent, on a socket only this agent's user can reach.
                Some(tunnel_in) => {
                    let path = super::stream_socket(&self.inner.config, &vm.id);
                    let at = StreamAddr::Unix(path.clone());
                    self.start_incoming(&entry, &at, false, req.post_copy, channels)
                        .await?;
                    self.tunnel_incoming(&entry, &req.id, ip, tunnel_in, path, channels)
                        .await
                }
            }
        };
        let port = match listening.await {
            Ok(port) => port,
            Err(e) => {
                self.remove_incoming(&entry).await;
                self.inner.migrations.finish(
                    &req.id,
                    MigrationPhase::Failed,
                    Some(e.to_string()),
                    0,
                );
                return Err(e);
            }
        };
        self.inner
            .migrations
            .update(&req.id, true, |m| m.phase = MigrationPhase::PreCopy);
        let ms = began.elapsed().as_millis() as u64;
        tracing::info!(vm = %vm.name, migration = %req.id, port, ms, "waiting for an incoming migration");
        Ok(IncomingMigrationReady {
            host: ip.to_string(),
            port,
        })
    }

    /// What a tunnelled stream needs here: the key its connections must
    /// show, and this agent's certificate to receive them with.
    fn check_tunnel(&self, req: &IncomingMigrationRequest) -> AgentResult<TunnelIn> {
        let tls = self.inner.stream_tls.get().cloned().ok_or_else(|| {
            AgentError::conflict(
                "this agent serves plain HTTP, so it has no certificate to receive an \
                 encrypted stream with",
                Some("migrate without TLS, or run the target agent with TLS".into()),
            )
        })?;
        let key = req
            .tls_psk
            .as_deref()
            .and_then(tunnel::key_of)
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!(
                    "a stream through the agents needs tls_psk of at least {} hex digits",
                    2 * tunnel::KEY_BYTES
                ))
            })?;
        Ok(TunnelIn { key, tls })
    }

    /// Carries the source agent's encrypted connections to the incoming
    /// QEMU at `qemu`; returns the port they come to on `ip`. The tunnel
    /// ends with its connections, with the QEMU, or soon after the stream
    /// is over (a source that vanished never closes its connections).
    async fn tunnel_incoming(
        &self,
        entry: &VmEntry,
        migration: &str,
        ip: std::net::IpAddr,
        tunnel_in: TunnelIn,
        qemu: std::path::PathBuf,
        channels: u32,
    ) -> AgentResult<u16> {
        let process = entry.lock().runtime.process.clone().ok_or_else(|| {
            AgentError::conflict("the incoming QEMU is gone before the stream began", None)
        })?;
        // QEMU's multifd opens its main connection and one per channel.
        let connections = match channels {
            0 | 1 => 1,
            n => n as usize + 1,
        };
        let TunnelIn { key, tls } = tunnel_in;
        let (tunnel, at) = tunnel::incoming(ip, tls, key, qemu, connections)
            .await
            .map_err(|e| AgentError::io(format!("listening on {ip} for the stream"), e))?;
        let port = at.port();
        let (manager, id) = (self.clone(), migration.to_string());
        let stream_over = async move {
            let book = &manager.inner.migrations;
            while let Ok(m) = book.get(&id) {
                if !matches!(m.phase, MigrationPhase::Preparing | MigrationPhase::PreCopy) {
                    break;
                }
                let _ = book.wait_past(&id, m.phase, Duration::from_secs(60)).await;
            }
            tokio::time::sleep(TUNNEL_AFTER_STREAM).await;
        };
        tokio::spawn(tunnel.run_until(async move {
            tokio::select! {
                _ = process.wait_exit() => {}
                _ = stream_over => {}
            }
        }));
        Ok(port)
    }

    /// Its MACs and addresses must be free here, and in this host's VM
    /// subnet: the guest keeps them.
    fn check_identity_free(&self, vm: &MigratingVm) -> AgentResult<()> {
        let subnet = &self.inner.config.subnet;
        for n in &vm.nics {
            let ip: std::net::Ipv4Addr = n.ip.parse().map_err(|_| {
                AgentError::InvalidArgument(format!(
                    "migrating VM has an invalid address {:?}",
                    n.ip
                ))
            })?;
            if !subnet.contains(ip) || n.gateway != subnet.gateway().to_string() {
                return Err(AgentError::conflict(
                    format!(
                        "VM {:?} has address {} via {}, outside this host's VM network {subnet}",
                        vm.name, n.ip, n.gateway
                    ),
                    Some("migrate between hosts that share the VM network".into()),
                ));
            }
        }
        let mut ips = HashSet::new();
        let mut macs = HashSet::new();
        for e in self.vms().values() {
            for n in &e.lock().record.nics {
                ips.insert(n.ip.to_string());
                macs.insert(n.mac.to_ascii_lowercase());
            }
        }
        for n in &vm.nics {
            if ips.contains(&n.ip) || macs.contains(&n.mac.to_ascii_lowercase()) {
                return Err(AgentError::conflict(
                    format!(
                        "another VM on this host has address {} or MAC {}, which VM {:?} keeps",
                        n.ip, n.mac, vm.name
                    ),
                    Some("pick another target host".into()),
                ));
            }
        }
        Ok(())
    }

    fn incoming_record(
        &self,
        vm: &MigratingVm,
        migration: &str,
        tls: bool,
        local_base: Option<&LocalBase>,
    ) -> AgentResult<VmRecord> {
        let dir = self.vm_dir(&vm.name);
        let bad = |what: &str, v: &str| {
            AgentError::InvalidArgument(format!("migrating VM has an invalid {what}: {v:?}"))
        };
        let nics = vm
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Ok(NicRecord {
                    mac: n.mac.clone(),
                    ip: n.ip.parse().map_err(|_| bad("address", &n.ip))?,
                    prefix_len: n.prefix_len,
                    gateway: n.gateway.parse().map_err(|_| bad("gateway", &n.gateway))?,
                    tap: tap_name(&vm.id, i),
                })
            })
            .collect::<AgentResult<Vec<_>>>()?;
        let disks = vm
            .disks
            .iter()
            .map(|d| {
                if !d
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(bad("disk name", &d.name));
                }
                let file = match d.name.as_str() {
                    "root" => ROOT_DISK.to_string(),
                    n => format!("disk-{n}.qcow2"),
                };
                if d.read_only {
                    return Err(AgentError::InvalidArgument(format!(
                        "disk {:?} is read-only: such disks are shared on their host and cannot move",
                        d.name
                    )));
                }
                // A volume is synced inside the VM's directory (it goes with
                // the directory if the migration fails) and becomes this
                // host's volume when the sync is done.
                if let Some(volume) = &d.volume {
                    crate::spec::validate_name("volume", volume, 63)
                        .map_err(AgentError::from)?;
                    if self.volume_path(volume).exists() || self.volume_user(volume).is_some() {
                        return Err(AgentError::conflict(
                            format!("this host has a volume named {volume:?} already"),
                            Some("remove it here, or migrate the VM to another host".into()),
                        ));
                    }
                }
                // The whole disk as the guest sees it until the switch-over;
                // then, for a root disk over the same image as here, its
                // overlay's bytes over this host's copy of the image.
                let layer = d
                    .layer
                    .as_ref()
                    .zip(local_base)
                    .filter(|(l, b)| d.name == "root" && l.base_sha256 == b.sha256)
                    .map(|(l, b)| LayerBacking {
                        export: l.nbd_export.clone(),
                        base: dir.join(BASE_DISK),
                        base_format: b.format.clone(),
                    });
                Ok(DiskRecord {
                    name: d.name.clone(),
                    path: dir.join(file),
                    format: "qcow2".into(),
                    size_mib: d.size_mib,
                    backing: None,
                    read_only: d.read_only,
                    volume: d.volume.clone(),
                    sync_from: Some(NbdBacking {
                        host: d.nbd_host.clone(),
                        port: d.nbd_port,
                        export: d.nbd_export.clone(),
                        tls,
                        layer,
                        on_layer: false,
                    }),
                })
            })
            .collect::<AgentResult<Vec<_>>>()?;
        Ok(VmRecord {
            format_version: RECORD_FORMAT_VERSION,
            id: vm.id.clone(),
            name: vm.name.clone(),
            image: vm.image.clone(),
            kernel: dir.join(KERNEL),
            initrd: vm.initrd_sha256.as_ref().map(|_| dir.join(INITRD)),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            cmdline_extra: vm.cmdline_extra.clone(),
            tags: vm.tags.clone(),
            disks,
            nics,
            state: VmState::Creating,
            created_at: vm.created_at.clone(),
            started_at: None,
            process: None,
            accel: Some(self.inner.accel.accel),
            guest_boot_ms: None,
            ready_ms: None,
            last_error: None,
            snapshot_head: None,
            pending_snapshot: None,
            machine_id: vm.machine_id.clone(),
            identity_pending: false,
            pending_move: None,
            migration: Some(migration.to_string()),
        })
    }

    /// The VM's directory: kernel and initramfs pinned from the image,
    /// empty disks of the VM's sizes (their data comes from the source).
    fn materialize_incoming(
        &self,
        record: &VmRecord,
        sizes: &[u64],
        image: &flotilla_image::Image,
    ) -> AgentResult<()> {
        let vms_dir = self.inner.config.vms_dir();
        let tmp = vms_dir.join(format!("{CREATING_PREFIX}{}", record.id));
        let result = (|| -> AgentResult<()> {
            std::fs::create_dir_all(&tmp)
                .map_err(|e| AgentError::io("creating VM directory", e))?;
            pin(&image.kernel, &tmp.join(KERNEL))
                .map_err(|e| AgentError::io("pinning the kernel", e))?;
            if let Some(initrd) = &image.initrd {
                pin(initrd, &tmp.join(INITRD))
                    .map_err(|e| AgentError::io("pinning the initramfs", e))?;
            }
            let layered = |d: &DiskRecord| d.sync_from.as_ref().is_some_and(|s| s.layer.is_some());
            if record.disks.iter().any(layered) {
                let rootfs = image.rootfs.as_deref().ok_or_else(|| {
                    AgentError::conflict("this host's image has no root disk", None)
                })?;
                pin(rootfs, &tmp.join(BASE_DISK))
                    .map_err(|e| AgentError::io("pinning the base disk", e))?;
            }
            for (d, bytes) in record.disks.iter().zip(sizes) {
                let at = tmp.join(d.path.file_name().unwrap_or_default());
                crate::disks::create_blank_bytes(&at, *bytes)?;
            }
            record.save(&tmp)?;
            std::fs::rename(&tmp, self.vm_dir(&record.name))
                .map_err(|e| AgentError::io("placing VM directory", e))?;
            sync_dir(&vms_dir).map_err(|e| AgentError::io("syncing VM directory", e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// QEMU started paused with `-incoming defer`, listening at `at`;
    /// returns where it listens.
    async fn start_incoming(
        &self,
        entry: &Arc<VmEntry>,
        at: &StreamAddr,
        tls: bool,
        post_copy: bool,
        channels: u32,
    ) -> AgentResult<StreamAddr> {
        let (record, generation) = {
            let mut s = entry.lock();
            self.transition(&mut s, VmState::Incoming)?;
            s.runtime.generation += 1;
            entry.readiness.set(Readiness::Waiting);
            self.save(&s)?;
            (s.record.clone(), s.runtime.generation)
        };
        let mut config = self.qemu_config(&record);
        config.incoming = Some("defer".into());
        config.start_paused = true;
        config.huge_pages = self
            .inner
            .config
            .guest_huge_pages
            .enabled(self.inner.accel.accel, true);
        let launched = std::time::Instant::now();
        let (process, qmp) = self.launch_with(&record, config).await?;
        tracing::debug!(vm = %record.name, ms = launched.elapsed().as_millis() as u64, "incoming QEMU up");
        self.spawn_monitor(entry.clone(), process.clone(), generation);
        self.spawn_incoming_watch(entry.clone(), process.clone(), record.migration.clone());
        if let Some(id) = record.migration.clone() {
            self.spawn_arrival_watchdog(id);
        }
        {
            let mut s = entry.lock();
            s.record.process = Some(process.identity);
            s.record.started_at = Some(now_rfc3339());
            s.runtime.process = Some(process);
            s.runtime.qmp = Some(qmp.clone());
            self.save(&s)?;
        }
        let listening = live::listen_incoming(&qmp, at, tls, post_copy, channels).await?;
        // The VM's disks here are files of this host (the source's bytes
        // come over NBD), so `cont` need not reopen them during the pause.
        if let Err(e) = live::activate_own_disks(&qmp).await {
            tracing::info!(vm = %record.name, error = %e, "disks left for `cont` to activate");
        }
        Ok(listening)
    }

    /// A QEMU that dies before the migration is complete (a failed or cut
    /// stream makes an incoming QEMU exit) takes its half-made VM with it:
    /// the source keeps, or takes back, the VM.
    fn spawn_incoming_watch(
        &self,
        entry: Arc<VmEntry>,
        process: Arc<flotilla_qemu::QemuProcess>,
        migration: Option<String>,
    ) {
        let manager = self.clone();
        tokio::spawn(async move {
            process.wait_exit().await;
            // The monitor settles the exit first.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let id = migration.clone().unwrap_or_default();
            let switched = manager
                .inner
                .migrations
                .get(&id)
                .map(|m| m.switch_over_ms.is_some())
                .unwrap_or(true);
            let lost = {
                let s = entry.lock();
                s.record.state == VmState::Crashed && s.record.migration == migration
            };
            // After the switch-over the VM is this host's: a crash leaves it
            // crashed here, to be started again (its disks still sync).
            if !lost || switched {
                return;
            }
            tracing::warn!(migration = %id, "the incoming VM's QEMU ended before the migration completed; removing it");
            manager.remove_incoming(&entry).await;
            manager.inner.migrations.finish(
                &id,
                MigrationPhase::Failed,
                Some("the VM's QEMU ended here before the migration completed".into()),
                0,
            );
        });
    }

    /// A source that vanished before its stream began (crashed, cut off)
    /// would leave this half waiting for ever, holding a QEMU, capacity and
    /// a migration slot. A source starts its stream as soon as this host is
    /// prepared; when nothing has arrived after [`NO_STREAM_TIMEOUT`] this
    /// half goes, and a source that shows up later keeps its VM.
    fn spawn_arrival_watchdog(&self, id: String) {
        let manager = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(NO_STREAM_TIMEOUT).await;
            let Ok(info) = manager.inner.migrations.get(&id) else {
                return;
            };
            if info.phase.is_finished() || info.switch_over_ms.is_some() {
                return;
            }
            let Ok(entry) = manager.entry(&info.vm) else {
                return;
            };
            let Some(qmp) = entry.lock().runtime.qmp.clone() else {
                return;
            };
            // `setup`: listening, no connection yet.
            match live::progress(&qmp).await {
                Ok(p) if p.status == "setup" || p.status == "none" => {}
                _ => return,
            }
            tracing::warn!(migration = %id, "no stream arrived from the source; removing this half");
            if let Err(e) = manager.abort_incoming(&id).await {
                tracing::warn!(migration = %id, error = %e, "could not remove the half");
            }
        });
    }

    /// The source has sent everything and paused its VM: run it here.
    pub async fn switch_over(&self, id: &str) -> AgentResult<MigrationInfo> {
        let info = self.inner.migrations.get(id)?;
        let entry = self.entry(&info.vm)?;
        // One at a time with a removal of this half (`abort_incoming`).
        let _op = entry.op_lock.lock().await;
        let info = self.inner.migrations.get(id)?;
        if info.phase.is_finished() && info.switch_over_ms.is_none() {
            return Err(AgentError::conflict(
                format!(
                    "migration {id} was given up here: {}",
                    info.error.unwrap_or_default()
                ),
                None,
            ));
        }
        let (qmp, generation, state) = {
            let s = entry.lock();
            (s.runtime.qmp.clone(), s.runtime.generation, s.record.state)
        };
        let ours = entry.lock().record.migration.as_deref() == Some(id);
        if ours && info.switch_over_ms.is_some() {
            // Asked again (the first answer was lost, or it failed after
            // the mark): whatever is left is done, and it runs here.
            if state == VmState::Incoming {
                if let Some(qmp) = &qmp {
                    self.run_switched(&entry, qmp, id, generation, Instant::now())
                        .await;
                }
            }
            return self.inner.migrations.get(id);
        }
        if state != VmState::Incoming || !ours {
            return Err(AgentError::conflict(
                format!(
                    "VM {:?} is {state}, not waiting for migration {id}",
                    info.vm
                ),
                None,
            ));
        }
        let qmp =
            qmp.ok_or_else(|| AgentError::conflict("the VM's QEMU is not connected", None))?;
        let since = Instant::now();
        let mut events = qmp.events();
        loop {
            let p = live::progress(&qmp).await?;
            match p.status.as_str() {
                "completed" => break,
                s if s.starts_with("postcopy") && live::post_copy_ready(&qmp).await? => {
                    self.inner
                        .migrations
                        .update(id, true, |m| m.post_copy = true);
                    break;
                }
                "failed" | "cancelled" => {
                    return Err(AgentError::Peer(format!(
                        "the memory stream {}: {}",
                        p.status,
                        p.error.unwrap_or_default()
                    )))
                }
                _ if since.elapsed() > ARRIVAL_TIMEOUT => {
                    return Err(AgentError::Timeout(format!(
                        "the memory stream did not complete within {ARRIVAL_TIMEOUT:?}"
                    )))
                }
                // In post-copy the run state's change has no event.
                s if s.starts_with("postcopy") => {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                // The end is an event; the timer only guards against one
                // missed.
                _ => {
                    tokio::select! {
                        _ = live::next_status_change(&mut events) => {}
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
            }
        }
        // Recorded (on disk) before the VM runs: from here on this half is
        // never removed on the source's word. Not recorded, not run.
        let arrived_us = since.elapsed().as_micros() as u64;
        self.inner
            .migrations
            .try_update(id, |m| m.switch_over_ms = Some(arrived_us / 1000))?;
        tracing::debug!(
            migration = id,
            arrived_us,
            recorded_us = since.elapsed().as_micros() as u64,
            "switch-over: the state is in and recorded"
        );
        self.run_switched(&entry, &qmp, id, generation, since).await;
        tracing::info!(vm = %info.vm, migration = id, "switched over: the VM runs here");
        self.inner.migrations.get(&info.id)
    }

    /// The rest of a recorded switch-over, which cannot be undone: the VM
    /// continues here (retried until QEMU takes it), is recorded running,
    /// and its disks start syncing.
    async fn run_switched(
        &self,
        entry: &Arc<VmEntry>,
        qmp: &flotilla_qemu::QmpClient,
        id: &str,
        generation: u64,
        since: Instant,
    ) {
        for attempt in 0..10 {
            match qmp.cont().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(migration = id, attempt, error = %e, "continuing the VM");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tracing::info!(
            migration = id,
            running_us = since.elapsed().as_micros() as u64,
            "continued here"
        );
        {
            let mut s = entry.lock();
            if let Err(e) = self.transition(&mut s, VmState::Running) {
                tracing::error!(migration = id, error = %e, "recording the switch-over");
                s.record.state = VmState::Running;
            }
            if let Err(e) = self.save(&s) {
                tracing::error!(migration = id, error = %e, "saving the record after the switch-over");
            }
        }
        // Its addresses are here now (recorded as running first, so no
        // later sync routes them back): not forwarded away (a VM coming
        // back), nor routed to the host it came from. After `cont`: the
        // routes' `ip` calls must not lengthen the pause.
        let addrs: Vec<std::net::Ipv4Addr> =
            entry.lock().record.nics.iter().map(|n| n.ip).collect();
        let manager = self.clone();
        let _ = tokio::task::spawn_blocking(move || manager.vm_arrived(&addrs)).await;
        self.inner
            .migrations
            .update(id, true, |m| m.phase = MigrationPhase::DiskSync);
        let manager = self.clone();
        let id = id.to_string();
        let syncing = entry.clone();
        let (quiet, disks_after) = after_cont(self.inner.accel.accel);
        let (readiness, ready_entry) = (manager.clone(), syncing.clone());
        tokio::spawn(async move {
            // The guest's first moments here are its slowest: nothing asks
            // it for anything yet. Then the guest agent's channel reconnects
            // and the guest clock is set, alongside the copy (which had
            // waited for the agent's answer: 50-100 ms longer migrations).
            // Dropping the handle leaves the readiness task running.
            tokio::time::sleep(quiet).await;
            drop(readiness.spawn_readiness_with_clock(ready_entry, generation, since));
        });
        tokio::spawn(async move {
            tokio::time::sleep(disks_after).await;
            let moving = Instant::now();
            manager.move_disks_to_layers(&syncing).await;
            tracing::debug!(migration = %id, ms = moving.elapsed().as_millis() as u64, "disks on their layers");
            manager.sync_disks(syncing, id).await
        });
    }

    /// Disks over an image this host has too move onto their overlay's bytes
    /// (exported by the paused source) over the local image: then only the
    /// overlay is copied, and the disk stays an overlay over the image, as a
    /// VM made here has. A disk that cannot move is copied whole.
    pub(super) async fn move_disks_to_layers(&self, entry: &Arc<VmEntry>) {
        let (qmp, disks) = {
            let s = entry.lock();
            (s.runtime.qmp.clone(), s.record.disks.clone())
        };
        let Some(qmp) = qmp else { return };
        // In post-copy, moving a disk waits for its in-flight reads, which
        // may wait for pages: such disks are copied whole.
        let post_copy = entry
            .lock()
            .record
            .migration
            .as_ref()
            .and_then(|id| self.inner.migrations.get(id).ok())
            .is_some_and(|m| m.post_copy);
        if post_copy
            && live::progress(&qmp).await.map(|p| p.status).ok().as_deref() != Some("completed")
        {
            return;
        }
        for d in disks {
            let Some(nbd) = d
                .sync_from
                .as_ref()
                .filter(|n| n.layer.is_some() && !n.on_layer)
            else {
                continue;
            };
            let drive = format!("disk-{}", d.name);
            if let Err(e) = live::move_to_layer(&qmp, &drive, &d.format, nbd).await {
                tracing::info!(disk = %d.name, error = %e, "its overlay cannot be read apart; the disk is copied whole");
                continue;
            }
            let mut s = entry.lock();
            if let Some(disk) = s.record.disks.iter_mut().find(|x| x.name == d.name) {
                if let Some(from) = disk.sync_from.as_mut() {
                    from.on_layer = true;
                }
                disk.backing = nbd.layer.as_ref().map(|l| l.base.clone());
            }
            if let Err(e) = self.save(&s) {
                tracing::error!(error = %e, "saving the record after moving a disk onto its overlay");
            }
            tracing::info!(disk = %d.name, "reading the overlay over this host's image");
        }
    }

    /// Copies each disk's remaining data from the source, then drops the
    /// link to it. A failed copy is retried (the NBD link reconnects after
    /// a cut); it pauses while the VM does not run and ends when the disks
    /// are whole or the VM is removed.
    /// The disks are whole: the source may let go.
    /// Ends the disk sync: false (asked again later) while an arrived
    /// volume could not be placed among this host's volumes, so the source
    /// keeps its copy meanwhile.
    fn finish_sync(&self, entry: &Arc<VmEntry>, id: &str, started: Instant) -> bool {
        let still_here = {
            let name = entry.lock().record.name.clone();
            self.vms().get(&name).is_some_and(|e| Arc::ptr_eq(e, entry))
        };
        // Removed meanwhile: its removal settled the migration.
        if !still_here
            || self
                .inner
                .migrations
                .get(id)
                .is_ok_and(|m| m.phase.is_finished())
        {
            return true;
        }
        {
            let mut s = entry.lock();
            if let Err(e) = self.place_arrived_volumes(&mut s.record) {
                if let Err(e) = self.save(&s) {
                    tracing::error!(error = %e, "saving the record after placing volumes");
                }
                tracing::warn!(migration = %id, error = %e, "placing a migrated volume; retrying");
                self.inner
                    .migrations
                    .update(id, false, |m| m.error = Some(format!("{e}; retrying")));
                return false;
            }
            super::remove_psk(&self.vm_dir(&s.record.name));
        }
        // The migration's end is recorded first: an agent that dies before
        // the VM's record follows finds it completed and clears the VM's
        // link to it at start (the other order left it in disk sync for
        // ever, and the source waiting).
        let ms = started.elapsed().as_millis() as u64;
        self.inner
            .migrations
            .finish(id, MigrationPhase::Completed, None, ms);
        {
            let mut s = entry.lock();
            s.record.migration = None;
            if let Err(e) = self.save(&s) {
                tracing::error!(error = %e, "saving the record after the disk sync");
            }
        }
        tracing::info!(migration = %id, ms, "disks synced");
        true
    }

    /// A synced disk on this host's storage for good: its file synced
    /// (which empties the page cache, so QEMU's flush is short), QEMU's
    /// caches flushed (the qcow2 metadata naming what the copy wrote), and
    /// the file synced again (QEMU does not report a failed flush).
    async fn make_durable(
        &self,
        entry: &VmEntry,
        qmp: &flotilla_qemu::QmpClient,
        disk: &str,
        node: &str,
    ) -> Result<(), String> {
        let path = entry
            .lock()
            .record
            .disks
            .iter()
            .find(|d| d.name == disk)
            .map(|d| d.path.clone());
        let Some(path) = path else { return Ok(()) };
        let sync = |path: std::path::PathBuf| async move {
            let shown = path.display().to_string();
            tokio::task::spawn_blocking(move || {
                std::fs::File::open(&path).and_then(|f| f.sync_all())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("syncing {shown}: {e}"))
        };
        sync(path.clone()).await?;
        flotilla_qemu::block::flush(qmp, node)
            .await
            .map_err(|e| e.to_string())?;
        sync(path).await
    }

    /// Volumes synced in the VM's directory move to this host's volumes
    /// (a rename: QEMU keeps its open file; the record follows at once).
    fn place_arrived_volumes(&self, record: &mut VmRecord) -> Result<(), String> {
        let dir = self.vm_dir(&record.name);
        let volumes_dir = self.inner.config.data_volumes_dir();
        for disk in record.disks.iter_mut() {
            let Some(volume) = disk.volume.clone() else {
                continue;
            };
            if !disk.path.starts_with(&dir) {
                continue;
            }
            let to = self.volume_path(&volume);
            if to.exists() {
                return Err(format!("volume {volume:?}: this host has one of that name"));
            }
            std::fs::create_dir_all(&volumes_dir)
                .and_then(|()| std::fs::rename(&disk.path, &to))
                .map_err(|e| {
                    format!(
                        "volume {volume:?}: placing it in {}: {e}",
                        volumes_dir.display()
                    )
                })?;
            disk.path = to;
            sync_dir(&volumes_dir)
                .and_then(|()| sync_dir(&dir))
                .map_err(|e| format!("volume {volume:?}: syncing its directory: {e}"))?;
        }
        Ok(())
    }

    pub(crate) async fn sync_disks(&self, entry: Arc<VmEntry>, id: String) {
        let started = Instant::now();
        loop {
            let (qmp, pending, state) = {
                let s = entry.lock();
                let pending: Vec<(String, u64, bool)> = s
                    .record
                    .disks
                    .iter()
                    .filter_map(|d| {
                        let layered = d.sync_from.as_ref()?.on_layer;
                        Some((d.name.clone(), d.size_mib << 20, layered))
                    })
                    .collect();
                (s.runtime.qmp.clone(), pending, s.record.state)
            };
            let still_here = self
                .vms()
                .get(&entry.lock().record.name)
                .is_some_and(|e| Arc::ptr_eq(e, &entry));
            if !still_here {
                // Removed (forced) before it had its disks: nothing of it
                // is to run anywhere; the source lets go too.
                self.inner.migrations.finish(
                    &id,
                    MigrationPhase::Failed,
                    Some("the VM was removed here before its disks were synced".into()),
                    started.elapsed().as_millis() as u64,
                );
                return;
            }
            let total: u64 = pending.iter().map(|(_, b, _)| b).sum();
            let Some((disk, _, layered)) = pending.first().cloned() else {
                // In post-copy the source still holds pages this QEMU has
                // not received: it may go only when memory is whole too.
                // An unanswered query (a QEMU stalled on a missing page)
                // is asked again; a QEMU that ended has no memory to wait
                // for.
                let post_copy = self.inner.migrations.get(&id).is_ok_and(|m| m.post_copy);
                if let (true, true, Some(qmp)) = (post_copy, state.has_process(), &qmp) {
                    let status = live::progress(qmp).await.map(|p| p.status);
                    if !status.is_ok_and(|s| s == "completed" || s == "none") {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
                // Whole (also when it stopped right after the last copy).
                if self.finish_sync(&entry, &id, started) {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            if !state.has_process() {
                // Crashed or stopped: its disks are this overlay over the
                // source's export, whole; the sync goes on when it runs.
                self.inner.migrations.update(&id, true, |m| {
                    m.error = Some(format!(
                        "the VM is {state}; its disk sync goes on when it runs again"
                    ))
                });
                return;
            }
            let Some(qmp) = qmp else { return };
            let book = &self.inner.migrations;
            book.update(&id, false, |m| {
                m.disk_total_bytes = m.disk_total_bytes.max(total)
            });
            let node = format!("disk-{disk}");
            let limit = book.get(&id).ok().and_then(|m| m.disk_sync_limit_bps);
            // Layered: the copy stops at the local base, which stays the
            // disk's backing (named in its header as a new VM's is).
            let base_node = flotilla_qemu::config::base_node_name(&node);
            let base = layered.then_some(live::StreamBase {
                node: &base_node,
                backing_file: BASE_DISK,
            });
            let streaming = Instant::now();
            let copied = live::stream_from_backing(&qmp, &node, limit, base, |done, _| {
                book.update(&id, false, |m| m.disk_synced_bytes = done);
            })
            .await;
            let stream_ms = streaming.elapsed().as_millis() as u64;
            // The node a live move added is off the chain now (or was never
            // used, after an agent restart): it goes.
            live::drop_layer_node(&qmp, &node).await;
            // On this host's disk for good before the source lets its copy
            // go (a QEMU killed before the guest's next flush would lose
            // what the copy wrote).
            let copied = match copied {
                Ok(()) => self.make_durable(&entry, &qmp, &disk, &node).await,
                Err(e) => Err(e.to_string()),
            };
            tracing::debug!(migration = %id, %disk, stream_ms,
                durable_ms = streaming.elapsed().as_millis() as u64 - stream_ms, "disk copied");
            match copied {
                Ok(()) => {
                    let mut s = entry.lock();
                    if let Some(d) = s.record.disks.iter_mut().find(|d| d.name == disk) {
                        d.sync_from = None;
                    }
                    if let Err(e) = self.save(&s) {
                        tracing::error!(error = %e, "saving the record after a disk sync");
                    }
                }
                Err(e) => {
                    tracing::warn!(migration = %id, disk = %disk, error = %e, "disk sync failed; retrying");
                    book.update(&id, true, |m| {
                        m.error = Some(format!("disk {disk}: {e}; retrying"))
                    });
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// A post-copy cut mid-way: this QEMU listens again for the source to
    /// resume sending the pages the VM still lacks.
    pub async fn recover_incoming(&self, id: &str) -> AgentResult<IncomingMigrationReady> {
        super::check_id(id)?;
        let info = self.inner.migrations.get(id)?;
        let entry = self.entry(&info.vm)?;
        let qmp = entry
            .lock()
            .runtime
            .qmp
            .clone()
            .ok_or_else(|| AgentError::conflict("the VM's QEMU is not connected", None))?;
        if info.role != MigrationRole::Target || !info.post_copy || info.phase.is_finished() {
            return Err(AgentError::conflict(
                format!("migration {id} has no post-copy in progress here"),
                None,
            ));
        }
        // Only out-of-band commands here: QEMU's main loop may be waiting
        // for a guest page the cut stream has not delivered. The source saw
        // the stream broken or stuck; this side may not have yet.
        let _ = live::pause_post_copy(&qmp).await;
        let ip = self.migration_ip()?;
        let at = std::net::SocketAddr::new(ip, super::free_port(ip)?);
        // Refused until the pause has taken effect.
        let mut tries = 0;
        while let Err(e) = live::listen_recover(&qmp, at).await {
            tries += 1;
            if tries == 50 {
                return Err(AgentError::conflict(
                    format!("migration {id}: QEMU does not listen again: {e}"),
                    None,
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!(
            migration = id,
            port = at.port(),
            "listening to resume a post-copy"
        );
        Ok(IncomingMigrationReady {
            host: ip.to_string(),
            port: at.port(),
        })
    }

    /// Removes what a migration made here before the switch-over (the
    /// source gave up); after it, the VM is this host's and stays. A
    /// finished migration's record is forgotten.
    pub async fn abort_incoming(&self, id: &str) -> AgentResult<()> {
        super::check_id(id)?;
        let info = match self.inner.migrations.get(id) {
            Ok(info) => info,
            Err(_) => {
                // Removed before it was made (a prepare still on its way):
                // a tombstone makes that prepare fail and undo itself.
                let mut tomb = new_record(id, "", MigrationRole::Target, "");
                tomb.phase = MigrationPhase::Cancelled;
                tomb.error = Some("removed before it was made".into());
                let _ = self.inner.migrations.put(tomb, None, None);
                return Ok(());
            }
        };
        if info.role == MigrationRole::Target && info.switch_over_ms.is_some() {
            return Err(AgentError::conflict(
                format!(
                    "migration {id} switched over: VM {:?} has run here",
                    info.vm
                ),
                None,
            ));
        }
        if info.phase.is_finished() {
            self.inner.migrations.forget(id);
            return Ok(());
        }
        if info.role != MigrationRole::Target {
            return Err(AgentError::conflict(
                format!("migration {id} is in progress"),
                Some(format!("cancel it with `flotilla migration cancel {id}`")),
            ));
        }
        if let Ok(entry) = self.entry(&info.vm) {
            {
                let _op = entry.op_lock.lock().await;
                // A switch-over that got in first wins.
                if self.inner.migrations.get(id)?.switch_over_ms.is_some() {
                    return Err(AgentError::conflict(
                        format!(
                            "migration {id} switched over: VM {:?} has run here",
                            info.vm
                        ),
                        None,
                    ));
                }
                let (state, ours) = {
                    let s = entry.lock();
                    (s.record.state, s.record.migration.as_deref() == Some(id))
                };
                if ours
                    && !matches!(
                        state,
                        VmState::Incoming | VmState::Crashed | VmState::Creating
                    )
                {
                    return Err(AgentError::conflict(
                        format!("VM {:?} already runs here ({state}): the migration is past its switch-over", info.vm),
                        None,
                    ));
                }
                // Ended under the lock: a switch-over after this refuses.
                self.inner.migrations.finish(
                    id,
                    MigrationPhase::Cancelled,
                    Some("the source gave up".into()),
                    0,
                );
                if !ours {
                    return Ok(());
                }
            }
            // Outside the lock: the removal takes it.
            self.remove_incoming(&entry).await;
            return Ok(());
        }
        self.inner.migrations.finish(
            id,
            MigrationPhase::Cancelled,
            Some("the source gave up".into()),
            0,
        );
        Ok(())
    }

    /// Kills the waiting QEMU and removes the half-made VM.
    pub(crate) async fn remove_incoming(&self, entry: &Arc<VmEntry>) {
        let (name, process) = {
            let mut s = entry.lock();
            s.runtime.stopping = true;
            (s.record.name.clone(), s.runtime.process.clone())
        };
        if let Some(p) = process {
            let _ = p.kill().await;
        }
        {
            let mut s = entry.lock();
            if s.record.state == VmState::Creating {
                s.record.state = VmState::Stopped;
            }
            self.settle_exited(entry, &mut s, VmState::Stopped, None);
        }
        if let Err(e) = self.delete_vm(&name, true, false).await {
            tracing::error!(vm = %name, error = %e, "removing a half-made incoming VM");
        }
    }
}

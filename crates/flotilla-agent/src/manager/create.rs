//! Creating and removing VMs: directory, disks, addresses, record.

use std::collections::HashSet;
use std::fs;

use flotilla_api::{CreateVmRequest, Resources, VmInfo, VmState};
use flotilla_image::DEFAULT_IMAGE;

use super::{VmEntry, VmManager};
use crate::disks;
use crate::error::{AgentError, AgentResult};
use crate::fsutil::sync_dir;
use crate::network::{allocate_ip, allocate_mac, tap_name};
use crate::record::{
    now_rfc3339, DiskRecord, NicRecord, VmRecord, CREATING_PREFIX, DELETING_PREFIX,
    RECORD_FORMAT_VERSION,
};
use crate::spec::VmSpec;

/// Root disk file inside a VM's directory.
pub const ROOT_DISK: &str = "root.qcow2";
/// The image's root disk, pinned into the VM's directory: the read-only base
/// of `ROOT_DISK`. Pinning (a hard link, so no copy) keeps the VM's files
/// when the image is replaced or removed later.
pub const BASE_DISK: &str = "base.qcow2";
pub const KERNEL: &str = "vmlinux";
pub const INITRD: &str = "initrd";

/// Hard-links `src` to `dst`, copying when they are on different file systems.
pub(crate) fn pin(src: &std::path::Path, dst: &std::path::Path) -> std::io::Result<()> {
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(_) => fs::copy(src, dst).map(|_| ()),
    }
}

pub(crate) fn new_vm_id() -> String {
    let b: [u8; 8] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A random machine-id, as systemd writes them: 128 bits in hex.
pub(crate) fn new_machine_id() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl VmManager {
    /// Creates a VM and, unless asked not to, starts it (booting, or from
    /// a snapshot).
    pub async fn create(&self, req: CreateVmRequest) -> AgentResult<VmInfo> {
        super::from_layer::check_not_reserved(&req.name)?;
        self.create_unchecked(req).await
    }

    /// [`create`](Self::create) without the reserved-name check.
    pub(crate) async fn create_unchecked(&self, req: CreateVmRequest) -> AgentResult<VmInfo> {
        let spec = VmSpec::from_request(req)?;
        if let Some(from) = spec.from_snapshot.clone() {
            return self.create_from_snapshot(spec, &from).await;
        }
        let image_name = spec
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        let image = self.inner.images.get(&image_name)?;
        let cap = self.inner.config.capacity;
        if spec.memory_mib > cap.memory_mib || spec.vcpus > cap.vcpus {
            return Err(AgentError::InvalidArgument(format!(
                "the VM asks for {} vCPUs and {} MiB, more than this host has in all ({} vCPUs, {} MiB)",
                spec.vcpus, spec.memory_mib, cap.vcpus, cap.memory_mib
            )));
        }
        if spec.start {
            // Refuse early what could never start; start() checks again under the lock.
            let cap = self.inner.config.capacity;
            let needed = Resources {
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
            };
            crate::capacity::check_fits(cap, self.allocated(), needed)?;
        }

        let entry = {
            // Name, addresses and MACs are taken under the admission lock so
            // two concurrent creates never get the same ones.
            let _admission = self.inner.admission.lock().await;
            let _name = self.reserve_vm_name(&spec.name)?;
            let mut record = self.build_record(&spec, &image_name, &image)?;
            if !spec.start {
                // Settled before anyone else can see the VM.
                record.state = VmState::Stopped;
            }
            self.materialize(&record, &image)?;
            let entry = VmEntry::new(record);
            self.vms().insert(spec.name.clone(), entry.clone());
            entry
        };
        tracing::info!(vm = %spec.name, image = %image_name, "created");
        if spec.start {
            if let Err(e) = self.start_entry(&entry, false).await {
                // `run` is one operation: a VM that could not be started is
                // removed again rather than left behind half made.
                tracing::warn!(vm = %spec.name, error = %e, "start failed; removing the new VM");
                if let Err(cleanup) = self.delete(&spec.name, true).await {
                    tracing::error!(vm = %spec.name, error = %cleanup, "could not remove the VM after a failed start");
                }
                return Err(e);
            }
            if spec.wait_ready {
                // QEMU runs: a guest that does not come up is kept, with its
                // console log, for the user to look at.
                self.wait_ready(&entry, self.inner.config.ready_timeout)
                    .await
                    .map_err(|e| self.with_console_tail(&spec.name, e))?;
            }
        }
        Ok(self.info_of(&entry))
    }

    fn build_record(
        &self,
        spec: &VmSpec,
        image_name: &str,
        image: &flotilla_image::Image,
    ) -> AgentResult<VmRecord> {
        let id = new_vm_id();
        let nics = self.allocate_nics(&id, spec.nics as usize, spec.ip)?;
        let dir = self.vm_dir(&spec.name);
        let mut disks = Vec::new();
        if let Some(rootfs) = &image.rootfs {
            let (_, size_mib) = disks::inspect(rootfs)?;
            disks.push(DiskRecord {
                name: "root".into(),
                path: dir.join(ROOT_DISK),
                format: "qcow2".into(),
                size_mib,
                backing: Some(dir.join(BASE_DISK)),
                read_only: false,
                sync_from: None,
                volume: None,
            });
        }
        for d in &spec.disks {
            if let Some(volume) = &d.volume {
                disks.push(self.volume_disk(&d.name, volume)?);
                continue;
            }
            disks.push(DiskRecord {
                name: d.name.clone(),
                path: dir.join(format!("disk-{}.qcow2", d.name)),
                format: "qcow2".into(),
                size_mib: d.size_mib,
                backing: None,
                read_only: false,
                sync_from: None,
                volume: None,
            });
        }
        Ok(VmRecord {
            format_version: RECORD_FORMAT_VERSION,
            id,
            name: spec.name.clone(),
            image: image_name.to_string(),
            kernel: dir.join(KERNEL),
            initrd: image.initrd.as_ref().map(|_| dir.join(INITRD)),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            cmdline_extra: spec.cmdline_extra.clone(),
            tags: spec.tags.clone(),
            disks,
            nics,
            state: VmState::Creating,
            created_at: now_rfc3339(),
            started_at: None,
            process: None,
            accel: None,
            guest_boot_ms: None,
            ready_ms: None,
            last_error: None,
            snapshot_head: None,
            pending_snapshot: None,
            machine_id: Some(new_machine_id()),
            identity_pending: false,
            pending_move: None,
            migration: None,
        })
    }

    /// Addresses and MACs no other VM has, for a new VM `id` (its first NIC
    /// at `requested`, if given). Call under the admission lock, so two
    /// creates never get the same ones.
    pub(crate) fn allocate_nics(
        &self,
        id: &str,
        count: usize,
        requested: Option<std::net::Ipv4Addr>,
    ) -> AgentResult<Vec<NicRecord>> {
        let cfg = &self.inner.config;
        // Addresses routed to VMs elsewhere (other hosts' VMs, VMs that
        // moved away) are not free here.
        let mut used_ips: HashSet<_> = self.inner.routes.addresses().into_iter().collect();
        let mut used_macs = HashSet::new();
        for e in self.vms().values() {
            for n in &e.lock().record.nics {
                used_ips.insert(n.ip);
                used_macs.insert(n.mac.clone());
            }
        }
        if let Some(ip) = requested {
            if !cfg.subnet.is_vm_address(ip) {
                return Err(AgentError::InvalidArgument(format!(
                    "ip {ip} is not a VM address of this host's subnet {} (not its network, gateway or broadcast address)",
                    cfg.subnet
                )));
            }
            if used_ips.contains(&ip) {
                return Err(AgentError::conflict(
                    format!("ip {ip} is taken (by a VM here, or routed to one on another host)"),
                    Some("leave ip out to get the next free address".to_string()),
                ));
            }
        }
        let mut nics = Vec::new();
        for i in 0..count {
            let ip = match requested.filter(|_| i == 0) {
                Some(ip) => ip,
                None => allocate_ip(&cfg.subnet, &used_ips)?,
            };
            used_ips.insert(ip);
            let mac = allocate_mac(&used_macs);
            used_macs.insert(mac.clone());
            nics.push(NicRecord {
                mac,
                ip,
                prefix_len: cfg.subnet.prefix_len(),
                gateway: cfg.subnet.gateway(),
                tap: tap_name(id, i),
            });
        }
        Ok(nics)
    }

    /// Writes the VM's directory under a temporary name, then renames it into
    /// place: a crash before the rename leaves only a `.creating-` leftover
    /// that the next start removes.
    fn materialize(&self, record: &VmRecord, image: &flotilla_image::Image) -> AgentResult<()> {
        let vms_dir = self.inner.config.vms_dir();
        let tmp = vms_dir.join(format!("{CREATING_PREFIX}{}", record.id));
        let result = (|| -> AgentResult<()> {
            fs::create_dir_all(&tmp).map_err(|e| AgentError::io("creating VM directory", e))?;
            let pin_into = |src: &std::path::Path, name: &str| {
                pin(src, &tmp.join(name)).map_err(|e| {
                    AgentError::io(format!("pinning {} into the VM", src.display()), e)
                })
            };
            pin_into(&image.kernel, KERNEL)?;
            if let Some(initrd) = &image.initrd {
                pin_into(initrd, INITRD)?;
            }
            if let Some(rootfs) = &image.rootfs {
                pin_into(rootfs, BASE_DISK)?;
            }
            // A volume is there already, outside the VM's directory.
            for d in record.disks.iter().filter(|d| d.volume.is_none()) {
                let at = tmp.join(d.path.file_name().unwrap_or_default());
                match &d.backing {
                    // Relative, so the overlay keeps working after the
                    // directory is renamed into place.
                    Some(_) => {
                        let fmt = image.rootfs_format.as_deref().unwrap_or("qcow2");
                        disks::create_overlay(&at, std::path::Path::new(BASE_DISK), fmt)?
                    }
                    None => disks::create_blank(&at, d.size_mib)?,
                }
            }
            record.save(&tmp)?;
            let dest = vms_dir.join(&record.name);
            fs::rename(&tmp, &dest).map_err(|e| AgentError::io("placing VM directory", e))?;
            sync_dir(&vms_dir).map_err(|e| AgentError::io("syncing VM directory", e))?;
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Removes a stopped VM with its disks. `force` stops a running one first.
    pub async fn delete(&self, name: &str, force: bool) -> AgentResult<()> {
        self.delete_vm(name, force, true).await
    }

    /// [`delete`](Self::delete); with `keep_arriving`, refused while a
    /// volume is still arriving (a half-made incoming VM goes whole).
    pub(crate) async fn delete_vm(
        &self,
        name: &str,
        force: bool,
        keep_arriving: bool,
    ) -> AgentResult<()> {
        let entry = self.entry(name).map_err(|e| match e {
            // Not "no such VM" while it is being made: whoever removes VMs
            // by that answer (a control plane terminating an instance) would
            // take it as gone, and the VM would appear after.
            AgentError::VmNotFound { .. } if self.name_pending(&format!("vm:{name}")) => {
                AgentError::conflict(
                    format!("VM {name:?} is being created"),
                    Some("remove it once it is made".into()),
                )
            }
            e => e,
        })?;
        // A volume still arriving holds the only copy of what the guest
        // wrote since the switch-over: removing the VM would lose it.
        let arriving = {
            let s = entry.lock();
            let dir = self.vm_dir(name);
            s.record
                .disks
                .iter()
                .find(|d| d.volume.is_some() && d.path.starts_with(&dir))
                .and_then(|d| d.volume.clone())
        };
        if let Some(volume) = arriving.filter(|_| keep_arriving) {
            return Err(AgentError::conflict(
                format!("VM {name:?} is still receiving volume {volume:?} from its source"),
                Some("remove it once its migration has completed (`flotilla migration ls`)".into()),
            ));
        }
        if entry.lock().record.state.has_process() {
            if !force {
                return Err(AgentError::conflict(
                    format!("VM {name:?} is running"),
                    Some(format!(
                        "stop it first (`flotilla vm stop {name}`) or remove it with --force"
                    )),
                ));
            }
            self.stop(name, true, None).await?;
        }
        let _op = entry.op_lock.lock().await;
        self.drop_standby(&entry).await;
        let id = {
            let s = entry.lock();
            if s.record.state.has_process() {
                return Err(AgentError::conflict(
                    format!("VM {name:?} was started again while being removed"),
                    None,
                ));
            }
            for n in &s.record.nics {
                crate::network::delete_tap(&n.tap)?;
            }
            (s.record.id.clone(), s.record.snapshot_head.clone())
        };
        let (id, snapshot_head) = id;
        self.removed_while_syncing(&entry.lock().record);
        // Disks moved into volume directories live outside the VM's
        // directory, and go with it; the host's volumes stay.
        let outside: Vec<std::path::PathBuf> = entry
            .lock()
            .record
            .disks
            .iter()
            .filter(|d| d.volume.is_none() && !d.path.starts_with(self.vm_dir(name)))
            .map(|d| d.path.clone())
            .collect();
        let vms_dir = self.inner.config.vms_dir();
        let doomed = vms_dir.join(format!("{DELETING_PREFIX}{id}"));
        fs::rename(self.vm_dir(name), &doomed)
            .map_err(|e| AgentError::io("moving VM directory aside", e))?;
        self.vms().remove(name);
        let _ = sync_dir(&vms_dir);
        self.remove_sockets(&id);
        fs::remove_dir_all(&doomed).map_err(|e| AgentError::io("removing VM directory", e))?;
        for path in outside {
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(vm = name, path = %path.display(), error = %e, "removing a disk in a volume");
            }
        }
        if let Some(head) = snapshot_head {
            // Its snapshot chain goes too, unless something else holds it.
            let store = &self.inner.snapshots;
            let head = flotilla_snapshot::LayerId(head);
            if let Err(e) = store.remove_ref(&head, &super::suspend::holder(name)) {
                tracing::warn!(vm = name, error = %e, "releasing the snapshot chain");
            }
            match store.gc() {
                Ok(r) => tracing::info!(
                    vm = name,
                    layers = r.removed.len(),
                    bytes = r.bytes_freed,
                    "snapshot layers freed"
                ),
                Err(e) => tracing::warn!(vm = name, error = %e, "snapshot garbage collection"),
            }
        }
        tracing::info!(vm = name, "removed");
        Ok(())
    }

    pub(crate) fn remove_sockets(&self, id: &str) {
        let dir = self.inner.config.sockets_dir();
        // `mig`: an incoming stream's socket a killed QEMU left.
        for suffix in ["qmp", "agent", "mig"] {
            let _ = fs::remove_file(dir.join(format!("{id}.{suffix}")));
        }
    }
}

//! New VMs from a snapshot layer (clones, named snapshots, image bases).
//! Such a VM is created suspended at the layer with `identity_pending`, then
//! resumed: the guest agent gives it its own MAC, IP, hostname, machine-id
//! and RNG state before its network link comes up.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::VmState;
use flotilla_snapshot::{LayerId, LayerManifest};

use super::create::{new_machine_id, INITRD, KERNEL, ROOT_DISK};
use super::layers::{
    data_disk_order, label, LABEL_CMDLINE_EXTRA, LABEL_IMAGE, LABEL_MEMORY_MIB, LABEL_NICS,
    LABEL_VCPUS, PIN_INITRD, PIN_KERNEL,
};
use super::suspend::{holder, replace_memory_image};
use super::{VmEntry, VmManager};
use crate::error::{AgentError, AgentResult};
use crate::fsutil::sync_dir;
use crate::record::{now_rfc3339, DiskRecord, VmRecord, CREATING_PREFIX, RECORD_FORMAT_VERSION};

/// Memory images on their way into a new VM's directory, in `vms/`.
pub const STAGING_PREFIX: &str = ".staging-memory-";

impl VmManager {
    /// A fresh path in `vms/` for a memory image on its way into a new VM.
    pub(crate) fn staging_memory_path(&self) -> std::path::PathBuf {
        self.inner
            .config
            .vms_dir()
            .join(format!("{STAGING_PREFIX}{:016x}", rand::random::<u64>()))
    }
}

/// Names starting with the base VMs' prefix are the agent's.
pub(crate) fn check_not_reserved(name: &str) -> AgentResult<()> {
    if name.starts_with(super::bases::BASE_VM_PREFIX) {
        return Err(AgentError::InvalidArgument(format!(
            "name: {name:?} is not accepted: names starting with {:?} are reserved for the agent's base snapshots",
            super::bases::BASE_VM_PREFIX
        )));
    }
    Ok(())
}
/// How a VM started from a layer is set up.
pub(crate) struct FromLayer<'a> {
    pub name: &'a str,
    pub layer: &'a LayerManifest,
    pub tags: BTreeMap<String, String>,
    pub read_only_root: bool,
    /// The layer's memory image, if the caller has it: moved into the VM.
    pub memory: Option<&'a Path>,
    /// `memory` was captured moments ago by this agent (a clone), so the
    /// first restore need not verify the layer it was just stored as.
    pub memory_fresh: bool,
    pub start: bool,
    /// The first NIC's address, when the caller picked it.
    pub ip: Option<std::net::Ipv4Addr>,
}

impl VmManager {
    pub(crate) fn check_name_free(&self, name: &str) -> AgentResult<()> {
        if self.vms().contains_key(name) {
            return Err(AgentError::VmExists {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Creates VM `from.name` suspended at `from.layer` with a new identity
    /// and, if asked, resumes it until its guest agent answers. The VM holds
    /// the layer as `vm:NAME`. A VM that cannot be brought up is removed.
    pub(crate) async fn create_from_layer(
        &self,
        from: FromLayer<'_>,
    ) -> AgentResult<flotilla_api::VmInfo> {
        let layer = from.layer;
        let vcpus: u32 = label(layer, LABEL_VCPUS)?;
        let memory_mib: u64 = label(layer, LABEL_MEMORY_MIB)?;
        let nic_count: usize = label(layer, LABEL_NICS)?;
        let image: String = label(layer, LABEL_IMAGE)?;
        let store = &self.inner.snapshots;
        let kernel = store
            .pinned_path(layer, PIN_KERNEL)
            .filter(|k| k.exists())
            .ok_or_else(|| {
                AgentError::conflict(
                    format!(
                        "snapshot layer {} has no pinned kernel (written by an older agent, or its pinned file is gone): it cannot start a new VM",
                        layer.id
                    ),
                    Some("resume its VM and snapshot it again".into()),
                )
            })?;
        let initrd = store.pinned_path(layer, PIN_INITRD);
        if let Some(missing) = initrd.as_ref().filter(|i| !i.exists()) {
            return Err(AgentError::conflict(
                format!(
                    "snapshot layer {}: its pinned initramfs {} is missing: it cannot start a new VM",
                    layer.id,
                    missing.display()
                ),
                None,
            ));
        }
        let layer_disk = store.disk_path(&layer.id);
        let data_disks = data_disk_order(store, layer)?;
        let entry = {
            let _admission = self.inner.admission.lock().await;
            self.check_name_free(from.name)?;
            let id = super::create::new_vm_id();
            let dir = self.vm_dir(from.name);
            // The root disk, then the data disks, as the layer has them.
            let root = layer_disk
                .iter()
                .map(|disk| ("root".to_string(), dir.join(ROOT_DISK), disk.clone()));
            let data = data_disks.iter().filter_map(|name| {
                let disk = store.extra_disk_path(&layer.id, name)?;
                Some((name.clone(), dir.join(format!("disk-{name}.qcow2")), disk))
            });
            let disks = root
                .chain(data)
                .map(|(name, path, disk)| DiskRecord {
                    path,
                    format: "qcow2".into(),
                    size_mib: crate::disks::inspect(&disk).map(|(_, s)| s).unwrap_or(0),
                    read_only: from.read_only_root && name == "root",
                    sync_from: None,
                    name,
                    backing: Some(disk),
                    volume: None,
                })
                .collect();
            let record = VmRecord {
                format_version: RECORD_FORMAT_VERSION,
                nics: self.allocate_nics(&id, nic_count, from.ip)?,
                id,
                name: from.name.to_string(),
                image,
                kernel: dir.join(KERNEL),
                initrd: initrd.as_ref().map(|_| dir.join(INITRD)),
                vcpus,
                memory_mib,
                cmdline_extra: layer
                    .labels
                    .get(LABEL_CMDLINE_EXTRA)
                    .cloned()
                    .unwrap_or_default(),
                tags: from.tags.clone(),
                disks,
                state: VmState::Suspended,
                created_at: now_rfc3339(),
                started_at: None,
                process: None,
                accel: None,
                guest_boot_ms: None,
                ready_ms: None,
                last_error: None,
                snapshot_head: Some(layer.id.0.clone()),
                pending_snapshot: None,
                machine_id: Some(new_machine_id()),
                identity_pending: true,
                pending_move: None,
                migration: None,
            };
            store.add_ref(&layer.id, &holder(from.name))?;
            let placed =
                self.place_from_layer(&record, &kernel, initrd.as_deref(), from.memory, &layer.id);
            if let Err(e) = placed {
                let _ = store.remove_ref(&layer.id, &holder(from.name));
                return Err(e);
            }
            let entry = VmEntry::new(record);
            entry.lock().runtime.memory_just_captured = from.memory.is_some() && from.memory_fresh;
            self.vms().insert(from.name.to_string(), entry.clone());
            entry
        };
        tracing::info!(vm = from.name, layer = %layer.id, "created from a snapshot");
        if from.start {
            if let Err(e) = self.resume(from.name, true).await {
                tracing::warn!(vm = from.name, error = %e, "could not start from the snapshot; removing the new VM");
                if let Err(cleanup) = self.delete(from.name, true).await {
                    tracing::error!(vm = from.name, error = %cleanup, "could not remove the VM");
                }
                return Err(e);
            }
        }
        Ok(self.info_of(&entry))
    }

    /// Writes the directory of a VM made from a layer: kernel and initrd
    /// pinned, the layer's memory image if given, the record; renamed into
    /// place once complete.
    fn place_from_layer(
        &self,
        record: &VmRecord,
        kernel: &Path,
        initrd: Option<&Path>,
        memory: Option<&Path>,
        layer: &LayerId,
    ) -> AgentResult<()> {
        let vms_dir = self.inner.config.vms_dir();
        let tmp = vms_dir.join(format!("{CREATING_PREFIX}{}", record.id));
        let result = (|| -> AgentResult<()> {
            std::fs::create_dir_all(&tmp)
                .map_err(|e| AgentError::io("creating VM directory", e))?;
            super::create::pin(kernel, &tmp.join(KERNEL))
                .map_err(|e| AgentError::io("pinning the kernel into the VM", e))?;
            if let Some(initrd) = initrd {
                super::create::pin(initrd, &tmp.join(INITRD))
                    .map_err(|e| AgentError::io("pinning the initramfs into the VM", e))?;
            }
            for disk in &record.disks {
                if let (Some(backing), Some(file)) = (&disk.backing, disk.path.file_name()) {
                    crate::disks::create_overlay(&tmp.join(file), backing, "qcow2")?;
                }
            }
            if let Some(memory) = memory {
                let placed = tmp.join(".memory.tmp");
                std::fs::rename(memory, &placed)
                    .map_err(|e| AgentError::io("placing the memory image", e))?;
                replace_memory_image(&placed, layer)?;
            }
            record.save(&tmp)?;
            let dest = vms_dir.join(&record.name);
            std::fs::rename(&tmp, &dest).map_err(|e| AgentError::io("placing VM directory", e))?;
            sync_dir(&vms_dir).map_err(|e| AgentError::io("syncing VM directory", e))?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Gives a VM restored from another VM's snapshot its own identity and
    /// the current time, through its guest agent; returns the connection.
    pub(crate) async fn apply_identity(
        &self,
        record: &VmRecord,
    ) -> AgentResult<Arc<flotilla_guest_protocol::GuestClient>> {
        use flotilla_guest_protocol::{GuestClient, IdentityRequest, InterfaceIdentity};
        let socket = self.agent_socket(record);
        let timeout = self.inner.config.ready_timeout;
        let started = Instant::now();
        let (client, _) = GuestClient::wait_ready(&socket, timeout)
            .await
            .map_err(|e| {
                AgentError::Snapshot(format!("the restored guest's agent does not answer: {e}"))
            })?;
        let connected = started.elapsed();
        let machine_id = record.machine_id.clone().unwrap_or_else(new_machine_id);
        let identity = IdentityRequest {
            hostname: record.name.clone(),
            machine_id,
            interfaces: record
                .nics
                .iter()
                .enumerate()
                .map(|(i, n)| InterfaceIdentity {
                    name: format!("eth{i}"),
                    mac: n.mac.clone(),
                    addresses: vec![format!("{}/{}", n.ip, n.prefix_len)],
                    gateway: (i == 0).then(|| n.gateway.to_string()),
                })
                .collect(),
            rng_seed: [rand::random::<[u8; 32]>(), rand::random::<[u8; 32]>()].concat(),
        };
        let applied_ms = client
            .set_identity(identity, IDENTITY_TIMEOUT)
            .await
            .map_err(|e| AgentError::Snapshot(format!("giving the guest its identity: {e}")))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        if let Err(e) = client.set_clock(now, IDENTITY_TIMEOUT).await {
            tracing::warn!(vm = %record.name, error = %e, "could not correct the guest clock");
        }
        tracing::info!(
            vm = %record.name,
            connect_ms = connected.as_millis() as u64,
            applied_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "guest took its own identity"
        );
        Ok(Arc::new(client))
    }
}

const IDENTITY_TIMEOUT: Duration = Duration::from_secs(10);

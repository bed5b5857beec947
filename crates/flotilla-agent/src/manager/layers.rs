//! Writing a VM's state into a snapshot layer: shared by suspend, named
//! snapshots, clones and image bases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flotilla_snapshot::{LayerId, LayerManifest, NewLayer, SnapshotStore};

use super::suspend::{memory_image_layer, MEMORY_IMAGE};
use super::VmManager;
use crate::disks;
use crate::error::{AgentError, AgentResult};
use crate::record::VmRecord;

/// Label keys on layers: what the agent needs to start a VM from a layer
/// whose VM may be gone.
pub const LABEL_KIND: &str = "kind";
pub const LABEL_VM: &str = "vm";
pub const LABEL_IMAGE: &str = "image";
pub const LABEL_VCPUS: &str = "vcpus";
pub const LABEL_MEMORY_MIB: &str = "memory_mib";
pub const LABEL_NICS: &str = "nics";
pub const LABEL_CMDLINE_EXTRA: &str = "cmdline_extra";
/// The VM's data disks, comma-separated, in attachment order.
pub const LABEL_DATA_DISKS: &str = "data_disks";
/// Data disks that are the host's volumes (not in the layer).
pub const LABEL_VOLUME_DISKS: &str = "volume_disks";
/// Pinned-file roles.
pub const PIN_KERNEL: &str = "kernel";
pub const PIN_INITRD: &str = "initrd";
pub const PIN_DISK_BASE: &str = "disk-base";

/// Copies of a VM's disks on their way into a layer.
#[derive(Default)]
pub(crate) struct CopiedDisks {
    pub root: Option<PathBuf>,
    pub extra: BTreeMap<String, PathBuf>,
    pub pins: BTreeMap<String, PathBuf>,
}

impl CopiedDisks {
    /// Removes the copies the store did not take.
    pub fn remove_files(&self) {
        for path in self.root.iter().chain(self.extra.values()) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A layer about to be written: files the caller captured, and what the
/// layer is.
pub(crate) struct Capture {
    pub memory: PathBuf,
    pub disks: CopiedDisks,
    pub parent: Option<LayerId>,
    pub parent_memory: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
}

impl VmManager {
    /// Copies the VM's disks (only their changes, for overlays) next to it
    /// as `<tmp_prefix>-<disk>.tmp`, the root backed by what it will sit on
    /// inside the store: its head layer's disk, or for a first layer the
    /// VM's base disk pinned into the store. Data disks are overlays of
    /// layer disks already, or standalone. QEMU must be paused (its disks
    /// flushed). Returns the copies and the files the layer must pin.
    pub(crate) fn copy_disks_for_layer(
        &self,
        record: &VmRecord,
        tmp_prefix: &str,
    ) -> AgentResult<CopiedDisks> {
        super::migrate::check_disks_whole(record)?;
        let store = &self.inner.snapshots;
        let dir = self.vm_dir(&record.name);
        let mut copied = CopiedDisks::default();
        copied
            .pins
            .insert(PIN_KERNEL.to_string(), record.kernel.clone());
        if let Some(initrd) = &record.initrd {
            copied.pins.insert(PIN_INITRD.to_string(), initrd.clone());
        }
        let result = (|| {
            // The host's volumes are not the VM's: they stay as they are.
            for disk in record.disks.iter().filter(|d| d.volume.is_none()) {
                let tmp = dir.join(format!("{tmp_prefix}-{}.tmp", disk.name));
                std::fs::copy(&disk.path, &tmp)
                    .map_err(|e| AgentError::io(format!("copying disk {}", disk.name), e))?;
                if disk.name == "root" {
                    if let Some(backing) = &disk.backing {
                        let target = if backing.starts_with(store.root()) {
                            backing.clone()
                        } else {
                            copied
                                .pins
                                .insert(PIN_DISK_BASE.to_string(), backing.clone());
                            store.pin_path_for(backing)?
                        };
                        disks::rebase_unsafe(&tmp, &target, "qcow2")?;
                    }
                    copied.root = Some(tmp);
                } else {
                    copied.extra.insert(disk.name.clone(), tmp);
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            copied.remove_files();
            return Err(e);
        }
        Ok(copied)
    }

    /// What a new layer of this VM is a diff against: the VM's latest layer
    /// whose memory image it keeps (its last suspend or named snapshot), else
    /// its head (rebuilt from the chain), else its image's base snapshot,
    /// else nothing.
    pub(crate) fn diff_parent(&self, record: &VmRecord) -> (Option<LayerId>, Option<PathBuf>) {
        let dir = self.vm_dir(&record.name);
        if let Some(kept) = memory_image_layer(&dir).map(LayerId) {
            if self.inner.snapshots.get(&kept).is_ok() {
                return (Some(kept), Some(dir.join(MEMORY_IMAGE)));
            }
        }
        if let Some(head) = &record.snapshot_head {
            let memory = (memory_image_layer(&dir).as_deref() == Some(head.as_str()))
                .then(|| dir.join(MEMORY_IMAGE));
            return (Some(LayerId(head.clone())), memory);
        }
        match self.find_base_for(record) {
            Some((layer, memory)) => (Some(layer), Some(memory)),
            None => (None, None),
        }
    }

    /// Labels every layer of `record` carries.
    pub(crate) fn layer_labels(&self, record: &VmRecord, kind: &str) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_KIND.into(), kind.into());
        labels.insert(LABEL_VM.into(), record.name.clone());
        labels.insert(LABEL_IMAGE.into(), record.image.clone());
        labels.insert(LABEL_VCPUS.into(), record.vcpus.to_string());
        labels.insert(LABEL_MEMORY_MIB.into(), record.memory_mib.to_string());
        labels.insert(LABEL_NICS.into(), record.nics.len().to_string());
        if !record.cmdline_extra.is_empty() {
            labels.insert(LABEL_CMDLINE_EXTRA.into(), record.cmdline_extra.clone());
        }
        // Data disks in the VM's order: QEMU attaches them to slots in that
        // order, and the saved device state follows the slots.
        let data: Vec<&str> = record
            .disks
            .iter()
            .filter(|d| d.name != "root")
            .map(|d| d.name.as_str())
            .collect();
        labels.insert(LABEL_DATA_DISKS.into(), data.join(","));
        let volumes: Vec<&str> = record
            .disks
            .iter()
            .filter(|d| d.volume.is_some())
            .map(|d| d.name.as_str())
            .collect();
        if !volumes.is_empty() {
            labels.insert(LABEL_VOLUME_DISKS.into(), volumes.join(","));
        }
        labels
    }
}

/// Stores `capture` as a layer held by `holder` (blocking: run it off the
/// async threads). The disk file is moved into the layer; the memory file
/// is left to the caller.
pub(crate) fn store_layer(
    store: &SnapshotStore,
    capture: &Capture,
    holder: &str,
) -> AgentResult<LayerManifest> {
    let pins = capture
        .disks
        .pins
        .iter()
        .map(|(k, v)| (k.clone(), v.as_path()))
        .collect();
    let extra_disks = capture
        .disks
        .extra
        .iter()
        .map(|(k, v)| (k.clone(), v.as_path()))
        .collect();
    let layer = store.create_layer_with_ref(
        NewLayer {
            parent: capture.parent.as_ref(),
            memory: &capture.memory,
            parent_memory: capture.parent_memory.as_deref(),
            disk: capture.disks.root.as_deref(),
            extra_disks,
            pins,
            labels: capture.labels.clone(),
        },
        holder,
    )?;
    Ok(layer)
}

pub(crate) fn root_disk(record: &VmRecord) -> Option<&crate::record::DiskRecord> {
    record.disks.first().filter(|d| d.name == "root")
}

/// A layer label parsed, for starting a VM from the layer.
pub(crate) fn label<T: std::str::FromStr>(layer: &LayerManifest, key: &str) -> AgentResult<T> {
    layer
        .labels
        .get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            AgentError::conflict(
                format!(
                    "snapshot layer {} has no usable {key:?} label (it was written by an older agent): it cannot start a new VM",
                    layer.id
                ),
                Some("resume its VM and snapshot it again".into()),
            )
        })
}

/// Removes the disk copies (`<prefix>-<disk>.tmp`) a capture left in `dir`.
pub(crate) fn remove_tmp_disks(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The layer's copy of the VM disk named `disk` (`root` or a data disk).
pub(crate) fn layer_disk(store: &SnapshotStore, layer: &LayerId, disk: &str) -> Option<PathBuf> {
    match disk {
        "root" => store.disk_path(layer),
        name => store.extra_disk_path(layer, name),
    }
}

/// The layer's data disks in the VM's attachment order: from its label;
/// a layer written before the label existed, with no data disk copies,
/// has none. Refused when the layer lacks a listed disk's copy.
pub(crate) fn data_disk_order(
    store: &SnapshotStore,
    layer: &LayerManifest,
) -> AgentResult<Vec<String>> {
    let names: Vec<String> = match layer.labels.get(LABEL_DATA_DISKS) {
        Some(list) => list
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect(),
        None if layer.extra_disks.is_empty() => Vec::new(),
        None => layer.extra_disks.keys().cloned().collect(),
    };
    let volumes = layer.labels.get(LABEL_VOLUME_DISKS);
    for name in &names {
        if volumes.is_some_and(|v| v.split(',').any(|n| n == name)) {
            return Err(AgentError::conflict(
                format!(
                    "snapshot layer {} is of a VM with a volume attached (disk {name:?}): a VM started from it would lack it",
                    layer.id
                ),
                None,
            ));
        }
        if store.extra_disk_path(&layer.id, name).is_none() {
            return Err(AgentError::conflict(
                format!(
                    "snapshot layer {} has no copy of data disk {name:?}: it cannot start a new VM",
                    layer.id
                ),
                Some("resume its VM and snapshot it again".into()),
            ));
        }
    }
    Ok(names)
}

/// A suspended VM's head can stand for the VM elsewhere (a clone, a named
/// snapshot) only if it holds every data disk: an older agent left them
/// in place instead.
pub(crate) fn check_head_has_disks(record: &VmRecord, layer: &LayerManifest) -> AgentResult<()> {
    let missing: Vec<&str> = record
        .disks
        .iter()
        .filter(|d| d.name != "root" && !layer.extra_disks.contains_key(&d.name))
        .map(|d| d.name.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(AgentError::conflict(
        format!(
            "VM {:?} was suspended without its data disks ({}) in its snapshot",
            record.name,
            missing.join(", ")
        ),
        Some("resume it, then clone or snapshot it again".into()),
    ))
}

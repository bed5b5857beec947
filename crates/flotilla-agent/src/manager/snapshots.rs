//! Snapshots as users see them: named snapshots of VMs, listing, removal
//! (refused while anything depends on the snapshot), and starting a VM
//! from one.

use std::collections::HashMap;

use flotilla_api::{SnapshotCreated, SnapshotInfo, SnapshotKind, VmInfo, VmState};
use flotilla_image::DEFAULT_IMAGE;
use flotilla_snapshot::{LayerId, LayerManifest};

use super::bases::BaseShape;
use super::from_layer::FromLayer;
use super::layers::{
    label, LABEL_IMAGE, LABEL_KIND, LABEL_MEMORY_MIB, LABEL_NICS, LABEL_VCPUS, LABEL_VM,
};
use super::suspend::MEMORY_IMAGE;
use super::VmManager;
use crate::error::{AgentError, AgentResult};
use crate::spec::VmSpec;

const NAME_HOLDER_PREFIX: &str = "snapshot:";
/// `from_snapshot` value for the image's base snapshot.
pub const FROM_BASE: &str = "base";

/// Where a layer stands in its chain.
struct Lineage {
    /// Layers from the root to this one; 0 when an ancestor is missing.
    chain_length: usize,
    children: Vec<String>,
}

/// Follows parents from `id` to the root; 0 if one is missing or they loop.
fn chain_length(parents: &HashMap<&str, Option<&str>>, id: &str) -> usize {
    let mut length = 0;
    let mut at = Some(id);
    while let Some(layer) = at {
        let Some(parent) = parents.get(layer) else {
            return 0;
        };
        length += 1;
        if length > parents.len() {
            return 0;
        }
        at = *parent;
    }
    length
}

fn name_holder(name: &str) -> String {
    format!("{NAME_HOLDER_PREFIX}{name}")
}

impl VmManager {
    /// Takes a named snapshot of a VM: a running one is paused only for the
    /// capture; a suspended one names the layer it lives in.
    pub async fn snapshot_create(&self, vm: &str, name: &str) -> AgentResult<SnapshotCreated> {
        crate::spec::validate_name("name", name, 63).map_err(AgentError::from)?;
        if name == FROM_BASE {
            return Err(AgentError::InvalidArgument(format!(
                "name: {FROM_BASE:?} is reserved for images' base snapshots"
            )));
        }
        let entry = self.entry(vm)?;
        let taken = || {
            AgentError::conflict(
                format!("a snapshot named {name:?} exists"),
                Some(format!(
                    "pick another name, or remove it first (`flotilla snapshot rm {name}`)"
                )),
            )
        };
        super::volumes::refuse_with_volumes(&entry.lock().record, "a snapshot")?;
        let _name = self.reserve_name(name_holder(name)).ok_or_else(taken)?;
        let _op = entry.op_lock.lock().await;
        if self.find_named(name)?.is_some() {
            return Err(taken());
        }
        let (state, head) = {
            let s = entry.lock();
            (s.record.state, s.record.snapshot_head.clone())
        };
        let (layer, pause_ms) = match (state, head) {
            (VmState::Running, _) => {
                let c = self
                    .capture_live(&entry, "named", &name_holder(name), None)
                    .await?;
                (c.layer, Some(c.pause.as_millis() as u64))
            }
            (VmState::Suspended, Some(head)) => {
                let id = LayerId(head);
                let layer = self.inner.snapshots.get(&id)?;
                super::layers::check_head_has_disks(&entry.lock().record, &layer)?;
                self.inner.snapshots.add_ref(&id, &name_holder(name))?;
                (self.inner.snapshots.get(&id)?, None)
            }
            (state, _) => {
                return Err(AgentError::conflict(
                    format!(
                        "VM {vm:?} is {state}: only a running or suspended VM can be snapshotted"
                    ),
                    None,
                ))
            }
        };
        tracing::info!(vm, name, layer = %layer.id, pause_ms, "snapshot taken");
        Ok(SnapshotCreated {
            snapshot: self.layer_info(&layer)?,
            pause_ms,
        })
    }

    /// Every stored layer, oldest first.
    pub fn snapshot_list(&self) -> AgentResult<Vec<SnapshotInfo>> {
        let layers = self.inner.snapshots.list()?;
        // Chains and children from the one listing, not a walk of the
        // store per layer.
        let parents: HashMap<&str, Option<&str>> = layers
            .iter()
            .map(|l| (l.id.as_str(), l.parent.as_ref().map(LayerId::as_str)))
            .collect();
        let mut children: HashMap<&str, Vec<String>> = HashMap::new();
        for layer in &layers {
            if let Some(parent) = &layer.parent {
                children
                    .entry(parent.as_str())
                    .or_default()
                    .push(layer.id.0.clone());
            }
        }
        layers
            .iter()
            .map(|layer| {
                let lineage = Lineage {
                    chain_length: chain_length(&parents, layer.id.as_str()),
                    children: children.remove(layer.id.as_str()).unwrap_or_default(),
                };
                self.snapshot_info(layer, lineage)
            })
            .collect()
    }

    /// A snapshot by name or layer id.
    pub fn snapshot_get(&self, name_or_id: &str) -> AgentResult<SnapshotInfo> {
        let layer = self.resolve_snapshot(name_or_id)?;
        self.layer_info(&layer)
    }

    /// One layer's info, its chain and children read from the store.
    fn layer_info(&self, layer: &LayerManifest) -> AgentResult<SnapshotInfo> {
        let store = &self.inner.snapshots;
        let lineage = Lineage {
            chain_length: store.chain(&layer.id).map_or(0, |c| c.len()),
            children: store
                .children(&layer.id)?
                .into_iter()
                .map(|c| c.0)
                .collect(),
        };
        self.snapshot_info(layer, lineage)
    }

    /// Removes a snapshot (by name: that name; by id: the layer and its
    /// names). Refused while a VM, another name or a later layer depends on it.
    pub fn snapshot_remove(&self, name_or_id: &str) -> AgentResult<()> {
        let layer = self.resolve_snapshot(name_or_id)?;
        let store = &self.inner.snapshots;
        let holders = store.refs(&layer.id)?;
        let mine: Vec<String> =
            if let Some(h) = holders.iter().find(|h| **h == name_holder(name_or_id)) {
                vec![h.clone()]
            } else {
                holders
                    .iter()
                    .filter(|h| h.starts_with(NAME_HOLDER_PREFIX))
                    .cloned()
                    .collect()
            };
        let mut blockers: Vec<String> = holders
            .iter()
            .filter(|h| !mine.contains(h))
            .cloned()
            .collect();
        blockers.extend(
            store
                .children(&layer.id)?
                .iter()
                .map(|c| format!("layer {c} (a later snapshot diffed against it)")),
        );
        if !blockers.is_empty() {
            return Err(AgentError::conflict(
                format!(
                    "snapshot {name_or_id:?} (layer {}) is in use by {}",
                    layer.id,
                    blockers.join(", ")
                ),
                Some("remove the VMs and snapshots that depend on it first".into()),
            ));
        }
        for h in &mine {
            store.remove_ref(&layer.id, h)?;
        }
        let report = store.gc()?;
        tracing::info!(
            snapshot = name_or_id,
            layers = report.removed.len(),
            bytes = report.bytes_freed,
            "snapshot removed"
        );
        Ok(())
    }

    /// A layer by snapshot name, else by id.
    pub(crate) fn resolve_snapshot(&self, name_or_id: &str) -> AgentResult<LayerManifest> {
        if let Some(layer) = self.find_named(name_or_id)? {
            return Ok(layer);
        }
        let id = LayerId(name_or_id.to_string());
        if id.is_valid() {
            if let Ok(layer) = self.inner.snapshots.get(&id) {
                return Ok(layer);
            }
        }
        // Not "no such snapshot" while it is being taken: a caller that
        // settles its records by our answer (the control plane) must not
        // take a long capture for one that never happened.
        if self.name_pending(&name_holder(name_or_id)) {
            return Err(AgentError::conflict(
                format!("snapshot {name_or_id:?} is being taken"),
                Some("ask again when it is done".to_string()),
            ));
        }
        Err(AgentError::SnapshotNotFound {
            name: name_or_id.to_string(),
        })
    }

    fn find_named(&self, name: &str) -> AgentResult<Option<LayerManifest>> {
        let store = &self.inner.snapshots;
        let holder = name_holder(name);
        for layer in store.list()? {
            if store.refs(&layer.id)?.contains(&holder) {
                return Ok(Some(layer));
            }
        }
        Ok(None)
    }

    fn snapshot_info(&self, layer: &LayerManifest, lineage: Lineage) -> AgentResult<SnapshotInfo> {
        let store = &self.inner.snapshots;
        let used_by = store.refs(&layer.id)?;
        let kind = match layer.labels.get(LABEL_KIND).map(String::as_str) {
            Some("base") => SnapshotKind::Base,
            Some("named") => SnapshotKind::Named,
            Some("clone") => SnapshotKind::Clone,
            _ => SnapshotKind::Suspend,
        };
        let disk_bytes = store
            .disk_path(&layer.id)
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        Ok(SnapshotInfo {
            id: layer.id.0.clone(),
            name: used_by
                .iter()
                .find_map(|h| h.strip_prefix(NAME_HOLDER_PREFIX))
                .map(str::to_string),
            kind,
            parent: layer.parent.as_ref().map(|p| p.0.clone()),
            vm: layer.labels.get(LABEL_VM).cloned(),
            image: layer.labels.get(LABEL_IMAGE).cloned(),
            created_at: layer.created_at.clone(),
            vcpus: label(layer, LABEL_VCPUS).ok(),
            memory_mib: label(layer, LABEL_MEMORY_MIB).ok(),
            stored_bytes: layer.stored_bytes,
            disk_bytes,
            chain_length: lineage.chain_length,
            children: lineage.children,
            used_by,
            labels: layer.labels.clone(),
        })
    }

    /// `create` with `from_snapshot`: the image's base snapshot (made on
    /// first use) or a snapshot by name or id.
    pub(crate) async fn create_from_snapshot(
        &self,
        spec: VmSpec,
        from: &str,
    ) -> AgentResult<VmInfo> {
        let _name = self.reserve_vm_name(&spec.name)?;
        let staging = self.staging_memory_path();
        let layer = if from == FROM_BASE {
            let image_name = spec
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
            let image = self.inner.images.get(&image_name)?;
            let shape = BaseShape {
                kernel: &image.kernel,
                initrd: image.initrd.as_deref(),
                rootfs: image.rootfs.as_deref(),
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                nics: spec.nics as usize,
                cmdline_extra: &spec.cmdline_extra,
            };
            let layer = self.ensure_base(&image_name, &shape).await?;
            // The base's memory image, kept materialized: linked, not rebuilt.
            let key_memory = self.base_memory(&layer);
            if let Some(memory) = key_memory {
                if std::fs::hard_link(&memory, &staging).is_err() {
                    let _ = std::fs::copy(&memory, &staging);
                }
            }
            layer
        } else {
            if spec.image.is_some() {
                return Err(AgentError::InvalidArgument(
                    "image: a VM from a snapshot runs the snapshot's image; leave image out".into(),
                ));
            }
            let layer = self.resolve_snapshot(from)?;
            let taken_with = layer
                .labels
                .get(super::layers::LABEL_CMDLINE_EXTRA)
                .map_or("", String::as_str);
            if !spec.cmdline_extra.is_empty() && spec.cmdline_extra != taken_with {
                return Err(AgentError::InvalidArgument(format!(
                    "cmdline_extra: a VM from snapshot {from:?} runs the kernel it was taken with (command line {taken_with:?}); leave cmdline_extra out"
                )));
            }
            let (vcpus, memory_mib, nics) = spec.explicit_shape;
            let differs = |given: Option<u64>, key: &str| {
                given.is_some_and(|g| label::<u64>(&layer, key).ok() != Some(g))
            };
            if differs(vcpus.map(u64::from), LABEL_VCPUS)
                || differs(memory_mib, LABEL_MEMORY_MIB)
                || differs(nics.map(u64::from), LABEL_NICS)
            {
                return Err(AgentError::InvalidArgument(format!(
                    "vcpus/memory_mib/nics: snapshot {from:?} was taken of a VM with {} vCPUs, {} MiB and {} NICs; a VM from it has the same",
                    layer.labels.get(LABEL_VCPUS).map_or("?", String::as_str),
                    layer.labels.get(LABEL_MEMORY_MIB).map_or("?", String::as_str),
                    layer.labels.get(LABEL_NICS).map_or("?", String::as_str),
                )));
            }
            layer
        };
        let memory = staging.exists().then_some(staging.as_path());
        let made = self
            .create_from_layer(FromLayer {
                name: &spec.name,
                layer: &layer,
                tags: spec.tags.clone(),
                read_only_root: false,
                memory,
                memory_fresh: false,
                start: spec.start,
                ip: spec.ip,
            })
            .await;
        let _ = std::fs::remove_file(&staging);
        made
    }

    /// Makes (or finds) the base snapshot of image `image` for a VM shape.
    pub async fn image_base(
        &self,
        image: &str,
        req: flotilla_api::BaseSnapshotRequest,
    ) -> AgentResult<SnapshotInfo> {
        // The same defaults and checks as a create.
        let spec = VmSpec::from_request(flotilla_api::CreateVmRequest {
            name: "base".into(),
            image: Some(image.to_string()),
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            cmdline_extra: None,
            disks: Vec::new(),
            nics: req.nics,
            ip: None,
            tags: Default::default(),
            start: None,
            wait_ready: None,
            from_snapshot: None,
        })?;
        let found = self.inner.images.get(image)?;
        let shape = BaseShape {
            kernel: &found.kernel,
            initrd: found.initrd.as_deref(),
            rootfs: found.rootfs.as_deref(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            nics: spec.nics as usize,
            cmdline_extra: "",
        };
        let layer = self.ensure_base(image, &shape).await?;
        self.layer_info(&layer)
    }

    fn base_memory(&self, layer: &LayerManifest) -> Option<std::path::PathBuf> {
        let dir = self.inner.config.data_dir.join("bases");
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let id = std::fs::read_to_string(entry.path().join("layer")).ok()?;
            if id.trim() == layer.id.0 {
                return Some(entry.path().join(MEMORY_IMAGE));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_lengths_follow_parents_and_give_up_on_gaps_and_loops() {
        let parents: HashMap<&str, Option<&str>> = [
            ("a", None),
            ("b", Some("a")),
            ("c", Some("b")),
            ("orphan", Some("gone")),
            ("x", Some("y")),
            ("y", Some("x")),
        ]
        .into_iter()
        .collect();
        assert_eq!(chain_length(&parents, "a"), 1);
        assert_eq!(chain_length(&parents, "c"), 3);
        assert_eq!(chain_length(&parents, "orphan"), 0);
        assert_eq!(chain_length(&parents, "x"), 0);
    }
}

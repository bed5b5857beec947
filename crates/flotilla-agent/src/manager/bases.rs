//! Base snapshots: an image booted once to guest-agent ready and captured,
//! per VM shape (vCPUs, memory, NICs, extra command line). VMs start from
//! one instead of booting (`from_snapshot: "base"`), and a booted VM's first
//! layer is a diff against it.
//!
//! `<data>/bases/<key>/layer` names the layer (held as `base:<key>`) and
//! `<data>/bases/<key>/memory.img` is its memory image, kept materialized as
//! the parent of first diffs.

use std::path::{Path, PathBuf};

use flotilla_api::CreateVmRequest;
use flotilla_snapshot::{LayerId, LayerManifest};
use sha2::{Digest, Sha256};

use super::suspend::MEMORY_IMAGE;
use super::VmManager;
use crate::error::{AgentError, AgentResult};
use crate::fsutil::write_atomic;
use crate::record::VmRecord;

/// Names of the VMs that boot an image for its base snapshot; reserved.
pub const BASE_VM_PREFIX: &str = "flotilla-base-";
const LAYER_FILE: &str = "layer";

/// The holder under which a base snapshot is kept.
fn base_holder(key: &str) -> String {
    format!("base:{key}")
}

/// The VM shape a base snapshot is made for.
pub(crate) struct BaseShape<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub rootfs: Option<&'a Path>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub nics: usize,
    pub cmdline_extra: &'a str,
}

impl VmManager {
    fn bases_dir(&self) -> PathBuf {
        self.inner.config.data_dir.join("bases")
    }

    /// Identifies the image's files (by what the snapshot store pins them
    /// as, so a VM's hard links of them match) and the shape.
    fn base_key(&self, shape: &BaseShape<'_>) -> AgentResult<String> {
        let store = &self.inner.snapshots;
        let mut text = String::new();
        for file in [Some(shape.kernel), shape.initrd, shape.rootfs]
            .into_iter()
            .flatten()
        {
            text.push_str(&store.pin_path_for(file)?.to_string_lossy());
            text.push('|');
        }
        text.push_str(&format!(
            "{}|{}|{}|{}",
            shape.vcpus, shape.memory_mib, shape.nics, shape.cmdline_extra
        ));
        let digest = Sha256::digest(text.as_bytes());
        Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The base layer stored under `key` and its memory image, if complete.
    fn base_of_key(&self, key: &str) -> Option<(LayerManifest, PathBuf)> {
        let dir = self.bases_dir().join(key);
        let id = std::fs::read_to_string(dir.join(LAYER_FILE)).ok()?;
        let layer = self.inner.snapshots.get(&LayerId(id.trim().into())).ok()?;
        let memory = dir.join(MEMORY_IMAGE);
        let size = std::fs::metadata(&memory).ok()?.len();
        (size == layer.memory_size).then_some((layer, memory))
    }

    /// The base snapshot a booted VM's first layer can diff against.
    pub(crate) fn find_base_for(&self, record: &VmRecord) -> Option<(LayerId, PathBuf)> {
        let root = record.disks.first().filter(|d| d.name == "root");
        let shape = BaseShape {
            kernel: &record.kernel,
            initrd: record.initrd.as_deref(),
            rootfs: root.and_then(|r| r.backing.as_deref()),
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            nics: record.nics.len(),
            cmdline_extra: &record.cmdline_extra,
        };
        let key = self.base_key(&shape).ok()?;
        self.base_of_key(&key)
            .map(|(layer, memory)| (layer.id, memory))
    }

    /// Lets the base snapshots of a removed image go (layers still used as
    /// parents by VMs or snapshots stay until those go).
    pub async fn drop_bases_of(&self, image: &str) {
        let _making = self.inner.bases_lock.lock().await;
        let (manager, image) = (self.clone(), image.to_string());
        let _ = tokio::task::spawn_blocking(move || {
            manager.drop_bases_where(|layer| {
                layer.is_none_or(|l| l.labels.get("image") == Some(&image))
            })
        })
        .await;
    }

    /// [`drop_stale_bases`](Self::drop_stale_bases) while the agent serves
    /// (after an image was replaced).
    pub async fn forget_stale_bases(&self) {
        let _making = self.inner.bases_lock.lock().await;
        let manager = self.clone();
        let _ = tokio::task::spawn_blocking(move || manager.drop_stale_bases()).await;
    }

    /// Drops the bases no VM could start from any more: of images that are
    /// gone or whose kernel changed (rebuilt or replaced under the same
    /// name). Run at start, before anything is served, and after a replace.
    pub(crate) fn drop_stale_bases(&self) {
        let store = &self.inner.snapshots;
        self.drop_bases_where(|layer| {
            let Some(layer) = layer else { return true };
            let image = layer.labels.get("image").map(String::as_str).unwrap_or("");
            let Ok(current) = self.inner.images.get(image) else {
                return true;
            };
            let pinned = store.pinned_path(layer, super::layers::PIN_KERNEL);
            let now = store.pin_path_for(&current.kernel).ok();
            pinned.is_none() || pinned != now
        });
    }

    /// Drops the bases whose layer (None: unreadable) `stale` says so.
    fn drop_bases_where(&self, stale: impl Fn(Option<&LayerManifest>) -> bool) {
        let Ok(entries) = std::fs::read_dir(self.bases_dir()) else {
            return;
        };
        let store = &self.inner.snapshots;
        let mut dropped = 0;
        for entry in entries.flatten() {
            let key = entry.file_name().to_string_lossy().into_owned();
            let Ok(id) = std::fs::read_to_string(entry.path().join(LAYER_FILE)) else {
                continue;
            };
            let id = LayerId(id.trim().to_string());
            if !stale(store.get(&id).ok().as_ref()) {
                continue;
            }
            if let Err(e) = store.remove_ref(&id, &base_holder(&key)) {
                tracing::warn!(key = %key, error = %e, "releasing a base snapshot");
            }
            let _ = std::fs::remove_dir_all(entry.path());
            dropped += 1;
        }
        if dropped > 0 {
            tracing::info!(dropped, "base snapshots dropped");
            if let Err(e) = store.gc() {
                tracing::warn!(error = %e, "snapshot garbage collection");
            }
        }
    }

    /// The image's base snapshot for this shape, made now (a boot, about a
    /// second or two under TCG) if there is none.
    pub(crate) async fn ensure_base(
        &self,
        image_name: &str,
        shape: &BaseShape<'_>,
    ) -> AgentResult<LayerManifest> {
        let key = self.base_key(shape)?;
        if let Some((layer, _)) = self.base_of_key(&key) {
            return Ok(layer);
        }
        let _making = self.inner.bases_lock.lock().await;
        if let Some((layer, _)) = self.base_of_key(&key) {
            return Ok(layer);
        }
        tracing::info!(image = image_name, key = %key, "making a base snapshot");
        let name = format!("{BASE_VM_PREFIX}{key}");
        if self.entry(&name).is_ok() {
            // Left by an agent that died while making this base.
            self.delete(&name, true).await?;
        }
        let dir = self.bases_dir().join(&key);
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::io("creating a base directory", e))?;
        let memory_tmp = dir.join(".memory.tmp");
        let req = CreateVmRequest {
            name: name.clone(),
            image: Some(image_name.to_string()),
            vcpus: Some(shape.vcpus),
            memory_mib: Some(shape.memory_mib),
            cmdline_extra: Some(shape.cmdline_extra.to_string()),
            disks: Vec::new(),
            nics: Some(shape.nics as u32),
            ip: None,
            tags: Default::default(),
            start: Some(true),
            wait_ready: Some(true),
            from_snapshot: None,
        };
        let captured = async {
            // Boxed: creating from a snapshot may come back here.
            Box::pin(self.create_unchecked(req)).await?;
            let entry = self.entry(&name)?;
            let _op = entry.op_lock.lock().await;
            self.capture_live(&entry, "base", &base_holder(&key), Some(&memory_tmp))
                .await
        }
        .await;
        if let Err(e) = self.delete(&name, true).await {
            tracing::warn!(vm = %name, error = %e, "removing the base VM");
        }
        let captured = captured.inspect_err(|_| {
            let _ = std::fs::remove_file(&memory_tmp);
        })?;
        std::fs::rename(&memory_tmp, dir.join(MEMORY_IMAGE))
            .map_err(|e| AgentError::io("placing the base memory image", e))?;
        write_atomic(&dir.join(LAYER_FILE), captured.layer.id.0.as_bytes())
            .map_err(|e| AgentError::io("recording the base snapshot", e))?;
        tracing::info!(
            image = image_name,
            layer = %captured.layer.id,
            stored_bytes = captured.layer.stored_bytes,
            "base snapshot ready"
        );
        Ok(captured.layer)
    }
}

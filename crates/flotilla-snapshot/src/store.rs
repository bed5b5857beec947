//! [`SnapshotStore`]: creating, reading, checking, referencing and removing
//! layers. Storage goes through [`Backend`]; this module holds the rules.

use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backend::{Backend, LayerStamp};
use crate::diff::write_diff;
use crate::error::{IoContext, SnapshotError};
use crate::fsutil::hash_file;
use crate::gc::{children_of, removal_order, scan, GcReport};
use crate::id::LayerId;
use crate::local::LocalDir;
use crate::lock::StoreLock;
use crate::manifest::{extra_disk_file, LayerManifest, DISK_FILE};
use crate::materialize::{materialize_chain, Output};
use crate::reader::for_each_verified_extent;
use crate::refs::{check_holder, Refs};
use crate::time::now_rfc3339;
use crate::LAYER_FORMAT_VERSION;

/// Files layers need from elsewhere (see [`SnapshotStore::pin_path_for`]).
const PINNED_DIR: &str = "pinned";

/// A directory of layers: `<root>/layers/<id>/`, `<root>/refs/<id>/<holder>`.
/// Cheap to clone; clones (and other processes) may use the store at the same
/// time.
#[derive(Clone, Debug)]
pub struct SnapshotStore {
    root: PathBuf,
    backend: Arc<dyn Backend>,
    refs: Refs,
    /// Layers [`verify`](Self::verify) read in full, with their files'
    /// stamps at the time: unchanged since, they are not read again, so a
    /// resume after many suspends checks only the new layers.
    verified: Arc<Mutex<HashMap<LayerId, LayerStamp>>>,
}

/// A request to store a layer.
#[derive(Clone, Debug)]
pub struct NewLayer<'a> {
    /// The layer `memory` is a diff against; `None` for a full layer.
    pub parent: Option<&'a LayerId>,
    /// The new memory image (a QEMU `mapped-ram` file, or any file).
    pub memory: &'a Path,
    /// The parent's materialized memory image, if the caller has it; rebuilt
    /// from the chain otherwise.
    pub parent_memory: Option<&'a Path>,
    /// A disk file moved into the layer as `disk.qcow2`.
    pub disk: Option<&'a Path>,
    /// More disk files by name (`[a-z0-9-]`), moved in as `disk-<name>.qcow2`.
    pub extra_disks: BTreeMap<String, &'a Path>,
    /// Files the layer needs that live elsewhere (the kernel, the file at
    /// the bottom of `disk`'s backing chain), by role: pinned into the store
    /// as [`SnapshotStore::pin_path_for`] names them (the caller points the
    /// disk's backing there), so the layer outlives the VM and image it
    /// came from.
    pub pins: BTreeMap<String, &'a Path>,
    /// Free-form labels (e.g. `vm`, `image`).
    pub labels: BTreeMap<String, String>,
}

impl<'a> NewLayer<'a> {
    /// A full layer of `memory`.
    pub fn full(memory: &'a Path) -> Self {
        NewLayer {
            parent: None,
            memory,
            parent_memory: None,
            disk: None,
            extra_disks: BTreeMap::new(),
            pins: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }

    /// A diff of `memory` against `parent`.
    pub fn diff(parent: &'a LayerId, memory: &'a Path, parent_memory: Option<&'a Path>) -> Self {
        NewLayer {
            parent: Some(parent),
            parent_memory,
            ..NewLayer::full(memory)
        }
    }

    pub fn with_disk(mut self, disk: &'a Path) -> Self {
        self.disk = Some(disk);
        self
    }

    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

impl SnapshotStore {
    /// Opens (creating if needed) the store at `root` and removes what
    /// interrupted work left there.
    pub fn open(root: &Path) -> Result<SnapshotStore, SnapshotError> {
        fs::create_dir_all(root).ctx("create directory", root)?;
        let store = SnapshotStore {
            root: root.to_path_buf(),
            backend: Arc::new(LocalDir::open(root.join("layers"))?),
            refs: Refs::open(root.join("refs"))?,
            verified: Arc::default(),
        };
        {
            // Under the lock, every work directory in use is already locked
            // by its owner (see `create`), so only true leftovers go.
            let _lock = store.lock()?;
            store.backend.clean_leftovers()?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores a new layer. `memory` is the new memory image; `parent` is the
    /// layer it is a diff against (None = a full layer), and `parent_memory`
    /// the parent's materialized memory image (the caller keeps one, so the
    /// diff needs no rebuild; when None and parent is Some, it is materialized
    /// into a temporary file first). `disk` (optional) is moved (renamed;
    /// copied if on another filesystem) into the layer as `disk.qcow2`; if the
    /// layer cannot be stored, a renamed disk is moved back.
    pub fn create_layer(&self, req: NewLayer<'_>) -> Result<LayerManifest, SnapshotError> {
        self.create(req, None)
    }

    /// [`create_layer`](Self::create_layer), with `holder` referencing the
    /// new layer from the moment it appears, so a concurrent [`gc`](Self::gc)
    /// cannot take it first.
    pub fn create_layer_with_ref(
        &self,
        req: NewLayer<'_>,
        holder: &str,
    ) -> Result<LayerManifest, SnapshotError> {
        check_holder(holder)?;
        self.create(req, Some(holder))
    }

    fn create(
        &self,
        req: NewLayer<'_>,
        holder: Option<&str>,
    ) -> Result<LayerManifest, SnapshotError> {
        let started = Instant::now();
        check_memory_file(req.memory)?;
        let id = LayerId::generate();
        let parent_chain = match req.parent {
            Some(parent) => {
                parent.check()?;
                Some(self.chain(parent).map_err(|e| match e {
                    SnapshotError::NotFound { id: missing } if &missing == parent => {
                        SnapshotError::ParentMissing {
                            id: id.clone(),
                            parent: missing,
                        }
                    }
                    e => e,
                })?)
            }
            None if req.parent_memory.is_some() => {
                return Err(SnapshotError::InvalidInput {
                    path: req.parent_memory.unwrap_or(req.memory).to_path_buf(),
                    reason: "a parent memory image was given for a full layer (no parent)".into(),
                })
            }
            None => None,
        };

        let mut staging = {
            let _lock = self.lock()?;
            self.backend.begin(&id)?
        };
        let parent_image = match (&parent_chain, req.parent_memory) {
            (None, _) => None,
            (Some(chain), Some(path)) => {
                check_parent_image(chain, path)?;
                Some(path.to_path_buf())
            }
            (Some(chain), None) => {
                let path = staging.scratch_path("parent-memory")?;
                materialize_chain(self.backend.as_ref(), chain, &path, Output::Scratch)?;
                Some(path)
            }
        };
        let diff = write_diff(req.memory, parent_image.as_deref(), |bytes| {
            staging.write_data(bytes)
        })?;
        let disk = req
            .disk
            .map(|d| staging.put_disk(d, DISK_FILE))
            .transpose()?;
        let mut extra_disks = BTreeMap::new();
        for (name, file) in &req.extra_disks {
            let entry = staging.put_disk(file, &extra_disk_file(name))?;
            extra_disks.insert(name.clone(), entry);
        }
        let mut pinned = BTreeMap::new();
        for (role, file) in &req.pins {
            pinned.insert(role.clone(), file_name(&self.pin_path_for(file)?));
        }

        let mut manifest = LayerManifest {
            id,
            parent: req.parent.cloned(),
            format_version: LAYER_FORMAT_VERSION,
            created_at: now_rfc3339(),
            labels: req.labels,
            memory_size: diff.memory_size,
            stored_bytes: diff.stored_bytes,
            pages_stored: diff.pages_stored,
            pages_zeroed: diff.pages_zeroed,
            extents: diff.extents,
            disk,
            extra_disks,
            pinned,
            data_sha256: diff.data_sha256,
            manifest_sha256: String::new(),
        };
        manifest.seal();
        {
            let _lock = self.lock()?;
            // The parent may have been removed while we worked.
            if let Some(parent) = &manifest.parent {
                if !self.backend.exists(parent) {
                    return Err(SnapshotError::ParentMissing {
                        id: manifest.id,
                        parent: parent.clone(),
                    });
                }
            }
            // Pinned under the lock, so a concurrent gc cannot take the base
            // before the layer that needs it exists.
            for file in req.pins.values() {
                self.pin(file)?;
            }
            staging.commit(&manifest.to_json())?;
            if let Some(holder) = holder {
                self.refs.add(&manifest.id, holder)?;
            }
        }
        tracing::info!(
            id = %manifest.id,
            parent = ?manifest.parent.as_ref().map(LayerId::as_str),
            memory_size = manifest.memory_size,
            stored_bytes = manifest.stored_bytes,
            pages_stored = manifest.pages_stored,
            pages_zeroed = manifest.pages_zeroed,
            disk = manifest.disk.is_some(),
            ms = started.elapsed().as_millis() as u64,
            "stored snapshot layer"
        );
        Ok(manifest)
    }

    /// Rebuilds the full memory image of layer `id` (applying the chain from
    /// its root) into `out` (sparse: zero pages are holes), verifying every
    /// checksum on the way; a corrupt or truncated layer or a missing parent
    /// is an error naming the layer, and leaves `out` untouched.
    pub fn materialize_memory(&self, id: &LayerId, out: &Path) -> Result<(), SnapshotError> {
        let chain = self.chain(id)?;
        materialize_chain(self.backend.as_ref(), &chain, out, Output::Durable)
    }

    /// The manifest of `id`, checked against its own checksum.
    pub fn get(&self, id: &LayerId) -> Result<LayerManifest, SnapshotError> {
        id.check()?;
        let bytes = self.backend.read_manifest(id)?;
        LayerManifest::decode(id, &bytes)
    }

    /// Every readable layer, oldest first. Layers whose manifest cannot be
    /// read are left out (with a warning); `get` or `verify` says why.
    pub fn list(&self) -> Result<Vec<LayerManifest>, SnapshotError> {
        let mut layers = Vec::new();
        for id in self.backend.ids()? {
            match self.get(&id) {
                Ok(m) => layers.push(m),
                Err(SnapshotError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(id = %id, error = %e, "skipping unreadable snapshot layer")
                }
            }
        }
        layers.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        Ok(layers)
    }

    /// The manifests from the root of `id`'s chain down to `id`.
    pub fn chain(&self, id: &LayerId) -> Result<Vec<LayerManifest>, SnapshotError> {
        let mut chain = vec![self.get(id)?];
        while let Some(layer) = chain.last() {
            let Some(parent) = layer.parent.clone() else {
                break;
            };
            if chain.iter().any(|m| m.id == parent) {
                return Err(SnapshotError::corrupt(
                    &layer.id,
                    "its chain of parents loops",
                ));
            }
            match self.get(&parent) {
                Ok(m) => chain.push(m),
                Err(SnapshotError::NotFound { .. }) => {
                    return Err(SnapshotError::ParentMissing {
                        id: layer.id.clone(),
                        parent,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        chain.reverse();
        Ok(chain)
    }

    /// Checks the whole chain of `id`: manifests, page data and disk files
    /// against their checksums. A layer this store already checked is read
    /// again only if one of its files changed since (see [`Backend::stamp`]).
    pub fn verify(&self, id: &LayerId) -> Result<(), SnapshotError> {
        for layer in self.chain(id)? {
            // Taken before reading: a change made while we read shows next time.
            let stamp = self.backend.stamp(&layer.id);
            let known = self.verified_stamps().get(&layer.id).cloned();
            if stamp.is_some() && known == stamp {
                continue;
            }
            self.verify_layer(&layer)?;
            if let Some(stamp) = stamp {
                self.verified_stamps().insert(layer.id.clone(), stamp);
            }
        }
        Ok(())
    }

    fn verified_stamps(&self) -> std::sync::MutexGuard<'_, HashMap<LayerId, LayerStamp>> {
        // The map holds no invariant a panicking holder could break.
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn verify_layer(&self, layer: &LayerManifest) -> Result<(), SnapshotError> {
        for_each_verified_extent(self.backend.as_ref(), layer, |_, _| Ok(()))?;
        for disk in layer.disk.iter().chain(layer.extra_disks.values()) {
            let file = &disk.file;
            let path = self
                .backend
                .disk_path(&layer.id, file)
                .ok_or_else(|| SnapshotError::corrupt(&layer.id, format!("{file} is missing")))?;
            let (size, sha256) = hash_file(&path)?;
            if size != disk.size {
                return Err(SnapshotError::corrupt(
                    &layer.id,
                    format!("{file} is {size} bytes, the manifest records {}", disk.size),
                ));
            }
            if sha256 != disk.sha256 {
                return Err(SnapshotError::corrupt(
                    &layer.id,
                    format!("{file} fails its checksum"),
                ));
            }
        }
        Ok(())
    }

    /// Where the store keeps `file` (e.g. the bottom of a layer disk's
    /// backing chain, an image's root disk) once a layer pins it. The name
    /// follows the file's identity (device, inode, size, mtime), so hard
    /// links of one file share one pinned copy.
    pub fn pin_path_for(&self, file: &Path) -> Result<PathBuf, SnapshotError> {
        use sha2::{Digest, Sha256};
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(file).ctx("stat", file)?;
        // Nanoseconds too: a copied file's inode may be reused by another
        // file of the same size within the same second.
        let identity = format!(
            "{}:{}:{}:{}.{}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec()
        );
        let digest = Sha256::digest(identity.as_bytes());
        let name: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        let ext = file.extension().map(|e| e.to_string_lossy().into_owned());
        let name = match ext {
            Some(ext) => format!("{name}.{ext}"),
            None => name,
        };
        Ok(self.root.join(PINNED_DIR).join(name))
    }

    /// A file layer `layer` pinned under `role`.
    pub fn pinned_path(&self, layer: &LayerManifest, role: &str) -> Option<PathBuf> {
        let name = layer.pinned.get(role)?;
        (!name.contains('/') && !name.starts_with('.'))
            .then(|| self.root.join(PINNED_DIR).join(name))
    }

    /// Hard-links (or copies) `file` into `pinned/`. Call under the lock.
    fn pin(&self, file: &Path) -> Result<(), SnapshotError> {
        let dest = self.pin_path_for(file)?;
        let dir = self.root.join(PINNED_DIR);
        fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        if !dest.exists() {
            if fs::hard_link(file, &dest).is_err() {
                let tmp = dir.join(".tmp-copy");
                fs::copy(file, &tmp).ctx("copy", file)?;
                fs::rename(&tmp, &dest).ctx("rename", &dest)?;
            }
            crate::fsutil::fsync_path(&dir)?;
        }
        Ok(())
    }

    /// Removes the pinned files no remaining layer needs. Keeps everything
    /// if a manifest cannot be read: what it needs is then unknown.
    fn gc_pinned(&self) -> Result<u64, SnapshotError> {
        let dir = self.root.join(PINNED_DIR);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(0);
        };
        let mut used = BTreeSet::new();
        for id in self.backend.ids()? {
            match self.get(&id) {
                Ok(m) => used.extend(m.pinned.into_values()),
                Err(SnapshotError::NotFound { .. }) => {}
                Err(_) => return Ok(0),
            }
        }
        let mut freed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if used.contains(&name) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if fs::remove_file(entry.path()).is_ok() {
                freed += size;
            }
        }
        Ok(freed)
    }

    /// The layer's `disk.qcow2`, if it has one.
    /// The layer's extra disk `name` (`disk-<name>.qcow2`), if it has one.
    pub fn extra_disk_path(&self, id: &LayerId, name: &str) -> Option<PathBuf> {
        if !id.is_valid() {
            return None;
        }
        self.backend.disk_path(id, &extra_disk_file(name))
    }

    pub fn disk_path(&self, id: &LayerId) -> Option<PathBuf> {
        if !id.is_valid() {
            return None;
        }
        self.backend.disk_path(id, DISK_FILE)
    }

    /// `holder` (e.g. `vm:NAME`) pins layer `id` and so its ancestors.
    /// Adding a reference twice is the same as once.
    pub fn add_ref(&self, id: &LayerId, holder: &str) -> Result<(), SnapshotError> {
        id.check()?;
        check_holder(holder)?;
        let _lock = self.lock()?;
        if !self.backend.exists(id) {
            return Err(SnapshotError::NotFound { id: id.clone() });
        }
        self.refs.add(id, holder)
    }

    /// Drops `holder`'s reference to `id`; nothing to do if there is none.
    pub fn remove_ref(&self, id: &LayerId, holder: &str) -> Result<(), SnapshotError> {
        id.check()?;
        check_holder(holder)?;
        let _lock = self.lock()?;
        self.refs.remove(id, holder)
    }

    /// The holders referencing `id`, sorted.
    pub fn refs(&self, id: &LayerId) -> Result<Vec<String>, SnapshotError> {
        id.check()?;
        self.refs.holders(id)
    }

    /// The layers whose parent is `id`.
    pub fn children(&self, id: &LayerId) -> Result<Vec<LayerId>, SnapshotError> {
        id.check()?;
        Ok(children_of(&scan(self.backend.as_ref())?, id))
    }

    /// Removes layer `id`. Refused ([`SnapshotError::InUse`]) while the
    /// layer has holders or children.
    pub fn remove(&self, id: &LayerId) -> Result<(), SnapshotError> {
        id.check()?;
        let _lock = self.lock()?;
        if !self.backend.exists(id) {
            return Err(SnapshotError::NotFound { id: id.clone() });
        }
        let mut by = self.refs.holders(id)?;
        let children = children_of(&scan(self.backend.as_ref())?, id);
        by.extend(children.iter().map(|c| format!("layer:{c}")));
        if !by.is_empty() {
            return Err(SnapshotError::InUse { id: id.clone(), by });
        }
        self.refs.clear(id)?;
        let freed = self.backend.delete(id)?;
        self.verified_stamps().remove(id);
        tracing::info!(id = %id, bytes_freed = freed, "removed snapshot layer");
        Ok(())
    }

    /// Removes the layers nothing refers to: no holder, and no descendant
    /// with a holder. Children go before their parents.
    pub fn gc(&self) -> Result<GcReport, SnapshotError> {
        let _lock = self.lock()?;
        let links = scan(self.backend.as_ref())?;
        let refs = self.refs.all()?;
        let held: BTreeSet<LayerId> = refs
            .iter()
            .filter(|(_, holders)| !holders.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        let mut report = GcReport::default();
        for id in removal_order(&links, &held)? {
            self.refs.clear(&id)?;
            report.bytes_freed += self.backend.delete(&id)?;
            self.verified_stamps().remove(&id);
            report.removed.push(id);
        }
        report.bytes_freed += self.gc_pinned()?;
        // References to layers that no longer exist protect nothing.
        for id in refs.keys().filter(|id| !links.contains_key(*id)) {
            self.refs.clear(id)?;
        }
        tracing::info!(
            removed = report.removed.len(),
            bytes_freed = report.bytes_freed,
            "snapshot gc"
        );
        Ok(report)
    }

    fn lock(&self) -> Result<StoreLock, SnapshotError> {
        StoreLock::acquire(&self.root.join("lock"))
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn check_memory_file(path: &Path) -> Result<(), SnapshotError> {
    let meta = fs::metadata(path).ctx("stat", path)?;
    let reason = if !meta.is_file() {
        "the memory image is not a regular file"
    } else if meta.len() == 0 {
        "the memory image is empty"
    } else {
        return Ok(());
    };
    Err(SnapshotError::InvalidInput {
        path: path.to_path_buf(),
        reason: reason.into(),
    })
}

/// A caller-supplied parent image must at least be the parent's size: a wrong
/// file would make a diff that rebuilds into garbage.
fn check_parent_image(chain: &[LayerManifest], path: &Path) -> Result<(), SnapshotError> {
    let Some(parent) = chain.last() else {
        return Ok(());
    };
    let actual = fs::metadata(path).ctx("stat", path)?.len();
    if actual != parent.memory_size {
        return Err(SnapshotError::SizeMismatch {
            id: parent.id.clone(),
            path: path.to_path_buf(),
            expected: parent.memory_size,
            actual,
        });
    }
    Ok(())
}

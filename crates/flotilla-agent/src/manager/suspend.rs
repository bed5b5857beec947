//! Suspend and resume: a VM's memory and root disk go into a snapshot layer
//! (a diff against its previous one) and its QEMU ends; resume rebuilds the
//! memory image from the layer chain (unless the one kept from the suspend
//! is still there) and a fresh QEMU loads it, or maps it as the guest's
//! memory (`RestoreMemory::Map`).
//!
//! Failure rules: until the new layer is complete and recorded as pending,
//! any failure rolls the VM back to running where it was; after that the
//! suspend completes even across an agent crash (`adopt`). A failed resume
//! leaves the VM suspended, its snapshot untouched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::{VmInfo, VmState};
use flotilla_guest_protocol::GuestClient;
use flotilla_qemu::migration::{
    load_at_start, load_from_file, map_at_start, save_to_file, set_link, wait_incoming,
};
use flotilla_qemu::{QemuProcess, QmpClient};
use flotilla_snapshot::{LayerId, LayerManifest};

use super::layers::{layer_disk, remove_tmp_disks, store_layer, Capture};
use super::standby::Taken;
use super::{VmEntry, VmManager};
use crate::config::RestoreMemory;
use crate::disks;
use crate::error::{AgentError, AgentResult};
use crate::record::VmRecord;
use crate::runtime::Readiness;

/// The head layer's memory image, kept next to the VM: what QEMU loads on
/// resume, and the parent the next suspend is diffed against.
pub const MEMORY_IMAGE: &str = "memory.img";
/// Names the layer `MEMORY_IMAGE` holds; absent while that is unknown (it is
/// removed before the image is replaced and written after), so a stale
/// image is never taken for the parent of a diff.
pub(crate) const MEMORY_IMAGE_LAYER: &str = "memory.img.layer";
const MEMORY_TMP: &str = ".suspend-memory.tmp";
const DISK_TMP_PREFIX: &str = ".suspend-disk";
const RESUME_MEMORY_TMP: &str = ".resume-memory.tmp";
/// The memory image without the guest's pages, for QEMU to load while it
/// maps those from the image; removed once loaded.
const RESUME_STATE_TMP: &str = ".resume-state.tmp";
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
const QUIT_WAIT: Duration = Duration::from_secs(5);

/// The holder name under which a VM pins its snapshot chain.
pub fn holder(vm: &str) -> String {
    format!("vm:{vm}")
}

fn nic_ids(record: &VmRecord) -> Vec<String> {
    (0..record.nics.len()).map(|i| format!("net{i}")).collect()
}

pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> AgentResult<T> + Send + 'static,
) -> AgentResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::io(what, std::io::Error::other(e)))?
}

impl VmManager {
    /// Suspends a running VM into a new snapshot layer; with `warm`, a QEMU
    /// is then started to wait for its resume (see [`standby`](super::standby)).
    pub async fn suspend(&self, name: &str, warm: bool) -> AgentResult<VmInfo> {
        let entry = self.entry(name)?;
        if warm {
            self.check_warm_possible()?;
        }
        let _op = entry.op_lock.lock().await;
        let started = Instant::now();
        let (record, qmp, process) = {
            let mut s = entry.lock();
            super::migrate::check_disks_whole(&s.record)?;
            if s.record.state != VmState::Running {
                return Err(AgentError::conflict(
                    format!(
                        "VM {name:?} is {}: only a running VM can be suspended",
                        s.record.state
                    ),
                    None,
                ));
            }
            let (Some(qmp), Some(process)) = (s.runtime.qmp.clone(), s.runtime.process.clone())
            else {
                return Err(AgentError::conflict(
                    format!("VM {name:?} has no QMP connection to its QEMU"),
                    Some("stop and start it, then try again".into()),
                ));
            };
            self.transition(&mut s, VmState::Suspending)?;
            self.save(&s)?;
            (s.record.clone(), qmp, process)
        };

        let layer = match self.capture(&record, &qmp).await {
            Ok(layer) => layer,
            Err(e) => {
                tracing::warn!(vm = name, error = %e, "suspend failed; resuming the VM where it was");
                self.roll_back_suspend(&entry, &record, &qmp).await;
                return Err(e);
            }
        };
        // The layer is complete: from here the suspend finishes, even if
        // the agent dies (adopt completes it from `pending_snapshot`).
        {
            let mut s = entry.lock();
            s.record.pending_snapshot = Some(layer.id.to_string());
            s.runtime.stopping = true;
            self.save(&s)?;
        }
        let _ = qmp.quit().await;
        if tokio::time::timeout(QUIT_WAIT, process.wait_exit())
            .await
            .is_err()
        {
            process.kill().await?;
        }
        self.finish_suspend(&entry, &layer.id)?;
        tracing::info!(
            vm = name,
            layer = %layer.id,
            stored_bytes = layer.stored_bytes,
            ms = started.elapsed().as_millis() as u64,
            "suspended"
        );
        if warm {
            self.spawn_standby(entry.clone());
        }
        Ok(self.info_of(&entry))
    }

    /// Pauses the VM, cuts its network input, and writes a layer with its
    /// memory (diffed against the previous layer) and root disk.
    async fn capture(&self, record: &VmRecord, qmp: &QmpClient) -> AgentResult<LayerManifest> {
        let dir = self.vm_dir(&record.name);
        for id in nic_ids(record) {
            set_link(qmp, &id, false).await?;
        }
        qmp.stop().await?;
        let memory = dir.join(MEMORY_TMP);
        let _ = std::fs::remove_file(&memory);
        save_to_file(qmp, &memory, SAVE_TIMEOUT)
            .await
            .map_err(|e| AgentError::Snapshot(format!("saving the VM's memory: {e}")))?;

        // Paused, QEMU has flushed the root disk: copy its changes.
        let disks = {
            let (manager, record) = (self.clone(), record.clone());
            blocking("copying the disks", move || {
                manager.copy_disks_for_layer(&record, DISK_TMP_PREFIX)
            })
            .await?
        };
        let (parent, parent_memory) = self.diff_parent(record);
        let capture = Capture {
            memory: memory.clone(),
            disks,
            parent,
            parent_memory,
            labels: self.layer_labels(record, "suspend"),
        };
        let store = self.inner.snapshots.clone();
        let vm_holder = holder(&record.name);
        let layer = blocking("writing the snapshot layer", move || {
            // Referenced from the start, so a concurrent collection of
            // another VM's layers cannot take it.
            let layer = store_layer(&store, &capture, &vm_holder)?;
            // The new image is the next suspend's parent.
            if let Err(e) = replace_memory_image(&capture.memory, &layer.id) {
                let _ = store.remove_ref(&layer.id, &vm_holder);
                return Err(e);
            }
            Ok(layer)
        })
        .await;
        if layer.is_err() {
            let _ = std::fs::remove_file(dir.join(MEMORY_TMP));
            remove_tmp_disks(&dir, DISK_TMP_PREFIX);
        }
        layer
    }

    async fn roll_back_suspend(&self, entry: &VmEntry, record: &VmRecord, qmp: &QmpClient) {
        if let Err(e) = super::capture::continue_after_capture(qmp, true).await {
            tracing::error!(vm = %record.name, error = %e, "rollback");
        }
        for id in nic_ids(record) {
            let _ = set_link(qmp, &id, true).await;
        }
        let dir = self.vm_dir(&record.name);
        let _ = std::fs::remove_file(dir.join(MEMORY_TMP));
        remove_tmp_disks(&dir, DISK_TMP_PREFIX);
        let mut s = entry.lock();
        if let Err(e) = self.transition(&mut s, VmState::Running) {
            tracing::error!(vm = %record.name, error = %e, "rollback");
        }
        if let Err(e) = self.save(&s) {
            tracing::error!(vm = %record.name, error = %e, "saving the record failed");
        }
    }

    /// QEMU is gone and the layer complete: the layer becomes the head.
    pub(crate) fn finish_suspend(&self, entry: &VmEntry, layer: &LayerId) -> AgentResult<()> {
        let mut s = entry.lock();
        let name = s.record.name.clone();
        let store = &self.inner.snapshots;
        store.add_ref(layer, &holder(&name))?;
        if let Some(old) = s.record.snapshot_head.take() {
            if let Err(e) = store.remove_ref(&LayerId(old), &holder(&name)) {
                tracing::warn!(vm = %name, error = %e, "releasing the previous layer");
            }
        }
        s.record.snapshot_head = Some(layer.to_string());
        s.record.pending_snapshot = None;
        // Their contents now live in the layer: each disk starts over as an
        // empty overlay on the layer's copy, ready for the resume.
        for disk in s.record.disks.iter_mut().filter(|d| d.volume.is_none()) {
            let Some(copy) = layer_disk(store, layer, &disk.name) else {
                continue;
            };
            let _ = std::fs::remove_file(&disk.path);
            match disks::create_overlay(&disk.path, &copy, "qcow2") {
                Ok(()) => disk.backing = Some(copy),
                Err(e) => {
                    tracing::warn!(vm = %name, disk = %disk.name, error = %e, "preparing a disk for the resume")
                }
            }
        }
        self.settle_exited(entry, &mut s, VmState::Suspended, None);
        Ok(())
    }

    /// Brings a suspended VM back from its snapshot.
    pub async fn resume(&self, name: &str, wait_ready: bool) -> AgentResult<VmInfo> {
        let entry = self.entry(name)?;
        let op = entry.op_lock.lock().await;
        let started = Instant::now();
        let (record, generation) = {
            let _admission = self.inner.admission.lock().await;
            let others = self.allocated_excluding(&entry);
            let mut s = entry.lock();
            if s.record.state != VmState::Suspended {
                return Err(AgentError::conflict(
                    format!(
                        "VM {name:?} is {}: only a suspended VM can be resumed",
                        s.record.state
                    ),
                    None,
                ));
            }
            self.reserve_and_enter(&entry, &mut s, others, VmState::Resuming)?
        };
        let trusted = std::mem::take(&mut entry.lock().runtime.memory_just_captured);
        let standby = match &record.snapshot_head {
            Some(head) => Taken::new(self.take_standby(&entry, head).await),
            None => Taken::new(None),
        };
        match self.restore(&record, trusted, standby).await {
            Ok((process, qmp, mut backings, guest)) => {
                self.enter_running(&entry, process, qmp, generation, |r| {
                    for disk in &mut r.disks {
                        if let Some(b) = backings.remove(&disk.name) {
                            disk.backing = Some(b);
                        }
                    }
                    r.ready_ms = None;
                    if guest.is_some() {
                        r.identity_pending = false;
                        r.ready_ms = Some(started.elapsed().as_millis() as u64);
                    }
                })?;
                match guest {
                    // Identity and clock are set: the guest agent answered.
                    Some(client) => {
                        entry.lock().runtime.guest = Some(client);
                        entry.readiness.set(Readiness::Ready);
                    }
                    None => {
                        self.spawn_readiness_with_clock(entry.clone(), generation, started);
                    }
                }
            }
            Err(e) => {
                // The guest may have run and written: the next resume starts
                // from fresh overlays.
                self.discard_layer_overlays(&entry.lock().record);
                self.launch_failed(&entry, VmState::Suspended, &e)?;
                return Err(e);
            }
        }
        tracing::info!(
            vm = name,
            ms = started.elapsed().as_millis() as u64,
            "resumed"
        );
        drop(op);
        if wait_ready {
            self.wait_ready(&entry, self.inner.config.ready_timeout)
                .await
                .map_err(|e| self.with_console_tail(name, e))?;
        }
        Ok(self.info_of(&entry))
    }

    /// Memory image from the chain (checksums verified), a fresh overlay on
    /// the head's disk, taps, then QEMU loading the image.
    async fn restore(
        &self,
        record: &VmRecord,
        memory_just_captured: bool,
        standby: Taken,
    ) -> AgentResult<Restored> {
        let head = record.snapshot_head.clone().map(LayerId).ok_or_else(|| {
            AgentError::conflict(
                format!("VM {:?} has no snapshot to resume from", record.name),
                None,
            )
        })?;
        let dir = self.vm_dir(&record.name);
        let store = self.inner.snapshots.clone();
        // A chain with a missing or unreadable layer is refused up front,
        // naming it, before anything is touched.
        store.chain(&head)?;
        let memory = dir.join(MEMORY_IMAGE);
        // Each disk runs on an overlay of the layer's copy: made at suspend
        // time, so usually ready; made now otherwise. (A data disk the layer
        // has no copy of, from an older agent, stays as it is.)
        let mut backings = BTreeMap::new();
        let mut standby_fits = standby.is_some();
        // The host's volumes are attached as they are.
        for disk in record.disks.iter().filter(|d| d.volume.is_none()) {
            let Some(copy) = layer_disk(&store, &head, &disk.name) else {
                if disk.name == "root" {
                    return Err(AgentError::Snapshot(format!(
                        "snapshot layer {head} has no root disk"
                    )));
                }
                continue;
            };
            if !(disk.path.exists() && disk.backing.as_deref() == Some(copy.as_path())) {
                let _ = std::fs::remove_file(&disk.path);
                disks::create_overlay(&disk.path, &copy, "qcow2")?;
                // A standby opened the disk that was here.
                standby_fits = false;
            }
            backings.insert(disk.name.clone(), copy);
        }
        let mut config = self.qemu_config(record);
        // The image kept from the suspend (its marker names the head) is
        // used while the chain is verified, and the VM runs only once it
        // checks out; otherwise the image is rebuilt from the chain first
        // (verified as it goes).
        let head_size = store.get(&head)?.memory_size;
        let reuse = memory_image_layer(&dir).as_deref() == Some(head.as_str())
            && std::fs::metadata(&memory).is_ok_and(|m| m.len() == head_size);
        let phases = Instant::now();
        let mut check_time = Duration::ZERO;
        if !reuse {
            let (store, head, memory) = (store.clone(), head.clone(), memory.clone());
            blocking("rebuilding the memory image", move || {
                let tmp = memory.with_file_name(RESUME_MEMORY_TMP);
                store.materialize_memory(&head, &tmp)?;
                replace_memory_image(&tmp, &head)
            })
            .await?;
            check_time = phases.elapsed();
        }
        // Loaded whole, or mapped (QEMU loads only the device state) if
        // the host says so and the image's layout is the one we know.
        let state_file = dir.join(RESUME_STATE_TMP);
        let mapped = match self.inner.config.restore_memory {
            RestoreMemory::Load => false,
            RestoreMemory::Map => {
                let (image, state) = (memory.clone(), state_file.clone());
                let mut mapping = config.clone();
                let done = tokio::task::spawn_blocking(move || {
                    map_at_start(&mut mapping, &image, &state).map(|()| mapping)
                })
                .await;
                match done
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                {
                    Ok(with_mapping) => {
                        config = with_mapping;
                        true
                    }
                    Err(e) => {
                        tracing::warn!(vm = %record.name, error = %e, "loading the memory image instead of mapping it");
                        false
                    }
                }
            }
        };
        // A standby takes the kept image (loaded, never mapped) as it is.
        let standby = match standby.into_inner() {
            Some(s) if standby_fits && reuse && !mapped => Some(s),
            Some(s) => {
                let _ = s.process.kill().await;
                None
            }
            None => None,
        };
        // A new QEMU loads the image as it starts.
        if !mapped && standby.is_none() {
            load_at_start(&mut config, &memory);
        }
        let mut check = (reuse && !memory_just_captured).then(|| {
            let (store, head) = (store.clone(), head.clone());
            tokio::task::spawn_blocking(move || -> AgentResult<Duration> {
                store.verify(&head)?;
                Ok(phases.elapsed())
            })
        });
        let join_check = |handle: tokio::task::JoinHandle<AgentResult<Duration>>| async move {
            handle
                .await
                .map_err(|e| AgentError::io("checking the snapshot", std::io::Error::other(e)))?
        };
        let warm = standby.is_some();
        let launched = match standby {
            Some(standby) => self.reattach_standby(record, standby).await,
            None => self.launch_with(record, config).await,
        };
        let launch_time = phases.elapsed();
        let (process, qmp) = match launched {
            Ok(pq) => pq,
            Err(e) => {
                let _ = std::fs::remove_file(&state_file);
                if let Some(handle) = check.take() {
                    let _ = join_check(handle).await;
                }
                // QEMU may have died loading the image it was given.
                let _ = std::fs::remove_file(dir.join(MEMORY_IMAGE_LAYER));
                return Err(e);
            }
        };
        let loaded = async {
            let loaded = match warm {
                true => load_from_file(&qmp, &memory, LOAD_TIMEOUT).await,
                false => wait_incoming(&qmp, LOAD_TIMEOUT).await,
            };
            let _ = std::fs::remove_file(&state_file);
            loaded.map_err(|e| AgentError::Snapshot(format!("loading the VM's memory: {e}")))?;
            if let Some(handle) = check.take() {
                check_time = join_check(handle).await?;
            }
            if record.identity_pending {
                // The loaded state has the links of the VM it was captured
                // from up: down until this VM has its own identity.
                for id in nic_ids(record) {
                    set_link(&qmp, &id, false).await?;
                }
            }
            qmp.cont().await?;
            let loaded_at = phases.elapsed();
            // A VM from another VM's snapshot takes its own identity before
            // its network comes up, so it is never seen with the other's.
            let guest = match record.identity_pending {
                true => Some(self.apply_identity(record).await?),
                false => None,
            };
            for id in nic_ids(record) {
                set_link(&qmp, &id, true).await?;
            }
            tracing::info!(
                vm = %record.name,
                memory_ms = check_time.as_millis() as u64,
                qemu_ms = launch_time.as_millis() as u64,
                loaded_ms = loaded_at.as_millis() as u64,
                total_ms = phases.elapsed().as_millis() as u64,
                reused_memory = reuse,
                mapped_memory = mapped,
                warm,
                "restore phases"
            );
            Ok::<_, AgentError>(guest)
        }
        .await;
        match loaded {
            Ok(guest) => Ok((process, qmp, backings, guest)),
            Err(e) => {
                let _ = process.kill().await;
                let _ = std::fs::remove_file(&state_file);
                // Not trusted any more: the next resume rebuilds the image
                // from the chain.
                let _ = std::fs::remove_file(dir.join(MEMORY_IMAGE_LAYER));
                Err(e)
            }
        }
    }

    /// Readiness, then the guest's clock set to the host's: after a resume
    /// it still shows the moment of the suspend. The handle ends when the
    /// clock is set (or cannot be).
    pub(crate) fn spawn_readiness_with_clock(
        &self,
        entry: Arc<VmEntry>,
        generation: u64,
        since: Instant,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_readiness(entry.clone(), generation, Some(since));
        tokio::spawn(async move {
            let mut rx = entry.readiness.subscribe();
            if rx.wait_for(|r| *r != Readiness::Waiting).await.is_err() {
                return;
            }
            let client = entry.lock().runtime.guest.clone();
            let Some(client) = client else { return };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            match client.set_clock(now, Duration::from_secs(5)).await {
                Ok(ms) => tracing::info!(adjusted_by_ms = ms, "guest clock corrected after resume"),
                Err(e) => tracing::warn!(error = %e, "could not correct the guest clock"),
            }
        })
    }
}

impl VmManager {
    /// Removes the disks of a suspended VM that are overlays of layer disks
    /// (a data disk no layer holds, from an older agent, is real data).
    pub(crate) fn discard_layer_overlays(&self, record: &VmRecord) {
        let store_root = self.inner.snapshots.root();
        for disk in record.disks.iter().filter(|d| d.volume.is_none()) {
            if disk
                .backing
                .as_deref()
                .is_some_and(|b| b.starts_with(store_root))
                || disk.name == "root"
            {
                let _ = std::fs::remove_file(&disk.path);
            }
        }
    }
}

/// What a restore brings up: QEMU, its QMP connection, the disks' backings
/// by disk name, and the guest agent if the restore already talked to it.
type Restored = (
    Arc<QemuProcess>,
    QmpClient,
    BTreeMap<String, PathBuf>,
    Option<Arc<GuestClient>>,
);

/// The layer the VM directory's memory image holds, if known.
pub(crate) fn memory_image_layer(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(MEMORY_IMAGE_LAYER))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Moves `new` into place as the memory image of `layer`.
pub(crate) fn replace_memory_image(new: &Path, layer: &LayerId) -> AgentResult<()> {
    let dir = new.parent().unwrap_or(Path::new("."));
    let marker = dir.join(MEMORY_IMAGE_LAYER);
    match std::fs::remove_file(&marker) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io("updating the memory image", e)),
    }
    // On disk before the marker says what it is, so a crash never leaves a
    // marker naming a short or empty image.
    std::fs::File::open(new)
        .and_then(|f| f.sync_all())
        .map_err(|e| AgentError::io("syncing the memory image", e))?;
    std::fs::rename(new, dir.join(MEMORY_IMAGE))
        .map_err(|e| AgentError::io("placing the memory image", e))?;
    crate::fsutil::write_atomic(&marker, layer.0.as_bytes())
        .map_err(|e| AgentError::io("updating the memory image", e))
}

/// Removes what a suspend or resume may leave in a VM directory when
/// interrupted.
pub fn remove_leftovers(dir: &Path) {
    for path in [
        dir.join(MEMORY_TMP),
        dir.join(RESUME_MEMORY_TMP),
        dir.join(RESUME_STATE_TMP),
    ] {
        let _ = std::fs::remove_file(path);
    }
    remove_tmp_disks(dir, DISK_TMP_PREFIX);
}

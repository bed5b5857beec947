//! Live capture: a layer of a running VM. The VM is paused only to save its
//! memory and copy its disks' changes; it runs on while the layer is written.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::VmState;
use flotilla_qemu::migration::{cancel_outgoing, save_to_file};
use flotilla_snapshot::LayerManifest;

use super::layers::{remove_tmp_disks, store_layer, Capture};
use super::suspend::{blocking, replace_memory_image};
use super::{VmEntry, VmManager};
use crate::error::{AgentError, AgentResult};

const CAPTURE_MEMORY_TMP: &str = ".capture-memory.tmp";
const CAPTURE_DISK_TMP_PREFIX: &str = ".capture-disk";
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// A layer written from a running VM.
pub(crate) struct LiveCapture {
    pub layer: LayerManifest,
    /// How long the VM was paused.
    pub pause: Duration,
}

/// Removes what a live capture may leave in a VM directory when interrupted.
pub fn remove_capture_leftovers(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(CAPTURE_MEMORY_TMP));
    remove_tmp_disks(dir, CAPTURE_DISK_TMP_PREFIX);
}

/// Lets a VM paused for a capture run again. After a failed save QEMU may
/// still be finishing the migration, which must be cancelled first, or
/// `cont` is refused.
pub(crate) async fn continue_after_capture(
    qmp: &flotilla_qemu::QmpClient,
    save_failed: bool,
) -> AgentResult<()> {
    if save_failed {
        if let Err(e) = cancel_outgoing(qmp, Duration::from_secs(30)).await {
            tracing::warn!(error = %e, "cancelling the failed save");
        }
    }
    let mut last = None;
    for attempt in 0..5u64 {
        match qmp.cont().await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(attempt, error = %e, "continuing the VM after a capture");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
            }
        }
    }
    Err(AgentError::Snapshot(format!(
        "the VM stays paused: QEMU refused to continue it after the capture ({})",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}

impl VmManager {
    /// Writes a layer of a running VM, held by `layer_holder`; the VM runs
    /// on. The caller holds the VM's `op_lock`. With `keep_memory`, the
    /// layer's memory image is left there (for a clone to start from).
    pub(crate) async fn capture_live(
        &self,
        entry: &Arc<VmEntry>,
        kind: &str,
        layer_holder: &str,
        keep_memory: Option<&Path>,
    ) -> AgentResult<LiveCapture> {
        let (record, qmp) = {
            let s = entry.lock();
            let name = &s.record.name;
            super::migrate::check_disks_whole(&s.record)?;
            let what = match kind {
                "clone" => "a clone",
                _ => "a snapshot",
            };
            super::volumes::refuse_with_volumes(&s.record, what)?;
            if s.record.state != VmState::Running {
                return Err(AgentError::conflict(
                    format!("VM {name:?} is {}: it must be running", s.record.state),
                    None,
                ));
            }
            let Some(qmp) = s.runtime.qmp.clone() else {
                return Err(AgentError::conflict(
                    format!("VM {name:?} has no QMP connection to its QEMU"),
                    Some("stop and start it, then try again".into()),
                ));
            };
            (s.record.clone(), qmp)
        };
        let dir = self.vm_dir(&record.name);
        let memory = dir.join(CAPTURE_MEMORY_TMP);
        let cleanup = || remove_capture_leftovers(&dir);
        cleanup();

        qmp.stop().await?;
        let paused = Instant::now();
        let saved = async {
            save_to_file(&qmp, &memory, SAVE_TIMEOUT)
                .await
                .map_err(|e| AgentError::Snapshot(format!("saving the VM's memory: {e}")))?;
            let (manager, record) = (self.clone(), record.clone());
            blocking("copying the root disk", move || {
                manager.copy_disks_for_layer(&record, CAPTURE_DISK_TMP_PREFIX)
            })
            .await
        }
        .await;
        // The VM runs on whatever happened.
        let resumed = continue_after_capture(&qmp, saved.is_err()).await;
        let pause = paused.elapsed();
        let disks = match (saved, resumed) {
            (Ok(disks), Ok(())) => disks,
            (Err(e), _) => {
                cleanup();
                return Err(e);
            }
            (Ok(_), Err(e)) => {
                cleanup();
                return Err(e);
            }
        };
        tracing::info!(vm = %record.name, pause_ms = pause.as_millis() as u64, "captured a running VM");

        let (parent, parent_memory) = self.diff_parent(&record);
        let capture = Capture {
            memory: memory.clone(),
            disks,
            parent,
            parent_memory,
            labels: self.layer_labels(&record, kind),
        };
        let store = self.inner.snapshots.clone();
        let (layer_holder, keep) = (layer_holder.to_string(), keep_memory.map(Path::to_path_buf));
        let stored = blocking("writing the snapshot layer", move || {
            let layer = store_layer(&store, &capture, &layer_holder)?;
            let kept = match keep {
                Some(keep) => std::fs::rename(&capture.memory, &keep)
                    .map_err(|e| AgentError::io("keeping the captured memory image", e)),
                // The VM keeps it: its next layer is a small diff against this one.
                None => replace_memory_image(&capture.memory, &layer.id),
            };
            if let Err(e) = kept {
                // Nobody will use the layer: let it go.
                let _ = store.remove_ref(&layer.id, &layer_holder);
                return Err(e);
            }
            Ok(layer)
        })
        .await;
        cleanup();
        Ok(LiveCapture {
            layer: stored?,
            pause,
        })
    }
}

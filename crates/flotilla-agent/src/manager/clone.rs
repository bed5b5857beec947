//! Clones of running (or suspended) VMs: a live capture of the source, then
//! a new VM from that layer with its own identity.

use std::time::{Duration, Instant};

use flotilla_api::{CloneDisk, CloneResult, CloneVmRequest, VmState};
use flotilla_snapshot::LayerId;

use super::from_layer::{check_not_reserved, FromLayer};
use super::suspend::holder;
use super::VmManager;
use crate::error::{AgentError, AgentResult};

impl VmManager {
    /// Clones VM `source`: a new VM from a snapshot of it, with its own
    /// identity. A running source is paused only for the capture.
    pub async fn clone_vm(&self, source: &str, req: CloneVmRequest) -> AgentResult<CloneResult> {
        let started = Instant::now();
        crate::spec::validate_name("name", &req.name, 63).map_err(AgentError::from)?;
        check_not_reserved(&req.name)?;
        if let Some(tags) = &req.tags {
            crate::spec::validate_tags(tags).map_err(AgentError::from)?;
        }
        let src = self.entry(source)?;
        let _name = self.reserve_vm_name(&req.name)?;
        let new_holder = holder(&req.name);
        let staging = self.staging_memory_path();
        let (layer, pause, memory, tags) = {
            let _op = src.op_lock.lock().await;
            let (state, head, tags) = {
                let s = src.lock();
                super::volumes::refuse_with_volumes(&s.record, "a clone")?;
                (
                    s.record.state,
                    s.record.snapshot_head.clone(),
                    s.record.tags.clone(),
                )
            };
            // A clone stays in its source's network group, whatever tags
            // it is given (a source without one: the group asked for).
            let group = tags.get(flotilla_api::control::NETWORK_GROUP_TAG).cloned();
            let mut tags = req.tags.clone().unwrap_or(tags);
            if let Some(g) = group {
                tags.insert(flotilla_api::control::NETWORK_GROUP_TAG.into(), g);
            }
            match (state, head) {
                (VmState::Running, _) => {
                    let c = self
                        .capture_live(&src, "clone", &new_holder, Some(&staging))
                        .await?;
                    (c.layer, c.pause, Some(staging.as_path()), tags)
                }
                (VmState::Suspended, Some(head)) => {
                    let layer = self.inner.snapshots.get(&LayerId(head))?;
                    super::layers::check_head_has_disks(&src.lock().record, &layer)?;
                    self.inner.snapshots.add_ref(&layer.id, &new_holder)?;
                    (layer, Duration::ZERO, None, tags)
                }
                (state, _) => {
                    return Err(AgentError::conflict(
                        format!(
                        "VM {source:?} is {state}: only a running or suspended VM can be cloned"
                    ),
                        None,
                    ))
                }
            }
        };
        let made = self
            .create_from_layer(FromLayer {
                name: &req.name,
                layer: &layer,
                tags,
                read_only_root: req.disk == CloneDisk::ReadOnly,
                memory,
                memory_fresh: true,
                start: true,
                ip: None,
            })
            .await;
        let _ = std::fs::remove_file(&staging);
        // The clone's own reference (taken when the layer was made) now
        // lives in its record; without a clone it goes.
        if made.is_err() {
            let _ = self.inner.snapshots.remove_ref(&layer.id, &new_holder);
            let _ = self.inner.snapshots.gc();
        }
        let vm = made?;
        tracing::info!(source, clone = %req.name, pause_ms = pause.as_millis() as u64, "cloned");
        Ok(CloneResult {
            vm,
            snapshot: layer.id.0.clone(),
            source_pause_ms: pause.as_millis() as u64,
            total_ms: started.elapsed().as_millis() as u64,
        })
    }
}

//! Moving a VM's root disk to a volume of its own: a standalone qcow2 in
//! `<data>/volumes/<volume>/` holding everything the disk showed, so the VM
//! no longer depends on the snapshot layers (a clone's source) or the image
//! it came from. A running VM's disk moves live (QEMU mirrors it, writes
//! included, then switches over); a stopped VM's is converted.

use std::time::{Duration, Instant};

use flotilla_api::{VmInfo, VmState};
use flotilla_qemu::block::mirror_to_file;

use super::layers::root_disk;
use super::suspend::blocking;
use super::VmManager;
use crate::disks;
use crate::error::{AgentError, AgentResult};

pub const DEFAULT_VOLUME: &str = "default";
const MOVE_TIMEOUT: Duration = Duration::from_secs(1800);

impl VmManager {
    /// Moves VM `name`'s root disk into `volume` (default `default`).
    pub async fn move_disk(&self, name: &str, volume: Option<&str>) -> AgentResult<VmInfo> {
        let volume = volume.unwrap_or(DEFAULT_VOLUME);
        crate::spec::validate_name("volume", volume, 63).map_err(AgentError::from)?;
        let entry = self.entry(name)?;
        let _op = entry.op_lock.lock().await;
        let started = Instant::now();
        let (record, qmp) = {
            let s = entry.lock();
            (s.record.clone(), s.runtime.qmp.clone())
        };
        let Some(root) = root_disk(&record).cloned() else {
            return Err(AgentError::conflict(
                format!("VM {name:?} has no root disk"),
                None,
            ));
        };
        if root.read_only {
            return Err(AgentError::conflict(
                format!("VM {name:?} has its root disk attached read-only: there is nothing of its own to move"),
                Some("clone the source again with `--disk cow` for a clone with a disk of its own".into()),
            ));
        }
        let dir = self.inner.config.data_dir.join("volumes").join(volume);
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::io("creating the volume", e))?;
        let suffix: u32 = rand::random();
        let target = dir.join(format!("{name}-{}-root-{suffix:08x}.qcow2", record.id));
        let moved = match record.state {
            VmState::Running => {
                let qmp = qmp.ok_or_else(|| {
                    AgentError::conflict(
                        format!("VM {name:?} has no QMP connection to its QEMU"),
                        None,
                    )
                })?;
                let (src, dst) = (root.path.clone(), target.clone());
                blocking("creating the new disk", move || {
                    let size = disks::virtual_size(&src)?;
                    disks::create_blank_bytes(&dst, size)?;
                    Ok(())
                })
                .await?;
                let mut last_logged = Instant::now();
                mirror_to_file(&qmp, "disk-root", &target, MOVE_TIMEOUT, |done, total| {
                    if last_logged.elapsed() > Duration::from_secs(2) {
                        last_logged = Instant::now();
                        tracing::info!(vm = name, done, total, "moving the root disk");
                    }
                })
                .await
                .map_err(|e| AgentError::Snapshot(format!("moving the root disk: {e}")))
            }
            VmState::Stopped | VmState::Crashed => {
                let (src, dst) = (root.path.clone(), target.clone());
                blocking("copying the root disk", move || {
                    disks::convert_flat(&src, &dst).map_err(AgentError::from)
                })
                .await
            }
            state => Err(AgentError::conflict(
                format!("VM {name:?} is {state}: its disk can move while it runs or is stopped"),
                (state == VmState::Suspended)
                    .then(|| format!("resume it first (`flotilla vm resume {name}`)")),
            )),
        };
        if let Err(e) = moved {
            let _ = std::fs::remove_file(&target);
            return Err(e);
        }
        let old = {
            let mut s = entry.lock();
            let Some(disk) = s.record.disks.first_mut().filter(|d| d.name == "root") else {
                return Err(AgentError::conflict(
                    format!("VM {name:?} lost its root disk"),
                    None,
                ));
            };
            let old = std::mem::replace(&mut disk.path, target.clone());
            disk.backing = None;
            self.save(&s)?;
            old
        };
        // QEMU has let go of the old overlay; the layers under it stay for
        // whatever else holds them.
        if let Err(e) = std::fs::remove_file(&old) {
            tracing::warn!(vm = name, path = %old.display(), error = %e, "removing the old root disk");
        }
        tracing::info!(vm = name, volume, path = %target.display(), ms = started.elapsed().as_millis() as u64, "root disk moved");
        Ok(self.info_of(&entry))
    }
}

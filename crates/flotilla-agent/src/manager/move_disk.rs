//! Moving a VM's root disk to a volume of its own: a standalone qcow2 in
//! `<data>/volumes/<volume>/` holding everything the disk showed, so the VM
//! no longer depends on the snapshot layers (a clone's source) or the image
//! it came from. A running VM's disk moves live (QEMU mirrors it, writes
//! included, then switches over); a stopped VM's is converted. The move is
//! recorded (`pending_move`) before it starts, so an agent that dies half
//! way is followed by one that keeps whichever disk QEMU really uses.
//! A later suspend puts the moved disk's contents into the VM's first layer
//! after the move (the whole disk: it has no backing) and the VM goes on in
//! an overlay of that layer, still in its volume.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_api::{VmInfo, VmState};
use flotilla_qemu::block::{device_file, mirror_to_file};
use flotilla_qemu::QmpClient;

use super::layers::root_disk;
use super::suspend::blocking;
use super::{VmEntry, VmManager};
use crate::disks;
use crate::error::{AgentError, AgentResult};
use crate::record::PendingMove;

pub const DEFAULT_VOLUME: &str = "default";

/// How a live move failed: undone (the VM is on its old disk), or with the
/// outcome unknown (left recorded for the next agent start).
enum MoveFailure {
    Undo(AgentError),
    Unknown(AgentError),
}
const MOVE_TIMEOUT: Duration = Duration::from_secs(1800);

impl VmManager {
    /// The live move: QEMU mirrors the disk to `pending.to` and switches
    /// over. On an error, whichever file QEMU really uses wins.
    async fn mirror_live(
        &self,
        entry: &VmEntry,
        qmp: &QmpClient,
        pending: &PendingMove,
    ) -> Result<(), MoveFailure> {
        let name = entry.lock().record.name.clone();
        let mut last_logged = Instant::now();
        let mirrored = mirror_to_file(
            qmp,
            "disk-root",
            &pending.to,
            MOVE_TIMEOUT,
            |done, total| {
                if last_logged.elapsed() > Duration::from_secs(2) {
                    last_logged = Instant::now();
                    tracing::info!(vm = %name, done, total, "moving the root disk");
                }
            },
            || {
                // From here the target holds the latest writes.
                if let Err(e) = self.point_root_at(entry, &pending.to, None) {
                    tracing::error!(vm = %name, error = %e, "recording the switched disk");
                }
            },
        )
        .await;
        let Err(e) = mirrored else {
            return self
                .finish_move(entry, pending, true)
                .map_err(MoveFailure::Undo);
        };
        let failed = AgentError::Snapshot(format!("moving the root disk: {e}"));
        match device_file(qmp, "disk-root").await {
            Ok(file) if Path::new(&file) == pending.to => {
                tracing::warn!(vm = %name, error = %e, "the move reported an error after switching over; keeping the new disk");
                self.finish_move(entry, pending, true)
                    .map_err(MoveFailure::Undo)
            }
            Ok(_) => Err(MoveFailure::Undo(failed)),
            // Which file QEMU uses is unknown: both stay, with the record of
            // the move, for the next agent start to settle.
            Err(query) => {
                tracing::error!(vm = %name, error = %query, "cannot tell which disk QEMU uses after a failed move");
                Err(MoveFailure::Unknown(failed))
            }
        }
    }

    fn point_root_at(
        &self,
        entry: &VmEntry,
        path: &Path,
        backing: Option<PathBuf>,
    ) -> AgentResult<()> {
        let mut s = entry.lock();
        if let Some(disk) = s.record.disks.first_mut().filter(|d| d.name == "root") {
            disk.path = path.to_path_buf();
            disk.backing = backing;
        }
        self.save(&s)
    }

    /// Ends a move: `done` keeps the new disk and removes the old one;
    /// otherwise the new one goes and the record points at the old one.
    pub(crate) fn finish_move(
        &self,
        entry: &VmEntry,
        pending: &PendingMove,
        done: bool,
    ) -> AgentResult<()> {
        let (keep, (drop, keep_backing)) = if done {
            (&pending.to, (&pending.from, None))
        } else {
            (&pending.from, (&pending.to, pending.from_backing.clone()))
        };
        {
            let mut s = entry.lock();
            if let Some(disk) = s.record.disks.first_mut().filter(|d| d.name == "root") {
                disk.path = keep.clone();
                disk.backing = keep_backing;
            }
            s.record.pending_move = None;
            self.save(&s)?;
        }
        // QEMU no longer has it open (closed after the switch, or never
        // opened); layers under an old overlay stay for whatever holds them.
        if let Err(e) = std::fs::remove_file(drop) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %drop.display(), error = %e, "removing a disk left by a move");
            }
        }
        Ok(())
    }

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
        super::migrate::check_disks_whole(&record)?;
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
        if record.state == VmState::Running && qmp.is_none() {
            return Err(AgentError::conflict(
                format!("VM {name:?} has no QMP connection to its QEMU"),
                Some("stop and start it, then try again".into()),
            ));
        }
        if !matches!(
            record.state,
            VmState::Running | VmState::Stopped | VmState::Crashed
        ) {
            let state = record.state;
            return Err(AgentError::conflict(
                format!("VM {name:?} is {state}: its disk can move while it runs or is stopped"),
                (state == VmState::Suspended)
                    .then(|| format!("resume it first (`flotilla vm resume {name}`)")),
            ));
        }
        let pending = PendingMove {
            from: root.path.clone(),
            from_backing: root.backing.clone(),
            to: target.clone(),
        };
        {
            let mut s = entry.lock();
            s.record.pending_move = Some(pending.clone());
            self.save(&s)?;
        }
        let moved = match record.state {
            VmState::Running => {
                let qmp = qmp.ok_or_else(|| {
                    AgentError::conflict(
                        format!("VM {name:?} has no QMP connection to its QEMU"),
                        None,
                    )
                })?;
                let (src, dst) = (root.path.clone(), target.clone());
                let made = blocking("creating the new disk", move || {
                    let size = disks::virtual_size(&src)?;
                    disks::create_blank_bytes(&dst, size)?;
                    Ok(())
                })
                .await;
                match made {
                    Ok(()) => match self.mirror_live(&entry, &qmp, &pending).await {
                        Ok(()) => Ok(()),
                        Err(MoveFailure::Undo(e)) => Err(e),
                        Err(MoveFailure::Unknown(e)) => return Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            VmState::Stopped | VmState::Crashed => {
                let (src, dst) = (root.path.clone(), target.clone());
                let converted = blocking("copying the root disk", move || {
                    disks::convert_flat(&src, &dst).map_err(AgentError::from)
                })
                .await;
                converted.and_then(|()| self.finish_move(&entry, &pending, true))
            }
            state => Err(AgentError::conflict(
                format!("VM {name:?} is {state}: its disk can move while it runs or is stopped"),
                (state == VmState::Suspended)
                    .then(|| format!("resume it first (`flotilla vm resume {name}`)")),
            )),
        };
        if let Err(e) = moved {
            if let Err(undo) = self.finish_move(&entry, &pending, false) {
                tracing::error!(vm = name, error = %undo, "undoing the disk move");
            }
            return Err(e);
        }
        tracing::info!(vm = name, volume, path = %target.display(), ms = started.elapsed().as_millis() as u64, "root disk moved");
        Ok(self.info_of(&entry))
    }
}

//! Bringing a restarted agent back in charge: load every VM record, re-adopt
//! the QEMU processes that kept running, mark the ones that died as crashed,
//! and kill QEMU processes of this agent that no record claims.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use flotilla_api::VmState;
use flotilla_qemu::{QemuProcess, QmpClient};

use crate::error::{AgentError, AgentResult};
use crate::manager::{VmEntry, VmManager};
use crate::network;
use crate::record;
use crate::runtime::Readiness;

use std::time::Duration;

const QMP_ADOPT_DEADLINE: Duration = Duration::from_secs(5);

impl VmManager {
    /// Loads the records and takes over the VMs they describe.
    pub async fn adopt_all(&self) -> AgentResult<()> {
        self.remove_volume_leftovers();
        let vms_dir = self.config().vms_dir();
        let (records, errors) = record::load_all(&vms_dir)
            .map_err(|e| AgentError::io(format!("reading {}", vms_dir.display()), e))?;
        let unreadable = !errors.is_empty();
        self.inner
            .unreadable_records
            .store(unreadable, std::sync::atomic::Ordering::Relaxed);
        for e in errors {
            tracing::error!(error = %e, "skipping a VM record that cannot be read; its files are kept");
        }
        let mut adopted_pids = HashSet::new();
        for mut record in records {
            let name = record.name.clone();
            self.find_placed_volumes(&mut record);
            let entry = VmEntry::new(record);
            self.vms().insert(name.clone(), entry.clone());
            if let Some(pid) = self.adopt_one(&entry).await {
                adopted_pids.insert(pid);
            }
            self.settle_interrupted_move(&entry).await;
            // The head, and a pending suspend's layer that could not be
            // completed: disks may already sit on it.
            let keep = {
                let s = entry.lock();
                [
                    s.record.snapshot_head.clone(),
                    s.record.pending_snapshot.clone(),
                ]
            };
            self.release_stray_refs(&name, &keep);
            let dir = self.vm_dir(&name);
            crate::manager::suspend::remove_leftovers(&dir);
            crate::manager::remove_capture_leftovers(&dir);
        }
        kill_orphans(&self.config().sockets_dir(), &adopted_pids).await;
        // A base VM outlives its purpose when the agent died making the base.
        let base_vms: Vec<String> = self
            .vms()
            .keys()
            .filter(|n| n.starts_with(crate::manager::BASE_VM_PREFIX))
            .cloned()
            .collect();
        for name in base_vms {
            tracing::warn!(vm = %name, "removing a base VM left by an interrupted base snapshot");
            if let Err(e) = self.delete(&name, true).await {
                tracing::error!(vm = %name, error = %e, "removing the base VM");
            }
        }
        self.drop_stale_bases();
        self.sweep_snapshot_leftovers(unreadable);
        Ok(())
    }

    /// A root-disk move the previous agent did not finish: the file QEMU
    /// really uses decides (without QEMU, the record's switch point does).
    async fn settle_interrupted_move(&self, entry: &Arc<VmEntry>) {
        let (pending, qmp, current) = {
            let s = entry.lock();
            let current = s.record.disks.first().map(|d| d.path.clone());
            (
                s.record.pending_move.clone(),
                s.runtime.qmp.clone(),
                current,
            )
        };
        let Some(pending) = pending else { return };
        let done = match qmp {
            Some(qmp) => {
                let _ = flotilla_qemu::block::cancel_moves(&qmp).await;
                match flotilla_qemu::block::device_file(&qmp, "disk-root").await {
                    Ok(file) => std::path::Path::new(&file) == pending.to,
                    Err(e) => {
                        // Unknown which file QEMU uses: keep both, and the
                        // record, for the next agent start.
                        tracing::error!(error = %e, "cannot tell which disk QEMU uses; leaving an interrupted move as it is");
                        return;
                    }
                }
            }
            None => current.as_deref() == Some(pending.to.as_path()),
        };
        tracing::warn!(path = %pending.to.display(), done, "settling an interrupted disk move");
        if let Err(e) = self.finish_move(entry, &pending, done) {
            tracing::error!(error = %e, "settling an interrupted disk move");
        }
    }

    /// Drops what operations cut short by a crash left in the snapshot
    /// store: references of VMs that have no record (a clone that was never
    /// placed), of bases that are not the current ones, and staged memory
    /// images; then collects what nothing holds.
    /// With `unreadable` records around, nothing is collected: their layers
    /// may hold the only copy of their disks.
    fn sweep_snapshot_leftovers(&self, unreadable: bool) {
        let store = &self.inner.snapshots;
        // Every VM directory counts, readable record or not.
        let mut names: HashSet<String> = self.vms().keys().cloned().collect();
        let vms_dir = self.config().vms_dir();
        for entry in std::fs::read_dir(&vms_dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                names.insert(name);
            }
        }
        let bases_dir = self.config().data_dir.join("bases");
        let current_base = |key: &str| {
            std::fs::read_to_string(bases_dir.join(key).join("layer"))
                .map(|s| s.trim().to_string())
                .ok()
        };
        if let Ok(layers) = store.list() {
            for layer in layers {
                let Ok(holders) = store.refs(&layer.id) else {
                    continue;
                };
                for holder in holders {
                    let stale = match holder.split_once(':') {
                        Some(("vm", name)) => !names.contains(name),
                        Some(("base", key)) => {
                            current_base(key).as_deref() != Some(layer.id.as_str())
                        }
                        _ => false,
                    };
                    if stale {
                        tracing::info!(layer = %layer.id, holder = %holder, "releasing a reference left by an interrupted operation");
                        let _ = store.remove_ref(&layer.id, &holder);
                    }
                }
            }
        }
        let vms_dir = self.config().vms_dir();
        for dir in [vms_dir.clone()].into_iter().chain(
            std::fs::read_dir(&bases_dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        ) {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(crate::manager::STAGING_PREFIX) || name == ".memory.tmp" {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        if unreadable {
            tracing::warn!("not collecting snapshot layers while VM records cannot be read");
            return;
        }
        if let Err(e) = store.gc() {
            tracing::warn!(error = %e, "snapshot garbage collection");
        }
    }

    /// Re-adopts one VM; returns the QEMU pid if it still runs.
    async fn adopt_one(&self, entry: &Arc<VmEntry>) -> Option<i32> {
        let (state, identity, name) = {
            let s = entry.lock();
            (s.record.state, s.record.process, s.record.name.clone())
        };
        if !state.has_process() {
            let incoming = entry.lock().record.migration.is_some();
            if state == VmState::Creating && incoming {
                // A migration's half made while the agent died: it never ran.
                self.drop_interrupted_incoming(entry).await;
                return None;
            }
            if state == VmState::Creating {
                // A create interrupted after its directory was placed: it never ran.
                let mut s = entry.lock();
                let _ = self.transition(&mut s, VmState::Stopped);
                let _ = self.save(&s);
            }
            self.adopt_at_rest(entry);
            return None;
        }
        let switched = entry
            .lock()
            .record
            .migration
            .as_deref()
            .and_then(|id| self.migration(id).ok())
            .is_some_and(|m| m.switch_over_ms.is_some());
        if state == VmState::Incoming && switched {
            // It switched over just before the agent died: it is this
            // host's now, running (if QEMU lives) with its disks syncing.
            let mut s = entry.lock();
            let _ = self.transition(&mut s, VmState::Running);
            let _ = self.save(&s);
        } else if state == VmState::Incoming {
            // A migration that had not switched over: the source keeps or
            // takes back the VM, so this half goes.
            tracing::warn!(vm = %name, "an incoming migration was interrupted; removing its VM");
            if let Some(p) = identity.filter(|p| p.is_alive()) {
                let _ = p.signal(flotilla_qemu::Signal::SIGKILL);
            }
            self.drop_interrupted_incoming(entry).await;
            return None;
        }
        let mut alive = identity.filter(|p| p.is_alive());
        if let (VmState::Resuming, Some(p)) = (state, alive) {
            // A resume cut short: its snapshot is intact, so start over from it.
            tracing::warn!(vm = %name, "a resume was interrupted; back to suspended");
            let _ = p.signal(flotilla_qemu::Signal::SIGKILL);
            alive = None;
        }
        let Some(identity) = alive else {
            let pending = entry.lock().record.pending_snapshot.clone();
            if state == VmState::Suspending {
                if let Some(layer) = pending.map(flotilla_snapshot::LayerId) {
                    if self.inner.snapshots.get(&layer).is_ok() {
                        // The layer was complete before QEMU ended: finish.
                        tracing::info!(vm = %name, %layer, "completing an interrupted suspend");
                        if let Err(e) = self.finish_suspend(entry, &layer) {
                            tracing::error!(vm = %name, error = %e, "completing the suspend");
                        }
                        return None;
                    }
                }
            }
            let mut s = entry.lock();
            let (next, why) = match state {
                VmState::Stopping => (VmState::Stopped, None),
                VmState::Resuming => (
                    VmState::Suspended,
                    Some("the agent stopped during a resume; resume again".to_string()),
                ),
                _ => (
                    VmState::Crashed,
                    Some("QEMU exited while the agent was down".to_string()),
                ),
            };
            tracing::warn!(vm = %name, "QEMU is gone; marking the VM {next}");
            if state == VmState::Resuming {
                self.discard_layer_overlays(&s.record);
            }
            self.settle_exited(entry, &mut s, next, why);
            drop(s);
            self.adopt_at_rest(entry);
            return None;
        };
        let process = match QemuProcess::adopt(identity) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                // Most likely it exited a moment ago; make sure, then settle.
                tracing::error!(vm = %name, error = %e, "cannot adopt QEMU; killing it");
                let _ = identity.signal(flotilla_qemu::Signal::SIGKILL);
                let mut s = entry.lock();
                self.settle_exited(
                    entry,
                    &mut s,
                    VmState::Crashed,
                    Some(format!("could not re-adopt QEMU: {e}")),
                );
                return None;
            }
        };
        let qmp_socket = self
            .config()
            .sockets_dir()
            .join(format!("{}.qmp", entry.lock().record.id));
        let qmp = match QmpClient::connect_retry(&qmp_socket, QMP_ADOPT_DEADLINE).await {
            Ok(q) => Some(q),
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "QEMU runs but its QMP socket does not answer");
                None
            }
        };
        let mut rollback = false;
        let generation = {
            let mut s = entry.lock();
            // Make sure the NICs are still on the bridge (they survive an
            // agent restart, but the bridge may have been recreated).
            for nic in &s.record.nics {
                if let Err(e) = network::ensure_tap(&nic.tap, &self.config().bridge) {
                    tracing::warn!(vm = %name, tap = %nic.tap, error = %e, "cannot reattach tap");
                }
            }
            if s.record.state == VmState::Starting {
                // The agent died between spawning QEMU and seeing it up.
                let _ = self.transition(&mut s, VmState::Running);
            }
            if s.record.state == VmState::Suspending {
                // QEMU still runs (paused): the suspend never finished, so
                // it is undone below and the VM runs on where it was.
                let _ = self.transition(&mut s, VmState::Running);
                s.record.pending_snapshot = None;
                rollback = true;
            }
            s.runtime.process = Some(process.clone());
            s.runtime.qmp = qmp;
            s.runtime.stopping = false;
            s.runtime.generation += 1;
            entry.readiness.set(Readiness::Waiting);
            let _ = self.save(&s);
            s.runtime.generation
        };
        let qmp = entry.lock().runtime.qmp.clone();
        if state == VmState::Migrating {
            if let Some(qmp) = &qmp {
                self.adopt_migrating(entry, qmp);
            }
        } else if let (false, Some(qmp)) = (rollback, &qmp) {
            // A snapshot or clone of the running VM cut short leaves it
            // paused: it runs on.
            if let Ok(status) = qmp.query_status().await {
                if matches!(
                    status.status.as_str(),
                    "paused" | "postmigrate" | "finish-migrate"
                ) {
                    tracing::warn!(vm = %name, status = %status.status, "resuming a VM left paused by an interrupted capture");
                    let _ = flotilla_qemu::migration::cancel_outgoing(qmp, Duration::from_secs(30))
                        .await;
                    let _ = qmp.cont().await;
                }
            }
        }
        if rollback {
            if let Some(qmp) = qmp {
                tracing::warn!(vm = %name, "undoing an interrupted suspend");
                // QEMU may still be writing the state the dead agent asked for.
                if let Err(e) =
                    flotilla_qemu::migration::cancel_outgoing(&qmp, Duration::from_secs(30)).await
                {
                    tracing::error!(vm = %name, error = %e, "cancelling the interrupted save");
                }
                let _ = qmp.cont().await;
                let nics = entry.lock().record.nics.len();
                for i in 0..nics {
                    let _ =
                        flotilla_qemu::migration::set_link(&qmp, &format!("net{i}"), true).await;
                }
            }
        }
        self.resume_disk_sync(entry);
        tracing::info!(vm = %name, pid = identity.pid, "re-adopted running VM");
        self.spawn_monitor(entry.clone(), process, generation);
        self.spawn_readiness(entry.clone(), generation, None);
        if state == VmState::Stopping {
            // The user asked for a stop that the agent's death interrupted: finish it.
            let manager = self.clone();
            tokio::spawn(async move {
                if let Err(e) = manager.stop(&name, false, None).await {
                    tracing::error!(vm = %name, error = %e, "finishing an interrupted stop failed");
                }
            });
        }
        Some(identity.pid)
    }
}

impl VmManager {
    /// Drops the VM's references to layers other than its head: left by a
    /// suspend that was interrupted and rolled back.
    fn release_stray_refs(&self, vm: &str, keep: &[Option<String>]) {
        let store = &self.inner.snapshots;
        let holder = crate::manager::suspend::holder(vm);
        let Ok(layers) = store.list() else { return };
        for layer in layers {
            if keep.iter().flatten().any(|k| k == layer.id.as_str()) {
                continue;
            }
            if store.refs(&layer.id).is_ok_and(|r| r.contains(&holder)) {
                tracing::info!(vm, layer = %layer.id, "releasing a layer left by an interrupted suspend");
                let _ = store.remove_ref(&layer.id, &holder);
            }
        }
    }
}

/// Kills QEMU processes that point into this agent's socket directory (an
/// argument starting with `<sockets_dir>/`) but that no VM record claims:
/// left by a crash between spawning QEMU and saving the record, or warm
/// suspends' standbys. Returns once they have exited (within a bound): a
/// resume right after must not find its taps or disks still held.
async fn kill_orphans(sockets_dir: &Path, adopted: &HashSet<i32>) {
    let killed = kill_orphans_now(sockets_dir, adopted);
    let deadline = std::time::Instant::now() + ORPHAN_EXIT_WAIT;
    while killed.iter().any(|pid| !has_exited(*pid)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// How long the agent waits at start for killed orphans to exit.
const ORPHAN_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Gone, or a zombie (its files and devices are released at exit).
fn has_exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn kill_orphans_now(sockets_dir: &Path, adopted: &HashSet<i32>) -> Vec<i32> {
    let mut killed = Vec::new();
    let Ok(dir) = sockets_dir.canonicalize() else {
        return killed;
    };
    let marker = format!("{}/", dir.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if adopted.contains(&pid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_qemu = args
            .first()
            .is_some_and(|a| a.rsplit('/').next().unwrap_or(a).starts_with("qemu-system"));
        // Our QEMU arguments embed socket paths in option strings
        // ("socket,id=qmp,path=/.../sock/ID.qmp,..."), so look for
        // `path=<marker>` or an argument that starts with the marker.
        let ours = args
            .iter()
            .any(|a| a.starts_with(&marker) || a.contains(&format!("path={marker}")));
        if is_qemu && ours {
            tracing::warn!(pid, "killing an orphaned QEMU process of this agent");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed.push(pid);
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_has_not_exited_and_a_missing_one_has() {
        assert!(!has_exited(std::process::id() as i32));
        assert!(has_exited(i32::MAX));
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id() as i32;
        // Exited but not reaped: a zombie counts as gone.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(has_exited(pid));
        let _ = child.wait();
    }
}

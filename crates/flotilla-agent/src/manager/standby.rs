//! Warm suspends: after a suspend, a QEMU for the VM is started waiting for
//! incoming state (`-incoming defer`, the VM's devices, taps and disks),
//! so its resume loads the state into it and continues, without starting
//! QEMU (tens of ms under TCG, on the path a user waits on). The standby
//! holds no guest memory until then; it goes with the VM's removal, and a
//! restarted agent kills it as an orphan (its resume is then cold).

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use flotilla_api::VmState;
use flotilla_qemu::{QemuProcess, QmpClient};

use super::{VmEntry, VmManager};
use crate::config::RestoreMemory;
use crate::error::{AgentError, AgentResult};
use crate::record::VmRecord;
use crate::runtime::Standby;

/// Warm suspends kept at once by default (`--max-warm`).
pub const DEFAULT_MAX_STANDBYS: usize = 32;

impl VmManager {
    /// Whether this host can keep a suspended VM warm; why not otherwise.
    pub(crate) fn check_warm_possible(&self) -> AgentResult<()> {
        let config = &self.inner.config;
        if config.restore_memory != RestoreMemory::Load {
            return Err(AgentError::conflict(
                "this host maps memory images as QEMU starts (--restore-memory map), so no QEMU \
                 can wait for a resume",
                Some("suspend without --warm, or run the agent with --restore-memory load".into()),
            ));
        }
        if config.max_standbys == 0 {
            return Err(AgentError::conflict(
                "this host keeps no suspended VM warm (--max-warm 0)",
                Some("suspend without --warm, or run the agent with --max-warm N".into()),
            ));
        }
        Ok(())
    }

    /// Starts a standby for a VM just suspended, in the background (the
    /// suspend has answered). Nothing happens if the VM has moved on.
    pub(crate) fn spawn_standby(&self, entry: Arc<VmEntry>) {
        let manager = self.clone();
        tokio::spawn(async move {
            let _op = entry.op_lock.lock().await;
            let record = {
                let s = entry.lock();
                if s.record.state != VmState::Suspended || s.runtime.standby.is_some() {
                    return;
                }
                s.record.clone()
            };
            // Removed meanwhile (a removal queued ahead of this task): its
            // taps must not come back.
            let current = manager.vms().get(&record.name).cloned();
            if !current.is_some_and(|e| Arc::ptr_eq(&e, &entry)) {
                return;
            }
            // A mapped restore maps the memory image as QEMU starts: only a
            // loading one can take its state later (the suspend refused).
            if manager.inner.config.restore_memory != RestoreMemory::Load {
                return;
            }
            let (Some(head), Some(files)) = (record.snapshot_head.clone(), disk_files(&record))
            else {
                return;
            };
            let mut config = manager.qemu_config(&record);
            config.incoming = Some("defer".into());
            config.start_paused = true;
            match manager.launch_with(&record, config).await {
                Ok((process, qmp)) => {
                    tracing::info!(vm = %record.name, pid = process.identity.pid, "a QEMU waits for the resume");
                    entry.lock().runtime.standby = Some(Standby {
                        process,
                        qmp,
                        head,
                        files,
                        since: std::time::Instant::now(),
                    });
                    // Its own lock goes first: another start evicting at
                    // the same time may need to take this one.
                    drop(_op);
                    manager.evict_standbys().await;
                }
                Err(e) => {
                    tracing::warn!(vm = %record.name, error = %e, "could not start a standby QEMU; the resume will start one");
                    // As a suspended VM has them: none.
                    manager.cleanup_taps(&record);
                }
            }
        });
    }

    /// The VM's standby if it can take a resume from `head` with the disks
    /// the record names now; any other standby is killed.
    pub(crate) async fn take_standby(&self, entry: &VmEntry, head: &str) -> Option<Standby> {
        let standby = entry.lock().runtime.standby.take()?;
        let record = entry.lock().record.clone();
        let alive = standby.process.exit_info().is_none();
        if alive && standby.head == head && disk_files(&record).as_ref() == Some(&standby.files) {
            return Some(standby);
        }
        tracing::info!(vm = %record.name, alive, "the standby QEMU does not fit the resume; starting another");
        let _ = standby.process.kill().await;
        None
    }

    /// The standby as the resume's QEMU: its taps are checked on the bridge
    /// (which may have been made again meanwhile) and the network filter
    /// brought up to date, as a start does, before the state is loaded.
    pub(crate) async fn reattach_standby(
        &self,
        record: &VmRecord,
        standby: Standby,
    ) -> AgentResult<(Arc<QemuProcess>, QmpClient)> {
        let ready = async {
            self.ensure_taps(record)?;
            super::lifecycle::filter_applied(self.spawn_filter()).await
        };
        match ready.await {
            Ok(()) => Ok((standby.process, standby.qmp)),
            Err(e) => {
                let _ = standby.process.kill().await;
                Err(e)
            }
        }
    }

    /// Kills the oldest standbys beyond `--max-warm` (their VMs' resumes
    /// start QEMU again).
    async fn evict_standbys(&self) {
        let _one_at_a_time = self.inner.standby_eviction.lock().await;
        let mut warm: Vec<(std::time::Instant, Arc<VmEntry>)> = self
            .vms()
            .values()
            .filter_map(|e| {
                let since = e.lock().runtime.standby.as_ref().map(|s| s.since);
                since.map(|t| (t, e.clone()))
            })
            .collect();
        let mut excess = warm.len().saturating_sub(self.inner.config.max_standbys);
        warm.sort_by_key(|(since, _)| *since);
        for (_, entry) in warm {
            if excess == 0 {
                break;
            }
            // A VM busy with an operation (a resume taking its standby)
            // is left alone, its taps in use: the next oldest goes.
            let Ok(_op) = entry.op_lock.try_lock() else {
                continue;
            };
            if self.retire_standby(&entry).await {
                let name = entry.lock().record.name.clone();
                tracing::info!(vm = %name, "no longer warm: more suspended VMs are kept warm than --max-warm");
                excess -= 1;
            }
        }
    }

    /// Kills every standby and its taps (an agent leaving the host as it
    /// found it).
    pub(crate) async fn drop_all_standbys(&self) {
        let entries: Vec<Arc<VmEntry>> = self.vms().values().cloned().collect();
        for entry in entries {
            let _op = entry.op_lock.lock().await;
            self.retire_standby(&entry).await;
        }
    }

    /// Kills the VM's standby and removes the taps it held (a suspended VM
    /// has none); `true` if it had one. Call with the VM's `op_lock` held.
    async fn retire_standby(&self, entry: &VmEntry) -> bool {
        let retired = self.drop_standby(entry).await;
        if retired {
            self.cleanup_taps(&entry.lock().record);
        }
        retired
    }

    /// Kills the VM's standby, if it has one (then `true`).
    pub(crate) async fn drop_standby(&self, entry: &VmEntry) -> bool {
        let standby = entry.lock().runtime.standby.take();
        let Some(standby) = standby else {
            return false;
        };
        if let Err(e) = standby.process.kill().await {
            tracing::warn!(error = %e, "killing a standby QEMU");
        }
        true
    }
}

/// A standby taken for a resume: killed unless the resume uses it, so no
/// error path leaves it running unknown to the agent.
pub(crate) struct Taken(Option<Standby>);

impl Taken {
    pub(crate) fn new(standby: Option<Standby>) -> Taken {
        Taken(standby)
    }

    pub(crate) fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// The standby, for the resume to use (or kill) itself.
    pub(crate) fn into_inner(mut self) -> Option<Standby> {
        self.0.take()
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(standby) = self.0.take() {
            let _ = standby
                .process
                .identity
                .signal(flotilla_qemu::Signal::SIGKILL);
        }
    }
}

/// Device and inode of each of the VM's disks: what a QEMU started now opens.
fn disk_files(record: &VmRecord) -> Option<Vec<(u64, u64)>> {
    record
        .disks
        .iter()
        .map(|d| std::fs::metadata(&d.path).ok().map(|m| (m.dev(), m.ino())))
        .collect()
}

//! Live migration between two hosts' agents (issue 5). The source agent
//! drives ([`source`]): it exports the VM's disks over NBD, has the target
//! prepare a QEMU waiting for the memory stream ([`target`]), runs QEMU's
//! pre-copy over TCP, and at the end hands the VM over; the target runs it
//! at once and copies the rest of the disks from the source's export in the
//! background. The source lets go only when the target has all of it.
//!
//! Every migration has a record on each side (`<data>/migrations/<id>.json`,
//! written whole) that `GET /v1/migrations` shows with its progress.

mod source;
mod target;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flotilla_api::migration::{MigrationInfo, MigrationPhase, MigrationRole};

use crate::error::{AgentError, AgentResult};
use crate::fsutil::write_atomic;
use crate::record::now_rfc3339;

pub use source::SWITCH_OVER_TIMEOUT;

/// The migrations of this host, in memory and on disk.
pub struct MigrationBook {
    dir: PathBuf,
    items: Mutex<BTreeMap<String, MigrationInfo>>,
    cancels: Mutex<HashSet<String>>,
}

impl MigrationBook {
    /// Reads the records a previous agent left (unreadable ones are
    /// skipped with a warning).
    pub fn open(dir: &Path) -> MigrationBook {
        let mut items = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                match std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<MigrationInfo>(&b).ok())
                {
                    Some(m) => {
                        items.insert(m.id.clone(), m);
                    }
                    None => tracing::warn!(file = %path.display(), "unreadable migration record"),
                }
            }
        }
        MigrationBook {
            dir: dir.to_path_buf(),
            items: Mutex::new(items),
            cancels: Mutex::new(HashSet::new()),
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, MigrationInfo>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<MigrationInfo> {
        self.items().values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> AgentResult<MigrationInfo> {
        self.items()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::MigrationNotFound { id: id.to_string() })
    }

    /// Adds or replaces a record and writes it (write-then-rename).
    fn put(&self, info: MigrationInfo) -> AgentResult<()> {
        let bytes = serde_json::to_vec_pretty(&info)
            .map_err(|e| AgentError::io("encoding a migration record", std::io::Error::other(e)))?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| AgentError::io("creating the migrations directory", e))?;
        write_atomic(&self.dir.join(format!("{}.json", info.id)), &bytes)
            .map_err(|e| AgentError::io("writing a migration record", e))?;
        self.items().insert(info.id.clone(), info);
        Ok(())
    }

    /// Changes a record with `f` and writes it; progress that only the
    /// memory view needs can skip the write with `persist = false`.
    fn update(&self, id: &str, persist: bool, f: impl FnOnce(&mut MigrationInfo)) {
        let info = {
            let mut items = self.items();
            let Some(info) = items.get_mut(id) else {
                return;
            };
            f(info);
            info.clone()
        };
        if persist {
            if let Err(e) = self.put(info) {
                tracing::warn!(migration = id, error = %e, "saving the migration record");
            }
        }
    }

    /// Ends a record in `phase` with `error`.
    fn finish(&self, id: &str, phase: MigrationPhase, error: Option<String>, total_ms: u64) {
        self.update(id, true, |m| {
            m.phase = phase;
            m.error = error;
            m.finished_at = Some(now_rfc3339());
            m.total_ms = Some(total_ms);
        });
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Drops a finished record.
    fn forget(&self, id: &str) {
        self.items().remove(id);
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
    }

    fn request_cancel(&self, id: &str) {
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
    }

    fn cancel_requested(&self, id: &str) -> bool {
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }
}

fn new_record(id: &str, vm: &str, role: MigrationRole, peer: &str) -> MigrationInfo {
    MigrationInfo {
        id: id.to_string(),
        vm: vm.to_string(),
        role,
        peer: peer.to_string(),
        phase: MigrationPhase::Preparing,
        started_at: now_rfc3339(),
        finished_at: None,
        memory_bytes: 0,
        transferred_bytes: 0,
        remaining_bytes: 0,
        rounds: 0,
        dirty_pages_rate: 0,
        expected_downtime_ms: None,
        downtime_ms: None,
        disk_synced_bytes: 0,
        disk_total_bytes: 0,
        switch_over_ms: None,
        total_ms: None,
        error: None,
    }
}

impl super::VmManager {
    pub fn migrations(&self) -> Vec<MigrationInfo> {
        self.inner.migrations.list()
    }

    pub fn migration(&self, id: &str) -> AgentResult<MigrationInfo> {
        self.inner.migrations.get(id)
    }

    /// Where other hosts reach this one for migration streams and exports.
    fn migration_ip(&self) -> AgentResult<std::net::IpAddr> {
        let cfg = &self.inner.config;
        match cfg.migration_address {
            Some(ip) => Ok(ip),
            None if !cfg.listen.ip().is_unspecified() => Ok(cfg.listen.ip()),
            None => Err(AgentError::InvalidArgument(
                "this agent listens on every address: give it --migration-address, the address other hosts reach it at".into(),
            )),
        }
    }
}

impl super::VmManager {
    /// At adoption: the VM was being migrated away when the agent died. If
    /// QEMU still runs it, the migration is cancelled and it runs on here;
    /// if QEMU already handed it over (paused after the stream), the target
    /// may run it, so it is left paused for an operator to decide.
    pub(crate) async fn adopt_migrating(
        &self,
        entry: &std::sync::Arc<super::VmEntry>,
        qmp: &flotilla_qemu::QmpClient,
    ) {
        let (name, id, exports) = {
            let s = entry.lock();
            (
                s.record.name.clone(),
                s.record.migration.clone().unwrap_or_default(),
                s.record
                    .disks
                    .iter()
                    .map(|d| d.name.clone())
                    .collect::<Vec<_>>(),
            )
        };
        let running = qmp
            .query_status()
            .await
            .map(|st| st.running)
            .unwrap_or(false);
        if running {
            tracing::warn!(vm = %name, migration = %id, "a migration was interrupted before its switch-over; the VM runs on here");
            let _ = flotilla_qemu::live::cancel(qmp, std::time::Duration::from_secs(30)).await;
            flotilla_qemu::live::unexport_disks(qmp, &exports).await;
            self.back_to_running(entry, &id);
            self.inner.migrations.finish(
                &id,
                flotilla_api::migration::MigrationPhase::Failed,
                Some(
                    "the source agent restarted during the pre-copy; the VM runs on the source"
                        .into(),
                ),
                0,
            );
        } else {
            tracing::error!(vm = %name, migration = %id, "a migration was interrupted after its switch-over; the VM is left paused here");
            self.inner.migrations.finish(
                &id,
                flotilla_api::migration::MigrationPhase::Failed,
                Some("the source agent restarted after the switch-over: the VM may run on the target; it is left paused here".into()),
                0,
            );
        }
    }

    /// At adoption: a migrated-in VM whose disks were still syncing goes on
    /// syncing.
    pub(crate) fn resume_disk_sync(&self, entry: &std::sync::Arc<super::VmEntry>) {
        let id = {
            let s = entry.lock();
            let syncing = s.record.disks.iter().any(|d| d.sync_from.is_some());
            match (&s.record.migration, syncing, s.record.state) {
                (Some(id), true, flotilla_api::VmState::Running) => id.clone(),
                _ => return,
            }
        };
        tracing::info!(migration = %id, "resuming an interrupted disk sync");
        let manager = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move { manager.sync_disks(entry, id).await });
    }

    /// At adoption: the half of a migration that never switched over.
    pub(crate) async fn drop_interrupted_incoming(&self, entry: &std::sync::Arc<super::VmEntry>) {
        let id = entry.lock().record.migration.clone().unwrap_or_default();
        self.remove_incoming(entry).await;
        self.inner.migrations.finish(
            &id,
            flotilla_api::migration::MigrationPhase::Failed,
            Some("the target agent restarted before the switch-over".into()),
            0,
        );
    }
}

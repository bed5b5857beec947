//! Live migration between two hosts' agents (issue 5). The source agent
//! drives ([`source`]): it exports the VM's disks over NBD, has the target
//! prepare a QEMU waiting for the memory stream ([`target`]), runs QEMU's
//! pre-copy over TCP, and at the end hands the VM over; the target runs it
//! at once and copies the rest of the disks from the source's export in the
//! background. The source lets go only when the target has all of it.
//!
//! Every migration has a record on each side (`<data>/migrations/<id>.json`,
//! written whole) that `GET /v1/migrations` shows with its progress.

mod converge;
mod source;
mod target;
mod tunnel;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use flotilla_api::migration::{MigrationInfo, MigrationPhase, MigrationRole};

use crate::error::{AgentError, AgentResult};
use crate::fsutil::write_atomic;
use crate::record::now_rfc3339;

/// A migration's record as kept on disk: what the API shows, and the
/// peer's token (a source needs it to finish a migration after a restart).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Stored {
    #[serde(flatten)]
    info: MigrationInfo,
    #[serde(default)]
    peer_token: Option<String>,
    /// The peer agent's TLS certificate fingerprint (a source's record).
    #[serde(default)]
    peer_fingerprint: Option<String>,
    /// The target's address between the hosts (a source's record): where
    /// the VM's addresses are forwarded after the switch-over.
    #[serde(default)]
    forward_via: Option<std::net::Ipv4Addr>,
}

/// The migrations of this host, in memory and on disk.
pub struct MigrationBook {
    dir: PathBuf,
    items: Mutex<BTreeMap<String, Stored>>,
    cancels: Mutex<HashSet<String>>,
    /// Migrations this host takes part in at once (either side), each
    /// holding a slot until it ends: streams and disk copies share the
    /// host's network and disks.
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    held: Mutex<BTreeMap<String, tokio::sync::OwnedSemaphorePermit>>,
    limit: usize,
    /// Signalled on every change of a record: callers waiting for a phase
    /// to end (the source for the target's disk sync, `?wait=true`) answer
    /// at once instead of at their next poll.
    changed: tokio::sync::watch::Sender<()>,
}

/// Migrations a host takes part in at once by default.
pub const DEFAULT_MAX_MIGRATIONS: usize = 2;

/// Connections of a memory stream that may not switch to post-copy (QEMU
/// does not combine multifd with it here). Two: the pages are loaded by two
/// threads, and the target never touches the memory of zero pages (one
/// connection reads each, which under TCG, without huge pages on the target,
/// made a 1 GiB guest's migration 0.15 s longer).
const STREAM_CHANNELS: u32 = 2;

/// How many connections a migration's memory stream uses under `policy`.
/// One that QEMU encrypts itself (`qemu_tls`) uses one: QEMU 10.0 aborts
/// (a nettle assertion) when a multifd stream over TLS is cancelled while
/// its threads are sending, which would take the VM a cancel must leave
/// running. A stream the agents encrypt ([`tunnel`]) is plain to QEMU.
pub(crate) fn stream_channels(
    policy: flotilla_api::migration::ConvergencePolicy,
    qemu_tls: bool,
) -> u32 {
    match policy {
        _ if qemu_tls => 1,
        flotilla_api::migration::ConvergencePolicy::PostCopy => 1,
        _ => STREAM_CHANNELS,
    }
}

/// The unix socket a tunnelled stream passes between QEMU and this agent
/// (VM `vm_id`'s: one migration of a VM at a time).
pub(crate) fn stream_socket(config: &crate::config::AgentConfig, vm_id: &str) -> PathBuf {
    config.sockets_dir().join(format!("{vm_id}.mig"))
}

/// Migration ids are `m-` and 16 hex digits (they name files).
pub fn check_id(id: &str) -> AgentResult<()> {
    let ok =
        id.len() == 18 && id.starts_with("m-") && id[2..].bytes().all(|b| b.is_ascii_hexdigit());
    match ok {
        true => Ok(()),
        false => Err(AgentError::InvalidArgument(format!(
            "invalid migration id {id:?}: expected m- and 16 hex digits"
        ))),
    }
}

impl MigrationBook {
    /// Reads the records a previous agent left (unreadable ones are
    /// skipped with a warning).
    pub fn open(dir: &Path, limit: usize) -> MigrationBook {
        let mut items = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                match std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Stored>(&b).ok())
                {
                    Some(m) => {
                        items.insert(m.info.id.clone(), m);
                    }
                    None => tracing::warn!(file = %path.display(), "unreadable migration record"),
                }
            }
        }
        let limit = limit.max(1);
        MigrationBook {
            dir: dir.to_path_buf(),
            items: Mutex::new(items),
            cancels: Mutex::new(HashSet::new()),
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(limit)),
            held: Mutex::new(BTreeMap::new()),
            limit,
            changed: tokio::sync::watch::channel(()).0,
        }
    }

    /// Migration `id` once its phase is no longer `phase` (or it is gone),
    /// or as it is after `timeout`.
    pub async fn wait_past(
        &self,
        id: &str,
        phase: MigrationPhase,
        timeout: Duration,
    ) -> AgentResult<MigrationInfo> {
        // Subscribed before reading: a change in between is not missed.
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.get(id)?;
            if info.phase != phase {
                return Ok(info);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(info);
            }
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Stored>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<MigrationInfo> {
        self.items().values().map(|s| s.info.clone()).collect()
    }

    pub fn get(&self, id: &str) -> AgentResult<MigrationInfo> {
        self.items()
            .get(id)
            .map(|s| s.info.clone())
            .ok_or_else(|| AgentError::MigrationNotFound { id: id.to_string() })
    }

    /// How to call the other agent of migration `id` (a source's record).
    fn peer(&self, id: &str, endpoint: &str) -> source::Peer {
        let (token, fingerprint) = self
            .items()
            .get(id)
            .map(|s| (s.peer_token.clone(), s.peer_fingerprint.clone()))
            .unwrap_or_default();
        source::Peer::new(endpoint, token, fingerprint)
    }

    fn forward_via(&self, id: &str) -> Option<std::net::Ipv4Addr> {
        self.items().get(id).and_then(|s| s.forward_via)
    }

    /// Notes (on disk) where the VM's addresses go after the switch-over.
    fn set_forward_via(&self, id: &str, via: std::net::Ipv4Addr) {
        let mut items = self.items();
        if let Some(stored) = items.get_mut(id) {
            stored.forward_via = Some(via);
            if let Err(e) = self.write(stored) {
                tracing::warn!(migration = id, error = %e, "saving the migration record");
            }
        }
    }

    /// Writes a record (write-then-rename, private: it may hold a token).
    /// Called with the map locked, so writes of one record never cross.
    fn write(&self, stored: &Stored) -> AgentResult<()> {
        use std::os::unix::fs::PermissionsExt;
        let bytes = serde_json::to_vec_pretty(stored)
            .map_err(|e| AgentError::io("encoding a migration record", std::io::Error::other(e)))?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| AgentError::io("creating the migrations directory", e))?;
        let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        write_atomic(&self.dir.join(format!("{}.json", stored.info.id)), &bytes)
            .map_err(|e| AgentError::io("writing a migration record", e))
    }

    /// Adds a record and writes it; an id already known is refused.
    fn put(
        &self,
        info: MigrationInfo,
        peer_token: Option<String>,
        peer_fingerprint: Option<String>,
    ) -> AgentResult<()> {
        let mut items = self.items();
        if items.contains_key(&info.id) {
            return Err(AgentError::conflict(
                format!("migration {} is already known here", info.id),
                None,
            ));
        }
        let stored = Stored {
            info,
            peer_token,
            peer_fingerprint,
            forward_via: None,
        };
        self.write(&stored)?;
        items.insert(stored.info.id.clone(), stored);
        self.changed.send_replace(());
        Ok(())
    }

    /// Changes a record with `f` and writes it; progress that only the
    /// memory view needs can skip the write with `persist = false`.
    fn update(&self, id: &str, persist: bool, f: impl FnOnce(&mut MigrationInfo)) {
        let mut items = self.items();
        let Some(stored) = items.get_mut(id) else {
            return;
        };
        f(&mut stored.info);
        if persist {
            if let Err(e) = self.write(stored) {
                tracing::warn!(migration = id, error = %e, "saving the migration record");
            }
        }
        self.changed.send_replace(());
    }

    /// Changes a record only if the change is on disk first.
    fn try_update(&self, id: &str, f: impl FnOnce(&mut MigrationInfo)) -> AgentResult<()> {
        let mut items = self.items();
        let Some(stored) = items.get_mut(id) else {
            return Err(AgentError::MigrationNotFound { id: id.to_string() });
        };
        let mut changed = stored.clone();
        f(&mut changed.info);
        self.write(&changed)?;
        *stored = changed;
        self.changed.send_replace(());
        Ok(())
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
        self.release_slot(id);
    }

    /// Waits for a free slot for migration `id` (a source queues).
    async fn wait_for_slot(&self, id: &str) {
        if let Ok(permit) = self.slots.clone().acquire_owned().await {
            self.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_string(), permit);
        }
    }

    /// Takes a free slot for migration `id`, or says the host is busy (a
    /// target refuses; its source asks again later).
    fn take_slot(&self, id: &str) -> AgentResult<()> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            AgentError::conflict(
                format!(
                    "busy: this host already takes part in {} migrations",
                    self.limit
                ),
                Some("try again when one has ended".into()),
            )
        })?;
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), permit);
        Ok(())
    }

    fn release_slot(&self, id: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Drops a finished record.
    fn forget(&self, id: &str) {
        self.items().remove(id);
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
        self.changed.send_replace(());
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
        prediction: None,
        throttle_percent: None,
        disk_sync_limit_bps: None,
        tls: true,
        post_copy: false,
        disk_total_bytes: 0,
        switch_over_ms: None,
        total_ms: None,
        error: None,
    }
}

/// The SHA-256 of a file (a kernel, an initramfs, an image's root disk),
/// remembered by the file's identity and modification time: VMs pin their
/// image's files by hard link (which changes the ctime, not the mtime), so
/// one hash serves every VM of an image, and a migration does not wait for it.
pub(crate) fn file_sha256(path: &Path) -> AgentResult<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    type Stamp = (u64, u64, u64, i64, i64);
    static KNOWN: std::sync::OnceLock<Mutex<std::collections::HashMap<Stamp, String>>> =
        std::sync::OnceLock::new();
    let io = |e| AgentError::io(format!("reading {}", path.display()), e);
    let meta = std::fs::metadata(path).map_err(io)?;
    let stamp = (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
    );
    let known = KNOWN.get_or_init(Default::default);
    if let Some(sum) = known.lock().unwrap_or_else(|p| p.into_inner()).get(&stamp) {
        return Ok(sum.clone());
    }
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).map_err(io)?, &mut h).map_err(io)?;
    let sum = hex::encode(h.finalize());
    known
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(stamp, sum.clone());
    Ok(sum)
}

/// A free TCP port on `ip` (for disk exports, a resumed stream).
fn free_port(ip: std::net::IpAddr) -> AgentResult<u16> {
    let l = std::net::TcpListener::bind((ip, 0))
        .map_err(|e| AgentError::io(format!("finding a free port on {ip}"), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| AgentError::io("finding a free port", e))
}

/// Where a VM's migration keeps its TLS key (`keys.psk`), in its directory.
pub(crate) const TLS_DIR: &str = "migration-tls";

/// The finite-field Diffie-Hellman group `ffdhe2048` of RFC 7919, in the
/// PKCS#3 form QEMU reads as `dh-params.pem`. Without that file QEMU
/// generates fresh parameters for each server credential it makes, which
/// took 0.2-0.3 s (more on a busy host) on the migration's critical path;
/// a standard, well-vetted group is as safe.
const DH_PARAMS_PEM: &str = "\
-----BEGIN DH PARAMETERS-----\n\
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz\n\
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a\n\
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7\n\
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi\n\
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD\n\
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==\n\
-----END DH PARAMETERS-----\n";

/// Writes a migration's pre-shared key for QEMU's TLS credentials: a
/// private directory with `keys.psk` (`qemu:<hex>`) and `dh-params.pem`.
pub(crate) fn write_psk(vm_dir: &Path, hex_key: &str) -> AgentResult<PathBuf> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = vm_dir.join(TLS_DIR);
    let io = |e| AgentError::io("writing the migration's TLS key", e);
    if !hex_key.bytes().all(|b| b.is_ascii_hexdigit()) || hex_key.len() < 32 {
        return Err(AgentError::InvalidArgument(
            "tls_psk must be at least 32 hex digits".into(),
        ));
    }
    std::fs::create_dir_all(&dir).map_err(io)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(dir.join("keys.psk"))
        .map_err(io)?;
    std::io::Write::write_all(&mut f, format!("qemu:{hex_key}\n").as_bytes()).map_err(io)?;
    std::fs::write(dir.join("dh-params.pem"), DH_PARAMS_PEM).map_err(io)?;
    Ok(dir)
}

/// Removes a migration's TLS key (none is fine).
pub(crate) fn remove_psk(vm_dir: &Path) {
    let _ = std::fs::remove_dir_all(vm_dir.join(TLS_DIR));
}

/// A migrated-in VM's disk files lack what it has not synced from the
/// source yet: snapshots, clones, suspends and disk moves, which copy those
/// files, wait until the sync is done.
pub(crate) fn check_disks_whole(record: &crate::record::VmRecord) -> AgentResult<()> {
    // Until the migration has ended here (a post-copy still receives pages
    // after the disks are whole) nothing may take the VM's state either.
    if record.migration.is_some() || record.disks.iter().any(|d| d.sync_from.is_some()) {
        return Err(AgentError::conflict(
            format!(
                "VM {:?} is still receiving its disks or memory from the host it was migrated from",
                record.name
            ),
            Some("wait until `flotilla migration ls` shows its migration completed".into()),
        ));
    }
    Ok(())
}

impl super::VmManager {
    pub fn migrations(&self) -> Vec<MigrationInfo> {
        self.inner.migrations.list()
    }

    pub fn migration(&self, id: &str) -> AgentResult<MigrationInfo> {
        self.inner.migrations.get(id)
    }

    /// Migration `id` once it has left `phase`, or as it is after `timeout`.
    pub async fn migration_past(
        &self,
        id: &str,
        phase: MigrationPhase,
        timeout: Duration,
    ) -> AgentResult<MigrationInfo> {
        self.inner.migrations.wait_past(id, phase, timeout).await
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
    /// At adoption: the VM was being migrated away when the agent died.
    /// The migration is taken up again in the background, from where the
    /// VM is: still running here (it stays, the target's half goes), or
    /// paused after the stream (the target decides; see
    /// [`source::Outcome`]).
    pub(crate) fn adopt_migrating(
        &self,
        entry: &std::sync::Arc<super::VmEntry>,
        qmp: &flotilla_qemu::QmpClient,
    ) {
        let (name, id, exports) = {
            let s = entry.lock();
            (
                s.record.name.clone(),
                s.record.migration.clone().unwrap_or_default(),
                source::export_names(&s.record),
            )
        };
        let Ok(info) = self.inner.migrations.get(&id) else {
            // Marked before its record was written: it never began.
            tracing::warn!(vm = %name, migration = %id, "no record of the interrupted migration: it never began");
            let manager = self.clone();
            let (entry, qmp) = (entry.clone(), qmp.clone());
            tokio::spawn(async move {
                let _ = qmp.cont().await;
                manager.back_to_running(&entry, &id);
            });
            return;
        };
        tracing::warn!(vm = %name, migration = %id, "taking up an interrupted migration");
        let peer = self.inner.migrations.peer(&id, &info.peer);
        let (manager, entry, qmp) = (self.clone(), entry.clone(), qmp.clone());
        tokio::spawn(async move {
            let why = "the source agent restarted during the migration".to_string();
            let outcome = match info.phase {
                MigrationPhase::DiskSync => manager.await_target_sync(&id, &peer).await,
                _ => {
                    manager
                        .settle(&entry, &id, &peer, &qmp, &exports, why)
                        .await
                }
            };
            manager
                .conclude(&entry, &id, outcome, std::time::Instant::now())
                .await;
        });
    }

    /// A migrated-in VM whose migration is not finished (at adoption, or
    /// started again after a stop) goes on with its disk sync, which also
    /// finishes one that was whole already.
    pub(crate) fn resume_disk_sync(&self, entry: &std::sync::Arc<super::VmEntry>) {
        let Some(id) = entry.lock().record.migration.clone() else {
            return;
        };
        match self.inner.migrations.get(&id) {
            Ok(m) if m.role == MigrationRole::Target && !m.phase.is_finished() => {}
            Ok(m) if m.role == MigrationRole::Target && m.phase == MigrationPhase::Completed => {
                // Completed by an agent that died before the VM's record
                // followed.
                self.clear_migration(entry);
                return;
            }
            _ => return,
        }
        tracing::info!(migration = %id, "going on with a disk sync");
        let manager = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            // A move onto the overlay an earlier agent did not get to (or
            // did without recording it: then this one fails, and the disk
            // is copied whole).
            manager.move_disks_to_layers(&entry).await;
            manager.sync_disks(entry, id).await
        });
    }

    /// Whether the VM of `record` is the source's copy of a VM that moved
    /// or is moving: such a copy must never run next to the target's.
    pub(crate) fn is_source_copy(&self, record: &crate::record::VmRecord) -> bool {
        let Some(id) = &record.migration else {
            return false;
        };
        match self.inner.migrations.get(id) {
            Ok(m) => m.role == MigrationRole::Source,
            Err(_) => !record.disks.iter().any(|d| d.sync_from.is_some()),
        }
    }

    /// At adoption: a VM with a migration whose QEMU is not running. A
    /// target's goes on with its disk sync (or finishes it); a source's copy
    /// is resolved with the target: released if the VM is the target's now,
    /// freed to run here again once the target has removed its half.
    pub(crate) fn adopt_at_rest(&self, entry: &std::sync::Arc<super::VmEntry>) {
        let record = entry.lock().record.clone();
        let Some(id) = record.migration.clone() else {
            return;
        };
        if !self.is_source_copy(&record) {
            self.resume_disk_sync(entry);
            return;
        }
        let Ok(info) = self.inner.migrations.get(&id) else {
            self.clear_migration(entry);
            return;
        };
        let peer = self.inner.migrations.peer(&id, &info.peer);
        let (manager, entry) = (self.clone(), entry.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                match peer.migration(&id).await {
                    Ok(t) if t.switch_over_ms.is_some() => {
                        let outcome = manager.await_target_sync(&id, &peer).await;
                        manager.conclude(&entry, &id, outcome, started).await;
                        return;
                    }
                    Ok(_) | Err(source::PeerError::Refused { status: 404, .. }) => {
                        match peer.remove_half(&id).await {
                            Ok(()) | Err(source::PeerError::Refused { status: 404, .. }) => {
                                manager.clear_migration(&entry);
                                manager.inner.migrations.finish(
                                    &id,
                                    MigrationPhase::Failed,
                                    Some("the source's QEMU ended before the switch-over; the VM stays here".into()),
                                    0,
                                );
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(migration = %id, error = %e, "resolving an interrupted migration")
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(migration = %id, error = %e, "resolving an interrupted migration")
                    }
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }

    /// The VM is this host's alone again (it may be started).
    fn clear_migration(&self, entry: &super::VmEntry) {
        let mut s = entry.lock();
        s.record.migration = None;
        if let Err(e) = self.save(&s) {
            tracing::error!(error = %e, "saving the record after a migration");
        }
    }

    /// A migrated-in VM removed before its disks were synced: its
    /// migration fails, and the source lets go of its copy too.
    pub(crate) fn removed_while_syncing(&self, record: &crate::record::VmRecord) {
        let Some(id) = &record.migration else {
            return;
        };
        if let Ok(m) = self.inner.migrations.get(id) {
            if m.role == MigrationRole::Target && !m.phase.is_finished() {
                self.inner.migrations.finish(
                    id,
                    MigrationPhase::Failed,
                    Some("the VM was removed here before its disks were synced".into()),
                    0,
                );
            }
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_a_plain_pre_copy_stream_has_several_connections() {
        use flotilla_api::migration::ConvergencePolicy::*;
        assert_eq!(stream_channels(AutoConverge, false), STREAM_CHANNELS);
        assert_eq!(stream_channels(PostCopy, false), 1);
        // QEMU 10.0 aborts on a cancelled multifd stream over TLS.
        for policy in [AutoConverge, PostCopy] {
            assert_eq!(stream_channels(policy, true), 1);
        }
    }

    #[tokio::test]
    async fn a_wait_past_a_phase_answers_at_the_change_or_at_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let book = std::sync::Arc::new(MigrationBook::open(dir.path(), 2));
        let id = "m-00000000000000aa";
        book.put(
            new_record(id, "vm", MigrationRole::Target, "peer"),
            None,
            None,
        )
        .unwrap();
        // Already past it: at once.
        let now = book
            .wait_past(id, MigrationPhase::PreCopy, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(now.phase, MigrationPhase::Preparing);
        // Nothing changes: the record as it is, after the timeout.
        let started = std::time::Instant::now();
        let same = book
            .wait_past(id, MigrationPhase::Preparing, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(same.phase, MigrationPhase::Preparing);
        assert!(started.elapsed() >= Duration::from_millis(50));
        // Progress alone does not answer; the phase changing does, at once.
        let changer = book.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            changer.update(id, false, |m| m.transferred_bytes = 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
            changer.update(id, true, |m| m.phase = MigrationPhase::PreCopy);
        });
        let started = std::time::Instant::now();
        let moved = book
            .wait_past(id, MigrationPhase::Preparing, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            (moved.phase, moved.transferred_bytes),
            (MigrationPhase::PreCopy, 1)
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        // A record that goes away ends the wait with not found.
        let forgetter = book.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            forgetter.forget(id);
        });
        assert!(book
            .wait_past(id, MigrationPhase::PreCopy, Duration::from_secs(30))
            .await
            .is_err());
    }
}

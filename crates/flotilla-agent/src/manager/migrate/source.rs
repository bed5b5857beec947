//! The source side: the agent that has the VM drives the migration.
//!
//! Rollback rule: until the target has taken the switch-over, any failure
//! or a cancel leaves the VM running here (QEMU keeps running a VM whose
//! outgoing migration failed) and removes what the target made. After it,
//! the target is primary; if it reports its VM lost before the disks are
//! synced, the VM continues here from the switch-over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::migration::{
    IncomingMigrationReady, IncomingMigrationRequest, MigrateVmRequest, MigratingDisk,
    MigratingNic, MigratingVm, MigrationInfo, MigrationPhase, MigrationRole,
};
use flotilla_api::{ErrorBody, VmState};
use flotilla_qemu::live::{self, LiveLimits};
use flotilla_qemu::QmpClient;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::new_record;
use crate::error::{AgentError, AgentResult};
use crate::manager::{VmEntry, VmManager};
use crate::record::VmRecord;

/// How long the target may take to run the VM once memory is over.
pub const SWITCH_OVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the memory stream's progress is read.
const PROGRESS_POLL: Duration = Duration::from_millis(25);

/// Calls to the target agent's API.
struct Peer {
    endpoint: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Peer {
    fn new(endpoint: &str, token: Option<String>) -> Peer {
        Peer {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .connect_timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> AgentResult<T> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.endpoint));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            AgentError::Peer(format!("target agent {} unreachable: {e}", self.endpoint))
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| AgentError::Peer(format!("reading the target agent's answer: {e}")))?;
        if status.is_success() {
            let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(body).map_err(|e| {
                AgentError::Peer(format!("unreadable answer from the target agent: {e}"))
            });
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(AgentError::Peer(format!(
            "the target agent refused ({status}): {message}"
        )))
    }
}

fn sha256_file(path: &std::path::Path) -> AgentResult<String> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| AgentError::io(format!("reading {}", path.display()), e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)
        .map_err(|e| AgentError::io(format!("reading {}", path.display()), e))?;
    Ok(hex::encode(h.finalize()))
}

/// What the target needs to recreate `record`, with the disks exported at
/// `nbd_host:nbd_port`.
fn migrating_vm(record: &VmRecord, nbd: std::net::SocketAddr) -> AgentResult<MigratingVm> {
    Ok(MigratingVm {
        id: record.id.clone(),
        name: record.name.clone(),
        image: record.image.clone(),
        vcpus: record.vcpus,
        memory_mib: record.memory_mib,
        cmdline_extra: record.cmdline_extra.clone(),
        tags: record.tags.clone(),
        machine_id: record.machine_id.clone(),
        created_at: record.created_at.clone(),
        nics: record
            .nics
            .iter()
            .map(|n| MigratingNic {
                mac: n.mac.clone(),
                ip: n.ip.to_string(),
                prefix_len: n.prefix_len,
                gateway: n.gateway.to_string(),
            })
            .collect(),
        disks: record
            .disks
            .iter()
            .map(|d| MigratingDisk {
                name: d.name.clone(),
                format: d.format.clone(),
                size_mib: d.size_mib,
                read_only: d.read_only,
                nbd_host: nbd.ip().to_string(),
                nbd_port: nbd.port(),
                nbd_export: d.name.clone(),
            })
            .collect(),
        kernel_sha256: sha256_file(&record.kernel)?,
        initrd_sha256: record.initrd.as_deref().map(sha256_file).transpose()?,
    })
}

/// A free TCP port on `ip` for the disk exports.
fn free_port(ip: std::net::IpAddr) -> AgentResult<u16> {
    let l = std::net::TcpListener::bind((ip, 0))
        .map_err(|e| AgentError::io(format!("finding a free port on {ip}"), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| AgentError::io("finding a free port", e))
}

/// How a migration ended, for the source's cleanup.
enum Outcome {
    /// The target has the VM and all its disks.
    Moved,
    /// The VM runs here (cancelled, or failed before or at the switch-over).
    Stayed(MigrationPhase, String),
}

impl VmManager {
    /// Starts moving VM `name` to the agent at `req.target`; returns at once
    /// with the migration's record (watch it with [`VmManager::migration`]).
    pub async fn migrate(&self, name: &str, req: MigrateVmRequest) -> AgentResult<MigrationInfo> {
        if !(req.target.starts_with("http://") || req.target.starts_with("https://")) {
            return Err(AgentError::InvalidArgument(format!(
                "target {:?} is not an agent URL: expected http://HOST:PORT",
                req.target
            )));
        }
        if req.max_bandwidth_mibps == Some(0) {
            return Err(AgentError::InvalidArgument(
                "max_bandwidth_mibps must be at least 1".into(),
            ));
        }
        let ip = self.migration_ip()?;
        let entry = self.entry(name)?;
        let id = format!("m-{:016x}", rand::random::<u64>());
        {
            let _op = entry.op_lock.lock().await;
            let mut s = entry.lock();
            if s.record.state != VmState::Running {
                return Err(AgentError::conflict(
                    format!(
                        "VM {name:?} is {}: only a running VM can be migrated",
                        s.record.state
                    ),
                    None,
                ));
            }
            if s.record.disks.iter().any(|d| d.sync_from.is_some()) {
                return Err(AgentError::conflict(
                    format!("VM {name:?} is still syncing its disks from its last migration"),
                    Some("wait until `flotilla migration ls` shows it completed".into()),
                ));
            }
            self.transition(&mut s, VmState::Migrating)?;
            s.record.migration = Some(id.clone());
            self.save(&s)?;
        }
        let info = new_record(&id, name, MigrationRole::Source, &req.target);
        if let Err(e) = self.inner.migrations.put(info.clone()) {
            self.back_to_running(&entry, &id);
            return Err(e);
        }
        tracing::info!(vm = name, migration = %id, target = %req.target, "migration started");
        let manager = self.clone();
        tokio::spawn(async move { manager.run_source(entry, id, req, ip).await });
        Ok(info)
    }

    /// Asks a migration to stop; only the pre-copy can be stopped.
    pub fn cancel_migration(&self, id: &str) -> AgentResult<MigrationInfo> {
        let info = self.inner.migrations.get(id)?;
        if info.role != MigrationRole::Source {
            return Err(AgentError::conflict(
                format!("migration {id} is driven by its source host {}", info.peer),
                Some("cancel it on the source host's agent".into()),
            ));
        }
        if !matches!(
            info.phase,
            MigrationPhase::Preparing | MigrationPhase::PreCopy
        ) {
            return Err(AgentError::conflict(
                format!(
                    "migration {id} is {:?}: past the switch-over, it can no longer be cancelled",
                    info.phase
                ),
                None,
            ));
        }
        self.inner.migrations.request_cancel(id);
        Ok(info)
    }

    async fn run_source(
        &self,
        entry: Arc<VmEntry>,
        id: String,
        req: MigrateVmRequest,
        ip: std::net::IpAddr,
    ) {
        let started = Instant::now();
        let peer = Peer::new(&req.target, req.target_token.clone());
        let outcome = self
            .drive_source(&entry, &id, &req, ip, &peer, started)
            .await;
        let name = entry.lock().record.name.clone();
        let total = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(Outcome::Moved) => {
                self.release_moved(&entry).await;
                self.inner
                    .migrations
                    .finish(&id, MigrationPhase::Completed, None, total);
                tracing::info!(vm = %name, migration = %id, ms = total, "migration completed");
            }
            Ok(Outcome::Stayed(phase, why)) => {
                self.inner
                    .migrations
                    .finish(&id, phase, Some(why.clone()), total);
                tracing::warn!(vm = %name, migration = %id, reason = %why, "migration ended; the VM runs here");
            }
            Err(e) => {
                // Only reached before the switch-over: the VM runs here.
                self.back_to_running(&entry, &id);
                let _ = peer
                    .call::<serde_json::Value>(
                        reqwest::Method::DELETE,
                        &format!("/v1/migrations/{id}"),
                        None::<&()>,
                    )
                    .await;
                self.inner.migrations.finish(
                    &id,
                    MigrationPhase::Failed,
                    Some(e.to_string()),
                    total,
                );
                tracing::warn!(vm = %name, migration = %id, error = %e, "migration failed; the VM runs here");
            }
        }
    }

    /// Everything up to the end; an `Err` is a failure before the switch-over.
    async fn drive_source(
        &self,
        entry: &Arc<VmEntry>,
        id: &str,
        req: &MigrateVmRequest,
        ip: std::net::IpAddr,
        peer: &Peer,
        started: Instant,
    ) -> AgentResult<Outcome> {
        let book = &self.inner.migrations;
        let (record, qmp) = {
            let s = entry.lock();
            (s.record.clone(), s.runtime.qmp.clone())
        };
        let qmp =
            qmp.ok_or_else(|| AgentError::conflict("the VM's QEMU is not connected", None))?;
        let export_at = std::net::SocketAddr::new(ip, free_port(ip)?);
        let disks: Vec<(String, String)> = record
            .disks
            .iter()
            .map(|d| (format!("disk-{}", d.name), d.name.clone()))
            .collect();
        let exports: Vec<String> = disks.iter().map(|(_, e)| e.clone()).collect();
        let nodes: Vec<String> = disks.iter().map(|(n, _)| n.clone()).collect();
        live::export_disks(&qmp, export_at, &disks).await?;
        let vm = {
            let record = record.clone();
            tokio::task::spawn_blocking(move || migrating_vm(&record, export_at))
                .await
                .map_err(|e| AgentError::io("hashing the kernel", std::io::Error::other(e)))??
        };
        let request = IncomingMigrationRequest {
            id: id.to_string(),
            source: format!("http://{}", self.inner.config.listen),
            vm,
        };
        let ready: IncomingMigrationReady = match peer
            .call(
                reqwest::Method::POST,
                "/v1/migrations/incoming",
                Some(&request),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                live::unexport_disks(&qmp, &exports).await;
                return Err(e);
            }
        };
        let to: std::net::SocketAddr = format!("{}:{}", ready.host, ready.port)
            .parse()
            .map_err(|e| AgentError::Peer(format!("the target listens at a bad address: {e}")))?;
        book.update(id, true, |m| m.phase = MigrationPhase::PreCopy);
        let limits = LiveLimits {
            max_downtime_ms: req.max_downtime_ms,
            max_bandwidth_bps: req.max_bandwidth_mibps.map(|m| m << 20),
        };
        let precopy = self.precopy(&qmp, id, to, limits).await;
        let precopy = match precopy {
            Ok(None) => Ok(()),
            Ok(Some(stayed)) => {
                live::unexport_disks(&qmp, &exports).await;
                self.back_to_running(entry, id);
                self.abort_target(peer, id).await;
                return Ok(stayed);
            }
            Err(e) => Err(e),
        };
        if let Err(e) = precopy {
            live::unexport_disks(&qmp, &exports).await;
            return Err(e);
        }

        // Memory is over and the VM is paused here: hand it over.
        let switched = async {
            live::reactivate_for_reads(&qmp, &nodes).await?;
            peer.call::<MigrationInfo>(
                reqwest::Method::POST,
                &format!("/v1/migrations/{id}/switch-over"),
                None::<&()>,
            )
            .await
        }
        .await;
        if let Err(e) = switched {
            // The target did not take it: the VM continues here.
            tracing::warn!(migration = id, error = %e, "switch-over failed; continuing the VM here");
            self.abort_target(peer, id).await;
            live::unexport_disks(&qmp, &exports).await;
            qmp.cont().await?;
            self.back_to_running(entry, id);
            return Ok(Outcome::Stayed(
                MigrationPhase::Failed,
                format!("switch-over failed: {e}"),
            ));
        }
        book.update(id, true, |m| {
            m.phase = MigrationPhase::DiskSync;
            m.switch_over_ms = Some(started.elapsed().as_millis() as u64);
        });
        self.await_target_sync(entry, id, peer, &qmp, &exports)
            .await
    }

    /// Runs QEMU's pre-copy to its end. `Ok(None)`: memory is over;
    /// `Ok(Some(..))`: cancelled or failed, the VM still runs here.
    async fn precopy(
        &self,
        qmp: &QmpClient,
        id: &str,
        to: std::net::SocketAddr,
        limits: LiveLimits,
    ) -> AgentResult<Option<Outcome>> {
        let book = &self.inner.migrations;
        live::start_outgoing(qmp, to, limits).await?;
        let mut last_saved = Instant::now();
        loop {
            let p = live::progress(qmp).await?;
            let persist = last_saved.elapsed() > Duration::from_secs(1) || p.is_finished();
            if persist {
                last_saved = Instant::now();
            }
            book.update(id, persist, |m| {
                m.memory_bytes = p.memory_bytes;
                m.transferred_bytes = p.transferred_bytes;
                m.remaining_bytes = p.remaining_bytes;
                m.rounds = p.rounds;
                m.dirty_pages_rate = p.dirty_pages_rate;
                m.expected_downtime_ms = p.expected_downtime_ms;
                if p.downtime_ms.is_some() {
                    m.downtime_ms = p.downtime_ms;
                }
            });
            match p.status.as_str() {
                "completed" => return Ok(None),
                "failed" | "cancelled" => {
                    let why = p
                        .error
                        .unwrap_or_else(|| format!("QEMU reports {}", p.status));
                    return Ok(Some(Outcome::Stayed(
                        MigrationPhase::Failed,
                        format!("memory stream {}: {why}", p.status),
                    )));
                }
                _ => {}
            }
            if book.cancel_requested(id) {
                live::cancel(qmp, Duration::from_secs(10)).await?;
                // A cancel that came too late leaves QEMU completed.
                if live::progress(qmp).await?.status == "completed" {
                    return Ok(None);
                }
                return Ok(Some(Outcome::Stayed(
                    MigrationPhase::Cancelled,
                    "cancelled on request".into(),
                )));
            }
            tokio::time::sleep(PROGRESS_POLL).await;
        }
    }

    /// After the switch-over: waits until the target has synced the disks.
    /// If the target reports the VM lost first, it continues here.
    async fn await_target_sync(
        &self,
        entry: &Arc<VmEntry>,
        id: &str,
        peer: &Peer,
        qmp: &QmpClient,
        exports: &[String],
    ) -> AgentResult<Outcome> {
        let book = &self.inner.migrations;
        let mut unreachable_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match peer
                .call::<MigrationInfo>(
                    reqwest::Method::GET,
                    &format!("/v1/migrations/{id}"),
                    None::<&()>,
                )
                .await
            {
                Ok(t) => {
                    unreachable_since = None;
                    book.update(id, false, |m| {
                        m.disk_synced_bytes = t.disk_synced_bytes;
                        m.disk_total_bytes = t.disk_total_bytes;
                        m.error = None;
                    });
                    match t.phase {
                        MigrationPhase::Completed => return Ok(Outcome::Moved),
                        MigrationPhase::Failed | MigrationPhase::Cancelled => {
                            // The target lost the VM before it had the
                            // disks: the source's copy is the VM as it was
                            // at the switch-over.
                            live::unexport_disks(qmp, exports).await;
                            qmp.cont().await?;
                            self.back_to_running(entry, id);
                            return Ok(Outcome::Stayed(
                                MigrationPhase::Failed,
                                format!(
                                    "the target lost the VM during the disk sync ({}); it continues here from the switch-over",
                                    t.error.unwrap_or_default()
                                ),
                            ));
                        }
                        _ => {}
                    }
                }
                Err(e) => {
                    // Unknown is not dead: the target may still run the VM.
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    book.update(id, false, |m| {
                        m.error = Some(format!(
                            "waiting for the target for {} s: {e}",
                            since.elapsed().as_secs()
                        ))
                    });
                }
            }
        }
    }

    async fn abort_target(&self, peer: &Peer, id: &str) {
        if let Err(e) = peer
            .call::<serde_json::Value>(
                reqwest::Method::DELETE,
                &format!("/v1/migrations/{id}"),
                None::<&()>,
            )
            .await
        {
            tracing::warn!(migration = id, error = %e, "could not remove the target's half");
        }
    }

    /// The VM stays (or is again) running here.
    pub(crate) fn back_to_running(&self, entry: &VmEntry, id: &str) {
        let mut s = entry.lock();
        if s.record.migration.as_deref() != Some(id) {
            return;
        }
        s.record.migration = None;
        if s.record.state == VmState::Migrating {
            if let Err(e) = self.transition(&mut s, VmState::Running) {
                tracing::error!(error = %e, "ending a migration");
            }
        }
        if let Err(e) = self.save(&s) {
            tracing::error!(error = %e, "saving the record after a migration");
        }
    }

    /// The target has the VM: this host's QEMU, taps, disks and record go.
    async fn release_moved(&self, entry: &Arc<VmEntry>) {
        let (name, process, qmp) = {
            let mut s = entry.lock();
            s.runtime.stopping = true;
            (
                s.record.name.clone(),
                s.runtime.process.clone(),
                s.runtime.qmp.clone(),
            )
        };
        if let Some(qmp) = qmp {
            let _ = qmp.quit().await;
        }
        if let Some(p) = process {
            if tokio::time::timeout(Duration::from_secs(5), p.wait_exit())
                .await
                .is_err()
            {
                let _ = p.kill().await;
            }
        }
        {
            let mut s = entry.lock();
            s.record.migration = None;
            self.settle_exited(entry, &mut s, VmState::Stopped, None);
        }
        if let Err(e) = self.delete(&name, true).await {
            tracing::error!(vm = %name, error = %e, "removing the migrated VM's leftovers");
        }
    }
}

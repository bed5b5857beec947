//! The source side: the agent that has the VM drives the migration.
//!
//! The one rule: the VM never runs on both hosts. Until QEMU has sent the
//! last of its state, a failure or a cancel leaves it running here (QEMU
//! keeps running a VM whose outgoing stream failed) and removes the
//! target's half. Once the stream is complete the VM is paused here, and it
//! continues here only when the target has confirmed it removed its half
//! without running it; while the target cannot be asked, the VM stays
//! paused. After the switch-over the target is primary: this side only
//! serves the disks until the target has them, then lets go.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::migration::{
    ConvergencePolicy, IncomingMigrationReady, IncomingMigrationRequest, MigrateVmRequest,
    MigratingDisk, MigratingLayer, MigratingNic, MigratingVm, MigrationInfo, MigrationPhase,
    MigrationRole,
};
use flotilla_api::{ErrorBody, VmState};
use flotilla_qemu::live::{self, LiveLimits, StreamAddr};
use flotilla_qemu::QmpClient;
use serde::de::DeserializeOwned;

use super::{file_sha256, new_record};
use crate::error::{AgentError, AgentResult};
use crate::manager::{VmEntry, VmManager};
use crate::record::VmRecord;

/// How often the memory stream's progress is read.
const PROGRESS_POLL: Duration = Duration::from_millis(25);
/// How often an unreachable target is asked again.
const PEER_RETRY: Duration = Duration::from_secs(1);
/// Longest wait for the target's answer while it syncs disks.
const SYNC_POLL: Duration = Duration::from_millis(500);

/// Why a call to the target failed: it said no, or it could not be asked.
#[derive(Debug)]
pub(super) enum PeerError {
    Unreachable(String),
    Refused { status: u16, message: String },
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerError::Unreachable(m) => write!(f, "target agent unreachable: {m}"),
            PeerError::Refused { status, message } => {
                write!(f, "the target agent refused ({status}): {message}")
            }
        }
    }
}

impl From<PeerError> for AgentError {
    fn from(e: PeerError) -> Self {
        AgentError::Peer(e.to_string())
    }
}

/// Calls to the target agent's API.
#[derive(Clone)]
pub(super) struct Peer {
    endpoint: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Peer {
    /// The agent at `endpoint`, trusted by its certificate's `fingerprint`
    /// when it serves HTTPS (checked before it is stored).
    pub(super) fn new(endpoint: &str, token: Option<String>, fingerprint: Option<String>) -> Peer {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5));
        if let Some(f) = &fingerprint {
            match flotilla_tls::pinned_client_config(f) {
                Ok(tls) => builder = builder.use_preconfigured_tls(tls),
                Err(e) => {
                    tracing::error!(endpoint, error = %e, "the peer's fingerprint is unusable")
                }
            }
        }
        Peer {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            http: builder.build().unwrap_or_default(),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, PeerError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.endpoint));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let unreachable =
            |e: reqwest::Error| PeerError::Unreachable(format!("{}: {e}", self.endpoint));
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(body)
                .map_err(|e| PeerError::Unreachable(format!("unreadable answer: {e}")));
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(PeerError::Refused {
            status: status.as_u16(),
            message,
        })
    }

    pub(super) async fn migration(&self, id: &str) -> Result<MigrationInfo, PeerError> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/migrations/{id}"),
            None::<&()>,
        )
        .await
    }

    /// The target's view of migration `id`, once it has left `phase` or
    /// after `wait` (the target answers a change at once).
    pub(super) async fn migration_past(
        &self,
        id: &str,
        phase: MigrationPhase,
        wait: Duration,
    ) -> Result<MigrationInfo, PeerError> {
        let phase = serde_json::to_value(phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        self.call(
            reqwest::Method::GET,
            &format!(
                "/v1/migrations/{id}?phase={phase}&wait_ms={}",
                wait.as_millis()
            ),
            None::<&()>,
        )
        .await
    }

    /// Asks the target to remove its half (refused with 409 once the VM
    /// has run there).
    pub(super) async fn remove_half(&self, id: &str) -> Result<(), PeerError> {
        self.call::<serde_json::Value>(
            reqwest::Method::DELETE,
            &format!("/v1/migrations/{id}"),
            None::<&()>,
        )
        .await
        .map(|_| ())
    }
}

/// A VM's disk exports: each disk as the guest sees it, and an overlay's
/// own bytes apart.
pub(super) fn export_names(record: &VmRecord) -> Vec<String> {
    record
        .disks
        .iter()
        .flat_map(|d| {
            let layer = on_image_base(d).then(|| layer_export(&d.name));
            std::iter::once(d.name.clone()).chain(layer)
        })
        .collect()
}

/// Whether a disk is an overlay right over its image's root disk (pinned in
/// the VM's directory), which a target with the same image has too.
fn on_image_base(d: &crate::record::DiskRecord) -> bool {
    d.backing
        .as_deref()
        .and_then(|b| b.file_name())
        .is_some_and(|f| f == crate::manager::create::BASE_DISK)
}

/// The export of a disk's own bytes (its overlay over the image's base);
/// the dot keeps it apart from disk names.
fn layer_export(disk: &str) -> String {
    format!("{disk}.layer")
}

/// Whether a post-copy's stream is stuck: nothing sent for
/// [`super::converge::STALL_LIMIT`].
#[derive(Default)]
pub(super) struct PostCopyWatch {
    last: Option<(u64, Instant)>,
}

impl PostCopyWatch {
    fn stuck(&mut self, transferred: u64, now: Instant) -> bool {
        match self.last {
            Some((bytes, since)) if bytes == transferred => {
                now.duration_since(since) >= super::converge::STALL_LIMIT
            }
            _ => {
                self.last = Some((transferred, now));
                false
            }
        }
    }
}

/// How a migration ended, for the source's cleanup.
pub(super) enum Outcome {
    /// The target has the VM and all its disks.
    Moved,
    /// The VM was removed on the target after it took over: nothing of it
    /// is to run here either.
    RemovedThere(String),
    /// The VM runs here (cancelled, or failed before the switch-over).
    Stayed(MigrationPhase, String),
}

impl VmManager {
    /// Starts moving VM `name` to the agent at `req.target`; returns at once
    /// with the migration's record (watch it with [`VmManager::migration`]).
    pub async fn migrate(&self, name: &str, req: MigrateVmRequest) -> AgentResult<MigrationInfo> {
        if !(req.target.starts_with("http://") || req.target.starts_with("https://")) {
            return Err(AgentError::InvalidArgument(format!(
                "target {:?} is not an agent URL: expected https://HOST:PORT (or http:// for an agent serving plain HTTP)",
                req.target
            )));
        }
        flotilla_tls::check_pin(&req.target, req.target_fingerprint.as_deref())
            .map_err(|e| AgentError::InvalidArgument(format!("target_fingerprint: {e}")))?;
        for (field, v) in [
            ("max_bandwidth_mibps", req.max_bandwidth_mibps),
            ("disk_sync_mibps", req.disk_sync_mibps),
        ] {
            if v == Some(0) || v > Some(1 << 30) {
                return Err(AgentError::InvalidArgument(format!(
                    "{field} must be 1 to 1073741824"
                )));
            }
        }
        let ip = self.migration_ip()?;
        let entry = self.entry(name)?;
        let id = format!("m-{:016x}", rand::random::<u64>());
        let mut info = new_record(&id, name, MigrationRole::Source, &req.target);
        info.tls = req.tls;
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
            if s.record.migration.is_some() {
                return Err(AgentError::conflict(
                    format!("VM {name:?} is still syncing its disks from its last migration"),
                    Some("wait until `flotilla migration ls` shows it completed".into()),
                ));
            }
            if s.record.disks.iter().any(|d| d.read_only) {
                return Err(AgentError::conflict(
                    format!("VM {name:?} has a read-only disk shared with another VM: it cannot leave this host"),
                    Some("move its disk to its own volume first (`flotilla vm move-disk`)".into()),
                ));
            }
            // The migration's record first: a VM marked migrating always
            // has one to be taken up from.
            self.inner.migrations.put(
                info.clone(),
                req.target_token.clone(),
                req.target_fingerprint.clone(),
            )?;
            self.transition(&mut s, VmState::Migrating)?;
            s.record.migration = Some(id.clone());
            if let Err(e) = self.save(&s) {
                s.record.state = VmState::Running;
                s.record.migration = None;
                self.inner
                    .migrations
                    .finish(&id, MigrationPhase::Failed, Some(e.to_string()), 0);
                return Err(e);
            }
        }
        tracing::info!(vm = name, migration = %id, target = %req.target, "migration started");
        let manager = self.clone();
        tokio::spawn(async move {
            let peer = Peer::new(
                &req.target,
                req.target_token.clone(),
                req.target_fingerprint.clone(),
            );
            let book = &manager.inner.migrations;
            book.update(&id, false, |m| {
                m.error = Some("waiting for one of this host's migration slots".into())
            });
            book.wait_for_slot(&id).await;
            book.update(&id, false, |m| m.error = None);
            let started = Instant::now();
            let outcome = manager
                .drive_source(&entry, &id, &req, ip, &peer, started)
                .await;
            manager.conclude(&entry, &id, outcome, started).await;
        });
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
        ) || info.post_copy
        {
            return Err(AgentError::conflict(
                format!(
                    "migration {id} is {:?}{}: past the switch-over, it can no longer be cancelled",
                    info.phase,
                    if info.post_copy { " in post-copy" } else { "" }
                ),
                None,
            ));
        }
        self.inner.migrations.request_cancel(id);
        Ok(info)
    }

    /// Cleans up after `outcome` and ends the record.
    pub(super) async fn conclude(
        &self,
        entry: &Arc<VmEntry>,
        id: &str,
        outcome: Outcome,
        started: Instant,
    ) {
        let name = entry.lock().record.name.clone();
        let total = started.elapsed().as_millis() as u64;
        let book = &self.inner.migrations;
        match outcome {
            Outcome::Moved => {
                // The window counts from now: other hosts route the address
                // here until the control plane records the move, which
                // comes after this release.
                self.forward_moved(id).await;
                // Its volumes are the target's now (a VM removed there
                // instead leaves them here: removing a VM keeps its volumes).
                // (First: a restart in between concludes the move again.)
                let volumes: Vec<std::path::PathBuf> = entry
                    .lock()
                    .record
                    .disks
                    .iter()
                    .filter(|d| d.volume.is_some())
                    .map(|d| d.path.clone())
                    .collect();
                for path in volumes {
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "removing a volume that moved away")
                        }
                    }
                }
                self.release_moved(entry).await;
                book.finish(id, MigrationPhase::Completed, None, total);
                tracing::info!(vm = %name, migration = id, ms = total, "migration completed");
            }
            Outcome::RemovedThere(why) => {
                self.release_moved(entry).await;
                book.finish(id, MigrationPhase::Failed, Some(why), total);
                tracing::warn!(vm = %name, migration = id, "the VM was removed on the target; released here too");
            }
            Outcome::Stayed(phase, why) => {
                book.finish(id, phase, Some(why.clone()), total);
                tracing::warn!(vm = %name, migration = id, reason = %why, "migration ended; the VM runs here");
            }
        }
    }

    /// Every step up to the end, each failure turned into where the VM is.
    async fn drive_source(
        &self,
        entry: &Arc<VmEntry>,
        id: &str,
        req: &MigrateVmRequest,
        ip: std::net::IpAddr,
        peer: &Peer,
        started: Instant,
    ) -> Outcome {
        let book = &self.inner.migrations;
        let (record, qmp) = {
            let s = entry.lock();
            (s.record.clone(), s.runtime.qmp.clone())
        };
        let Some(qmp) = qmp else {
            self.back_to_running(entry, id);
            return Outcome::Stayed(
                MigrationPhase::Failed,
                "the VM's QEMU is not connected".into(),
            );
        };
        let exports = export_names(&record);
        if book.cancel_requested(id) {
            self.back_to_running(entry, id);
            return Outcome::Stayed(MigrationPhase::Cancelled, "cancelled on request".into());
        }
        // Until the target has taken the stream, any failure ends here: the
        // VM runs on, the exports and the target's half go.
        let prepared = async {
            let export_at = std::net::SocketAddr::new(ip, super::free_port(ip)?);
            let disks: Vec<(String, String)> = record
                .disks
                .iter()
                .map(|d| (format!("disk-{}", d.name), d.name.clone()))
                .collect();
            // A key for this migration alone: the stream and the exports
            // only talk to the target.
            let raw_key = req.tls.then(rand::random::<[u8; super::tunnel::KEY_BYTES]>);
            let key = raw_key.map(hex::encode);
            if let Some(key) = &key {
                let tls_dir = super::write_psk(&self.vm_dir(&record.name), key)?;
                live::add_tls(&qmp, &tls_dir).await?;
            }
            live::export_disks(&qmp, export_at, &disks, req.tls).await?;
            let vm = {
                let (record, manager) = (record.clone(), self.clone());
                tokio::task::spawn_blocking(move || manager.migrating_vm(&record, export_at))
                    .await
                    .map_err(|e| AgentError::io("describing the VM", std::io::Error::other(e)))??
            };
            // The agents carry an encrypted pre-copy (see `tunnel`) when
            // the target's certificate is pinned; a post-copy's stream,
            // which may have to reconnect, stays QEMU's.
            let tunnel = req.tls
                && req.on_no_convergence != ConvergencePolicy::PostCopy
                && req.target_fingerprint.is_some();
            let mut request = IncomingMigrationRequest {
                id: id.to_string(),
                source: format!(
                    "{}://{}",
                    self.inner.config.scheme(),
                    std::net::SocketAddr::new(ip, self.inner.config.listen.port())
                ),
                vm,
                disk_sync_bps: req.disk_sync_mibps.map(|m| m << 20),
                tls_psk: key,
                post_copy: req.on_no_convergence == ConvergencePolicy::PostCopy,
                stream_channels: super::stream_channels(req.on_no_convergence, req.tls && !tunnel),
                stream_tunnel: tunnel,
            };
            // A busy target (its migration slots taken) is asked again.
            let ready: IncomingMigrationReady = loop {
                match peer
                    .call(
                        reqwest::Method::POST,
                        "/v1/migrations/incoming",
                        Some(&request),
                    )
                    .await
                {
                    // A target from before the agents carried streams:
                    // QEMU encrypts it, over one connection.
                    Err(PeerError::Refused {
                        status: 400,
                        message,
                    }) if request.stream_tunnel && message.contains("stream_tunnel") => {
                        request.stream_tunnel = false;
                        request.stream_channels =
                            super::stream_channels(req.on_no_convergence, req.tls);
                    }
                    // A target from before streams had several connections.
                    Err(PeerError::Refused {
                        status: 400,
                        message,
                    }) if request.stream_channels > 1 && message.contains("stream_channels") => {
                        request.stream_channels = 1;
                    }
                    Err(PeerError::Refused {
                        status: 409,
                        message,
                    }) if message.starts_with("busy") && !book.cancel_requested(id) => {
                        book.update(id, false, |m| {
                            m.error = Some(format!("target {message}; waiting"))
                        });
                        tokio::time::sleep(PEER_RETRY).await;
                    }
                    other => break other?,
                }
            };
            let host: std::net::IpAddr = ready.host.parse().map_err(|e| {
                AgentError::Peer(format!(
                    "the target listens at a bad address {:?}: {e}",
                    ready.host
                ))
            })?;
            let target = std::net::SocketAddr::new(host, ready.port);
            let tunnel = match (request.stream_tunnel, raw_key, &req.target_fingerprint) {
                (true, Some(key), Some(fingerprint)) => {
                    let tls = flotilla_tls::pinned_client_config(fingerprint).map_err(|e| {
                        AgentError::InvalidArgument(format!("target_fingerprint: {e}"))
                    })?;
                    let local = super::stream_socket(&self.inner.config, &record.id);
                    let tunnel = super::tunnel::outgoing(&local, target, tls, key)
                        .await
                        .map_err(|e| AgentError::io("opening the stream's tunnel", e))?;
                    Some(tunnel)
                }
                _ => None,
            };
            Ok::<_, AgentError>((target, request.stream_channels.max(1), tunnel))
        }
        .await;
        let (target, channels, tunnel) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                return self
                    .stay(
                        entry,
                        id,
                        peer,
                        &qmp,
                        &exports,
                        MigrationPhase::Failed,
                        e.to_string(),
                    )
                    .await
            }
        };
        let ms = started.elapsed().as_millis() as u64;
        let tunnelled = tunnel.is_some();
        tracing::info!(migration = %id, ms, tls = req.tls, tunnelled, channels, "target prepared");
        if let std::net::IpAddr::V4(via) = target.ip() {
            book.set_forward_via(id, via);
        }
        // QEMU streams to the tunnel's socket, in the clear, or to the
        // target's QEMU (over its own TLS if asked).
        let (to, qemu_tls) = match tunnel.as_ref().and_then(|t| t.socket_file()) {
            Some(local) => (StreamAddr::Unix(local.to_path_buf()), false),
            None => (StreamAddr::Tcp(target), req.tls),
        };
        book.update(id, true, |m| m.phase = MigrationPhase::PreCopy);
        let limits = LiveLimits {
            max_downtime_ms: req.max_downtime_ms,
            max_bandwidth_bps: req.max_bandwidth_mibps.map(|m| m << 20),
            auto_converge: req.on_no_convergence == ConvergencePolicy::AutoConverge,
            post_copy: req.on_no_convergence == ConvergencePolicy::PostCopy,
            channels,
        };
        match self.precopy(&qmp, id, &to, limits, qemu_tls).await {
            Ok(None) => {
                let ms = started.elapsed().as_millis() as u64;
                tracing::info!(migration = %id, ms, "memory sent");
            }
            Ok(Some((phase, why))) => {
                return self.stay(entry, id, peer, &qmp, &exports, phase, why).await
            }
            // QMP trouble mid-stream: where the VM is must be found out.
            Err(e) => {
                return self
                    .settle(
                        entry,
                        id,
                        peer,
                        &qmp,
                        &exports,
                        format!("during the pre-copy: {e}"),
                    )
                    .await
            }
        }

        // Memory is over and the VM is paused here: hand it over.
        let handing = Instant::now();
        let switched = async {
            // In post-copy QEMU reports the state before it has paused the
            // VM and inactivated the disks; reactivation comes after that.
            for _ in 0..100 {
                if !qmp.query_status().await?.running {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let nodes: Vec<String> = record
                .disks
                .iter()
                .map(|d| format!("disk-{}", d.name))
                .collect();
            let paused_us = handing.elapsed().as_micros() as u64;
            live::reactivate_for_reads(&qmp, &nodes).await?;
            let reactivated_us = handing.elapsed().as_micros() as u64;
            // Paused, the overlays no longer grow: their own bytes can be
            // exported (a target with the same image then copies only
            // them). One that cannot be goes whole.
            for d in record.disks.iter().filter(|d| on_image_base(d)) {
                if let Err(e) = live::export_layer(&qmp, &d.path, &layer_export(&d.name)).await {
                    tracing::info!(migration = id, disk = %d.name, error = %e,
                        "the disk's overlay cannot be exported apart; it goes whole");
                }
            }
            let exported_us = handing.elapsed().as_micros() as u64;
            peer.call::<MigrationInfo>(
                reqwest::Method::POST,
                &format!("/v1/migrations/{id}/switch-over"),
                None::<&()>,
            )
            .await?;
            tracing::debug!(
                migration = id,
                paused_us,
                reactivated_us,
                exported_us,
                called_us = handing.elapsed().as_micros() as u64,
                "handed over"
            );
            Ok::<_, AgentError>(())
        }
        .await;
        if let Err(e) = switched {
            tracing::warn!(migration = id, error = %e, "switch-over not confirmed; asking the target where the VM is");
            return self
                .settle(entry, id, peer, &qmp, &exports, format!("switch-over: {e}"))
                .await;
        }
        // The target has the whole stream.
        drop(tunnel);
        tracing::info!(
            migration = id,
            ms = handing.elapsed().as_millis() as u64,
            "switched over"
        );
        book.update(id, true, |m| {
            m.phase = MigrationPhase::DiskSync;
            m.switch_over_ms = Some(started.elapsed().as_millis() as u64);
        });
        self.await_target_sync(id, peer).await
    }

    /// Undoes what a migration set up in the source's QEMU (exports, limits,
    /// TLS credentials and their key), for a VM that stays here.
    async fn unprepare(&self, entry: &VmEntry, qmp: &QmpClient, exports: &[String]) {
        live::unexport_disks(qmp, exports).await;
        let _ = live::set_limits(qmp, LiveLimits::default()).await;
        live::remove_tls(qmp).await;
        super::remove_psk(&self.vm_dir(&entry.lock().record.name));
    }

    /// The VM still runs here: it stays, and the target's half goes.
    #[allow(clippy::too_many_arguments)]
    async fn stay(
        &self,
        entry: &Arc<VmEntry>,
        id: &str,
        peer: &Peer,
        qmp: &QmpClient,
        exports: &[String],
        phase: MigrationPhase,
        why: String,
    ) -> Outcome {
        self.unprepare(entry, qmp, exports).await;
        // A stream that failed after QEMU paused the VM (its last round, or
        // a post-copy that began) leaves it paused: it runs on here.
        if !qmp.query_status().await.map(|s| s.running).unwrap_or(true) {
            if let Err(e) = qmp.cont().await {
                tracing::error!(migration = id, error = %e, "continuing the VM here");
            }
        }
        self.back_to_running(entry, id);
        // Asked until the target answers (a cut network comes back): its
        // half holds a QEMU, a name and capacity there.
        let (peer, id) = (peer.clone(), id.to_string());
        tokio::spawn(async move {
            for _ in 0..600 {
                match peer.remove_half(&id).await {
                    Ok(()) | Err(PeerError::Refused { .. }) => return,
                    Err(e) => {
                        tracing::debug!(migration = %id, error = %e, "removing the target's half")
                    }
                }
                tokio::time::sleep(PEER_RETRY).await;
            }
            tracing::warn!(migration = %id, "gave up removing the target's half");
        });
        Outcome::Stayed(phase, why)
    }

    /// Where is the VM, after a failure whose outcome is unknown? If QEMU
    /// here still runs it, here. If QEMU here has sent everything, only the
    /// target can say: once it confirms it removed its half unrun, the VM
    /// continues here; if it has run it, it is the target's. Until the
    /// target answers, the VM stays paused: never on both hosts.
    pub(super) async fn settle(
        &self,
        entry: &Arc<VmEntry>,
        id: &str,
        peer: &Peer,
        qmp: &QmpClient,
        exports: &[String],
        why: String,
    ) -> Outcome {
        let book = &self.inner.migrations;
        let post_copy = book.get(id).is_ok_and(|m| m.post_copy);
        loop {
            let running = qmp.query_status().await.map(|s| s.running);
            if post_copy && running.as_ref().is_ok_and(|r| *r) {
                // After a switch to post-copy the target may hold the VM's
                // newest state: never run here before it says it does not.
                if let Err(e) = qmp.stop().await {
                    tracing::error!(migration = id, error = %e, "pausing the VM here");
                }
            } else if let Ok(true) = running {
                let _ = live::cancel(qmp, Duration::from_secs(10)).await;
                if qmp.query_status().await.map(|s| s.running).unwrap_or(false) {
                    return self
                        .stay(entry, id, peer, qmp, exports, MigrationPhase::Failed, why)
                        .await;
                }
            }
            match peer.remove_half(id).await {
                Ok(()) | Err(PeerError::Refused { status: 404, .. }) => {
                    self.unprepare(entry, qmp, exports).await;
                    if let Err(e) = qmp.cont().await {
                        tracing::error!(migration = id, error = %e, "continuing the VM here");
                    }
                    self.back_to_running(entry, id);
                    // QEMU cannot cancel a post-copy: its stream stays paused
                    // until the QEMU is restarted.
                    let stuck = match live::progress(qmp).await {
                        Ok(p) if p.status.starts_with("postcopy") => {
                            "; its QEMU still holds the unfinished post-copy: stop and start \
                             the VM before it can be moved or suspended again"
                        }
                        _ => "",
                    };
                    // A QEMU that died here took the VM with it: say so.
                    let crashed = entry.lock().record.state == VmState::Crashed;
                    let here = match crashed {
                        true => "but its QEMU here exited: see the VM's last error",
                        false => "so it continues here",
                    };
                    return Outcome::Stayed(
                        MigrationPhase::Failed,
                        format!("{why}; the target never ran it, {here}{stuck}"),
                    );
                }
                Err(PeerError::Refused { status: 409, .. }) => {
                    book.update(id, true, |m| m.phase = MigrationPhase::DiskSync);
                    return self.await_target_sync(id, peer).await;
                }
                Err(e) => {
                    book.update(id, true, |m| {
                        m.error = Some(format!(
                            "{why}; {e}: the VM stays paused here until the target answers"
                        ))
                    });
                    tokio::time::sleep(PEER_RETRY).await;
                }
            }
        }
    }

    /// Runs QEMU's pre-copy to its end. `Ok(None)`: memory is over;
    /// `Ok(Some(..))`: cancelled or failed, the VM still runs here.
    async fn precopy(
        &self,
        qmp: &QmpClient,
        id: &str,
        to: &StreamAddr,
        limits: LiveLimits,
        tls: bool,
    ) -> AgentResult<Option<(MigrationPhase, String)>> {
        let book = &self.inner.migrations;
        let mut events = qmp.events();
        live::start_outgoing(qmp, to, limits, tls).await?;
        let mut last_saved = Instant::now();
        let mut watch = super::converge::Watch::new(
            limits.max_downtime_ms.unwrap_or(live::DEFAULT_DOWNTIME_MS),
            Instant::now(),
        );
        let mut post_copy_started = false;
        loop {
            let p = live::progress(qmp).await?;
            if !p.is_finished() && !post_copy_started {
                let stop = match watch.observe(&p, Instant::now()) {
                    super::converge::Verdict::Fine => None,
                    super::converge::Verdict::Stalled => Some(format!(
                        "the stream sent nothing for {} s: is the network to the target cut?",
                        super::converge::STALL_LIMIT.as_secs()
                    )),
                    super::converge::Verdict::WontConverge(why) => {
                        let throttled = p.cpu_throttle_percent;
                        book.update(id, true, |m| m.prediction = Some(why.clone()));
                        if limits.post_copy {
                            // The VM goes over now; its pages follow.
                            live::start_post_copy(qmp).await?;
                            post_copy_started = true;
                            book.update(id, true, |m| m.post_copy = true);
                            tracing::info!(migration = id, reason = %why, "switching to post-copy");
                            None
                        } else {
                            // Auto-converge gets every chance up to its
                            // strongest throttle.
                            match limits.auto_converge && throttled < 99 {
                                true => None,
                                false => Some(format!("predicted not to converge: {why}")),
                            }
                        }
                    }
                };
                if let Some(why) = stop {
                    live::cancel(qmp, Duration::from_secs(10)).await?;
                    if live::progress(qmp).await?.status == "completed" {
                        return Ok(None);
                    }
                    return Ok(Some((MigrationPhase::Failed, why)));
                }
            }
            // Completed, the guest waits for the switch-over: the numbers
            // are saved with its next step, not here.
            let persist = last_saved.elapsed() > Duration::from_secs(1)
                || (p.is_finished() && p.status != "completed");
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
                m.throttle_percent = (p.cpu_throttle_percent > 0).then_some(p.cpu_throttle_percent);
                if p.downtime_ms.is_some() {
                    m.downtime_ms = p.downtime_ms;
                }
            });
            match p.status.as_str() {
                // In post-copy (also paused or recovering) the device state
                // is on its way and the source's part is to serve pages:
                // the switch-over is due, and a cancel is no longer possible.
                "completed" => return Ok(None),
                s if s.starts_with("postcopy") => return Ok(None),
                "failed" | "cancelled" => {
                    let why = p
                        .error
                        .unwrap_or_else(|| format!("QEMU reports {}", p.status));
                    return Ok(Some((
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
                return Ok(Some((
                    MigrationPhase::Cancelled,
                    "cancelled on request".into(),
                )));
            }
            tokio::select! {
                _ = tokio::time::sleep(PROGRESS_POLL) => {}
                _ = live::next_status_change(&mut events) => {}
            }
        }
    }

    /// After the switch-over: waits until the target has synced the disks
    /// (serving them meanwhile). A target that cannot be asked is waited
    /// for: it may well run the VM.
    pub(super) async fn await_target_sync(&self, id: &str, peer: &Peer) -> Outcome {
        self.forward_moved(id).await;
        let book = &self.inner.migrations;
        let mut unreachable_since: Option<Instant> = None;
        let mut last_recovery: Option<Instant> = None;
        let mut post_copy = PostCopyWatch::default();
        loop {
            let asked = Instant::now();
            if last_recovery.is_none_or(|t| t.elapsed() > PEER_RETRY) {
                if let Some(done) = self.recover_post_copy(id, peer, &mut post_copy).await {
                    last_recovery = Some(Instant::now());
                    if let Err(e) = done {
                        tracing::warn!(migration = id, error = %e, "resuming the post-copy");
                        book.update(id, false, |m| {
                            m.error = Some(format!("post-copy paused: {e}; retrying"))
                        });
                    }
                }
            }
            // Asked again every half second at most while the sync goes
            // on (its progress shows here), answered as soon as it ends.
            match peer
                .migration_past(id, MigrationPhase::DiskSync, SYNC_POLL)
                .await
            {
                Ok(t) => {
                    unreachable_since = None;
                    book.update(id, false, |m| {
                        m.disk_synced_bytes = t.disk_synced_bytes;
                        m.disk_total_bytes = t.disk_total_bytes;
                        m.error = t.error.clone();
                    });
                    match t.phase {
                        MigrationPhase::Completed => return Outcome::Moved,
                        MigrationPhase::Failed | MigrationPhase::Cancelled => {
                            return Outcome::RemovedThere(format!(
                                "the VM was removed on the target during its disk sync ({})",
                                t.error.unwrap_or_default()
                            ))
                        }
                        _ => {}
                    }
                    // An answer that did not wait (the target still
                    // preparing, or not waiting at all) is not asked
                    // again at once.
                    if asked.elapsed() < SYNC_POLL / 5 {
                        tokio::time::sleep(SYNC_POLL / 5).await;
                    }
                }
                Err(e) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    book.update(id, false, |m| {
                        m.error = Some(format!(
                            "no answer from the target for {} s: {e}",
                            since.elapsed().as_secs()
                        ))
                    });
                    tokio::time::sleep(PEER_RETRY).await;
                }
            }
        }
    }

    /// A post-copy whose stream was cut pauses on both sides, the VM on the
    /// target waiting for pages only this host has: once the network is
    /// back, the target listens again and this QEMU resumes sending.
    /// `None` when there is nothing to recover.
    async fn recover_post_copy(
        &self,
        id: &str,
        peer: &Peer,
        watch: &mut PostCopyWatch,
    ) -> Option<AgentResult<()>> {
        let info = self.inner.migrations.get(id).ok()?;
        if !info.post_copy {
            return None;
        }
        let qmp = self.vms().get(&info.vm)?.lock().runtime.qmp.clone()?;
        let p = live::progress(&qmp).await.ok()?;
        if p.status == "postcopy-active" && watch.stuck(p.transferred_bytes, Instant::now()) {
            // A cut that lasts: TCP would wait minutes before it gives up.
            tracing::warn!(
                migration = id,
                "post-copy sent nothing for a while; pausing it to resume on a new connection"
            );
            watch.last = None;
            if let Err(e) = live::pause_post_copy(&qmp).await {
                return Some(Err(e.into()));
            }
            return Some(Ok(()));
        }
        if p.status != "postcopy-paused" {
            return None;
        }
        let resumed = async {
            let ready: IncomingMigrationReady = peer
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/migrations/{id}/recover"),
                    None::<&()>,
                )
                .await?;
            let host: std::net::IpAddr = ready.host.parse().map_err(|e| {
                AgentError::Peer(format!("the target listens at a bad address: {e}"))
            })?;
            live::resume_outgoing(&qmp, std::net::SocketAddr::new(host, ready.port)).await?;
            watch.last = None;
            tracing::info!(migration = id, "post-copy resumed after a cut");
            Ok(())
        };
        Some(resumed.await)
    }

    /// The VM runs on the target now: traffic for its addresses that still
    /// comes here is routed there (see [`crate::routes`]).
    async fn forward_moved(&self, id: &str) {
        let book = &self.inner.migrations;
        let (Ok(info), Some(via)) = (book.get(id), book.forward_via(id)) else {
            return;
        };
        let Some(entry) = self.vms().get(&info.vm).cloned() else {
            return;
        };
        let (addrs, group): (Vec<std::net::Ipv4Addr>, String) = {
            let s = entry.lock();
            (
                s.record.nics.iter().map(|n| n.ip).collect(),
                crate::isolation::group_of(&s.record.tags),
            )
        };
        let (forwards, window) = (
            self.inner.routes.clone(),
            self.inner.config.forward_moved_for,
        );
        let vm = info.vm.clone();
        let added = tokio::task::spawn_blocking(move || {
            for addr in addrs {
                if let Err(e) = forwards.add(addr, &vm, &group, via, window) {
                    tracing::warn!(%addr, %via, error = %e, "could not forward a moved VM's address");
                }
            }
        });
        let _ = added.await;
    }

    /// What the target needs to recreate `record`, with the disks exported
    /// at `nbd`.
    fn migrating_vm(
        &self,
        record: &VmRecord,
        nbd: std::net::SocketAddr,
    ) -> AgentResult<MigratingVm> {
        let disks = record
            .disks
            .iter()
            .map(|d| {
                Ok(MigratingDisk {
                    name: d.name.clone(),
                    format: d.format.clone(),
                    size_mib: d.size_mib,
                    size_bytes: crate::disks::virtual_size(&d.path)?,
                    read_only: d.read_only,
                    nbd_host: nbd.ip().to_string(),
                    nbd_port: nbd.port(),
                    nbd_export: d.name.clone(),
                    // Exported at the switch-over.
                    layer: match (&d.backing, on_image_base(d)) {
                        // Not hashable: copied whole.
                        (Some(base), true) => file_sha256(base).ok().map(|sum| MigratingLayer {
                            nbd_export: layer_export(&d.name),
                            base_sha256: sum,
                        }),
                        _ => None,
                    },
                    volume: d.volume.clone(),
                })
            })
            .collect::<AgentResult<Vec<_>>>()?;
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
            disks,
            kernel_sha256: file_sha256(&record.kernel)?,
            initrd_sha256: record.initrd.as_deref().map(file_sha256).transpose()?,
            accel: self.inner.accel.accel.to_string(),
            qemu_version: self.inner.qemu_version.clone(),
        })
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
    /// The record keeps its migration id to the end, so nothing can start
    /// this stale copy meanwhile (a start is refused while it is set).
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
        let began = Instant::now();
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
        tracing::debug!(vm = %name, ms = began.elapsed().as_millis() as u64, "released: QEMU gone");
        {
            let mut s = entry.lock();
            if s.record.state.has_process() {
                self.settle_exited(entry, &mut s, VmState::Stopped, None);
            }
        }
        if let Err(e) = self.delete(&name, true).await {
            tracing::error!(vm = %name, error = %e, "removing the migrated VM's leftovers");
        }
        tracing::debug!(vm = %name, ms = began.elapsed().as_millis() as u64, "released: files gone");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_post_copy_is_stuck_only_after_sending_nothing_for_the_limit() {
        let t0 = Instant::now();
        let mut w = PostCopyWatch::default();
        assert!(!w.stuck(100, t0));
        assert!(!w.stuck(100, t0 + Duration::from_secs(5)));
        // Progress restarts the clock.
        assert!(!w.stuck(200, t0 + Duration::from_secs(9)));
        assert!(!w.stuck(200, t0 + Duration::from_secs(18)));
        assert!(w.stuck(200, t0 + Duration::from_secs(19)));
    }
}

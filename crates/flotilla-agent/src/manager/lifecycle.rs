//! Starting and stopping VMs, and watching their QEMU process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::{Resources, VmInfo, VmState};
use flotilla_guest_protocol::client::GuestClient;
use flotilla_qemu::{Accel, DriveConfig, NicConfig, QemuConfig, QemuProcess, QmpClient};

use super::{VmEntry, VmManager, VmShared};
use crate::error::{AgentError, AgentResult};
use crate::network;
use crate::record::{now_rfc3339, VmRecord};
use crate::runtime::Readiness;

pub const CONSOLE_LOG: &str = "console.log";
pub const QEMU_LOG: &str = "qemu.log";
pub const PIDFILE: &str = "qemu.pid";
/// After a graceful stop times out, QEMU gets this long to quit before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// A filter update running on a blocking thread ([`VmManager::spawn_filter`]).
pub(crate) type FilterTask = tokio::task::JoinHandle<AgentResult<()>>;

/// Waits for a filter update: its error, or the thread's.
pub(crate) async fn filter_applied(task: FilterTask) -> AgentResult<()> {
    task.await
        .map_err(|e| AgentError::io("applying the network groups", std::io::Error::other(e)))?
}

impl VmManager {
    pub async fn start(&self, name: &str, wait_ready: bool) -> AgentResult<VmInfo> {
        let entry = self.entry(name)?;
        self.start_entry(&entry, wait_ready).await?;
        Ok(self.info_of(&entry))
    }

    pub(crate) async fn start_entry(
        &self,
        entry: &Arc<VmEntry>,
        wait_ready: bool,
    ) -> AgentResult<()> {
        let started = Instant::now();
        let op = entry.op_lock.lock().await;
        let admission = self.inner.admission.lock().await;
        let others = self.allocated_excluding(entry);
        let admitted = self.admit_start(entry, others);
        drop(admission);
        let (record, generation) = match admitted? {
            Some(x) => x,
            None => {
                // Already running. If its guest agent failed to answer
                // earlier, a new start is the user asking to try again.
                if matches!(entry.readiness.get(), Readiness::Failed(_)) {
                    let generation = entry.lock().runtime.generation;
                    entry.readiness.set(Readiness::Waiting);
                    self.spawn_readiness(entry.clone(), generation, None);
                }
                drop(op);
                return self.wait_ready_if(entry, wait_ready).await;
            }
        };

        match self.launch(&record).await {
            Ok((process, qmp)) => {
                self.enter_running(entry, process, qmp, generation, |r| {
                    r.started_at = Some(now_rfc3339());
                })?;
                self.spawn_readiness(entry.clone(), generation, Some(started));
                // A migrated-in VM started again goes on copying its disks.
                self.resume_disk_sync(entry);
            }
            Err(e) => {
                self.launch_failed(entry, VmState::Stopped, &e)?;
                return Err(e);
            }
        }
        drop(op);
        self.wait_ready_if(entry, wait_ready).await
    }

    /// Checks capacity and moves the VM to `starting`; `None` if it already runs.
    /// The caller holds the admission lock, so the check and the reservation are one step.
    fn admit_start(
        &self,
        entry: &VmEntry,
        others: Resources,
    ) -> AgentResult<Option<(VmRecord, u64)>> {
        let mut s = entry.lock();
        if s.record.state == VmState::Running {
            return Ok(None);
        }
        if self.is_source_copy(&s.record) {
            // The source's copy of a VM that moved (or is moving): it
            // must never run next to the one on the target.
            let name = &s.record.name;
            return Err(AgentError::conflict(
                format!("VM {name:?} was migrated to another host; this copy is being released"),
                Some("see `flotilla migration ls`".into()),
            ));
        }
        if s.record.state == VmState::Suspended {
            let name = &s.record.name;
            return Err(AgentError::conflict(
                format!("VM {name:?} is suspended"),
                Some(format!("resume it with `flotilla vm resume {name}`")),
            ));
        }
        s.record.guest_boot_ms = None;
        s.record.ready_ms = None;
        s.record.accel = Some(self.inner.accel.accel);
        self.reserve_and_enter(entry, &mut s, others, VmState::Starting)
            .map(Some)
    }

    /// QEMU is up for a new run: it is watched (first, so it is never left
    /// running unobserved, even if saving the record fails), recorded, and
    /// the VM is running. `update` adds what else the run changed.
    pub(crate) fn enter_running(
        &self,
        entry: &Arc<VmEntry>,
        process: Arc<QemuProcess>,
        qmp: QmpClient,
        generation: u64,
        update: impl FnOnce(&mut VmRecord),
    ) -> AgentResult<()> {
        self.spawn_monitor(entry.clone(), process.clone(), generation);
        let mut s = entry.lock();
        s.record.process = Some(process.identity);
        update(&mut s.record);
        self.transition(&mut s, VmState::Running)?;
        s.runtime.process = Some(process);
        s.runtime.qmp = Some(qmp);
        self.save(&s)
    }

    /// A run that could not be brought up: its taps go, the VM returns to
    /// `back_to`, and the error is kept for `inspect`.
    pub(crate) fn launch_failed(
        &self,
        entry: &VmEntry,
        back_to: VmState,
        error: &AgentError,
    ) -> AgentResult<()> {
        let mut s = entry.lock();
        self.cleanup_taps(&s.record);
        self.transition(&mut s, back_to)?;
        s.record.process = None;
        s.record.last_error = Some(error.to_string());
        entry.readiness.set(Readiness::Gone);
        self.save(&s)
    }

    /// Checks that the VM fits next to `others`, moves it to `next` (a state
    /// that holds resources) for a new run, and saves the record. The caller
    /// holds the admission lock, so the check and the reservation are one step.
    pub(crate) fn reserve_and_enter(
        &self,
        entry: &VmEntry,
        s: &mut VmShared,
        others: Resources,
        next: VmState,
    ) -> AgentResult<(VmRecord, u64)> {
        let needed = Resources {
            vcpus: s.record.vcpus,
            memory_mib: s.record.memory_mib,
        };
        crate::capacity::check_fits(self.inner.config.capacity, others, needed)?;
        self.transition(s, next)?;
        s.record.last_error = None;
        s.runtime.stopping = false;
        s.runtime.generation += 1;
        entry.readiness.set(Readiness::Waiting);
        self.save(s)?;
        Ok((s.record.clone(), s.runtime.generation))
    }

    /// Points a failed wait for the guest at its console log.
    pub(crate) fn with_console_tail(&self, name: &str, e: AgentError) -> AgentError {
        match e {
            AgentError::Timeout(msg) => {
                AgentError::Timeout(format!("{msg}; its console: `flotilla vm logs {name}`"))
            }
            AgentError::Guest {
                message,
                caller_mistake,
            } => AgentError::Guest {
                message: format!("{message}; its console: `flotilla vm logs {name}`"),
                caller_mistake,
            },
            other => other,
        }
    }

    async fn wait_ready_if(&self, entry: &VmEntry, wait: bool) -> AgentResult<()> {
        if wait {
            let name = entry.lock().record.name.clone();
            self.wait_ready(entry, self.inner.config.ready_timeout)
                .await
                .map_err(|e| self.with_console_tail(&name, e))?;
        }
        Ok(())
    }

    /// Waits until the guest agent answers, failing at once if the VM stops.
    pub(crate) async fn wait_ready(&self, entry: &VmEntry, timeout: Duration) -> AgentResult<()> {
        let name = entry.lock().record.name.clone();
        let mut rx = entry.readiness.subscribe();
        let wait = async {
            loop {
                let r = rx.borrow_and_update().clone();
                match r {
                    Readiness::Ready => return Ok(()),
                    Readiness::Failed(why) => {
                        return Err(AgentError::Guest {
                            message: format!(
                                "the guest agent of VM {name:?} is not available: {why}"
                            ),
                            caller_mistake: false,
                        })
                    }
                    Readiness::Gone => {
                        let state = entry.lock().record.state;
                        return Err(AgentError::conflict(
                            format!("VM {name:?} is {state}"),
                            Some(format!("start it with `flotilla vm start {name}`")),
                        ));
                    }
                    Readiness::Waiting => {}
                }
                if rx.changed().await.is_err() {
                    return Err(AgentError::conflict(format!("VM {name:?} went away"), None));
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            AgentError::Timeout(format!(
                "the guest agent of VM {name:?} did not answer within {} s",
                timeout.as_secs()
            ))
        })?
    }

    /// Taps, QEMU and the QMP connection for one run of a VM.
    async fn launch(&self, record: &VmRecord) -> AgentResult<(Arc<QemuProcess>, QmpClient)> {
        let config = self.qemu_config(record);
        self.launch_with(record, config).await
    }

    /// [`launch`](Self::launch) with a given QEMU configuration (e.g. one
    /// that waits for incoming state).
    pub(crate) async fn launch_with(
        &self,
        record: &VmRecord,
        qemu_config: QemuConfig,
    ) -> AgentResult<(Arc<QemuProcess>, QmpClient)> {
        let cfg = &self.inner.config;
        let began = Instant::now();
        self.ensure_taps(record)?;
        let taps_ms = began.elapsed().as_millis() as u64;
        crate::fsutil::private_dir(&cfg.sockets_dir())
            .map_err(|e| AgentError::io("creating the sockets directory", e))?;
        qemu_config.validate()?;
        // Its address joins its network group before the guest runs; if
        // the filter cannot be applied, the VM does not start. A QEMU that
        // starts paused (state to load, or -S) runs nothing before it is
        // continued, so the filter is applied while it starts.
        let filtered = self.spawn_filter();
        let join_filter = |handle: FilterTask| async {
            filter_applied(handle).await?;
            Ok::<u64, AgentError>(began.elapsed().as_millis() as u64)
        };
        let paused = qemu_config.start_paused || qemu_config.incoming.is_some();
        let (filtered, mut filter_ms) = match paused {
            true => (Some(filtered), 0),
            false => (None, join_filter(filtered).await?),
        };
        let dir = self.vm_dir(&record.name);
        self.remove_sockets(&record.id);
        let started = QemuProcess::start(&cfg.qemu_binary, &qemu_config, &dir.join(QEMU_LOG)).await;
        let qemu_ms = began.elapsed().as_millis() as u64;
        let (process, qmp) = match (started, filtered) {
            (Ok((process, qmp)), None) => (Arc::new(process), qmp),
            (Ok((process, qmp)), Some(filter)) => match join_filter(filter).await {
                Ok(ms) => {
                    filter_ms = ms;
                    (Arc::new(process), qmp)
                }
                Err(e) => {
                    let _ = process.kill().await;
                    return Err(e);
                }
            },
            (Err(e), filter) => {
                if let Some(filter) = filter {
                    let _ = join_filter(filter).await;
                }
                return Err(e.into());
            }
        };
        tracing::debug!(vm = %record.name, taps_ms, filter_ms, qemu_ms, paused, "launched");
        Ok((process, qmp))
    }

    /// The VM's taps, on the bridge and up (made if missing).
    pub(crate) fn ensure_taps(&self, record: &VmRecord) -> AgentResult<()> {
        for nic in &record.nics {
            network::ensure_tap(&nic.tap, &self.inner.config.bridge)?;
        }
        Ok(())
    }

    /// Brings the network groups' filter up to date off the async threads;
    /// wait for it with [`filter_applied`].
    pub(crate) fn spawn_filter(&self) -> FilterTask {
        let manager = self.clone();
        tokio::task::spawn_blocking(move || manager.sync_isolation().map_err(AgentError::from))
    }

    pub(crate) fn qemu_config(&self, record: &VmRecord) -> QemuConfig {
        let cfg = &self.inner.config;
        let dir = self.vm_dir(&record.name);
        let mut cmdline = vec![
            "console=ttyS0".to_string(),
            "quiet".into(),
            "panic=-1".into(),
            format!("flotilla.hostname={}", record.name),
        ];
        if let Some(id) = &record.machine_id {
            cmdline.push(format!("flotilla.machine_id={id}"));
        }
        for (i, nic) in record.nics.iter().enumerate() {
            if i == 0 {
                cmdline.push(format!("flotilla.ip={}/{}", nic.ip, nic.prefix_len));
                cmdline.push(format!("flotilla.gw={}", nic.gateway));
            } else {
                cmdline.push(format!("flotilla.ip{i}={}/{}", nic.ip, nic.prefix_len));
            }
        }
        if self.inner.accel.accel == Accel::Tcg && record.vcpus == 1 {
            // Under TCG the local APIC timer is calibrated against the PIT
            // for ~0.25 s of boot; one vCPU runs as well on the PIT alone.
            // (KVM guests have the TSC deadline timer and skip calibration.)
            cmdline.push("nolapic_timer".into());
        }
        if record.disks.first().is_some_and(|d| d.name == "root") {
            cmdline.push("flotilla.root=/dev/vda".into());
        }
        if !record.cmdline_extra.is_empty() {
            cmdline.push(record.cmdline_extra.clone());
        }
        QemuConfig {
            name: record.name.clone(),
            accel: self.inner.accel.accel,
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            kernel: record.kernel.clone(),
            initrd: record.initrd.clone(),
            cmdline: cmdline.join(" "),
            drives: record
                .disks
                .iter()
                .map(|d| DriveConfig {
                    id: format!("disk-{}", d.name),
                    path: d.path.clone(),
                    format: d.format.clone(),
                    read_only: d.read_only,
                    nbd_backing: d.sync_from.clone(),
                })
                .collect(),
            nics: record
                .nics
                .iter()
                .enumerate()
                .map(|(i, n)| NicConfig {
                    id: format!("net{i}"),
                    tap: n.tap.clone(),
                    mac: n.mac.clone(),
                })
                .collect(),
            qmp_socket: cfg.sockets_dir().join(format!("{}.qmp", record.id)),
            agent_socket: Some(self.agent_socket(record)),
            serial_log: dir.join(CONSOLE_LOG),
            pidfile: dir.join(PIDFILE),
            incoming: None,
            start_paused: false,
            mapped_ram: false,
            // A migrated-in VM still reading from its source does so over
            // TLS with the migration's key.
            tls_psk_dir: record
                .disks
                .iter()
                .any(|d| d.sync_from.as_ref().is_some_and(|s| s.tls))
                .then(|| dir.join(super::migrate::TLS_DIR)),
            memory_file: None,
            huge_pages: cfg.guest_huge_pages.enabled(self.inner.accel.accel, false),
        }
    }

    pub(crate) fn agent_socket(&self, record: &VmRecord) -> std::path::PathBuf {
        self.inner
            .config
            .sockets_dir()
            .join(format!("{}.agent", record.id))
    }

    /// Connects to the guest agent in the background and marks the VM ready.
    pub(crate) fn spawn_readiness(
        &self,
        entry: Arc<VmEntry>,
        generation: u64,
        since: Option<Instant>,
    ) {
        let manager = self.clone();
        let (socket, timeout) = {
            let s = entry.lock();
            (
                self.agent_socket(&s.record),
                self.inner.config.ready_timeout,
            )
        };
        tokio::spawn(async move {
            let result = GuestClient::wait_ready(&socket, timeout).await;
            let mut s = entry.lock();
            if s.runtime.generation != generation || !s.record.state.has_process() {
                return;
            }
            match result {
                Ok((client, hello)) => {
                    s.runtime.guest = Some(Arc::new(client));
                    s.record.guest_boot_ms = Some(hello.boot_ms);
                    if let Some(t) = since {
                        s.record.ready_ms = Some(t.elapsed().as_millis() as u64);
                    }
                    if let Err(e) = manager.save(&s) {
                        tracing::error!(vm = %s.record.name, error = %e, "saving the record failed");
                    }
                    tracing::info!(vm = %s.record.name, boot_ms = hello.boot_ms, ready_ms = ?s.record.ready_ms, "guest agent ready");
                    entry.readiness.set(Readiness::Ready);
                }
                Err(e) => {
                    tracing::warn!(vm = %s.record.name, error = %e, "guest agent not ready");
                    entry.readiness.set(Readiness::Failed(e.to_string()));
                }
            }
        });
    }

    /// Waits for QEMU to exit; an exit nobody asked for marks the VM crashed.
    pub(crate) fn spawn_monitor(
        &self,
        entry: Arc<VmEntry>,
        process: Arc<QemuProcess>,
        generation: u64,
    ) {
        let manager = self.clone();
        tokio::spawn(async move {
            let exit = process.wait_exit().await;
            let mut s = entry.lock();
            // A stop (or a newer run) owns this exit.
            if s.runtime.generation != generation
                || s.runtime.stopping
                || !s.record.state.has_process()
            {
                return;
            }
            if process.is_child() && exit.code == Some(0) {
                // QEMU runs with -no-reboot: a clean exit is the guest
                // shutting down or rebooting itself.
                tracing::info!(vm = %s.record.name, "the guest shut down");
                manager.settle_exited(
                    &entry,
                    &mut s,
                    VmState::Stopped,
                    Some("the guest shut itself down".into()),
                );
                return;
            }
            tracing::warn!(vm = %s.record.name, exit = %exit, "QEMU exited unexpectedly");
            manager.settle_exited(
                &entry,
                &mut s,
                VmState::Crashed,
                Some(format!("QEMU exited unexpectedly ({exit})")),
            );
        });
    }

    /// Records that QEMU is gone: taps removed, runtime dropped, new state saved.
    pub(crate) fn settle_exited(
        &self,
        entry: &VmEntry,
        s: &mut VmShared,
        next: VmState,
        error: Option<String>,
    ) {
        self.cleanup_taps(&s.record);
        if let Err(e) = self.transition(s, next) {
            tracing::error!(vm = %s.record.name, error = %e, "unexpected state");
            s.record.state = next;
        }
        s.record.process = None;
        if error.is_some() {
            s.record.last_error = error;
        }
        s.runtime.process = None;
        s.runtime.qmp = None;
        s.runtime.guest = None;
        entry.readiness.set(Readiness::Gone);
        if let Err(e) = self.save(s) {
            tracing::error!(vm = %s.record.name, error = %e, "saving the record failed");
        }
        self.remove_sockets(&s.record.id);
    }

    pub(crate) fn cleanup_taps(&self, record: &VmRecord) {
        for nic in &record.nics {
            if let Err(e) = network::delete_tap(&nic.tap) {
                tracing::warn!(vm = %record.name, tap = %nic.tap, error = %e, "could not remove tap");
            }
        }
    }

    /// Stops a VM: the guest shuts down within `timeout`, else QEMU is told
    /// to quit, else killed. `force` kills at once. Stopping a stopped VM is a no-op.
    pub async fn stop(
        &self,
        name: &str,
        force: bool,
        timeout: Option<Duration>,
    ) -> AgentResult<VmInfo> {
        let entry = self.entry(name)?;
        let _op = entry.op_lock.lock().await;
        let (process, qmp, guest) = {
            let mut s = entry.lock();
            match s.record.state {
                VmState::Stopped => return Ok(s.record.to_info(None, false)),
                VmState::Suspended => {
                    return Err(AgentError::conflict(
                        format!("VM {name:?} is suspended"),
                        Some(format!(
                            "resume it (`flotilla vm resume {name}`) or remove it (`flotilla vm rm {name}`)"
                        )),
                    ))
                }
                VmState::Crashed => {
                    self.settle_exited(&entry, &mut s, VmState::Stopped, None);
                    return Ok(s.record.to_info(None, false));
                }
                // A stop that was interrupted (its caller cancelled, or an
                // error): we hold the op lock, so nobody else is stopping it.
                VmState::Stopping => {}
                _ => self.transition(&mut s, VmState::Stopping)?,
            }
            s.runtime.stopping = true;
            self.save(&s)?;
            (
                s.runtime.process.clone(),
                s.runtime.qmp.clone(),
                s.runtime.guest.clone(),
            )
        };
        let timeout = timeout.unwrap_or(self.inner.config.stop_timeout);
        if let Some(process) = &process {
            let mut exited = false;
            if !force {
                if let Some(guest) = &guest {
                    match guest.shutdown(true, Duration::from_secs(2)).await {
                        Ok(_) => {
                            exited = tokio::time::timeout(timeout, process.wait_exit())
                                .await
                                .is_ok();
                        }
                        Err(e) => {
                            tracing::info!(vm = name, error = %e, "guest shutdown request failed")
                        }
                    }
                }
                if !exited {
                    if let Some(qmp) = &qmp {
                        let _ = qmp.quit().await;
                        exited = tokio::time::timeout(QUIT_GRACE, process.wait_exit())
                            .await
                            .is_ok();
                    }
                }
            }
            if !exited {
                process.kill().await?;
            }
        }
        let mut s = entry.lock();
        self.settle_exited(&entry, &mut s, VmState::Stopped, None);
        tracing::info!(vm = name, "stopped");
        Ok(s.record.to_info(None, false))
    }
}

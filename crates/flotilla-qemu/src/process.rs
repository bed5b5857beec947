//! Starting, adopting, watching and killing QEMU processes.
//!
//! A QEMU must outlive the agent that started it (agent crash or upgrade), so
//! it runs in its own session with stdin on /dev/null and its output in a log
//! file, never a pipe. While the agent lives, its child is reaped by a task;
//! a restarted agent re-attaches with [`QemuProcess::adopt`] and watches the
//! process through a pidfd.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::config::QemuConfig;
use crate::error::{QemuError, QmpError};
use crate::identity::ProcessIdentity;
use crate::qmp::QmpClient;

/// How long [`QemuProcess::spawn`] waits for QEMU to answer on QMP.
/// Generous: on a loaded host (many VMs booting at once under TCG) QEMU can
/// take many seconds to open its monitor.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a starting QEMU is looked at (its QMP socket's existence, then
/// a connect): often, since every VM start, resume and migration waits on
/// it, and a look costs one syscall.
const READY_POLL: Duration = Duration::from_millis(2);

/// How much of the stderr log goes into startup errors.
const STDERR_TAIL_BYTES: u64 = 4096;

/// How a QEMU process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, if it exited normally and we could see it.
    pub code: Option<i32>,
    /// Terminating signal, if killed and we could see it.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// Exit of a process that was not our child: the status is not observable.
    pub fn unknown() -> Self {
        ExitInfo {
            code: None,
            signal: None,
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl From<std::process::ExitStatus> for ExitInfo {
    fn from(status: std::process::ExitStatus) -> Self {
        ExitInfo {
            code: status.code(),
            signal: status.signal(),
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(name) => write!(f, "killed by {name}"),
                Err(_) => write!(f, "killed by signal {sig}"),
            },
            (None, None) => f.write_str("exit status unknown"),
        }
    }
}

/// A running (or finished) QEMU, either our child or adopted.
#[derive(Clone)]
pub struct QemuProcess {
    pub identity: ProcessIdentity,
    inner: Arc<Inner>,
}

struct Inner {
    exit: watch::Receiver<Option<ExitInfo>>,
    is_child: bool,
    stderr_log: Option<PathBuf>,
    /// The pidfd watcher of an adopted process; a child's reaper is never
    /// aborted, so it reaps even after every handle is gone.
    watcher: Option<AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
    }
}

impl fmt::Debug for QemuProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuProcess")
            .field("identity", &self.identity)
            .field("is_child", &self.inner.is_child)
            .field("exit", &*self.inner.exit.borrow())
            .finish()
    }
}

impl QemuProcess {
    /// Validates `config`, starts QEMU and returns once it answers on QMP.
    /// Stale sockets and pidfile from an earlier run are removed first, so the
    /// caller must be sure no QEMU of this VM is still running.
    pub async fn spawn(
        qemu_binary: &Path,
        config: &QemuConfig,
        stderr_log: &Path,
    ) -> Result<QemuProcess, QemuError> {
        Ok(Self::start(qemu_binary, config, stderr_log).await?.0)
    }

    /// [`spawn`](Self::spawn), keeping the QMP connection that proved QEMU
    /// ready: a caller that drives QEMU saves connecting again (QEMU's
    /// monitor takes one client at a time).
    pub async fn start(
        qemu_binary: &Path,
        config: &QemuConfig,
        stderr_log: &Path,
    ) -> Result<(QemuProcess, QmpClient), QemuError> {
        config.validate()?;
        remove_stale(&config.qmp_socket)?;
        if let Some(agent) = &config.agent_socket {
            remove_stale(agent)?;
        }
        remove_stale(&config.pidfile)?;
        let args = config.to_args();
        Self::launch(
            qemu_binary,
            &args,
            &config.qmp_socket,
            stderr_log,
            DEFAULT_STARTUP_TIMEOUT,
            config.huge_pages,
        )
        .await
    }

    /// Starts QEMU with raw arguments that must create a QMP socket at
    /// `qmp_socket`. Returns once QEMU answers a QMP command, which proves
    /// it finished initialising (it creates the socket before loading the
    /// kernel). On failure QEMU is killed and the error carries its stderr.
    pub async fn spawn_with_args(
        qemu_binary: &Path,
        args: &[String],
        qmp_socket: &Path,
        stderr_log: &Path,
        startup_timeout: Duration,
    ) -> Result<QemuProcess, QemuError> {
        let started =
            Self::start_with_args(qemu_binary, args, qmp_socket, stderr_log, startup_timeout);
        Ok(started.await?.0)
    }

    /// [`spawn_with_args`](Self::spawn_with_args), keeping the QMP
    /// connection (see [`start`](Self::start)). Huge pages as QEMU and the
    /// host decide.
    pub async fn start_with_args(
        qemu_binary: &Path,
        args: &[String],
        qmp_socket: &Path,
        stderr_log: &Path,
        startup_timeout: Duration,
    ) -> Result<(QemuProcess, QmpClient), QemuError> {
        Self::launch(
            qemu_binary,
            args,
            qmp_socket,
            stderr_log,
            startup_timeout,
            true,
        )
        .await
    }

    /// Starts QEMU (with transparent huge pages disabled for the process
    /// unless `huge_pages`) and waits until it answers on QMP.
    async fn launch(
        qemu_binary: &Path,
        args: &[String],
        qmp_socket: &Path,
        stderr_log: &Path,
        startup_timeout: Duration,
        huge_pages: bool,
    ) -> Result<(QemuProcess, QmpClient), QemuError> {
        let (log, log_start) = open_log(qemu_binary, stderr_log)?;
        let log_err = log
            .try_clone()
            .map_err(|e| QemuError::io(format!("duplicating {}", stderr_log.display()), e))?;

        let mut cmd = Command::new(qemu_binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(false);
        // SAFETY: the closure runs between fork and exec and only makes
        // system calls (setsid(2), prctl(2)), which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // Own session: no terminal Ctrl-C, survives the agent's group.
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                // Kept across exec: QEMU's request for huge pages is then
                // ignored.
                if !huge_pages && libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| QemuError::Spawn {
            binary: qemu_binary.to_path_buf(),
            source,
        })?;
        let process = Self::from_child(child, stderr_log)?;
        tracing::info!(pid = process.identity.pid, binary = %qemu_binary.display(), "started QEMU");

        match process
            .wait_ready(qmp_socket, startup_timeout, log_start)
            .await
        {
            Ok(qmp) => Ok((process, qmp)),
            Err(err) => {
                tracing::warn!(pid = process.identity.pid, error = %err, "QEMU failed to start");
                if let Err(kill_err) = process.kill().await {
                    tracing::warn!(pid = process.identity.pid, error = %kill_err, "cannot kill failed QEMU");
                }
                Err(err)
            }
        }
    }

    /// Attaches to a QEMU left running by an earlier agent process. Needs a
    /// Tokio runtime (the exit watcher is a task).
    pub fn adopt(identity: ProcessIdentity) -> Result<QemuProcess, QemuError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| QemuError::NoRuntime {
            what: "QemuProcess::adopt",
        })?;
        let pidfd = identity.pidfd()?;
        let (tx, rx) = watch::channel(None);
        let watcher = match pidfd {
            Some(fd) => {
                let _guard = runtime.enter();
                // SAFETY: the AsyncFd owns the OwnedFd, which stays open and
                // unchanged until the AsyncFd is dropped.
                let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                    .map_err(|e| {
                        QemuError::io(format!("watching pidfd of {}", identity.pid), e.into())
                    })?;
                runtime.spawn(async move {
                    // A pidfd becomes readable when the process exits.
                    if let Err(err) = fd.readable().await {
                        tracing::warn!(error = %err, "pidfd wait failed");
                    }
                    let _ = tx.send(Some(ExitInfo::unknown()));
                })
            }
            None => runtime.spawn(async move {
                while identity.is_alive() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let _ = tx.send(Some(ExitInfo::unknown()));
            }),
        };
        tracing::info!(pid = identity.pid, "adopted QEMU");
        Ok(QemuProcess {
            identity,
            inner: Arc::new(Inner {
                exit: rx,
                is_child: false,
                stderr_log: None,
                watcher: Some(watcher.abort_handle()),
            }),
        })
    }

    fn from_child(mut child: Child, stderr_log: &Path) -> Result<QemuProcess, QemuError> {
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| QemuError::io("QEMU pid", io::Error::other("child has no pid")))?;
        // Not yet reaped, so /proc/PID/stat exists even if QEMU already died.
        let identity = match ProcessIdentity::of(pid) {
            Ok(identity) => identity,
            Err(err) => {
                // Without an identity nobody could stop it later: stop it now.
                let _ = child.start_kill();
                return Err(err);
            }
        };
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let info = match child.wait().await {
                Ok(status) => ExitInfo::from(status),
                Err(err) => {
                    tracing::warn!(pid, error = %err, "waiting for QEMU failed");
                    ExitInfo::unknown()
                }
            };
            tracing::info!(pid, exit = %info, "QEMU exited");
            let _ = tx.send(Some(info));
        });
        Ok(QemuProcess {
            identity,
            inner: Arc::new(Inner {
                exit: rx,
                is_child: true,
                stderr_log: Some(stderr_log.to_path_buf()),
                watcher: None,
            }),
        })
    }

    pub fn pid(&self) -> i32 {
        self.identity.pid
    }

    /// True if this agent process started QEMU (exit status is observable).
    pub fn is_child(&self) -> bool {
        self.inner.is_child
    }

    /// The stderr log given to `spawn`, for processes we started.
    pub fn stderr_log(&self) -> Option<&Path> {
        self.inner.stderr_log.as_deref()
    }

    /// The exit, if it has been observed.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.inner.exit.borrow()
    }

    /// Resolves when the process is gone (a child is reaped by then).
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.inner.exit.clone();
        let info = match rx.wait_for(Option::is_some).await {
            Ok(info) => info.unwrap_or_else(ExitInfo::unknown),
            // The watcher vanished (runtime shutting down): nothing more to learn.
            Err(_) => ExitInfo::unknown(),
        };
        info
    }

    pub fn has_exited(&self) -> bool {
        self.exit_info().is_some() || (!self.inner.is_child && !self.identity.is_alive())
    }

    /// SIGKILL, then wait until the process is gone.
    pub async fn kill(&self) -> Result<(), QemuError> {
        if !self.has_exited() {
            match self.identity.signal(Signal::SIGKILL) {
                Ok(()) => tracing::info!(pid = self.pid(), "sent SIGKILL to QEMU"),
                // Already gone (or the pid now belongs to someone else).
                Err(QemuError::ProcessGone { .. } | QemuError::IdentityMismatch { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        self.wait_exit().await;
        Ok(())
    }

    async fn wait_ready(
        &self,
        qmp_socket: &Path,
        timeout: Duration,
        log_start: u64,
    ) -> Result<QmpClient, QemuError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let log = self.inner.stderr_log.clone().unwrap_or_default();
        let mut exit_rx = self.inner.exit.clone();
        loop {
            if let Some(exit) = self.exit_info() {
                return Err(early_exit(exit, &log, log_start));
            }
            if qmp_socket.exists() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(QemuError::StartupTimeout {
                    waited: timeout,
                    detail: format!("QMP socket {} never appeared", qmp_socket.display()),
                    stderr_tail: log_tail(&log, log_start),
                });
            }
            tokio::select! {
                _ = exit_rx.changed() => {}
                _ = tokio::time::sleep(READY_POLL) => {}
            }
        }

        let remaining = deadline.saturating_duration_since(Instant::now());
        let handshake = async {
            // QEMU binds the socket before it listens: a connect in between
            // is refused. Retry that (a loaded host widens the window), but
            // stop at once if QEMU exits.
            let client = loop {
                match QmpClient::connect(qmp_socket, remaining).await {
                    Ok(c) => break c,
                    Err(QmpError::Io(e))
                        if e.kind() == io::ErrorKind::ConnectionRefused
                            && self.exit_info().is_none()
                            && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(READY_POLL).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let status = client.query_status().await?;
            Ok((client, status))
        };
        let failure = match tokio::time::timeout(remaining, handshake).await {
            Ok(Ok((client, status))) => {
                tracing::debug!(pid = self.pid(), status = %status.status, elapsed = ?started.elapsed(), "QEMU ready");
                return Ok(client);
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => "QMP did not answer".to_string(),
        };
        // A dropped connection usually means QEMU is exiting: give the reaper a moment.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.wait_exit()).await;
        match self.exit_info() {
            Some(exit) => Err(early_exit(exit, &log, log_start)),
            None => Err(QemuError::StartupTimeout {
                waited: timeout,
                detail: failure,
                stderr_tail: log_tail(&log, log_start),
            }),
        }
    }
}

fn early_exit(exit: ExitInfo, log: &Path, log_start: u64) -> QemuError {
    QemuError::EarlyExit {
        exit: exit.to_string(),
        stderr_tail: log_tail(log, log_start),
    }
}

/// Opens the stderr log for appending, marks the start of this run and
/// returns the file plus the offset where this run's output begins.
fn open_log(binary: &Path, path: &Path) -> Result<(File, u64), QemuError> {
    let ctx = |e| QemuError::io(format!("opening QEMU log {}", path.display()), e);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(ctx)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    writeln!(
        file,
        "--- flotilla: starting {} (unix time {now}) ---",
        binary.display()
    )
    .map_err(ctx)?;
    let start = file.seek(SeekFrom::End(0)).map_err(ctx)?;
    Ok((file, start))
}

/// The last few KiB this run wrote to the log, for error messages.
pub(crate) fn log_tail(path: &Path, from: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let start = from.max(len.saturating_sub(STDERR_TAIL_BYTES));
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).trim().to_string())
    };
    match read() {
        Ok(text) if text.is_empty() => "(no output)".to_string(),
        Ok(text) => text,
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// Removes a socket or pidfile left by an earlier QEMU of the same VM, so
/// "the socket exists" means this QEMU created it.
fn remove_stale(path: &Path) -> Result<(), QemuError> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::debug!(path = %path.display(), "removed stale file");
            Ok(())
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(QemuError::io(
            format!("removing stale {}", path.display()),
            err,
        )),
    }
}

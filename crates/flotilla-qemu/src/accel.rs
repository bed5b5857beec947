//! Choosing between KVM and TCG.
//!
//! `/dev/kvm` opening is not proof that guests run: a paravirtual KVM may
//! accept the device and then abort QEMU or crawl. So `auto` boots a probe
//! guest under KVM and picks KVM only if the guest prints
//! [`PROBE_MARKER`] on its serial console within the probe timeout. The
//! decision is remembered for the rest of the host's boot (see [`cache`]).

mod cache;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::config::{Accel, AccelChoice};
use crate::error::QemuError;

pub use cache::DEFAULT_PROBE_CACHE;

/// The KVM device node.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// What the probe guest's /init prints once it runs.
pub const PROBE_MARKER: &str = "FLOTILLA-PROBE-OK";

/// Kernel command line of the probe guest; `flotilla.probe=1` makes /init
/// print the marker and reboot, and `-no-reboot` turns that into an exit.
pub const PROBE_CMDLINE: &str = "console=ttyS0 flotilla.probe=1 panic=-1";

pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `KVM_GET_API_VERSION` = `_IO(0xAE, 0x00)`; the stable API answers 12.
const KVM_GET_API_VERSION: u64 = 0xAE00;
const KVM_API_VERSION: i32 = 12;

/// Output kept from the probe's stderr for the decision's reason.
const STDERR_KEEP: usize = 4096;

/// The probe guest and how long to give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelProbe {
    pub qemu_binary: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub timeout: Duration,
    /// Where a probe's decision is remembered for this boot; `None` probes
    /// at every start.
    pub cache: Option<PathBuf>,
}

impl AccelProbe {
    /// A probe with no initrd and [`DEFAULT_PROBE_TIMEOUT`].
    pub fn new(qemu_binary: impl Into<PathBuf>, kernel: impl Into<PathBuf>) -> Self {
        AccelProbe {
            qemu_binary: qemu_binary.into(),
            kernel: kernel.into(),
            initrd: None,
            timeout: DEFAULT_PROBE_TIMEOUT,
            cache: None,
        }
    }
}

/// The chosen accelerator and a human-readable why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// How a probe boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The guest printed the marker.
    MarkerSeen { after: Duration },
    /// QEMU exited without the marker (e.g. aborted on KVM setup).
    Exited { exit: String, stderr_tail: String },
    /// Neither within the timeout; QEMU was killed. `cpu` is the CPU time
    /// it had used (if known): a guest crawling under KVM uses plenty, one
    /// starved by a busy host does not. (A Linux guest that runs under KVM
    /// reports in within a few hundred milliseconds of CPU.)
    TimedOut {
        after: Duration,
        cpu: Option<Duration>,
    },
}

impl ProbeOutcome {
    /// Whether the outcome says what KVM can do on this host, rather than
    /// how busy the host was while the probe ran. An exit is not: it may be
    /// passing (the OOM killer, another hypervisor holding KVM).
    pub fn is_conclusive(&self, timeout: Duration) -> bool {
        match self {
            ProbeOutcome::MarkerSeen { .. } => true,
            ProbeOutcome::Exited { .. } => false,
            ProbeOutcome::TimedOut { cpu, .. } => cpu.is_some_and(|cpu| cpu >= timeout / 4),
        }
    }
}

/// Decides the accelerator using the real `/dev/kvm`.
pub async fn detect_accel(
    choice: AccelChoice,
    probe: &AccelProbe,
) -> Result<AccelDecision, QemuError> {
    detect_accel_with_device(choice, probe, Path::new(KVM_DEVICE)).await
}

/// [`detect_accel`] with another KVM device path (tests, unusual hosts).
pub async fn detect_accel_with_device(
    choice: AccelChoice,
    probe: &AccelProbe,
    kvm_device: &Path,
) -> Result<AccelDecision, QemuError> {
    let decision = match choice {
        AccelChoice::Tcg => decision(Accel::Tcg, "TCG requested explicitly".into()),
        AccelChoice::Kvm => match check_kvm_device(kvm_device) {
            Ok(()) => decision(
                Accel::Kvm,
                format!(
                    "KVM requested explicitly and {} is usable",
                    kvm_device.display()
                ),
            ),
            Err(reason) => return Err(QemuError::KvmUnavailable { reason }),
        },
        AccelChoice::Auto => {
            if let Err(reason) = check_kvm_device(kvm_device) {
                decision(Accel::Tcg, format!("{reason}; using TCG"))
            } else if probe.kernel.as_os_str().is_empty() {
                decision(
                    Accel::Tcg,
                    "no guest image to probe KVM with, so KVM is unproven; using TCG".into(),
                )
            } else if !probe.kernel.is_file() {
                decision(
                    Accel::Tcg,
                    format!(
                        "no probe kernel at {} to prove KVM runs guests; using TCG",
                        probe.kernel.display()
                    ),
                )
            } else {
                decide_auto_remembered(probe, kvm_device).await?
            }
        }
    };
    tracing::info!(%choice, accel = %decision.accel, reason = %decision.reason, "accelerator chosen");
    Ok(decision)
}

/// The `auto` decision from the probe, or from the cache when a probe with
/// the same inputs already ran this boot.
async fn decide_auto_remembered(
    probe: &AccelProbe,
    kvm_device: &Path,
) -> Result<AccelDecision, QemuError> {
    let cached = probe
        .cache
        .as_deref()
        .and_then(|file| Some((file, cache::ProbeKey::of(probe, kvm_device)?)));
    if let Some((file, key)) = &cached {
        if let Some(decision) = cache::lookup(file, key) {
            return Ok(decision);
        }
    }
    let outcome = run_probe(probe, Accel::Kvm).await?;
    let decision = decide_auto(&outcome, probe.timeout);
    if let Some((file, key)) = &cached {
        if outcome.is_conclusive(probe.timeout) {
            if let Err(e) = cache::store(file, key, &decision) {
                tracing::warn!(file = %file.display(), error = %e, "could not remember the KVM probe's decision");
            }
        }
    }
    Ok(decision)
}

fn decision(accel: Accel, reason: String) -> AccelDecision {
    AccelDecision { accel, reason }
}

/// Maps a KVM probe outcome to the `auto` decision.
pub(crate) fn decide_auto(outcome: &ProbeOutcome, timeout: Duration) -> AccelDecision {
    match outcome {
        ProbeOutcome::MarkerSeen { after } => decision(
            Accel::Kvm,
            format!("a probe guest ran under KVM (reported in after {after:.2?})"),
        ),
        ProbeOutcome::Exited { exit, stderr_tail } => {
            let last = stderr_tail.lines().last().unwrap_or("").trim();
            decision(
                Accel::Tcg,
                format!(
                    "the KVM probe QEMU exited ({exit}) before its guest reported in: {last}; \
                     using TCG"
                ),
            )
        }
        ProbeOutcome::TimedOut { .. } => decision(
            Accel::Tcg,
            format!(
                "the KVM probe guest did not report in within {timeout:?} (KVM is present but \
                 does not run guests usefully); using TCG"
            ),
        ),
    }
}

/// Checks that `path` opens read-write and speaks the stable KVM API.
pub fn check_kvm_device(path: &Path) -> Result<(), String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {} read-write: {e}", path.display()))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int;
    // on a non-KVM fd the kernel returns an error.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version == KVM_API_VERSION {
        Ok(())
    } else {
        Err(format!(
            "{} is not a KVM device with API version {KVM_API_VERSION} (got {version})",
            path.display()
        ))
    }
}

/// Boots the probe guest under `accel` and watches its serial console (on
/// stdout) for [`PROBE_MARKER`]. QEMU is always killed and reaped before
/// this returns.
pub async fn run_probe(probe: &AccelProbe, accel: Accel) -> Result<ProbeOutcome, QemuError> {
    let mut cmd = Command::new(&probe.qemu_binary);
    cmd.args(["-M", "microvm,acpi=off", "-accel", accel.as_str()])
        .args(["-cpu", accel.cpu_model(), "-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&probe.kernel);
    if let Some(initrd) = &probe.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd.args(["-append", PROBE_CMDLINE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| QemuError::Spawn {
        binary: probe.qemu_binary.clone(),
        source,
    })?;
    let started = Instant::now();
    let stderr = child
        .stderr
        .take()
        .map(|pipe| tokio::spawn(keep_tail(pipe)));
    let seen = match child.stdout.take() {
        Some(stdout) => tokio::time::timeout(probe.timeout, find_marker(stdout)).await,
        None => Ok(Ok(false)),
    };

    let outcome = match seen {
        Ok(Ok(true)) => ProbeOutcome::MarkerSeen {
            after: started.elapsed(),
        },
        Err(_) => ProbeOutcome::TimedOut {
            after: started.elapsed(),
            cpu: child.id().and_then(cpu_time),
        },
        Ok(Ok(false) | Err(_)) => {
            // stdout closed: QEMU is exiting; give it a moment to finish.
            match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                Ok(Ok(status)) => ProbeOutcome::Exited {
                    exit: crate::process::ExitInfo::from(status).to_string(),
                    stderr_tail: String::new(),
                },
                _ => ProbeOutcome::Exited {
                    exit: "closed its console".into(),
                    stderr_tail: String::new(),
                },
            }
        }
    };
    // Harmless if it already exited; kill_on_drop would not reap it.
    let _ = child.start_kill();
    if let Err(err) = child.wait().await {
        tracing::warn!(error = %err, "reaping the probe QEMU failed");
    }
    let tail = match stderr {
        Some(task) => tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default(),
        None => String::new(),
    };
    tracing::debug!(?outcome, stderr = %tail, "KVM probe finished");
    Ok(match outcome {
        ProbeOutcome::Exited { exit, .. } => ProbeOutcome::Exited {
            exit,
            stderr_tail: tail,
        },
        other => other,
    })
}

/// CPU time used so far by process `pid` (all its threads).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is the
    // first, utime the 12th and stime the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).ok().filter(|&t| t > 0)?;
    Some(Duration::from_millis(ticks * 1000 / per_second))
}

/// True once the marker appears, false at end of stream.
async fn find_marker(mut stream: impl AsyncRead + Unpin) -> std::io::Result<bool> {
    let marker = PROBE_MARKER.as_bytes();
    let mut window: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(false);
        }
        window.extend_from_slice(&chunk[..n]);
        if window.windows(marker.len()).any(|w| w == marker) {
            return Ok(true);
        }
        // Keep only what could still be the start of a split marker.
        let keep = marker.len() - 1;
        if window.len() > keep {
            window.drain(..window.len() - keep);
        }
    }
}

/// Reads a stream to its end, keeping the last few KiB as text.
async fn keep_tail(mut stream: impl AsyncRead + Unpin) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&chunk[..n]);
        if kept.len() > STDERR_KEEP {
            kept.drain(..kept.len() - STDERR_KEEP);
        }
    }
    String::from_utf8_lossy(&kept).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finds_marker_split_across_reads() {
        let (mut tx, rx) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in ["boot noise FLOTIL", "LA-PRO", "BE-OK\r\n"] {
                tx.write_all(part.as_bytes()).await.expect("write");
            }
        });
        assert!(find_marker(rx).await.expect("read"));
        writer.await.expect("writer");
    }

    #[tokio::test]
    async fn end_of_stream_without_marker_is_false() {
        let input: &[u8] = b"FLOTILLA-PROBE-O\n";
        assert!(!find_marker(input).await.expect("read"));
    }

    #[test]
    fn auto_decisions_explain_themselves() {
        let t = Duration::from_secs(2);
        let kvm = decide_auto(
            &ProbeOutcome::MarkerSeen {
                after: Duration::from_millis(300),
            },
            t,
        );
        assert_eq!(kvm.accel, Accel::Kvm);
        let aborted = decide_auto(
            &ProbeOutcome::Exited {
                exit: "killed by SIGABRT".into(),
                stderr_tail: "error: failed to set MSR 0x10a\nAssertion failed".into(),
            },
            t,
        );
        assert_eq!(aborted.accel, Accel::Tcg);
        assert!(
            aborted.reason.contains("Assertion failed"),
            "{}",
            aborted.reason
        );
        let slow = decide_auto(
            &ProbeOutcome::TimedOut {
                after: t,
                cpu: None,
            },
            t,
        );
        assert_eq!(slow.accel, Accel::Tcg);
        assert!(slow.reason.contains("2s"), "{}", slow.reason);
    }

    #[test]
    fn only_outcomes_that_show_what_kvm_can_do_are_conclusive() {
        let t = Duration::from_secs(2);
        let after = t;
        assert!(ProbeOutcome::MarkerSeen { after }.is_conclusive(t));
        let exited = ProbeOutcome::Exited {
            exit: "killed by SIGKILL".into(),
            stderr_tail: String::new(),
        };
        assert!(!exited.is_conclusive(t));
        // A guest crawling under KVM burns CPU; one starved by a busy host
        // (or whose CPU time is unknown) says nothing about KVM.
        let crawling = ProbeOutcome::TimedOut {
            after,
            cpu: Some(Duration::from_millis(1600)),
        };
        assert!(crawling.is_conclusive(t));
        let starved = ProbeOutcome::TimedOut {
            after,
            cpu: Some(Duration::from_millis(300)),
        };
        assert!(!starved.is_conclusive(t));
        assert!(!ProbeOutcome::TimedOut { after, cpu: None }.is_conclusive(t));
    }

    #[test]
    fn cpu_time_of_this_process_is_read() {
        let spent = cpu_time(std::process::id()).expect("own CPU time");
        assert!(spent < Duration::from_secs(3600));
        assert_eq!(cpu_time(u32::MAX), None);
    }

    #[test]
    fn regular_file_is_not_a_kvm_device() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let err = check_kvm_device(file.path()).expect_err("not kvm");
        assert!(err.contains("not a KVM device"), "{err}");
        let err = check_kvm_device(Path::new("/nonexistent/kvm")).expect_err("missing");
        assert!(err.contains("cannot open"), "{err}");
    }
}

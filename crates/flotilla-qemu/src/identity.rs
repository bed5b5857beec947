//! Process identity that survives pid reuse: a pid plus the process start
//! time from `/proc/PID/stat`. Signals go through a pidfd that is verified
//! against the start time, so a recycled pid is never signalled.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::error::QemuError;

/// A process as (pid, start time in clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat`.
    pub start_time: u64,
}

/// The parts of `/proc/PID/stat` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub state: char,
    pub start_time: u64,
}

impl ProcStat {
    fn is_dead(&self) -> bool {
        // Z = zombie, X/x = dead (being reaped).
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

impl ProcessIdentity {
    /// Reads the identity of a running process.
    pub fn of(pid: i32) -> Result<Self, QemuError> {
        let stat = read_stat(pid)?;
        Ok(ProcessIdentity {
            pid,
            start_time: stat.start_time,
        })
    }

    /// True if the process exists, has the same start time and is not a zombie.
    pub fn is_alive(&self) -> bool {
        self.check().is_ok()
    }

    /// Like [`is_alive`](Self::is_alive) but says why not.
    pub fn check(&self) -> Result<(), QemuError> {
        let stat = read_stat(self.pid)?;
        if stat.start_time != self.start_time {
            return Err(QemuError::IdentityMismatch {
                pid: self.pid,
                expected: self.start_time,
                found: stat.start_time,
            });
        }
        if stat.is_dead() {
            return Err(QemuError::ProcessGone { pid: self.pid });
        }
        Ok(())
    }

    /// Sends `sig` if the pid still belongs to this process.
    pub fn signal(&self, sig: Signal) -> Result<(), QemuError> {
        match self.pidfd()? {
            Some(fd) => pidfd_send_signal(&fd, sig).map_err(|err| self.signal_error(sig, err)),
            None => {
                // No pidfd support: check-then-kill has a tiny race, the best we can do.
                self.check()?;
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig)
                    .map_err(|errno| self.signal_error(sig, io::Error::from(errno)))
            }
        }
    }

    /// Opens a pidfd for this process and verifies the identity after opening,
    /// so the fd provably refers to this process. `Ok(None)` when the kernel
    /// has no pidfd support.
    pub(crate) fn pidfd(&self) -> Result<Option<OwnedFd>, QemuError> {
        if self.pid <= 0 {
            // Reuse read_stat's refusal of group-addressing pids.
            read_stat(self.pid)?;
        }
        let fd = match pidfd_open(self.pid) {
            Ok(fd) => fd,
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {
                return Err(QemuError::ProcessGone { pid: self.pid })
            }
            Err(err) if err.raw_os_error() == Some(libc::ENOSYS) => return Ok(None),
            Err(err) => {
                return Err(QemuError::io(format!("pidfd_open({})", self.pid), err));
            }
        };
        self.check()?;
        Ok(Some(fd))
    }

    fn signal_error(&self, sig: Signal, err: io::Error) -> QemuError {
        if err.raw_os_error() == Some(libc::ESRCH) {
            QemuError::ProcessGone { pid: self.pid }
        } else {
            QemuError::io(format!("sending {sig} to process {}", self.pid), err)
        }
    }
}

pub(crate) fn read_stat(pid: i32) -> Result<ProcStat, QemuError> {
    if pid <= 0 {
        // 0 and negative pids address process groups in kill(2): never accept them.
        return Err(QemuError::invalid(
            "pid",
            format!("{pid} is not a process id; accepted: a positive pid"),
        ));
    }
    let path = format!("/proc/{pid}/stat");
    match fs::read_to_string(&path) {
        Ok(text) => parse_stat(pid, &text),
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) => {
            Err(QemuError::ProcessGone { pid })
        }
        Err(err) => Err(QemuError::io(format!("reading {path}"), err)),
    }
}

/// Parses `/proc/PID/stat`. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat(pid: i32, text: &str) -> Result<ProcStat, QemuError> {
    let bad = |detail: &str| QemuError::ProcStat {
        pid,
        detail: detail.to_string(),
    };
    let close = text
        .rfind(')')
        .ok_or_else(|| bad("no ')' after the command name"))?;
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state), so field 22 (starttime) is fields[19].
    let state = fields
        .first()
        .and_then(|s| s.chars().next())
        .ok_or_else(|| bad("missing state field"))?;
    let start_time = fields
        .get(19)
        .ok_or_else(|| bad("missing starttime field"))?
        .parse::<u64>()
        .map_err(|_| bad("starttime is not a number"))?;
    Ok(ProcStat { state, start_time })
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_send_signal(fd: &OwnedFd, sig: Signal) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid pidfd, a valid signal number, no siginfo, no flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 \
                          3 0 987654 12345678 1000 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 \
                          17 1 0 0 0 0 0";

    #[test]
    fn parses_start_time_after_tricky_comm() {
        let stat = parse_stat(1234, SAMPLE).expect("parse");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.start_time, 987654);
    }

    #[test]
    fn rejects_truncated_stat() {
        let err = parse_stat(1, "1 (x) S 1 2 3").expect_err("must fail");
        assert!(err.to_string().contains("starttime"), "{err}");
    }

    #[test]
    fn own_identity_is_alive_and_stable() {
        let me = ProcessIdentity::of(std::process::id() as i32).expect("own stat");
        assert!(me.is_alive());
        assert_eq!(ProcessIdentity::of(me.pid).expect("again"), me);
    }

    #[test]
    fn rejects_non_positive_pids() {
        assert!(ProcessIdentity::of(0).is_err());
        assert!(ProcessIdentity::of(-1).is_err());
        let group = ProcessIdentity {
            pid: 0,
            start_time: 0,
        };
        assert!(!group.is_alive());
        assert!(group.signal(Signal::SIGTERM).is_err());
    }
}

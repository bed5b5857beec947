//! Error types of the crate: `QemuError` for configuration, processes and
//! acceleration, `QmpError` for the QMP client.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Errors from building a QEMU configuration, running QEMU processes and
/// choosing an accelerator.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A configuration value is out of range or malformed.
    #[error("invalid QEMU config: {field}: {problem}")]
    InvalidConfig { field: String, problem: String },

    /// An accelerator name that is not one of the accepted values.
    #[error("unknown accelerator {value:?}: accepted values are auto, kvm, tcg")]
    UnknownAccel { value: String },

    /// KVM was asked for explicitly but cannot be used on this host.
    #[error("KVM is not usable: {reason}; use the tcg (or auto) accelerator instead")]
    KvmUnavailable { reason: String },

    /// The QEMU binary could not be started at all.
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },

    /// QEMU exited while starting up; `stderr_tail` is the end of its log.
    #[error("QEMU exited during startup ({exit}); its stderr ends with:\n{stderr_tail}")]
    EarlyExit { exit: String, stderr_tail: String },

    /// QEMU kept running but never became ready (QMP socket absent or mute).
    #[error("QEMU did not become ready within {waited:?} ({detail}); its stderr ends with:\n{stderr_tail}")]
    StartupTimeout {
        waited: Duration,
        detail: String,
        stderr_tail: String,
    },

    /// No process with this pid exists (any more).
    #[error("process {pid} does not exist")]
    ProcessGone { pid: i32 },

    /// The pid exists but belongs to another process (pid reuse).
    #[error("process {pid} started at tick {found}, expected {expected}: the pid was reused")]
    IdentityMismatch { pid: i32, expected: u64, found: u64 },

    /// `/proc/PID/stat` could not be understood.
    #[error("cannot parse /proc/{pid}/stat: {detail}")]
    ProcStat { pid: i32, detail: String },

    /// An OS call failed; `context` says which and on what.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// A call that needs a Tokio runtime was made outside of one.
    #[error("{what} must be called from within a Tokio runtime")]
    NoRuntime { what: &'static str },
}

impl QemuError {
    pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        QemuError::InvalidConfig {
            field: field.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        QemuError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Errors from the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Socket I/O failed (connect, read or write).
    #[error("QMP I/O error: {0}")]
    Io(#[from] io::Error),

    /// No reply arrived in time. The connection stays usable; a late reply is
    /// discarded.
    #[error("QMP command {command:?} timed out")]
    Timeout { command: String },

    /// The connection is closed (QEMU exited, was killed or closed it).
    #[error("QMP connection closed")]
    Disconnected,

    /// QEMU sent something that is not valid QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),

    /// QEMU answered with an error reply.
    #[error("QMP command failed: {class}: {desc}")]
    Command { class: String, desc: String },

    /// The reply is valid QMP but does not have the expected shape.
    #[error("unexpected reply to QMP command {command:?}: {source}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

impl QmpError {
    /// True for errors that mean the QMP connection is unusable.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, QmpError::Disconnected)
    }

    /// The QMP error class (e.g. `CommandNotFound`) of a command error.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

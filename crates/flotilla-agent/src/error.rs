//! The host agent's error type, and the one mapping from errors to API codes.

use flotilla_api::{ErrorCode, ErrorDetail};

use crate::capacity::CapacityError;
use crate::disks::DiskError;
use crate::network::NetworkError;
use crate::record::RecordError;
use crate::spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("no VM named {name:?} on this host")]
    VmNotFound { name: String },
    #[error("a VM named {name:?} already exists on this host")]
    VmExists { name: String },
    #[error("no snapshot named {name:?} (nor a layer with that id) on this host")]
    SnapshotNotFound { name: String },
    #[error("no volume named {name:?} on this host")]
    VolumeNotFound { name: String },
    #[error("{message}")]
    Conflict {
        message: String,
        hint: Option<String>,
    },
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error(transparent)]
    Image(#[from] flotilla_image::ImageError),
    #[error("QEMU: {0}")]
    Qemu(#[from] flotilla_qemu::QemuError),
    #[error("QMP: {0}")]
    Qmp(#[from] flotilla_qemu::QmpError),
    /// From the guest agent; `caller_mistake` for a request the guest
    /// refused (no such program, permission denied, a bad working directory).
    #[error("guest: {message}")]
    Guest {
        message: String,
        caller_mistake: bool,
    },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error(transparent)]
    SnapshotStore(#[from] flotilla_snapshot::SnapshotError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("no migration {id:?} on this host")]
    MigrationNotFound { id: String },
    /// Another host's agent failed or could not be reached.
    #[error("{0}")]
    Peer(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl AgentError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn conflict(message: impl Into<String>, hint: impl Into<Option<String>>) -> Self {
        AgentError::Conflict {
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// The API code for this error: the single place that decides which
    /// failures are the caller's (4xx) and which are the host's (5xx).
    pub fn code(&self) -> ErrorCode {
        use flotilla_image::ImageError as I;
        match self {
            AgentError::InvalidSpec(_) | AgentError::InvalidArgument(_) => {
                ErrorCode::InvalidArgument
            }
            AgentError::VmNotFound { .. }
            | AgentError::SnapshotNotFound { .. }
            | AgentError::VolumeNotFound { .. }
            | AgentError::MigrationNotFound { .. } => ErrorCode::NotFound,
            AgentError::Peer(_) => ErrorCode::Unavailable,
            AgentError::VmExists { .. } => ErrorCode::AlreadyExists,
            AgentError::Conflict { .. } => ErrorCode::Conflict,
            AgentError::Capacity(_) => ErrorCode::InsufficientCapacity,
            AgentError::Image(e) => match e {
                I::NotFound { .. } => ErrorCode::NotFound,
                I::AlreadyExists { .. } => ErrorCode::AlreadyExists,
                I::NotAKernel { .. }
                | I::NotAnInitrd { .. }
                | I::InvalidDisk { .. }
                | I::InvalidName { .. } => ErrorCode::InvalidArgument,
                _ => ErrorCode::Internal,
            },
            AgentError::Guest {
                caller_mistake: true,
                ..
            } => ErrorCode::InvalidArgument,
            AgentError::Guest { .. } => ErrorCode::GuestError,
            AgentError::Timeout(_) => ErrorCode::Timeout,
            AgentError::SnapshotStore(e) => match e {
                flotilla_snapshot::SnapshotError::NotFound { .. } => ErrorCode::NotFound,
                flotilla_snapshot::SnapshotError::Io { .. } => ErrorCode::Internal,
                // Corrupt or missing layers, layers in use: refused, not lost.
                _ => ErrorCode::Conflict,
            },
            AgentError::Snapshot(_) => ErrorCode::Internal,
            AgentError::Network(NetworkError::SubnetExhausted { .. }) => {
                ErrorCode::InsufficientCapacity
            }
            AgentError::Qemu(_)
            | AgentError::Qmp(_)
            | AgentError::Network(_)
            | AgentError::Disk(_)
            | AgentError::Record(_)
            | AgentError::Io { .. } => ErrorCode::Internal,
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            AgentError::VmNotFound { .. } => Some("list VMs with `flotilla vm ls`".into()),
            AgentError::SnapshotNotFound { .. } => {
                Some("list snapshots with `flotilla snapshot ls`".into())
            }
            AgentError::VolumeNotFound { .. } => Some(
                "list volumes with `flotilla volume ls`; make one with `flotilla volume create`"
                    .into(),
            ),
            AgentError::VmExists { .. } => {
                Some("pick another name, or remove the VM with `flotilla vm rm NAME`".into())
            }
            AgentError::Conflict { hint, .. } => hint.clone(),
            AgentError::Capacity(_) => {
                Some("stop or remove VMs, or ask for fewer vCPUs or less memory".into())
            }
            AgentError::Network(NetworkError::SubnetExhausted { .. }) => {
                Some("remove VMs, or give the agent a larger --subnet".into())
            }
            AgentError::Image(flotilla_image::ImageError::NotFound { .. }) => {
                Some("list images with `flotilla image ls`; build the default with `flotilla image build`".into())
            }
            _ => None,
        }
    }

    pub fn to_detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code(),
            message: self.to_string(),
            hint: self.hint(),
        }
    }
}

pub type AgentResult<T> = Result<T, AgentError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_mistakes_map_to_4xx() {
        let cases = [
            AgentError::VmNotFound { name: "x".into() },
            AgentError::VmExists { name: "x".into() },
            AgentError::conflict("vm x is stopped", None),
            AgentError::InvalidArgument("bad".into()),
            AgentError::Guest {
                message: "nope: command not found".into(),
                caller_mistake: true,
            },
        ];
        for e in cases {
            let s = e.code().http_status();
            assert!((400..500).contains(&s), "{e}: {s}");
        }
    }
}

//! The crate's one error type, [`SnapshotError`].
//!
//! Every variant names the layer (or the path) it is about and, where there is
//! something to do about it, says what.

use std::io;
use std::path::PathBuf;

use crate::id::LayerId;

/// Anything that can go wrong while storing, reading or removing layers.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What we were doing ("read", "rename into place", ...).
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A layer id that is not 16 lowercase hex characters.
    #[error("invalid layer id {id:?}: layer ids are 16 lowercase hex characters")]
    InvalidId { id: String },

    /// A reference holder name that cannot be stored as a file name.
    #[error("invalid reference holder {holder:?}: {reason}")]
    InvalidHolder {
        holder: String,
        reason: &'static str,
    },

    /// An input file (memory image, disk) that cannot be used.
    #[error("{}: {reason}", path.display())]
    InvalidInput { path: PathBuf, reason: String },

    /// No layer with this id is stored.
    #[error("layer {id} not found (list the store to see the layers it holds)")]
    NotFound { id: LayerId },

    /// A layer's parent is not stored, so the chain cannot be rebuilt.
    #[error(
        "layer {id}: its parent layer {parent} is missing, so the chain cannot be rebuilt; \
         start a new chain with a full layer (no parent)"
    )]
    ParentMissing { id: LayerId, parent: LayerId },

    /// A layer's manifest, page data or disk does not match its checksums
    /// or is malformed.
    #[error(
        "layer {id} is corrupt: {reason}; its contents cannot be trusted: remove it \
         (and the layers built on it) and take a new snapshot"
    )]
    Corrupt { id: LayerId, reason: String },

    /// The layer still has reference holders or child layers.
    #[error(
        "layer {id} is in use by {}; remove those references (remove_ref) or child layers first",
        by.join(", ")
    )]
    InUse {
        id: LayerId,
        /// Holders (e.g. `vm:web`), then child layers as `layer:<id>`.
        by: Vec<String>,
    },

    /// A file given as a layer's memory image has a different size than the
    /// layer records.
    #[error(
        "{}: {actual} bytes, but the memory image of layer {id} is {expected} bytes; \
         pass that layer's materialized memory image, or none to have it rebuilt",
        path.display()
    )]
    SizeMismatch {
        id: LayerId,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    /// The layer was written by a newer Flotilla.
    #[error(
        "layer {id} has format version {found}, this build reads version {supported}; \
         use a newer Flotilla to read it"
    )]
    VersionUnsupported {
        id: LayerId,
        found: u32,
        supported: u32,
    },
}

impl SnapshotError {
    /// Shorthand for [`SnapshotError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        SnapshotError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`SnapshotError::Corrupt`].
    pub(crate) fn corrupt(id: &LayerId, reason: impl Into<String>) -> Self {
        SnapshotError::Corrupt {
            id: id.clone(),
            reason: reason.into(),
        }
    }
}

/// Attaches an operation and a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, SnapshotError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, SnapshotError> {
        self.map_err(|e| SnapshotError::io(op, path, e))
    }
}

//! The storage boundary: everything the store needs from wherever layers
//! live. [`crate::local::LocalDir`] keeps them in a directory; an object
//! store can implement the same traits later without touching the diff,
//! materialize, reference or gc logic.
//!
//! Memory images given to and produced by the store are always local files
//! (QEMU reads and writes them); only layer contents go through here.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::SnapshotError;
use crate::id::LayerId;
use crate::manifest::DiskEntry;

/// Where layers are kept.
pub(crate) trait Backend: fmt::Debug + Send + Sync {
    /// Removes what interrupted work left behind (never anything in use).
    /// Called under the store lock, as is `begin`.
    fn clean_leftovers(&self) -> Result<(), SnapshotError>;

    /// Ids of the complete layers, in no particular order.
    fn ids(&self) -> Result<Vec<LayerId>, SnapshotError>;

    fn exists(&self, id: &LayerId) -> bool;

    /// The bytes of the layer's manifest; `NotFound` when there is no layer.
    fn read_manifest(&self, id: &LayerId) -> Result<Vec<u8>, SnapshotError>;

    /// The layer's page data, to be read sequentially.
    fn open_data(&self, id: &LayerId) -> Result<LayerData, SnapshotError>;

    /// A local path of the layer's disk file `file` (`disk.qcow2` or
    /// `disk-<name>.qcow2`), if it has one.
    fn disk_path(&self, id: &LayerId, file: &str) -> Option<PathBuf>;

    /// Starts a new layer; nothing of it is visible until `commit`.
    fn begin(&self, id: &LayerId) -> Result<Box<dyn Staging>, SnapshotError>;

    /// Removes a layer; returns the bytes of storage freed.
    fn delete(&self, id: &LayerId) -> Result<u64, SnapshotError>;

    /// What the layer's stored files are right now, such that any write,
    /// truncation or replacement of one of them changes it; `None` when the
    /// backend cannot tell (every check then reads everything).
    fn stamp(&self, id: &LayerId) -> Option<LayerStamp>;
}

/// See [`Backend::stamp`]. For a local directory: name, inode, size, and
/// modification and change times of each file (the change time cannot be
/// set back from user space).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LayerStamp(pub Vec<(String, [i64; 6])>);

/// A layer being written. Dropping it without `commit` discards it (and
/// gives back a disk file it had taken).
pub(crate) trait Staging: Send {
    /// Appends page data (`memory.data`).
    fn write_data(&mut self, bytes: &[u8]) -> Result<(), SnapshotError>;

    /// A local path for a temporary file that lives (at most) as long as the
    /// staging: never part of the layer, removed even after a crash.
    fn scratch_path(&self, name: &str) -> Result<PathBuf, SnapshotError>;

    /// Takes `src` as the layer's disk: moved when possible, copied otherwise
    /// (the original is then removed on commit).
    fn put_disk(&mut self, src: &Path, file: &str) -> Result<DiskEntry, SnapshotError>;

    /// Makes the layer visible, complete, with this manifest.
    fn commit(self: Box<Self>, manifest_json: &[u8]) -> Result<(), SnapshotError>;
}

/// A layer's page data, read front to back.
pub(crate) struct LayerData {
    /// Its size as stored.
    pub len: u64,
    pub reader: Box<dyn Read + Send>,
    /// Where it lives, for error messages.
    pub location: PathBuf,
}

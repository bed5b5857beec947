//! The store lock (`<root>/lock`, `flock`): held while references or the
//! set of layers change, so that `remove` and `gc` see every reference and
//! child, and a new layer's parent cannot vanish while it is committed.
//! Readers do not take it.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use crate::error::{IoContext, SnapshotError};

/// Held until dropped.
pub(crate) struct StoreLock {
    _lock: Flock<File>,
}

impl StoreLock {
    /// Blocks until the lock is ours. Works across processes and between
    /// handles of one process (each call opens the file anew).
    pub(crate) fn acquire(path: &Path) -> Result<StoreLock, SnapshotError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ctx("open", path)?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| SnapshotError::io("lock", path, e.into()))?;
        Ok(StoreLock { _lock: lock })
    }
}

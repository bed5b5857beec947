//! References: `<root>/refs/<id>/<holder>`, one empty file per holder, so
//! adding or removing one is a single atomic create or unlink.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, SnapshotError};
use crate::fsutil::fsync_path;
use crate::id::LayerId;

const MAX_HOLDER_LEN: usize = 200;

/// The reference directory of a store.
#[derive(Clone, Debug)]
pub(crate) struct Refs {
    dir: PathBuf,
}

impl Refs {
    pub(crate) fn open(dir: PathBuf) -> Result<Refs, SnapshotError> {
        fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        Ok(Refs { dir })
    }

    fn layer_dir(&self, id: &LayerId) -> PathBuf {
        self.dir.join(id.as_str())
    }

    /// Holders of `id`, sorted.
    pub(crate) fn holders(&self, id: &LayerId) -> Result<Vec<String>, SnapshotError> {
        list_names(&self.layer_dir(id))
    }

    /// Every layer id with at least one holder, with its holders. Includes
    /// ids whose layer no longer exists.
    pub(crate) fn all(&self) -> Result<BTreeMap<LayerId, Vec<String>>, SnapshotError> {
        let mut all = BTreeMap::new();
        for name in list_names(&self.dir)? {
            let id = LayerId(name);
            if id.is_valid() {
                let holders = self.holders(&id)?;
                all.insert(id, holders);
            }
        }
        Ok(all)
    }

    /// Idempotent.
    pub(crate) fn add(&self, id: &LayerId, holder: &str) -> Result<(), SnapshotError> {
        check_holder(holder)?;
        let dir = self.layer_dir(id);
        fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        let path = dir.join(holder);
        File::create(&path).ctx("create", &path)?;
        fsync_path(&dir)?;
        fsync_path(&self.dir)
    }

    /// Idempotent; drops the layer's directory once it has no holder.
    pub(crate) fn remove(&self, id: &LayerId, holder: &str) -> Result<(), SnapshotError> {
        check_holder(holder)?;
        let dir = self.layer_dir(id);
        let path = dir.join(holder);
        match fs::remove_file(&path) {
            Ok(()) => fsync_path(&dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SnapshotError::io("remove", path, e)),
        }
        self.remove_if_empty(id)
    }

    /// Removes every holder of `id` and its directory.
    pub(crate) fn clear(&self, id: &LayerId) -> Result<(), SnapshotError> {
        let dir = self.layer_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => fsync_path(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SnapshotError::io("remove", dir, e)),
        }
    }

    fn remove_if_empty(&self, id: &LayerId) -> Result<(), SnapshotError> {
        let dir = self.layer_dir(id);
        match fs::remove_dir(&dir) {
            Ok(()) => fsync_path(&self.dir),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(SnapshotError::io("remove", dir, e)),
        }
    }
}

/// Holders become file names: no separators, no dot files, nothing that
/// prints badly.
pub(crate) fn check_holder(holder: &str) -> Result<(), SnapshotError> {
    let reason = if holder.is_empty() {
        Some("it is empty")
    } else if holder.len() > MAX_HOLDER_LEN {
        Some("it is longer than 200 bytes")
    } else if holder.starts_with('.') {
        Some("it starts with a dot")
    } else if holder.chars().any(|c| c == '/' || c.is_control()) {
        Some("it contains a slash or a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SnapshotError::InvalidHolder {
            holder: holder.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn list_names(dir: &Path) -> Result<Vec<String>, SnapshotError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SnapshotError::io("read directory", dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.ctx("read directory", dir)?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let refs = Refs::open(dir.path().join("refs")).unwrap();
        let id = LayerId("0123456789abcdef".into());
        refs.add(&id, "vm:web").unwrap();
        refs.add(&id, "vm:web").unwrap();
        refs.add(&id, "pool:warm").unwrap();
        assert_eq!(refs.holders(&id).unwrap(), vec!["pool:warm", "vm:web"]);
        refs.remove(&id, "vm:web").unwrap();
        refs.remove(&id, "vm:web").unwrap();
        refs.remove(&id, "pool:warm").unwrap();
        assert!(refs.holders(&id).unwrap().is_empty());
        assert!(!dir.path().join("refs").join(id.as_str()).exists());
        assert!(refs.all().unwrap().is_empty());
    }

    #[test]
    fn odd_holders_are_refused() {
        for bad in ["", ".hidden", "a/b", "../x", "tab\there", &"x".repeat(201)] {
            assert!(check_holder(bad).is_err(), "{bad:?}");
        }
        for good in ["vm:web", "pool:warm-1", "migration:host-b@2"] {
            assert!(check_holder(good).is_ok(), "{good:?}");
        }
    }
}

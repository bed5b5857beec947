//! [`LocalDir`]: layers as directories, `<layers>/<id>/{manifest.json,
//! memory.data, disk.qcow2}`.
//!
//! A layer is assembled in `<layers>/.tmp-<id>`, every file and the directory
//! are synced, and one rename makes it appear whole; removal renames it to
//! `.tmp-rm-<id>` before deleting. Work directories are locked (`flock`) while
//! in use, so leftovers of a crash (whose locks the kernel released) can be
//! told from work in progress and removed.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::backend::{Backend, LayerData, LayerStamp, Staging};
use crate::error::{IoContext, SnapshotError};
use crate::fsutil::{allocated_bytes, copy_file_hashing, fsync_path, hash_file, IO_BUF};
use crate::id::LayerId;
use crate::manifest::DiskEntry;

const TMP_PREFIX: &str = ".tmp-";
const MANIFEST_FILE: &str = "manifest.json";
const DATA_FILE: &str = "memory.data";
const SCRATCH_DIR: &str = "scratch";

/// Layers kept in a local directory.
#[derive(Debug)]
pub(crate) struct LocalDir {
    layers: PathBuf,
}

impl LocalDir {
    pub(crate) fn open(layers: PathBuf) -> Result<LocalDir, SnapshotError> {
        fs::create_dir_all(&layers).ctx("create directory", &layers)?;
        Ok(LocalDir { layers })
    }

    fn dir(&self, id: &LayerId) -> PathBuf {
        self.layers.join(id.as_str())
    }

    /// The error for a missing file of a layer: the layer is gone, or the
    /// layer is damaged.
    fn missing(&self, id: &LayerId, file: &str) -> SnapshotError {
        if self.dir(id).is_dir() {
            SnapshotError::corrupt(id, format!("{file} is missing"))
        } else {
            SnapshotError::NotFound { id: id.clone() }
        }
    }
}

impl Backend for LocalDir {
    fn clean_leftovers(&self) -> Result<(), SnapshotError> {
        for entry in fs::read_dir(&self.layers).ctx("read directory", &self.layers)? {
            let entry = entry.ctx("read directory", &self.layers)?;
            if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                continue;
            }
            let path = entry.path();
            let Ok(handle) = File::open(&path) else {
                continue; // already gone
            };
            match Flock::lock(handle, FlockArg::LockExclusiveNonblock) {
                Ok(_lock) => {
                    tracing::info!(path = %path.display(), "removing leftover of interrupted work");
                    let removed = if path.is_dir() {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_file(&path)
                    };
                    match removed {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(SnapshotError::io("remove leftover", path, e)),
                    }
                }
                // Another store handle is working in it right now.
                Err((_, Errno::EWOULDBLOCK)) => {}
                Err((_, e)) => return Err(SnapshotError::io("lock", path, e.into())),
            }
        }
        Ok(())
    }

    fn ids(&self) -> Result<Vec<LayerId>, SnapshotError> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.layers).ctx("read directory", &self.layers)? {
            let entry = entry.ctx("read directory", &self.layers)?;
            let id = LayerId(entry.file_name().to_string_lossy().into_owned());
            if id.is_valid() && entry.path().is_dir() {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn exists(&self, id: &LayerId) -> bool {
        self.dir(id).is_dir()
    }

    fn read_manifest(&self, id: &LayerId) -> Result<Vec<u8>, SnapshotError> {
        let path = self.dir(id).join(MANIFEST_FILE);
        match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(self.missing(id, MANIFEST_FILE)),
            Err(e) => Err(SnapshotError::io("read", path, e)),
        }
    }

    fn open_data(&self, id: &LayerId) -> Result<LayerData, SnapshotError> {
        let path = self.dir(id).join(DATA_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.missing(id, DATA_FILE))
            }
            Err(e) => return Err(SnapshotError::io("open", path, e)),
        };
        let len = file.metadata().ctx("stat", &path)?.len();
        Ok(LayerData {
            len,
            reader: Box::new(BufReader::with_capacity(IO_BUF, file)),
            location: path,
        })
    }

    fn disk_path(&self, id: &LayerId, file: &str) -> Option<PathBuf> {
        if !crate::manifest::is_disk_file_name(file) {
            return None;
        }
        let path = self.dir(id).join(file);
        path.is_file().then_some(path)
    }

    fn begin(&self, id: &LayerId) -> Result<Box<dyn Staging>, SnapshotError> {
        let dir = self.layers.join(format!("{TMP_PREFIX}{id}"));
        fs::create_dir(&dir).ctx("create directory", &dir)?;
        let lock = File::open(&dir)
            .and_then(|f| {
                Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e.into())
            })
            .ctx("lock", &dir);
        let lock = match lock {
            Ok(lock) => lock,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here on, dropping the staging removes the directory.
        let mut staging = LocalStaging {
            final_dir: self.dir(id),
            layers: self.layers.clone(),
            data: None,
            disks: Vec::new(),
            committed: false,
            _lock: lock,
            dir,
        };
        let data_path = staging.dir.join(DATA_FILE);
        let file = File::create_new(&data_path).ctx("create", &data_path)?;
        staging.data = Some(BufWriter::with_capacity(IO_BUF, file));
        Ok(Box::new(staging))
    }

    fn delete(&self, id: &LayerId) -> Result<u64, SnapshotError> {
        let dir = self.dir(id);
        if !dir.is_dir() {
            return Err(SnapshotError::NotFound { id: id.clone() });
        }
        let bytes = allocated_bytes(&dir);
        let _lock = File::open(&dir)
            .and_then(|f| Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| e.into()))
            .ctx("lock", &dir)?;
        // Out of sight first, so a crash halfway through the deletion never
        // leaves a layer with files missing.
        let trash = self.layers.join(format!("{TMP_PREFIX}rm-{id}"));
        fs::rename(&dir, &trash).ctx("rename for removal", &dir)?;
        fsync_path(&self.layers)?;
        match fs::remove_dir_all(&trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SnapshotError::io("remove", trash, e)),
        }
        Ok(bytes)
    }

    fn stamp(&self, id: &LayerId) -> Option<LayerStamp> {
        use std::os::unix::fs::MetadataExt;
        let mut files = Vec::new();
        for entry in fs::read_dir(self.dir(id)).ok()? {
            let entry = entry.ok()?;
            let m = entry.metadata().ok()?;
            let identity = [
                m.ino() as i64,
                m.size() as i64,
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            ];
            files.push((entry.file_name().to_string_lossy().into_owned(), identity));
        }
        files.sort();
        Some(LayerStamp(files))
    }
}

/// A layer being assembled in `.tmp-<id>`.
struct LocalStaging {
    dir: PathBuf,
    final_dir: PathBuf,
    layers: PathBuf,
    data: Option<BufWriter<File>>,
    disks: Vec<TakenDisk>,
    committed: bool,
    /// Held until the staging is gone, so `clean_leftovers` leaves it alone.
    _lock: Flock<File>,
}

struct TakenDisk {
    src: PathBuf,
    dst: PathBuf,
    /// Renamed (to be renamed back on failure) rather than copied (to be
    /// removed on success).
    moved: bool,
}

impl Staging for LocalStaging {
    fn write_data(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        let Some(data) = self.data.as_mut() else {
            return Err(SnapshotError::io(
                "write",
                self.dir.join(DATA_FILE),
                io::Error::other("layer data already closed"),
            ));
        };
        data.write_all(bytes).ctx("write", self.dir.join(DATA_FILE))
    }

    fn scratch_path(&self, name: &str) -> Result<PathBuf, SnapshotError> {
        let scratch = self.dir.join(SCRATCH_DIR);
        fs::create_dir_all(&scratch).ctx("create directory", &scratch)?;
        Ok(scratch.join(name))
    }

    fn put_disk(&mut self, src: &Path, file: &str) -> Result<DiskEntry, SnapshotError> {
        let invalid = |reason: &str| SnapshotError::InvalidInput {
            path: src.to_path_buf(),
            reason: reason.to_string(),
        };
        if !crate::manifest::is_disk_file_name(file) {
            return Err(invalid("not a layer disk file name"));
        }
        let dst = self.dir.join(file);
        if self.disks.iter().any(|d| d.dst == dst) {
            return Err(invalid("the layer already holds a disk of that name"));
        }
        let meta = fs::symlink_metadata(src).ctx("stat", src)?;
        if !meta.is_file() {
            return Err(invalid(
                "the disk is not a regular file (pass the file itself, not a symlink)",
            ));
        }
        let (size, sha256) = match fs::rename(src, &dst) {
            Ok(()) => {
                self.disks.push(TakenDisk {
                    src: src.to_path_buf(),
                    dst: dst.clone(),
                    moved: true,
                });
                fsync_path(&dst)?;
                hash_file(&dst)?
            }
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                self.disks.push(TakenDisk {
                    src: src.to_path_buf(),
                    dst: dst.clone(),
                    moved: false,
                });
                copy_file_hashing(src, &dst)?
            }
            Err(e) => return Err(SnapshotError::io("move disk into layer", src, e)),
        };
        Ok(DiskEntry {
            file: file.to_string(),
            size,
            sha256,
        })
    }

    fn commit(mut self: Box<Self>, manifest_json: &[u8]) -> Result<(), SnapshotError> {
        let scratch = self.dir.join(SCRATCH_DIR);
        if scratch.exists() {
            fs::remove_dir_all(&scratch).ctx("remove", &scratch)?;
        }
        let data_path = self.dir.join(DATA_FILE);
        if let Some(data) = self.data.take() {
            let file = data
                .into_inner()
                .map_err(|e| SnapshotError::io("write", &data_path, e.into_error()))?;
            file.sync_all().ctx("fsync", &data_path)?;
        }
        let manifest = self.dir.join(MANIFEST_FILE);
        let mut file = File::create_new(&manifest).ctx("create", &manifest)?;
        file.write_all(manifest_json).ctx("write", &manifest)?;
        file.sync_all().ctx("fsync", &manifest)?;
        fsync_path(&self.dir)?;

        fs::rename(&self.dir, &self.final_dir).ctx("rename into place", &self.final_dir)?;
        self.committed = true;
        // The layer is complete and visible; failing here would hide that.
        if let Err(e) = fsync_path(&self.layers) {
            tracing::warn!(error = %e, "layer stored, but syncing its parent directory failed");
        }
        for disk in self.disks.iter().filter(|d| !d.moved) {
            if let Err(e) = fs::remove_file(&disk.src) {
                tracing::warn!(path = %disk.src.display(), error = %e, "disk copied into layer; removing the original failed");
            }
        }
        Ok(())
    }
}

impl Drop for LocalStaging {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut kept = false;
        for disk in self.disks.iter().filter(|d| d.moved) {
            // Give the caller its disk back.
            if let Err(e) = fs::rename(&disk.dst, &disk.src) {
                tracing::error!(disk = %disk.src.display(), kept = %disk.dst.display(), error = %e,
                    "could not move the disk back after a failed snapshot");
                kept = true;
            }
        }
        if kept {
            return; // keep the directory: it holds the only copy of a disk
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(path = %self.dir.display(), error = %e, "could not remove unfinished layer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::DISK_FILE;

    fn setup() -> (tempfile::TempDir, LocalDir) {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalDir::open(dir.path().join("layers")).unwrap();
        (dir, backend)
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_dropped_staging_gives_the_disk_back_and_leaves_nothing() {
        let (dir, backend) = setup();
        let disk = dir.path().join("vm.qcow2");
        fs::write(&disk, b"stand-in disk").unwrap();
        let mut staging = backend.begin(&LayerId::generate()).unwrap();
        staging.write_data(&[1; 4096]).unwrap();
        let data = dir.path().join("data.qcow2");
        fs::write(&data, b"data disk").unwrap();
        let entry = staging.put_disk(&disk, DISK_FILE).unwrap();
        assert_eq!(entry.size, 13);
        assert!(!disk.exists(), "the disk is moved, not copied");
        staging.put_disk(&data, "disk-data.qcow2").unwrap();
        let twice = dir.path().join("again.qcow2");
        fs::write(&twice, b"x").unwrap();
        assert!(staging.put_disk(&twice, "disk-data.qcow2").is_err());
        assert!(staging.put_disk(&twice, "../escape.qcow2").is_err());
        drop(staging);
        assert_eq!(fs::read(&disk).unwrap(), b"stand-in disk");
        assert_eq!(fs::read(&data).unwrap(), b"data disk");
        assert!(entries(&dir.path().join("layers")).is_empty());
    }

    #[test]
    fn commit_makes_the_layer_appear_whole() {
        let (dir, backend) = setup();
        let id = LayerId::generate();
        let mut staging = backend.begin(&id).unwrap();
        staging.write_data(b"pages").unwrap();
        let scratch = staging.scratch_path("parent-memory").unwrap();
        fs::write(&scratch, b"temporary").unwrap();
        assert!(!backend.exists(&id));
        staging.commit(b"{}").unwrap();
        assert!(backend.exists(&id));
        let layer = dir.path().join("layers").join(id.as_str());
        assert_eq!(entries(&layer), vec!["manifest.json", "memory.data"]);
        assert_eq!(backend.ids().unwrap(), vec![id.clone()]);
        assert!(backend.delete(&id).unwrap() > 0);
        assert!(entries(&dir.path().join("layers")).is_empty());
    }

    #[test]
    fn leftovers_go_but_work_in_progress_stays() {
        let (dir, backend) = setup();
        let layers = dir.path().join("layers");
        fs::create_dir(layers.join(".tmp-0000000000000001")).unwrap();
        fs::write(
            layers.join(".tmp-0000000000000001").join("memory.data"),
            b"x",
        )
        .unwrap();
        fs::create_dir(layers.join(".tmp-rm-0000000000000002")).unwrap();
        let id = LayerId::generate();
        let mut busy = backend.begin(&id).unwrap();
        backend.clean_leftovers().unwrap();
        assert_eq!(entries(&layers), vec![format!(".tmp-{id}")]);
        busy.write_data(b"still fine").unwrap();
        busy.commit(b"{}").unwrap();
        assert_eq!(entries(&layers), vec![id.to_string()]);
    }

    #[test]
    fn missing_files_are_corruption_or_absence() {
        let (dir, backend) = setup();
        let id = LayerId::generate();
        assert!(matches!(
            backend.read_manifest(&id),
            Err(SnapshotError::NotFound { .. })
        ));
        fs::create_dir(dir.path().join("layers").join(id.as_str())).unwrap();
        assert!(matches!(
            backend.read_manifest(&id),
            Err(SnapshotError::Corrupt { .. })
        ));
        assert!(matches!(
            backend.open_data(&id),
            Err(SnapshotError::Corrupt { .. })
        ));
    }
}

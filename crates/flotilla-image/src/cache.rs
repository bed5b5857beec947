//! The build cache: where it lives, content keys, and the locking and
//! temp-then-rename publishing that keep a killed build from ever leaving an
//! entry that looks complete.
//!
//! Layout: `<cache>/kernel/<key>/vmlinux` and `<cache>/images/<key>/...`.
//! Work happens in `.tmp-*` directories next to the entries; an entry
//! directory appears (by `rename`) only once everything in it is written
//! and synced.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::error::{ImageError, IoContext};

/// Prefix of in-progress work directories; never a valid key or image name.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

/// Where build artifacts are cached: `$FLOTILLA_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/flotilla`, else `~/.cache/flotilla` (empty variables
/// count as unset).
pub fn default_cache_dir() -> PathBuf {
    cache_dir_from(|k| std::env::var_os(k).filter(|v| !v.is_empty()))
}

fn cache_dir_from(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    if let Some(dir) = get("FLOTILLA_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = get("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("flotilla");
    }
    if let Some(home) = get("HOME") {
        return PathBuf::from(home).join(".cache").join("flotilla");
    }
    // No home at all (a bare service environment): still somewhere writable.
    std::env::temp_dir().join("flotilla-cache")
}

/// Incremental SHA-256 over labelled parts, so that moving bytes from one
/// input to the next can never produce the same key.
pub(crate) struct KeyHasher(Sha256);

impl KeyHasher {
    pub(crate) fn new(domain: &str) -> Self {
        let mut h = KeyHasher(Sha256::new());
        h.part("domain", domain.as_bytes());
        h
    }

    pub(crate) fn part(&mut self, label: &str, bytes: &[u8]) -> &mut Self {
        for chunk in [label.as_bytes(), bytes] {
            self.0.update((chunk.len() as u64).to_le_bytes());
            self.0.update(chunk);
        }
        self
    }

    pub(crate) fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// SHA-256 of a file's contents, hex-encoded.
pub(crate) fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut f = File::open(path).ctx("open", path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).ctx("read", path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// An exclusive advisory lock on `<dir>/.lock`, held until dropped. Builds
/// of the same cache area from several processes take turns, so the second
/// one finds the first one's result instead of building it again.
pub(crate) struct DirLock {
    _lock: Flock<File>,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path) -> Result<Self, ImageError> {
        fs::create_dir_all(dir).ctx("create directory", dir)?;
        let path = dir.join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx("open lock file", &path)?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                // Say why we seem stuck: a kernel build can hold this for minutes.
                tracing::info!(dir = %dir.display(), "waiting for another build using this cache");
                Flock::lock(file, FlockArg::LockExclusive)
                    .map_err(|(_, errno)| ImageError::io("lock", &path, errno.into()))?
            }
            Err((_, errno)) => return Err(ImageError::io("lock", &path, errno.into())),
        };
        Ok(DirLock { _lock: lock })
    }
}

/// Removes `.tmp-*` leftovers of killed builds. Only call with the
/// directory's [`DirLock`] held: then no live build owns them.
pub(crate) fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing leftover of an interrupted build");
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// A fresh work directory inside `dir`, removed when dropped.
pub(crate) fn temp_dir_in(dir: &Path) -> Result<tempfile::TempDir, ImageError> {
    fs::create_dir_all(dir).ctx("create directory", dir)?;
    tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempdir_in(dir)
        .ctx("create temporary directory in", dir)
}

/// Flushes a file's or directory's contents and metadata to disk.
pub(crate) fn fsync_path(path: &Path) -> Result<(), ImageError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .ctx("fsync", path)
}

/// Syncs every file in `src` (one level), then renames `src` to `dst` and
/// syncs the parent, so `dst` is either absent or complete, even across a
/// power cut.
pub(crate) fn publish_dir(src: &Path, dst: &Path) -> Result<(), ImageError> {
    for entry in fs::read_dir(src).ctx("read directory", src)? {
        let entry = entry.ctx("read directory", src)?;
        if entry.file_type().ctx("stat", entry.path())?.is_file() {
            fsync_path(&entry.path())?;
        }
    }
    fsync_path(src)?;
    fs::rename(src, dst).ctx("rename into place", dst)?;
    if let Some(parent) = dst.parent() {
        fsync_path(parent)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsString;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn cache_dir_precedence() {
        let all = [
            ("FLOTILLA_CACHE_DIR", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(&all)), PathBuf::from("/c"));
        assert_eq!(cache_dir_from(env(&all[1..])), PathBuf::from("/x/flotilla"));
        assert_eq!(
            cache_dir_from(env(&all[2..])),
            PathBuf::from("/h/.cache/flotilla")
        );
    }

    #[test]
    fn key_parts_are_unambiguous() {
        let mut a = KeyHasher::new("t");
        a.part("x", b"ab").part("y", b"c");
        let mut b = KeyHasher::new("t");
        b.part("x", b"a").part("y", b"bc");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn publish_and_stale_cleanup() {
        let root = tempfile::tempdir().unwrap();
        let work = temp_dir_in(root.path()).unwrap();
        fs::write(work.path().join("f"), b"x").unwrap();
        let dst = root.path().join("entry");
        publish_dir(work.path(), &dst).unwrap();
        assert_eq!(fs::read(dst.join("f")).unwrap(), b"x");

        let stale = root.path().join(".tmp-killed");
        fs::create_dir(&stale).unwrap();
        let _lock = DirLock::acquire(root.path()).unwrap();
        remove_stale_temps(root.path());
        assert!(!stale.exists());
        assert!(dst.exists());
    }
}

//! Small filesystem helpers: fsync, hashing files, space used.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{IoContext, SnapshotError};

/// Read and write buffer size: large sequential I/O.
pub(crate) const IO_BUF: usize = 1 << 20;

/// Flushes a file's or directory's contents and metadata to disk.
pub(crate) fn fsync_path(path: &Path) -> Result<(), SnapshotError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .ctx("fsync", path)
}

/// Size and SHA-256 (hex) of a file.
pub(crate) fn hash_file(path: &Path) -> Result<(u64, String), SnapshotError> {
    let mut f = File::open(path).ctx("open", path)?;
    copy_hashing(&mut f, &mut io::sink()).ctx("read", path)
}

/// Copies `src` to `dst` (created), returning the size and SHA-256 of what
/// was copied; `dst` is synced.
pub(crate) fn copy_file_hashing(src: &Path, dst: &Path) -> Result<(u64, String), SnapshotError> {
    let mut from = File::open(src).ctx("open", src)?;
    let mut to = File::create_new(dst).ctx("create", dst)?;
    let sum = copy_hashing(&mut from, &mut to).ctx("copy to", dst)?;
    to.sync_all().ctx("fsync", dst)?;
    Ok(sum)
}

fn copy_hashing(from: &mut impl Read, to: &mut impl Write) -> io::Result<(u64, String)> {
    let mut buf = vec![0u8; IO_BUF];
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// Bytes of storage the files in `dir` (one level) occupy: allocated
/// blocks, not apparent sizes, since that is what removing them frees.
pub(crate) fn allocated_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

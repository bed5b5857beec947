//! A reproducible "newc" cpio writer for the initramfs.
//!
//! Written here rather than shelling out to `cpio` so the archive is
//! byte-identical across builds and hosts: entries sorted by path, every
//! owner root, fixed mtimes and inode numbers, and device nodes
//! (`/dev/console`) that an unprivileged builder could not `mknod`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};

/// What an archive entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    /// A regular file whose contents are read from this host path.
    File(PathBuf),
    Symlink(String),
    CharDev {
        major: u32,
        minor: u32,
    },
}

/// One archive member: a path relative to `/` (no leading slash).
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) path: String,
    pub(crate) mode: u32,
    pub(crate) kind: Kind,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Lists `root` recursively as entries (permission bits kept, owners and
/// times dropped).
pub(crate) fn entries_from_tree(root: &Path) -> Result<Vec<Entry>, ImageError> {
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> Result<(), ImageError> {
    for entry in fs::read_dir(dir).ctx("read directory", dir)? {
        let entry = entry.ctx("read directory", dir)?;
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .map_err(|_| ImageError::BadOutput {
                path: path.clone(),
                reason: "outside the rootfs tree".to_string(),
            })?
            .to_string_lossy()
            .into_owned();
        let meta = fs::symlink_metadata(&path).ctx("stat", &path)?;
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            out.push(Entry {
                path: rel,
                mode,
                kind: Kind::Dir,
            });
            walk(root, &path, out)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).ctx("read link", &path)?;
            out.push(Entry {
                path: rel,
                mode: 0o777,
                kind: Kind::Symlink(target.to_string_lossy().into_owned()),
            });
        } else if ft.is_file() {
            out.push(Entry {
                path: rel,
                mode,
                kind: Kind::File(path),
            });
        }
        // Sockets, fifos and device nodes in the tree are not ours: skip.
    }
    Ok(())
}

/// Writes `entries` as a newc archive, sorted by path so parents precede
/// children and the output does not depend on directory order.
pub(crate) fn write_newc(mut entries: Vec<Entry>, out: &mut impl Write) -> Result<(), ImageError> {
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries.dedup_by(|a, b| a.path == b.path);
    let wio = |e| ImageError::io("write", "<initrd cpio>", e);
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let (type_bits, data, nlink, rdev) = match &e.kind {
            Kind::Dir => (S_IFDIR, Vec::new(), 2, (0, 0)),
            Kind::File(src) => (S_IFREG, fs::read(src).ctx("read", src)?, 1, (0, 0)),
            Kind::Symlink(t) => (S_IFLNK, t.as_bytes().to_vec(), 1, (0, 0)),
            Kind::CharDev { major, minor } => (S_IFCHR, Vec::new(), 1, (*major, *minor)),
        };
        let header = Header {
            ino,
            mode: type_bits | (e.mode & 0o7777),
            nlink,
            filesize: data.len() as u32,
            rdev,
        };
        header.write(&e.path, out).map_err(wio)?;
        out.write_all(&data).map_err(wio)?;
        pad4(data.len(), out).map_err(wio)?;
    }
    Header {
        ino: 0,
        mode: 0,
        nlink: 1,
        filesize: 0,
        rdev: (0, 0),
    }
    .write("TRAILER!!!", out)
    .map_err(wio)?;
    Ok(())
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev: (u32, u32),
}

impl Header {
    fn write(&self, name: &str, out: &mut impl Write) -> std::io::Result<()> {
        let namesize = name.len() + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor
        // rdevmajor rdevminor namesize check: 13 fields of 8 hex digits.
        let fields = [
            self.ino,
            self.mode,
            0,
            0,
            self.nlink,
            0,
            self.filesize,
            0,
            0,
            self.rdev.0,
            self.rdev.1,
            namesize as u32,
            0,
        ];
        let mut h = String::with_capacity(110);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        out.write_all(h.as_bytes())?;
        out.write_all(name.as_bytes())?;
        out.write_all(&[0])?;
        pad4(110 + namesize, out)
    }
}

fn pad4(len: usize, out: &mut impl Write) -> std::io::Result<()> {
    let pad = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..pad])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample(dir: &Path) -> Vec<Entry> {
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/hello"), b"hi\n").unwrap();
        fs::set_permissions(dir.join("bin/hello"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("hello", dir.join("bin/hi")).unwrap();
        let mut e = entries_from_tree(dir).unwrap();
        e.push(Entry {
            path: "dev".into(),
            mode: 0o755,
            kind: Kind::Dir,
        });
        e.push(Entry {
            path: "dev/console".into(),
            mode: 0o600,
            kind: Kind::CharDev { major: 5, minor: 1 },
        });
        e
    }

    #[test]
    fn archive_lists_with_gnu_cpio_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let entries = sample(dir.path());
        let mut a = Vec::new();
        write_newc(entries.clone(), &mut a).unwrap();
        let mut reversed = entries;
        reversed.reverse();
        let mut b = Vec::new();
        write_newc(reversed, &mut b).unwrap();
        assert_eq!(a, b, "entry order must not matter");
        assert_eq!(a.len() % 4, 0);

        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&a).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" bin"));
        assert!(lines[1].starts_with("-rwxr-xr-x") && lines[1].contains(" root "));
        assert!(lines[2].starts_with("lrwxrwxrwx") && lines[2].ends_with("bin/hi -> hello"));
        assert!(lines[4].starts_with("crw-------") && lines[4].ends_with("dev/console"));
    }
}

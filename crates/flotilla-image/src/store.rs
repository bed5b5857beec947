//! The image store: a directory of named images, `<dir>/<name>/image.json`
//! plus the image's files.
//!
//! Registration assembles a complete image directory under a `.tmp-*` name
//! and swaps it in with one rename, so a crash at any point leaves either
//! the old image or the new one, never a half-registered one. Names never
//! start with a dot, so work directories are never listed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{renameat2, RenameFlags};
use serde::{Deserialize, Serialize};

use crate::cache::{self, DirLock};
use crate::cmd;
use crate::error::{ImageError, IoContext};
use crate::validate::{probe_disk, validate_initrd, validate_kernel, KernelFormat};

/// The name the built-in image is registered under.
pub const DEFAULT_IMAGE: &str = "default";

const IMAGE_JSON: &str = "image.json";
const MAX_NAME_LEN: usize = 63;

/// A registered image. Paths are absolute (resolved against the store);
/// `image.json` itself stores them relative to the image directory so a
/// store can be moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    /// "qcow2" or "raw" when there is a root disk.
    pub rootfs_format: Option<String>,
    /// Built by Flotilla itself (as opposed to registered by a user).
    pub builtin: bool,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub kernel_format: KernelFormat,
    /// Total apparent size of the image's files.
    pub size_bytes: u64,
}

/// A request to add an image to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterImage {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub builtin: bool,
    /// Overwrite an existing image of the same name.
    pub replace: bool,
}

/// A directory of named images.
#[derive(Clone, Debug)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// Opens (creating if needed) the store at `dir`.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        fs::create_dir_all(dir).ctx("create image store", dir)?;
        Ok(ImageStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All registered images, sorted by name. Work directories of
    /// in-progress or interrupted registrations are not listed; a corrupt
    /// entry is logged and skipped rather than hiding every other image.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut images = Vec::new();
        for name in self.names()? {
            match self.load(&name) {
                Ok(Some(img)) => images.push(img),
                Ok(None) => {}
                Err(e) => tracing::warn!(image = %name, error = %e, "skipping unreadable image"),
            }
        }
        Ok(images)
    }

    /// The image called `name`; [`ImageError::NotFound`] lists the
    /// available ones.
    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        validate_name(name)?;
        match self.load(name)? {
            Some(img) => Ok(img),
            None => Err(self.not_found(name)),
        }
    }

    /// Validates and copies (hard-links, for built-in images whose files
    /// are immutable cache artifacts) the files into the store, then makes
    /// the image visible atomically.
    pub fn register(&self, req: RegisterImage) -> Result<Image, ImageError> {
        validate_name(&req.name)?;
        let kernel_format = validate_kernel(&req.kernel)?;
        if let Some(initrd) = &req.initrd {
            validate_initrd(initrd)?;
        }
        let rootfs_format = req.rootfs.as_deref().map(probe_disk).transpose()?;

        let _lock = DirLock::acquire(&self.dir)?;
        let target = self.dir.join(&req.name);
        if target.join(IMAGE_JSON).is_file() && !req.replace {
            return Err(ImageError::AlreadyExists { name: req.name });
        }
        cache::remove_stale_temps(&self.dir);
        let work = cache::temp_dir_in(&self.dir)?;
        let stage = work.path().join("image");
        fs::create_dir(&stage).ctx("create directory", &stage)?;

        let kernel_name = match kernel_format {
            KernelFormat::ElfPvh => "vmlinux",
            KernelFormat::BzImage => "bzImage",
        };
        let mut size_bytes = place(&req.kernel, &stage.join(kernel_name), req.builtin)?;
        let mut record = Image {
            name: req.name.clone(),
            kernel: PathBuf::from(kernel_name),
            initrd: None,
            rootfs: None,
            rootfs_format: rootfs_format.map(|f| f.as_str().to_string()),
            builtin: req.builtin,
            created_at: rfc3339_utc(SystemTime::now()),
            kernel_format,
            size_bytes: 0,
        };
        if let Some(initrd) = &req.initrd {
            size_bytes += place(initrd, &stage.join("initrd"), req.builtin)?;
            record.initrd = Some(PathBuf::from("initrd"));
        }
        if let (Some(rootfs), Some(format)) = (&req.rootfs, rootfs_format) {
            let name = format!("rootfs.{}", format.as_str());
            size_bytes += place(rootfs, &stage.join(&name), req.builtin)?;
            record.rootfs = Some(PathBuf::from(name));
        }
        record.size_bytes = size_bytes;
        let json_path = stage.join(IMAGE_JSON);
        let json = serde_json::to_vec_pretty(&record).map_err(|e| ImageError::BadOutput {
            path: json_path.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&json_path, json).ctx("write", &json_path)?;

        swap_in(&stage, &target)?;
        // `stage` now holds the replaced image, if any; dropping `work`
        // deletes it.
        drop(work);
        Ok(resolve(record, &target))
    }

    /// Deletes the image called `name`. It disappears with one rename;
    /// its files are deleted afterwards.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        validate_name(name)?;
        let _lock = DirLock::acquire(&self.dir)?;
        let target = self.dir.join(name);
        if !target.join(IMAGE_JSON).is_file() {
            return Err(self.not_found(name));
        }
        let work = cache::temp_dir_in(&self.dir)?;
        let graveyard = work.path().join("removed");
        fs::rename(&target, &graveyard).ctx("remove image", &target)?;
        cache::fsync_path(&self.dir)?;
        drop(work);
        Ok(())
    }

    /// Directory names that could be images (valid names only).
    fn names(&self) -> Result<Vec<String>, ImageError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).ctx("read image store", &self.dir)? {
            let entry = entry.ctx("read image store", &self.dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_name(&name).is_ok() && entry.path().is_dir() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads `<name>/image.json`; `None` when there is none.
    fn load(&self, name: &str) -> Result<Option<Image>, ImageError> {
        let dir = self.dir.join(name);
        let path = dir.join(IMAGE_JSON);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io("read", path, e)),
        };
        let img: Image = serde_json::from_slice(&bytes)
            .map_err(|source| ImageError::Corrupt { path, source })?;
        Ok(Some(resolve(img, &dir)))
    }

    fn not_found(&self, name: &str) -> ImageError {
        let available = self
            .list()
            .map(|l| l.into_iter().map(|i| i.name).collect())
            .unwrap_or_default();
        ImageError::NotFound {
            name: name.to_string(),
            available,
        }
    }
}

/// Checks a name against `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let invalid = |reason: String| ImageError::InvalidName {
        name: name.to_string(),
        reason,
    };
    let Some(first) = name.chars().next() else {
        return Err(invalid("empty".to_string()));
    };
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "{} characters long, at most {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(invalid(format!("starts with {first:?}")));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(format!("contains {bad:?}")));
    }
    Ok(())
}

/// Puts `src` at `dst` read-only and returns its size. Built-in images are
/// hard-linked from the build cache (immutable, and often hundreds of MB);
/// user files are copied so later edits to them cannot change the image.
fn place(src: &Path, dst: &Path, link: bool) -> Result<u64, ImageError> {
    let size = fs::metadata(src).ctx("stat", src)?.len();
    let linked = link && fs::hard_link(src, dst).is_ok();
    if !linked {
        // cp keeps raw disks sparse and reflinks where the filesystem can.
        cmd::run(
            Command::new("cp")
                .args(["--reflink=auto", "--sparse=always", "--"])
                .arg(src)
                .arg(dst),
        )?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dst, fs::Permissions::from_mode(0o444)).ctx("chmod", dst)?;
    }
    Ok(size)
}

/// Makes `stage` visible as `target`: syncs it, then renames it over (or,
/// when `target` exists, atomically exchanges the two with RENAME_EXCHANGE,
/// leaving the old image at `stage`).
fn swap_in(stage: &Path, target: &Path) -> Result<(), ImageError> {
    for entry in fs::read_dir(stage).ctx("read directory", stage)? {
        let path = entry.ctx("read directory", stage)?.path();
        cache::fsync_path(&path)?;
    }
    cache::fsync_path(stage)?;
    if target.exists() {
        renameat2(None, stage, None, target, RenameFlags::RENAME_EXCHANGE)
            .map_err(|e| ImageError::io("replace image", target, e.into()))?;
    } else {
        fs::rename(stage, target).ctx("register image", target)?;
    }
    if let Some(parent) = target.parent() {
        cache::fsync_path(parent)?;
    }
    Ok(())
}

/// Turns the relative file names of `image.json` into absolute paths.
fn resolve(mut img: Image, dir: &Path) -> Image {
    img.kernel = absolute_in(dir, img.kernel);
    img.initrd = img.initrd.map(|p| absolute_in(dir, p));
    img.rootfs = img.rootfs.map(|p| absolute_in(dir, p));
    img
}

fn absolute_in(dir: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        dir.join(p)
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a system time (UTC).
pub(crate) fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01, computed in
/// 400-year eras (146 097 days each) starting on March 1st so leap days
/// fall at the end of a year.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // shift the epoch to 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of (March-based) year
    let mp = (5 * doy + 2) / 153; // March = 0
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

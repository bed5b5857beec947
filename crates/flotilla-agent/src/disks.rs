//! VM disks with `qemu-img`: a qcow2 overlay per VM on the image's read-only
//! base, and empty qcow2 data disks.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("could not run qemu-img: {0} (install qemu-utils)")]
    Spawn(#[from] std::io::Error),
    #[error("qemu-img {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("cannot read qemu-img's answer about {path}: {reason}")]
    BadInfo { path: PathBuf, reason: String },
}

fn qemu_img(args: &[&str]) -> Result<String, DiskError> {
    let out = Command::new("qemu-img").args(args).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DiskError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Format and virtual size (MiB) of an existing disk image.
pub fn inspect(path: &Path) -> Result<(String, u64), DiskError> {
    let p = path.to_string_lossy();
    let json = qemu_img(&["info", "--output=json", "-U", &p])?;
    let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| DiskError::BadInfo {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let format = v["format"].as_str().unwrap_or("raw").to_string();
    let size = v["virtual-size"]
        .as_u64()
        .ok_or_else(|| DiskError::BadInfo {
            path: path.to_path_buf(),
            reason: "no virtual-size".into(),
        })?;
    Ok((format, size / (1024 * 1024)))
}

/// Creates a qcow2 overlay at `path` whose reads fall through to `base`.
pub fn create_overlay(path: &Path, base: &Path, base_format: &str) -> Result<(), DiskError> {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        base_format,
        "-b",
        &base.to_string_lossy(),
        &path.to_string_lossy(),
    ])?;
    Ok(())
}

/// Points `path`'s backing file at `backing` without touching data (the
/// same contents under another path).
pub fn rebase_unsafe(path: &Path, backing: &Path, backing_format: &str) -> Result<(), DiskError> {
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-F",
        backing_format,
        "-b",
        &backing.to_string_lossy(),
        &path.to_string_lossy(),
    ])?;
    Ok(())
}

/// The virtual size of a disk image, in bytes.
pub fn virtual_size(path: &Path) -> Result<u64, DiskError> {
    let out = qemu_img(&["info", "-U", "--output=json", &path.to_string_lossy()])?;
    let info: serde_json::Value = serde_json::from_str(&out).map_err(|e| DiskError::BadInfo {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    info["virtual-size"]
        .as_u64()
        .ok_or_else(|| DiskError::BadInfo {
            path: path.to_path_buf(),
            reason: "no virtual-size".into(),
        })
}

/// Creates an empty qcow2 disk of exactly `bytes`.
pub fn create_blank_bytes(path: &Path, bytes: u64) -> Result<(), DiskError> {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &path.to_string_lossy(),
        &bytes.to_string(),
    ])?;
    Ok(())
}

/// Copies what `src` shows (its whole backing chain) into a standalone
/// qcow2 at `dst`.
pub fn convert_flat(src: &Path, dst: &Path) -> Result<(), DiskError> {
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "qcow2",
        &src.to_string_lossy(),
        &dst.to_string_lossy(),
    ])?;
    Ok(())
}

/// Creates an empty qcow2 disk of `size_mib`.
pub fn create_blank(path: &Path, size_mib: u64) -> Result<(), DiskError> {
    create_blank_bytes(path, size_mib << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_on_blank_base_reports_size() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        create_blank(&base, 32).unwrap();
        let overlay = dir.path().join("vm.qcow2");
        create_overlay(&overlay, &base, "qcow2").unwrap();
        assert_eq!(inspect(&overlay).unwrap(), ("qcow2".to_string(), 32));
    }
}

//! Building (or finding in the cache) the guest kernel: Debian's
//! linux-source tarball, `make tinyconfig` plus `guest/kernel/flotilla.config`,
//! `make vmlinux`.
//!
//! The cache key covers the config fragment, the source tarball's identity
//! and [`KERNEL_BUILDER_VERSION`], so editing any of them rebuilds.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cache::{self, DirLock, KeyHasher};
use crate::cmd;
use crate::error::{ImageError, IoContext};
use crate::progress::Progress;
use crate::validate::{validate_kernel, KernelFormat};

/// The kernel config fragment applied on top of `make tinyconfig`.
pub const KERNEL_CONFIG_FRAGMENT: &str = include_str!("../../../guest/kernel/flotilla.config");

/// Bump when the build recipe changes in a way the inputs do not show.
pub const KERNEL_BUILDER_VERSION: u32 = 1;

/// Default kernel source: Debian's `linux-source-6.1` package.
pub const DEFAULT_LINUX_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

/// The Debian package that ships [`DEFAULT_LINUX_SOURCE`].
const LINUX_SOURCE_PACKAGE: &str = "linux-source-6.1";

/// A kernel in the cache.
#[derive(Clone, Debug)]
pub(crate) struct CachedKernel {
    pub(crate) vmlinux: PathBuf,
    pub(crate) key: String,
}

/// The kernel tarball to build from: `$FLOTILLA_LINUX_SOURCE` or the
/// Debian default.
pub(crate) fn linux_source() -> PathBuf {
    std::env::var_os("FLOTILLA_LINUX_SOURCE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LINUX_SOURCE))
}

/// How the tarball is identified in the key: the Debian package version
/// when dpkg owns it (cheap, exact), else its size and mtime (hashing
/// 140 MB on every run would cost seconds).
fn source_identity(tarball: &Path) -> Result<String, ImageError> {
    let meta = fs::metadata(tarball).ctx(
        "find kernel source (apt-get install linux-source-6.1)",
        tarball,
    )?;
    if tarball == Path::new(DEFAULT_LINUX_SOURCE) {
        if let Ok(out) = cmd::run(
            Command::new("dpkg-query")
                .args(["-W", "-f=${Version}"])
                .arg(LINUX_SOURCE_PACKAGE),
        ) {
            let version = String::from_utf8_lossy(&out).trim().to_string();
            if !version.is_empty() {
                return Ok(format!("deb:{LINUX_SOURCE_PACKAGE}={version}"));
            }
        }
    }
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(format!("file:{}:{}:{mtime}", tarball.display(), meta.len()))
}

/// The kernel's cache key.
pub(crate) fn kernel_key(tarball: &Path) -> Result<String, ImageError> {
    let identity = source_identity(tarball)?;
    let mut h = KeyHasher::new("flotilla-kernel");
    h.part("builder", &KERNEL_BUILDER_VERSION.to_le_bytes())
        .part("fragment", KERNEL_CONFIG_FRAGMENT.as_bytes())
        .part("source", identity.as_bytes());
    Ok(h.finish())
}

/// Returns the cached kernel, building it first when missing.
pub(crate) fn ensure_kernel(
    cache_dir: &Path,
    tarball: &Path,
    jobs: usize,
    progress: Progress,
) -> Result<CachedKernel, ImageError> {
    let key = kernel_key(tarball)?;
    let area = cache_dir.join("kernel");
    let entry = area.join(&key);
    let vmlinux = entry.join("vmlinux");
    if is_complete(&vmlinux) {
        tracing::debug!(path = %vmlinux.display(), "kernel cache hit");
        return Ok(CachedKernel { vmlinux, key });
    }
    let _lock = DirLock::acquire(&area)?;
    // Another process may have built it while we waited for the lock.
    if is_complete(&vmlinux) {
        return Ok(CachedKernel { vmlinux, key });
    }
    cache::remove_stale_temps(&area);
    if entry.exists() {
        // Present but invalid: not ours to trust, rebuild.
        fs::remove_dir_all(&entry).ctx("remove broken cache entry", &entry)?;
    }
    let work = cache::temp_dir_in(&area)?;
    build(tarball, work.path(), jobs, progress).map_err(|e| keep_failed_config(e, &area, &key))?;
    cache::publish_dir(&work.path().join("out"), &entry)?;
    let step = progress.step("kernel: removing build tree");
    drop(work);
    step.done();
    Ok(CachedKernel { vmlinux, key })
}

/// The work tree is deleted on failure; keep a rejected .config next to the
/// cache entries so the missing options can be investigated.
fn keep_failed_config(err: ImageError, area: &Path, key: &str) -> ImageError {
    match err {
        ImageError::KernelConfig { config, missing } => {
            let kept = area.join(format!("failed-{key}.config"));
            let config = match fs::copy(&config, &kept) {
                Ok(_) => kept,
                Err(_) => config,
            };
            ImageError::KernelConfig { config, missing }
        }
        other => other,
    }
}

fn is_complete(vmlinux: &Path) -> bool {
    matches!(validate_kernel(vmlinux), Ok(KernelFormat::ElfPvh))
}

/// Extracts, configures, verifies and builds in `work`, leaving the
/// results in `work/out/{vmlinux,config}`.
fn build(tarball: &Path, work: &Path, jobs: usize, progress: Progress) -> Result<(), ImageError> {
    let step = progress.step("kernel: extracting source");
    cmd::run(
        Command::new("tar")
            .arg("-xf")
            .arg(tarball)
            .arg("-C")
            .arg(work),
    )?;
    let src = find_source_dir(work, tarball)?;
    step.done();

    let step = progress.step("kernel: configuring");
    let fragment = work.join("flotilla.config");
    fs::write(&fragment, KERNEL_CONFIG_FRAGMENT).ctx("write", &fragment)?;
    cmd::run(make(&src).arg("tinyconfig"))?;
    cmd::run(
        Command::new("sh")
            .arg("scripts/kconfig/merge_config.sh")
            .arg("-m")
            .arg(".config")
            .arg(&fragment)
            .current_dir(&src),
    )?;
    cmd::run(make(&src).arg("olddefconfig"))?;
    let config_path = src.join(".config");
    let config = fs::read_to_string(&config_path).ctx("read", &config_path)?;
    let missing = missing_options(KERNEL_CONFIG_FRAGMENT, &config);
    if !missing.is_empty() {
        return Err(ImageError::KernelConfig {
            config: config_path,
            missing,
        });
    }
    step.done();

    let step = progress.step(&format!("kernel: make -j{jobs} vmlinux"));
    cmd::run_streaming(make(&src).arg(format!("-j{jobs}")).arg("vmlinux"), |line| {
        step.message(line)
    })?;
    step.done();

    let out = work.join("out");
    fs::create_dir(&out).ctx("create directory", &out)?;
    let built = src.join("vmlinux");
    match validate_kernel(&built)? {
        KernelFormat::ElfPvh => {}
        other => {
            return Err(ImageError::BadOutput {
                path: built,
                reason: format!("expected a PVH ELF vmlinux, got {other:?}"),
            })
        }
    }
    fs::rename(&built, out.join("vmlinux")).ctx("move", &built)?;
    fs::copy(&config_path, out.join("config")).ctx("copy", &config_path)?;
    Ok(())
}

/// `make ARCH=x86_64` in `src`, insulated from the caller's environment
/// (a stray ARCH, CROSS_COMPILE or parent make's jobserver must not leak in)
/// and with fixed build stamps so rebuilds are comparable.
fn make(src: &Path) -> Command {
    let mut c = Command::new("make");
    c.current_dir(src).arg("ARCH=x86_64");
    for var in [
        "CROSS_COMPILE",
        "KCONFIG_CONFIG",
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
        "O",
    ] {
        c.env_remove(var);
    }
    c.env("KBUILD_BUILD_USER", "flotilla")
        .env("KBUILD_BUILD_HOST", "flotilla")
        .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01");
    c
}

/// The tarball's top-level directory (e.g. `linux-source-6.1`).
fn find_source_dir(work: &Path, tarball: &Path) -> Result<PathBuf, ImageError> {
    for entry in fs::read_dir(work).ctx("read directory", work)? {
        let path = entry.ctx("read directory", work)?.path();
        if path.join("Makefile").is_file() && path.join("scripts/kconfig").is_dir() {
            return Ok(path);
        }
    }
    Err(ImageError::BadOutput {
        path: tarball.to_path_buf(),
        reason: "the archive holds no kernel source tree (no top-level directory with a Makefile)"
            .into(),
    })
}

/// Options the fragment asks for that the final config lacks: `=y` lines
/// must be `=y`, "is not set" lines must not be enabled.
pub(crate) fn missing_options(fragment: &str, config: &str) -> Vec<String> {
    let values = parse_config(config);
    let mut missing = Vec::new();
    for (name, want) in parse_config(fragment) {
        let have = values.get(&name).map(String::as_str);
        let ok = match want.as_str() {
            "n" => !matches!(have, Some("y") | Some("m")),
            w => have == Some(w),
        };
        if !ok {
            missing.push(format!("{name}={want} (got {})", have.unwrap_or("unset")));
        }
    }
    missing
}

/// `CONFIG_X=v` lines and `# CONFIG_X is not set` (as "n"), by name.
fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") {
                    map.insert(name.to_string(), "n".to_string());
                }
            }
        } else if line.starts_with("CONFIG_") {
            if let Some((name, value)) = line.split_once('=') {
                map.insert(name.to_string(), value.to_string());
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_asks_for_the_essentials() {
        let wanted = parse_config(KERNEL_CONFIG_FRAGMENT);
        for opt in [
            "PVH",
            "VIRTIO_MMIO_CMDLINE_DEVICES",
            "VIRTIO_BLK",
            "VIRTIO_NET",
            "VIRTIO_CONSOLE",
            "SERIAL_8250_CONSOLE",
            "BLK_DEV_INITRD",
            "RD_GZIP",
            "EXT4_FS",
            "DEVTMPFS",
            "BINFMT_SCRIPT",
            "CGROUP_FREEZER",
            "USER_NS",
            "VETH",
            "BRIDGE",
            "RTC_DRV_CMOS",
        ] {
            assert_eq!(
                wanted.get(&format!("CONFIG_{opt}")).map(String::as_str),
                Some("y"),
                "{opt}"
            );
        }
        assert_eq!(wanted.get("CONFIG_MODULES").map(String::as_str), Some("n"));
    }

    #[test]
    fn dropped_options_are_listed() {
        let fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=y\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n";
        assert_eq!(
            missing_options(fragment, config),
            [
                "CONFIG_B=y (got n)",
                "CONFIG_C=n (got y)",
                "CONFIG_D=y (got unset)"
            ]
        );
        assert!(missing_options("CONFIG_A=y\n", "CONFIG_A=y\n").is_empty());
    }

    #[test]
    fn key_is_stable_and_tracks_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("linux.tar.xz");
        fs::write(&tar, b"x").unwrap();
        let a = kernel_key(&tar).unwrap();
        assert_eq!(a, kernel_key(&tar).unwrap());
        fs::write(&tar, b"xy").unwrap();
        assert_ne!(a, kernel_key(&tar).unwrap());
    }
}

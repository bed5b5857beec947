//! Tests for `build.rs`. The whole pipeline runs against a fake kernel
//! source tarball (a Makefile that "builds" a tiny PVH ELF in milliseconds),
//! so caching, atomic publishing and the config check are exercised on every
//! `cargo test`; the real kernel is built and booted by the image's users.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::*;
use crate::test_support::fake_pvh_kernel;
use crate::validate::{probe_disk, validate_initrd, validate_kernel, DiskFormat, KernelFormat};

/// Makes `<dir>/linux-fake.tar` whose Makefile answers `tinyconfig`,
/// `olddefconfig` and `vmlinux`. `merge` is the body of its
/// `scripts/kconfig/merge_config.sh` (called as `-m .config FRAGMENT`).
fn fake_linux_source(dir: &Path, merge: &str) -> PathBuf {
    let src = dir.join("linux-fake");
    fs::create_dir_all(src.join("scripts/kconfig")).unwrap();
    fs::write(
        src.join("Makefile"),
        "tinyconfig:\n\t@echo '# CONFIG_MODULES is not set' > .config\n\
         olddefconfig:\n\t@true\n\
         vmlinux:\n\t@echo '  CC      init/main.o'\n\t@cp vmlinux.prebuilt vmlinux\n",
    )
    .unwrap();
    let merge_path = src.join("scripts/kconfig/merge_config.sh");
    fs::write(&merge_path, format!("#!/bin/sh\n{merge}\n")).unwrap();
    fs::set_permissions(&merge_path, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(src.join("vmlinux.prebuilt"), fake_pvh_kernel()).unwrap();
    let tar = dir.join("linux-fake.tar");
    let ok = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(dir)
        .arg("linux-fake")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    fs::remove_dir_all(&src).unwrap();
    tar
}

fn options(cache: &Path) -> BuildOptions {
    let mut opts = BuildOptions::new(DEFAULT_BUSYBOX); // any static binary
    opts.cache_dir = cache.to_path_buf();
    opts.rootfs_size_mib = 32;
    opts.jobs = 1;
    opts
}

fn temp_entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(cache::TMP_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pipeline_builds_once_then_hits_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = Inputs {
        linux_source: fake_linux_source(dir.path(), "cat \"$3\" >> \"$2\""),
        busybox: PathBuf::from(DEFAULT_BUSYBOX),
    };
    let cache = dir.path().join("cache");
    let opts = options(&cache);

    let built = build_with(&opts, &inputs).unwrap();
    assert!(built
        .kernel
        .starts_with(cache.join("kernel").join(&built.kernel_key)));
    assert_eq!(
        validate_kernel(&built.kernel).unwrap(),
        KernelFormat::ElfPvh
    );
    assert!(cache
        .join("kernel")
        .join(&built.kernel_key)
        .join("config")
        .is_file());
    validate_initrd(&built.initrd).unwrap();
    assert_eq!(probe_disk(&built.rootfs).unwrap(), DiskFormat::Qcow2);
    assert!(built
        .initrd
        .starts_with(cache.join("images").join(&built.key)));
    assert!(temp_entries(&cache.join("kernel")).is_empty());
    assert!(temp_entries(&cache.join("images")).is_empty());

    // Second run: same answer from the cache, without running anything.
    let started = Instant::now();
    assert_eq!(build_with(&opts, &inputs).unwrap(), built);
    assert!(started.elapsed().as_secs() < 5);

    // A different rootfs size is a different image on the same kernel.
    let mut bigger = opts.clone();
    bigger.rootfs_size_mib = 48;
    let other = build_with(&bigger, &inputs).unwrap();
    assert_eq!(other.kernel_key, built.kernel_key);
    assert_ne!(other.key, built.key);

    let request = built.register_request(crate::DEFAULT_IMAGE);
    let store = crate::ImageStore::open(&dir.path().join("store")).unwrap();
    let image = store.register(request).unwrap();
    assert!(image.builtin);
    assert_eq!(image.rootfs_format.as_deref(), Some("qcow2"));
}

#[test]
fn dropped_kernel_option_fails_the_build_with_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = Inputs {
        // Like an unmet Kconfig dependency: PVH silently vanishes.
        linux_source: fake_linux_source(dir.path(), "grep -v '^CONFIG_PVH=' \"$3\" >> \"$2\""),
        busybox: PathBuf::from(DEFAULT_BUSYBOX),
    };
    let cache = dir.path().join("cache");
    let err = build_with(&options(&cache), &inputs).unwrap_err();
    let ImageError::KernelConfig { config, missing } = &err else {
        panic!("{err}");
    };
    assert_eq!(missing, &["CONFIG_PVH=y (got unset)"]);
    assert!(
        config.is_file(),
        "the rejected config is kept: {}",
        config.display()
    );
    assert!(err.to_string().contains("CONFIG_PVH=y"));
    // Nothing that looks like a finished kernel, and no work tree left.
    let entries: Vec<_> = fs::read_dir(cache.join("kernel"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert!(entries.is_empty());
}

#[test]
fn failing_make_reports_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = Inputs {
        linux_source: fake_linux_source(dir.path(), "echo 'merge exploded' >&2; exit 7"),
        busybox: PathBuf::from(DEFAULT_BUSYBOX),
    };
    let err = build_with(&options(&dir.path().join("cache")), &inputs).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::Command { .. }), "{msg}");
    assert!(
        msg.contains("merge_config.sh") && msg.contains("merge exploded"),
        "{msg}"
    );
}

#[test]
fn bad_agent_fails_before_any_build() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = BuildOptions::new("/bin/sh");
    opts.cache_dir = dir.path().to_path_buf();
    let err = build_default(&opts).unwrap_err();
    assert!(matches!(err, ImageError::InvalidAgent { .. }), "{err}");
    assert!(!dir.path().join("kernel").exists());
}

#[test]
fn initrd_contents_and_reproducibility() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    rootfs::assemble_tree(
        &tree,
        Path::new(DEFAULT_BUSYBOX),
        Path::new(DEFAULT_BUSYBOX),
    )
    .unwrap();
    let initrd = dir.path().join("a.gz");
    rootfs::write_initrd(&tree, &initrd).unwrap();
    let again = dir.path().join("b.gz");
    rootfs::write_initrd(&tree, &again).unwrap();
    assert_eq!(
        fs::read(&initrd).unwrap(),
        fs::read(&again).unwrap(),
        "initrd must be reproducible"
    );

    let listing = Command::new("sh")
        .arg("-c")
        .arg(format!("cpio -t --quiet < {}", initrd.display()))
        .output()
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    for path in [
        "init",
        "sbin/init",
        "sbin/flotilla-guest-agent",
        "bin/busybox",
        "bin/sh",
        "dev/console",
        "etc/passwd",
    ] {
        assert!(
            listing.lines().any(|l| l == path),
            "{path} missing from initrd"
        );
    }
}

#[test]
fn uuid_shape() {
    let u = uuid_from_key("0123456789abcdef0123456789abcdefffff");
    assert_eq!(u, "01234567-89ab-cdef-0123-456789abcdef");
}

//! Tests for `validate.rs`: hand-made ELF files (with and without a PVH
//! note, truncated, wrong machine), fake bzImages, initrds, disks, agents,
//! and the real kernel when the cache has one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::test_support::{fake_elf, note};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

fn kernel_err(path: &Path) -> String {
    let err = validate_kernel(path).unwrap_err();
    assert!(matches!(err, ImageError::NotAKernel { .. }), "{err:?}");
    let msg = err.to_string();
    // Every rejection says what would have been accepted.
    assert!(
        msg.contains("Accepted: an uncompressed x86-64 ELF vmlinux"),
        "{msg}"
    );
    assert!(msg.contains("bzImage"), "{msg}");
    msg
}

#[test]
fn elf_with_pvh_note_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut notes = note(1); // an unrelated Xen note first
    notes.extend(note(18));
    let p = write(dir.path(), "vmlinux", &fake_elf(2, 62, Some(&notes)));
    assert_eq!(validate_kernel(&p).unwrap(), KernelFormat::ElfPvh);
}

#[test]
fn elf_without_pvh_note_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "nonote", &fake_elf(2, 62, Some(&note(1))));
    let msg = kernel_err(&p);
    assert!(msg.contains("without a PVH entry note"), "{msg}");
    assert!(msg.contains("CONFIG_PVH=y"), "{msg}");

    let p = write(dir.path(), "nonotes", &fake_elf(2, 62, None));
    assert!(kernel_err(&p).contains("without a PVH entry note"));
}

#[test]
fn truncated_elf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let full = fake_elf(2, 62, Some(&note(18)));
    let p = write(dir.path(), "short-header", &full[..40]);
    assert!(kernel_err(&p).contains("truncated ELF"));
    let p = write(dir.path(), "short-notes", &full[..130]);
    let msg = kernel_err(&p);
    assert!(msg.contains("truncated ELF"), "{msg}");
    assert!(msg.contains("note segment"), "{msg}");
}

#[test]
fn wrong_elf_kinds_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "arm64", &fake_elf(2, 183, Some(&note(18))));
    assert!(kernel_err(&p).contains("AArch64"));
    let p = write(dir.path(), "elf32", &fake_elf(1, 3, None));
    assert!(kernel_err(&p).contains("32-bit ELF"));
}

#[test]
fn text_and_empty_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "notes.txt", b"this is not a kernel\n");
    let msg = kernel_err(&p);
    assert!(msg.contains("neither an ELF file nor a bzImage"), "{msg}");
    assert!(msg.contains("74 68 69 73"), "{msg}"); // "this"
    let p = write(dir.path(), "empty", b"");
    assert!(kernel_err(&p).contains("empty"));
}

#[test]
fn missing_kernel_is_an_io_error() {
    let err = validate_kernel(Path::new("/nonexistent/vmlinux")).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/vmlinux"));
}

#[test]
fn bzimage_header_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = vec![0u8; 0x1000];
    b[0x202..0x206].copy_from_slice(b"HdrS");
    let p = write(dir.path(), "bzImage", &b);
    assert_eq!(validate_kernel(&p).unwrap(), KernelFormat::BzImage);
}

/// Validates the real kernels in the build cache (`scripts/setup`, which
/// `scripts/test` runs first, builds one; the image pipeline's own tests do
/// not, as that takes minutes).
#[test]
fn real_vmlinux_from_the_cache() {
    let kernels = crate::cache::default_cache_dir().join("kernel");
    let entries = fs::read_dir(&kernels).unwrap_or_else(|e| {
        panic!(
            "no kernel cache at {} ({e}): run scripts/setup first",
            kernels.display()
        )
    });
    let mut checked = 0;
    for entry in entries.flatten() {
        let vmlinux = entry.path().join("vmlinux");
        if vmlinux.is_file() {
            checked += 1;
            assert_eq!(validate_kernel(&vmlinux).unwrap(), KernelFormat::ElfPvh);
            // Its first MiB alone is a truncated ELF, not a kernel.
            let dir = tempfile::tempdir().unwrap();
            let bytes = fs::read(&vmlinux).unwrap();
            let p = write(dir.path(), "cut", &bytes[..1 << 20]);
            assert!(kernel_err(&p).contains("truncated ELF"));
        }
    }
    assert!(
        checked > 0,
        "no built kernel under {}: run scripts/setup first",
        kernels.display()
    );
}

#[test]
fn initrd_magic() {
    let dir = tempfile::tempdir().unwrap();
    let gz = write(dir.path(), "a.gz", &[0x1f, 0x8b, 8, 0, 0, 0]);
    validate_initrd(&gz).unwrap();
    let cpio = write(dir.path(), "a.cpio", b"070701000000");
    validate_initrd(&cpio).unwrap();
    let bad = write(dir.path(), "bad", b"hello world");
    let msg = validate_initrd(&bad).unwrap_err().to_string();
    assert!(
        msg.contains("not an initrd") && msg.contains("cpio"),
        "{msg}"
    );
}

#[test]
fn disk_formats() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("disk.raw");
    let qcow = d.join("disk.qcow2");
    let overlay = d.join("overlay.qcow2");
    for args in [
        vec!["create", "-q", "-f", "raw", raw.to_str().unwrap(), "1M"],
        vec!["create", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "1M"],
        vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            qcow.to_str().unwrap(),
            "-F",
            "qcow2",
            overlay.to_str().unwrap(),
        ],
    ] {
        assert!(Command::new("qemu-img")
            .args(&args)
            .status()
            .unwrap()
            .success());
    }
    assert_eq!(probe_disk(&raw).unwrap(), DiskFormat::Raw);
    assert_eq!(probe_disk(&qcow).unwrap(), DiskFormat::Qcow2);
    let msg = probe_disk(&overlay).unwrap_err().to_string();
    assert!(msg.contains("backing file"), "{msg}");
    let tiny = write(d, "tiny", b"not a disk");
    assert!(matches!(
        probe_disk(&tiny),
        Err(ImageError::InvalidDisk { .. })
    ));
}

#[test]
fn guest_agent_must_be_static_x86_64() {
    // Debian's busybox-static is exactly the kind of binary the guest runs.
    validate_guest_agent(Path::new("/bin/busybox")).unwrap();
    let msg = validate_guest_agent(Path::new("/bin/sh"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("dynamically linked"), "{msg}");
    let dir = tempfile::tempdir().unwrap();
    let script = write(dir.path(), "agent.sh", b"#!/bin/sh\n");
    let msg = validate_guest_agent(&script).unwrap_err().to_string();
    assert!(msg.contains("not an ELF"), "{msg}");
}

#[test]
fn kernel_format_names_match_serde() {
    for f in [KernelFormat::ElfPvh, KernelFormat::BzImage] {
        assert_eq!(serde_json::to_string(&f).unwrap(), format!("\"{f}\""));
    }
}

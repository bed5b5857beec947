//! Layers that carry a disk file (any small file stands in for a qcow2).

use std::fs;
use std::os::unix::fs::MetadataExt;

use flotilla_snapshot::{NewLayer, SnapshotError, DISK_FILE};
use sha2::{Digest, Sha256};

use crate::common::*;

fn memory(fx: &Fixture) -> std::path::PathBuf {
    let mem = fx.path("mem");
    sparse_image(&mem, MIB);
    fill(&mem, [0, 9], 0);
    mem
}

#[test]
fn the_disk_is_moved_in_and_checked() {
    let fx = Fixture::new();
    let mem = memory(&fx);
    let disk = fx.path("overlay.qcow2");
    let contents = b"QFI\xfb stand-in for a qcow2 overlay".repeat(100);
    fs::write(&disk, &contents).unwrap();

    let m = fx
        .store
        .create_layer(NewLayer::full(&mem).with_disk(&disk))
        .unwrap();
    assert!(!disk.exists(), "moved, not copied");
    let entry = m.disk.clone().unwrap();
    assert_eq!(entry.file, DISK_FILE);
    assert_eq!(entry.size, contents.len() as u64);
    assert_eq!(entry.sha256, hex::encode(Sha256::digest(&contents)));
    let stored = fx.store.disk_path(&m.id).unwrap();
    assert_eq!(stored, fx.layer_dir(&m.id).join(DISK_FILE));
    assert_eq!(fs::read(&stored).unwrap(), contents);
    fx.store.verify(&m.id).unwrap();

    // A diff layer with its own disk; the chain verifies both.
    let disk2 = fx.path("overlay2.qcow2");
    fs::write(&disk2, b"second overlay").unwrap();
    let top = fx
        .store
        .create_layer(NewLayer::diff(&m.id, &mem, Some(&mem)).with_disk(&disk2))
        .unwrap();
    fx.store.verify(&top.id).unwrap();

    // Damage to the root's disk shows up when the leaf's chain is verified.
    fs::write(&stored, b"QFI\xfb something else").unwrap();
    assert_corrupt(fx.store.verify(&top.id).unwrap_err(), &m.id);
    fs::remove_file(&stored).unwrap();
    let err = fx.store.verify(&m.id).unwrap_err();
    assert!(err.to_string().contains("disk.qcow2 is missing"), "{err}");
    assert!(fx.store.disk_path(&m.id).is_none());
}

#[test]
fn layers_without_a_disk_have_no_disk_path() {
    let fx = Fixture::new();
    let m = fx.store.create_layer(NewLayer::full(&memory(&fx))).unwrap();
    assert!(m.disk.is_none());
    assert!(fx.store.disk_path(&m.id).is_none());
}

#[test]
fn a_failed_create_leaves_the_disk_where_it_was() {
    let fx = Fixture::new();
    let disk = fx.path("overlay.qcow2");
    fs::write(&disk, b"keep me").unwrap();
    let empty = fx.path("empty");
    fs::write(&empty, b"").unwrap();
    assert!(fx
        .store
        .create_layer(NewLayer::full(&empty).with_disk(&disk))
        .is_err());
    assert_eq!(fs::read(&disk).unwrap(), b"keep me");

    let link = fx.path("link.qcow2");
    std::os::unix::fs::symlink(&disk, &link).unwrap();
    let err = fx
        .store
        .create_layer(NewLayer::full(&memory(&fx)).with_disk(&link))
        .unwrap_err();
    assert!(matches!(err, SnapshotError::InvalidInput { .. }), "{err:?}");
    assert_eq!(fs::read(&disk).unwrap(), b"keep me");
    assert!(fx.store.list().unwrap().is_empty());
}

#[test]
fn a_disk_on_another_filesystem_is_copied_then_removed() {
    let fx = Fixture::new();
    let shm = std::path::Path::new("/dev/shm");
    let same_fs = |p: &std::path::Path| fs::metadata(p).map(|m| m.dev()).ok();
    if same_fs(shm).is_none() || same_fs(shm) == same_fs(fx.dir.path()) {
        eprintln!("no second filesystem at /dev/shm; the copy path is not exercised");
        return;
    }
    let other = tempfile::tempdir_in(shm).unwrap();
    let disk = other.path().join("overlay.qcow2");
    fs::write(&disk, b"from tmpfs").unwrap();
    let m = fx
        .store
        .create_layer(NewLayer::full(&memory(&fx)).with_disk(&disk))
        .unwrap();
    assert!(!disk.exists());
    assert_eq!(
        fs::read(fx.store.disk_path(&m.id).unwrap()).unwrap(),
        b"from tmpfs"
    );
    fx.store.verify(&m.id).unwrap();
}

#[test]
fn a_disk_base_is_pinned_while_a_layer_sits_on_it() {
    let fx = Fixture::new();
    let mem = memory(&fx);
    let image_root = fx.path("image-root.qcow2");
    fs::write(&image_root, b"QFI\xfb the image's root disk").unwrap();
    let pinned = fx.store.pin_path_for(&image_root).unwrap();
    assert!(pinned.starts_with(fx.store.root()));
    // A hard link of the same file maps to the same pinned base.
    let link = fx.path("vm-base.qcow2");
    fs::hard_link(&image_root, &link).unwrap();
    assert_eq!(fx.store.pin_path_for(&link).unwrap(), pinned);

    let disk = fx.path("overlay.qcow2");
    fs::write(&disk, b"overlay").unwrap();
    let mut req = NewLayer::full(&mem).with_disk(&disk);
    req.pins.insert("disk-base".into(), &link);
    let m = fx.store.create_layer(req).unwrap();
    assert_eq!(fx.store.pinned_path(&m, "disk-base"), Some(pinned.clone()));
    assert_eq!(
        fs::metadata(&pinned).unwrap().ino(),
        fs::metadata(&image_root).unwrap().ino()
    );

    // The VM and the image go; the layer's base stays, until the layer goes.
    fs::remove_file(&image_root).unwrap();
    fs::remove_file(&link).unwrap();
    fx.store.add_ref(&m.id, "vm:a").unwrap();
    fx.store.gc().unwrap();
    assert!(pinned.exists());
    fx.store.remove_ref(&m.id, "vm:a").unwrap();
    fx.store.gc().unwrap();
    assert!(!pinned.exists(), "no layer needs the base any more");
}

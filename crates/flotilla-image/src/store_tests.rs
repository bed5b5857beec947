//! Tests for `store.rs`: register, list, get, remove, duplicates, names,
//! NotFound with the available list, replacement and crash leftovers.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use super::*;
use crate::test_support::fake_pvh_kernel;

struct Fixture {
    _dir: tempfile::TempDir,
    store: ImageStore,
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let kernel = src.join("vmlinux");
    fs::write(&kernel, fake_pvh_kernel()).unwrap();
    let initrd = src.join("initrd.gz");
    fs::write(&initrd, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).unwrap();
    let disk = src.join("disk.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let store = ImageStore::open(&dir.path().join("images")).unwrap();
    Fixture {
        _dir: dir,
        store,
        kernel,
        initrd,
        disk,
    }
}

fn req(f: &Fixture, name: &str) -> RegisterImage {
    RegisterImage {
        name: name.to_string(),
        kernel: f.kernel.clone(),
        initrd: Some(f.initrd.clone()),
        rootfs: Some(f.disk.clone()),
        builtin: false,
        replace: false,
    }
}

fn names(store: &ImageStore) -> Vec<String> {
    store.list().unwrap().into_iter().map(|i| i.name).collect()
}

#[test]
fn register_get_list_remove() {
    let f = fixture();
    assert!(f.store.list().unwrap().is_empty());
    let img = f.store.register(req(&f, "alpine-3.20")).unwrap();
    assert_eq!(img.kernel_format, KernelFormat::ElfPvh);
    assert_eq!(img.rootfs_format.as_deref(), Some("qcow2"));
    assert!(img.kernel.is_absolute() && img.kernel.starts_with(f.store.dir()));
    assert_eq!(fs::read(&img.kernel).unwrap(), fake_pvh_kernel());
    assert!(img.rootfs.as_ref().unwrap().is_file());
    assert!(img.size_bytes > 0);
    assert_eq!(img.created_at.len(), 20, "{}", img.created_at);

    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(f.store.dir().join("alpine-3.20/image.json")).unwrap())
            .unwrap();
    assert_eq!(
        json["kernel"], "vmlinux",
        "image.json keeps store-relative paths"
    );
    assert_eq!(json["kernel_format"], "elf_pvh");

    assert_eq!(f.store.get("alpine-3.20").unwrap(), img);
    f.store.register(req(&f, "0-minimal")).unwrap();
    assert_eq!(names(&f.store), ["0-minimal", "alpine-3.20"]);

    f.store.remove("alpine-3.20").unwrap();
    assert_eq!(names(&f.store), ["0-minimal"]);
    assert!(!f.store.dir().join("alpine-3.20").exists());
    let leftovers: Vec<_> = fs::read_dir(f.store.dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn kernel_only_image() {
    let f = fixture();
    let mut r = req(&f, "bare");
    r.initrd = None;
    r.rootfs = None;
    let img = f.store.register(r).unwrap();
    assert_eq!(
        (img.initrd, img.rootfs, img.rootfs_format),
        (None, None, None)
    );
}

#[test]
fn duplicate_needs_replace() {
    let f = fixture();
    let first = f.store.register(req(&f, "web")).unwrap();
    let err = f.store.register(req(&f, "web")).unwrap_err();
    assert!(
        matches!(&err, ImageError::AlreadyExists { name } if name == "web"),
        "{err}"
    );
    assert!(err.to_string().contains("replace"));

    let mut again = req(&f, "web");
    again.replace = true;
    again.rootfs = None;
    let second = f.store.register(again).unwrap();
    assert_eq!(second.rootfs, None);
    assert_ne!(first.rootfs, None);
    assert_eq!(f.store.get("web").unwrap(), second);
    assert!(
        !f.store.dir().join("web/rootfs.qcow2").exists(),
        "old files went with the old image"
    );
}

#[test]
fn invalid_names_are_rejected() {
    let f = fixture();
    let long = "a".repeat(64);
    for bad in [
        "",
        "Upper",
        "-dash",
        ".hidden",
        "a/b",
        "sp ace",
        "../x",
        long.as_str(),
    ] {
        let err = f.store.register(req(&f, bad)).unwrap_err();
        assert!(
            matches!(err, ImageError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
        assert!(err.to_string().contains("[a-z0-9]"), "{err}");
    }
    for good in ["a", "0", "ubuntu-24.04_min", &"b".repeat(63)] {
        validate_name(good).unwrap();
    }
}

#[test]
fn not_found_lists_available() {
    let f = fixture();
    let err = f.store.get("nope").unwrap_err();
    assert!(err.to_string().contains("available: none"), "{err}");
    f.store.register(req(&f, "b")).unwrap();
    f.store.register(req(&f, "a")).unwrap();
    match f.store.get("nope").unwrap_err() {
        ImageError::NotFound { name, available } => {
            assert_eq!(name, "nope");
            assert_eq!(available, ["a", "b"]);
        }
        other => panic!("{other}"),
    }
    assert!(matches!(
        f.store.remove("nope"),
        Err(ImageError::NotFound { .. })
    ));
}

#[test]
fn bad_files_are_rejected_before_anything_is_stored() {
    let f = fixture();
    let text = f.store.dir().parent().unwrap().join("src/readme.txt");
    fs::write(&text, "hello").unwrap();
    let mut r = req(&f, "k");
    r.kernel = text.clone();
    assert!(matches!(
        f.store.register(r),
        Err(ImageError::NotAKernel { .. })
    ));
    let mut r = req(&f, "i");
    r.initrd = Some(text.clone());
    assert!(matches!(
        f.store.register(r),
        Err(ImageError::NotAnInitrd { .. })
    ));
    let mut r = req(&f, "d");
    r.rootfs = Some(text);
    assert!(matches!(
        f.store.register(r),
        Err(ImageError::InvalidDisk { .. })
    ));
    assert!(f.store.list().unwrap().is_empty());
}

/// What a crash mid-registration leaves behind (a `.tmp-*` work directory,
/// or an image directory without image.json) is never listed, and the next
/// registration clears the work directory away.
#[test]
fn interrupted_registration_is_invisible() {
    let f = fixture();
    let tmp = f.store.dir().join(".tmp-crashed");
    fs::create_dir_all(tmp.join("image")).unwrap();
    fs::write(tmp.join("image/image.json"), "{}").unwrap();
    fs::create_dir(f.store.dir().join("half")).unwrap();
    fs::write(f.store.dir().join("half/vmlinux"), fake_pvh_kernel()).unwrap();
    assert!(f.store.list().unwrap().is_empty());
    assert!(matches!(
        f.store.get("half"),
        Err(ImageError::NotFound { .. })
    ));

    // A half directory does not count as a duplicate.
    f.store.register(req(&f, "half")).unwrap();
    assert_eq!(names(&f.store), ["half"]);
    assert!(!tmp.exists());
}

#[test]
fn corrupt_entry_does_not_hide_the_others() {
    let f = fixture();
    f.store.register(req(&f, "good")).unwrap();
    fs::create_dir(f.store.dir().join("bad")).unwrap();
    fs::write(f.store.dir().join("bad/image.json"), "{not json").unwrap();
    assert_eq!(names(&f.store), ["good"]);
    assert!(matches!(
        f.store.get("bad"),
        Err(ImageError::Corrupt { .. })
    ));
}

#[test]
fn builtin_images_are_hard_linked() {
    use std::os::unix::fs::MetadataExt;
    let f = fixture();
    let mut r = req(&f, DEFAULT_IMAGE);
    r.builtin = true;
    let img = f.store.register(r).unwrap();
    assert!(img.builtin);
    let a = fs::metadata(&f.disk).unwrap();
    let b = fs::metadata(img.rootfs.unwrap()).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
}

#[test]
fn rfc3339_dates() {
    use std::time::Duration;
    let at = |s: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s));
    assert_eq!(at(0), "1970-01-01T00:00:00Z");
    assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
    assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00Z");
}

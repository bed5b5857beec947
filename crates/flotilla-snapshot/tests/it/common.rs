//! Shared helpers: a store in a temporary directory and sparse memory images
//! whose pages have recognisable, seed-dependent contents.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use flotilla_snapshot::{SnapshotError, SnapshotStore, PAGE_SIZE};

pub const P: u64 = PAGE_SIZE;
pub const MIB: u64 = 1 << 20;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub store: SnapshotStore,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(&dir.path().join("store")).unwrap();
        Fixture { dir, store }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn layer_dir(&self, id: &flotilla_snapshot::LayerId) -> PathBuf {
        self.path("store").join("layers").join(id.as_str())
    }
}

/// The contents of page `page` for `seed`: never all zero, different for
/// every (page, seed).
pub fn page_bytes(page: u64, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; P as usize];
    bytes[..8].copy_from_slice(&page.to_le_bytes());
    bytes[8..16].copy_from_slice(&seed.to_le_bytes());
    let fill = (page.wrapping_mul(31).wrapping_add(seed) as u8) | 1;
    bytes[16..].fill(fill);
    bytes
}

/// A sparse file of `size` bytes (all holes).
pub fn sparse_image(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// Writes `page_bytes(page, seed)` to each page.
pub fn fill(path: &Path, pages: impl IntoIterator<Item = u64>, seed: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    for page in pages {
        f.write_all_at(&page_bytes(page, seed), page * P).unwrap();
    }
}

/// Writes zeros over each page (allocated zeros, not holes).
pub fn zero(path: &Path, pages: impl IntoIterator<Item = u64>) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    for page in pages {
        f.write_all_at(&[0; P as usize], page * P).unwrap();
    }
}

/// Byte-for-byte equality, read in chunks.
pub fn assert_same(a: &Path, b: &Path) {
    let (ma, mb) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap());
    assert_eq!(
        ma.len(),
        mb.len(),
        "{} vs {}: sizes differ",
        a.display(),
        b.display()
    );
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        assert_eq!(n, m);
        if n == 0 {
            break;
        }
        if ba[..n] != bb[..n] {
            let at = (0..n).find(|&i| ba[i] != bb[i]).unwrap() as u64 + offset;
            panic!(
                "{} and {} differ at byte {at} (page {})",
                a.display(),
                b.display(),
                at / P
            );
        }
        offset += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    done
}

/// Bytes of storage a file occupies.
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Asserts `err` is `Corrupt` about `id` and its message names the layer.
pub fn assert_corrupt(err: SnapshotError, id: &flotilla_snapshot::LayerId) {
    let msg = err.to_string();
    match err {
        SnapshotError::Corrupt { id: got, .. } => assert_eq!(&got, id, "{msg}"),
        other => panic!("expected Corrupt for {id}, got {other:?}"),
    }
    assert!(msg.contains(id.as_str()), "{msg}");
}

//! Interrupted work: leftovers of a crash are never taken for layers and are
//! cleaned up by the next `open`, including after SIGKILL mid-create.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_snapshot::{LayerId, NewLayer, SnapshotStore};

use crate::common::*;

const WORKER_ENV: &str = "FLOTILLA_SNAPSHOT_CRASH_WORKER";
const WORKER_TEST: &str = "crash::sigkill_mid_create_never_leaves_a_half_layer";

fn layer_entries(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root.join("layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_leftover_work_directory_is_ignored_and_cleaned() {
    let fx = Fixture::new();
    let mem = fx.path("mem");
    sparse_image(&mem, MIB);
    fill(&mem, [1], 0);
    let real = fx.store.create_layer(NewLayer::full(&mem)).unwrap();

    // What a crash mid-create leaves: a work directory with a complete-looking
    // manifest copied from a real layer.
    let root = fx.path("store");
    let fake = LayerId::generate();
    let leftover = root.join("layers").join(format!(".tmp-{fake}"));
    fs::create_dir(&leftover).unwrap();
    for file in ["manifest.json", "memory.data"] {
        fs::copy(fx.layer_dir(&real.id).join(file), leftover.join(file)).unwrap();
    }
    fs::create_dir(
        root.join("layers")
            .join(format!(".tmp-rm-{}", LayerId::generate())),
    )
    .unwrap();

    let ids: Vec<_> = fx.store.list().unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![real.id.clone()]);
    assert!(fx.store.get(&fake).is_err());

    SnapshotStore::open(&root).unwrap();
    assert_eq!(layer_entries(&root), vec![real.id.to_string()]);
}

#[test]
fn sigkill_mid_create_never_leaves_a_half_layer() {
    if let Ok(root) = std::env::var(WORKER_ENV) {
        worker(Path::new(&root));
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let (mut leftovers_seen, mut rounds_with_layers) = (0, 0);
    // Complete layers never change: check each once (whole chain).
    let mut verified = std::collections::BTreeSet::new();
    for round in 0..8u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([WORKER_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(WORKER_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + round * 97));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        if !root.join("layers").exists() {
            continue;
        }
        if layer_entries(&root).iter().any(|n| n.starts_with(".tmp-")) {
            leftovers_seen += 1;
        }
        let store = SnapshotStore::open(&root).unwrap();
        assert!(
            !layer_entries(&root).iter().any(|n| n.starts_with(".tmp-")),
            "open left work directories behind"
        );
        let layers = store.list().unwrap();
        assert_eq!(
            layers.len(),
            layer_entries(&root).len(),
            "every layer directory reads"
        );
        for m in layers.iter().filter(|m| verified.insert(m.id.clone())) {
            store.verify(&m.id).unwrap();
            if m.disk.is_some() {
                assert!(store.disk_path(&m.id).is_some());
            }
        }
        rounds_with_layers += usize::from(!layers.is_empty());
    }
    eprintln!("{rounds_with_layers} rounds with layers, {leftovers_seen} with interrupted work");
    assert!(rounds_with_layers > 0, "the worker never stored a layer");
}

/// Stores layers (chains of diffs with disks) until killed.
fn worker(dir: &Path) -> ! {
    let store = SnapshotStore::open(&dir.join("store")).unwrap();
    let work = dir.join(format!("work-{}", std::process::id()));
    fs::create_dir_all(&work).unwrap();
    let (mem, prev) = (work.join("mem"), work.join("prev"));
    sparse_image(&mem, 8 * MIB);
    fill(&mem, (0..2048).step_by(8), 0);
    let mut parent: Option<LayerId> = None;
    for n in 1u64.. {
        let disk = work.join("disk.qcow2");
        fs::write(&disk, n.to_le_bytes().repeat(4096)).unwrap();
        let req = match &parent {
            Some(p) if n % 5 != 0 => NewLayer::diff(p, &mem, Some(&prev)),
            _ => NewLayer::full(&mem),
        };
        let m = store.create_layer(req.with_disk(&disk)).unwrap();
        parent = Some(m.id);
        fs::copy(&mem, &prev).unwrap();
        fill(&mem, (n % 7..2048).step_by(13), n);
    }
    unreachable!()
}

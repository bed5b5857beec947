//! Store handles used at the same time, as the agent's tasks will.

use std::thread;

use flotilla_snapshot::{NewLayer, SnapshotStore};

use crate::common::*;

fn image(fx: &Fixture) -> std::path::PathBuf {
    let mem = fx.path("mem");
    sparse_image(&mem, 8 * MIB);
    fill(&mem, (0..2048).step_by(8), 0);
    mem
}

#[test]
fn opening_the_store_while_layers_are_created_disturbs_nothing() {
    let fx = Fixture::new();
    let mem = image(&fx);
    let store = fx.store.clone();
    let creator = thread::spawn(move || {
        for _ in 0..8 {
            store.create_layer(NewLayer::full(&mem)).unwrap();
        }
    });
    let root = fx.path("store");
    while !creator.is_finished() {
        SnapshotStore::open(&root).unwrap();
    }
    creator.join().unwrap();
    let layers = fx.store.list().unwrap();
    assert_eq!(layers.len(), 8);
    for m in layers {
        fx.store.verify(&m.id).unwrap();
    }
}

#[test]
fn gc_alongside_creates_takes_only_unreferenced_layers() {
    let fx = Fixture::new();
    let mem = image(&fx);
    let store = fx.store.clone();
    let creator = thread::spawn(move || {
        let base = store
            .create_layer_with_ref(NewLayer::full(&mem), "vm:base")
            .unwrap();
        let mut kept = vec![base.id.clone()];
        for i in 0..6 {
            // Unreferenced: fair game for gc, before or after it appears.
            store.create_layer(NewLayer::full(&mem)).unwrap();
            let m = store
                .create_layer_with_ref(
                    NewLayer::diff(&base.id, &mem, Some(&mem)),
                    &format!("vm:{i}"),
                )
                .unwrap();
            kept.push(m.id);
        }
        kept
    });
    let mut removed = 0;
    while !creator.is_finished() {
        removed += fx.store.gc().unwrap().removed.len();
    }
    let kept = creator.join().unwrap();
    removed += fx.store.gc().unwrap().removed.len();
    assert_eq!(removed, 6);
    for id in &kept {
        fx.store.verify(id).unwrap();
    }
    assert_eq!(fx.store.list().unwrap().len(), kept.len());
}

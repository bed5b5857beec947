//! References, removal and garbage collection.

use std::fs;

use flotilla_snapshot::{LayerId, NewLayer, SnapshotError};

use crate::common::*;

/// A chain of `n` layers on one image; ids root first.
fn chain(fx: &Fixture, name: &str, n: u64) -> Vec<LayerId> {
    let mem = fx.path(name);
    sparse_image(&mem, 2 * MIB);
    fill(&mem, 0..16, 0);
    let mut ids = vec![fx.store.create_layer(NewLayer::full(&mem)).unwrap().id];
    for step in 1..n {
        let prev = fx.path(&format!("{name}-prev"));
        fs::copy(&mem, &prev).unwrap();
        fill(&mem, [step], step);
        let m = fx
            .store
            .create_layer(NewLayer::diff(ids.last().unwrap(), &mem, Some(&prev)))
            .unwrap();
        ids.push(m.id);
    }
    ids
}

fn in_use_by(err: SnapshotError) -> Vec<String> {
    match err {
        SnapshotError::InUse { by, .. } => by,
        other => panic!("expected InUse, got {other:?}"),
    }
}

#[test]
fn remove_is_refused_while_referenced_or_with_children() {
    let fx = Fixture::new();
    let ids = chain(&fx, "a", 2);
    fx.store.add_ref(&ids[1], "vm:web").unwrap();
    fx.store.add_ref(&ids[1], "vm:web").unwrap();
    assert_eq!(fx.store.refs(&ids[1]).unwrap(), vec!["vm:web"]);

    let err = fx.store.remove(&ids[1]).unwrap_err();
    assert!(err.to_string().contains("vm:web"), "{err}");
    assert_eq!(in_use_by(err), vec!["vm:web"]);
    assert_eq!(
        in_use_by(fx.store.remove(&ids[0]).unwrap_err()),
        vec![format!("layer:{}", ids[1])]
    );

    fx.store.remove_ref(&ids[1], "vm:web").unwrap();
    fx.store.remove_ref(&ids[1], "vm:web").unwrap(); // idempotent
    fx.store.remove(&ids[1]).unwrap();
    fx.store.remove(&ids[0]).unwrap();
    assert!(fx.store.list().unwrap().is_empty());
    assert!(matches!(
        fx.store.remove(&ids[0]),
        Err(SnapshotError::NotFound { .. })
    ));
    assert!(matches!(
        fx.store.add_ref(&ids[0], "vm:x"),
        Err(SnapshotError::NotFound { .. })
    ));
    assert!(matches!(
        fx.store.add_ref(&LayerId::generate(), "a/b"),
        Err(SnapshotError::InvalidHolder { .. })
    ));
}

#[test]
fn gc_removes_only_unreferenced_chains() {
    let fx = Fixture::new();
    let kept = chain(&fx, "kept", 3); // leaf referenced: all three stay
    let gone = chain(&fx, "gone", 3); // nothing referenced: all go
    let mid = chain(&fx, "mid", 3); // middle referenced: root and middle stay
    fx.store.add_ref(&kept[2], "vm:kept").unwrap();
    fx.store.add_ref(&mid[1], "vm:mid").unwrap();
    // A branch off a kept chain, unreferenced.
    let mem = fx.path("kept");
    let branch = fx
        .store
        .create_layer(NewLayer::diff(&kept[0], &mem, None))
        .unwrap()
        .id;

    let report = fx.store.gc().unwrap();
    let mut removed = report.removed.clone();
    removed.sort();
    let mut expected = vec![
        gone[0].clone(),
        gone[1].clone(),
        gone[2].clone(),
        mid[2].clone(),
        branch,
    ];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(report.bytes_freed >= 16 * P, "{report:?}");
    // Children went before their parents.
    let pos = |id: &LayerId| report.removed.iter().position(|r| r == id).unwrap();
    assert!(pos(&gone[2]) < pos(&gone[1]) && pos(&gone[1]) < pos(&gone[0]));

    for id in kept.iter().chain(&mid[..2]) {
        fx.store.verify(id).unwrap();
    }
    assert_eq!(fx.store.list().unwrap().len(), 5);
    assert!(fx.store.gc().unwrap().removed.is_empty());

    fx.store.remove_ref(&mid[1], "vm:mid").unwrap();
    assert_eq!(
        fx.store.gc().unwrap().removed,
        vec![mid[1].clone(), mid[0].clone()]
    );
}

#[test]
fn a_layer_created_with_a_reference_is_never_collected() {
    let fx = Fixture::new();
    let mem = fx.path("mem");
    sparse_image(&mem, MIB);
    fill(&mem, [0], 0);
    let m = fx
        .store
        .create_layer_with_ref(NewLayer::full(&mem), "vm:new")
        .unwrap();
    assert_eq!(fx.store.refs(&m.id).unwrap(), vec!["vm:new"]);
    assert!(fx.store.gc().unwrap().removed.is_empty());
}

#[test]
fn references_to_removed_layers_are_swept() {
    let fx = Fixture::new();
    let ids = chain(&fx, "a", 1);
    fx.store.add_ref(&ids[0], "vm:a").unwrap();
    // As if a crash had lost the layer but not its reference.
    fs::remove_dir_all(fx.layer_dir(&ids[0])).unwrap();
    assert!(fx.store.gc().unwrap().removed.is_empty());
    assert!(!fx.path("store").join("refs").join(ids[0].as_str()).exists());
}

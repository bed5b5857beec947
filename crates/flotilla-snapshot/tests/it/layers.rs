//! Creating layers and rebuilding memory images from chains.

use std::fs;

use flotilla_snapshot::{LayerId, NewLayer, SnapshotError, SnapshotStore, LAYER_FORMAT_VERSION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::*;

#[test]
fn a_full_layer_stores_only_non_zero_pages() {
    let fx = Fixture::new();
    let mem = fx.path("mem");
    sparse_image(&mem, 16 * MIB);
    fill(&mem, [0, 1, 2, 100, 4095], 1);
    zero(&mem, [50, 51]); // allocated, but zero: not stored either
    let m = fx
        .store
        .create_layer(NewLayer::full(&mem).with_label("vm", "web"))
        .unwrap();
    assert_eq!(m.parent, None);
    assert_eq!(m.format_version, LAYER_FORMAT_VERSION);
    assert_eq!(m.memory_size, 16 * MIB);
    assert_eq!(
        (m.pages_stored, m.pages_zeroed, m.stored_bytes),
        (5, 0, 5 * P)
    );
    let spans: Vec<_> = m
        .extents
        .iter()
        .map(|e| (e.first_page, e.pages, e.zero))
        .collect();
    assert_eq!(
        spans,
        vec![(0, 3, false), (100, 1, false), (4095, 1, false)]
    );
    assert_eq!(m.labels["vm"], "web");
    assert_eq!(
        fs::metadata(fx.layer_dir(&m.id).join("memory.data"))
            .unwrap()
            .len(),
        5 * P
    );
    assert_eq!(fx.store.get(&m.id).unwrap(), m);
    assert!(
        m.created_at.ends_with('Z') && m.created_at.len() == 24,
        "{}",
        m.created_at
    );
}

#[test]
fn a_diff_stores_changed_pages_and_records_zeroed_ones() {
    let fx = Fixture::new();
    let (v0, v1) = (fx.path("v0"), fx.path("v1"));
    sparse_image(&v0, 8 * MIB);
    fill(&v0, 0..64, 0);
    let base = fx.store.create_layer(NewLayer::full(&v0)).unwrap();

    fs::copy(&v0, &v1).unwrap();
    fill(&v1, [3, 4, 5, 1000], 1); // changed, and one new page
    zero(&v1, [10, 11]); // became zero
    let top = fx
        .store
        .create_layer(NewLayer::diff(&base.id, &v1, Some(&v0)))
        .unwrap();
    assert_eq!(top.parent.as_ref(), Some(&base.id));
    let spans: Vec<_> = top
        .extents
        .iter()
        .map(|e| (e.first_page, e.pages, e.zero))
        .collect();
    assert_eq!(spans, vec![(3, 3, false), (10, 2, true), (1000, 1, false)]);
    assert_eq!(
        (top.pages_stored, top.pages_zeroed, top.stored_bytes),
        (4, 2, 4 * P)
    );

    let out = fx.path("out");
    fx.store.materialize_memory(&top.id, &out).unwrap();
    assert_same(&out, &v1);
    fx.store.verify(&top.id).unwrap();
}

#[test]
fn chains_rebuild_every_version_exactly() {
    let fx = Fixture::new();
    let mut rng = StdRng::seed_from_u64(7);
    let pages = 8 * MIB / P;
    let v0 = fx.path("v0");
    sparse_image(&v0, 8 * MIB);
    let mut filled: Vec<u64> = (0..pages).filter(|_| rng.gen_bool(0.1)).collect();
    fill(&v0, filled.iter().copied(), 0);
    let mut versions = vec![v0.clone()];
    let mut ids = vec![fx.store.create_layer(NewLayer::full(&v0)).unwrap().id];

    for step in 1..=4u64 {
        let prev = versions.last().unwrap().clone();
        let next = fx.path(&format!("v{step}"));
        fs::copy(&prev, &next).unwrap();
        let size = if step == 3 {
            10 * MIB + 100
        } else {
            fs::metadata(&next).unwrap().len()
        };
        fs::OpenOptions::new()
            .write(true)
            .open(&next)
            .unwrap()
            .set_len(size)
            .unwrap();
        let last_full_page = size / P;
        // Some pages the last step wrote become zero, others change.
        zero(&next, filled.iter().copied().step_by(5));
        filled = (0..last_full_page).filter(|_| rng.gen_bool(0.02)).collect();
        fill(&next, filled.iter().copied(), step);
        // Step 2 has no parent image at hand: the store rebuilds it.
        let parent_memory = (step != 2).then_some(prev.as_path());
        let m = fx
            .store
            .create_layer(NewLayer::diff(ids.last().unwrap(), &next, parent_memory))
            .unwrap();
        assert_eq!(m.memory_size, size);
        assert!(m.pages_zeroed > 0 && m.pages_stored > 0, "step {step}");
        versions.push(next);
        ids.push(m.id);
    }

    for (id, version) in ids.iter().zip(&versions) {
        let out = fx.path(&format!("out-{id}"));
        fx.store.materialize_memory(id, &out).unwrap();
        assert_same(&out, version);
        fx.store.verify(id).unwrap();
    }
    let chain = fx.store.chain(ids.last().unwrap()).unwrap();
    assert_eq!(chain.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), ids);
}

#[test]
fn a_diff_built_from_a_rebuilt_parent_matches_one_from_the_callers_copy() {
    let fx = Fixture::new();
    let (v0, v1) = (fx.path("v0"), fx.path("v1"));
    sparse_image(&v0, 4 * MIB);
    fill(&v0, (0..1024).step_by(3), 0);
    let base = fx.store.create_layer(NewLayer::full(&v0)).unwrap();
    fs::copy(&v0, &v1).unwrap();
    fill(&v1, (0..1024).step_by(7), 1);
    zero(&v1, [0, 3, 6]);
    let a = fx
        .store
        .create_layer(NewLayer::diff(&base.id, &v1, Some(&v0)))
        .unwrap();
    let b = fx
        .store
        .create_layer(NewLayer::diff(&base.id, &v1, None))
        .unwrap();
    assert_eq!(a.extents, b.extents);
    assert_eq!(a.data_sha256, b.data_sha256);
}

#[test]
fn materialized_images_are_sparse() {
    let fx = Fixture::new();
    let mem = fx.path("mem");
    sparse_image(&mem, 64 * MIB);
    fill(&mem, (0..16384).step_by(64), 0); // 256 pages = 1 MiB of data
    let m = fx.store.create_layer(NewLayer::full(&mem)).unwrap();
    let out = fx.path("out");
    fx.store.materialize_memory(&m.id, &out).unwrap();
    assert_eq!(fs::metadata(&out).unwrap().len(), 64 * MIB);
    assert!(
        allocated(&out) <= 2 * MIB,
        "{} bytes allocated",
        allocated(&out)
    );
    assert_same(&out, &mem);
}

#[test]
fn materialize_replaces_an_existing_output() {
    let fx = Fixture::new();
    let mem = fx.path("mem");
    sparse_image(&mem, MIB);
    fill(&mem, [1], 0);
    let m = fx.store.create_layer(NewLayer::full(&mem)).unwrap();
    let out = fx.path("out");
    fs::write(&out, vec![0xff; 3 * MIB as usize]).unwrap();
    fx.store.materialize_memory(&m.id, &out).unwrap();
    assert_same(&out, &mem);
}

#[test]
fn a_missing_parent_is_refused() {
    let fx = Fixture::new();
    let mem = fx.path("mem");
    sparse_image(&mem, MIB);
    fill(&mem, [0], 0);
    let ghost = LayerId("00000000deadbeef".into());
    let err = fx
        .store
        .create_layer(NewLayer::diff(&ghost, &mem, None))
        .unwrap_err();
    match &err {
        SnapshotError::ParentMissing { parent, .. } => assert_eq!(parent, &ghost),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("00000000deadbeef"), "{err}");
    assert!(fx.store.list().unwrap().is_empty());
}

#[test]
fn a_wrong_parent_image_is_refused() {
    let fx = Fixture::new();
    let (v0, other) = (fx.path("v0"), fx.path("other"));
    sparse_image(&v0, 2 * MIB);
    fill(&v0, [0], 0);
    sparse_image(&other, 3 * MIB);
    let base = fx.store.create_layer(NewLayer::full(&v0)).unwrap();
    let err = fx
        .store
        .create_layer(NewLayer::diff(&base.id, &v0, Some(&other)))
        .unwrap_err();
    assert!(
        matches!(&err, SnapshotError::SizeMismatch { id, expected, actual, .. }
            if id == &base.id && *expected == 2 * MIB && *actual == 3 * MIB),
        "{err:?}"
    );
    assert_eq!(fx.store.list().unwrap().len(), 1);
}

#[test]
fn bad_inputs_are_refused() {
    let fx = Fixture::new();
    let empty = fx.path("empty");
    fs::write(&empty, b"").unwrap();
    let err = fx.store.create_layer(NewLayer::full(&empty)).unwrap_err();
    assert!(matches!(err, SnapshotError::InvalidInput { .. }), "{err:?}");
    let err = fx
        .store
        .create_layer(NewLayer::full(&fx.path("absent")))
        .unwrap_err();
    assert!(matches!(err, SnapshotError::Io { .. }), "{err:?}");
    let err = fx
        .store
        .create_layer(NewLayer::full(fx.dir.path()))
        .unwrap_err();
    assert!(matches!(err, SnapshotError::InvalidInput { .. }), "{err:?}");
    let bad = LayerId("../../etc".into());
    assert!(matches!(
        fx.store.get(&bad),
        Err(SnapshotError::InvalidId { .. })
    ));
    assert!(fx.store.disk_path(&bad).is_none());
}

#[test]
fn list_is_oldest_first_and_survives_reopening() {
    let fx = Fixture::new();
    let mem = fx.path("mem");
    sparse_image(&mem, MIB);
    fill(&mem, [0], 0);
    let a = fx.store.create_layer(NewLayer::full(&mem)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let b = fx
        .store
        .create_layer(NewLayer::diff(&a.id, &mem, Some(&mem)))
        .unwrap();
    assert!(b.extents.is_empty(), "nothing changed");
    let reopened = SnapshotStore::open(&fx.path("store")).unwrap();
    let ids: Vec<_> = reopened.list().unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![a.id.clone(), b.id.clone()]);
    assert_eq!(reopened.children(&a.id).unwrap(), vec![b.id]);
}

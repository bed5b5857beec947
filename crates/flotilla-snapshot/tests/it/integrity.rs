//! Damage is detected, and the error names the damaged layer.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use flotilla_snapshot::{LayerId, LayerManifest, NewLayer, SnapshotError};

use crate::common::*;

/// A three-layer chain; returns the ids, root first, and the leaf's image.
fn chain(fx: &Fixture) -> (Vec<LayerId>, std::path::PathBuf) {
    let (v0, v1, v2) = (fx.path("v0"), fx.path("v1"), fx.path("v2"));
    sparse_image(&v0, 4 * MIB);
    fill(&v0, 0..300, 0);
    let a = fx.store.create_layer(NewLayer::full(&v0)).unwrap().id;
    fs::copy(&v0, &v1).unwrap();
    fill(&v1, 100..120, 1);
    let b = fx
        .store
        .create_layer(NewLayer::diff(&a, &v1, Some(&v0)))
        .unwrap()
        .id;
    fs::copy(&v1, &v2).unwrap();
    fill(&v2, 110..130, 2);
    let c = fx
        .store
        .create_layer(NewLayer::diff(&b, &v2, Some(&v1)))
        .unwrap()
        .id;
    (vec![a, b, c], v2)
}

fn flip_byte(path: &std::path::Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
}

#[test]
fn a_flipped_byte_in_page_data_is_caught_and_named() {
    let fx = Fixture::new();
    let (ids, _) = chain(&fx);
    flip_byte(&fx.layer_dir(&ids[1]).join("memory.data"), 5 * P + 17);
    let out = fx.path("out");
    // The damaged middle layer is named whether the leaf or itself is asked for.
    assert_corrupt(
        fx.store.materialize_memory(&ids[2], &out).unwrap_err(),
        &ids[1],
    );
    assert!(!out.exists(), "no half-written output");
    assert_corrupt(fx.store.verify(&ids[2]).unwrap_err(), &ids[1]);
    assert_corrupt(fx.store.verify(&ids[1]).unwrap_err(), &ids[1]);
    fx.store.verify(&ids[0]).unwrap();
    // Even pages a later layer replaces are checked.
    let err = fx.store.materialize_memory(&ids[2], &out).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn a_truncated_page_data_file_is_caught() {
    let fx = Fixture::new();
    let (ids, _) = chain(&fx);
    let data = fx.layer_dir(&ids[0]).join("memory.data");
    let len = fs::metadata(&data).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = fx
        .store
        .materialize_memory(&ids[2], &fx.path("out"))
        .unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_corrupt(err, &ids[0]);
    // Removed entirely: still corruption of that layer, not "not found".
    fs::remove_file(&data).unwrap();
    assert_corrupt(fx.store.verify(&ids[0]).unwrap_err(), &ids[0]);
}

#[test]
fn an_edited_manifest_is_caught() {
    let fx = Fixture::new();
    let (ids, _) = chain(&fx);
    let path = fx.layer_dir(&ids[2]).join("manifest.json");
    let original = fs::read(&path).unwrap();
    let mut m: LayerManifest = serde_json::from_slice(&original).unwrap();

    // Move an extent: data checksums still agree, the manifest's does not.
    m.extents[0].first_page += 1;
    fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let err = fx.store.get(&ids[2]).unwrap_err();
    assert!(err.to_string().contains("manifest"), "{err}");
    assert_corrupt(err, &ids[2]);
    assert_corrupt(
        fx.store
            .materialize_memory(&ids[2], &fx.path("out"))
            .unwrap_err(),
        &ids[2],
    );

    // Not JSON at all.
    fs::write(&path, b"{ nope").unwrap();
    assert_corrupt(fx.store.verify(&ids[2]).unwrap_err(), &ids[2]);

    // A harmless reformatting is fine.
    let value: serde_json::Value = serde_json::from_slice(&original).unwrap();
    fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
    fx.store.verify(&ids[2]).unwrap();
}

#[test]
fn unreadable_layers_are_left_out_of_list() {
    let fx = Fixture::new();
    let (ids, _) = chain(&fx);
    fs::write(fx.layer_dir(&ids[2]).join("manifest.json"), b"garbage").unwrap();
    let listed: Vec<_> = fx.store.list().unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(listed, ids[..2]);
}

#[test]
fn a_newer_format_is_reported_as_such() {
    let fx = Fixture::new();
    let (ids, _) = chain(&fx);
    let path = fx.layer_dir(&ids[0]).join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    v["format_version"] = 2.into();
    v["new_field"] = "from the future".into();
    fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = fx
        .store
        .materialize_memory(&ids[2], &fx.path("out"))
        .unwrap_err();
    assert!(
        matches!(&err, SnapshotError::VersionUnsupported { id, found: 2, .. } if id == &ids[0]),
        "{err:?}"
    );
}

#[test]
fn a_missing_parent_breaks_the_chain_by_name() {
    let fx = Fixture::new();
    let (ids, _) = chain(&fx);
    fs::remove_dir_all(fx.layer_dir(&ids[1])).unwrap();
    let err = fx
        .store
        .materialize_memory(&ids[2], &fx.path("out"))
        .unwrap_err();
    match &err {
        SnapshotError::ParentMissing { id, parent } => {
            assert_eq!((id, parent), (&ids[2], &ids[1]));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(ids[2].as_str()), "{err}");
    assert!(matches!(
        fx.store.verify(&ids[2]),
        Err(SnapshotError::ParentMissing { .. })
    ));
    // And a new diff on top of the broken layer is refused.
    let mem = fx.path("v2");
    let err = fx
        .store
        .create_layer(NewLayer::diff(&ids[2], &mem, None))
        .unwrap_err();
    assert!(
        matches!(err, SnapshotError::ParentMissing { .. }),
        "{err:?}"
    );
}

#[test]
fn damage_after_a_successful_check_is_still_caught() {
    let fx = Fixture::new();
    let (ids, _) = chain(&fx);
    fx.store.verify(&ids[2]).unwrap();
    // Checked layers are not read again while unchanged...
    fx.store.verify(&ids[2]).unwrap();
    // ...but a change is seen, even one that keeps the size and puts the
    // modification time back.
    let data = fx.layer_dir(&ids[0]).join("memory.data");
    let mtime = fs::metadata(&data).unwrap().modified().unwrap();
    flip_byte(&data, 3 * P + 5);
    OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_corrupt(fx.store.verify(&ids[2]).unwrap_err(), &ids[0]);
    // A layer put back as it was is accepted again.
    flip_byte(&data, 3 * P + 5);
    fx.store.verify(&ids[2]).unwrap();
}

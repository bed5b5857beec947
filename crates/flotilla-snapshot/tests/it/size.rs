//! The sizes and speed that matter for real memory images: 256 MiB apparent,
//! 20 MiB of data, a few thousand pages changed between snapshots.

use std::collections::BTreeSet;
use std::fs;
use std::time::Instant;

use flotilla_snapshot::NewLayer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::*;

const IMAGE: u64 = 256 * MIB;
const PAGES: u64 = IMAGE / P;

/// Writes the base content (20 MiB in 160 scattered runs of 32 pages) and
/// then each later generation's changed pages, into a fresh sparse file.
fn build(path: &std::path::Path, base: &[u64], generations: &[Vec<u64>]) {
    sparse_image(path, IMAGE);
    fill(path, base.iter().copied(), 0);
    for (g, pages) in generations.iter().enumerate() {
        fill(path, pages.iter().copied(), g as u64 + 1);
    }
}

fn changed_pages(rng: &mut StdRng, n: usize) -> Vec<u64> {
    let mut set = BTreeSet::new();
    while set.len() < n {
        set.insert(rng.gen_range(0..PAGES));
    }
    set.into_iter().collect()
}

#[test]
fn a_256_mib_image_with_2000_changed_pages_makes_an_8_mib_diff() {
    let fx = Fixture::new();
    let mut rng = StdRng::seed_from_u64(256);
    let runs: BTreeSet<u64> = (0..160).map(|_| rng.gen_range(0..PAGES / 32)).collect();
    let base: Vec<u64> = runs.iter().flat_map(|r| r * 32..r * 32 + 32).collect();
    let gen1 = changed_pages(&mut rng, 2000);
    let gen2 = changed_pages(&mut rng, 2000);

    let (v0, v1, v2) = (fx.path("v0"), fx.path("v1"), fx.path("v2"));
    build(&v0, &base, &[]);
    build(&v1, &base, std::slice::from_ref(&gen1));
    build(&v2, &base, &[gen1, gen2]);

    let t = Instant::now();
    let full = fx.store.create_layer(NewLayer::full(&v0)).unwrap();
    let t_full = t.elapsed();
    assert_eq!(full.stored_bytes, base.len() as u64 * P);

    let t = Instant::now();
    let d1 = fx
        .store
        .create_layer(NewLayer::diff(&full.id, &v1, Some(&v0)))
        .unwrap();
    let t_diff = t.elapsed();
    assert_eq!((d1.pages_stored, d1.pages_zeroed), (2000, 0));
    assert_eq!(d1.stored_bytes, 2000 * P); // 7.8 MiB
    let data = fs::metadata(fx.layer_dir(&d1.id).join("memory.data"))
        .unwrap()
        .len();
    assert_eq!(data, 2000 * P);

    let d2 = fx
        .store
        .create_layer(NewLayer::diff(&d1.id, &v2, Some(&v1)))
        .unwrap();
    assert_eq!(d2.stored_bytes, 2000 * P);

    let out = fx.path("out");
    let t = Instant::now();
    fx.store.materialize_memory(&d2.id, &out).unwrap();
    let t_materialize = t.elapsed();
    assert_same(&out, &v2);
    assert!(
        allocated(&out) < 40 * MIB,
        "{} bytes allocated",
        allocated(&out)
    );

    eprintln!(
        "256 MiB image: full layer ({} MiB) {t_full:?}, diff (2000 pages) {t_diff:?}, \
         materialize of 3 layers {t_materialize:?} (debug build)",
        full.stored_bytes / MIB
    );
}

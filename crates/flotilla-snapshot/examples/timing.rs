//! Measures the operations the agent waits on, on a realistic memory image:
//! 256 MiB apparent, 20 MiB of data, 2,000 pages changed per snapshot.
//!
//! `cargo run --release -p flotilla-snapshot --example timing [DIR]`
//! (DIR defaults to a temporary directory; use one on the agent's disk).

use std::collections::BTreeSet;
use std::error::Error;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_snapshot::{NewLayer, SnapshotStore, PAGE_SIZE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const IMAGE: u64 = 256 << 20;
const PAGES: u64 = IMAGE / PAGE_SIZE;

fn main() -> Result<(), Box<dyn Error>> {
    let tmp = match std::env::args().nth(1) {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let dir = tmp.path();
    let mut rng = StdRng::seed_from_u64(1);
    let runs: BTreeSet<u64> = (0..160).map(|_| rng.gen_range(0..PAGES / 32)).collect();
    let base: Vec<u64> = runs.iter().flat_map(|r| r * 32..r * 32 + 32).collect();
    let mut generations = vec![base];
    for _ in 0..2 {
        let mut changed = BTreeSet::new();
        while changed.len() < 2000 {
            changed.insert(rng.gen_range(0..PAGES));
        }
        generations.push(changed.into_iter().collect());
    }
    let images: Vec<_> = (0..3).map(|g| dir.join(format!("v{g}"))).collect();
    for (g, path) in images.iter().enumerate() {
        write_image(path, &generations[..=g])?;
    }

    let store = SnapshotStore::open(&dir.join("store"))?;
    let (full, t) = timed(|| store.create_layer(NewLayer::full(&images[0])))?;
    report("full layer", t, full.stored_bytes);
    let (d1, t) =
        timed(|| store.create_layer(NewLayer::diff(&full.id, &images[1], Some(&images[0]))))?;
    report("diff, 2000 pages changed", t, d1.stored_bytes);
    let (d2, t) =
        timed(|| store.create_layer(NewLayer::diff(&d1.id, &images[2], Some(&images[1]))))?;
    report("diff, 2000 pages changed", t, d2.stored_bytes);
    let (same, t) =
        timed(|| store.create_layer(NewLayer::diff(&d2.id, &images[2], Some(&images[2]))))?;
    report("diff, nothing changed", t, same.stored_bytes);
    let (rebuilt, t) = timed(|| store.create_layer(NewLayer::diff(&d2.id, &images[2], None)))?;
    report("diff, parent rebuilt first", t, rebuilt.stored_bytes);

    let out = dir.join("out");
    let ((), t) = timed(|| store.materialize_memory(&d2.id, &out))?;
    report(
        "materialize 3-layer chain",
        t,
        std::fs::metadata(&out)?.len(),
    );
    let ((), t) = timed(|| store.verify(&d2.id))?;
    report(
        "verify 3-layer chain",
        t,
        full.stored_bytes + d1.stored_bytes + d2.stored_bytes,
    );
    if std::fs::read(&out)? != std::fs::read(&images[2])? {
        return Err("materialized image differs from the original".into());
    }
    Ok(())
}

/// A sparse image with each generation's pages written over the last.
fn write_image(path: &Path, generations: &[Vec<u64>]) -> std::io::Result<()> {
    let f = File::create(path)?;
    f.set_len(IMAGE)?;
    let f = OpenOptions::new().write(true).open(path)?;
    for (g, pages) in generations.iter().enumerate() {
        for &page in pages {
            let mut bytes = vec![(g as u8).wrapping_mul(37) | 1; PAGE_SIZE as usize];
            bytes[..8].copy_from_slice(&page.to_le_bytes());
            f.write_all_at(&bytes, page * PAGE_SIZE)?;
        }
    }
    f.sync_all()
}

fn timed<T, E>(f: impl FnOnce() -> Result<T, E>) -> Result<(T, Duration), E> {
    let start = Instant::now();
    let value = f()?;
    Ok((value, start.elapsed()))
}

fn report(what: &str, t: Duration, bytes: u64) {
    println!(
        "{what:<28} {:>8.1} ms  {:>8.2} MiB",
        t.as_secs_f64() * 1e3,
        bytes as f64 / f64::from(1 << 20)
    );
}

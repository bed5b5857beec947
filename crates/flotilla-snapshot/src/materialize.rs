//! Rebuilding a layer's full memory image from its chain.
//!
//! The output is written to a temporary file beside `out` and renamed over
//! it only when complete and synced, so `out` is never half an image. Only
//! non-zero pages are written: zero pages stay holes.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::backend::Backend;
use crate::error::{IoContext, SnapshotError};
use crate::fsutil::fsync_path;
use crate::manifest::LayerManifest;
use crate::overlay::{pieces, plan};
use crate::reader::for_each_verified_extent;
use crate::PAGE_SIZE;

/// How long the output must last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Output {
    /// Kept by the caller (typically as the next diff's parent image): synced,
    /// so it survives a crash intact or not at all.
    Durable,
    /// Read once and deleted (a parent image rebuilt for one diff): syncing
    /// it would only cost time.
    Scratch,
}

/// Writes the memory image of the last layer of `chain` (root first) to
/// `out`. Every layer's data is read and checked, even pages later layers
/// replace, so a damaged layer is reported wherever it sits in the chain.
pub(crate) fn materialize_chain(
    backend: &dyn Backend,
    chain: &[LayerManifest],
    out: &Path,
    kind: Output,
) -> Result<(), SnapshotError> {
    let size = chain.last().map_or(0, |leaf| leaf.memory_size);
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".materialize-")
        .tempfile_in(dir)
        .ctx("create temporary file in", dir)?;
    let file = tmp.as_file();
    file.set_len(size).ctx("resize", tmp.path())?;

    for (layer, wanted) in chain.iter().zip(plan(chain)) {
        let mut cursor = 0;
        for_each_verified_extent(backend, layer, |extent, bytes| {
            for piece in pieces(extent.first_page..extent.end_page(), &wanted, &mut cursor) {
                let from = ((piece.start - extent.first_page) * PAGE_SIZE) as usize;
                let to = ((piece.end - extent.first_page) * PAGE_SIZE) as usize;
                file.write_all_at(&bytes[from..to], piece.start * PAGE_SIZE)
                    .ctx("write", tmp.path())?;
            }
            Ok(())
        })?;
    }

    // A partial last page is stored whole; cut the file back to the image.
    file.set_len(size).ctx("resize", tmp.path())?;
    if kind == Output::Durable {
        file.sync_all().ctx("fsync", tmp.path())?;
    }
    tmp.persist(out)
        .map_err(|e| SnapshotError::io("rename into place", out, e.error))?;
    if kind == Output::Durable {
        fsync_path(dir)?;
    }
    Ok(())
}

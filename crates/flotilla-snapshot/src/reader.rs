//! Reads a layer's page data front to back, checking every extent's SHA-256
//! before handing its bytes on. The extents (and their checksums) are covered
//! by the manifest's own checksum and the file's length is checked, so every
//! byte is checked once; the whole file's SHA-256 (`data_sha256`) is for
//! tools and transfers, not re-hashed on every read (it would double the
//! cost of a resume's verification).

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use crate::backend::Backend;
use crate::error::SnapshotError;
use crate::manifest::{Extent, LayerManifest};

/// Calls `visit` with each data extent of `layer` and its verified bytes, in
/// page order. A short, long or damaged `memory.data` is `Corrupt`, naming
/// the layer.
pub(crate) fn for_each_verified_extent(
    backend: &dyn Backend,
    layer: &LayerManifest,
    mut visit: impl FnMut(&Extent, &[u8]) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    let id = &layer.id;
    let mut data = backend.open_data(id)?;
    if data.len != layer.stored_bytes {
        return Err(SnapshotError::corrupt(
            id,
            format!(
                "memory.data is {} bytes but the manifest records {} (truncated or damaged)",
                data.len, layer.stored_bytes
            ),
        ));
    }
    let mut buf = Vec::new();
    for extent in layer.data_extents() {
        let len = usize::try_from(extent.stored_bytes())
            .map_err(|_| SnapshotError::corrupt(id, "extent larger than memory"))?;
        buf.resize(len, 0);
        match data.reader.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(SnapshotError::corrupt(
                    id,
                    "memory.data ends early (truncated)",
                ));
            }
            Err(e) => return Err(SnapshotError::io("read", &data.location, e)),
        }
        if hex::encode(Sha256::digest(&buf)) != extent.sha256 {
            return Err(SnapshotError::corrupt(
                id,
                format!(
                    "page data of extent at page {} ({} pages, memory.data offset {}) fails its checksum",
                    extent.first_page, extent.pages, extent.data_offset
                ),
            ));
        }
        visit(extent, &buf)?;
    }
    Ok(())
}

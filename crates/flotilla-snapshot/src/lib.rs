//! Flotilla snapshots: a VM's suspended state as a chain of layers.
//!
//! The first layer of a VM holds its full memory image (only the non-zero
//! pages); each later layer holds only the pages that changed against its
//! parent, plus pages that became zero (recorded, without data). A layer may
//! also carry the VM's disks as qcow2 files, stored as given and checked by
//! checksum (the agent arranges qcow2 backing chains).
//!
//! Memory images are QEMU `mapped-ram` migration files, treated as opaque
//! byte arrays of [`PAGE_SIZE`] pages. They are large and sparse (256 MiB
//! apparent, ~20 MiB of data), so only their data is read (`SEEK_DATA`) and
//! rebuilt images keep zero pages as holes.
//!
//! On disk (`<root>`):
//!
//! * `layers/<id>/manifest.json`: [`LayerManifest`], checksummed;
//! * `layers/<id>/memory.data`: the page data of the layer's extents;
//! * `layers/<id>/disk.qcow2`: optional (a VM's root disk);
//! * `layers/<id>/disk-<name>.qcow2`: optional (its data disks);
//! * `pinned/`: files layers need from elsewhere (kernel, image disk);
//! * `refs/<id>/<holder>`: one empty file per reference;
//! * `lock`: taken while references or layers change.
//!
//! A layer is built in `layers/.tmp-<id>` and renamed into place once its
//! files are synced, so a crash (even SIGKILL) never leaves a layer that
//! looks complete; [`SnapshotStore::open`] removes the leftovers.
//!
//! # Example
//!
//! ```
//! use std::os::unix::fs::FileExt;
//! use flotilla_snapshot::{NewLayer, SnapshotStore};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = SnapshotStore::open(&dir.path().join("snapshots"))?;
//!
//! // A 64 MiB "memory image" with one page of data.
//! let mem = dir.path().join("mem");
//! let f = std::fs::File::create(&mem)?;
//! f.set_len(64 << 20)?;
//! f.write_all_at(&[1; 4096], 1 << 20)?;
//! let base = store.create_layer(NewLayer::full(&mem).with_label("vm", "web"))?;
//! assert_eq!(base.pages_stored, 1);
//!
//! // The guest ran on: one more page changed.
//! let next = dir.path().join("mem2");
//! std::fs::copy(&mem, &next)?;
//! std::fs::OpenOptions::new().write(true).open(&next)?.write_all_at(&[2; 4096], 0)?;
//! let top = store.create_layer(NewLayer::diff(&base.id, &next, Some(&mem)))?;
//! assert_eq!((top.pages_stored, top.stored_bytes), (1, 4096));
//! store.add_ref(&top.id, "vm:web")?; // pins top and base
//!
//! let restored = dir.path().join("restored");
//! store.materialize_memory(&top.id, &restored)?;
//! assert_eq!(std::fs::read(&restored)?, std::fs::read(&next)?);
//! # Ok(())
//! # }
//! ```

// Tests may unwrap: a panic there is the failure report.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod backend;
mod diff;
mod error;
mod fsutil;
mod gc;
mod id;
mod local;
mod lock;
mod manifest;
mod materialize;
mod overlay;
mod reader;
mod refs;
mod sparse;
mod store;
mod time;

pub use error::SnapshotError;
pub use gc::GcReport;
pub use id::LayerId;
pub use manifest::{DiskEntry, Extent, LayerManifest, DISK_FILE};
pub use store::{NewLayer, SnapshotStore};

/// The unit of comparison and storage.
pub const PAGE_SIZE: u64 = 4096;

/// The layer format this build writes and reads.
pub const LAYER_FORMAT_VERSION: u32 = 1;

/// The longest extent (1 MiB of pages): readers check an extent's checksum
/// before using any of its bytes, with a bounded buffer.
pub const MAX_EXTENT_PAGES: u64 = 256;

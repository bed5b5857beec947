//! Building a layer's page data: the new memory image is compared page by
//! page with its parent's (or with zeros, for a full layer), and runs of
//! changed pages become [`Extent`]s.
//!
//! Only the parts of either file that hold data are read (holes are zeros in
//! both), in 1 MiB sequential reads, so a 256 MiB image with 20 MiB of data
//! costs about 20 MiB of reading.

use std::fs::File;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{IoContext, SnapshotError};
use crate::manifest::Extent;
use crate::sparse::{data_ranges, page_union, read_at_or_zero};
use crate::{MAX_EXTENT_PAGES, PAGE_SIZE};

/// Bytes compared per read (a multiple of the page size).
const CHUNK: u64 = 1 << 20;
const PAGE: usize = PAGE_SIZE as usize;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// What a diff produced, besides the bytes it wrote.
#[derive(Debug)]
pub(crate) struct DiffSummary {
    pub memory_size: u64,
    pub extents: Vec<Extent>,
    pub stored_bytes: u64,
    pub pages_stored: u64,
    pub pages_zeroed: u64,
    pub data_sha256: String,
}

/// Compares `new` with `parent` (`None`: a full layer) and passes the bytes
/// of changed non-zero pages to `sink`, in page order.
pub(crate) fn write_diff(
    new_path: &Path,
    parent_path: Option<&Path>,
    sink: impl FnMut(&[u8]) -> Result<(), SnapshotError>,
) -> Result<DiffSummary, SnapshotError> {
    let new = File::open(new_path).ctx("open", new_path)?;
    let size = new.metadata().ctx("stat", new_path)?.len();
    let mut ranges = data_ranges(&new, size).ctx("find data in", new_path)?;
    let parent = match parent_path {
        Some(path) => {
            let file = File::open(path).ctx("open", path)?;
            let len = file.metadata().ctx("stat", path)?.len();
            // Parent pages past the new image's end are dropped, not compared.
            ranges.extend(data_ranges(&file, len.min(size)).ctx("find data in", path)?);
            Some((file, path))
        }
        None => None,
    };

    let mut out = ExtentBuilder::new(sink);
    let mut new_buf = vec![0u8; CHUNK as usize];
    let mut old_buf = vec![0u8; CHUNK as usize];
    for range in page_union(ranges, size) {
        let mut offset = range.start;
        while offset < range.end {
            let len = CHUNK.min(range.end - offset) as usize;
            read_image(&new, &mut new_buf[..len], offset, size).ctx("read", new_path)?;
            if let Some((file, path)) = &parent {
                read_image(file, &mut old_buf[..len], offset, size).ctx("read", *path)?;
            }
            let first_page = offset / PAGE_SIZE;
            for (i, page) in new_buf[..len].chunks_exact(PAGE).enumerate() {
                let old = parent.as_ref().map(|_| &old_buf[i * PAGE..(i + 1) * PAGE]);
                out.push(first_page + i as u64, classify(page, old), page)?;
            }
            offset += len as u64;
        }
    }
    Ok(out.finish(size))
}

/// Reads `buf.len()` bytes at `offset`, with everything at or past `size`
/// (the new image's end) as zeros, so the two images are compared over the
/// same bytes even when the parent is longer.
fn read_image(file: &File, buf: &mut [u8], offset: u64, size: u64) -> std::io::Result<()> {
    let valid = (size.saturating_sub(offset)).min(buf.len() as u64) as usize;
    read_at_or_zero(file, &mut buf[..valid], offset)?;
    buf[valid..].fill(0);
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Unchanged,
    /// Changed, now all zero: recorded without data.
    Zeroed,
    /// Changed (or, in a full layer, non-zero): stored.
    Data,
}

fn classify(page: &[u8], old: Option<&[u8]>) -> Change {
    let zero = page == &ZERO_PAGE[..page.len()];
    match old {
        None if zero => Change::Unchanged,
        None => Change::Data,
        Some(old) if old == page => Change::Unchanged,
        Some(_) if zero => Change::Zeroed,
        Some(_) => Change::Data,
    }
}

/// Gathers consecutive changed pages of one kind into extents of at most
/// [`MAX_EXTENT_PAGES`], so readers can check an extent's checksum before
/// using any of it with a bounded buffer.
struct ExtentBuilder<F> {
    sink: F,
    extents: Vec<Extent>,
    open: Option<OpenExtent>,
    data_offset: u64,
    whole: Sha256,
    pages_stored: u64,
    pages_zeroed: u64,
}

struct OpenExtent {
    first_page: u64,
    pages: u64,
    zero: bool,
    hasher: Sha256,
}

impl<F: FnMut(&[u8]) -> Result<(), SnapshotError>> ExtentBuilder<F> {
    fn new(sink: F) -> Self {
        ExtentBuilder {
            sink,
            extents: Vec::new(),
            open: None,
            data_offset: 0,
            whole: Sha256::new(),
            pages_stored: 0,
            pages_zeroed: 0,
        }
    }

    fn push(&mut self, page_no: u64, change: Change, bytes: &[u8]) -> Result<(), SnapshotError> {
        if change == Change::Unchanged {
            self.close();
            return Ok(());
        }
        let zero = change == Change::Zeroed;
        let extends = self.open.as_ref().is_some_and(|o| {
            o.zero == zero && o.first_page + o.pages == page_no && o.pages < MAX_EXTENT_PAGES
        });
        if !extends {
            self.close();
        }
        let open = self.open.get_or_insert_with(|| OpenExtent {
            first_page: page_no,
            pages: 0,
            zero,
            hasher: Sha256::new(),
        });
        open.pages += 1;
        if zero {
            self.pages_zeroed += 1;
        } else {
            open.hasher.update(bytes);
            self.whole.update(bytes);
            self.pages_stored += 1;
            (self.sink)(bytes)?;
        }
        Ok(())
    }

    fn close(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        let (data_offset, sha256) = if open.zero {
            (0, String::new())
        } else {
            let at = self.data_offset;
            self.data_offset += open.pages * PAGE_SIZE;
            (at, hex::encode(open.hasher.finalize()))
        };
        self.extents.push(Extent {
            first_page: open.first_page,
            pages: open.pages,
            zero: open.zero,
            data_offset,
            sha256,
        });
    }

    fn finish(mut self, memory_size: u64) -> DiffSummary {
        self.close();
        DiffSummary {
            memory_size,
            extents: self.extents,
            stored_bytes: self.data_offset,
            pages_stored: self.pages_stored,
            pages_zeroed: self.pages_zeroed,
            data_sha256: hex::encode(self.whole.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const P: u64 = PAGE_SIZE;

    /// A sparse image of `pages` pages with the given pages filled with a byte.
    fn image(dir: &Path, name: &str, size: u64, pages: &[(u64, u8)]) -> std::path::PathBuf {
        let path = dir.join(name);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        for &(page, byte) in pages {
            let len = P.min(size - page * P) as usize;
            f.write_all_at(&vec![byte; len], page * P).unwrap();
        }
        path
    }

    fn diff(new: &Path, parent: Option<&Path>) -> (DiffSummary, Vec<u8>) {
        let mut data = Vec::new();
        let s = write_diff(new, parent, |b| {
            data.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        (s, data)
    }

    fn spans(s: &DiffSummary) -> Vec<(u64, u64, bool)> {
        s.extents
            .iter()
            .map(|e| (e.first_page, e.pages, e.zero))
            .collect()
    }

    #[test]
    fn full_layer_keeps_only_non_zero_pages() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), "m", 64 * P, &[(1, 1), (2, 2), (40, 3)]);
        let (s, data) = diff(&img, None);
        assert_eq!(spans(&s), vec![(1, 2, false), (40, 1, false)]);
        assert_eq!(
            (s.pages_stored, s.pages_zeroed, s.stored_bytes),
            (3, 0, 3 * P)
        );
        assert_eq!(data.len() as u64, 3 * P);
        assert_eq!(s.extents[1].data_offset, 2 * P);
        assert_eq!(hex::encode(Sha256::digest(&data)), s.data_sha256);
    }

    #[test]
    fn diff_records_changes_and_zeroed_pages() {
        let dir = tempfile::tempdir().unwrap();
        let old = image(
            dir.path(),
            "old",
            64 * P,
            &[(1, 1), (2, 2), (3, 3), (10, 4)],
        );
        let new = image(dir.path(), "new", 64 * P, &[(1, 1), (2, 9), (20, 5)]);
        let (s, data) = diff(&new, Some(&old));
        // page 2 changed, 3 and 10 became zero, 20 is new; page 1 is unchanged.
        assert_eq!(
            spans(&s),
            vec![(2, 1, false), (3, 1, true), (10, 1, true), (20, 1, false)]
        );
        assert_eq!((s.pages_stored, s.pages_zeroed), (2, 2));
        assert_eq!(&data[..P as usize], &[9; P as usize][..]);
    }

    #[test]
    fn long_runs_are_split_into_bounded_extents() {
        let dir = tempfile::tempdir().unwrap();
        let pages: Vec<(u64, u8)> = (0..600).map(|p| (p, 7)).collect();
        let img = image(dir.path(), "m", 600 * P, &pages);
        let (s, _) = diff(&img, None);
        assert_eq!(
            spans(&s),
            vec![(0, 256, false), (256, 256, false), (512, 88, false)]
        );
    }

    #[test]
    fn sizes_differ_from_the_parent() {
        let dir = tempfile::tempdir().unwrap();
        let small = image(dir.path(), "small", 4 * P, &[(3, 1)]);
        let big = image(dir.path(), "big", 8 * P, &[(3, 1), (6, 2)]);
        // Growing: pages past the parent's end count as zero there.
        let (s, _) = diff(&big, Some(&small));
        assert_eq!(spans(&s), vec![(6, 1, false)]);
        // Shrinking: the parent's extra pages are simply gone.
        let (s, _) = diff(&small, Some(&big));
        assert!(s.extents.is_empty());
    }

    #[test]
    fn partial_last_page_compares_only_real_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let new = image(dir.path(), "new", 2 * P + 100, &[(2, 4)]);
        let (s, data) = diff(&new, None);
        assert_eq!(spans(&s), vec![(2, 1, false)]);
        assert_eq!(&data[..100], &[4; 100][..]);
        assert!(data[100..].iter().all(|&b| b == 0));
        // A longer parent that agrees up to the new end: nothing changed.
        let old = image(dir.path(), "old", 3 * P, &[(2, 4)]);
        let (s, _) = diff(&new, Some(&old));
        assert!(s.extents.is_empty(), "{:?}", spans(&s));
    }

    #[test]
    fn identical_images_make_an_empty_diff() {
        let dir = tempfile::tempdir().unwrap();
        let a = image(dir.path(), "a", 32 * P, &[(5, 5)]);
        let (s, data) = diff(&a, Some(&a));
        assert!(s.extents.is_empty() && data.is_empty());
        assert_eq!(s.data_sha256, hex::encode(Sha256::digest(b"")));
    }
}

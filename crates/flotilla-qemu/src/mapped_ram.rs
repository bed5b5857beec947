//! The layout of a `mapped-ram` migration file, and a VM's memory mapped
//! from one instead of loaded.
//!
//! In a `mapped-ram` file every RAM block has a header (`MappedRamHeader`:
//! version, page size, bitmap offset, pages offset) right after its id and
//! length in the stream, a bitmap of the pages saved, and its pages at their
//! guest offsets from `pages_offset` (1 MiB aligned; pages not saved are
//! zero and left as holes). So the pages region of the guest's main block is
//! the guest's memory, byte for byte: a fresh QEMU can map it copy-on-write
//! (`memory-backend-file`, private, read-only file) and take the rest of the
//! state from a *state file*: the same file with that block's bitmap
//! cleared, so QEMU loads no page of it. The guest then reads its memory
//! from the page cache as it touches it, and VMs mapping the same image
//! share those pages until they write them.
//!
//! This relies on pages whose bitmap bit is clear being holes (zero) in
//! the file, which holds for a single save of a paused VM into a new file,
//! the only kind Flotilla makes. (A save that rewrote pages of an existing
//! file would leave stale data behind a cleared bit.)

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where a block's header can be: the stream's start holds a few small
/// sections and the block list.
const SEARCH_WINDOW: u64 = 1 << 20;
/// `MappedRamHeader`: be32 version, be64 page size, bitmap and pages offsets.
const HEADER_LEN: usize = 4 + 8 + 8 + 8;
const HEADER_VERSION: u32 = 1;
const PAGE_SIZE: u64 = 4096;
/// QEMU aligns each block's pages region to this.
const PAGES_ALIGNMENT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MappedRamError {
    #[error("reading {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("RAM block {block:?} of {len} bytes not found in the first MiB of the image")]
    BlockNotFound { block: String, len: u64 },
    #[error("RAM block {block:?} has an unexpected mapped-ram header ({detail})")]
    UnexpectedHeader { block: String, detail: String },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MappedRamError {
    move |source| MappedRamError::Io { what, source }
}

/// Where one RAM block lives in a `mapped-ram` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    pub bitmap_offset: u64,
    pub pages_offset: u64,
    pub length: u64,
}

impl BlockLayout {
    /// Finds block `id` of `length` bytes in the image at `path`, checking
    /// its header is one this code understands.
    pub fn find(path: &Path, id: &str, length: u64) -> Result<BlockLayout, MappedRamError> {
        let mut file = File::open(path).map_err(io("the memory image"))?;
        let file_len = file.metadata().map_err(io("the memory image"))?.len();
        let mut start = Vec::new();
        (&mut file)
            .take(SEARCH_WINDOW)
            .read_to_end(&mut start)
            .map_err(io("the memory image"))?;
        Self::parse(&start, file_len, id, length)
    }

    fn parse(start: &[u8], file_len: u64, id: &str, length: u64) -> Result<Self, MappedRamError> {
        let not_found = || MappedRamError::BlockNotFound {
            block: id.to_string(),
            len: length,
        };
        let unexpected = |detail: String| MappedRamError::UnexpectedHeader {
            block: id.to_string(),
            detail,
        };
        // The block list entry: id length byte, id, be64 used length.
        let id_len = u8::try_from(id.len()).map_err(|_| not_found())?;
        let mut needle = vec![id_len];
        needle.extend_from_slice(id.as_bytes());
        needle.extend_from_slice(&length.to_be_bytes());
        let at = start
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
            .ok_or_else(not_found)?;
        let header_at = at + needle.len();
        let header = start
            .get(header_at..header_at + HEADER_LEN)
            .ok_or_else(not_found)?;
        let be64 = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let version = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let layout = BlockLayout {
            bitmap_offset: be64(12),
            pages_offset: be64(20),
            length,
        };
        let page_size = be64(4);
        if version != HEADER_VERSION || page_size != PAGE_SIZE {
            return Err(unexpected(format!(
                "version {version}, page size {page_size}"
            )));
        }
        // The bitmap follows the header; the pages follow it at the next
        // alignment, as QEMU lays them out (a corrupt header never passes).
        let bitmap_end = layout.bitmap_offset.checked_add(length / PAGE_SIZE / 8);
        let pages_at = bitmap_end.map(|end| end.div_ceil(PAGES_ALIGNMENT) * PAGES_ALIGNMENT);
        let file_needs = layout.pages_offset.checked_add(length);
        if layout.bitmap_offset != (header_at + HEADER_LEN) as u64
            || pages_at != Some(layout.pages_offset)
            || file_needs.is_none_or(|n| file_len < n)
        {
            return Err(unexpected(format!(
                "bitmap at {}, pages at {}, file of {file_len} bytes",
                layout.bitmap_offset, layout.pages_offset
            )));
        }
        Ok(layout)
    }

    /// Writes `out`: the image at `image` without this block's pages (its
    /// bitmap cleared, its pages region a hole), for QEMU to load the rest
    /// of the state from while the block is mapped from `image`.
    pub fn write_state_file(&self, image: &Path, out: &Path) -> Result<(), MappedRamError> {
        let src = File::open(image).map_err(io("the memory image"))?;
        let mut head = vec![0u8; self.pages_offset as usize];
        src.read_exact_at(&mut head, 0)
            .map_err(io("the memory image"))?;
        head[self.bitmap_offset as usize..].fill(0);
        let mut dst = File::create(out).map_err(io("the state file"))?;
        dst.write_all(&head).map_err(io("the state file"))?;
        // Everything after the block (other blocks, device state) as is.
        let tail_at = self.pages_offset + self.length;
        let mut src = src;
        src.seek(SeekFrom::Start(tail_at))
            .map_err(io("the memory image"))?;
        dst.seek(SeekFrom::Start(tail_at))
            .map_err(io("the state file"))?;
        std::io::copy(&mut src, &mut dst).map_err(io("the state file"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file shaped like QEMU's: some stream bytes, block "mem" with its
    /// header, bitmap, pages, then a tail.
    fn image(dir: &Path, length: u64) -> (std::path::PathBuf, BlockLayout) {
        let mut stream = b"QEVM\0\0\0\x03 some sections ".to_vec();
        stream.push(3);
        stream.extend_from_slice(b"mem");
        stream.extend_from_slice(&length.to_be_bytes());
        let bitmap_offset = (stream.len() + HEADER_LEN) as u64;
        let pages_offset = PAGES_ALIGNMENT;
        stream.extend_from_slice(&HEADER_VERSION.to_be_bytes());
        stream.extend_from_slice(&PAGE_SIZE.to_be_bytes());
        stream.extend_from_slice(&bitmap_offset.to_be_bytes());
        stream.extend_from_slice(&pages_offset.to_be_bytes());
        stream.extend_from_slice(&vec![0xff; (length / PAGE_SIZE / 8) as usize]);
        let path = dir.join("mem.img");
        let f = File::create(&path).expect("create");
        f.write_all_at(&stream, 0).expect("write");
        f.write_all_at(&[7; 4096], pages_offset + PAGE_SIZE)
            .expect("page");
        f.write_all_at(b"device state", pages_offset + length)
            .expect("tail");
        (
            path,
            BlockLayout {
                bitmap_offset,
                pages_offset,
                length,
            },
        )
    }

    #[test]
    fn finds_the_block_and_writes_a_state_file_without_its_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let length = 8 << 20;
        let (path, expected) = image(dir.path(), length);
        let layout = BlockLayout::find(&path, "mem", length).expect("found");
        assert_eq!(layout, expected);

        let state = dir.path().join("state");
        layout.write_state_file(&path, &state).expect("state file");
        let original = std::fs::read(&path).expect("read");
        let written = std::fs::read(&state).expect("read");
        assert_eq!(written.len(), original.len());
        let bitmap = layout.bitmap_offset as usize..layout.pages_offset as usize;
        assert_eq!(written[..bitmap.start], original[..bitmap.start]);
        assert!(written[bitmap].iter().all(|b| *b == 0), "bitmap cleared");
        let pages_end = (layout.pages_offset + length) as usize;
        assert!(written[layout.pages_offset as usize..pages_end]
            .iter()
            .all(|b| *b == 0));
        assert_eq!(&written[pages_end..], b"device state");
    }

    #[test]
    fn refuses_other_sizes_and_headers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, layout) = image(dir.path(), 8 << 20);
        assert!(matches!(
            BlockLayout::find(&path, "mem", 16 << 20),
            Err(MappedRamError::BlockNotFound { .. })
        ));
        // A header of another version is not guessed at.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        let header_at = layout.bitmap_offset - HEADER_LEN as u64;
        f.write_all_at(&2u32.to_be_bytes(), header_at)
            .expect("write");
        assert!(matches!(
            BlockLayout::find(&path, "mem", 8 << 20),
            Err(MappedRamError::UnexpectedHeader { .. })
        ));
    }
}

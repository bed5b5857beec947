//! Sparse-file helpers: finding the data in a file with holes
//! (`SEEK_DATA`/`SEEK_HOLE`) and positioned reads that treat the end of the
//! file as zeros.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::PAGE_SIZE;

/// The byte ranges of `file` within `0..len` that may hold data; everything
/// else is a hole and reads as zeros. Falls back to the whole file where the
/// filesystem cannot tell.
pub(crate) fn data_ranges(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match lseek(fd, to_off(pos)?, Whence::SeekData) {
            Ok(off) => off as u64,
            // No data at or after `pos`.
            Err(Errno::ENXIO) => break,
            // The filesystem cannot tell: read everything.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) if pos == 0 => {
                ranges.push(0..len);
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = match lseek(fd, to_off(start)?, Whence::SeekHole) {
            Ok(off) => (off as u64).min(len),
            // The file shrank under us: nothing more to read.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            break;
        }
        ranges.push(start..end);
        pos = end;
    }
    Ok(ranges)
}

fn to_off(pos: u64) -> io::Result<i64> {
    i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Rounds each range out to whole pages, clips it to `limit` (itself rounded
/// up to a page) and merges the result into sorted, disjoint ranges.
pub(crate) fn page_union(mut ranges: Vec<Range<u64>>, limit: u64) -> Vec<Range<u64>> {
    let limit = limit.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    for r in &mut ranges {
        r.start = r.start / PAGE_SIZE * PAGE_SIZE;
        r.end = r
            .end
            .div_ceil(PAGE_SIZE)
            .saturating_mul(PAGE_SIZE)
            .min(limit);
    }
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Fills `buf` from `offset`; whatever lies past the end of the file reads as
/// zeros, as pages past the end of a parent image count as zero pages.
pub(crate) fn read_at_or_zero(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn finds_data_between_holes() {
        let f = tempfile::tempfile().unwrap();
        let mib = 1 << 20;
        f.set_len(16 * mib).unwrap();
        f.write_all_at(&[1; 4096], 3 * mib).unwrap();
        f.write_all_at(&[2; 4096], 9 * mib + 4096).unwrap();
        let ranges = data_ranges(&f, 16 * mib).unwrap();
        // Filesystems may report data in larger blocks, never less than written.
        let covered = |off: u64| ranges.iter().any(|r| r.contains(&off));
        assert!(covered(3 * mib) && covered(9 * mib + 4096 + 4095));
        let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        assert!(total < 4 * mib, "{ranges:?}");
    }

    #[test]
    fn empty_and_dense_files() {
        let f = tempfile::tempfile().unwrap();
        assert!(data_ranges(&f, 0).unwrap().is_empty());
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7; 10_000]).unwrap();
        assert_eq!(data_ranges(&f, 10_000).unwrap(), vec![0..10_000]);
    }

    #[test]
    fn page_union_rounds_clips_and_merges() {
        let p = PAGE_SIZE;
        let got = page_union(
            vec![5 * p + 1..5 * p + 2, 0..1, 4 * p..5 * p, 9 * p..100 * p],
            10 * p - 7,
        );
        assert_eq!(got, vec![0..p, 4 * p..6 * p, 9 * p..10 * p]);
    }

    #[test]
    fn reads_past_the_end_as_zeros() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[9; 10]).unwrap();
        let mut buf = [1u8; 16];
        read_at_or_zero(&f, &mut buf, 4).unwrap();
        assert_eq!(&buf[..6], &[9; 6]);
        assert_eq!(&buf[6..], &[0; 10]);
    }
}

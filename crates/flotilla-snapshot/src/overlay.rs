//! Which layer of a chain supplies each page of the rebuilt image: the
//! nearest layer (from the leaf up) that records a change to it. Pages no
//! layer records are zero.
//!
//! Working this out first means every output byte is written once, however
//! often the page changed along the chain.

use std::ops::Range;

use crate::manifest::LayerManifest;

/// For each layer of `chain` (root first), the page ranges whose final bytes
/// come from that layer's data, sorted. Zero extents shadow their ancestors
/// but contribute nothing (the output starts as zeros).
pub(crate) fn plan(chain: &[LayerManifest]) -> Vec<Vec<Range<u64>>> {
    let limit = chain.last().map_or(0, LayerManifest::pages);
    let mut covered: Vec<Range<u64>> = Vec::new();
    let mut plan = vec![Vec::new(); chain.len()];
    for (i, layer) in chain.iter().enumerate().rev() {
        let mut touched = Vec::with_capacity(layer.extents.len());
        let mut j = 0; // first covered range that may meet the current extent
        for e in &layer.extents {
            let span = e.first_page.min(limit)..e.end_page().min(limit);
            if span.is_empty() {
                continue;
            }
            touched.push(span.clone());
            if !e.zero {
                while j < covered.len() && covered[j].end <= span.start {
                    j += 1;
                }
                subtract(span, &covered[j..], &mut plan[i]);
            }
        }
        covered = union(&covered, &touched);
    }
    plan
}

/// Appends the parts of `span` outside `covered` (sorted, disjoint) to `out`.
fn subtract(span: Range<u64>, covered: &[Range<u64>], out: &mut Vec<Range<u64>>) {
    let mut start = span.start;
    for c in covered {
        if c.start >= span.end {
            break;
        }
        if c.start > start {
            out.push(start..c.start);
        }
        start = start.max(c.end);
        if start >= span.end {
            return;
        }
    }
    if start < span.end {
        out.push(start..span.end);
    }
}

/// The union of two sorted lists of disjoint ranges, merged.
fn union(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = if j >= b.len() || (i < a.len() && a[i].start <= b[j].start) {
            i += 1;
            a[i - 1].clone()
        } else {
            j += 1;
            b[j - 1].clone()
        };
        match out.last_mut() {
            Some(last) if next.start <= last.end => last.end = last.end.max(next.end),
            _ => out.push(next),
        }
    }
    out
}

/// The parts of `extent_pages` listed in `wanted` (sorted), starting the
/// search at `*cursor` and leaving it there for the next, later extent.
pub(crate) fn pieces<'a>(
    extent_pages: Range<u64>,
    wanted: &'a [Range<u64>],
    cursor: &mut usize,
) -> impl Iterator<Item = Range<u64>> + 'a {
    while *cursor < wanted.len() && wanted[*cursor].end <= extent_pages.start {
        *cursor += 1;
    }
    wanted[*cursor..]
        .iter()
        .take_while(move |w| w.start < extent_pages.end)
        .map(move |w| w.start.max(extent_pages.start)..w.end.min(extent_pages.end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Extent;
    use crate::{LayerId, PAGE_SIZE};

    fn layer(pages: u64, extents: &[(u64, u64, bool)]) -> LayerManifest {
        LayerManifest {
            id: LayerId("0000000000000000".into()),
            parent: None,
            format_version: 1,
            created_at: String::new(),
            labels: Default::default(),
            memory_size: pages * PAGE_SIZE,
            stored_bytes: 0,
            pages_stored: 0,
            pages_zeroed: 0,
            extents: extents
                .iter()
                .map(|&(first_page, pages, zero)| Extent {
                    first_page,
                    pages,
                    zero,
                    data_offset: 0,
                    sha256: String::new(),
                })
                .collect(),
            disk: None,
            extra_disks: Default::default(),
            pinned: Default::default(),
            data_sha256: String::new(),
            manifest_sha256: String::new(),
        }
    }

    #[test]
    fn nearest_layer_wins() {
        let chain = [
            layer(100, &[(0, 50, false)]),
            layer(100, &[(10, 5, false), (20, 5, true)]),
            layer(100, &[(12, 10, false)]),
        ];
        let p = plan(&chain);
        assert_eq!(p[2], vec![12..22]);
        assert_eq!(p[1], vec![10..12]);
        assert_eq!(p[0], vec![0..10, 25..50]);
    }

    #[test]
    fn a_smaller_leaf_clips_its_ancestors() {
        let chain = [layer(100, &[(0, 100, false)]), layer(30, &[(5, 5, false)])];
        let p = plan(&chain);
        assert_eq!(p[0], vec![0..5, 10..30]);
    }

    #[test]
    fn union_and_subtract() {
        assert_eq!(
            union(&[0..2, 8..9], &[1..4, 5..6, 9..12]),
            vec![0..4, 5..6, 8..12]
        );
        let mut out = Vec::new();
        subtract(0..10, &[2..3, 5..7, 9..20], &mut out);
        assert_eq!(out, vec![0..2, 3..5, 7..9]);
    }

    #[test]
    fn pieces_walk_forward() {
        let wanted = [0..2, 4..6, 8..20];
        let mut cur = 0;
        assert_eq!(
            pieces(1..5, &wanted, &mut cur).collect::<Vec<_>>(),
            vec![1..2, 4..5]
        );
        assert_eq!(
            pieces(5..9, &wanted, &mut cur).collect::<Vec<_>>(),
            vec![5..6, 8..9]
        );
        assert_eq!(pieces(30..40, &wanted, &mut cur).count(), 0);
    }
}

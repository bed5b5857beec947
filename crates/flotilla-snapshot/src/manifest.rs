//! A layer's manifest (`manifest.json`): what the layer holds and the
//! checksums that prove it, and the checks every read goes through.
//!
//! The manifest carries a checksum of itself (`manifest_sha256`, computed over
//! its compact JSON with that field empty), so an edited extent list or size
//! is caught even though the data checksums would still agree with it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::SnapshotError;
use crate::id::LayerId;
use crate::{LAYER_FORMAT_VERSION, MAX_EXTENT_PAGES, PAGE_SIZE};

/// Everything known about one stored layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerManifest {
    pub id: LayerId,
    /// The layer this one is a diff against; `None` for a full layer.
    pub parent: Option<LayerId>,
    pub format_version: u32,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
    /// Free-form (e.g. `vm`, `image`).
    pub labels: BTreeMap<String, String>,
    /// Apparent size of the memory image.
    pub memory_size: u64,
    /// Bytes of page data this layer stores (the size of `memory.data`).
    pub stored_bytes: u64,
    /// Changed non-zero pages stored.
    pub pages_stored: u64,
    /// Pages that became zero against the parent (recorded, no data).
    pub pages_zeroed: u64,
    /// Runs of consecutive changed pages, in page order.
    pub extents: Vec<Extent>,
    pub disk: Option<DiskEntry>,
    /// More disks (a VM's data disks), by name, in `disk-<name>.qcow2`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_disks: BTreeMap<String, DiskEntry>,
    /// Files outside the layer it needs, pinned in the store's `pinned/`
    /// while the layer exists: role (e.g. `kernel`, `disk-base`) to file name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pinned: BTreeMap<String, String>,
    /// SHA-256 of `memory.data`.
    pub data_sha256: String,
    /// SHA-256 of this manifest's compact JSON with this field empty.
    pub manifest_sha256: String,
}

/// A run of consecutive changed pages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    pub first_page: u64,
    pub pages: u64,
    /// The pages became zero: no data is stored for them.
    pub zero: bool,
    /// Where the extent's bytes start in `memory.data`; 0 when `zero`.
    pub data_offset: u64,
    /// SHA-256 of the extent's bytes; empty when `zero`.
    pub sha256: String,
}

/// The layer's disk file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// Always `disk.qcow2`, relative to the layer directory.
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

/// The file name of a layer's disk.
pub const DISK_FILE: &str = "disk.qcow2";

/// The file of the layer's extra disk `name` (`[a-z0-9-]` names only).
pub fn extra_disk_file(name: &str) -> String {
    format!("disk-{name}.qcow2")
}

/// `disk.qcow2` or `disk-<name>.qcow2` with a plain name: never a path.
pub(crate) fn is_disk_file_name(file: &str) -> bool {
    file == DISK_FILE
        || file
            .strip_prefix("disk-")
            .and_then(|f| f.strip_suffix(".qcow2"))
            .is_some_and(|n| {
                !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
}

impl Extent {
    /// One past the last page.
    pub fn end_page(&self) -> u64 {
        self.first_page + self.pages
    }

    /// Bytes this extent occupies in `memory.data`.
    pub fn stored_bytes(&self) -> u64 {
        if self.zero {
            0
        } else {
            self.pages * PAGE_SIZE
        }
    }
}

impl LayerManifest {
    /// Pages in the memory image (a partial last page counts).
    pub fn pages(&self) -> u64 {
        self.memory_size.div_ceil(PAGE_SIZE)
    }

    /// Extents that carry data, in page order (which is also data order).
    pub fn data_extents(&self) -> impl Iterator<Item = &Extent> {
        self.extents.iter().filter(|e| !e.zero)
    }

    /// Fills in `manifest_sha256`.
    pub(crate) fn seal(&mut self) {
        self.manifest_sha256 = self.self_checksum();
    }

    /// The JSON stored as `manifest.json`. (Serializing cannot fail: plain
    /// structs and string-keyed maps.)
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).unwrap_or_default();
        json.push(b'\n');
        json
    }

    /// Parses and checks the manifest stored for `id`.
    pub(crate) fn decode(id: &LayerId, bytes: &[u8]) -> Result<LayerManifest, SnapshotError> {
        // The version decides how to read the rest, so look at it first: a newer
        // layer may have fields this build does not know.
        let probe: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| SnapshotError::corrupt(id, format!("manifest.json is not JSON: {e}")))?;
        let version = probe.get("format_version").and_then(|v| v.as_u64());
        match version {
            Some(v) if v == u64::from(LAYER_FORMAT_VERSION) => {}
            Some(v) if v > u64::from(LAYER_FORMAT_VERSION) => {
                return Err(SnapshotError::VersionUnsupported {
                    id: id.clone(),
                    found: u32::try_from(v).unwrap_or(u32::MAX),
                    supported: LAYER_FORMAT_VERSION,
                })
            }
            _ => {
                return Err(SnapshotError::corrupt(
                    id,
                    format!("manifest.json has no valid format_version ({version:?})"),
                ))
            }
        }
        let m: LayerManifest = serde_json::from_value(probe)
            .map_err(|e| SnapshotError::corrupt(id, format!("manifest.json: {e}")))?;
        m.check(id)?;
        Ok(m)
    }

    /// Consistency checks: the manifest's own checksum, then the structure
    /// the readers rely on (sorted, disjoint, in-bounds extents whose data is
    /// laid out back to back in page order).
    pub(crate) fn check(&self, id: &LayerId) -> Result<(), SnapshotError> {
        let fail = |reason: String| Err(SnapshotError::corrupt(id, reason));
        if &self.id != id {
            return fail(format!("manifest.json names layer {}", self.id));
        }
        if self.manifest_sha256 != self.self_checksum() {
            return fail("manifest.json does not match its checksum (edited or damaged)".into());
        }
        if let Some(parent) = &self.parent {
            if parent == id || !parent.is_valid() {
                return fail(format!("bad parent {parent:?}"));
            }
        }
        if !is_sha256(&self.data_sha256) {
            return fail("data_sha256 is not a SHA-256".into());
        }
        let pages = self.pages();
        let (mut next_page, mut data_offset) = (0u64, 0u64);
        let (mut stored, mut zeroed) = (0u64, 0u64);
        for e in &self.extents {
            let at = e.first_page;
            if e.pages == 0 || e.pages > MAX_EXTENT_PAGES {
                return fail(format!("extent at page {at} has {} pages", e.pages));
            }
            if at < next_page || e.end_page() > pages {
                return fail(format!(
                    "extent at page {at} overlaps another or ends past the image"
                ));
            }
            next_page = e.end_page();
            if e.zero {
                if self.parent.is_none() {
                    return fail(format!("full layer records zero extent at page {at}"));
                }
                if e.data_offset != 0 || !e.sha256.is_empty() {
                    return fail(format!("zero extent at page {at} has data"));
                }
                zeroed += e.pages;
            } else {
                if e.data_offset != data_offset {
                    return fail(format!(
                        "extent at page {at} has data offset {}",
                        e.data_offset
                    ));
                }
                if !is_sha256(&e.sha256) {
                    return fail(format!("extent at page {at} has no valid SHA-256"));
                }
                data_offset += e.stored_bytes();
                stored += e.pages;
            }
        }
        if data_offset != self.stored_bytes
            || stored != self.pages_stored
            || zeroed != self.pages_zeroed
        {
            return fail("page counts do not add up to the extents".into());
        }
        if let Some(disk) = &self.disk {
            if disk.file != DISK_FILE || !is_sha256(&disk.sha256) {
                return fail(format!("bad disk entry {:?}", disk.file));
            }
        }
        for (name, disk) in &self.extra_disks {
            if disk.file != extra_disk_file(name) || !is_sha256(&disk.sha256) {
                return fail(format!("bad disk entry {:?}", disk.file));
            }
        }
        Ok(())
    }

    fn self_checksum(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.manifest_sha256.clear();
        // Struct fields serialize in declaration order and labels are a
        // BTreeMap, so this JSON is canonical.
        let json = serde_json::to_vec(&unsealed).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LayerManifest {
        let sha = hex::encode(Sha256::digest(b"x"));
        let mut m = LayerManifest {
            id: LayerId("00000000000000aa".into()),
            parent: Some(LayerId("00000000000000bb".into())),
            format_version: LAYER_FORMAT_VERSION,
            created_at: "2026-01-01T00:00:00.000Z".into(),
            labels: BTreeMap::from([("vm".into(), "web".into())]),
            memory_size: 10 * PAGE_SIZE + 100,
            stored_bytes: 3 * PAGE_SIZE,
            pages_stored: 3,
            pages_zeroed: 2,
            extents: vec![
                Extent {
                    first_page: 0,
                    pages: 2,
                    zero: false,
                    data_offset: 0,
                    sha256: sha.clone(),
                },
                Extent {
                    first_page: 2,
                    pages: 2,
                    zero: true,
                    data_offset: 0,
                    sha256: String::new(),
                },
                Extent {
                    first_page: 10,
                    pages: 1,
                    zero: false,
                    data_offset: 2 * PAGE_SIZE,
                    sha256: sha.clone(),
                },
            ],
            disk: None,
            extra_disks: Default::default(),
            pinned: Default::default(),
            data_sha256: sha,
            manifest_sha256: String::new(),
        };
        m.seal();
        m
    }

    fn decode(m: &LayerManifest) -> Result<LayerManifest, SnapshotError> {
        LayerManifest::decode(&m.id, &m.to_json())
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(decode(&m).unwrap(), m);
        assert_eq!(m.pages(), 11);
    }

    #[test]
    fn edits_break_the_checksum() {
        let mut m = sample();
        m.extents[0].first_page = 1;
        let err = decode(&m).unwrap_err();
        assert!(err.to_string().contains("00000000000000aa"), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn structural_errors_are_caught_even_when_resealed() {
        type Edit = fn(&mut LayerManifest);
        let cases: Vec<(&str, Edit)> = vec![
            ("overlap", |m| m.extents[1].first_page = 1),
            ("past the end", |m| m.extents[2].first_page = 11),
            ("data offset", |m| m.extents[2].data_offset = 0),
            ("counts", |m| m.stored_bytes += 1),
            ("zero in full", |m| m.parent = None),
            ("self parent", |m| m.parent = Some(m.id.clone())),
            ("huge extent", |m| m.extents[0].pages = MAX_EXTENT_PAGES + 1),
        ];
        for (what, edit) in cases {
            let mut m = sample();
            edit(&mut m);
            m.seal();
            assert!(
                matches!(decode(&m), Err(SnapshotError::Corrupt { .. })),
                "{what}"
            );
        }
    }

    #[test]
    fn newer_versions_and_unknown_fields() {
        let mut m = sample();
        m.format_version = LAYER_FORMAT_VERSION + 1;
        m.seal();
        assert!(matches!(
            decode(&m),
            Err(SnapshotError::VersionUnsupported { found: 2, .. })
        ));

        let m = sample();
        let mut v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        v["surprise"] = 1.into();
        let err = LayerManifest::decode(&m.id, &serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(err, SnapshotError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn wrong_directory_is_refused() {
        let m = sample();
        let other = LayerId("00000000000000cc".into());
        assert!(LayerManifest::decode(&other, &m.to_json()).is_err());
    }
}

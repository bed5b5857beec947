//! The reference graph: which layers are parents of which, which are kept
//! because a referenced layer depends on them, and in what order the others
//! can be removed (children before parents, so a crash midway never leaves
//! a layer whose parent is gone).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::SnapshotError;
use crate::id::LayerId;

/// What `gc` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Children before their parents.
    pub removed: Vec<LayerId>,
    /// Storage freed (allocated bytes of the removed layers' files).
    pub bytes_freed: u64,
}

/// A layer's parent as far as it can be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ParentLink {
    Root,
    Parent(LayerId),
    /// The manifest cannot be read at all.
    Unknown,
}

/// The parent link of every stored layer. Only the `parent` field is read:
/// this is cheap with many large manifests, and a damaged manifest still
/// gives its parent if that field is intact, so one bad layer does not hide
/// the graph.
pub(crate) fn scan(backend: &dyn Backend) -> Result<BTreeMap<LayerId, ParentLink>, SnapshotError> {
    let mut links = BTreeMap::new();
    for id in backend.ids()? {
        let link = match backend.read_manifest(&id) {
            Ok(bytes) => parent_link(&bytes),
            Err(SnapshotError::NotFound { .. }) => continue,
            Err(_) => ParentLink::Unknown,
        };
        links.insert(id, link);
    }
    Ok(links)
}

fn parent_link(bytes: &[u8]) -> ParentLink {
    /// Other fields are skipped unparsed; a missing `parent` is an error
    /// (not `None`), so it cannot pass for a root.
    #[derive(Deserialize)]
    struct ParentOnly {
        parent: serde_json::Value,
    }
    match serde_json::from_slice::<ParentOnly>(bytes).map(|p| p.parent) {
        Ok(serde_json::Value::Null) => ParentLink::Root,
        Ok(serde_json::Value::String(p)) if LayerId(p.clone()).is_valid() => {
            ParentLink::Parent(LayerId(p))
        }
        _ => ParentLink::Unknown,
    }
}

/// The layers whose parent is `id`.
pub(crate) fn children_of(links: &BTreeMap<LayerId, ParentLink>, id: &LayerId) -> Vec<LayerId> {
    links
        .iter()
        .filter(|(_, link)| matches!(link, ParentLink::Parent(p) if p == id))
        .map(|(child, _)| child.clone())
        .collect()
}

/// The layers to remove, children first: all but the held layers and their
/// ancestors. Refuses (naming the layer) when a held layer's ancestry passes
/// through a manifest that cannot be read, as what it depends on is then
/// unknown.
pub(crate) fn removal_order(
    links: &BTreeMap<LayerId, ParentLink>,
    held: &BTreeSet<LayerId>,
) -> Result<Vec<LayerId>, SnapshotError> {
    let mut keep = BTreeSet::new();
    for start in held.iter().filter(|id| links.contains_key(*id)) {
        let mut cur = start.clone();
        while keep.insert(cur.clone()) {
            match links.get(&cur) {
                Some(ParentLink::Parent(p)) => cur = p.clone(),
                Some(ParentLink::Root) | None => break,
                Some(ParentLink::Unknown) => {
                    return Err(SnapshotError::corrupt(
                        &cur,
                        format!(
                            "manifest.json is unreadable, so gc cannot tell which layers the \
                             referenced layer {start} depends on"
                        ),
                    ))
                }
            }
        }
    }
    let mut doomed: Vec<(u64, LayerId)> = links
        .keys()
        .filter(|id| !keep.contains(*id))
        .map(|id| (depth(links, id), id.clone()))
        .collect();
    doomed.sort_by_key(|(depth, id)| (Reverse(*depth), id.clone()));
    Ok(doomed.into_iter().map(|(_, id)| id).collect())
}

/// Ancestors stored above `id`. A layer of unknown parentage counts as very
/// deep (removed first, before the layers it may be a child of), its own
/// children deeper still; a loop stops after as many steps as there are
/// layers.
fn depth(links: &BTreeMap<LayerId, ParentLink>, id: &LayerId) -> u64 {
    let mut depth = 0;
    let mut cur = id;
    for _ in 0..links.len() {
        match links.get(cur) {
            Some(ParentLink::Parent(p)) if links.contains_key(p) => {
                depth += 1;
                cur = p;
            }
            Some(ParentLink::Unknown) => return u64::MAX / 2 + depth,
            _ => break,
        }
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> LayerId {
        LayerId(format!("{n:016x}"))
    }

    /// 1 <- 2 <- 3, 1 <- 4, 5 (alone), 6 <- 7
    fn graph() -> BTreeMap<LayerId, ParentLink> {
        BTreeMap::from([
            (id(1), ParentLink::Root),
            (id(2), ParentLink::Parent(id(1))),
            (id(3), ParentLink::Parent(id(2))),
            (id(4), ParentLink::Parent(id(1))),
            (id(5), ParentLink::Root),
            (id(6), ParentLink::Root),
            (id(7), ParentLink::Parent(id(6))),
        ])
    }

    #[test]
    fn keeps_held_chains_and_removes_children_first() {
        let held = BTreeSet::from([id(3)]);
        let order = removal_order(&graph(), &held).unwrap();
        assert_eq!(order, vec![id(4), id(7), id(5), id(6)]);
    }

    #[test]
    fn nothing_held_removes_everything_leaves_first() {
        let order = removal_order(&graph(), &BTreeSet::new()).unwrap();
        assert_eq!(order, vec![id(3), id(2), id(4), id(7), id(1), id(5), id(6)]);
    }

    #[test]
    fn held_ids_without_a_layer_keep_nothing() {
        let order = removal_order(&graph(), &BTreeSet::from([id(99)])).unwrap();
        assert_eq!(order.len(), 7);
    }

    #[test]
    fn unreadable_ancestry_of_a_held_layer_is_refused() {
        let mut g = graph();
        g.insert(id(2), ParentLink::Unknown);
        let err = removal_order(&g, &BTreeSet::from([id(3)])).unwrap_err();
        assert!(err.to_string().contains(&id(2).to_string()), "{err}");
        // Unheld, it is just garbage, removed first (after its child).
        let order = removal_order(&g, &BTreeSet::from([id(5)])).unwrap();
        assert_eq!(order[..2], [id(3), id(2)]);
    }

    #[test]
    fn children() {
        assert_eq!(children_of(&graph(), &id(1)), vec![id(2), id(4)]);
        assert!(children_of(&graph(), &id(3)).is_empty());
    }

    #[test]
    fn parent_links_from_manifest_bytes() {
        assert_eq!(parent_link(br#"{"parent":null,"x":[1]}"#), ParentLink::Root);
        assert_eq!(
            parent_link(br#"{"extents":[],"parent":"0000000000000001"}"#),
            ParentLink::Parent(id(1))
        );
        for bad in [&br#"{"x":1}"#[..], br#"{"parent":"../x"}"#, b"{ nope"] {
            assert_eq!(parent_link(bad), ParentLink::Unknown);
        }
    }

    #[test]
    fn loops_terminate() {
        let g = BTreeMap::from([
            (id(1), ParentLink::Parent(id(2))),
            (id(2), ParentLink::Parent(id(1))),
        ]);
        assert!(removal_order(&g, &BTreeSet::from([id(1)]))
            .unwrap()
            .is_empty());
        assert_eq!(removal_order(&g, &BTreeSet::new()).unwrap().len(), 2);
    }
}

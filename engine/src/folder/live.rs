//! Which contents a folder's live files have now ([`LiveRoots`]): what a device or the cloud
//! checks before it serves or stores content ("no live file of the folder has that content" is
//! refused), kept up to date from the replica's change log, so a check costs a lookup, not a
//! walk over the folder.

use std::collections::BTreeMap;

use super::entry::{ContentHash, FileEntry};
use crate::feedsync::{Item, ItemId};
use crate::replica::{Cursor, Replica};

/// The (root, size) of every live version (winner or conflict) of a folder's files.
#[derive(Clone, Debug, Default)]
pub struct LiveRoots {
    cursor: Option<Cursor>,
    by_item: BTreeMap<ItemId, Vec<(ContentHash, u64)>>,
    count: BTreeMap<(ContentHash, u64), u32>,
}

/// The contents of an item's live versions that are file entries.
pub fn live_contents(item: &Item) -> Vec<(ContentHash, u64)> {
    let mut out: Vec<(ContentHash, u64)> = std::iter::once(&item.version)
        .chain(item.conflicts.iter())
        .filter(|v| !v.deleted)
        .filter_map(|v| FileEntry::from_version(v).ok())
        .map(|e| (e.root, e.size))
        .collect();
    out.sort();
    out.dedup();
    out
}

impl LiveRoots {
    /// Catches up with `replica`: the items changed since the last call (all of them the first
    /// time, or when the replica's epoch changed).
    pub fn update(&mut self, replica: &Replica) {
        let now = replica.cursor();
        match self.cursor {
            Some(c) if c == now => return,
            Some(c) if c.epoch == now.epoch => {
                // Bound: the replica's changes since the last update, each item once per change.
                let changed: Vec<&std::sync::Arc<Item>> =
                    replica.changes_since(c.seq).map(|(_, i)| i).collect();
                for item in changed {
                    self.set(item.id().clone(), live_contents(item));
                }
            }
            _ => {
                *self = Self::default();
                // Bound: the replica's items.
                for item in replica.items() {
                    self.set(item.id().clone(), live_contents(item));
                }
            }
        }
        self.cursor = Some(now);
    }

    fn set(&mut self, id: ItemId, contents: Vec<(ContentHash, u64)>) {
        if let Some(old) = self.by_item.remove(&id) {
            for c in old {
                if let Some(n) = self.count.get_mut(&c) {
                    *n -= 1;
                    if *n == 0 {
                        self.count.remove(&c);
                    }
                }
            }
        }
        if contents.is_empty() {
            return;
        }
        for c in &contents {
            *self.count.entry(*c).or_insert(0) += 1;
        }
        self.by_item.insert(id, contents);
    }

    /// Whether a live file of the folder has this content.
    pub fn contains(&self, root: &ContentHash, size: u64) -> bool {
        self.count.contains_key(&(*root, size))
    }

    /// Every live content, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &(ContentHash, u64)> {
        self.count.keys()
    }
}

//! Local operations (create, update, delete, resolve) and sparse purge. Pure: the caller passes
//! the endpoint (`by`) and the time (`when`); nothing here reads a clock.

use std::sync::Arc;

use super::limits;
use super::merge::compare;
use super::model::{Content, Endpoint, Feed, HistoryEntry, Item, ItemId, NsScope, Version, When};
use super::FeedsyncError;

/// What a local change sets besides the sync metadata.
#[derive(Clone, Debug, Default)]
pub struct Edit {
    /// New content; `None` keeps the current content.
    pub content: Option<Arc<Content>>,
    /// Make the result a tombstone (`deleted = true`); otherwise the result is live.
    pub delete: bool,
    /// Resolve every conflict of the item (spec 3.4).
    pub resolve: bool,
}

impl Item {
    /// Create (spec 3.1): `updates = 1`, history `(1, when, by)`.
    pub fn create(id: ItemId, by: &Endpoint, when: &When, content: Arc<Content>, noconflicts: bool) -> Item {
        let entry = HistoryEntry { sequence: 1, when: Some(when.whole_seconds()), by: Some(by.clone()) };
        Item::new(Version {
            id,
            updates: 1,
            deleted: false,
            noconflicts,
            history: Arc::from(vec![entry]),
            content,
            signature: None,
        })
    }

    /// Update (spec 3.2), delete (an update with `deleted`), or resolve (spec 3.4), by `edit`.
    pub fn update(&self, by: &Endpoint, when: &When, edit: &Edit) -> Result<Item, FeedsyncError> {
        let current = &self.version;
        let updates = current
            .updates
            .checked_add(1)
            .ok_or(FeedsyncError::UpdatesOverflow { id: current.id.clone() })?;
        let top = HistoryEntry { sequence: updates, when: Some(when.whole_seconds()), by: Some(by.clone()) };
        let mut history: Vec<HistoryEntry> = Vec::with_capacity(current.history.len() + 1);
        history.push(top);
        history.extend(current.history.iter().cloned());

        // Resolve (3.4) folds every conflict into the new version. A plain update drops the
        // conflicts whose topmost `by` is us and (our deviation, see the profile) folds their
        // history in the same way, and does the same for every conflict the new version now
        // subsumes (a twin of a version in its history): the new version has seen them, its
        // history must say so, and no conflict may be subsumed by its winner, or subsumption
        // stops being transitive and merges stop converging.
        let mut pending: Vec<&Version> = self.conflicts.iter().collect();
        let mut at = 1;
        loop {
            let covers = |c: &Version| c.topmost().known_in(&history);
            let (fold, keep): (Vec<&Version>, Vec<&Version>) = pending.into_iter().partition(|c| {
                edit.resolve || c.topmost().by.as_ref().is_some_and(|b| b.same(by)) || covers(c)
            });
            pending = keep;
            if fold.is_empty() {
                break;
            }
            // Fold each one's unsubsumed entries in right after the topmost entry, keeping
            // their order; check against the history as it grows, so nothing is folded twice.
            for conflict in fold {
                for entry in conflict.history.iter() {
                    if !entry.known_in(&history) {
                        history.insert(at, entry.clone());
                        at += 1;
                    }
                }
            }
        }
        // Sparse at write time (3.5 applied to every update, see the profile): one entry per
        // endpoint, the newest, so a history grows with the endpoints that wrote the item, not
        // with its updates. Subsumption is unchanged (an endpoint's highest sequence subsumes
        // all its lower ones) and a signed version is signed sparse, so nothing purges it later.
        if history.len() > 1 {
            history = sparse_purge(&history);
            if history.len() > limits::HISTORY_PER_VERSION_MAX {
                return Err(FeedsyncError::HistoryTooLong { id: current.id.clone() });
            }
        }
        let mut version = Version {
            id: current.id.clone(),
            updates,
            deleted: edit.delete,
            noconflicts: current.noconflicts,
            history: Arc::from(history),
            content: edit.content.clone().unwrap_or_else(|| current.content.clone()),
            signature: None,
        };
        // A history that makes the version too large for a sync message is purged (3.5) first.
        if super::model::VARINT + version.encoded_bound() > limits::ITEM_ENCODED_MAX {
            version.history = Arc::from(sparse_purge(&version.history));
        }
        // The winner has the greatest `updates` of its item, so ours (one more) beats every
        // conflict; the conflicts keep their best-first order, as many as fit (the merge's rule).
        let conflicts = super::merge::fit_conflicts(&version, pending);
        let item = Item { version, conflicts };
        debug_assert!(item.conflicts.iter().all(|c| compare(&item.version, c).is_gt()));
        Ok(item)
    }

    /// Sparse purge of the item and of each of its conflicts.
    pub fn purged(&self) -> Item {
        // A purged version is another version: its signature (if any) no longer holds.
        let purge = |v: &Version| Version {
            history: Arc::from(sparse_purge(&v.history)),
            signature: None,
            ..v.clone()
        };
        Item { version: purge(&self.version), conflicts: self.conflicts.iter().map(purge).collect() }
    }
}

/// Keeps only the highest-`sequence` entry per `by` (the first such, topmost first) and every entry
/// without `by`, in their order. `updates` is not touched.
pub fn sparse_purge(history: &[HistoryEntry]) -> Vec<HistoryEntry> {
    // Every write purges, and a sparse history holds one entry per endpoint that wrote the item:
    // usually a handful, where a pairwise scan beats building a map.
    const SCAN_MAX: usize = 32;
    if history.len() <= SCAN_MAX {
        let newest = |i: usize, entry: &HistoryEntry| match &entry.by {
            None => true,
            Some(by) => history.iter().enumerate().all(|(j, other)| {
                j == i
                    || !other.by.as_ref().is_some_and(|b| b.same(by))
                    || other.sequence < entry.sequence
                    || (other.sequence == entry.sequence && j > i)
            }),
        };
        return history.iter().enumerate().filter(|&(i, e)| newest(i, e)).map(|(_, e)| e.clone()).collect();
    }
    sparse_purge_indexed(history)
}

/// [`sparse_purge`] through a map of each endpoint's newest entry, for long histories.
fn sparse_purge_indexed(history: &[HistoryEntry]) -> Vec<HistoryEntry> {
    // For each endpoint, the index of its entry with the highest sequence (topmost on ties).
    let mut best: std::collections::BTreeMap<&str, (u32, usize)> = std::collections::BTreeMap::new();
    for (i, entry) in history.iter().enumerate() {
        if let Some(by) = &entry.by {
            let slot = best.entry(by.as_str()).or_insert((entry.sequence, i));
            if entry.sequence > slot.0 {
                *slot = (entry.sequence, i);
            }
        }
    }
    history
        .iter()
        .enumerate()
        .filter(|(i, entry)| match &entry.by {
            None => true,
            Some(by) => best.get(by.as_str()).is_some_and(|&(_, j)| j == *i),
        })
        .map(|(_, entry)| entry.clone())
        .collect()
}

impl Item {
    /// A local change to `current` (an update, delete or resolve), or, when there is no item
    /// yet, its creation (a tombstone if `edit.delete`); new content defaults to empty content in
    /// `scope`.
    pub fn change(
        current: Option<&Item>,
        id: &ItemId,
        by: &Endpoint,
        when: &When,
        edit: &Edit,
        scope: &Arc<NsScope>,
    ) -> Result<Item, FeedsyncError> {
        // Every local write (CLI, local API, simulator) goes through here: its content is checked
        // as received content is (`Version::check_invariants`).
        if let Some(content) = &edit.content {
            super::xml::check_content(content)
                .map_err(|problem| FeedsyncError::Content { id: id.clone(), problem })?;
        }
        let item = match current {
            Some(item) => item.update(by, when, edit)?,
            None => {
                let content = edit.content.clone().unwrap_or_else(|| {
                    Arc::new(Content { attrs: "".into(), inner: "".into(), scope: scope.clone() })
                });
                let mut item = Item::create(id.clone(), by, when, content, false);
                item.version.deleted = edit.delete;
                item
            }
        };
        // An item that cannot travel in one sync message is never made (it would stall every
        // session that tried to send it).
        let bytes = item.encoded_bound();
        if bytes > limits::ITEM_ENCODED_MAX {
            return Err(FeedsyncError::TooLarge { id: id.clone(), bytes });
        }
        Ok(item)
    }
}

impl Feed {
    /// Creates the item if absent (then applies `edit.delete`), otherwise updates it.
    pub fn change(
        &mut self,
        id: &ItemId,
        by: &Endpoint,
        when: &When,
        edit: &Edit,
    ) -> Result<&Item, FeedsyncError> {
        let next = Item::change(self.items.get(id), id, by, when, edit, &self.envelope.scope)?;
        self.put(next)?;
        Ok(&self.items[id])
    }

    /// Sparse purge of every synced item.
    pub fn purge(&mut self) {
        for item in self.items.values_mut() {
            *item = item.purged();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn history(entries: &[(u32, Option<u8>)]) -> Vec<HistoryEntry> {
        entries
            .iter()
            .map(|&(sequence, by)| HistoryEntry {
                sequence,
                when: Some(When::from_unix_secs(i64::from(sequence)).unwrap()),
                by: by.map(|b| Endpoint::new(&format!("e{b}")).unwrap()),
            })
            .collect()
    }

    proptest! {
        /// The pairwise scan for short histories keeps exactly what the indexed purge keeps.
        #[test]
        fn the_scan_and_the_index_purge_alike(
            entries in proptest::collection::vec((1u32..8, proptest::option::weighted(0.9, 0u8..5)), 1..40)
        ) {
            let history = history(&entries);
            prop_assert_eq!(sparse_purge(&history), sparse_purge_indexed(&history));
        }
    }

    #[test]
    fn an_update_keeps_one_entry_per_endpoint() {
        let a = Endpoint::new("a").unwrap();
        let b = Endpoint::new("b").unwrap();
        let when = When::from_unix_secs(1_000).unwrap();
        let content = Arc::new(Content::empty());
        let mut item = Item::create(ItemId::new("x").unwrap(), &a, &when, content, false);
        for round in 0..1_000 {
            let by = if round % 3 == 0 { &b } else { &a };
            item = item.update(by, &when, &Edit::default()).unwrap();
        }
        assert_eq!(item.version.updates, 1_001);
        let bys: Vec<&str> = item.version.history.iter().map(|h| h.by.as_ref().unwrap().as_str()).collect();
        assert_eq!(bys, ["b", "a"], "the newest entry of each endpoint, newest first");
        assert_eq!(item.version.history[0].sequence, 1_001);
    }
}

//! The merge workload in automerge terms, side by side with [`crate::feedsync_workload`]: item
//! `i` is a map under `ROOT` at key [`crate::item_id`]`(i)` with fields `title` and
//! `description`; each FeedSync update is one automerge change (creation: the map and both
//! fields; update: a new `title`), so an item with history `h` took `h` changes. The incoming
//! batch is [`crate::BATCH_ITEMS`] changes, one per picked item, made by another actor on a fork.
//!
//! A concurrent item is one whose last local change happened after the fork point, so the
//! remote's change to the same field is concurrent with it and automerge keeps both values (a
//! conflict). For `h = 1` that last change is the creation: the remote creates the same key on
//! its own, as in the FeedSync workload.
//!
//! To serve every conflict fraction from one local document, the last round of local changes is
//! applied in a fixed order (unpicked items first, then the picked ones from the last pick to the
//! first) and the remote forks off right before the last `k` of them, for each wanted `k`.

use std::collections::BTreeMap;

use automerge::transaction::{CommitOptions, Transactable as _};
use automerge::{ActorId, Automerge, Change, ObjId, ObjType, ReadDoc as _, Value, ROOT};

use crate::{
    concurrent_items, description, item_id, local_endpoint, picked_items, round_unix_secs, title,
    REMOTE_ENDPOINT,
};

/// A local automerge document and, per concurrent fraction, the incoming batch of changes.
#[derive(Debug)]
pub struct AutomergeWorkload {
    pub items: usize,
    pub history: usize,
    /// The store: `items` maps, `items * history` changes.
    pub local: Automerge,
    /// Incoming batches by number of concurrent items.
    batches: BTreeMap<usize, Vec<Change>>,
}

fn actor(name: &str) -> ActorId {
    ActorId::from(name.as_bytes())
}

fn commit_options(index: usize, round: usize) -> CommitOptions {
    CommitOptions::default().with_time(round_unix_secs(index, round))
}

impl AutomergeWorkload {
    /// Builds the local document of `items` items with `history` changes each, and one batch per
    /// fraction in `concurrent_ppm`. Panics if `history == 0` or `items < BATCH_ITEMS`.
    pub fn build(items: usize, history: usize, concurrent_ppm: &[u32]) -> Self {
        assert!(history >= 1, "an item has at least one change");
        let picks = picked_items(items);
        let mut picked = vec![false; items];
        for &index in &picks {
            picked[index] = true;
        }
        let mut local = Automerge::new();
        let mut objs: Vec<Option<ObjId>> = vec![None; items];

        for round in 0..history - 1 {
            local.set_actor(actor(local_endpoint(round)));
            for index in 0..items {
                local_change(&mut local, &mut objs, index, round);
            }
        }

        // The last round, in an order that puts the picked items last, the first pick very last.
        let last = history - 1;
        let order: Vec<usize> =
            (0..items).filter(|&index| !picked[index]).chain(picks.iter().rev().copied()).collect();
        // Fork points: the distinct k, largest first (the earliest fork point).
        let mut forks: Vec<usize> = concurrent_ppm.iter().map(|&ppm| concurrent_items(ppm)).collect();
        forks.sort_unstable_by(|a, b| b.cmp(a));
        forks.dedup();
        let mut forks = forks.into_iter().peekable();
        let mut batches = BTreeMap::new();
        local.set_actor(actor(local_endpoint(last)));
        for position in 0..=order.len() {
            let remaining = order.len() - position;
            while let Some(k) = forks.next_if(|&k| k == remaining) {
                batches.insert(k, remote_batch(&local, &picks, history));
            }
            if let Some(&index) = order.get(position) {
                local_change(&mut local, &mut objs, index, last);
            }
        }
        assert!(forks.peek().is_none(), "a concurrent count above the batch size");
        Self { items, history, local, batches }
    }

    /// The incoming batch for a concurrent fraction given to [`Self::build`].
    pub fn batch(&self, concurrent_ppm: u32) -> Option<&Vec<Change>> {
        self.batches.get(&concurrent_items(concurrent_ppm))
    }

    /// Items of `doc` (among the picked ones) where a field or the item itself has more than one
    /// value: automerge's conflicts.
    pub fn items_with_conflicts(&self, doc: &Automerge) -> usize {
        picked_items(self.items)
            .into_iter()
            .filter(|&index| {
                let key = item_id(index);
                let values = doc.get_all(ROOT, key.as_str()).unwrap_or_default();
                if values.len() > 1 {
                    return true;
                }
                match doc.get(ROOT, key.as_str()) {
                    Ok(Some((Value::Object(ObjType::Map), obj))) => {
                        doc.get_all(&obj, "title").map(|titles| titles.len() > 1).unwrap_or(false)
                    }
                    _ => false,
                }
            })
            .count()
    }
}

/// One local change: round 0 creates item `index`'s map, later rounds set a new title.
fn local_change(doc: &mut Automerge, objs: &mut [Option<ObjId>], index: usize, round: usize) {
    let mut tx = doc.transaction();
    // Puts into ROOT or into a map this document created cannot fail.
    let failed = "put into a map of this document";
    match &objs[index] {
        None => {
            let obj = tx.put_object(ROOT, item_id(index), ObjType::Map).expect(failed);
            tx.put(&obj, "title", title(index, round, false)).expect(failed);
            tx.put(&obj, "description", description(index)).expect(failed);
            objs[index] = Some(obj);
        }
        Some(obj) => {
            tx.put(obj, "title", title(index, round, false)).expect(failed);
        }
    }
    tx.commit_with(commit_options(index, round));
}

/// The remote's batch against `snapshot`: a fork with the remote actor sets a new title on every
/// picked item (creating the item if the snapshot lacks it), one change each, in pick order.
fn remote_batch(snapshot: &Automerge, picks: &[usize], history: usize) -> Vec<Change> {
    let heads = snapshot.get_heads();
    let mut remote = snapshot.clone();
    remote.set_actor(actor(REMOTE_ENDPOINT));
    // Puts into ROOT or into a map of this document cannot fail.
    let failed = "put into a map of the forked document";
    for &index in picks {
        let key = item_id(index);
        let existing = match remote.get(ROOT, key.as_str()) {
            Ok(Some((Value::Object(ObjType::Map), obj))) => Some(obj),
            _ => None,
        };
        let mut tx = remote.transaction();
        match existing {
            Some(obj) => {
                tx.put(&obj, "title", title(index, history, true)).expect(failed);
            }
            None => {
                let obj = tx.put_object(ROOT, key.as_str(), ObjType::Map).expect(failed);
                tx.put(&obj, "title", title(index, history, true)).expect(failed);
                tx.put(&obj, "description", description(index)).expect(failed);
            }
        }
        tx.commit_with(commit_options(index, history));
    }
    remote.get_changes(&heads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feedsync_workload;
    use crate::{Cell, BATCH_ITEMS};

    const ITEMS: usize = BATCH_ITEMS;

    #[test]
    fn conflict_fraction_yields_that_many_conflicts_in_automerge_and_feedsync() {
        for history in [1, 2] {
            let ppms = [0, 10_000, 1_000_000];
            let workload = AutomergeWorkload::build(ITEMS, history, &ppms);
            assert_eq!(workload.local.length(ROOT), ITEMS);
            assert_eq!(workload.local.get_changes(&[]).len(), ITEMS * history);
            assert_eq!(workload.items_with_conflicts(&workload.local), 0);
            for ppm in ppms {
                let cell = Cell { items: ITEMS, concurrent_ppm: ppm, history };
                let changes = workload.batch(ppm).expect("batch built for this fraction");
                assert_eq!(changes.len(), BATCH_ITEMS, "{cell:?}");
                let mut doc = workload.local.clone();
                doc.apply_changes(changes.clone()).expect("batch applies");
                assert_eq!(doc.length(ROOT), ITEMS, "{cell:?}");
                assert_eq!(workload.items_with_conflicts(&doc), cell.concurrent_items(), "{cell:?}");

                // The FeedSync side of the same cell has the same counts.
                let mut feed = feedsync_workload::store(ITEMS, history);
                let batch = feedsync_workload::batch(&cell);
                assert_eq!(feed.len(), doc.length(ROOT), "{cell:?}");
                assert_eq!(batch.feed.len(), changes.len(), "{cell:?}");
                feedsync_workload::merge_batch(&mut feed, &batch.feed);
                assert_eq!(
                    feedsync_workload::items_with_conflicts(&feed),
                    workload.items_with_conflicts(&doc),
                    "{cell:?}"
                );
            }
        }
    }
}

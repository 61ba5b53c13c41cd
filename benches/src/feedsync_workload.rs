//! The merge workload in FeedSync terms (see the crate docs): a store of `n` items with `h`
//! history entries each, built directly as versions, and an incoming batch of *parsed* items
//! (built, written as FeedSync XML and read back, so ids, endpoints and content are fresh
//! allocations as they would be off the wire).

use std::sync::Arc;

use engine::feedsync::xml::{read_feed, write_feed};
use engine::feedsync::{
    merge_one, Content, Dialect, Endpoint, Feed, HistoryEntry, Item, ItemId, MergeStats, Version, When,
};

use crate::{
    description, item_id, local_endpoint, picked_items, round_unix_secs, title, Cell, REMOTE_ENDPOINT,
};

/// One shared `Endpoint` per endpoint name, as a replica holds them.
#[derive(Clone, Debug)]
struct Endpoints {
    local: [Endpoint; 2],
    remote: Endpoint,
}

impl Endpoints {
    fn new() -> Self {
        // The endpoint names are short non-empty constants, within BY_BYTES_MAX.
        let endpoint = |name: &str| Endpoint::new(name).expect("constant endpoint names are valid");
        Self {
            local: [endpoint(local_endpoint(0)), endpoint(local_endpoint(1))],
            remote: endpoint(REMOTE_ENDPOINT),
        }
    }

    fn local(&self, round: usize) -> &Endpoint {
        &self.local[round % self.local.len()]
    }
}

fn when(index: usize, round: usize) -> When {
    // round_unix_secs stays within a few years of 2023, inside When's years 0000..=9999.
    When::from_unix_secs(round_unix_secs(index, round)).expect("bench times are in range")
}

fn id(index: usize) -> ItemId {
    // item_id writes letters, digits, `:` and `-` only, far below ID_BYTES_MAX.
    ItemId::new(&item_id(index)).expect("bench item ids are valid")
}

/// Item `index`'s local history after `rounds` updates (rounds `0..rounds`), topmost first.
fn local_history(index: usize, rounds: usize, endpoints: &Endpoints) -> Vec<HistoryEntry> {
    (0..rounds)
        .rev()
        .map(|round| HistoryEntry {
            // Rounds are bounded by the grid's history lengths (at most a few hundred).
            sequence: u32::try_from(round + 1).expect("history fits in u32"),
            when: Some(when(index, round)),
            by: Some(endpoints.local(round).clone()),
        })
        .collect()
}

fn content(feed: &Feed, index: usize, round: usize, remote: bool) -> Arc<Content> {
    let inner = format!(
        "<title>{}</title><description>{}</description>",
        title(index, round, remote),
        description(index)
    );
    Arc::new(Content { attrs: "".into(), inner: inner.into(), scope: feed.envelope.scope.clone() })
}

/// The store: `items` RSS items, item `i` with id [`item_id`]`(i)`, `history` updates (history
/// length `history`, `updates = history`, entries by the two local endpoints in turn), no
/// conflicts. Panics if `history == 0`.
pub fn store(items: usize, history: usize) -> Feed {
    assert!(history >= 1, "an item has at least one history entry");
    let endpoints = Endpoints::new();
    let mut feed = Feed::new(Dialect::Rss);
    for index in 0..items {
        let version = Version {
            id: id(index),
            // Bounded as in local_history.
            updates: u32::try_from(history).expect("history fits in u32"),
            deleted: false,
            noconflicts: false,
            history: Arc::from(local_history(index, history, &endpoints)),
            content: content(&feed, index, history - 1, false),
            signature: None,
        };
        // The grid's store sizes are far below ITEMS_PER_FEED_MAX.
        feed.put(Item::new(version)).expect("store size within ITEMS_PER_FEED_MAX");
    }
    feed
}

/// An incoming batch, parsed from FeedSync XML.
#[derive(Clone, Debug)]
pub struct Batch {
    /// The parsed feed: [`crate::BATCH_ITEMS`] items in batch order.
    pub feed: Feed,
    /// Size of the XML it was read from.
    pub xml_bytes: usize,
    /// How many of its items are concurrent with the store's versions.
    pub concurrent: usize,
}

/// The incoming batch of `cell` against [`store`]`(cell.items, cell.history)`: item `j` updates
/// store item [`picked_items`]`(n)[j]`, by the remote endpoint in round `h`; the first
/// `cell.concurrent_items()` are made from the store version's parent (concurrent), the rest
/// from the store version itself (strictly newer).
pub fn batch(cell: &Cell) -> Batch {
    assert!(cell.history >= 1, "an item has at least one history entry");
    let endpoints = Endpoints::new();
    let concurrent = cell.concurrent_items();
    let h = cell.history;
    let mut built = Feed::new(Dialect::Rss);
    for (j, &index) in picked_items(cell.items).iter().enumerate() {
        // Concurrent: made from the base the store's last update was made from (h - 1 rounds).
        let base_rounds = if j < concurrent { h - 1 } else { h };
        let mut history = Vec::with_capacity(base_rounds + 1);
        history.push(HistoryEntry {
            sequence: u32::try_from(base_rounds + 1).expect("history fits in u32"),
            when: Some(when(index, h)),
            by: Some(endpoints.remote.clone()),
        });
        history.extend(local_history(index, base_rounds, &endpoints));
        let version = Version {
            id: id(index),
            updates: u32::try_from(base_rounds + 1).expect("history fits in u32"),
            deleted: false,
            noconflicts: false,
            history: Arc::from(history),
            content: content(&built, index, h, true),
            signature: None,
        };
        // Picks are distinct and BATCH_ITEMS is far below ITEMS_PER_FEED_MAX.
        built.put(Item::new(version)).expect("batch size within ITEMS_PER_FEED_MAX");
    }
    let xml = write_feed(&built);
    let feed = match read_feed(xml.as_bytes()) {
        Ok(feed) => feed,
        Err(err) => panic!("the engine cannot read back the batch it wrote: {err}"),
    };
    assert_eq!(feed.len(), built.len(), "batch items lost in the XML round trip");
    assert!(feed.canonical_items() == built.canonical_items(), "batch items changed in the XML round trip");
    Batch { feed, xml_bytes: xml.len(), concurrent }
}

/// The measured routine: merges every item of `batch` into `store`, one `merge_one` each (as a
/// replica does with a feed it has just read).
pub fn merge_batch(store: &mut Feed, batch: &Feed) -> MergeStats {
    let mut stats = MergeStats::default();
    for item in batch.items() {
        merge_one(store, item, &mut stats);
    }
    stats
}

/// Items of `feed` that hold at least one conflict.
pub fn items_with_conflicts(feed: &Feed) -> usize {
    feed.items().filter(|item| !item.conflicts.is_empty()).count()
}

/// The feed the XML benchmark reads and writes: the store of `cell` with `cell`'s batch merged
/// in (so the concurrent items carry one conflict each).
pub fn merged_feed(cell: &Cell) -> Feed {
    let mut feed = store(cell.items, cell.history);
    let batch = batch(cell);
    merge_batch(&mut feed, &batch.feed);
    feed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BATCH_ITEMS;

    fn cell(concurrent_ppm: u32, history: usize) -> Cell {
        Cell { items: 20_000, concurrent_ppm, history }
    }

    #[test]
    fn store_has_the_asked_shape() {
        let feed = store(1_000, 8);
        assert_eq!(feed.len(), 1_000);
        feed.check_invariants().expect("store is valid");
        for item in feed.items() {
            assert_eq!(item.version.history.len(), 8);
            assert_eq!(item.version.updates, 8);
            assert!(item.conflicts.is_empty());
        }
    }

    #[test]
    fn conflict_fraction_yields_that_many_conflicts() {
        for (ppm, history) in [(0, 1), (10_000, 1), (10_000, 8), (250_000, 3), (1_000_000, 2)] {
            let cell = cell(ppm, history);
            let mut feed = store(cell.items, cell.history);
            let batch = batch(&cell);
            assert_eq!(batch.feed.len(), BATCH_ITEMS);
            let stats = merge_batch(&mut feed, &batch.feed);
            assert_eq!(stats.changed, BATCH_ITEMS as u64, "{cell:?}");
            assert_eq!(stats.added, 0, "{cell:?}");
            assert_eq!(feed.len(), cell.items, "{cell:?}");
            assert_eq!(items_with_conflicts(&feed), cell.concurrent_items(), "{cell:?}");
            feed.check_invariants().expect("merged store is valid");
            // Merging the same batch again changes nothing.
            let again = merge_batch(&mut feed, &batch.feed);
            assert_eq!(again.unchanged, BATCH_ITEMS as u64, "{cell:?}");
        }
    }

    #[test]
    fn batch_is_deterministic() {
        let cell = cell(10_000, 2);
        let (a, b) = (batch(&cell), batch(&cell));
        assert_eq!(write_feed(&a.feed), write_feed(&b.feed));
        assert_eq!(a.concurrent, 100);
    }
}

//! Models shared by the law tests: endpoints that make FeedSync changes to a few items and exchange
//! item states by merge. The property tests drive them randomly, the exhaustive test drives them
//! through every schedule of a small scope; both compare replicas by their canonical item sets.

pub mod model;

use std::sync::Arc;

use engine::feedsync::{self, Content, Dialect, Edit, Endpoint, Feed, Item, ItemId, When};

/// What an endpoint does to one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Update,
    Delete,
    Resolve,
}

pub const OPS: [Op; 3] = [Op::Update, Op::Delete, Op::Resolve];

/// Endpoint names: fixed, so that `by` tie-breaks are exercised in a known order.
pub fn endpoint(index: usize) -> Endpoint {
    const NAMES: [&str; 4] = ["ep-a", "ep-b", "ep-c", "ep-d"];
    Endpoint::new(NAMES[index % NAMES.len()]).expect("constant names are valid endpoints")
}

pub fn item_id(index: usize) -> ItemId {
    ItemId::new(&format!("item-{index}")).expect("generated ids are valid")
}

/// `when` for an endpoint's k-th change: clocks tie across endpoints on purpose (the `by` rule
/// then decides), and a skew can make a later change carry an earlier time.
pub fn when(step: u32, skew_secs: i64) -> When {
    When::from_unix_secs(1_700_000_000 + i64::from(step) * 10 + skew_secs).expect("in range")
}

/// The content an endpoint writes: unique per (endpoint, step), so distinct changes differ.
pub fn content(feed: &Feed, endpoint: usize, step: u32) -> Arc<Content> {
    Arc::new(Content {
        attrs: "".into(),
        inner: format!("<title>by {endpoint} at {step}</title>").into(),
        scope: feed.envelope.scope.clone(),
    })
}

/// Applies a local operation of `endpoint` at its `step` to `item` in `feed`.
pub fn apply(feed: &mut Feed, endpoint_index: usize, item: &ItemId, op: Op, step: u32, skew_secs: i64) {
    let by = endpoint(endpoint_index);
    let at = when(step, skew_secs);
    let edit = Edit {
        content: Some(content(feed, endpoint_index, step)),
        delete: op == Op::Delete,
        resolve: op == Op::Resolve,
    };
    feed.change(item, &by, &at, &edit).expect("a local change within the limits succeeds");
}

/// A copy of `local` with `incoming` merged in.
pub fn merged(local: &Feed, incoming: &Feed) -> Feed {
    let mut out = local.clone();
    feedsync::merge_feed(&mut out, incoming).expect("same dialect");
    out
}

/// Merges a single item state into a feed.
pub fn deliver(feed: &mut Feed, item: &Item) {
    let mut stats = feedsync::MergeStats::default();
    feedsync::merge_one(feed, item, &mut stats);
}

/// Canonical, order-independent, readable text of a feed's FeedSync state: per item (by id), the
/// winner then each conflict, with every field that makes a version what it is.
pub fn state_bytes(feed: &Feed) -> String {
    let mut out = String::new();
    for item in feed.canonical_items() {
        out.push_str(&describe_version("item", &item.version));
        for conflict in &item.conflicts {
            out.push_str(&describe_version("  conflict", conflict));
        }
    }
    out
}

/// One line per version: id, updates, flags, history `seq@by/when`, content.
pub fn describe_version(label: &str, v: &feedsync::Version) -> String {
    let history: Vec<String> = v
        .history
        .iter()
        .map(|h| {
            let by = h.by.as_ref().map(|b| b.as_str().to_string()).unwrap_or_default();
            let when = h.when.as_ref().map(|w| w.to_rfc3339()).unwrap_or_default();
            format!("{}@{by}/{when}", h.sequence)
        })
        .collect();
    format!(
        "{label} {} u={}{}{} [{}] {}\n",
        v.id,
        v.updates,
        if v.deleted { " deleted" } else { "" },
        if v.noconflicts { " noconflicts" } else { "" },
        history.join(" "),
        v.content.inner
    )
}

pub fn empty_feed() -> Feed {
    Feed::new(Dialect::Rss)
}

/// Every write `(by, sequence)` made is still visible in the final item: as the winner, a
/// conflict, or subsumed by an entry of one of them. Returns the writes that are not.
pub fn lost_writes(item: &Item, writes: &[(Endpoint, u32)]) -> Vec<(Endpoint, u32)> {
    let versions: Vec<&feedsync::Version> = std::iter::once(&item.version).chain(&item.conflicts).collect();
    writes
        .iter()
        .filter(|(by, seq)| {
            !versions
                .iter()
                .any(|v| v.history.iter().any(|h| h.by.as_ref() == Some(by) && h.sequence >= *seq))
        })
        .cloned()
        .collect()
}

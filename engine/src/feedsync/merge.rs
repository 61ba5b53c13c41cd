//! FeedSync merge (spec 3.3) with the winner rule, the deterministic tie-break and the twins rule.
//!
//! Merge is total: merging two valid items or feeds cannot fail (only the dialect check can, and
//! it happens before any item is touched). The result never depends on which side is local.

use std::cmp::Ordering;

use super::canonical::encode_version;
use super::limits;
use super::model::{Feed, Item, Version};
use super::FeedsyncError;

/// The winner rule: "X beats Y". A strict total order on distinct versions.
///
/// 1. greater `updates`;
/// 2. a topmost entry with `when` beats one without, else the later `when` (as instants);
/// 3. a topmost entry with `by` beats one without, else the greater `by` (code-point order);
/// 4. the greater canonical encoding ([`encode_version`]).
pub fn beats(x: &Version, y: &Version) -> bool {
    compare(x, y) == Ordering::Greater
}

/// The winner rule as an ordering: `Greater` means `x` beats `y`; `Equal` only for the same version.
pub fn compare(x: &Version, y: &Version) -> Ordering {
    let by_updates = x.updates.cmp(&y.updates);
    if by_updates != Ordering::Equal {
        return by_updates;
    }
    let (tx, ty) = (x.topmost(), y.topmost());
    let by_when = match (&tx.when, &ty.when) {
        (Some(a), Some(b)) => a.cmp_instant(b),
        (Some(_), None) => Ordering::Greater,
        (None, Some(_)) => Ordering::Less,
        (None, None) => Ordering::Equal,
    };
    if by_when != Ordering::Equal {
        return by_when;
    }
    let by_by = match (&tx.by, &ty.by) {
        (Some(a), Some(b)) => a.as_str().cmp(b.as_str()),
        (Some(_), None) => Ordering::Greater,
        (None, Some(_)) => Ordering::Less,
        (None, None) => Ordering::Equal,
    };
    if by_by != Ordering::Equal {
        return by_by;
    }
    if x == y {
        return Ordering::Equal;
    }
    encode_version(x).cmp(&encode_version(y))
}

/// What a merge did to one item, for callers that count or log.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MergeOutcome {
    /// The local item was already the result.
    Unchanged,
    /// The result differs from the local item.
    Changed,
}

/// Merges an incoming item into a local one (spec 3.3 steps 2-6, with the twins rule).
pub fn merge_item(local: &Item, incoming: &Item) -> (Item, MergeOutcome) {
    match merged(local, incoming) {
        None => (local.clone(), MergeOutcome::Unchanged),
        Some(item) => (item, MergeOutcome::Changed),
    }
}

/// The merge of `incoming` into `local`, or `None` when it is `local` itself.
pub fn merged(local: &Item, incoming: &Item) -> Option<Item> {
    // Fast path: the usual case of one side strictly newer and without conflicts on either side.
    if local.conflicts.is_empty() && incoming.conflicts.is_empty() {
        let (l, i) = (&local.version, &incoming.version);
        let l_sub = l.subsumed_by(i);
        let i_sub = i.subsumed_by(l);
        match (l_sub, i_sub) {
            (true, false) => return Some(incoming.clone()),
            (false, true) => return None,
            (true, true) if l == i => return None,
            _ => {}
        }
    }

    // Step 2: each side as a list of versions (conflicts, then the item without its conflicts).
    let l_all: Vec<&Version> = local.conflicts.iter().chain(std::iter::once(&local.version)).collect();
    let i_all: Vec<&Version> = incoming.conflicts.iter().chain(std::iter::once(&incoming.version)).collect();

    // Steps 3 and 4, symmetrically: every version of either side that no version of either side
    // subsumes (twins aside). For items that hold the item invariants (no version subsumed by
    // another of the same item) this is exactly the spec's steps: a local version is dropped
    // when an incoming one subsumes it, an incoming one when a kept local one does. Taking the
    // maximal versions of the union makes the result independent of which side is local even
    // for items that do not (found by the `wire_item` fuzz target: an item whose winner subsumed
    // its own conflict merged differently on the two sides).
    // Equal versions count once (the incoming copy, as step 3 keeps it: its signature may be
    // the newer attestation).
    let mut all: Vec<&Version> = Vec::with_capacity(l_all.len() + i_all.len());
    for v in i_all.iter().chain(&l_all) {
        if !all.contains(v) {
            all.push(v);
        }
    }
    // Twins (two different versions that subsume each other: a reused sequence number) both stay.
    let dropped = dominated(&all);
    let mut m: Vec<&Version> = all.iter().zip(&dropped).filter(|(_, &d)| !d).map(|(x, _)| *x).collect();
    // M is non-empty: a version is only dropped for a non-twin subsumer, and the best version by
    // the winner rule among all of them cannot be dropped by both... but be total regardless.
    debug_assert!(!m.is_empty());
    if m.is_empty() {
        return None;
    }

    // Step 5: the winner. Losers best first, without duplicates.
    m.sort_by(|a, b| compare(b, a));
    m.dedup_by(|a, b| a == b);
    let winner = m[0].clone();
    let conflicts: Vec<Version> = if winner.noconflicts {
        Vec::new()
    } else {
        // Step 6: keep the rest as conflicts, bounded (the worst are dropped past the bounds,
        // deterministically, so the merge stays total and convergent).
        fit_conflicts(&winner, m[1..].iter().copied())
    };
    let merged = Item { version: winner, conflicts };
    (merged != *local).then_some(merged)
}

/// [`merged`] for two items that hold the item invariants, as every item a replica stores or
/// takes does (decoding and restoring check them): no version of an item is subsumed by another
/// of the same item that is not its twin. Then a version both sides hold is dropped by nothing
/// and drops nothing, and a version only one side holds can be dropped only by a version only the
/// other side holds, so only those pairs are tested: a hot item that gets a few new versions
/// costs those few against the rest, not every pair of all of them. The result is `merged`'s
/// (the test `the_checked_merge_is_the_merge` compares them on items that hold the invariants).
pub fn merged_valid(local: &Item, incoming: &Item) -> Option<Item> {
    merged_valid_with(local, incoming, 1024)
}

/// [`merged_valid`] with the pairwise test up to `pairs_max` pairs (tests take both paths).
fn merged_valid_with(local: &Item, incoming: &Item, pairs_max: usize) -> Option<Item> {
    if local.conflicts.is_empty() && incoming.conflicts.is_empty() {
        return merged(local, incoming);
    }
    let quick_same = |a: &Version, b: &Version| {
        a.updates == b.updates && a.topmost().sequence == b.topmost().sequence && a == b
    };
    let l_all: Vec<&Version> = std::iter::once(&local.version).chain(local.conflicts.iter()).collect();
    let i_all: Vec<&Version> = std::iter::once(&incoming.version).chain(incoming.conflicts.iter()).collect();
    // Which local versions incoming holds too (the incoming copy stands for both, as in `merged`).
    let mut shared = vec![false; l_all.len()];
    let mut new_at: Vec<usize> = Vec::with_capacity(i_all.len());
    for (k, v) in i_all.iter().enumerate() {
        match l_all.iter().position(|l| quick_same(v, l)) {
            Some(j) => shared[j] = true,
            None => new_at.push(k),
        }
    }
    if new_at.is_empty() {
        // Everything incoming holds is here already: nothing is dropped, nothing is new.
        return None;
    }
    let i_only: Vec<&Version> = new_at.iter().map(|&k| i_all[k]).collect();
    let l_only: Vec<&Version> = l_all.iter().zip(&shared).filter(|(_, s)| !**s).map(|(v, _)| *v).collect();
    let drops =
        |x: &Version, others: &[&Version]| others.iter().any(|y| x.subsumed_by(y) && !y.subsumed_by(x));
    // The pairwise test is cheap for the usual few new versions; past it, the index of `dominated`.
    let (i_dropped, l_dropped): (Vec<bool>, Vec<bool>) = if i_only.len() * l_only.len() <= pairs_max {
        (
            i_only.iter().map(|x| drops(x, &l_only)).collect(),
            l_only.iter().map(|x| drops(x, &i_only)).collect(),
        )
    } else {
        let all: Vec<&Version> = i_only.iter().chain(&l_only).copied().collect();
        let mut dropped = dominated(&all);
        let l_dropped = dropped.split_off(i_only.len());
        (dropped, l_dropped)
    };
    if !i_dropped.contains(&false) && !l_dropped.contains(&true) {
        // Every new version was dropped and no held one: the same set, so the same item.
        return None;
    }
    // The kept versions, best first: incoming's (but its dropped new ones) and local's own, each
    // already in that order (the item invariants), merged.
    let mut keep = vec![true; i_all.len()];
    for (&k, &dropped) in new_at.iter().zip(&i_dropped) {
        keep[k] = !dropped;
    }
    let mut from_incoming = i_all.iter().zip(&keep).filter(|(_, k)| **k).map(|(v, _)| *v).peekable();
    let mut from_local = l_only.iter().zip(&l_dropped).filter(|(_, d)| !**d).map(|(v, _)| *v).peekable();
    let mut m: Vec<&Version> = Vec::with_capacity(i_all.len() + l_only.len());
    loop {
        let next = match (from_incoming.peek(), from_local.peek()) {
            (Some(a), Some(b)) if compare(a, b) == std::cmp::Ordering::Less => from_local.next(),
            (Some(_), _) => from_incoming.next(),
            (None, _) => from_local.next(),
        };
        match next {
            Some(v) => m.push(v),
            None => break,
        }
    }
    debug_assert!(m.windows(2).all(|w| compare(w[0], w[1]) == std::cmp::Ordering::Greater));
    let &first = m.first()?;
    let winner = first.clone();
    let conflicts: Vec<Version> =
        if winner.noconflicts { Vec::new() } else { fit_conflicts(&winner, m[1..].iter().copied()) };
    let merged = Item { version: winner, conflicts };
    (merged != *local).then_some(merged)
}

/// For each version of `all`, whether another version of `all` subsumes it without being its twin
/// or equal to it (what merge steps 3 and 4 drop, and what an item may not hold).
///
/// The pairwise test is quadratic in versions times a history scan, and a hot item holds one
/// version per endpoint that wrote it concurrently, each with a history of about as many entries.
/// So the candidates are found through an index of each endpoint's newest sequence per version:
/// the work is the item's entries plus, per version, the few versions that hold its topmost
/// endpoint at or past its sequence. Bounded by the item's bytes (`ITEM_ENCODED_MAX`).
pub(crate) fn dominated(all: &[&Version]) -> Vec<bool> {
    let subsumes_not_twin = |x: &Version, y: &Version| *y != *x && !y.subsumed_by(x);
    let pairwise = |i: usize, x: &Version| {
        all.iter().enumerate().any(|(j, y)| j != i && x.subsumed_by(y) && subsumes_not_twin(x, y))
    };
    // The usual item has a version or two: pairwise costs less than building the index.
    const PAIRWISE_MAX: usize = 8;
    if all.len() <= PAIRWISE_MAX {
        return all.iter().enumerate().map(|(i, x)| pairwise(i, x)).collect();
    }
    use std::collections::BTreeMap;
    // Endpoints by (unkeyed hash, name): the hash makes most lookups integer compares, the name
    // keeps crafted collisions apart. Few per item (one per writer), so a B-tree of them is small.
    let key = |by: &str| {
        by.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    };
    let mut endpoints: BTreeMap<(u64, &str), usize> = BTreeMap::new();
    // Per endpoint: (version index, its newest sequence there), in version order.
    let mut newest: Vec<Vec<(usize, u32)>> = Vec::new();
    for (j, y) in all.iter().enumerate() {
        for entry in y.history.iter() {
            let Some(by) = &entry.by else { continue };
            let next = newest.len();
            let e = *endpoints.entry((key(by.as_str()), by.as_str())).or_insert(next);
            if e == next {
                newest.push(Vec::new());
            }
            match newest[e].last_mut() {
                Some(last) if last.0 == j => last.1 = last.1.max(entry.sequence),
                _ => newest[e].push((j, entry.sequence)),
            }
        }
    }
    all.iter()
        .enumerate()
        .map(|(i, x)| {
            let top = x.topmost();
            match &top.by {
                // Entries without `by` are subsumed only by an equal sequence and instant: scan.
                None => pairwise(i, x),
                Some(by) => endpoints.get(&(key(by.as_str()), by.as_str())).is_some_and(|&e| {
                    newest[e].iter().any(|&(j, sequence)| {
                        j != i && sequence >= top.sequence && subsumes_not_twin(x, all[j])
                    })
                }),
            }
        })
        .collect()
}

/// The conflicts an item with winner `winner` keeps of `losers` (best first): the longest prefix
/// within [`limits::CONFLICTS_PER_ITEM_MAX`] versions and [`limits::ITEM_ENCODED_MAX`] bytes for
/// the whole item. A prefix of the best-first order, so what is kept depends only on the set of
/// versions: a version dropped here is worse than every kept one and would be dropped again from
/// any larger set, and merges stay convergent.
pub fn fit_conflicts<'a>(winner: &Version, losers: impl IntoIterator<Item = &'a Version>) -> Vec<Version> {
    let mut used = super::model::VARINT + winner.encoded_bound();
    let mut kept = Vec::new();
    for v in losers.into_iter().take(limits::CONFLICTS_PER_ITEM_MAX) {
        used += v.encoded_bound();
        if used > limits::ITEM_ENCODED_MAX {
            break;
        }
        kept.push(v.clone());
    }
    kept
}

/// Counts of what a feed merge did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct MergeStats {
    pub added: u64,
    pub changed: u64,
    pub unchanged: u64,
}

/// Merges every synced item of `incoming` into `local` (spec 3.3 step 1 for new items).
///
/// `local`'s dialect, envelope, `sx:sharing` and plain items are kept; incoming items without
/// `sx:sync` take no part. Items only `local` has are kept; items only `incoming` has are appended
/// in `incoming`'s order. Refuses feeds of different dialects before touching anything.
pub fn merge_feed(local: &mut Feed, incoming: &Feed) -> Result<MergeStats, FeedsyncError> {
    if local.dialect != incoming.dialect {
        return Err(FeedsyncError::DialectMismatch { local: local.dialect, incoming: incoming.dialect });
    }
    // Count the new items exactly only when the bound could be reached (a second lookup pass).
    if local.len() + incoming.len() > limits::ITEMS_PER_FEED_MAX {
        let new_items = incoming.items().filter(|item| local.item(item.id()).is_none()).count();
        if local.len() + new_items > limits::ITEMS_PER_FEED_MAX {
            return Err(FeedsyncError::TooManyItems);
        }
    }
    let mut stats = MergeStats::default();
    for item in incoming.items() {
        merge_one(local, item, &mut stats);
    }
    Ok(stats)
}

/// Merges one incoming item into a feed. The item count bound is the caller's to check.
pub fn merge_one(local: &mut Feed, incoming: &Item, stats: &mut MergeStats) {
    match local.items.get_mut(incoming.id()) {
        None => {
            local.items.insert(incoming.id().clone(), incoming.clone());
            stats.added += 1;
        }
        Some(slot) => match merged(slot, incoming) {
            None => stats.unchanged += 1,
            Some(item) => {
                *slot = item;
                stats.changed += 1;
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::feedsync::model::{Content, Endpoint, HistoryEntry, ItemId, When};

    fn version(history: &[(u32, Option<u8>, u8)]) -> Version {
        let history: Vec<HistoryEntry> = history
            .iter()
            .map(|&(sequence, by, when)| HistoryEntry {
                sequence,
                when: Some(When::from_unix_secs(i64::from(when)).unwrap()),
                by: by.map(|b| Endpoint::new(&format!("e{b}")).unwrap()),
            })
            .collect();
        Version {
            id: ItemId::new("x").unwrap(),
            updates: history[0].sequence,
            deleted: false,
            noconflicts: false,
            history: Arc::from(history),
            content: Arc::new(Content::empty()),
            signature: None,
        }
    }

    proptest! {
        /// The index finds exactly what the pairwise test of merge steps 3 and 4 finds, twins,
        /// entries without `by` and repeated endpoints included.
        #[test]
        fn the_index_drops_what_the_pairwise_test_drops(
            versions in proptest::collection::vec(
                proptest::collection::vec((1u32..6, proptest::option::weighted(0.8, 0u8..4), 0u8..3), 1..6),
                1..24,
            )
        ) {
            let versions: Vec<Version> = versions.iter().map(|h| version(h)).collect();
            let all: Vec<&Version> = versions.iter().collect();
            let pairwise: Vec<bool> = all
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    all.iter().enumerate().any(|(j, y)| j != i && **y != **x && x.subsumed_by(y) && !y.subsumed_by(x))
                })
                .collect();
            prop_assert_eq!(dominated(&all), pairwise);
        }
    }

    /// An item holding the invariants, made as merges make them: the merge of single versions.
    fn item_of(versions: &[Version]) -> Item {
        let mut item = Item::new(versions[0].clone());
        for v in &versions[1..] {
            if let Some(next) = merged(&item, &Item::new(v.clone())) {
                item = next;
            }
        }
        item
    }

    proptest! {
        /// The merge of items that hold the invariants (a replica's) is the general merge, by
        /// either path of its dominance test, whichever side is local.
        #[test]
        fn the_checked_merge_is_the_merge(
            pool in proptest::collection::vec(
                proptest::collection::vec((1u32..8, proptest::option::weighted(0.9, 0u8..12), 0u8..3), 1..5),
                2..40,
            ),
            a in proptest::collection::vec(any::<proptest::sample::Index>(), 1..30),
            b in proptest::collection::vec(any::<proptest::sample::Index>(), 1..30),
        ) {
            let pool: Vec<Version> = pool.iter().map(|h| version(h)).collect();
            let pick = |ix: &[proptest::sample::Index]| ix.iter().map(|i| i.get(&pool).clone()).collect::<Vec<_>>();
            let (x, y) = (item_of(&pick(&a)), item_of(&pick(&b)));
            prop_assume!(x.check_structure().is_ok() && y.check_structure().is_ok());
            for (l, i) in [(&x, &y), (&y, &x)] {
                let general = merged(l, i);
                prop_assert_eq!(&merged_valid_with(l, i, usize::MAX), &general);
                prop_assert_eq!(&merged_valid_with(l, i, 0), &general);
            }
        }
    }

    proptest! {
        /// Checking an incoming item against a held one (skipping what it holds) gives the
        /// verdict of checking it whole, for any incoming item, valid or not.
        #[test]
        fn checking_against_a_held_item_is_checking_it(
            pool in proptest::collection::vec(
                proptest::collection::vec((1u32..8, proptest::option::weighted(0.9, 0u8..12), 0u8..3), 1..5),
                2..30,
            ),
            held in proptest::collection::vec(any::<proptest::sample::Index>(), 1..20),
            incoming in proptest::collection::vec(any::<proptest::sample::Index>(), 1..12),
            sorted in any::<bool>(),
        ) {
            let pool: Vec<Version> = pool.iter().map(|h| version(h)).collect();
            let held = item_of(&held.iter().map(|i| i.get(&pool).clone()).collect::<Vec<_>>());
            prop_assume!(held.check_invariants().is_ok());
            let mut picked: Vec<Version> = incoming.iter().map(|i| i.get(&pool).clone()).collect();
            if sorted {
                picked.sort_by(|a, b| compare(b, a));
                picked.dedup();
            }
            let item = Item { version: picked[0].clone(), conflicts: picked[1..].to_vec() };
            prop_assert_eq!(item.check_against(Some(&held)).is_ok(), item.check_invariants().is_ok());
        }
    }
}

//! Seeded workloads for the feedmesh benchmarks (FeedSync stores and incoming batches, and the
//! same workload in automerge), the benchmark grid, and the report that turns criterion's output
//! into `papers/results/*.json`.
//!
//! # The merge workload
//!
//! A *store* holds `n` items; each item was created and then updated `h - 1` times, so its
//! history holds `h` entries, made alternately by two local endpoints. An *incoming batch* holds
//! [`BATCH_ITEMS`] items, each an update of a distinct store item (picked with a seeded RNG),
//! made by a remote endpoint:
//!
//! - a *concurrent* update was made from the same base version as the store's current version
//!   (the store's version minus its last update; for `h = 1` the base is "no item yet", i.e. the
//!   remote created the same id on its own). Neither side subsumes the other, so merge keeps a
//!   conflict;
//! - every other update was made on top of the store's current version, so it subsumes it.
//!
//! A fraction `c` of the batch (the first `round(c * BATCH_ITEMS)` picked items) is concurrent.
//! The set of concurrent items for a smaller `c` is a prefix of the set for a larger one.
//!
//! The automerge workload ([`automerge_workload`]) is the same workload in automerge terms: one
//! map per item under `ROOT`, one change per FeedSync update, and a batch of [`BATCH_ITEMS`]
//! changes by another actor on a fork.

pub mod automerge_workload;
pub mod feedsync_workload;
pub mod grid;
pub mod relay_process;
pub mod report;
pub mod sync_workload;

use rand::Rng as _;
use rand::SeedableRng as _;
use rand_chacha::ChaCha8Rng;

/// Items in one incoming batch: the unit of the merge benchmark's throughput.
pub const BATCH_ITEMS: usize = 10_000;

/// Seed of the RNG that picks which store items the batch updates.
pub const SEED_PICK: u64 = 0x5eed_0001;
/// Seed of the RNG behind the item descriptions.
pub const SEED_TEXT: u64 = 0x5eed_0002;

/// Unix seconds of the first round of updates (2023-11-14T22:13:20Z).
pub const ROUND_0_UNIX_SECS: i64 = 1_700_000_000;
/// Seconds between two rounds of updates.
pub const ROUND_SECS: i64 = 3_600;
/// Items' `when` within one round is spread over this many seconds (so items differ).
pub const ROUND_SPREAD_SECS: i64 = 1_800;

/// The two local endpoints, which take turns making the store's updates.
pub const LOCAL_ENDPOINTS: [&str; 2] = ["endpoint-local-a", "endpoint-local-b"];
/// The endpoint that made the incoming batch.
pub const REMOTE_ENDPOINT: &str = "endpoint-remote-r";

/// Words the item descriptions are made of.
const WORDS: [&str; 16] = [
    "mesh", "feed", "sync", "relay", "item", "version", "merge", "history", "conflict", "endpoint",
    "replica", "gossip", "update", "peer", "digest", "window",
];
/// Words per item description.
const DESCRIPTION_WORDS: usize = 12;

/// One cell of the merge workload: store size `n`, history length `h` and concurrent fraction
/// `c` (in parts per million, so cells compare and sort exactly).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cell {
    pub items: usize,
    pub concurrent_ppm: u32,
    pub history: usize,
}

impl Cell {
    /// Number of concurrent items in the batch: `round(c * BATCH_ITEMS)`.
    pub fn concurrent_items(&self) -> usize {
        concurrent_items(self.concurrent_ppm)
    }

    /// `n=10000/c=0.01/h=8`: the cell's name in criterion group ids and in the results.
    pub fn label(&self) -> String {
        format!("n={}/c={}/h={}", self.items, ppm_text(self.concurrent_ppm), self.history)
    }
}

/// Number of concurrent items in a batch of [`BATCH_ITEMS`] for a fraction in parts per million.
pub fn concurrent_items(concurrent_ppm: u32) -> usize {
    let ppm = u64::from(concurrent_ppm.min(1_000_000));
    // BATCH_ITEMS * 10^6 fits in u64 with room to spare.
    ((BATCH_ITEMS as u64 * ppm + 500_000) / 1_000_000) as usize
}

/// A fraction in parts per million as a short decimal: 0, 0.01, 0.5, 1.
pub fn ppm_text(ppm: u32) -> String {
    let whole = ppm / 1_000_000;
    let frac = ppm % 1_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Parses what [`ppm_text`] writes (any decimal in `0..=1` with at most six decimals).
pub fn ppm_parse(text: &str) -> Option<u32> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u32 = whole.parse().ok()?;
    let frac_ppm: u32 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").parse().ok()? };
    let ppm = whole.checked_mul(1_000_000)?.checked_add(frac_ppm)?;
    (ppm <= 1_000_000).then_some(ppm)
}

/// The store items the batch updates, in batch order: [`BATCH_ITEMS`] distinct indices in
/// `0..items`, drawn with a seeded RNG that depends on `items` only (not on `h` or `c`), so every
/// cell of one store size picks the same items. Panics if `items < BATCH_ITEMS`.
pub fn picked_items(items: usize) -> Vec<usize> {
    assert!(items >= BATCH_ITEMS, "a store of {items} items cannot take a batch of {BATCH_ITEMS}");
    let mut rng = ChaCha8Rng::seed_from_u64(SEED_PICK ^ items as u64);
    rand::seq::index::sample(&mut rng, items, BATCH_ITEMS).into_vec()
}

/// The item id (FeedSync `sx:sync/@id`, automerge key under `ROOT`) of store item `index`.
pub fn item_id(index: usize) -> String {
    format!("urn:feedmesh:bench:item-{index:07}")
}

/// Unix seconds of item `index`'s update in `round` (round 0 is the creation; the batch's updates
/// are in round `h`, after every local one).
pub fn round_unix_secs(index: usize, round: usize) -> i64 {
    // Rounds and indices are far below i64::MAX / ROUND_SECS; the sum stays within year 9999.
    ROUND_0_UNIX_SECS + round as i64 * ROUND_SECS + (index as i64 % ROUND_SPREAD_SECS)
}

/// The local endpoint that made `round`'s update (the two take turns).
pub fn local_endpoint(round: usize) -> &'static str {
    LOCAL_ENDPOINTS[round % LOCAL_ENDPOINTS.len()]
}

/// Item `index`'s title after `round`'s update; `remote` for the batch's version.
pub fn title(index: usize, round: usize, remote: bool) -> String {
    let by = if remote { "remote" } else { "local" };
    format!("item {index} rev {round} ({by})")
}

/// Item `index`'s description: [`DESCRIPTION_WORDS`] words from a per-item seeded RNG (so the
/// FeedSync and automerge stores hold the same text whatever order they are built in).
pub fn description(index: usize) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED_TEXT ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut out = String::with_capacity(DESCRIPTION_WORDS * 8);
    for k in 0..DESCRIPTION_WORDS {
        if k > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out
}

/// Whether the command line asks for help (`--help` or `-h`); then `usage` has been printed and
/// the binary should exit without running anything (issue 13: `sync_sweep --help` used to start
/// a sweep).
pub fn help_requested(usage: &str) -> bool {
    let asked = std::env::args().skip(1).any(|a| a == "--help" || a == "-h");
    if asked {
        println!("{usage}");
    }
    asked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppm_text_round_trips() {
        for ppm in [0, 1, 10_000, 100_000, 500_000, 999_999, 1_000_000] {
            assert_eq!(ppm_parse(&ppm_text(ppm)), Some(ppm), "{ppm}");
        }
        assert_eq!(ppm_text(10_000), "0.01");
        assert_eq!(ppm_text(1_000_000), "1");
        assert_eq!(ppm_parse("1.5"), None);
        assert_eq!(ppm_parse(".5"), None);
    }

    #[test]
    fn concurrent_items_rounds() {
        assert_eq!(concurrent_items(0), 0);
        assert_eq!(concurrent_items(10_000), 100);
        assert_eq!(concurrent_items(1_000_000), BATCH_ITEMS);
    }

    #[test]
    fn picks_are_distinct_and_stable() {
        let picks = picked_items(100_000);
        assert_eq!(picks.len(), BATCH_ITEMS);
        let mut sorted = picks.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), BATCH_ITEMS);
        assert!(sorted.iter().all(|&i| i < 100_000));
        assert_eq!(picks, picked_items(100_000));
        assert_eq!(description(7), description(7));
        assert_ne!(description(7), description(8));
    }
}

//! The checkers' own bookkeeping, independent of FeedSync's history: every write (a version a
//! node made), what its writer had seen of that item when it wrote it (its causal past), what
//! each node has seen, and when each write reached each node.
//!
//! Durability: at the end every write must be a final version (winner or conflict) or in the
//! causal past of one. Propagation: every write must reach every live node; the time it took is
//! kept in a bounded log-scale histogram.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use engine::feedsync::{Item, Version};

/// A version's identity: a hash of its canonical encoding, the replica's own
/// ([`engine::replica::version_hash`]), so that the hashes a replica keeps can stand in for it.
fn key(version: &Version) -> [u8; 16] {
    engine::replica::version_hash(version).to_le_bytes()
}

#[derive(Debug)]
struct Write {
    item: String,
    at: u64,
    /// Nodes that have seen it (with how long after the write, in ms), and when the last of
    /// them did.
    reached: BTreeMap<u32, u32>,
    last_reach: u64,
    /// For sampled writes: when each node got it (microseconds), for the run's plot.
    times: Option<Vec<u64>>,
}

/// Log-linear histogram of milliseconds: 16 sub-buckets per power of two, bounded size.
#[derive(Debug, Default)]
struct Histogram {
    buckets: BTreeMap<u32, u64>,
    count: u64,
    max: u64,
}

impl Histogram {
    fn bucket(ms: u64) -> u32 {
        if ms < 16 {
            return ms as u32;
        }
        let exp = 63 - ms.leading_zeros();
        let sub = ((ms >> (exp - 4)) & 15) as u32;
        (exp - 3) * 16 + sub
    }

    fn lower(bucket: u32) -> u64 {
        if bucket < 16 {
            return u64::from(bucket);
        }
        let exp = bucket / 16 + 3;
        let sub = u64::from(bucket % 16);
        (16 + sub) << (exp - 4)
    }

    fn record(&mut self, ms: u64) {
        *self.buckets.entry(Self::bucket(ms)).or_default() += 1;
        self.count += 1;
        self.max = self.max.max(ms);
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (&bucket, &n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Self::lower(bucket).min(self.max);
            }
        }
        self.max
    }
}

#[derive(Debug)]
pub struct Checker {
    writes: Vec<Write>,
    /// Version identity -> (write id, causal past).
    /// Sorted.
    versions: BTreeMap<[u8; 16], (u32, Arc<[u32]>)>,
    /// Per node, per item: the writes it has seen.
    seen: Vec<BTreeMap<String, BTreeSet<u32>>>,
    unknown_versions: u64,
    /// Every `sample_every`-th write keeps its reach times (bounded memory for the plot).
    sample_every: u32,
    /// What holding an item state teaches (its versions' writes and their causal pasts), by the
    /// replica's fingerprint of that state: the same state reaches every node, so it is worked
    /// out once.
    learned: BTreeMap<u64, Arc<Vec<u32>>>,
    /// Writes lost with a store (see [`Checker::store_lost`]).
    excused: BTreeSet<u32>,
}

impl Checker {
    /// `sample_every`: every this many writes, one keeps its reach times ([`Checker::timelines`]).
    pub fn new(nodes: u32, sample_every: u32) -> Self {
        Self {
            writes: Vec::new(),
            versions: BTreeMap::new(),
            seen: vec![BTreeMap::new(); nodes as usize],
            unknown_versions: 0,
            sample_every: sample_every.max(1),
            learned: BTreeMap::new(),
            excused: BTreeSet::new(),
        }
    }

    /// The sampled writes: (when written, when each node got it), in microseconds.
    pub fn timelines(&self) -> Vec<(u64, Vec<u64>)> {
        self.writes.iter().filter_map(|w| w.times.as_ref().map(|t| (w.at, t.clone()))).collect()
    }

    pub fn writes(&self) -> u64 {
        self.writes.len() as u64
    }

    /// `node` made a local change; `state` is its item afterwards.
    pub fn write(&mut self, node: u32, state: &Item, now: u64) {
        let item = state.id().to_string();
        let past: Arc<[u32]> = self.seen[node as usize]
            .get(&item)
            .map_or_else(|| Arc::from([]), |seen| seen.iter().copied().collect());
        let id = self.writes.len() as u32;
        self.versions.insert(key(&state.version), (id, past));
        let times = id.is_multiple_of(self.sample_every).then(Vec::new);
        self.writes.push(Write {
            item: item.clone(),
            at: now,
            reached: BTreeMap::new(),
            last_reach: now,
            times,
        });
        // Its own conflicts it keeps seeing too.
        self.absorb(node, state, now);
    }

    /// `node` holds `state` now (after a local change or a merge): it has seen every version in
    /// it and their causal pasts.
    pub fn absorb(&mut self, node: u32, state: &Item, now: u64) {
        let learned = self.learn(state);
        self.note(node, state, &learned, now);
    }

    /// As [`Checker::absorb`], for a state whose replica fingerprint is `fp` (cached). `hashes`:
    /// the replica's version hashes of `state` (winner first), if it keeps them, saving their
    /// computation (a hot item's state holds a version per concurrent writer).
    pub fn absorb_state(&mut self, node: u32, state: &Item, fp: u64, hashes: Option<&[u128]>, now: u64) {
        let learned = match self.learned.get(&fp) {
            Some(learned) => learned.clone(),
            None => {
                let unknown = self.unknown_versions;
                let learned = Arc::new(self.learn_with(state, hashes));
                // Only a state whose versions are all known is cached.
                if self.unknown_versions == unknown {
                    self.learned.insert(fp, learned.clone());
                }
                learned
            }
        };
        self.note(node, state, &learned, now);
    }

    /// The writes holding `state` implies having seen, sorted.
    fn learn(&mut self, state: &Item) -> Vec<u32> {
        self.learn_with(state, None)
    }

    /// [`Checker::learn`], with the versions' hashes when the caller has them.
    fn learn_with(&mut self, state: &Item, hashes: Option<&[u128]>) -> Vec<u32> {
        let hashes = hashes.filter(|h| h.len() == 1 + state.conflicts.len());
        let mut found: Vec<(u32, &Arc<[u32]>)> = Vec::with_capacity(1 + state.conflicts.len());
        for (k, version) in std::iter::once(&state.version).chain(&state.conflicts).enumerate() {
            let id = match hashes {
                Some(h) => h[k].to_le_bytes(),
                None => key(version),
            };
            match self.versions.get(&id) {
                Some((id, past)) => found.push((*id, past)),
                None => self.unknown_versions += 1,
            }
        }
        let total: usize = found.iter().map(|(_, past)| 1 + past.len()).sum();
        let words = self.writes.len().div_ceil(64);
        // A hot item's state unites many long pasts (one version per concurrent writer): a bitset
        // over the write ids. A usual state has one or two versions: sort what it has.
        if total > words {
            let mut bits = vec![0u64; words];
            let mut set = |id: u32| bits[id as usize / 64] |= 1 << (id % 64);
            for (id, past) in &found {
                set(*id);
                past.iter().for_each(|&p| set(p));
            }
            let mut learned = Vec::with_capacity(total);
            for (w, &word) in bits.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    learned.push((w * 64) as u32 + word.trailing_zeros());
                    word &= word - 1;
                }
            }
            learned
        } else {
            let mut learned: Vec<u32> = Vec::with_capacity(total);
            for (id, past) in &found {
                learned.push(*id);
                learned.extend_from_slice(past);
            }
            learned.sort_unstable();
            learned.dedup();
            learned
        }
    }

    fn note(&mut self, node: u32, state: &Item, learned: &[u32], now: u64) {
        let seen_map = &mut self.seen[node as usize];
        let seen = match seen_map.get_mut(state.id().as_str()) {
            Some(seen) => seen,
            None => seen_map.entry(state.id().to_string()).or_default(),
        };
        for &id in learned {
            if seen.insert(id) {
                let w = &mut self.writes[id as usize];
                if let std::collections::btree_map::Entry::Vacant(e) = w.reached.entry(node) {
                    e.insert(((now.saturating_sub(w.at)) / 1_000).min(u64::from(u32::MAX)) as u32);
                    w.last_reach = w.last_reach.max(now);
                    if let Some(times) = &mut w.times {
                        times.push(now);
                    }
                }
            }
        }
    }

    /// `node` lost its store: it has seen nothing now. Writes that no other node had seen are
    /// lost by that fault, not by the protocol: they are excused from the durability check.
    /// Returns how many.
    pub fn store_lost(&mut self, node: u32) -> u64 {
        self.seen[node as usize] = BTreeMap::new();
        let mut excused = 0;
        for (id, w) in self.writes.iter().enumerate() {
            if !w.reached.contains_key(&node) || self.excused.contains(&(id as u32)) {
                continue;
            }
            // Lost with stores when no node knows it any more: every node that had seen it has
            // lost its store since (and not learnt it again). Not only when this node alone had
            // it: the swarm's seed 2028 had a write held by two devices that both lost theirs.
            let known = w.reached.keys().any(|&n| {
                self.seen[n as usize].get(w.item.as_str()).is_some_and(|seen| seen.contains(&(id as u32)))
            });
            if !known {
                self.excused.insert(id as u32);
                excused += 1;
            }
        }
        excused
    }

    /// Writes no node in `keep` ever held (a removed member's writes that reached no continuing
    /// member before the removal cut it off): lost by the removal, not by the protocol, they are
    /// excused from the durability check. Returns how many were newly excused.
    pub fn cut_off(&mut self, keep: impl Fn(u32) -> bool) -> u64 {
        let mut excused = 0;
        for (id, w) in self.writes.iter().enumerate() {
            if !w.reached.keys().any(|&n| keep(n)) && self.excused.insert(id as u32) {
                excused += 1;
            }
        }
        excused
    }

    /// Writes that are neither a final version nor in the causal past of one.
    pub fn lost_writes(&self, finals: &[Arc<Item>]) -> u64 {
        let mut covered: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for item in finals {
            let set = covered.entry(item.id().to_string()).or_default();
            for version in std::iter::once(&item.version).chain(&item.conflicts) {
                if let Some((id, past)) = self.versions.get(&key(version)) {
                    set.insert(*id);
                    set.extend(past.iter().copied());
                }
            }
        }
        let lost = self
            .writes
            .iter()
            .enumerate()
            .filter(|(id, _)| !self.excused.contains(&(*id as u32)))
            .filter(|(id, w)| !covered.get(&w.item).is_some_and(|set| set.contains(&(*id as u32))))
            .count() as u64;
        lost + self.unknown_versions
    }

    /// Propagation times (p50, p99, max in ms) of writes that reached every live node, and how
    /// many did not.
    pub fn convergence(&self, live: &[u32]) -> (u64, u64, u64, u64) {
        let mut histogram = Histogram::default();
        let mut unconverged = 0;
        for (id, w) in self.writes.iter().enumerate() {
            if self.excused.contains(&(id as u32)) {
                continue;
            }
            if live.iter().all(|n| w.reached.contains_key(n)) {
                histogram.record((w.last_reach.saturating_sub(w.at)) / 1_000);
            } else {
                unconverged += 1;
            }
        }
        (histogram.quantile(0.5), histogram.quantile(0.99), histogram.max, unconverged)
    }
}

/// How fast writes spread among the devices that were online: per write, the time until 50%,
/// 99% and 100% of them held it; over the writes, the median, 99th percentile and maximum of
/// each (ms, from a log-linear histogram: each value within 1/16 of its power of two).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Propagation {
    /// The devices counted (online: live at the end, not offline for the write phase).
    pub devices: u32,
    /// Writes counted (excused ones are not).
    pub writes: u64,
    /// `[p50, p99, max]` over the writes, in ms, of the time to 50%, 99% and 100% of the devices.
    pub to_50_ms: [u64; 3],
    pub to_99_ms: [u64; 3],
    pub to_100_ms: [u64; 3],
    /// Writes that never reached 50%, 99%, 100% of them.
    pub short_of: [u64; 3],
}

/// What the final state says about concurrent edits.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Conflicts {
    /// Final items that hold conflicts, and the conflicting versions they hold.
    pub items: u64,
    pub versions: u64,
    /// Conflicting versions written later (in virtual time) than the version that won: the
    /// later real-time edit lost (FeedSync picks by update count, then by `when`, then by
    /// endpoint, and `when` is a device's skewed clock).
    pub later_edit_lost: u64,
}

impl Checker {
    /// See [`Propagation`]; `devices` are the devices counted.
    pub fn propagation(&self, devices: &[u32]) -> Propagation {
        let n = devices.len();
        let mut out = Propagation { devices: n as u32, ..Propagation::default() };
        if n == 0 {
            return out;
        }
        let ranks = [n.div_ceil(2), (n * 99).div_ceil(100), n];
        let mut histograms: [Histogram; 3] = Default::default();
        let mut delays: Vec<u32> = Vec::with_capacity(n);
        for (id, w) in self.writes.iter().enumerate() {
            if self.excused.contains(&(id as u32)) {
                continue;
            }
            out.writes += 1;
            delays.clear();
            delays.extend(devices.iter().filter_map(|d| w.reached.get(d).copied()));
            delays.sort_unstable();
            for (i, &rank) in ranks.iter().enumerate() {
                match delays.get(rank.max(1) - 1) {
                    Some(&ms) => histograms[i].record(u64::from(ms)),
                    None => out.short_of[i] += 1,
                }
            }
        }
        let summary = |h: &Histogram| [h.quantile(0.5), h.quantile(0.99), h.max];
        out.to_50_ms = summary(&histograms[0]);
        out.to_99_ms = summary(&histograms[1]);
        out.to_100_ms = summary(&histograms[2]);
        out
    }

    /// See [`Conflicts`], over the final items.
    pub fn conflicts(&self, finals: &[Arc<Item>]) -> Conflicts {
        let mut out = Conflicts::default();
        let at = |v: &Version| self.versions.get(&key(v)).map(|(id, _)| self.writes[*id as usize].at);
        for item in finals.iter().filter(|i| !i.conflicts.is_empty()) {
            out.items += 1;
            out.versions += item.conflicts.len() as u64;
            let Some(won) = at(&item.version) else { continue };
            out.later_edit_lost +=
                item.conflicts.iter().filter(|c| at(c).is_some_and(|t| t > won)).count() as u64;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn histogram_buckets_are_monotone_and_close() {
        let mut last = 0;
        for ms in [0u64, 1, 15, 16, 17, 100, 1_000, 65_535, 1 << 40] {
            let b = Histogram::bucket(ms);
            assert!(b >= last);
            last = b;
            let lower = Histogram::lower(b);
            assert!(lower <= ms && ms - lower <= ms / 16 + 1, "{ms}: bucket {b} starts at {lower}");
        }
    }
}

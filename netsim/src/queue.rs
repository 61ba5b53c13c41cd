//! The event queue: a calendar queue (a ring of time buckets) that pops events in exactly
//! `(time, seq)` order, as a binary heap would, but with a cost that stays flat as the number of
//! pending events grows from hundreds to millions.
//!
//! Time is cut into buckets of `2^BUCKET_SHIFT` microseconds. The bucket being drained is a small
//! binary heap; the next `SLOTS` buckets are unsorted vectors (pushing is an append); events
//! further out wait in an overflow heap and move into the ring when it reaches their bucket. A
//! bucket is heapified once when it becomes current, so a pop touches a heap of one bucket's
//! events (a few hundred in a 100,000-node run) instead of all of them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Bucket width: 1.024 ms.
const BUCKET_SHIFT: u32 = 10;
/// Buckets in the ring: about 4.2 s of virtual time ahead (most latencies and sync intervals);
/// the ring's headers (96 KiB) stay in cache.
const SLOTS: usize = 1 << 12;

/// An entry: ordered by `(time, seq)` only.
#[derive(Debug)]
pub struct Entry<T> {
    pub time: u64,
    pub seq: u64,
    pub value: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.time, self.seq) == (other.time, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.time, self.seq).cmp(&(other.time, other.seq))
    }
}

/// A min-queue of `(time, seq)`-ordered entries. Times pushed must not be before the time of the
/// last entry popped (simulated time never goes back); `seq`s must be unique.
#[derive(Debug)]
pub struct CalendarQueue<T> {
    /// The bucket being drained, sorted once when it became current, latest first (pop from the
    /// end).
    sorted: Vec<Entry<T>>,
    /// Entries pushed into the current bucket while it drains (timers due now, short delays).
    current: BinaryHeap<Reverse<Entry<T>>>,
    current_bucket: u64,
    ring: Vec<Vec<Entry<T>>>,
    /// Entries in the ring (not counting `current`).
    in_ring: usize,
    overflow: BinaryHeap<Reverse<Entry<T>>>,
    len: usize,
}

impl<T> Default for CalendarQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> CalendarQueue<T> {
    pub fn new() -> Self {
        Self {
            sorted: Vec::new(),
            current: BinaryHeap::new(),
            current_bucket: 0,
            ring: (0..SLOTS).map(|_| Vec::new()).collect(),
            in_ring: 0,
            overflow: BinaryHeap::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, time: u64, seq: u64, value: T) {
        self.len += 1;
        let entry = Entry { time, seq, value };
        let bucket = time >> BUCKET_SHIFT;
        if bucket <= self.current_bucket {
            // Now or (defensively) earlier: the heap keeps the order either way.
            self.current.push(Reverse(entry));
        } else if bucket - self.current_bucket < SLOTS as u64 {
            self.ring[(bucket as usize) & (SLOTS - 1)].push(entry);
            self.in_ring += 1;
        } else {
            self.overflow.push(Reverse(entry));
        }
    }

    pub fn pop(&mut self) -> Option<Entry<T>> {
        loop {
            // The earlier of the sorted bucket's head and the late arrivals' head.
            let late_first = match (self.sorted.last(), self.current.peek()) {
                (Some(a), Some(Reverse(b))) => b < a,
                (None, Some(_)) => true,
                _ => false,
            };
            let next = if late_first { self.current.pop().map(|Reverse(e)| e) } else { self.sorted.pop() };
            if let Some(entry) = next {
                self.len -= 1;
                return Some(entry);
            }
            if self.len == 0 {
                return None;
            }
            self.advance();
        }
    }

    /// Makes the next non-empty bucket current: from the ring, or jumping ahead to the overflow's
    /// earliest bucket when the ring is empty.
    fn advance(&mut self) {
        let next = if self.in_ring == 0 {
            match self.overflow.peek() {
                Some(Reverse(e)) => e.time >> BUCKET_SHIFT,
                None => return,
            }
        } else {
            let mut b = self.current_bucket + 1;
            while self.ring[(b as usize) & (SLOTS - 1)].is_empty() {
                b += 1;
            }
            // An overflow entry may be due before the next occupied ring bucket.
            match self.overflow.peek() {
                Some(Reverse(e)) => b.min(e.time >> BUCKET_SHIFT),
                None => b,
            }
        };
        self.current_bucket = next;
        // Both vectors keep their capacity: no allocation once the run is warm. (`sorted` and
        // `current` are empty here: `pop` advances only when both are.)
        let slot = &mut self.ring[(next as usize) & (SLOTS - 1)];
        self.in_ring -= slot.len();
        self.sorted.append(slot);
        while let Some(Reverse(e)) = self.overflow.peek() {
            if e.time >> BUCKET_SHIFT != next {
                break;
            }
            if let Some(Reverse(entry)) = self.overflow.pop() {
                self.sorted.push(entry);
            }
        }
        // Latest first; (time, seq) is unique, so an unstable sort is exact.
        self.sorted.sort_unstable_by(|a, b| b.cmp(a));
        // Entries that were beyond the ring's reach when pushed and are now within it stay in the
        // overflow: they are taken when the ring reaches their bucket (checked above).
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};

    /// Random pushes (some now, some near, some far beyond the ring) interleaved with pops come
    /// out in exactly the order of a binary heap.
    #[test]
    fn pops_in_the_same_order_as_a_binary_heap() {
        for seed in 0..20u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut queue = CalendarQueue::new();
            let mut heap = BinaryHeap::new();
            let mut now = 0u64;
            let mut seq = 0u64;
            for _ in 0..20_000 {
                if rng.random_range(0..3) > 0 || heap.is_empty() {
                    let delay = match rng.random_range(0..10) {
                        0 => 0,
                        1..=6 => rng.random_range(0..5_000),
                        7 | 8 => rng.random_range(0..200_000_000),
                        _ => rng.random_range(0..2_000) << BUCKET_SHIFT,
                    };
                    seq += 1;
                    queue.push(now + delay, seq, seq);
                    heap.push(Reverse((now + delay, seq)));
                } else {
                    let Reverse((time, s)) = heap.pop().unwrap();
                    let e = queue.pop().unwrap();
                    assert_eq!((e.time, e.seq, e.value), (time, s, s), "seed {seed}");
                    now = time;
                }
                assert_eq!(queue.len(), heap.len());
            }
            while let Some(Reverse((time, s))) = heap.pop() {
                let e = queue.pop().unwrap();
                assert_eq!((e.time, e.seq), (time, s));
            }
            assert!(queue.pop().is_none() && queue.is_empty());
        }
    }
}

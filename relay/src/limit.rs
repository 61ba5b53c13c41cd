//! Token buckets keyed by whoever is limited: a device (sync frames), a client address (HTTP
//! requests), an account or an address (login attempts).

use std::collections::BTreeMap;

use engine::sync::Micros;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at_us: Micros,
}

/// A bucket's tokens at `now_us`.
fn refill(b: &Bucket, now_us: Micros, rate: f64, burst: f64) -> f64 {
    (b.tokens + (now_us.saturating_sub(b.at_us) as f64) * rate / 1e6).min(burst)
}

/// One token bucket per key: `rate` tokens a second up to `burst`; a new key starts full.
///
/// At most `max_keys` keys are tracked. When a new key would exceed that, keys whose bucket has
/// refilled (idle ones, indistinguishable from new) are dropped; if every key is still busy the
/// map is cleared, so a flood from very many sources degrades to no limit rather than to
/// refusing everyone or growing without bound.
#[derive(Debug)]
pub struct Buckets<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    map: BTreeMap<K, Bucket>,
}

impl<K: Ord + Clone> Buckets<K> {
    pub fn new(rate_per_s: f64, burst: f64, max_keys: usize) -> Self {
        Self {
            rate: rate_per_s.max(0.0),
            burst: burst.max(1.0),
            max_keys: max_keys.max(1),
            map: BTreeMap::new(),
        }
    }

    fn refill(&self, b: &Bucket, now_us: Micros) -> f64 {
        refill(b, now_us, self.rate, self.burst)
    }

    /// Takes one token for `key` at `now_us`. When the bucket is empty: the whole seconds until
    /// a token is back (at least 1), for a `Retry-After`.
    pub fn take(&mut self, key: &K, now_us: Micros) -> Result<(), u64> {
        if !self.map.contains_key(key) && self.map.len() >= self.max_keys {
            let (rate, burst) = (self.rate, self.burst);
            self.map.retain(|_, b| refill(b, now_us, rate, burst) < burst);
            if self.map.len() >= self.max_keys {
                self.map.clear();
            }
        }
        let fresh = Bucket { tokens: self.burst, at_us: now_us };
        let current = self.map.get(key).copied().unwrap_or(fresh);
        let tokens = self.refill(&current, now_us);
        let bucket = Bucket { tokens, at_us: now_us };
        if tokens >= 1.0 {
            self.map.insert(key.clone(), Bucket { tokens: tokens - 1.0, ..bucket });
            Ok(())
        } else {
            self.map.insert(key.clone(), bucket);
            let wait_s = if self.rate > 0.0 { ((1.0 - tokens) / self.rate).ceil() as u64 } else { u64::MAX };
            Err(wait_s.max(1))
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::Buckets;

    #[test]
    fn a_burst_then_the_rate() {
        let mut b = Buckets::new(2.0, 3.0, 10);
        for _ in 0..3 {
            assert_eq!(b.take(&"a", 0), Ok(()));
        }
        assert_eq!(b.take(&"a", 0), Err(1), "empty after the burst");
        assert_eq!(b.take(&"b", 0), Ok(()), "another key has its own bucket");
        assert_eq!(b.take(&"a", 499_999), Err(1), "half a token is not a token");
        assert_eq!(b.take(&"a", 500_000), Ok(()), "2 a second: one back after 0.5 s");
        assert_eq!(b.take(&"a", 500_000), Err(1));
        // Refilling stops at the burst.
        for _ in 0..3 {
            assert_eq!(b.take(&"a", 100_000_000), Ok(()));
        }
        assert!(b.take(&"a", 100_000_000).is_err());
    }

    #[test]
    fn retry_after_counts_whole_seconds() {
        let mut b = Buckets::new(1.0 / 60.0, 1.0, 10);
        assert_eq!(b.take(&1, 0), Ok(()));
        assert_eq!(b.take(&1, 0), Err(60));
        assert_eq!(b.take(&1, 30_000_000), Err(30));
    }

    #[test]
    fn idle_keys_make_room_and_a_flood_clears_the_map() {
        let mut b = Buckets::new(1.0, 2.0, 3);
        for k in 0..3 {
            b.take(&k, 0).unwrap();
        }
        assert_eq!(b.len(), 3);
        // Key 0 is still refilling at t = 0.5 s: a fourth key finds every key busy and clears.
        b.take(&3, 500_000).unwrap();
        assert_eq!(b.len(), 1);
        // Later the idle ones are dropped instead, and the busy ones keep their state.
        b.take(&4, 10_000_000).unwrap();
        b.take(&4, 10_000_000).unwrap(); // 4 is empty now
        b.take(&5, 10_500_000).unwrap(); // {3 idle, 4 busy, 5 busy}
        b.take(&6, 10_500_000).unwrap(); // 3 goes
        assert_eq!(b.len(), 3);
        assert_eq!(b.take(&4, 10_500_000), Err(1), "4 kept its half-empty bucket");
    }
}

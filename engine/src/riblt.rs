//! Rateless invertible Bloom lookup table over 64-bit fingerprints (after Yang, Gilad and
//! Alizadeh, "Practical Rateless Set Reconciliation", SIGCOMM 2024).
//!
//! A set is encoded as an endless stream of coded symbols; element `x` is added to symbol 0 and
//! then to a pseudorandom sequence of later symbols whose density falls as `1 / (1 + i/2)`. The
//! difference of two sets' prefixes of `m` symbols decodes (by peeling) once `m` is about 1.35 to 2
//! times the size of the difference, whatever the sets' sizes, so one side streams symbols until
//! the other can decode. Deterministic: integer arithmetic plus IEEE `sqrt`, which is exact.

/// One coded symbol.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Symbol {
    /// XOR of the elements.
    pub sum: u64,
    /// XOR of the elements' 32-bit check hashes (the high half is always zero).
    pub check: u64,
    /// Number of elements (a difference of counts after subtraction).
    pub count: i64,
}

/// A 64-bit mix (splitmix64's finaliser over a domain-separated input).
#[inline]
fn mix(x: u64) -> u64 {
    let mut z = x ^ 0x6a09_e667_f3bc_c909;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 32-bit hash that tells a pure symbol (one element) from a mixture. 32 bits keep symbols
/// small on the wire; a false "pure" has odds 2^-32 per test and is caught by the digest check
/// that ends every session.
#[inline]
fn check_hash(x: u64) -> u64 {
    mix(x) >> 32
}

/// The indices of the symbols an element belongs to, ascending, starting at 0.
#[derive(Clone, Debug, Hash)]
pub struct Mapping {
    prng: u64,
    next: u64,
}

impl Mapping {
    pub fn new(x: u64) -> Self {
        Self { prng: mix(x) | 1, next: 0 }
    }

    /// The next index (the first call returns 0).
    #[inline]
    pub fn next_index(&mut self) -> u64 {
        let current = self.next;
        // Gap to the next index: with r uniform in (0, 1], ceil((i + 1.5) * (1/sqrt(r) - 1)).
        self.prng = self.prng.wrapping_mul(0xda94_2042_e4dd_58b5);
        let r = ((self.prng >> 32) as f64 + 1.0) / 4_294_967_296.0;
        let gap = ((current as f64 + 1.5) * (1.0 / r.sqrt() - 1.0)).ceil();
        let gap = if gap.is_finite() && gap >= 1.0 { gap.min(1e18) as u64 } else { 1 };
        self.next = current.saturating_add(gap);
        current
    }
}

/// Encodes a set's symbol stream incrementally: each element keeps its place in its index
/// sequence, so producing `m` symbols in any number of batches costs O(n log m) in all.
#[derive(Clone, Debug, Default, Hash)]
pub struct Encoder {
    elements: Vec<(u64, u64, Mapping)>,
    produced: u64,
}

impl Encoder {
    pub fn new(set: impl IntoIterator<Item = u64>) -> Self {
        let elements = set.into_iter().map(|x| (x, check_hash(x), Mapping::new(x))).collect();
        Self { elements, produced: 0 }
    }

    /// How many symbols have been produced.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// The next `count` symbols of the stream.
    pub fn next_symbols(&mut self, count: usize) -> Vec<Symbol> {
        let from = self.produced;
        let end = from + count as u64;
        let mut out = vec![Symbol::default(); count];
        for (x, h, mapping) in &mut self.elements {
            while mapping.next < end {
                let i = mapping.next_index();
                let s = &mut out[(i - from) as usize];
                s.sum ^= *x;
                s.check ^= *h;
                s.count = s.count.wrapping_add(1);
            }
        }
        self.produced = end;
        out
    }
}

/// Adds `x` (with multiplicity `sign`) to the symbols `[from, from + out.len())`.
fn apply(out: &mut [Symbol], from: u64, x: u64, sign: i64) {
    let end = from + out.len() as u64;
    let h = check_hash(x);
    let mut mapping = Mapping::new(x);
    loop {
        let i = mapping.next_index();
        if i >= end {
            break;
        }
        if i >= from {
            let s = &mut out[(i - from) as usize];
            s.sum ^= x;
            s.check ^= h;
            s.count = s.count.wrapping_add(sign);
        }
    }
}

/// The coded symbols `[from, from + len)` of a set.
pub fn encode(set: impl IntoIterator<Item = u64>, from: u64, len: usize) -> Vec<Symbol> {
    let mut out = vec![Symbol::default(); len];
    for x in set {
        apply(&mut out, from, x, 1);
    }
    out
}

/// What decoding found so far: elements only the remote side has (`remote`) and only the local
/// side has (`local`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Difference {
    pub remote: Vec<u64>,
    pub local: Vec<u64>,
}

/// Why a stream of coded symbols cannot be a set difference (only a hostile or broken peer sends
/// one: an honest prefix decodes, or needs more symbols).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// An element was peeled a second time. With honest symbols a peeled element leaves every
    /// symbol it belongs to, so it can never be pure again.
    #[error("coded symbols peel element {0:#018x} twice")]
    Repeated(u64),
    /// More elements peeled than symbols received. Each peel empties the symbol it came from, and
    /// an honest symbol that became empty stays empty, so a difference of `d` elements takes at
    /// least `d` symbols.
    #[error("coded symbols claim a difference larger than the {symbols} symbols received")]
    TooLarge { symbols: u64 },
}

/// Peels the difference `remote - local` of two sets from a growing prefix of symbols.
///
/// Work is bounded by what was received: at most one peel per symbol (else
/// [`DecodeError::TooLarge`]), each element peeled once (else [`DecodeError::Repeated`]), and a
/// peel touches the `O(log m)` symbols of one element's mapping.
#[derive(Clone, Debug, Default, Hash)]
pub struct Decoder {
    /// remote symbols minus local symbols, with decoded elements peeled off.
    symbols: Vec<Symbol>,
    found: Difference,
    /// Every element peeled so far, on either side.
    peeled: std::collections::BTreeSet<u64>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many symbols have been added.
    pub fn len(&self) -> u64 {
        self.symbols.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// Adds the next remote symbols and the local ones for the same indices, peels, and says
    /// whether the difference is fully decoded. An error means the symbols cannot come from two
    /// sets; the decoder is then of no further use.
    pub fn add(&mut self, remote: &[Symbol], local: &[Symbol]) -> Result<bool, DecodeError> {
        let from = self.len();
        for (r, l) in remote.iter().zip(local) {
            self.symbols.push(Symbol {
                sum: r.sum ^ l.sum,
                check: r.check ^ l.check,
                count: r.count.wrapping_sub(l.count),
            });
        }
        // Elements decoded earlier belong to some of the new symbols too.
        let new = &mut self.symbols[from as usize..];
        for &x in &self.found.remote {
            apply(new, from, x, -1);
        }
        for &x in &self.found.local {
            apply(new, from, x, 1);
        }
        self.peel()
    }

    fn peel(&mut self) -> Result<bool, DecodeError> {
        let mut pending: Vec<usize> = (0..self.symbols.len()).collect();
        // Bound: each iteration either skips a symbol or peels a new element; new elements are at
        // most `symbols.len()` (checked below), and each peel pushes at most the O(log m) indices
        // of its mapping.
        while let Some(i) = pending.pop() {
            let s = self.symbols[i];
            let sign = match s.count {
                1 => 1,
                -1 => -1,
                _ => continue,
            };
            if check_hash(s.sum) != s.check {
                continue;
            }
            let x = s.sum;
            if !self.peeled.insert(x) {
                return Err(DecodeError::Repeated(x));
            }
            if self.peeled.len() > self.symbols.len() {
                return Err(DecodeError::TooLarge { symbols: self.len() });
            }
            if sign == 1 {
                self.found.remote.push(x);
            } else {
                self.found.local.push(x);
            }
            // Remove x from every symbol it belongs to, and revisit those.
            let h = check_hash(x);
            let mut mapping = Mapping::new(x);
            loop {
                let j = mapping.next_index();
                if j >= self.symbols.len() as u64 {
                    break;
                }
                let t = &mut self.symbols[j as usize];
                t.sum ^= x;
                t.check ^= h;
                t.count = t.count.wrapping_sub(sign);
                pending.push(j as usize);
            }
        }
        Ok(self.decoded())
    }

    /// Every symbol is empty: the difference is what was found.
    pub fn decoded(&self) -> bool {
        !self.symbols.is_empty() && self.symbols.iter().all(|s| s.sum == 0 && s.check == 0 && s.count == 0)
    }

    pub fn difference(&self) -> &Difference {
        &self.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds symbols one at a time until the difference decodes; returns it and the count used.
    fn decode(remote: &[u64], local: &[u64]) -> (Difference, u64) {
        let max = 4 * (remote.len() + local.len()) + 16;
        let r = encode(remote.iter().copied(), 0, max);
        let l = encode(local.iter().copied(), 0, max);
        let mut decoder = Decoder::new();
        for i in 0..max {
            if decoder.add(&r[i..=i], &l[i..=i]).expect("honest symbols decode") {
                break;
            }
        }
        let mut d = decoder.difference().clone();
        d.remote.sort_unstable();
        d.local.sort_unstable();
        (d, decoder.len())
    }

    #[test]
    fn decodes_differences_of_every_size_with_bounded_overhead() {
        for d in [1usize, 2, 10, 100, 1000] {
            let common: Vec<u64> = (0..2_000u64).map(mix).collect();
            let only_remote: Vec<u64> = (0..d as u64).map(|i| mix(1_000_000 + i)).collect();
            let only_local: Vec<u64> = (0..d as u64 / 2).map(|i| mix(2_000_000 + i)).collect();
            let remote: Vec<u64> = common.iter().chain(&only_remote).copied().collect();
            let local: Vec<u64> = common.iter().chain(&only_local).copied().collect();
            let (found, used) = decode(&remote, &local);
            println!("riblt: d = {} decoded with {used} symbols", only_remote.len() + only_local.len());
            let mut want_remote = only_remote.clone();
            want_remote.sort_unstable();
            let mut want_local = only_local.clone();
            want_local.sort_unstable();
            assert_eq!(found.remote, want_remote, "d = {d}");
            assert_eq!(found.local, want_local, "d = {d}");
            let total = (only_remote.len() + only_local.len()) as u64;
            assert!(used <= 3 * total + 8, "d = {d}: {used} symbols for {total} differences");
        }
    }

    #[test]
    fn equal_sets_decode_at_once() {
        let set: Vec<u64> = (0..100u64).map(mix).collect();
        let (found, used) = decode(&set, &set);
        assert_eq!(found, Difference::default());
        assert_eq!(used, 1);
    }

    #[test]
    fn the_incremental_encoder_matches_the_batch_one() {
        let set: Vec<u64> = (0..500u64).map(mix).collect();
        let mut encoder = Encoder::new(set.iter().copied());
        let mut streamed = Vec::new();
        for count in [1usize, 3, 16, 7, 100] {
            streamed.extend(encoder.next_symbols(count));
        }
        assert_eq!(streamed, encode(set.iter().copied(), 0, 127));
    }

    /// The symbols of a 46-byte Hello an attacker sent (issue 11): symbol 0 holds `x` twice
    /// (count 2) and symbol 1 holds it once, so peeling `x` from symbol 1 leaves symbol 0 pure
    /// with `x` again, and the unbounded decoder appended `x` until memory ran out.
    #[test]
    fn an_element_pure_twice_is_refused_not_peeled_forever() {
        let x = 0x1234_5678_9abc_def1u64;
        let mut m = Mapping::new(x);
        let indices: Vec<u64> = (0..4).map(|_| m.next_index()).collect();
        assert_eq!(indices[0], 0);
        let h = check_hash(x);
        let mut remote = vec![Symbol::default(); indices[1] as usize + 1];
        remote[0] = Symbol { sum: 0, check: 0, count: 2 };
        remote[indices[1] as usize] = Symbol { sum: x, check: h, count: 1 };
        let local = vec![Symbol::default(); remote.len()];
        let mut decoder = Decoder::new();
        let err = decoder.add(&remote, &local).unwrap_err();
        assert!(matches!(err, DecodeError::Repeated(_) | DecodeError::TooLarge { .. }), "{err}");
        assert!(decoder.difference().remote.len() + decoder.difference().local.len() <= remote.len());
    }

    /// Whatever symbols arrive, peeling ends with at most one element per symbol.
    #[test]
    fn arbitrary_symbols_peel_at_most_one_element_per_symbol() {
        let mut state = 7u64;
        for round in 0..2_000u64 {
            let len = 1 + (round % 40) as usize;
            let mut remote = Vec::with_capacity(len);
            for _ in 0..len {
                state = mix(state);
                let pick = mix(state ^ 1) % 4;
                let sum = if pick == 0 { 0 } else { mix(state % 3) };
                remote.push(Symbol {
                    sum,
                    check: if state.is_multiple_of(5) { 0 } else { check_hash(sum) },
                    count: (state % 7) as i64 - 3,
                });
            }
            let local = vec![Symbol::default(); len];
            let mut decoder = Decoder::new();
            let _ = decoder.add(&remote, &local);
            let d = decoder.difference();
            assert!(d.remote.len() + d.local.len() <= len, "round {round}");
        }
    }

    #[test]
    fn mapping_starts_at_zero_and_ascends() {
        let mut m = Mapping::new(42);
        let mut last = m.next_index();
        assert_eq!(last, 0);
        for _ in 0..50 {
            let next = m.next_index();
            assert!(next > last);
            last = next;
        }
    }
}

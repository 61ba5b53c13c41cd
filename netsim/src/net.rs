//! The network model: per-path latency (hence reordering), loss, duplication, partitions, and
//! which paths exist through NATs (RFC 4787), direct or relayed through the cloud.
//!
//! Sampling uses integer arithmetic on the caller's RNG, so runs replay bit for bit anywhere.

use std::collections::BTreeMap;
use std::ops::Range;

use rand::Rng as _;
use rand_chacha::ChaCha8Rng;

use crate::scenario::{self, Latency, Network};

/// A device's NAT, by its RFC 4787 behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// A public address: no mapping, no filtering.
    Public,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    Restricted,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// Address-and-port-dependent mapping and filtering.
    Symmetric,
}

impl Nat {
    /// Picks by the scenario's shares, from a uniform draw in `[0, 1_000_000)`.
    pub fn pick(shares: &scenario::Nat, draw: u32) -> Nat {
        let mut edge = 0u32;
        for (share, nat) in [
            (shares.full_cone_ppm, Nat::FullCone),
            (shares.restricted_ppm, Nat::Restricted),
            (shares.port_restricted_ppm, Nat::PortRestricted),
            (shares.symmetric_ppm, Nat::Symmetric),
        ] {
            edge = edge.saturating_add(share);
            if draw < edge {
                return nat;
            }
        }
        Nat::Public
    }

    /// The mapping is endpoint-independent: the port the relay saw is the port a peer sees.
    fn independent_mapping(self) -> bool {
        !matches!(self, Nat::Symmetric)
    }

    /// Filtering by address and port: only the exact address and port we sent to gets in.
    fn port_filtering(self) -> bool {
        matches!(self, Nat::PortRestricted | Nat::Symmetric)
    }
}

/// Whether UDP hole punching, coordinated through the relay (each side sends to the other's
/// address as the relay saw it), opens a two-way path. Packets from `a` reach `b` when `a`'s
/// mapping is endpoint-independent (they come from the address `b` sent to) or `b` does not filter
/// by port; both directions must work.
pub fn punch(a: Nat, b: Nat) -> bool {
    let a_to_b = a.independent_mapping() || !b.port_filtering();
    let b_to_a = b.independent_mapping() || !a.port_filtering();
    a_to_b && b_to_a
}

/// The network state.
#[derive(Debug)]
pub struct Net {
    cfg: Network,
    nats: Vec<Nat>,
    /// Devices never talk to each other directly (star topology).
    star: bool,
    /// Active partitions: index -> the cut-off device range.
    cuts: BTreeMap<usize, Range<u32>>,
    /// Gilbert-Elliott state per directed path (true: bad), for bursty loss.
    bad: BTreeMap<(u32, u32), bool>,
    dropped: u64,
    relayed: u64,
    direct: u64,
}

impl Net {
    pub fn new(cfg: Network, nats: Vec<Nat>, star: bool) -> Self {
        Self {
            cfg,
            nats,
            star,
            cuts: BTreeMap::new(),
            bad: BTreeMap::new(),
            dropped: 0,
            relayed: 0,
            direct: 0,
        }
    }

    pub fn cut(&mut self, index: usize, devices: Range<u32>) {
        self.cuts.insert(index, devices);
    }

    pub fn heal(&mut self, index: usize) {
        self.cuts.remove(&index);
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn relayed(&self) -> u64 {
        self.relayed
    }

    pub fn direct(&self) -> u64 {
        self.direct
    }

    /// Two nodes can exchange packets when they are on the same side of every active partition.
    fn reachable(&self, a: u32, b: u32) -> bool {
        self.cuts.values().all(|cut| cut.contains(&a) == cut.contains(&b))
    }

    fn latency(rng: &mut ChaCha8Rng, latency: &Latency) -> u64 {
        // A uniform draw in (0, 1], from 53 random bits (exact in f64).
        let mut unit = || ((rng.random::<u64>() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        // Capped at 10 minutes so a heavy tail cannot stall a run.
        const CAP_US: f64 = 600_000_000.0;
        match latency {
            Latency::Constant { ms } => ms * 1_000,
            Latency::Uniform { min_ms, max_ms } => rng.random_range(min_ms * 1_000..=max_ms * 1_000),
            Latency::Lognormal { median_ms, sigma } => {
                // Box-Muller with libm's software log/cos: the same bits on every platform.
                let (u1, u2) = (unit(), unit());
                let normal = libm::sqrt(-2.0 * libm::log(u1)) * libm::cos(2.0 * std::f64::consts::PI * u2);
                let us = *median_ms as f64 * 1_000.0 * libm::exp(sigma * normal);
                us.clamp(0.0, CAP_US) as u64
            }
            Latency::Pareto { min_ms, alpha } => {
                let us = *min_ms as f64 * 1_000.0 / libm::pow(unit(), 1.0 / alpha);
                us.clamp(0.0, CAP_US) as u64
            }
        }
    }

    /// The loss rate of the next datagram on a directed path, stepping its Gilbert-Elliott state.
    fn loss_ppm(&mut self, rng: &mut ChaCha8Rng, path: (u32, u32)) -> u32 {
        let Some(burst) = &self.cfg.burst else { return self.cfg.loss_ppm };
        let (p, r, bad_loss) = (burst.p_ppm, burst.r_ppm, burst.bad_loss_ppm);
        let state = self.bad.entry(path).or_insert(false);
        let draw = rng.random_range(0..1_000_000);
        *state = if *state { draw >= r } else { draw < p };
        if *state {
            bad_loss
        } else {
            self.cfg.loss_ppm
        }
    }

    /// One wide-area leg: `None` if lost, else its delays (two when duplicated).
    fn wan_leg(&mut self, rng: &mut ChaCha8Rng, path: (u32, u32)) -> Vec<u64> {
        let loss = self.loss_ppm(rng, path);
        if rng.random_range(0..1_000_000) < loss {
            return Vec::new();
        }
        let mut delays = vec![Self::latency(rng, &self.cfg.wan)];
        if rng.random_range(0..1_000_000) < self.cfg.dup_ppm {
            delays.push(Self::latency(rng, &self.cfg.wan));
        }
        delays
    }

    /// Sends a datagram `from` -> `to`; returns the delays of the copies that arrive.
    pub fn transmit(&mut self, rng: &mut ChaCha8Rng, from: u32, to: u32, same_lan: bool) -> Vec<u64> {
        let delays = if same_lan {
            if self.reachable(from, to) {
                vec![Self::latency(rng, &self.cfg.lan)]
            } else {
                Vec::new()
            }
        } else if from == 0 || to == 0 {
            if self.reachable(from, to) {
                self.wan_leg(rng, (from, to))
            } else {
                Vec::new()
            }
        } else if !self.star
            && punch(self.nats[from as usize], self.nats[to as usize])
            && self.reachable(from, to)
        {
            self.direct += 1;
            self.wan_leg(rng, (from, to))
        } else if self.relay_ok(from, to) {
            // Relayed through the cloud: two legs, each may lose or duplicate.
            self.relayed += 1;
            let mut out = Vec::new();
            for d in self.wan_leg(rng, (from, 0)) {
                for e in self.wan_leg(rng, (0, to)) {
                    out.push(d + e);
                }
            }
            out
        } else {
            Vec::new()
        };
        if delays.is_empty() {
            self.dropped += 1;
        }
        delays
    }

    fn relay_ok(&self, from: u32, to: u32) -> bool {
        self.reachable(from, 0) && self.reachable(0, to)
    }
}

/// Cumulative thresholds (out of `u64::MAX`) of a Zipf(`s`) popularity over `items` (uniform at
/// `s = 0`). Built once with `libm`'s software `pow`, so identical on every platform.
pub fn zipf_cdf(items: u32, s: f64) -> Vec<u64> {
    let weights: Vec<f64> =
        (1..=items).map(|k| if s == 0.0 { 1.0 } else { 1.0 / libm::pow(f64::from(k), s) }).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w / total;
            if acc >= 1.0 {
                u64::MAX
            } else {
                (acc * u64::MAX as f64) as u64
            }
        })
        .collect()
}

/// The item a uniform draw selects.
pub fn sample_cdf(cdf: &[u64], draw: u64) -> usize {
    cdf.partition_point(|&edge| edge < draw).min(cdf.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4787_hole_punching_table() {
        use Nat::*;
        let all = [Public, FullCone, Restricted, PortRestricted, Symmetric];
        for a in all {
            for b in all {
                let expected = !matches!(
                    (a, b),
                    (Symmetric, Symmetric) | (Symmetric, PortRestricted) | (PortRestricted, Symmetric)
                );
                assert_eq!(punch(a, b), expected, "{a:?} with {b:?}");
            }
        }
    }

    #[test]
    fn latency_distributions_have_their_shape() {
        use rand::SeedableRng as _;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut draw = |l: &Latency| -> Vec<u64> {
            let mut v: Vec<u64> = (0..10_001).map(|_| Net::latency(&mut rng, l)).collect();
            v.sort_unstable();
            v
        };
        let logn = draw(&Latency::Lognormal { median_ms: 50, sigma: 0.5 });
        let median = logn[5_000];
        assert!((45_000..55_000).contains(&median), "lognormal median {median} us");
        let pareto = draw(&Latency::Pareto { min_ms: 10, alpha: 1.5 });
        assert!(pareto[0] >= 10_000, "pareto minimum");
        assert!(pareto[9_990] > 10 * pareto[5_000], "pareto has a heavy tail");
        assert_eq!(draw(&Latency::Constant { ms: 7 })[0], 7_000);
    }

    #[test]
    fn bursty_loss_is_per_path_and_sticky() {
        use rand::SeedableRng as _;
        let cfg = Network {
            loss_ppm: 0,
            burst: Some(crate::scenario::Burst { p_ppm: 100_000, r_ppm: 50_000, bad_loss_ppm: 1_000_000 }),
            ..Network::default()
        };
        let mut net = Net::new(cfg, vec![Nat::Public; 3], true);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let outcomes: Vec<bool> =
            (0..20_000).map(|_| net.transmit(&mut rng, 1, 0, false).is_empty()).collect();
        let lost = outcomes.iter().filter(|&&l| l).count();
        let bursts = outcomes.windows(2).filter(|w| !w[0] && w[1]).count();
        // Stationary bad share p / (p + r) = 2/3; mean burst length 1 / r = 20.
        assert!((12_000..15_000).contains(&lost), "{lost} lost");
        assert!(lost / bursts.max(1) >= 10, "losses come in bursts: {lost} in {bursts}");
    }

    #[test]
    fn zipf_prefers_the_first_items() {
        let cdf = zipf_cdf(100, 1.0);
        assert_eq!(sample_cdf(&cdf, 0), 0);
        assert_eq!(sample_cdf(&cdf, u64::MAX), 99);
        let uniform = zipf_cdf(4, 0.0);
        assert_eq!(sample_cdf(&uniform, u64::MAX / 2), 1);
    }
}

//! Push-pull gossip of one write, in two models, to measure spread against theory (issue 4,
//! Targets):
//!
//! - **idealised** (the model the theory assumes): complete graph, synchronous rounds; in every
//!   round each live node opens an exchange with one uniformly random other node (it does not know
//!   who is down). The initiator's request carries its state (push), the reply the responder's
//!   (pull); each message may be lost, a reply is only sent to a request that arrived, and a node
//!   that learns the write in a round passes it on from the next round (Karp et al. 2000: about
//!   log3 N + O(ln ln N) rounds).
//! - **timed**: the same exchange on a [`Topology`] (or the complete graph) in virtual time: each
//!   live node gossips every `interval` with a random neighbour (random phase), every datagram
//!   crosses the simulator's own network model ([`Net::transmit`]: latency distribution, loss,
//!   duplication), and the responder answers on arrival.
//!
//! No engine: a node's state is one bit (has the write). Sampling is integer (and `libm` inside
//! the network model), so results are the same bits on any machine.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::net::{Copies, Nat, Net, Sent};
use crate::scenario::{Latency, Network};
use crate::topology::Topology;

/// Rounds after which a trial that has not reached every live node counts as incomplete.
pub const ROUNDS_MAX: u32 = 1_000;
/// Most nodes and trials one measurement takes.
pub const NODES_MAX: u32 = 1_000_000;
pub const TRIALS_MAX: u32 = 1_000_000;

/// Why a measurement cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    #[error("nodes must be 2 to {max}, got {n}")]
    Nodes { n: u32, max: u32 },
    #[error("trials must be 1 to {max}, got {trials}")]
    Trials { trials: u32, max: u32 },
    #[error("{field} = {value} is above 1000000")]
    Ppm { field: &'static str, value: u32 },
    #[error("down_ppm = {down_ppm} leaves no live node among {n}")]
    NoLiveNode { n: u32, down_ppm: u32 },
    #[error("the topology has {topology} nodes, not {n}")]
    TopologySize { topology: u32, n: u32 },
    #[error("interval_ms must be at least 1")]
    Interval,
}

/// Faults of the idealised model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Faults {
    /// Each message (request or reply) is lost with this probability, per million.
    pub loss_ppm: u32,
    /// This share of nodes (rounded to the nearest node) is down: never gossips, never answers.
    pub down_ppm: u32,
}

/// Rounds to full spread over many trials.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundStats {
    pub n: u32,
    pub live: u32,
    pub trials: u32,
    /// Over the completed trials.
    pub mean: f64,
    pub p50: u32,
    pub p99: u32,
    pub max: u32,
    /// Trials that had not reached every live node after [`ROUNDS_MAX`] rounds.
    pub incomplete: u32,
}

impl RoundStats {
    fn from_samples(n: u32, live: u32, mut rounds: Vec<u32>, incomplete: u32) -> Self {
        rounds.sort_unstable();
        let trials = rounds.len() as u32 + incomplete;
        let sum: u64 = rounds.iter().map(|&r| u64::from(r)).sum();
        let mean = if rounds.is_empty() { f64::NAN } else { sum as f64 / rounds.len() as f64 };
        Self {
            n,
            live,
            trials,
            mean,
            p50: percentile(&rounds, 50),
            p99: percentile(&rounds, 99),
            max: rounds.last().copied().unwrap_or(0),
            incomplete,
        }
    }
}

/// Nearest-rank percentile of sorted samples (0 when there are none).
pub fn percentile<T: Copy + Default>(sorted: &[T], pct: u32) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (sorted.len() as u64 * u64::from(pct)).div_ceil(100).max(1);
    sorted[(rank - 1) as usize]
}

/// The bound on mean rounds: log3 N + ln ln N + 1.
pub fn mean_rounds_bound(n: u32) -> f64 {
    let n = f64::from(n);
    libm::log(n) / libm::log(3.0) + libm::log(libm::log(n)) + 1.0
}

/// The bound on p99 rounds: log2 N + 2.
pub fn p99_rounds_bound(n: u32) -> f64 {
    libm::log2(f64::from(n)) + 2.0
}

/// An RNG for one cell of an experiment: the seed's stream `stream`.
pub fn cell_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

fn check_ppm(field: &'static str, value: u32) -> Result<(), GossipError> {
    if value > 1_000_000 {
        return Err(GossipError::Ppm { field, value });
    }
    Ok(())
}

fn check_size(n: u32, trials: u32) -> Result<(), GossipError> {
    if !(2..=NODES_MAX).contains(&n) {
        return Err(GossipError::Nodes { n, max: NODES_MAX });
    }
    if !(1..=TRIALS_MAX).contains(&trials) {
        return Err(GossipError::Trials { trials, max: TRIALS_MAX });
    }
    Ok(())
}

fn down_count(n: u32, down_ppm: u32) -> u32 {
    ((u64::from(n) * u64::from(down_ppm) + 500_000) / 1_000_000) as u32
}

/// Which nodes are up: exactly `round(n * down_ppm / 10^6)` down, chosen uniformly.
fn pick_up<R: Rng + ?Sized>(n: u32, down_ppm: u32, rng: &mut R) -> Vec<bool> {
    let down = down_count(n, down_ppm) as usize;
    let mut order: Vec<u32> = (0..n).collect();
    // Partial Fisher-Yates: the first `down` entries are a uniform sample.
    for i in 0..down {
        let j = rng.random_range(i..n as usize);
        order.swap(i, j);
    }
    let mut up = vec![true; n as usize];
    for &v in &order[..down] {
        up[v as usize] = false;
    }
    up
}

fn lost<R: Rng + ?Sized>(loss_ppm: u32, rng: &mut R) -> bool {
    loss_ppm > 0 && rng.random_range(0..1_000_000) < loss_ppm
}

/// One idealised trial: rounds until the write, made at a random live node, is on every live
/// node; `None` after [`ROUNDS_MAX`].
fn idealised_trial<R: Rng + ?Sized>(n: u32, faults: Faults, rng: &mut R) -> (u32, Option<u32>) {
    let up = pick_up(n, faults.down_ppm, rng);
    let live_nodes: Vec<u32> = (0..n).filter(|&v| up[v as usize]).collect();
    let live = live_nodes.len() as u32;
    let writer = live_nodes[rng.random_range(0..live_nodes.len())];
    let mut informed = vec![false; n as usize];
    informed[writer as usize] = true;
    let mut next = informed.clone();
    let mut count = 1u32;
    let mut round = 0u32;
    while count < live {
        round += 1;
        if round > ROUNDS_MAX {
            return (live, None);
        }
        for i in 0..n {
            if !up[i as usize] {
                continue;
            }
            // A uniform partner among the n - 1 others.
            let mut p = rng.random_range(0..n - 1);
            if p >= i {
                p += 1;
            }
            if !up[p as usize] || lost(faults.loss_ppm, rng) {
                continue;
            }
            // The request arrived: push.
            if informed[i as usize] && !next[p as usize] {
                next[p as usize] = true;
                count += 1;
            }
            if lost(faults.loss_ppm, rng) {
                continue;
            }
            // The reply arrived: pull.
            if informed[p as usize] && !next[i as usize] {
                next[i as usize] = true;
                count += 1;
            }
        }
        informed.copy_from_slice(&next);
    }
    (live, Some(round))
}

/// Rounds to full spread in the idealised model over `trials` trials of `n` nodes.
pub fn idealised(
    n: u32,
    trials: u32,
    faults: Faults,
    rng: &mut ChaCha8Rng,
) -> Result<RoundStats, GossipError> {
    check_size(n, trials)?;
    check_ppm("loss_ppm", faults.loss_ppm)?;
    check_ppm("down_ppm", faults.down_ppm)?;
    if down_count(n, faults.down_ppm) >= n {
        return Err(GossipError::NoLiveNode { n, down_ppm: faults.down_ppm });
    }
    let mut rounds = Vec::with_capacity(trials as usize);
    let (mut incomplete, mut live) = (0, 0);
    for _ in 0..trials {
        let (l, r) = idealised_trial(n, faults, rng);
        live = l;
        match r {
            Some(r) => rounds.push(r),
            None => incomplete += 1,
        }
    }
    Ok(RoundStats::from_samples(n, live, rounds, incomplete))
}

/// Whom a node may gossip with in the timed model.
#[derive(Clone, Copy, Debug)]
pub enum Peers<'a> {
    /// Everyone (sampled, not stored).
    Complete(u32),
    /// A topology's neighbours.
    Graph(&'a Topology),
}

impl Peers<'_> {
    fn len(&self) -> u32 {
        match self {
            Peers::Complete(n) => *n,
            Peers::Graph(t) => t.len(),
        }
    }

    fn pick<R: Rng + ?Sized>(&self, node: u32, rng: &mut R) -> Option<u32> {
        match self {
            Peers::Complete(n) => {
                let mut p = rng.random_range(0..n - 1);
                if p >= node {
                    p += 1;
                }
                Some(p)
            }
            Peers::Graph(t) => t.random_neighbor(node, rng),
        }
    }
}

/// The timed model's network and schedule.
#[derive(Clone, Debug)]
pub struct Timed {
    /// Each node starts an exchange this often (first one at a uniform phase in the interval).
    pub interval_ms: u64,
    /// One-way latency of every datagram.
    pub latency: Latency,
    /// Per datagram, parts per million.
    pub loss_ppm: u32,
}

/// Time to full spread in the timed model over many trials.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimeStats {
    pub n: u32,
    pub trials: u32,
    pub time_ms_mean: f64,
    pub time_ms_p50: f64,
    pub time_ms_p99: f64,
    pub time_ms_max: f64,
    /// The same, in gossip intervals ("rounds").
    pub rounds_mean: f64,
    pub rounds_p99: f64,
    /// Trials not done after [`ROUNDS_MAX`] intervals (a disconnected graph, say).
    pub incomplete: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// `node` starts an exchange.
    Tick { node: u32 },
    /// A request from `from` arrives at `to`, carrying the write or not.
    Request { from: u32, to: u32, carries: bool },
    /// A reply arrives at `to`.
    Reply { to: u32, carries: bool },
}

/// The copies of a datagram that arrive. A trial's network has public devices only and an
/// unlimited cloud uplink, so nothing waits at the relay for [`Net::forward`].
fn direct(sent: Sent) -> Copies {
    assert!(sent.relay.delays.is_empty(), "a gossip trial relays nothing");
    sent.arrive
}

/// One timed trial on `peers`: microseconds until every node has the write.
fn timed_trial(peers: Peers<'_>, cfg: &Timed, rng: &mut ChaCha8Rng) -> Option<u64> {
    let n = peers.len();
    let interval_us = cfg.interval_ms * 1_000;
    let horizon_us = interval_us.saturating_mul(u64::from(ROUNDS_MAX));
    let network = Network {
        wan: cfg.latency.clone(),
        lan: cfg.latency.clone(),
        loss_ppm: cfg.loss_ppm,
        ..Network::default()
    };
    // Node 0 is the network model's cloud; the rest are public devices, each in its own group.
    let devices = n.saturating_sub(1);
    let mut net = Net::new(network, devices, 1, vec![(Nat::Public, false); devices as usize], false, 0);
    let mut queue: BinaryHeap<Reverse<(u64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |queue: &mut BinaryHeap<_>, time: u64, ev: Ev| {
        seq += 1;
        queue.push(Reverse((time, seq, ev)));
    };
    for node in 0..n {
        push(&mut queue, rng.random_range(0..interval_us), Ev::Tick { node });
    }
    let mut informed = vec![false; n as usize];
    informed[rng.random_range(0..n) as usize] = true;
    let mut count = 1u32;
    while let Some(Reverse((now, _, ev))) = queue.pop() {
        if now > horizon_us {
            return None;
        }
        match ev {
            Ev::Tick { node } => {
                push(&mut queue, now + interval_us, Ev::Tick { node });
                let Some(peer) = peers.pick(node, rng) else { continue };
                let carries = informed[node as usize];
                for &delay in direct(net.transmit(rng, now, node, peer, 64)).as_slice() {
                    push(&mut queue, now + delay, Ev::Request { from: node, to: peer, carries });
                }
            }
            Ev::Request { from, to, carries } => {
                if carries && !informed[to as usize] {
                    informed[to as usize] = true;
                    count += 1;
                }
                let answer = informed[to as usize];
                for &delay in direct(net.transmit(rng, now, to, from, 64)).as_slice() {
                    push(&mut queue, now + delay, Ev::Reply { to: from, carries: answer });
                }
            }
            Ev::Reply { to, carries } => {
                if carries && !informed[to as usize] {
                    informed[to as usize] = true;
                    count += 1;
                }
            }
        }
        if count == n {
            return Some(now);
        }
    }
    None
}

/// Time to full spread in the timed model: each trial builds its peers with `peers_for`
/// (a fresh random graph per trial, say) and runs once.
pub fn timed<F>(
    n: u32,
    trials: u32,
    cfg: &Timed,
    rng: &mut ChaCha8Rng,
    mut peers_for: F,
) -> Result<TimeStats, GossipError>
where
    F: FnMut(&mut ChaCha8Rng) -> Option<Topology>,
{
    check_size(n, trials)?;
    check_ppm("loss_ppm", cfg.loss_ppm)?;
    if cfg.interval_ms == 0 {
        return Err(GossipError::Interval);
    }
    let mut times = Vec::with_capacity(trials as usize);
    let mut incomplete = 0;
    for _ in 0..trials {
        let topology = peers_for(rng);
        let peers = match &topology {
            Some(t) if t.len() != n => return Err(GossipError::TopologySize { topology: t.len(), n }),
            Some(t) => Peers::Graph(t),
            None => Peers::Complete(n),
        };
        match timed_trial(peers, cfg, rng) {
            Some(us) => times.push(us),
            None => incomplete += 1,
        }
    }
    times.sort_unstable();
    let ms = |us: u64| us as f64 / 1_000.0;
    let mean_us =
        if times.is_empty() { f64::NAN } else { times.iter().sum::<u64>() as f64 / times.len() as f64 };
    let interval_ms = cfg.interval_ms as f64;
    Ok(TimeStats {
        n,
        trials,
        time_ms_mean: mean_us / 1_000.0,
        time_ms_p50: ms(percentile(&times, 50)),
        time_ms_p99: ms(percentile(&times, 99)),
        time_ms_max: ms(times.last().copied().unwrap_or(0)),
        rounds_mean: mean_us / 1_000.0 / interval_ms,
        rounds_p99: ms(percentile(&times, 99)) / interval_ms,
        incomplete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::GraphSpec;

    const LOSSY: Faults = Faults { loss_ppm: 100_000, down_ppm: 200_000 };

    #[test]
    fn idealised_push_pull_meets_the_theory_bounds() {
        for (i, n) in [16u32, 128, 1024].into_iter().enumerate() {
            let s = idealised(n, 1_000, Faults::default(), &mut cell_rng(7, i as u64)).unwrap();
            assert_eq!((s.trials, s.incomplete, s.live), (1_000, 0, n));
            assert!(s.mean <= mean_rounds_bound(n), "N={n}: mean {} > {}", s.mean, mean_rounds_bound(n));
            assert!(
                f64::from(s.p99) <= p99_rounds_bound(n),
                "N={n}: p99 {} > {}",
                s.p99,
                p99_rounds_bound(n)
            );
            // Not implausibly fast either: early on push-pull about triples the informed set.
            assert!(s.mean >= libm::log(f64::from(n)) / libm::log(3.0), "N={n}: mean {}", s.mean);
        }
    }

    #[test]
    fn idealised_with_loss_and_down_nodes_stays_within_one_and_a_half_times() {
        for (i, n) in [64u32, 1024].into_iter().enumerate() {
            let s = idealised(n, 500, LOSSY, &mut cell_rng(8, i as u64)).unwrap();
            assert_eq!(s.live, n - (n * 2 + 5) / 10, "20% down");
            assert_eq!(s.incomplete, 0);
            assert!(s.mean <= 1.5 * mean_rounds_bound(n), "N={n}: mean {}", s.mean);
            assert!(f64::from(s.p99) <= 1.5 * p99_rounds_bound(n), "N={n}: p99 {}", s.p99);
            let clean = idealised(n, 500, Faults::default(), &mut cell_rng(8, i as u64)).unwrap();
            assert!(s.mean > clean.mean, "faults slow spread down: {} vs {}", s.mean, clean.mean);
        }
    }

    #[test]
    fn same_seed_same_numbers() {
        let a = idealised(200, 100, LOSSY, &mut cell_rng(1, 2)).unwrap();
        let b = idealised(200, 100, LOSSY, &mut cell_rng(1, 2)).unwrap();
        assert_eq!(a, b);
        let cfg = Timed {
            interval_ms: 1_000,
            latency: Latency::Lognormal { median_ms: 50, sigma: 0.5 },
            loss_ppm: 0,
        };
        let spec = GraphSpec::RandomRegular { degree: 4 };
        let run = || timed(100, 20, &cfg, &mut cell_rng(3, 4), |r| spec.build(100, r).ok()).unwrap();
        assert_eq!(run(), run());
    }

    #[test]
    fn timed_gossip_spreads_on_graphs_and_slower_on_sparse_ones() {
        let cfg = Timed { interval_ms: 1_000, latency: Latency::Constant { ms: 40 }, loss_ppm: 0 };
        let n = 256;
        let complete = timed(n, 30, &cfg, &mut cell_rng(5, 0), |_| None).unwrap();
        let ring = GraphSpec::SmallWorld { k: 2, beta_ppm: 0 };
        let ring = timed(n, 5, &cfg, &mut cell_rng(5, 1), |r| ring.build(n, r).ok()).unwrap();
        assert_eq!((complete.incomplete, ring.incomplete), (0, 0));
        // A ring needs about n/4 intervals (both directions, push-pull); the complete graph a few.
        assert!(complete.rounds_mean < 10.0, "{complete:?}");
        assert!(ring.rounds_mean > 30.0, "{ring:?}");
        // A disconnected graph never finishes.
        let split = crate::topology::explicit(4, &[(0, 1), (2, 3)]).unwrap();
        let cut = timed(4, 3, &cfg, &mut cell_rng(5, 2), |_| Some(split.clone())).unwrap();
        assert_eq!(cut.incomplete, 3);
    }

    #[test]
    fn bad_parameters_are_errors() {
        let mut rng = cell_rng(0, 0);
        assert_eq!(
            idealised(1, 10, Faults::default(), &mut rng),
            Err(GossipError::Nodes { n: 1, max: NODES_MAX })
        );
        assert_eq!(
            idealised(10, 10, Faults { loss_ppm: 2_000_000, down_ppm: 0 }, &mut rng),
            Err(GossipError::Ppm { field: "loss_ppm", value: 2_000_000 })
        );
        assert!(matches!(
            idealised(10, 10, Faults { loss_ppm: 0, down_ppm: 1_000_000 }, &mut rng),
            Err(GossipError::NoLiveNode { .. })
        ));
        assert_eq!(percentile(&[1u32, 2, 3, 4], 50), 2);
        assert_eq!(percentile(&[1u32, 2, 3, 4], 99), 4);
    }
}

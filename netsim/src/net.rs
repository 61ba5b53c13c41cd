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

/// One NAT per LAN group, and whether it hairpins, drawn by the scenario's shares (two draws per
/// group, in group order).
pub fn group_nats(shares: &scenario::Nat, groups: u32, rng: &mut ChaCha8Rng) -> Vec<(Nat, bool)> {
    (0..groups)
        .map(|_| {
            let nat = Nat::pick(shares, rng.random_range(0..1_000_000));
            (nat, rng.random_range(0..1_000_000) < shares.hairpin_ppm)
        })
        .collect()
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

/// The arrival delays of one datagram's copies: none (lost), one, or a few (duplicated, on one
/// or both legs of a relayed path). Inline, so sending allocates nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copies {
    len: u8,
    delays: [u64; 4],
}

impl Copies {
    fn one(delay: u64) -> Self {
        Self { len: 1, delays: [delay, 0, 0, 0] }
    }

    fn push(&mut self, delay: u64) {
        // At most two legs of at most two copies each.
        if let Some(slot) = self.delays.get_mut(self.len as usize) {
            *slot = delay;
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u64] {
        &self.delays[..self.len as usize]
    }

    /// The same copies, each `by` later.
    fn after(mut self, by: u64) -> Self {
        for d in &mut self.delays[..self.len as usize] {
            *d += by;
        }
        self
    }
}

/// A relayed datagram's copies on their way to the relay, which forwards each when it gets there
/// (see [`Net::forward`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToRelay {
    /// Delays until the copies reach the relay: none (lost on the first leg), one or two.
    pub delays: Copies,
    /// The datagram's number when both copies of a duplicate reach the relay (so that it counts
    /// as dropped only when neither gets out), 0 otherwise. Hand it back to [`Net::forward`].
    pub twin: u32,
}

/// What became of a datagram handed to [`Net::transmit`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use = "arriving copies must be scheduled, relayed ones forwarded"]
pub struct Sent {
    /// Delays until copies arrive at the destination.
    pub arrive: Copies,
    /// Copies that first travel to the relay: at each one's time the caller calls
    /// [`Net::forward`], which books the cloud's uplink then. Only with a limited cloud uplink;
    /// an unlimited one forwards at once (the same arrival times), into `arrive`.
    pub relay: ToRelay,
}

/// An active partition, by which directed packets it stops.
#[derive(Clone, Debug)]
pub enum Cut {
    /// Devices in the range are cut off from the rest, both ways.
    Split(Range<u32>),
    /// Packets from the range to the rest are lost; the other way passes.
    Oneway(Range<u32>),
    /// `groups` consecutive groups of `devices` in a ring (the cloud in group 0); packets pass
    /// within a group and between adjacent groups.
    Ring { groups: u32, devices: u32 },
    /// Two halves, `first` and the rest (with the cloud), joined only through `bridges`.
    Bridge { first: Range<u32>, bridges: Range<u32> },
}

impl Cut {
    /// Whether a packet from `a` to `b` gets through this cut.
    pub fn passes(&self, a: u32, b: u32) -> bool {
        match self {
            Cut::Split(side) => side.contains(&a) == side.contains(&b),
            Cut::Oneway(side) => !side.contains(&a) || side.contains(&b),
            Cut::Ring { groups, devices } => {
                let group = |x: u32| {
                    if x == 0 {
                        0
                    } else {
                        (u64::from(x - 1) * u64::from(*groups) / u64::from((*devices).max(1))) as u32
                    }
                };
                let d = (group(a) + groups - group(b)) % groups;
                d == 0 || d == 1 || d == groups - 1
            }
            Cut::Bridge { first, bridges } => {
                bridges.contains(&a) || bridges.contains(&b) || first.contains(&a) == first.contains(&b)
            }
        }
    }
}

/// How one node reaches another ([`Net::path_kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Within a LAN group (or turned back in by a hairpinning NAT).
    Lan,
    /// Between a device and the cloud.
    Cloud,
    /// Hole punched (or public) across the internet.
    Direct,
    /// Through the cloud's relay.
    Relayed,
}

/// Where a node sits: its LAN group (devices of a group share one NAT) and that NAT.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    pub lan: u32,
    pub nat: Nat,
    /// The NAT forwards packets sent to its own public address back inside.
    pub hairpin: bool,
}

/// Counters of the network model, for the report.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct NetStats {
    /// Datagrams that arrived nowhere (loss, partitions, full queues, expired mappings).
    pub dropped: u64,
    /// Datagrams between two devices sent directly (hole punched) or through the relay.
    pub direct: u64,
    pub relayed: u64,
    /// Datagram copies made by duplication (on any wide-area leg).
    pub duplicated: u64,
    /// Datagrams (or relayed legs) lost to the loss model, random or bursty.
    pub lost: u64,
    /// Datagrams a partition stopped.
    pub partitioned: u64,
    /// Direct paths that could not be punched because the relay was down or cut off from a
    /// side (the datagram is lost).
    pub punches_failed: u64,
    /// Datagrams to or from a device off the network.
    pub disconnected: u64,
    /// Datagrams between devices that could neither punch a path nor use the relay (`relay =
    /// false`).
    pub unrelayed: u64,
    /// Same-NAT datagrams turned back in by a hairpinning NAT.
    pub hairpinned: u64,
    /// Datagrams dropped because the sender's uplink queue was full.
    pub queue_drops: u64,
    /// Direct paths punched again after their NAT mapping timed out (the first datagram is lost).
    pub repunches: u64,
    /// Datagrams that arrive before one their sender sent earlier to the same node (the first
    /// copy of each counts); kept with the path counts ([`Net::count_paths`]). Relayed datagrams
    /// through a bandwidth-limited relay are not counted (their second leg is drawn when they
    /// reach it).
    pub reordered: u64,
}

/// The network state.
#[derive(Debug)]
pub struct Net {
    cfg: Network,
    /// Devices per LAN group: device `i` (1-based) is in group `(i - 1) / lan_group`.
    lan_group: u32,
    /// Each LAN group's NAT and whether it hairpins (a small table: it stays in cache when a run
    /// has 100,000 devices).
    groups: Vec<(Nat, bool)>,
    /// Devices never talk to each other directly (star topology).
    star: bool,
    /// NAT mapping timeout in microseconds (0: never).
    mapping_timeout_us: u64,
    /// Active partitions by index.
    cuts: BTreeMap<usize, Cut>,
    /// Gilbert-Elliott state per directed path (true: bad), for bursty loss.
    bad: BTreeMap<(u32, u32), bool>,
    /// Last use of each punched direct path (unordered pair), for mapping timeouts.
    punched: BTreeMap<(u32, u32), u64>,
    /// When each node's uplink is free again (bandwidth model). Links are booked in time order
    /// (a relayed datagram books the cloud's when it gets there), so `free_at - now` is exactly
    /// the backlog at `now`.
    free_at: Vec<u64>,
    /// When each device's LAN link is free again (with `lan_bandwidth_kbps`; empty without).
    lan_free_at: Vec<u64>,
    /// The latest time a link was booked: bookings must come in time order.
    booked_at: u64,
    /// Duplicated relayed datagrams with one copy forwarded: whether that copy was lost. At most
    /// one entry per duplicate in flight to the relay; the second copy removes it.
    twins: BTreeMap<u32, bool>,
    /// The last twin number handed out (0 is never one).
    twin_last: u32,
    stats: NetStats,
    /// Device pairs (unordered) that exchanged datagrams, and whether directly (hole punched) or
    /// through the relay; kept only when asked for ([`Net::count_paths`]): the kernel benchmark's
    /// 100,000-node meshes would fill it.
    paths: Option<BTreeMap<(u32, u32), bool>>,
    /// Per directed pair, the latest arrival of a datagram sent so far (for
    /// [`NetStats::reordered`]); kept with `paths`.
    arrivals: Option<BTreeMap<(u32, u32), u64>>,
    /// Datagrams stopped, by the partition that stopped them.
    cut_drops: BTreeMap<usize, u64>,
    /// The relay is up (it coordinates hole punching).
    relay_up: bool,
    /// Devices on but off the network (offline writers, connectivity windows).
    disconnected: std::collections::BTreeSet<u32>,
}

impl Net {
    /// `groups` gives each LAN group's NAT and hairpinning; the cloud (node 0) is public.
    pub fn new(
        cfg: Network,
        devices: u32,
        lan_group: u32,
        groups: Vec<(Nat, bool)>,
        star: bool,
        mapping_timeout_ms: u64,
    ) -> Self {
        let n = devices as usize + 1;
        Self {
            lan_free_at: if cfg.lan_bandwidth_kbps > 0 { vec![0; n] } else { Vec::new() },
            cfg,
            lan_group: lan_group.max(1),
            groups,
            star,
            mapping_timeout_us: mapping_timeout_ms.saturating_mul(1_000),
            cuts: BTreeMap::new(),
            bad: BTreeMap::new(),
            punched: BTreeMap::new(),
            free_at: vec![0; n],
            booked_at: 0,
            twins: BTreeMap::new(),
            twin_last: 0,
            stats: NetStats::default(),
            paths: None,
            arrivals: None,
            cut_drops: BTreeMap::new(),
            relay_up: true,
            disconnected: std::collections::BTreeSet::new(),
        }
    }

    /// Keep the set of device pairs that talked directly or through the relay, for
    /// [`Net::paths`].
    pub fn count_paths(&mut self) {
        self.paths.get_or_insert_with(BTreeMap::new);
        self.arrivals.get_or_insert_with(BTreeMap::new);
    }

    /// Device pairs that talked (direct, relayed), when counted.
    pub fn paths(&self) -> (u64, u64) {
        let Some(paths) = &self.paths else { return (0, 0) };
        let direct = paths.values().filter(|d| **d).count() as u64;
        (direct, paths.len() as u64 - direct)
    }

    /// When `node`'s uplink (or, with `lan` and a LAN bandwidth set, its LAN link) has sent
    /// everything booked on it: a sender that paces itself sends its next datagram then.
    pub fn link_free_at(&self, node: u32, lan: bool) -> u64 {
        let links = if lan && !self.lan_free_at.is_empty() { &self.lan_free_at } else { &self.free_at };
        links.get(node as usize).copied().unwrap_or(0)
    }

    /// How `from` reaches `to` (what [`Net::transmit`] would use, partitions aside): `None` when
    /// it cannot (no punchable path and no relay).
    pub fn path_kind(&self, from: u32, to: u32) -> Option<PathKind> {
        let (hf, ht) = (self.host(from), self.host(to));
        let same_lan = from != 0 && to != 0 && hf.lan == ht.lan;
        if same_lan && (self.cfg.lan_discovery || hf.nat == Nat::Public || hf.hairpin) {
            return Some(PathKind::Lan);
        }
        if from == 0 || to == 0 {
            return Some(PathKind::Cloud);
        }
        if !same_lan && !self.star && punch(hf.nat, ht.nat) {
            return Some(PathKind::Direct);
        }
        self.cfg.relay.then_some(PathKind::Relayed)
    }

    fn path_used(&mut self, from: u32, to: u32, direct: bool) {
        if let Some(paths) = self.paths.as_mut() {
            paths.entry((from.min(to), from.max(to))).or_insert(direct);
        }
    }

    pub fn cut(&mut self, index: usize, cut: Cut) {
        self.cuts.insert(index, cut);
    }

    pub fn heal(&mut self, index: usize) {
        self.cuts.remove(&index);
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    #[inline]
    pub fn host(&self, node: u32) -> Host {
        if node == 0 {
            return Host { lan: u32::MAX, nat: Nat::Public, hairpin: false };
        }
        let lan = (node - 1) / self.lan_group;
        let (nat, hairpin) = self.groups.get(lan as usize).copied().unwrap_or((Nat::Public, false));
        Host { lan, nat, hairpin }
    }

    /// Whether a packet from `a` gets to `b` through every active partition.
    fn reachable(&mut self, a: u32, b: u32) -> bool {
        if !self.disconnected.is_empty() && (self.disconnected.contains(&a) || self.disconnected.contains(&b))
        {
            self.stats.disconnected += 1;
            return false;
        }
        let Some((&index, _)) = self.cuts.iter().find(|(_, cut)| !cut.passes(a, b)) else { return true };
        self.stats.partitioned += 1;
        *self.cut_drops.entry(index).or_default() += 1;
        false
    }

    /// Datagrams each partition (by index) stopped.
    pub fn cut_drops(&self) -> &BTreeMap<usize, u64> {
        &self.cut_drops
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

    /// One wide-area leg: empty if lost, else its delays (two when duplicated).
    fn wan_leg(&mut self, rng: &mut ChaCha8Rng, path: (u32, u32)) -> Copies {
        let loss = self.loss_ppm(rng, path);
        if rng.random_range(0..1_000_000) < loss {
            self.stats.lost += 1;
            return Copies::default();
        }
        let mut delays = Copies::one(Self::latency(rng, &self.cfg.wan));
        if rng.random_range(0..1_000_000) < self.cfg.dup_ppm {
            delays.push(Self::latency(rng, &self.cfg.wan));
            self.stats.duplicated += 1;
        }
        delays
    }

    fn uplink_kbps(&self, node: u32) -> u64 {
        if node == 0 {
            self.cfg.cloud_bandwidth_kbps
        } else {
            self.cfg.bandwidth_kbps
        }
    }

    /// Queues `len` bytes on `node`'s uplink at time `at`: the delay until the last bit leaves,
    /// or `None` when the queue is full (drop-tail).
    fn uplink(&mut self, node: u32, at: u64, len: usize) -> Option<u64> {
        self.book(node, at, len, false)
    }

    /// [`Net::uplink`] on the uplink or, with `lan` and a LAN bandwidth set, on the LAN link.
    fn book(&mut self, node: u32, at: u64, len: usize, lan: bool) -> Option<u64> {
        let lan = lan && !self.lan_free_at.is_empty();
        let kbps = if lan { self.cfg.lan_bandwidth_kbps } else { self.uplink_kbps(node) };
        if kbps == 0 {
            return Some(0);
        }
        // A booking in the future would make a later send at an earlier time see the idle gap
        // before it as queued bytes (issue 12).
        assert!(at >= self.booked_at, "uplink booked at {at} us after one at {} us", self.booked_at);
        self.booked_at = at;
        let free = if lan { &mut self.lan_free_at[node as usize] } else { &mut self.free_at[node as usize] };
        let start = (*free).max(at);
        // Bytes still queued ahead of this datagram: (start - at) us at kbps/8000 bytes per us;
        // none when the link is idle (start == at).
        let backlog = (start - at).saturating_mul(kbps) / 8_000;
        if backlog + len as u64 > self.cfg.queue_kb.saturating_mul(1_024) {
            self.stats.queue_drops += 1;
            return None;
        }
        *free = start + (len as u64 * 8_000).div_ceil(kbps);
        Some(*free - at)
    }

    /// A hole-punched direct path is used at `now`: false (and re-punched) when its mapping had
    /// timed out, so this datagram is lost.
    /// Whether the NAT mappings of the direct path `a`-`b` are open. A path is punched with the
    /// relay's help (each side learns the other's public address from it and both send at
    /// once), so punching one, the first time or after its mappings timed out, needs the relay
    /// up and both sides reaching it: otherwise the datagram is lost and the path stays shut. A
    /// re-punch costs the datagram that found the mapping gone; a punched path works without
    /// the relay until its mappings time out.
    fn mapping_alive(&mut self, now: u64, a: u32, b: u32) -> bool {
        let key = (a.min(b), a.max(b));
        let last = self.punched.get(&key).copied();
        let expired =
            last.is_some_and(|last| self.mapping_timeout_us > 0 && now - last > self.mapping_timeout_us);
        if (last.is_none() || expired) && !(self.relay_up && self.reachable(a, 0) && self.reachable(b, 0)) {
            self.stats.punches_failed += 1;
            return false;
        }
        self.punched.insert(key, now);
        if expired {
            self.stats.repunches += 1;
            return false;
        }
        true
    }

    /// A device leaves the network (still on: it keeps its state and writes) or comes back.
    pub fn set_connected(&mut self, node: u32, connected: bool) {
        if connected {
            self.disconnected.remove(&node);
        } else {
            self.disconnected.insert(node);
        }
    }

    /// The relay (the cloud) is up or down: punching new direct paths needs it.
    pub fn set_relay_up(&mut self, up: bool) {
        self.relay_up = up;
    }

    /// Sends a datagram of `len` bytes `from` -> `to` at `now`: the delays of the copies that
    /// arrive, and of those that first reach the relay (each then goes to [`Net::forward`]).
    /// `now` never goes back between calls (to this and to `forward`).
    pub fn transmit(&mut self, rng: &mut ChaCha8Rng, now: u64, from: u32, to: u32, len: usize) -> Sent {
        let sent = self.route(rng, now, from, to, len);
        if sent.arrive.is_empty() && sent.relay.delays.is_empty() {
            self.stats.dropped += 1;
        }
        if let (Some(arrivals), Some(first)) = (self.arrivals.as_mut(), sent.arrive.as_slice().iter().min()) {
            let at = now + first;
            let latest = arrivals.entry((from, to)).or_insert(0);
            if at < *latest {
                self.stats.reordered += 1;
            } else {
                *latest = at;
            }
        }
        sent
    }

    /// A copy of a relayed datagram `len` bytes long, for `to`, reaches the relay (the cloud) at
    /// `now`: the relay queues it on its uplink now and sends it on. `twin` is [`ToRelay::twin`].
    /// Returns the delays, from `now`, of the copies that arrive at `to`.
    pub fn forward(&mut self, rng: &mut ChaCha8Rng, now: u64, to: u32, len: usize, twin: u32) -> Copies {
        let queued = if self.reachable(0, to) { self.uplink(0, now, len) } else { None };
        let out = match queued {
            Some(queued) => self.wan_leg(rng, (0, to)).after(queued),
            None => Copies::default(),
        };
        let lost = out.is_empty();
        // A duplicate is dropped when both of its copies are lost, known at the second.
        let dropped = match twin {
            0 => lost,
            _ => match self.twins.remove(&twin) {
                Some(other_lost) => lost && other_lost,
                None => {
                    self.twins.insert(twin, lost);
                    false
                }
            },
        };
        if dropped {
            self.stats.dropped += 1;
        }
        out
    }

    fn route(&mut self, rng: &mut ChaCha8Rng, now: u64, from: u32, to: u32, len: usize) -> Sent {
        let arrive = |arrive: Copies| Sent { arrive, ..Sent::default() };
        let (hf, ht) = (self.host(from), self.host(to));
        let same_lan = from != 0 && to != 0 && hf.lan == ht.lan;
        if same_lan && (self.cfg.lan_discovery || hf.nat == Nat::Public || hf.hairpin) {
            // On the LAN, or turned back in by the shared NAT: LAN latency, no loss.
            if !self.reachable(from, to) {
                return Sent::default();
            }
            let Some(queued) = self.book(from, now, len, self.cfg.lan_discovery) else {
                return Sent::default();
            };
            if !self.cfg.lan_discovery && hf.nat != Nat::Public {
                self.stats.hairpinned += 1;
            }
            return arrive(Copies::one(queued + Self::latency(rng, &self.cfg.lan)));
        }
        if from == 0 || to == 0 {
            if !self.reachable(from, to) {
                return Sent::default();
            }
            let Some(queued) = self.uplink(from, now, len) else { return Sent::default() };
            return arrive(self.wan_leg(rng, (from, to)).after(queued));
        }
        if !same_lan && !self.star && punch(hf.nat, ht.nat) {
            self.stats.direct += 1;
            self.path_used(from, to, true);
            if !self.reachable(from, to) {
                return Sent::default();
            }
            let nat_in_path = hf.nat != Nat::Public || ht.nat != Nat::Public;
            if nat_in_path && !self.mapping_alive(now, from, to) {
                return Sent::default();
            }
            let Some(queued) = self.uplink(from, now, len) else { return Sent::default() };
            return arrive(self.wan_leg(rng, (from, to)).after(queued));
        }
        if !self.cfg.relay {
            // No relay: a pair that cannot punch through cannot talk.
            self.stats.unrelayed += 1;
            return Sent::default();
        }
        // Relayed through the cloud: two legs, each may lose or duplicate, each queues.
        self.stats.relayed += 1;
        self.path_used(from, to, false);
        if self.uplink_kbps(0) != 0 {
            // The cloud's uplink is booked when a copy gets there, in `forward`.
            if !self.reachable(from, 0) {
                return Sent::default();
            }
            let Some(queued) = self.uplink(from, now, len) else { return Sent::default() };
            let delays = self.wan_leg(rng, (from, 0)).after(queued);
            let mut twin = 0;
            if delays.len() > 1 {
                self.twin_last = self.twin_last.checked_add(1).unwrap_or(1);
                twin = self.twin_last;
            }
            return Sent { arrive: Copies::default(), relay: ToRelay { delays, twin } };
        }
        // An unlimited uplink takes a copy at once whenever it gets there, so both legs are drawn
        // now (as before issue 12: these runs replay unchanged).
        if !(self.reachable(from, 0) && self.reachable(0, to)) {
            return Sent::default();
        }
        let Some(queued) = self.uplink(from, now, len) else { return Sent::default() };
        let mut out = Copies::default();
        for &d in self.wan_leg(rng, (from, 0)).as_slice() {
            for &e in self.wan_leg(rng, (0, to)).as_slice() {
                out.push(queued + d + e);
            }
        }
        arrive(out)
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
    use rand::SeedableRng as _;

    /// The cloud and one device per NAT, each device in its own LAN group, no hairpinning.
    fn net(cfg: Network, nats: &[Nat], star: bool, timeout_ms: u64) -> Net {
        let groups = nats.iter().map(|&nat| (nat, false)).collect();
        Net::new(cfg, nats.len() as u32, 1, groups, star, timeout_ms)
    }

    fn constant(ms: u64) -> Network {
        Network { wan: Latency::Constant { ms }, lan: Latency::Constant { ms: 1 }, ..Network::default() }
    }

    #[test]
    fn partitions_stop_the_packets_their_kind_says() {
        let split = Cut::Split(1..3);
        assert!(split.passes(1, 2) && split.passes(0, 3) && !split.passes(1, 0) && !split.passes(0, 2));
        let oneway = Cut::Oneway(1..3);
        assert!(!oneway.passes(1, 0) && oneway.passes(0, 1) && oneway.passes(1, 2) && oneway.passes(3, 2));
        // 8 devices in 4 groups: {0,1,2} {3,4} {5,6} {7,8}; group 0 and 3 are adjacent.
        let ring = Cut::Ring { groups: 4, devices: 8 };
        assert!(ring.passes(1, 3) && ring.passes(0, 8) && ring.passes(4, 5));
        assert!(!ring.passes(1, 5) && !ring.passes(3, 7) && !ring.passes(0, 6));
        let bridge = Cut::Bridge { first: 1..5, bridges: 4..5 };
        assert!(bridge.passes(1, 2) && bridge.passes(5, 0) && bridge.passes(4, 0) && bridge.passes(1, 4));
        assert!(!bridge.passes(1, 0) && !bridge.passes(6, 2));
    }

    #[test]
    fn datagrams_that_overtake_an_earlier_one_are_counted_as_reordered() {
        // Constant latency keeps order; jitter (uniform 10..100 ms) reorders some of 200
        // datagrams sent 1 ms apart on one pair. Counted only with the path counts.
        let count = |cfg: Network, count_paths: bool| {
            let mut net = net(cfg, &[Nat::Public, Nat::Public], false, 0);
            if count_paths {
                net.count_paths();
            }
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            for t in 0..200u64 {
                let _ = net.transmit(&mut rng, t * 1_000, 1, 2, 100);
            }
            net.stats().reordered
        };
        let jitter = Network { wan: Latency::Uniform { min_ms: 10, max_ms: 100 }, ..constant(10) };
        assert_eq!(count(constant(10), true), 0);
        assert!(count(jitter.clone(), true) > 20, "jitter of 90 ms over 1 ms gaps reorders often");
        assert_eq!(count(jitter, false), 0);
    }

    #[test]
    fn a_full_uplink_queues_then_drops() {
        // 80 kbps = 10 bytes per ms; a 1 KiB queue.
        let cfg = Network { bandwidth_kbps: 80, queue_kb: 1, ..constant(10) };
        let mut net = net(cfg, &[Nat::Public], true, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let d: Vec<Vec<u64>> =
            (0..4).map(|_| net.transmit(&mut rng, 0, 1, 0, 500).arrive.as_slice().to_vec()).collect();
        // 500 bytes take 50 ms on the wire, then 10 ms of latency; the second waits for the first.
        assert_eq!(d[0], vec![60_000]);
        assert_eq!(d[1], vec![110_000]);
        // Two datagrams (1000 bytes) are queued: a third would overflow the 1024-byte queue.
        assert!(d[2].is_empty() && d[3].is_empty());
        assert_eq!(net.stats().queue_drops, 2);
        // Once the link drains, sending works again.
        assert_eq!(net.transmit(&mut rng, 200_000, 1, 0, 500).arrive.as_slice(), &[60_000]);
    }

    #[test]
    fn a_relayed_datagram_books_the_cloud_uplink_when_it_gets_there() {
        // The cloud's uplink: 8000 kbps = 1 byte per us; a 1 KiB queue. Two devices behind
        // symmetric NATs, so datagrams between them go through the cloud.
        let cfg = Network { cloud_bandwidth_kbps: 8_000, queue_kb: 1, ..constant(10) };
        let mut net = net(cfg, &[Nat::Symmetric, Nat::Symmetric], false, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let relayed = net.transmit(&mut rng, 0, 1, 2, 500);
        assert!(relayed.arrive.is_empty());
        assert_eq!(relayed.relay, ToRelay { delays: Copies::one(10_000), twin: 0 }, "10 ms to the relay");
        // The relay's link is idle until the datagram gets there: the cloud's own 1000 bytes go
        // at once (they were dropped when the relayed datagram booked the link ahead of time,
        // as 10,500 bytes of backlog).
        assert_eq!(net.transmit(&mut rng, 0, 0, 1, 1_000).arrive.as_slice(), &[11_000]);
        // At 10 ms the relayed datagram gets there and goes at once; a second one then waits
        // behind it, and a third would overflow the queue.
        assert_eq!(net.forward(&mut rng, 10_000, 2, 500, 0).as_slice(), &[10_500]);
        assert_eq!(net.forward(&mut rng, 10_000, 2, 500, 0).as_slice(), &[11_000]);
        assert!(net.forward(&mut rng, 10_000, 2, 500, 0).is_empty());
        assert_eq!((net.stats().queue_drops, net.stats().dropped, net.stats().relayed), (1, 1, 1));
    }

    #[test]
    fn a_duplicate_at_the_relay_is_dropped_when_both_copies_are() {
        // Every datagram is duplicated on each leg; the cloud's queue holds one 1000-byte copy.
        let cfg = Network { cloud_bandwidth_kbps: 8_000, queue_kb: 1, dup_ppm: 999_999, ..constant(10) };
        let mut net = net(cfg, &[Nat::Symmetric, Nat::Symmetric], false, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let first = net.transmit(&mut rng, 0, 1, 2, 1_000).relay;
        let second = net.transmit(&mut rng, 0, 1, 2, 1_000).relay;
        assert_eq!(first.delays.as_slice(), &[10_000, 10_000]);
        assert!(first.twin != 0 && second.twin != 0 && first.twin != second.twin);
        // The first datagram's copies: one gets out (twice: the second leg duplicates it), one
        // is dropped; the datagram arrived.
        assert_eq!(net.forward(&mut rng, 10_000, 2, 1_000, first.twin).as_slice(), &[11_000, 11_000]);
        assert!(net.forward(&mut rng, 10_000, 2, 1_000, first.twin).is_empty());
        assert_eq!(net.stats().dropped, 0);
        // Both copies of the second are dropped: one datagram lost.
        assert!(net.forward(&mut rng, 10_000, 2, 1_000, second.twin).is_empty());
        assert!(net.forward(&mut rng, 10_000, 2, 1_000, second.twin).is_empty());
        assert_eq!((net.stats().queue_drops, net.stats().dropped), (3, 1));
    }

    #[test]
    fn idle_mappings_time_out_and_are_punched_again() {
        let mut net = net(constant(5), &[Nat::FullCone, Nat::Restricted], false, 1_000);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        assert_eq!(net.transmit(&mut rng, 0, 1, 2, 10).arrive.as_slice(), &[5_000]);
        assert_eq!(net.transmit(&mut rng, 900_000, 2, 1, 10).arrive.as_slice(), &[5_000], "still fresh");
        assert!(net.transmit(&mut rng, 2_000_000, 1, 2, 10).arrive.is_empty(), "idle 1.1 s: expired");
        assert_eq!(net.transmit(&mut rng, 2_100_000, 1, 2, 10).arrive.as_slice(), &[5_000], "re-punched");
        assert_eq!(net.stats().repunches, 1);
    }

    /// Hole punching needs the relay: a new direct path is not punched while the relay is down
    /// or a side cannot reach it; a punched one keeps working without it.
    #[test]
    fn punching_a_direct_path_needs_the_relay() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        // Two LAN groups of one device, both behind full-cone NATs: they punch through.
        let groups = vec![(Nat::FullCone, false), (Nat::FullCone, false)];
        let mut net = Net::new(constant(10), 2, 1, groups, false, 0);
        net.set_relay_up(false);
        assert!(net.transmit(&mut rng, 0, 1, 2, 10).arrive.is_empty(), "no relay, no punch");
        assert_eq!(net.stats().punches_failed, 1);
        // A one-way cut of device 1 from the rest: it cannot reach the relay either.
        net.set_relay_up(true);
        net.cut(0, Cut::Oneway(1..2));
        assert!(net.transmit(&mut rng, 1, 2, 1, 10).arrive.is_empty(), "device 1 cannot reach the relay");
        assert_eq!(net.stats().punches_failed, 2);
        net.heal(0);
        assert_eq!(
            net.transmit(&mut rng, 2, 1, 2, 10).arrive.as_slice(),
            &[10_000],
            "punched with the relay"
        );
        net.set_relay_up(false);
        assert_eq!(
            net.transmit(&mut rng, 3, 2, 1, 10).arrive.as_slice(),
            &[10_000],
            "punched paths outlive it"
        );
        assert_eq!(net.stats().punches_failed, 2);
    }

    #[test]
    fn same_nat_devices_hairpin_or_go_through_the_relay() {
        let cfg = Network { lan_discovery: false, ..constant(10) };
        // Devices 1 and 2 share one LAN group and its port-restricted NAT.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut relayed = Net::new(cfg.clone(), 2, 2, vec![(Nat::PortRestricted, false)], false, 0);
        assert_eq!(
            relayed.transmit(&mut rng, 0, 1, 2, 10).arrive.as_slice(),
            &[20_000],
            "two legs through the cloud"
        );
        assert_eq!(relayed.stats().relayed, 1);
        let mut hairpin = Net::new(cfg, 2, 2, vec![(Nat::PortRestricted, true)], false, 0);
        assert_eq!(
            hairpin.transmit(&mut rng, 0, 1, 2, 10).arrive.as_slice(),
            &[1_000],
            "turned back in by the NAT"
        );
        assert_eq!(hairpin.stats().hairpinned, 1);
    }

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
        let cfg = Network {
            loss_ppm: 0,
            burst: Some(crate::scenario::Burst { p_ppm: 100_000, r_ppm: 50_000, bad_loss_ppm: 1_000_000 }),
            ..Network::default()
        };
        let mut net = net(cfg, &[Nat::Public; 2], true, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let outcomes: Vec<bool> =
            (0..20_000).map(|_| net.transmit(&mut rng, 0, 1, 0, 100).arrive.is_empty()).collect();
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

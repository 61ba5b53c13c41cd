//! The simulation: a single-threaded discrete-event kernel (virtual microseconds, events ordered by
//! `(time, seq)`, one seeded ChaCha8 RNG) driving engine replicas and sync sessions over a modelled
//! network. Nothing here reads a clock or OS randomness; the same scenario and seed give the same
//! trace hash.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

use engine::feedsync::{self, Edit, Endpoint, Item, ItemId, When};
use engine::replica::Replica;
use engine::sync::{Config, Outcome, Retained, Session};
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::checker::Checker;
use crate::net::{Nat, Net};
use crate::scenario::{Scenario, Topology};

/// Virtual microseconds.
pub type Micros = u64;

const CLOUD: u32 = 0;
/// Virtual epoch of the simulation's clocks (2024-01-01T00:00:00Z), so `when`s look real.
const EPOCH_UNIX_SECS: i64 = 1_704_067_200;

#[derive(Clone, Debug)]
enum Payload {
    Deliver { to: u32, from: u32, bytes: Arc<Vec<u8>> },
    SyncTick { node: u32 },
    Write { node: u32 },
    SessionTimer { node: u32, peer: u32, sid: u64 },
    Crash { node: u32 },
    Restart { node: u32 },
    PartitionStart { index: usize },
    PartitionEnd { index: usize },
    BackOnline { node: u32 },
}

#[derive(Debug)]
struct Event {
    time: Micros,
    seq: u64,
    payload: Payload,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.time, self.seq) == (other.time, other.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.time, self.seq).cmp(&(other.time, other.seq))
    }
}

/// One simulated node: the cloud (index 0) or a device.
#[derive(Debug)]
struct Node {
    replica: Replica,
    endpoint: Endpoint,
    /// Sessions by (peer, session id).
    sessions: BTreeMap<(u32, u64), Session>,
    /// The session this node initiated with each peer, if one is running.
    outgoing: BTreeMap<u32, u64>,
    /// Initiator-side cursors per peer (volatile).
    retained: BTreeMap<u32, Retained>,
    up: bool,
    lan: u32,
    skew_ms: i64,
}

/// What a run produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub nodes: u32,
    pub events: u64,
    pub virtual_ms: u64,
    pub converged: bool,
    pub convergence_ms_p50: u64,
    pub convergence_ms_p99: u64,
    pub convergence_ms_max: u64,
    pub writes: u64,
    pub lost_writes: u64,
    pub unconverged_writes: u64,
    pub messages: u64,
    pub bytes: u64,
    pub dropped: u64,
    pub sessions_started: u64,
    pub sessions_failed: u64,
    pub relayed_paths: u64,
    pub direct_paths: u64,
    /// Messages and bytes by message kind.
    pub message_kinds: BTreeMap<String, (u64, u64)>,
    pub digest: String,
    pub trace_hash: String,
    /// The first failed check, if any.
    pub failure: Option<String>,
}

/// Progress callback: (virtual ms now, virtual ms total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

#[allow(missing_debug_implementations)] // holds a hasher and an RNG; nothing to print
pub struct Sim {
    sc: Scenario,
    rng: ChaCha8Rng,
    now: Micros,
    seq: u64,
    queue: BinaryHeap<Reverse<Event>>,
    nodes: Vec<Node>,
    net: Net,
    checker: Checker,
    cfg: Config,
    zipf_cdf: Vec<u64>,
    faults_until: Micros,
    end: Micros,
    trace: blake3::Hasher,
    events: u64,
    messages: u64,
    bytes: u64,
    sessions_started: u64,
    sessions_failed: u64,
    kinds: BTreeMap<String, (u64, u64)>,
}

impl Sim {
    pub fn new(sc: Scenario, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let devices = sc.devices;
        let mut nodes = Vec::with_capacity(devices as usize + 1);
        let mut nats = Vec::with_capacity(devices as usize + 1);
        for i in 0..=devices {
            let skew_ms = if i == CLOUD || sc.faults.clock_skew_ms == 0 {
                0
            } else {
                let s = sc.faults.clock_skew_ms as i64;
                rng.random_range(-s..=s)
            };
            let nat =
                if i == CLOUD { Nat::Public } else { Nat::pick(&sc.nat, rng.random_range(0..1_000_000)) };
            nats.push(nat);
            nodes.push(Node {
                replica: Replica::new(rng.random()),
                endpoint: Endpoint::new(&if i == CLOUD { "cloud".to_string() } else { format!("dev-{i}") })
                    .expect("generated endpoint names are valid"),
                sessions: BTreeMap::new(),
                outgoing: BTreeMap::new(),
                retained: BTreeMap::new(),
                up: true,
                lan: if i == CLOUD { u32::MAX } else { (i - 1) / sc.lan_group },
                skew_ms,
            });
        }
        let net = Net::new(sc.network.clone(), nats, sc.topology == Topology::Star);
        let zipf_cdf = crate::net::zipf_cdf(sc.workload.items, sc.workload.zipf_s);
        let faults_until = sc.duration_ms * 1_000;
        let end = faults_until + sc.quiet_ms * 1_000;
        let cfg = Config {
            rto_us: 600_000,
            rto_max_us: 2_400_000,
            linger_us: 120_000_000,
            max_retries: 10,
            ..Config::default()
        };
        let checker = Checker::new(devices + 1);
        let mut sim = Self {
            sc,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            net,
            checker,
            cfg,
            zipf_cdf,
            faults_until,
            end,
            trace: blake3::Hasher::new(),
            events: 0,
            messages: 0,
            bytes: 0,
            sessions_started: 0,
            sessions_failed: 0,
            kinds: BTreeMap::new(),
        };
        sim.schedule_initial();
        sim
    }

    fn push(&mut self, time: Micros, payload: Payload) {
        self.seq += 1;
        self.queue.push(Reverse(Event { time, seq: self.seq, payload }));
    }

    fn interval(&mut self) -> Micros {
        let base = self.sc.sync_interval_ms * 1_000;
        base + self.rng.random_range(0..=base / 2)
    }

    fn schedule_initial(&mut self) {
        let devices = self.sc.devices;
        for node in 1..=devices {
            let first = self.rng.random_range(0..=self.sc.sync_interval_ms * 1_000);
            self.push(first, Payload::SyncTick { node });
            self.schedule_write(node, 0);
        }
        // Crashes: a randomised count per device, at uniform times before the quiet phase.
        let minutes = self.sc.duration_ms as f64 / 60_000.0;
        for node in 1..=devices {
            let expected = self.sc.faults.crashes_per_min * minutes;
            let mut count = expected.floor() as u64;
            let frac_ppm = ((expected - expected.floor()) * 1_000_000.0) as u64;
            if self.rng.random_range(0..1_000_000) < frac_ppm {
                count += 1;
            }
            for _ in 0..count {
                let at = self.rng.random_range(0..self.faults_until.max(1));
                self.push(at, Payload::Crash { node });
            }
            if self.rng.random_range(0..1_000_000) < self.sc.faults.offline_ppm {
                self.nodes[node as usize].up = false;
                self.push(self.faults_until, Payload::BackOnline { node });
            }
        }
        for index in 0..self.sc.partitions.len() {
            let p = &self.sc.partitions[index];
            let (at, heal) = (p.at_ms * 1_000, p.heal_ms.min(self.sc.duration_ms) * 1_000);
            self.push(at, Payload::PartitionStart { index });
            self.push(heal, Payload::PartitionEnd { index });
        }
    }

    fn schedule_write(&mut self, node: u32, after: Micros) {
        let rate = self.sc.workload.writes_per_min;
        if rate <= 0.0 {
            return;
        }
        let mean = (60_000_000.0 / rate) as u64;
        let gap = self.rng.random_range(mean / 2..=mean + mean / 2).max(1);
        let at = after + gap;
        if at < self.faults_until {
            self.push(at, Payload::Write { node });
        }
    }

    /// Runs to the end; checks; reports.
    pub fn run(mut self, progress: Progress<'_>) -> Report {
        let mut last_report = 0;
        while let Some(Reverse(event)) = self.queue.pop() {
            if event.time > self.end {
                break;
            }
            self.now = event.time;
            self.events += 1;
            self.trace.update(&event.time.to_le_bytes());
            self.trace.update(&event.seq.to_le_bytes());
            self.handle(event.payload);
            if self.now / 1_000 >= last_report + 1_000 {
                last_report = self.now / 1_000;
                progress(last_report, self.end / 1_000);
            }
        }
        progress(self.end / 1_000, self.end / 1_000);
        self.finish()
    }

    fn handle(&mut self, payload: Payload) {
        match payload {
            Payload::SyncTick { node } => {
                tracing::trace!(t_us = self.now, node, "tick");
                self.trace.update(b"tick");
                self.trace.update(&node.to_le_bytes());
                let next = self.now + self.interval();
                self.push(next, Payload::SyncTick { node });
                if self.nodes[node as usize].up {
                    if let Some(peer) = self.pick_peer(node) {
                        self.start_session(node, peer);
                    }
                }
            }
            Payload::Write { node } => {
                tracing::trace!(t_us = self.now, node, up = self.nodes[node as usize].up, "write");
                self.trace.update(b"write");
                self.trace.update(&node.to_le_bytes());
                if self.nodes[node as usize].up {
                    self.write(node);
                }
                self.schedule_write(node, self.now);
            }
            Payload::Deliver { to, from, bytes } => {
                if tracing::enabled!(tracing::Level::TRACE) {
                    let (sid, step, kind) = engine::wire::peek(&bytes).unwrap_or((0, 0, "?"));
                    let up = self.nodes[to as usize].up;
                    tracing::trace!(
                        t_us = self.now,
                        from,
                        to,
                        sid,
                        step,
                        kind,
                        len = bytes.len(),
                        up,
                        "deliver"
                    );
                }
                self.trace.update(b"deliver");
                self.trace.update(&to.to_le_bytes());
                self.trace.update(&bytes);
                self.deliver(to, from, &bytes);
            }
            Payload::SessionTimer { node, peer, sid } => {
                tracing::trace!(t_us = self.now, node, peer, sid, "timer");
                self.trace.update(b"timer");
                let now = self.now;
                let Some(session) = self.nodes[node as usize].sessions.get_mut(&(peer, sid)) else { return };
                session.handle_timeout(now);
                self.after_session(node, peer, sid, None);
            }
            Payload::Crash { node } => {
                tracing::debug!(t_us = self.now, node, "crash");
                self.trace.update(b"crash");
                let n = &mut self.nodes[node as usize];
                if n.up {
                    n.up = false;
                    n.sessions.clear();
                    n.outgoing.clear();
                    n.retained.clear();
                    let back = self.now + self.sc.faults.down_ms * 1_000;
                    self.push(back, Payload::Restart { node });
                }
            }
            Payload::Restart { node } | Payload::BackOnline { node } => {
                tracing::debug!(t_us = self.now, node, "up");
                self.trace.update(b"up");
                self.nodes[node as usize].up = true;
            }
            Payload::PartitionStart { index } => {
                tracing::debug!(t_us = self.now, index, "partition cut");
                self.trace.update(b"cut");
                let share = self.sc.partitions[index].share_ppm;
                let cut = (u64::from(self.sc.devices) * u64::from(share) / 1_000_000) as u32;
                self.net.cut(index, 1..cut + 1);
            }
            Payload::PartitionEnd { index } => {
                tracing::debug!(t_us = self.now, index, "partition healed");
                self.trace.update(b"heal");
                self.net.heal(index);
            }
        }
    }

    /// The peer a device syncs with on this tick.
    fn pick_peer(&mut self, node: u32) -> Option<u32> {
        let devices = self.sc.devices;
        match self.sc.topology {
            Topology::Star => Some(CLOUD),
            Topology::Mesh => {
                if devices < 2 {
                    return None;
                }
                let mut peer = self.rng.random_range(1..devices);
                if peer >= node {
                    peer += 1;
                }
                Some(peer)
            }
            Topology::Hybrid => {
                let lan = self.nodes[node as usize].lan;
                let group = self.sc.lan_group;
                let first = lan * group + 1;
                let last = (first + group - 1).min(devices);
                // Half the ticks go to the cloud, half to a LAN peer (if there is one).
                if last > first && self.rng.random_range(0..2) == 0 {
                    let mut peer = self.rng.random_range(first..last);
                    if peer >= node {
                        peer += 1;
                    }
                    Some(peer)
                } else {
                    Some(CLOUD)
                }
            }
        }
    }

    fn start_session(&mut self, node: u32, peer: u32) {
        // One outgoing session per peer at a time.
        if self.nodes[node as usize].outgoing.contains_key(&peer) {
            return;
        }
        let sid: u64 = self.rng.random();
        let now = self.now;
        tracing::trace!(t_us = now, node, peer, sid, "session start");
        let n = &mut self.nodes[node as usize];
        let retained = n.retained.get(&peer).copied().unwrap_or_default();
        let session = Session::initiate(sid, now, &n.replica, self.cfg.clone(), retained);
        n.sessions.insert((peer, sid), session);
        n.outgoing.insert(peer, sid);
        self.sessions_started += 1;
        self.after_session(node, peer, sid, None);
    }

    fn deliver(&mut self, to: u32, from: u32, bytes: &[u8]) {
        if !self.nodes[to as usize].up {
            return;
        }
        let Some((sid, step, _)) = engine::wire::peek(bytes) else { return };
        let now = self.now;
        let cfg = self.cfg.clone();
        let n = &mut self.nodes[to as usize];
        if !n.sessions.contains_key(&(from, sid)) {
            // Only a session's first message (a Hello, step 0) opens a responder; anything else
            // belongs to a session that is over here.
            if step != 0 || n.outgoing.get(&from) == Some(&sid) {
                return;
            }
            n.sessions.insert((from, sid), Session::respond(sid, &n.replica, cfg));
        }
        let head = n.replica.head();
        let Some(session) = n.sessions.get_mut(&(from, sid)) else { return };
        let _ = session.handle_message(now, &mut n.replica, bytes);
        self.after_session(to, from, sid, Some(head));
    }

    /// Sends what a session has to send, arms its timer, records replica changes, retires it.
    fn after_session(&mut self, node: u32, peer: u32, sid: u64, head_before: Option<engine::replica::Seq>) {
        if let Some(head) = head_before {
            let n = &self.nodes[node as usize];
            let changed: Vec<Arc<Item>> =
                n.replica.changes_since(head).map(|(_, item)| item.clone()).collect();
            for item in changed {
                self.checker.absorb(node, &item, self.now);
            }
        }
        let mut out = Vec::new();
        let (timeout, finished, outcome) = {
            let Some(session) = self.nodes[node as usize].sessions.get_mut(&(peer, sid)) else { return };
            while let Some(bytes) = session.poll_transmit() {
                out.push(bytes);
            }
            let timeout = session.poll_timeout();
            let outcome = session.outcome().clone();
            (timeout, timeout.is_none() && !matches!(outcome, Outcome::Running), outcome)
        };
        for bytes in out {
            self.send(node, peer, bytes);
        }
        if let Some(t) = timeout {
            self.push(t, Payload::SessionTimer { node, peer, sid });
        }
        let n = &mut self.nodes[node as usize];
        let initiated = n.outgoing.get(&peer) == Some(&sid);
        match &outcome {
            Outcome::Done { retained, .. } if initiated => {
                n.retained.insert(peer, *retained);
            }
            Outcome::Failed(_) if finished && initiated => {
                n.retained.remove(&peer);
            }
            _ => {}
        }
        // The initiator is free to start the next session once its outcome is known.
        if initiated && !matches!(outcome, Outcome::Running) {
            n.outgoing.remove(&peer);
        }
        if finished {
            tracing::trace!(t_us = self.now, node, peer, sid, outcome = ?outcome, "session end");
            if matches!(outcome, Outcome::Failed(_)) {
                self.sessions_failed += 1;
            }
            self.nodes[node as usize].sessions.remove(&(peer, sid));
        }
    }

    fn send(&mut self, from: u32, to: u32, bytes: Vec<u8>) {
        self.messages += 1;
        self.bytes += bytes.len() as u64;
        if let Some((_, _, kind)) = engine::wire::peek(&bytes) {
            let entry = self.kinds.entry(kind.to_string()).or_default();
            entry.0 += 1;
            entry.1 += bytes.len() as u64;
        }
        let lan =
            from != CLOUD && to != CLOUD && self.nodes[from as usize].lan == self.nodes[to as usize].lan;
        let deliveries = self.net.transmit(&mut self.rng, from, to, lan);
        tracing::trace!(t_us = self.now, from, to, len = bytes.len(), copies = deliveries.len(), "send");
        let bytes = Arc::new(bytes);
        for delay in deliveries {
            self.push(self.now + delay, Payload::Deliver { to, from, bytes: bytes.clone() });
        }
    }

    fn write(&mut self, node: u32) {
        let item = crate::net::sample_cdf(&self.zipf_cdf, self.rng.random_range(0..u64::MAX));
        let draw = self.rng.random_range(0..1_000_000);
        let delete = draw < self.sc.workload.delete_ppm;
        let resolve =
            !delete && draw < self.sc.workload.delete_ppm.saturating_add(self.sc.workload.resolve_ppm);
        let n = &mut self.nodes[node as usize];
        let clock_ms = (self.now / 1_000) as i64 + n.skew_ms;
        let when = When::from_unix_secs(EPOCH_UNIX_SECS + clock_ms.div_euclid(1_000))
            .expect("simulated times are in range");
        let id = ItemId::new(&format!("item-{item}")).expect("generated ids are valid");
        let content = Arc::new(feedsync::Content {
            attrs: "".into(),
            inner: format!("<title>{} by {} at {}</title>", id, n.endpoint, self.now).into(),
            ..feedsync::Content::empty()
        });
        let edit = Edit { content: Some(content), delete, resolve };
        if n.replica.change(&id, &n.endpoint.clone(), &when, &edit).is_ok() {
            let state = n.replica.item(&id).expect("just changed").clone();
            self.checker.write(node, &state, self.now);
        }
    }

    fn finish(mut self) -> Report {
        // In a peer mesh the cloud only relays: it holds no replica of the feed.
        let first = if self.sc.topology == Topology::Mesh { 1 } else { CLOUD };
        let live: Vec<u32> = (first..=self.sc.devices).filter(|&i| self.nodes[i as usize].up).collect();
        let reference = live.first().copied().unwrap_or(CLOUD);
        let digest = self.nodes[reference as usize].replica.digest();
        let mut failure = None;
        let converged = live.iter().all(|&i| self.nodes[i as usize].replica.digest() == digest);
        if !converged {
            let other = live.iter().find(|&&i| self.nodes[i as usize].replica.digest() != digest).copied();
            failure = Some(format!(
                "convergence: node {} differs from node {reference}",
                other.unwrap_or_default()
            ));
        }
        if std::env::var_os("FEEDMESH_SIM_DEBUG").is_some() && !converged {
            let r = &self.nodes[reference as usize].replica;
            for &i in &live {
                let other = &self.nodes[i as usize].replica;
                if other.digest() == r.digest() {
                    continue;
                }
                for item in r.items() {
                    if other.item(item.id()).map(|x| x.as_ref() != item.as_ref()).unwrap_or(true) {
                        eprintln!(
                            "node {i}: item {} differs: ref u={} c={} vs {:?}",
                            item.id(),
                            item.version.updates,
                            item.conflicts.len(),
                            other.item(item.id()).map(|x| (x.version.updates, x.conflicts.len()))
                        );
                    }
                }
                eprintln!(
                    "node {i}: {} items vs {}; sessions open {}",
                    other.len(),
                    r.len(),
                    self.nodes[i as usize].sessions.len()
                );
                for ((peer, sid), session) in &self.nodes[i as usize].sessions {
                    eprintln!(
                        "  session with {peer} sid {sid}: {:?} timeout {:?} outgoing {:?}",
                        session.outcome(),
                        session.poll_timeout(),
                        self.nodes[i as usize].outgoing.get(peer)
                    );
                }
            }
        }
        for node in &self.nodes {
            if let Err(e) = node.replica.check_invariants() {
                failure.get_or_insert(format!("replica invariants: {e}"));
            }
        }
        let finals: Vec<Arc<Item>> = self.nodes[reference as usize].replica.items().cloned().collect();
        let lost = self.checker.lost_writes(&finals);
        if lost > 0 && failure.is_none() {
            failure = Some(format!(
                "durability: {lost} accepted writes are neither final versions nor in the causal past of one"
            ));
        }
        let (p50, p99, max, unconverged) = self.checker.convergence(&live);
        if unconverged > 0 && failure.is_none() {
            failure = Some(format!("propagation: {unconverged} writes did not reach every live node"));
        }
        self.trace.update(&digest.to_le_bytes());
        Report {
            scenario: self.sc.name.clone(),
            seed: 0,
            nodes: self.sc.devices + 1,
            events: self.events,
            virtual_ms: self.end / 1_000,
            converged,
            convergence_ms_p50: p50,
            convergence_ms_p99: p99,
            convergence_ms_max: max,
            writes: self.checker.writes(),
            lost_writes: lost,
            unconverged_writes: unconverged,
            messages: self.messages,
            bytes: self.bytes,
            dropped: self.net.dropped(),
            sessions_started: self.sessions_started,
            sessions_failed: self.sessions_failed,
            relayed_paths: self.net.relayed(),
            direct_paths: self.net.direct(),
            message_kinds: std::mem::take(&mut self.kinds),
            digest: format!("{digest:016x}"),
            trace_hash: self.trace.finalize().to_hex().to_string(),
            failure,
        }
    }
}

/// Runs a scenario with a seed.
pub fn run(sc: &Scenario, seed: u64, progress: Progress<'_>) -> Report {
    let mut report = Sim::new(sc.clone(), seed).run(progress);
    report.seed = seed;
    report
}

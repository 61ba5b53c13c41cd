//! The simulation: a single-threaded discrete-event kernel (virtual microseconds, events ordered by
//! `(time, seq)`, one seeded ChaCha8 RNG) driving engine replicas and sync sessions over a modelled
//! network. Nothing here reads a clock or OS randomness; the same scenario and seed give the same
//! trace hash.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use engine::cloud::{Cloud, CloudLimits, Outgoing, Persist as CloudPersist};
use engine::control::{PeerAddr, Request, Response};
use engine::device::{Device, DeviceConfig, Event, Identity, Persist, OPEN_FOLDER};
use engine::directory::Op;
use engine::directory::{Directory, FolderId};
use engine::feedsync::{self, Edit, Endpoint, Item, ItemId, When};
use engine::replica::Replica;
use engine::sessions::{Commit, Ended, Stream};
use engine::signing::{DeviceId, DeviceKey};
use engine::sync::{Config, Outcome};
use engine::ticket::ChannelKey;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::checker::Checker;
use crate::mesh::{MeshNode, MeshReport, MeshWorld, Role, BASE_US};
use crate::net::{Cut, Nat, Net};
use crate::queue::CalendarQueue;
use crate::scenario::{NodeModel, PartitionKind, Scenario, Topology, Transport};

/// Virtual microseconds.
pub type Micros = u64;

const CLOUD: u32 = 0;
/// A no-op node's datagram, in bytes.
const PING_LEN: usize = 32;
/// Virtual epoch of the simulation's clocks (2024-01-01T00:00:00Z), so `when`s look real.
const EPOCH_UNIX_SECS: i64 = 1_704_067_200;

#[derive(Clone, Debug)]
enum Payload {
    Deliver {
        to: u32,
        from: u32,
        tag: Tag,
        bytes: Arc<Vec<u8>>,
    },
    /// A copy of a relayed datagram reaches the relay (the cloud), which sends it on to `to`.
    Relay {
        to: u32,
        from: u32,
        /// [`crate::net::ToRelay::twin`].
        twin: u32,
        what: Carried,
    },
    /// Stream transport: packet `packet` of connection `conn` (from `from` to `to`) arrives.
    Packet {
        to: u32,
        from: u32,
        conn: u32,
        packet: u32,
    },
    /// Stream transport: its acknowledgement reaches the sender `from`.
    Ack {
        from: u32,
        to: u32,
        conn: u32,
        packet: u32,
    },
    /// Stream transport: the timer of transmission `attempt` of a packet.
    PacketTimer {
        from: u32,
        to: u32,
        conn: u32,
        packet: u32,
        attempt: u32,
    },
    SyncTick {
        node: u32,
    },
    Write {
        node: u32,
    },
    /// A role's earliest deadline (stale unless it is the node's armed time).
    Timer {
        node: u32,
    },
    Crash {
        node: u32,
    },
    Restart {
        node: u32,
    },
    PartitionStart {
        index: usize,
    },
    PartitionEnd {
        index: usize,
    },
    BackOnline {
        node: u32,
    },
    Leave {
        node: u32,
    },
    /// A no-op node's datagram arrives.
    Ping {
        to: u32,
    },
    Rejoin {
        node: u32,
    },
    /// Mesh model: a replayer takes device 1's current ticket; an injected device gets one from
    /// the lying cloud.
    TicketRefresh {
        node: u32,
    },
    /// Mesh model: a stale device stops refreshing its ticket.
    StopRefresh {
        node: u32,
    },
    /// Mesh model: a forger forges a version.
    Forge {
        node: u32,
    },
    /// Mesh model: the folder owner removes the member.
    RemoveMember,
    /// A device (on) leaves the network or comes back: offline writers, connectivity windows.
    Connect {
        node: u32,
        on: bool,
    },
}

/// What a relayed copy carries.
#[derive(Clone, Debug)]
enum Carried {
    /// A no-op node's ping.
    Ping,
    /// A whole message (datagram transport).
    Datagram { tag: Tag, bytes: Arc<Vec<u8>> },
    /// A packet of a stream connection.
    Packet { conn: u32, packet: u32, len: u32 },
}

/// An engine [`Stream`] packed in 8 bytes (kind in the top two bits), so queued events stay
/// small: the calendar queue moves millions of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tag(u64);

impl Tag {
    const ID: u64 = (1 << 62) - 1;

    fn of(stream: Stream) -> Self {
        Tag(match stream {
            Stream::Sync => 0,
            Stream::Notice => 1 << 62,
            Stream::Request(id) => (2 << 62) | (id & Self::ID),
            Stream::Response(id) => (3 << 62) | (id & Self::ID),
        })
    }

    fn stream(self) -> Stream {
        match self.0 >> 62 {
            0 => Stream::Sync,
            1 => Stream::Notice,
            2 => Stream::Request(self.0 & Self::ID),
            _ => Stream::Response(self.0 & Self::ID),
        }
    }
}

/// Draws of a random overlay graph before a disconnected one is used as it is.
const GRAPH_DRAWS_MAX: u32 = 100;

/// What runs at a node: the engine's device or cloud (the very types the binaries run), a
/// scripted injected device (mesh model), or nothing (the no-op model).
#[derive(Debug)]
enum Host {
    Device(Box<Device<u32>>),
    Cloud(Box<Cloud<u32>>),
    Injected,
    Noop,
}

/// The trace hash's input, buffered: hashing many small updates one by one would cost more than
/// the events themselves. The digest is the same as hashing each update in turn.
struct Trace {
    hasher: blake3::Hasher,
    buffer: Vec<u8>,
}

impl Trace {
    fn new() -> Self {
        Self { hasher: blake3::Hasher::new(), buffer: Vec::with_capacity(1 << 16) }
    }

    #[inline]
    fn update(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= 1 << 15 {
            self.hasher.update(&self.buffer);
            self.buffer.clear();
        }
    }

    fn finalize(&mut self) -> blake3::Hash {
        self.hasher.update(&self.buffer);
        self.buffer.clear();
        self.hasher.finalize()
    }
}

/// One simulated node: the cloud (index 0) or a device.
#[derive(Debug)]
struct Node {
    host: Host,
    skew_ms: i64,
    drift_ppm: i64,
    /// Mesh model: keys, channel, role.
    mesh: Option<Box<MeshNode>>,
    /// The virtual time of the node's armed timer (`u64::MAX`: none).
    timer_at: Micros,
    /// Stores lost so far (a device that lost its store comes back as a new endpoint).
    incarnation: u32,
}

impl Node {
    /// This node's clock at virtual time `now`, in milliseconds: skew plus drift.
    fn clock_ms(&self, now: Micros) -> i64 {
        let ms = (now / 1_000) as i64;
        ms + self.skew_ms + ms * self.drift_ppm / 1_000_000
    }
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
    /// Failed sessions by reason ("timeout", "connection lost", "refused", ...).
    pub sessions_failed_by: BTreeMap<String, u64>,
    /// Device pairs that exchanged datagrams through the relay or over a hole-punched direct path
    /// (engine model; LAN and cloud traffic are not paths between devices).
    pub relayed_paths: u64,
    pub direct_paths: u64,
    /// Datagrams between devices, relayed and direct.
    pub relayed_datagrams: u64,
    pub direct_datagrams: u64,
    /// How fast writes spread among the devices that were online (see [`crate::checker::Propagation`]).
    pub propagation: crate::checker::Propagation,
    /// Concurrent edits in the final state.
    pub conflicts: crate::checker::Conflicts,
    /// Faults the scenario configures that never acted (the `faults` check fails on them unless
    /// `require_faults_act = false`).
    pub inert_faults: Vec<String>,
    /// Network model counters: queue drops, re-punched mappings, hairpinned datagrams.
    pub queue_drops: u64,
    pub repunches: u64,
    pub hairpinned: u64,
    /// Churn: devices leaving.
    pub departures: u64,
    /// Messages and bytes by message kind.
    pub message_kinds: BTreeMap<String, (u64, u64)>,
    pub digest: String,
    pub trace_hash: String,
    /// The first failed check, if any.
    pub failure: Option<String>,
    /// Storage faults applied (cloud crashes, crashes before commit, lost stores).
    pub faults: FaultCounts,
    /// Stream transport: packets sent (retransmissions included), retransmitted, and
    /// connections that broke on their idle timeout (all 0 with datagrams).
    pub packets: u64,
    pub packets_retransmitted: u64,
    pub connections_broken: u64,
    /// The mesh security model's figures (with `[mesh]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshReport>,
    /// Sampled writes: (written at, when each node got it), microseconds; for the plot.
    #[serde(skip)]
    pub timelines: Vec<(u64, Vec<u64>)>,
    /// Nodes that hold a replica (the denominator of the plot's fractions).
    #[serde(skip)]
    pub replica_nodes: u32,
}

/// Progress callback: (virtual ms now, virtual ms total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

#[allow(missing_debug_implementations)] // holds a hasher and an RNG; nothing to print
pub struct Sim {
    sc: Scenario,
    rng: ChaCha8Rng,
    now: Micros,
    seq: u64,
    queue: CalendarQueue<Payload>,
    nodes: Vec<Node>,
    /// Reasons each node is down (crashed, away by churn, offline); up when zero.
    down: Vec<u8>,
    net: Net,
    checker: Checker,
    cfg: Config,
    zipf_cdf: Vec<u64>,
    faults_until: Micros,
    end: Micros,
    trace: Trace,
    events: u64,
    messages: u64,
    bytes: u64,
    sessions_started: u64,
    sessions_failed: u64,
    /// Failed sessions by reason.
    failed_by: BTreeMap<&'static str, u64>,
    departures: u64,
    kinds: BTreeMap<String, (u64, u64)>,
    /// The mesh overlay (device `i` is graph node `i - 1`); `None`: every device is a neighbour.
    graph: Option<crate::topology::Topology>,
    /// The overlay leaves devices that must converge apart (after [`GRAPH_DRAWS_MAX`] draws):
    /// the run fails its `overlay` check, since it cannot converge whatever the protocol does.
    overlay_split: bool,
    /// The first invariant violation seen after an event.
    violation: Option<String>,
    /// The mesh model's world (with `[mesh] enabled = true`).
    mesh: Option<Box<MeshWorld>>,
    /// The feed every node syncs: the mesh model's folder, or the open feed.
    folder: FolderId,
    /// Devices whose next merge crashes them before it is committed.
    crash_armed: BTreeSet<u32>,
    /// Devices whose current crash also loses their store.
    store_lost: BTreeSet<u32>,
    /// Devices offline for the write phase (left out of the propagation figures).
    offline_for_run: BTreeSet<u32>,
    faults_applied: FaultCounts,
    /// Stream transport: connections by (sender, receiver), the last id given out, and packets
    /// sent, retransmitted, connections broken.
    conns: BTreeMap<(u32, u32), crate::stream::Conn>,
    next_conn: u32,
    stream_stats: (u64, u64, u64),
    /// `pump`'s buffers, kept between calls.
    persist_buf: Vec<Persist<u32>>,
    transmit_buf: Vec<engine::sessions::Transmit<u32>>,
}

/// How many of the storage faults were applied.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct FaultCounts {
    pub cloud_crashes: u64,
    pub crashes_before_commit: u64,
    pub stores_lost: u64,
    /// Writes that only a device whose store was lost held (lost by the fault, not the protocol).
    pub writes_lost_with_store: u64,
    /// Device crashes (process crashes; crashes before commit are counted apart).
    pub device_crashes: u64,
    /// Partitions that started, and datagrams they stopped.
    pub partitions_started: u64,
    pub datagrams_partitioned: u64,
    /// Devices offline for the run, with a clock off (skew) or running fast or slow (drift).
    pub devices_offline: u64,
    pub devices_skewed: u64,
    pub devices_drifting: u64,
    /// Datagrams lost by the loss model, and copies made by duplication.
    pub datagrams_lost: u64,
    pub datagrams_duplicated: u64,
    /// Datagrams that arrived before one their sender sent earlier to the same node.
    pub datagrams_reordered: u64,
    /// Direct paths that could not be punched: the relay that coordinates it was down or cut
    /// off from a side.
    pub punches_failed: u64,
    /// A removed member's writes that no continuing member (nor the cloud) ever held: cut off
    /// by the removal, excused from the durability check.
    pub writes_cut_off_by_removal: u64,
    /// Times a device (on) left the network (offline writers, connectivity windows), and
    /// datagrams lost to it.
    pub disconnections: u64,
    pub datagrams_disconnected: u64,
    /// Datagrams between devices that neither a punched path nor the relay could carry (with
    /// `relay = false`).
    pub datagrams_unrelayed: u64,
}

impl Sim {
    pub fn new(sc: Scenario, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let devices = sc.devices;
        let mut nodes = Vec::with_capacity(devices as usize + 1);
        let mut epochs: Vec<u64> = Vec::with_capacity(devices as usize + 1);
        // One NAT per LAN group, shared by its devices.
        let groups = devices.div_ceil(sc.lan_group);
        let group_nats: Vec<(Nat, bool)> = crate::net::group_nats(&sc.nat, groups, &mut rng);
        for i in 0..=devices {
            // Drawn only when a share is set, so that runs without one replay unchanged.
            let skewed = i != CLOUD
                && (sc.faults.clock_skew_share_ppm >= 1_000_000
                    || sc.faults.clock_skew_ms == 0
                    || rng.random_range(0..1_000_000) < sc.faults.clock_skew_share_ppm);
            let skew_ms = if !skewed || sc.faults.clock_skew_ms == 0 {
                0
            } else {
                let s = sc.faults.clock_skew_ms as i64;
                rng.random_range(-s..=s)
            };
            let drift_ppm = if i == CLOUD || sc.faults.clock_drift_ppm == 0 {
                0
            } else {
                let d = i64::from(sc.faults.clock_drift_ppm);
                rng.random_range(-d..=d)
            };
            nodes.push(Node {
                host: Host::Noop,
                skew_ms,
                drift_ppm,
                mesh: None,
                timer_at: u64::MAX,
                incarnation: 0,
            });
            epochs.push(rng.random::<u64>());
        }
        let plain_cfg = Config {
            rto_us: 600_000,
            rto_max_us: 2_400_000,
            // Past the initiator's whole retransmission schedule (0.6 + 1.2 + 8 x 2.4 s = 21 s).
            linger_us: 25_000_000,
            // A repeated Hello meets a new responder here (`deliver`), so one-round-trip
            // responders finish at once.
            linger_after_hello: false,
            max_retries: 10,
            planted_bug: sc.planted_bug,
            ..Config::default()
        };
        // Over streams, sessions are as in the binaries (`transport::stream_config`): the stream
        // is reliable, so their timer only detects a peer that went away or a broken
        // connection; their messages are sized to the links.
        let plain_cfg = match sc.transport {
            Transport::Datagram => plain_cfg,
            Transport::Stream => Config {
                max_message_bytes: sc.stream.max_message_kb << 10,
                rto_us: sc.stream.session_timeout_ms * 1_000,
                rto_max_us: sc.stream.session_timeout_ms * 2_000,
                max_retries: 2,
                linger_us: sc.stream.session_timeout_ms * 4_000,
                ..plain_cfg
            },
        };
        // An authorized session's feed part is not its first message: a repeated inner Hello
        // meets the same session, whose responder must still be lingering.
        let auth_cfg = Arc::new(Config { linger_after_hello: true, ..plain_cfg.clone() });
        let plain_cfg = Arc::new(plain_cfg);
        // One content configuration for every device (the plain model holds 100,000).
        let content_cfg: Arc<engine::folder::fetch::FetchConfig> = Default::default();
        let device_cfg = |sync: Arc<Config>| DeviceConfig {
            sync,
            request_rto_us: 600_000,
            request_rto_max_us: 4_800_000,
            refresh_tickets: true,
            content: content_cfg.clone(),
        };
        for &(d, ms) in &sc.faults.device_skews_ms {
            nodes[d as usize].skew_ms = ms;
        }
        let mut folder = OPEN_FOLDER;
        let engine = sc.model == NodeModel::Engine;
        let mesh = sc.mesh.as_ref().filter(|m| m.enabled).map(|spec| {
            let (world, states, cloud_key, dir) =
                crate::mesh::build(spec, devices, &mut rng, EPOCH_UNIX_SECS);
            folder = world.folder;
            let scope = world.folder.scope();
            for (i, (node, mut state)) in nodes.iter_mut().zip(states).enumerate() {
                let epoch = epochs[i];
                if !engine {
                } else if i == 0 {
                    let limits =
                        CloudLimits { ticket_lifetime_us: world.lifetime_us, ..CloudLimits::default() };
                    let mut cloud = Cloud::new(cloud_key.clone(), dir.clone(), limits)
                        .with_sessions(Config::clone(&auth_cfg), epoch);
                    cloud.install(world.folder, Replica::new_signed(epoch, scope));
                    node.host = Host::Cloud(Box::new(cloud));
                } else if state.role == Role::Injected {
                    node.host = Host::Injected;
                } else {
                    // A forger keeps an unsigned replica: it holds what it forges.
                    let replica = if state.role == Role::Forger {
                        Replica::new(epoch).scoped(scope)
                    } else {
                        Replica::new_signed(epoch, scope)
                    };
                    let identity = Identity::Keyed { key: state.key.clone(), cloud: world.authority.id() };
                    let dir = std::mem::take(&mut state.dir);
                    let mut device = Device::new(
                        identity,
                        Some(CLOUD),
                        dir,
                        vec![(world.folder, replica)],
                        epoch,
                        device_cfg(auth_cfg.clone()),
                    );
                    // A replayer presents device 1's ticket and never asks for its own.
                    device.set_refresh_tickets(state.role != Role::Replayer);
                    let local = (BASE_US as i64 + node.skew_ms * 1_000) as u64;
                    device.set_ticket(local, state.creds.ticket.clone());
                    node.host = Host::Device(Box::new(device));
                }
                node.mesh = Some(Box::new(state));
            }
            for &(d, ms) in &spec.skews_ms {
                nodes[d as usize].skew_ms = ms;
            }
            Box::new(world)
        });
        if mesh.is_none() && engine {
            // The cloud of the plain model: open sessions, no directory; its ticket key signs
            // nothing here.
            let key = DeviceKey::from_bytes(&[7; 32]);
            let cloud = Cloud::new(key, Directory::new(), CloudLimits::default())
                .with_sessions(Config::clone(&plain_cfg), epochs[0])
                .open_sessions();
            nodes[0].host = Host::Cloud(Box::new(cloud));
            for (i, node) in nodes.iter_mut().enumerate().skip(1) {
                let name = Endpoint::new(&format!("dev-{i}")).expect("generated endpoint names are valid");
                let device = Device::new(
                    Identity::Open(name),
                    Some(CLOUD),
                    Directory::new(),
                    Vec::new(),
                    epochs[i],
                    device_cfg(plain_cfg.clone()),
                );
                node.host = Host::Device(Box::new(device));
            }
        }
        let mut overlay_split = false;
        let graph = match &sc.graph {
            Some(spec) if *spec != crate::topology::GraphSpec::Complete => {
                // Validated when the scenario was read; a failure here leaves the mesh complete.
                // A random overlay is drawn again until it is connected (a 2-regular graph is
                // often two cycles): gossip over a disconnected overlay cannot converge, which
                // says nothing about the protocol. An explicit graph is taken as written.
                // With the mesh model, connected among the devices that must converge: honest
                // ones not of the removed user (the others' sessions are refused).
                let keep: Vec<bool> = nodes[1..]
                    .iter()
                    .map(|n| n.mesh.as_ref().is_none_or(|m| m.role == Role::Honest && !m.removed))
                    .collect();
                let mut graph = spec.build(devices, &mut rng).ok();
                for _ in 0..GRAPH_DRAWS_MAX {
                    if graph.as_ref().is_none_or(|g| g.is_connected_among(&keep))
                        || matches!(spec, crate::topology::GraphSpec::Explicit { .. })
                    {
                        break;
                    }
                    graph = spec.build(devices, &mut rng).ok();
                }
                if graph.as_ref().is_some_and(|g| !g.is_connected_among(&keep)) {
                    overlay_split = true;
                }
                graph
            }
            _ => None,
        };
        let star = sc.topology == Topology::Star;
        let mut net =
            Net::new(sc.network.clone(), devices, sc.lan_group, group_nats, star, sc.nat.mapping_timeout_ms);
        if engine {
            net.count_paths();
        }
        let zipf_cdf = crate::net::zipf_cdf(sc.workload.items, sc.workload.zipf_s);
        let faults_until = sc.duration_ms * 1_000;
        let end = faults_until + sc.quiet_ms * 1_000;
        let cfg = Config::clone(&plain_cfg);
        // About 40 sampled writes keep their reach times for the plot.
        let expected_writes =
            f64::from(devices) * sc.workload.writes_per_min * sc.duration_ms as f64 / 60_000.0;
        let checker = Checker::new(devices + 1, (expected_writes / 40.0).clamp(1.0, 1e9) as u32);
        let mut sim = Self {
            sc,
            rng,
            now: 0,
            seq: 0,
            queue: CalendarQueue::new(),
            down: vec![0; nodes.len()],
            nodes,
            net,
            checker,
            cfg,
            zipf_cdf,
            faults_until,
            end,
            trace: Trace::new(),
            events: 0,
            messages: 0,
            bytes: 0,
            sessions_started: 0,
            sessions_failed: 0,
            failed_by: BTreeMap::new(),
            departures: 0,
            kinds: BTreeMap::new(),
            violation: None,
            graph,
            overlay_split,
            mesh,
            folder,
            crash_armed: BTreeSet::new(),
            store_lost: BTreeSet::new(),
            offline_for_run: BTreeSet::new(),
            faults_applied: FaultCounts::default(),
            conns: BTreeMap::new(),
            next_conn: 0,
            stream_stats: (0, 0, 0),
            persist_buf: Vec::new(),
            transmit_buf: Vec::new(),
        };
        for node in 0..=devices {
            sim.pump(node);
        }
        sim.schedule_initial();
        sim
    }

    fn push(&mut self, time: Micros, payload: Payload) {
        self.seq += 1;
        self.queue.push(time, self.seq, payload);
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
            if self.sc.model == NodeModel::Engine {
                self.schedule_write(node, 0);
            }
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
                self.faults_applied.devices_offline += 1;
                self.offline_for_run.insert(node);
                if self.sc.faults.offline_writes {
                    // On, writing, off the network until the quiet phase.
                    self.net.set_connected(node, false);
                    self.push(self.faults_until, Payload::Connect { node, on: true });
                } else {
                    self.go_down(node);
                    self.push(self.faults_until, Payload::BackOnline { node });
                }
            }
            let churns = self.sc.faults.churn_share_ppm >= 1_000_000
                || self.sc.faults.churn_per_min <= 0.0
                || self.rng.random_range(0..1_000_000) < self.sc.faults.churn_share_ppm;
            if churns {
                self.schedule_leave(node, 0);
            }
        }
        if let Some(world) = &self.mesh {
            let half = (world.lifetime_us / 2).max(1);
            let forge_every = world.spec.forge_every_ms * 1_000;
            let forgers = world.spec.forgers.clone();
            let remove_at = world.spec.remove_at_ms;
            let stale_at = world.spec.stale_after_ms * 1_000;
            // Honest devices refresh their own tickets over the control plane; the adversaries'
            // tickets are the driver's doing.
            for node in 1..=devices {
                match self.nodes[node as usize].mesh.as_ref().map(|m| m.role) {
                    Some(Role::Replayer | Role::Injected) => self.push(half, Payload::TicketRefresh { node }),
                    Some(Role::Stale) => self.push(stale_at, Payload::StopRefresh { node }),
                    _ => {}
                }
            }
            for node in forgers {
                self.push(forge_every, Payload::Forge { node });
            }
            if let Some(at) = remove_at {
                self.push(at * 1_000, Payload::RemoveMember);
            }
        }
        for w in self.sc.windows.clone() {
            // Off the network outside its windows, back for good at the quiet phase.
            if w.online_ms.first().is_none_or(|&(from, _)| from > 0) {
                self.net.set_connected(w.device, false);
                self.faults_applied.disconnections += 1;
            }
            for &(from, to) in &w.online_ms {
                if from > 0 && from * 1_000 < self.faults_until {
                    self.push(from * 1_000, Payload::Connect { node: w.device, on: true });
                }
                if to * 1_000 < self.faults_until {
                    self.push(to * 1_000, Payload::Connect { node: w.device, on: false });
                }
            }
            self.push(self.faults_until, Payload::Connect { node: w.device, on: true });
        }
        for at in self.sc.faults.cloud_crashes_ms.clone() {
            self.push(at * 1_000, Payload::Crash { node: CLOUD });
        }
        for index in 0..self.sc.partitions.len() {
            let p = &self.sc.partitions[index];
            let (at, heal) = (p.at_ms * 1_000, p.heal_ms.min(self.sc.duration_ms) * 1_000);
            // Faults stop at `duration_ms`: a partition that would start then or later never
            // does (else it would heal before it started, and never heal).
            if at >= self.faults_until {
                continue;
            }
            self.push(at, Payload::PartitionStart { index });
            self.push(heal, Payload::PartitionEnd { index });
        }
    }

    /// Churn: the next departure of `node` after `after` (each up period 0.5-1.5x the mean).
    fn schedule_leave(&mut self, node: u32, after: Micros) {
        let rate = self.sc.faults.churn_per_min;
        if rate <= 0.0 {
            return;
        }
        let mean = ((60_000_000.0 / rate) as u64).max(2);
        let at = after + self.rng.random_range(mean / 2..=mean + mean / 2);
        if at < self.faults_until {
            self.push(at, Payload::Leave { node });
        }
    }

    fn schedule_write(&mut self, node: u32, after: Micros) {
        let rate = self.sc.workload.writes_per_min;
        if rate <= 0.0 {
            return;
        }
        // A Poisson process: exponential gaps, -ln(U) * mean, with libm's software log so every
        // platform draws the same.
        let mean_us = 60_000_000.0 / rate;
        let unit = ((self.rng.random::<u64>() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let gap = ((-libm::log(unit) * mean_us) as u64).max(1);
        let at = after.saturating_add(gap);
        if at < self.faults_until {
            self.push(at, Payload::Write { node });
        }
    }

    /// Runs to the end; checks; reports.
    pub fn run(mut self, progress: Progress<'_>) -> Report {
        let mut last_report = 0;
        while let Some(event) = self.queue.pop() {
            if event.time > self.end {
                break;
            }
            self.now = event.time;
            self.events += 1;
            self.trace.update(&event.time.to_le_bytes());
            self.trace.update(&event.seq.to_le_bytes());
            self.handle(event.value);
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
                if self.up(node) {
                    if self.mesh.is_some() {
                        self.control_round(node);
                    }
                    if let Some(peer) = self.pick_peer(node) {
                        match self.sc.model {
                            NodeModel::Engine => self.start_session(node, peer),
                            NodeModel::Noop => self.ping(node, peer),
                        }
                    }
                }
            }
            Payload::Write { node } => {
                tracing::trace!(t_us = self.now, node, up = self.up(node), "write");
                self.trace.update(b"write");
                self.trace.update(&node.to_le_bytes());
                if self.up(node) && self.may_write(node) {
                    self.write(node);
                    self.check_touched(node);
                }
                self.schedule_write(node, self.now);
            }
            Payload::Deliver { to, from, tag, bytes } => {
                let stream = tag.stream();
                if tracing::enabled!(tracing::Level::TRACE) {
                    let (sid, step, kind) = engine::wire::peek(&bytes).unwrap_or((0, 0, "?"));
                    let up = self.up(to);
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
                if self.sc.model == NodeModel::Engine {
                    self.deliver(to, from, stream, &bytes);
                    self.check_touched(to);
                }
            }
            Payload::Relay { to, from, twin, what } => {
                tracing::trace!(t_us = self.now, from, to, "relay");
                self.trace.update(b"relay");
                self.trace.update(&to.to_le_bytes());
                // The relay runs in the cloud's process: down with it.
                if !self.up(CLOUD) {
                    return;
                }
                let len = match &what {
                    Carried::Ping => PING_LEN,
                    Carried::Datagram { bytes, .. } => bytes.len(),
                    Carried::Packet { len, .. } => *len as usize,
                };
                let copies = self.net.forward(&mut self.rng, self.now, to, len, twin);
                for &delay in copies.as_slice() {
                    let payload = match &what {
                        Carried::Datagram { tag, bytes } => {
                            Payload::Deliver { to, from, tag: *tag, bytes: bytes.clone() }
                        }
                        Carried::Ping => Payload::Ping { to },
                        Carried::Packet { conn, packet, .. } => {
                            Payload::Packet { to, from, conn: *conn, packet: *packet }
                        }
                    };
                    self.push(self.now + delay, payload);
                }
            }
            Payload::Packet { to, from, conn, packet } => {
                self.trace.update(b"packet");
                self.trace.update(&packet.to_le_bytes());
                self.packet_arrived(to, from, conn, packet);
            }
            Payload::Ack { from, to, conn, packet } => {
                self.trace.update(b"ack");
                let now = self.now;
                let Some(c) = self.conns.get_mut(&(from, to)).filter(|c| c.id == conn) else { return };
                if c.acked(packet, now) {
                    self.pump_conn(from, to);
                }
            }
            Payload::PacketTimer { from, to, conn, packet, attempt } => {
                self.trace.update(b"ptimer");
                self.packet_timer(from, to, conn, packet, attempt);
            }
            Payload::Timer { node } => {
                if self.nodes[node as usize].timer_at != self.now {
                    return;
                }
                // The armed timer is spent even when the node is down: else a node armed while
                // down (an owner removing a member while offline) kept a past `timer_at`, and
                // no later deadline, being later, was ever armed again (found by the swarm).
                self.nodes[node as usize].timer_at = u64::MAX;
                if !self.up(node) {
                    return;
                }
                tracing::trace!(t_us = self.now, node, "timer");
                self.trace.update(b"timer");
                let now = self.local_us(node);
                match &mut self.nodes[node as usize].host {
                    Host::Device(d) => d.handle_timeout(now),
                    Host::Cloud(c) => c.handle_timeout(now),
                    Host::Injected | Host::Noop => {}
                }
                self.pump(node);
                self.check_touched(node);
            }
            Payload::StopRefresh { node } => {
                self.trace.update(b"stale");
                if let Host::Device(d) = &mut self.nodes[node as usize].host {
                    d.set_refresh_tickets(false);
                }
            }
            Payload::TicketRefresh { node } => {
                self.trace.update(b"ticket");
                self.trace.update(&node.to_le_bytes());
                self.refresh_ticket(node);
            }
            Payload::Forge { node } => {
                self.trace.update(b"forge");
                self.trace.update(&node.to_le_bytes());
                self.forge(node);
            }
            Payload::RemoveMember if !self.up(1) => {
                // The owner's device is off: the person removes the member once it is back.
                self.push(self.now + 1_000_000, Payload::RemoveMember);
            }
            Payload::RemoveMember => {
                tracing::debug!(t_us = self.now, "member removed");
                self.trace.update(b"remove");
                let when = EPOCH_UNIX_SECS + (self.now / 1_000_000) as i64;
                if let (Some(world), Host::Device(owner)) = (self.mesh.as_mut(), &mut self.nodes[1].host) {
                    world.remove_member(owner.directory_mut(), when);
                    owner.flush();
                }
                self.pump(1);
            }
            Payload::Crash { node } => {
                tracing::debug!(t_us = self.now, node, "crash");
                self.trace.update(b"crash");
                if self.up(node) {
                    if node == CLOUD {
                        self.faults_applied.cloud_crashes += 1;
                    } else {
                        self.faults_applied.device_crashes += 1;
                    }
                    if node != CLOUD
                        && self.sc.faults.lost_store_ppm > 0
                        && self.rng.random_range(0..1_000_000) < self.sc.faults.lost_store_ppm
                    {
                        self.store_lost.insert(node);
                    }
                    self.go_down(node);
                    let back = self.now + self.sc.faults.down_ms * 1_000;
                    self.push(back, Payload::Restart { node });
                }
            }
            Payload::Restart { node } | Payload::BackOnline { node } | Payload::Rejoin { node } => {
                tracing::debug!(t_us = self.now, node, "up");
                self.trace.update(b"up");
                self.down[node as usize] = self.down[node as usize].saturating_sub(1);
                if matches!(payload, Payload::Rejoin { .. }) {
                    self.schedule_leave(node, self.now);
                }
                if self.up(node) {
                    self.come_up(node);
                }
            }
            Payload::Ping { to } => {
                self.trace.update(b"ping");
                self.trace.update(&to.to_le_bytes());
            }
            Payload::Leave { node } => {
                tracing::debug!(t_us = self.now, node, "leave");
                self.trace.update(b"leave");
                self.departures += 1;
                self.go_down(node);
                let mean = self.sc.faults.churn_away_ms * 1_000;
                let away = self.rng.random_range(mean / 2..=mean + mean / 2);
                // Back by the quiet phase at the latest: faults stop there.
                let back = (self.now + away).min(self.faults_until.max(self.now));
                self.push(back, Payload::Rejoin { node });
            }
            Payload::PartitionStart { index } => {
                tracing::debug!(t_us = self.now, index, "partition cut");
                self.faults_applied.partitions_started += 1;
                self.trace.update(b"cut");
                let p = &self.sc.partitions[index];
                let devices = self.sc.devices;
                let first = (u64::from(devices) * u64::from(p.share_ppm) / 1_000_000) as u32;
                let cut = match p.kind {
                    PartitionKind::Split => Cut::Split(1..first + 1),
                    PartitionKind::Oneway => Cut::Oneway(1..first + 1),
                    PartitionKind::Ring => Cut::Ring { groups: p.groups, devices },
                    PartitionKind::Bridge => Cut::Bridge {
                        first: 1..first + 1,
                        bridges: first + 1 - p.bridges.min(first)..first + 1,
                    },
                };
                self.net.cut(index, cut);
            }
            Payload::Connect { node, on } => {
                tracing::debug!(t_us = self.now, node, on, "connectivity");
                self.trace.update(if on { b"connect" } else { b"disconn" });
                self.trace.update(&node.to_le_bytes());
                if !on {
                    self.faults_applied.disconnections += 1;
                }
                self.net.set_connected(node, on);
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
            // An injected device knows every address: the lying cloud tells it.
            Topology::Mesh
                if self.mesh.is_some()
                    && self.nodes[node as usize].mesh.as_ref().is_some_and(|m| m.role != Role::Injected) =>
            {
                // Peers are those the cloud's address book named (Peers over the control plane).
                let m = self.nodes[node as usize].mesh.as_ref()?;
                if let Some(graph) = &self.graph {
                    let peer = graph.random_neighbor(node - 1, &mut self.rng).map(|p| p + 1)?;
                    return m.known.binary_search(&peer).is_ok().then_some(peer);
                }
                if m.known.is_empty() {
                    return None;
                }
                let i = self.rng.random_range(0..m.known.len());
                Some(m.known[i])
            }
            Topology::Mesh => {
                if let Some(graph) = &self.graph {
                    return graph.random_neighbor(node - 1, &mut self.rng).map(|p| p + 1);
                }
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
                let lan = self.net.host(node).lan;
                let group = self.sc.lan_group;
                let first = lan * group + 1;
                let last = (first + group - 1).min(devices);
                let outside = devices - (last - first + 1);
                // A peer elsewhere (drawn only when configured, so other runs replay unchanged).
                if self.sc.remote_peer_ppm > 0
                    && outside > 0
                    && self.rng.random_range(0..1_000_000) < self.sc.remote_peer_ppm
                {
                    let mut peer = self.rng.random_range(1..=outside);
                    if peer >= first {
                        peer += last - first + 1;
                    }
                    return Some(peer);
                }
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

    /// The channel key the transport would authenticate for `node` (mesh model; none otherwise).
    fn channel(&self, node: u32) -> ChannelKey {
        self.nodes[node as usize].mesh.as_ref().map_or(ChannelKey([0; 32]), |m| m.channel)
    }

    fn start_session(&mut self, node: u32, peer: u32) {
        let folder = self.folder;
        let local = self.local_us(node);
        let channel = self.channel(peer);
        match &self.nodes[node as usize].host {
            // One outgoing session per peer and folder at a time.
            Host::Device(d) if d.syncing(peer, folder) => return,
            Host::Device(_) => {}
            Host::Injected => {
                let sid: u64 = self.rng.random();
                let Some(m) = self.nodes[node as usize].mesh.as_ref() else { return };
                let hello = crate::mesh::injected_hello(m, folder, sid);
                self.sessions_started += 1;
                self.send(node, peer, Stream::Sync, hello);
                return;
            }
            Host::Cloud(_) | Host::Noop => return,
        }
        let sid: u64 = self.rng.random();
        tracing::trace!(t_us = self.now, node, peer, sid, "session start");
        let Host::Device(d) = &mut self.nodes[node as usize].host else { return };
        if d.start_sync(local, peer, channel, folder, sid).is_ok() {
            self.sessions_started += 1;
        }
        self.pump(node);
    }

    /// Whether a node is up (kept apart from the nodes: the hottest per-node bit, checked on
    /// every tick and delivery, stays in cache at 100,000 nodes).
    #[inline]
    fn up(&self, node: u32) -> bool {
        self.down[node as usize] == 0
    }

    /// Goes down for one more reason (crash, churn, offline); the first is a crash of the
    /// node's process: its volatile state is lost, its store kept (the simulator commits every
    /// output at the end of the event that made it, so the store is what the role holds now),
    /// and it will come back under a new replica epoch.
    fn go_down(&mut self, node: u32) {
        if self.down[node as usize] == 0 {
            let epoch: u64 = self.rng.random();
            let n = &mut self.nodes[node as usize];
            n.timer_at = u64::MAX;
            match &mut n.host {
                Host::Device(d) => d.restart(epoch),
                Host::Cloud(c) => c.restart(epoch),
                Host::Injected | Host::Noop => {}
            }
            self.crash_armed.remove(&node);
            if node == CLOUD {
                self.net.set_relay_up(false);
            }
            if !self.conns.is_empty() {
                // Its connections die with it, both ways.
                self.conns.retain(|&(a, b), _| a != node && b != node);
            }
        }
        self.down[node as usize] += 1;
    }

    /// Back up: a device whose store was lost starts over as a new endpoint; every role arms
    /// its timers again.
    fn come_up(&mut self, node: u32) {
        if node == CLOUD {
            self.net.set_relay_up(true);
        }
        if self.store_lost.remove(&node) {
            tracing::debug!(t_us = self.now, node, "store lost");
            self.faults_applied.stores_lost += 1;
            self.faults_applied.writes_lost_with_store += self.checker.store_lost(node);
            let epoch: u64 = self.rng.random();
            let n = &mut self.nodes[node as usize];
            n.incarnation += 1;
            if let Host::Device(d) = &mut n.host {
                let name = format!("dev-{node}-{}", n.incarnation);
                let name = Endpoint::new(&name).expect("generated endpoint names are valid");
                let cfg = d.config();
                **d =
                    Device::new(Identity::Open(name), Some(CLOUD), Directory::new(), Vec::new(), epoch, cfg);
            }
        }
        self.pump(node);
    }

    /// The structural checks of the roles an event touched (every replica invariant with
    /// `paranoid`). A failure ends the run at once with the check named.
    fn check_touched(&mut self, node: u32) {
        if self.violation.is_some() {
            return;
        }
        let result = match &self.nodes[node as usize].host {
            Host::Device(d) => d.check_invariants(),
            Host::Cloud(c) => c.check_invariants().map_err(String::from),
            Host::Injected | Host::Noop => Ok(()),
        };
        let result = result.and_then(|()| match (self.sc.paranoid, self.replica(node)) {
            (true, Some(r)) => r.check_invariants(),
            _ => Ok(()),
        });
        if let Err(e) = result {
            self.violation = Some(format!("invariants: node {node} at {} us: {e}", self.now));
        }
    }

    /// The node's replica of the feed, if it holds one.
    fn replica(&self, node: u32) -> Option<&Replica> {
        match &self.nodes[node as usize].host {
            Host::Device(d) => d.replica(&self.folder),
            Host::Cloud(c) => c.replica(&self.folder),
            Host::Injected | Host::Noop => None,
        }
    }

    /// The node's directory (mesh model).
    fn directory(&self, node: u32) -> Option<&Directory> {
        match &self.nodes[node as usize].host {
            Host::Device(d) => Some(d.directory()),
            Host::Cloud(c) => Some(c.directory()),
            Host::Injected => self.nodes[node as usize].mesh.as_ref().map(|m| &m.dir),
            Host::Noop => None,
        }
    }

    fn deliver(&mut self, to: u32, from: u32, stream: Stream, bytes: &[u8]) {
        if !self.up(to) {
            return;
        }
        let local = self.local_us(to);
        let channel = self.channel(from);
        let max = self.cfg.max_message_bytes;
        let from_device = self.nodes[from as usize].mesh.as_ref().map_or(DeviceId([0; 32]), |m| m.device);
        // Crash before commit: a device armed for it keeps what it had committed; if this message
        // makes it merge anything, it crashes before committing.
        let ppm = self.sc.faults.crash_before_commit_ppm;
        // Faults stop at `duration_ms`: a device crashing in the quiet phase would be down at the
        // end, and on a sparse overlay cut its neighbours apart (the swarm's open ring finding).
        if ppm > 0
            && to != CLOUD
            && stream == Stream::Sync
            && self.now < self.faults_until
            && self.rng.random_range(0..1_000_000) < ppm
        {
            self.crash_armed.insert(to);
        }
        let armed = self.crash_armed.contains(&to);
        let n = &mut self.nodes[to as usize];
        match &mut n.host {
            Host::Injected => {
                let Some(m) = n.mesh.as_mut() else { return };
                if let Some(answer) = crate::mesh::injected_answer(m, bytes, max) {
                    self.send(to, from, Stream::Sync, answer);
                }
                return;
            }
            Host::Noop => return,
            Host::Cloud(c) => match stream {
                Stream::Sync => c.handle_sync(local, from, channel, bytes),
                Stream::Request(id) => {
                    let request = engine::control::decode::<Request>(bytes, engine::control::CONTROL_MAX);
                    match (request, self.mesh.as_ref()) {
                        // The driver checks the account's password (the relay's argon2 work),
                        // then the engine takes the request.
                        (Ok(Request::PairRequest { account, password, commitment }), Some(world)) => {
                            let user = (0..world.user_ids.len())
                                .find(|&u| crate::mesh::account_of(u) == (account.clone(), password.clone()))
                                .map(|u| world.user_ids[u]);
                            let response = match user {
                                Some(user) => c.handle_pair_request(from_device, user, commitment),
                                None => Response::Refused(engine::control::ControlError::WrongPassword),
                            };
                            c.respond(from, id, &response);
                        }
                        _ => c.handle_control(local, from, from_device, id, bytes),
                    }
                }
                Stream::Response(_) | Stream::Notice => return,
            },
            Host::Device(d) => match stream {
                Stream::Sync if armed => {
                    let committed: Vec<(FolderId, Replica)> =
                        d.replicas().map(|(f, r)| (*f, r.clone())).collect();
                    d.handle_sync(local, from, channel, bytes);
                    let mut merged = false;
                    let mut kept = Vec::new();
                    while let Some(p) = d.poll_persist() {
                        merged |= matches!(p, Persist::Items(_));
                        kept.push(p);
                    }
                    if merged {
                        tracing::debug!(t_us = self.now, node = to, "crash before commit");
                        for (folder, replica) in committed {
                            d.install(folder, replica);
                        }
                        self.faults_applied.crashes_before_commit += 1;
                        self.go_down(to);
                        let back = self.now + self.sc.faults.down_ms * 1_000;
                        self.push(back, Payload::Restart { node: to });
                        return;
                    }
                    // Nothing merged: the outputs stand, and the fault waits for a merge.
                    self.absorb(to, &mut kept);
                }
                Stream::Sync => d.handle_sync(local, from, channel, bytes),
                Stream::Response(id) => d.handle_response(local, id, bytes),
                Stream::Notice => d.handle_notice(bytes),
                Stream::Request(_) => return,
            },
        }
        self.pump(to);
    }

    /// Runs a node's output: commits (the checker learns what the node now holds), events,
    /// then transmits, then arms its timer.
    fn pump(&mut self, node: u32) {
        // Buffers kept between calls (a pump runs after nearly every event).
        let mut persists = std::mem::take(&mut self.persist_buf);
        let mut ended: Vec<Ended<u32>> = Vec::new();
        let mut out = std::mem::take(&mut self.transmit_buf);
        let mut renewed = 0u64;
        let mut dir_changed = false;
        let mut app: Vec<Event<u32>> = Vec::new();
        let mut notices = Vec::new();
        let timeout = match &mut self.nodes[node as usize].host {
            Host::Device(d) => {
                while let Some(p) = d.poll_persist() {
                    persists.push(p);
                }
                while let Some(e) = d.poll_event() {
                    match e {
                        Event::SessionEnded(e) => ended.push(e),
                        Event::TicketRenewed { .. } => renewed += 1,
                        Event::DirectoryChanged => {
                            dir_changed = true;
                            app.push(Event::DirectoryChanged);
                        }
                        other => app.push(other),
                    }
                }
                while let Some(t) = d.poll_transmit() {
                    out.push(t);
                }
                d.poll_timeout()
            }
            Host::Cloud(c) => {
                while let Some(p) = c.poll_persist() {
                    match p {
                        CloudPersist::Items(commit) => persists.push(Persist::Items(commit)),
                        CloudPersist::Directory(_) => dir_changed = true,
                    }
                }
                // Notices go to the devices that may see them (mesh model; the plain model's
                // open cloud has no directory to say who may).
                while let Some(n) = c.poll_notice() {
                    notices.push(n);
                }
                while let Some(e) = c.poll_ended() {
                    ended.push(e);
                }
                while let Some(t) = c.poll_transmit() {
                    out.push(t);
                }
                c.poll_timeout()
            }
            Host::Injected | Host::Noop => None,
        };
        self.absorb(node, &mut persists);
        self.persist_buf = persists;
        if dir_changed {
            self.note_removal(node);
        }
        if let Some(world) = self.mesh.as_mut() {
            world.report.tickets_issued += renewed;
        }
        for e in ended {
            self.session_ended(node, &e);
        }
        for t in out.drain(..) {
            self.send(node, t.to, t.stream, t.bytes);
        }
        self.transmit_buf = out;
        for e in app {
            self.on_event(node, e);
        }
        if !notices.is_empty() {
            self.send_notices(notices);
        }
        if let Some(t) = timeout {
            let at = self.virtual_us(node, t);
            if at < self.nodes[node as usize].timer_at {
                self.nodes[node as usize].timer_at = at;
                self.push(at, Payload::Timer { node });
            }
        }
    }

    /// The checker learns what a node committed.
    fn absorb(&mut self, node: u32, persists: &mut Vec<Persist<u32>>) {
        for p in persists.drain(..) {
            let Persist::Items(Commit { from: Some(peer), items, .. }) = p else { continue };
            if self.mesh.is_some() {
                self.mesh_received(node, peer, &items);
            }
            // A forger's replica holds versions no write made.
            let forger = self.nodes[node as usize].mesh.as_ref().is_some_and(|m| m.role == Role::Forger);
            if forger {
                continue;
            }
            for (item, fp) in items {
                tracing::trace!(
                    t_us = self.now,
                    node,
                    peer,
                    item = %item.id(),
                    updates = item.version.updates,
                    conflicts = item.conflicts.len(),
                    fp,
                    "merged"
                );
                let hashes = match &self.nodes[node as usize].host {
                    Host::Device(d) => d.replica(&self.folder),
                    Host::Cloud(c) => c.replica(&self.folder),
                    Host::Injected | Host::Noop => None,
                }
                .and_then(|r| r.version_hashes_of(&item));
                self.checker.absorb_state(node, &item, fp, hashes, self.now);
            }
        }
    }

    /// Mesh model: a device's control round on its sync tick, as the node's daemon runs it:
    /// every third tick it pushes and pulls the directory, announces its address, asks for its
    /// peers and lists its user's pending pairings; a late device runs its pairing.
    fn control_round(&mut self, node: u32) {
        let local = self.local_us(node);
        let folder = self.folder;
        let now = self.now;
        let pair_at = self.mesh.as_ref().map_or(0, |w| w.spec.pair_at_ms * 1_000);
        let n = &mut self.nodes[node as usize];
        let (Host::Device(d), Some(m)) = (&mut n.host, n.mesh.as_mut()) else { return };
        m.rounds += 1;
        let Some(me) = d.id() else { return };
        let active = d.directory().user_of(&me).is_some();
        if let Some(pair) = m.pair.as_mut().filter(|_| !active) {
            if now < pair_at {
                return;
            }
            // The directory says when the pairing is done (the user's device added this one),
            // whatever became of the pairing at the cloud, so it is pulled on every round once
            // consented, and on every third round before.
            let directory = Request::Directory { heads: Vec::new(), changes: Vec::new() };
            if (pair.consented || m.rounds % 3 == 0) && !d.pending(&directory) {
                let _ = d.sync_directory(local);
            }
            let request = match pair.id {
                None => {
                    let u =
                        self.mesh.as_ref().and_then(|w| w.user_ids.iter().position(|x| Some(*x) == m.user));
                    let (account, password) = crate::mesh::account_of(u.unwrap_or(0));
                    let commitment = engine::directory::pairing_commitment(&me, &pair.nonce);
                    Some(Request::PairRequest { account, password, commitment })
                }
                Some(id) if !pair.consented => Some(Request::PairStatus { id }),
                // Consented and waiting to be added: is the pairing still there (a cloud that
                // crashed lost it; one the cloud dropped because it completed shows in the
                // directory pulled above)?
                Some(id) => (m.rounds % 3 == 0).then_some(Request::PairStatus { id }),
            };
            if let Some(request) = request.filter(|r| !d.pending(r)) {
                let _ = d.request(local, request);
            }
            self.pump(node);
            return;
        }
        if !active || m.rounds % 3 != 1 {
            return;
        }
        let addr = PeerAddr { device: me, relay: None, direct: vec![crate::mesh::addr_of(node)] };
        for request in [Request::Announce { addr }, Request::Peers { folder }, Request::PairList] {
            if !d.pending(&request) {
                let _ = d.request(local, request);
            }
        }
        // Not over a push still in flight: its answer would be dropped as replaced, and the
        // device would never learn what the cloud holds (every push whole again: the swarm's
        // seed 676, 47 KB each round on a lossy link).
        if !d.pending(&Request::Directory { heads: Vec::new(), changes: Vec::new() }) {
            let _ = d.sync_directory(local);
        }
        self.pump(node);
    }

    /// A device's event that its application (the simulated user and daemon) acts on.
    fn on_event(&mut self, node: u32, event: Event<u32>) {
        let local = self.local_us(node);
        let folder = self.folder;
        let when = EPOCH_UNIX_SECS + (self.now / 1_000_000) as i64;
        match event {
            // A notice: sync with the cloud now rather than at the next tick.
            Event::FolderChanged(f) if f == folder && self.up(node) => self.start_session(node, CLOUD),
            Event::Peers { peers, .. } => {
                let mut known: Vec<u32> =
                    peers.iter().filter_map(|p| p.direct.first().and_then(crate::mesh::node_of)).collect();
                known.sort_unstable();
                known.dedup();
                known.retain(|&p| p != node && p != CLOUD && p <= self.sc.devices);
                if let Some(m) = self.nodes[node as usize].mesh.as_mut() {
                    m.known = known;
                }
            }
            Event::Answer { request, response, .. } => self.on_answer(node, local, when, request, response),
            // The pairing is gone (the cloud crashed and lost it, or its bounds evicted it):
            // start again, as a person would.
            Event::Refused {
                request: "pair-status" | "pair-consent",
                error: engine::control::ControlError::NoSuchPairing,
                ..
            } => {
                let n = &mut self.nodes[node as usize];
                if let Some(pair) = n.mesh.as_mut().and_then(|m| m.pair.as_mut()) {
                    pair.id = None;
                    pair.consented = false;
                }
            }
            Event::DirectoryChanged => {
                // A late device that became active maps the folder, pushes that, and asks for a
                // ticket that grants it.
                let n = &mut self.nodes[node as usize];
                let (Host::Device(d), Some(m)) = (&mut n.host, n.mesh.as_mut()) else { return };
                let Some(pair) = m.pair.as_mut() else { return };
                let Some(me) = d.id() else { return };
                if pair.mapped || d.directory().user_of(&me).is_none() {
                    return;
                }
                pair.mapped = true;
                if d.make(when, Op::Map { folder }).is_ok() {
                    let _ = d.sync_directory(local);
                    let _ = d.request(local, Request::Ticket);
                }
                if let Some(world) = self.mesh.as_mut() {
                    world.report.pairings_completed += 1;
                    world.report.last_pairing_ms = self.now / 1_000;
                }
                self.pump(node);
            }
            _ => {}
        }
    }

    /// The pairing ceremony's answers, on both sides.
    fn on_answer(&mut self, node: u32, local: Micros, when: i64, request: Request, response: Response) {
        let n = &mut self.nodes[node as usize];
        let (Host::Device(d), Some(m)) = (&mut n.host, n.mesh.as_mut()) else { return };
        let Some(me) = d.id() else { return };
        match (request, response) {
            (Request::PairRequest { .. }, Response::PairId { id }) => {
                if let Some(pair) = m.pair.as_mut() {
                    pair.id = Some(id);
                }
            }
            (Request::PairStatus { id }, Response::PairStatus(view)) => {
                let Some(pair) = m.pair.as_mut() else { return };
                let Some((existing, nonce_existing)) = view.existing else { return };
                // Both screens show the code; the user types it on the new device.
                let code = engine::directory::short_code(&existing, &me, &nonce_existing, &pair.nonce);
                let Ok(pairing) = engine::directory::pair_new_device(
                    &m.key,
                    view.user,
                    existing,
                    nonce_existing,
                    pair.nonce,
                    code,
                ) else {
                    return;
                };
                let _ = d.request(local, Request::PairConsent { id, pairing });
            }
            (Request::PairConsent { .. }, Response::Ok) => {
                if let Some(pair) = m.pair.as_mut() {
                    pair.consented = true;
                }
                let _ = d.sync_directory(local);
            }
            (Request::PairList, Response::Pairings(list)) => {
                for p in list {
                    match (&p.existing, &p.pairing) {
                        (None, _) => {
                            let nonce: [u8; 32] = self.rng.random();
                            let nonce = *m.answered.entry(p.id).or_insert(nonce);
                            let _ = d.request(local, Request::PairNonce { id: p.id, nonce });
                        }
                        (Some((existing, _)), Some(pairing)) if *existing == me && m.added.insert(p.id) => {
                            let _ = d.make(when, Op::AddDevice { user: p.user, pairing: pairing.clone() });
                            let _ = d.sync_directory(local);
                        }
                        _ => {}
                    }
                }
            }
            _ => return,
        }
        self.pump(node);
    }

    /// The cloud's notices, to every up device that may see them (not the one that caused them),
    /// over the network like any message.
    fn send_notices(&mut self, notices: Vec<Outgoing>) {
        let Some(loss) = self.mesh.as_ref().map(|w| w.spec.notice_loss_ppm) else { return };
        for Outgoing { notice, origin } in notices {
            let bytes = engine::control::encode(&notice);
            for device in 1..=self.sc.devices {
                let Some(id) = self.nodes[device as usize].mesh.as_ref().map(|m| m.device) else { continue };
                let Host::Cloud(cloud) = &self.nodes[CLOUD as usize].host else { return };
                if Some(id) == origin || !self.up(device) || !cloud.may_see(&notice, &id) {
                    continue;
                }
                let dropped = loss > 0 && self.rng.random_range(0..1_000_000) < loss;
                if let Some(world) = self.mesh.as_mut() {
                    world.report.notices_sent += 1;
                    world.report.notices_dropped += u64::from(dropped);
                }
                if !dropped {
                    self.send(CLOUD, device, Stream::Notice, bytes.clone());
                }
            }
        }
    }

    fn session_ended(&mut self, node: u32, e: &Ended<u32>) {
        tracing::trace!(t_us = self.now, node, peer = e.peer, sid = e.session, outcome = ?e.outcome, "session end");
        if let Outcome::Failed(err) = &e.outcome {
            self.sessions_failed += 1;
            *self.failed_by.entry(failure_reason(err)).or_default() += 1;
        }
        if let Some(world) = self.mesh.as_mut() {
            match &e.outcome {
                Outcome::Failed(error) => world.count_failure(error, self.now),
                Outcome::Done { .. } => world.report.sessions_done += 1,
                Outcome::Running => {}
            }
        }
    }

    /// This node's ticket clock (mesh model; virtual time otherwise).
    fn local_us(&self, node: u32) -> Micros {
        if self.mesh.is_none() {
            return self.now;
        }
        let skew_us = self.nodes[node as usize].skew_ms * 1_000;
        (BASE_US as i64 + self.now as i64 + skew_us) as u64
    }

    /// A time of this node's ticket clock in virtual time (mesh model; the same otherwise).
    fn virtual_us(&self, node: u32, local: Micros) -> Micros {
        if self.mesh.is_none() {
            return local;
        }
        let skew_us = self.nodes[node as usize].skew_ms * 1_000;
        ((local as i64 - BASE_US as i64 - skew_us).max(self.now as i64)) as u64
    }

    /// Whether a device makes writes: all do without the mesh model; with it, not adversaries
    /// nor the removed member (after half the time to its removal).
    fn may_write(&self, node: u32) -> bool {
        let (Some(world), Some(m)) = (&self.mesh, &self.nodes[node as usize].mesh) else { return true };
        if m.role != Role::Honest || !crate::mesh::skew_within(self.nodes[node as usize].skew_ms) {
            return false;
        }
        !m.removed || world.spec.remove_at_ms.is_some_and(|at| self.now < at * 1_000 / 2)
    }

    /// Whether a device must converge at the end.
    fn expected(&self, node: u32) -> bool {
        match &self.nodes[node as usize].mesh {
            None => true,
            Some(m) => {
                m.role == Role::Honest
                    && !m.removed
                    && crate::mesh::skew_within(self.nodes[node as usize].skew_ms)
            }
        }
    }

    fn note_removal(&mut self, node: u32) {
        let Some(world) = &self.mesh else { return };
        let now = self.now;
        let shows = self.directory(node).is_some_and(|dir| world.shows_removal(dir));
        if let Some(m) = self.nodes[node as usize].mesh.as_mut() {
            if m.removal_known_at.is_none() && shows {
                m.removal_known_at = Some(now);
            }
        }
    }

    /// The adversaries' tickets: a replayer takes device 1's current one, an injected device gets
    /// one from the lying cloud; then the next refresh is scheduled. (Honest devices ask the
    /// cloud themselves, over the control plane.)
    fn refresh_ticket(&mut self, node: u32) {
        let Some(world) = self.mesh.as_mut() else { return };
        let Some(m) = self.nodes[node as usize].mesh.as_ref() else { return };
        let next = self.now + (world.lifetime_us / 2).max(1);
        let local = (BASE_US as i64 + self.now as i64 + self.nodes[node as usize].skew_ms * 1_000) as u64;
        match m.role {
            Role::Replayer => {
                let stolen = match &self.nodes[1].host {
                    Host::Device(d) => d.ticket().cloned(),
                    _ => None,
                };
                if let (Some(ticket), Host::Device(d)) = (stolen, &mut self.nodes[node as usize].host) {
                    d.set_ticket(local, ticket);
                }
            }
            Role::Injected => {
                let Host::Cloud(cloud) = &self.nodes[CLOUD as usize].host else { return };
                let ticket = world.issue(m, cloud.directory(), self.now);
                if let Some(m) = self.nodes[node as usize].mesh.as_mut() {
                    m.creds.ticket = ticket;
                }
            }
            _ => return,
        }
        if next <= self.end {
            self.push(next, Payload::TicketRefresh { node });
        }
    }

    /// A forger makes a version named after device 1 with a signature that does not verify.
    fn forge(&mut self, node: u32) {
        let Some(world) = self.mesh.as_mut() else { return };
        let next = self.now + world.spec.forge_every_ms * 1_000;
        if next < self.faults_until {
            self.push(next, Payload::Forge { node });
        }
        let item = crate::net::sample_cdf(&self.zipf_cdf, self.rng.random_range(0..u64::MAX));
        let id = ItemId::new(&format!("item-{item}")).expect("generated ids are valid");
        let Some(victim) = self.nodes[1].mesh.as_ref().map(|v| v.device.endpoint()) else { return };
        let folder = self.folder;
        let now = self.now;
        let n = &mut self.nodes[node as usize];
        let clock_ms = n.clock_ms(now);
        let when = When::from_unix_secs(EPOCH_UNIX_SECS + clock_ms.div_euclid(1_000))
            .expect("simulated times are in range");
        let Host::Device(d) = &mut n.host else { return };
        let text = format!("<title>forged by {} at {now}</title>", d.endpoint());
        let Some(replica) = d.replica_mut(&folder) else { return };
        let Some(forged) = crate::mesh::forge(replica.item(&id), &id, &victim, &when, text) else { return };
        let key = crate::mesh::version_key(&forged.version);
        let _ = replica.merge(&Arc::new(forged));
        let Some(world) = self.mesh.as_mut() else { return };
        world.forged.insert(key);
        world.report.forged_made += 1;
    }

    /// Mesh model: versions that reached a removed member's device from a sender that knew of
    /// the removal before they were written are leaks.
    fn mesh_received(&mut self, node: u32, peer: u32, changed: &[(Arc<Item>, u64)]) {
        let removed = self.nodes[node as usize].mesh.as_ref().is_some_and(|m| m.removed);
        let known = self.nodes[peer as usize].mesh.as_ref().and_then(|m| m.removal_known_at);
        let (true, Some(world)) = (removed, self.mesh.as_mut()) else { return };
        world.report.removed_received += changed.len() as u64;
        let Some(known) = known else { return };
        for (item, _) in changed {
            for version in crate::mesh::versions(item) {
                let key = crate::mesh::version_key(version);
                if world.write_times.get(&key).is_some_and(|&at| at > known) {
                    tracing::debug!(t_us = self.now, node, peer, item = %item.id(), known, "leak to a removed member");
                    world.report.removed_leaks += 1;
                }
            }
        }
    }

    fn send(&mut self, from: u32, to: u32, stream: Stream, bytes: Vec<u8>) {
        let bytes = match self.mesh.as_mut() {
            Some(world) if world.spec.cloud_tamper_ppm > 0 && stream == Stream::Sync => {
                let ppm = world.spec.cloud_tamper_ppm;
                let tampered = (self.rng.random_range(0..1_000_000) < ppm)
                    .then(|| crate::mesh::tamper(&bytes, self.cfg.max_message_bytes))
                    .flatten();
                match tampered {
                    Some((altered, key)) => {
                        world.forged.insert(key);
                        world.report.forged_made += 1;
                        altered
                    }
                    None => bytes,
                }
            }
            _ => bytes,
        };
        let kind = match stream {
            Stream::Sync => engine::wire::peek(&bytes).map(|(_, _, kind)| kind),
            Stream::Request(_) => {
                engine::control::decode::<engine::control::Request>(&bytes, engine::control::CONTROL_MAX)
                    .ok()
                    .map(|r| r.kind())
            }
            Stream::Response(_) => engine::control::decode::<Response>(&bytes, engine::control::CONTROL_MAX)
                .ok()
                .map(|r| match r {
                    Response::Ok => "ok answer",
                    Response::Refused(_) => "refused answer",
                    Response::Ticket { .. } => "ticket answer",
                    Response::Directory { .. } => "directory answer",
                    Response::Peers { .. } => "peers answer",
                    Response::PairId { .. } => "pair-id answer",
                    Response::PairStatus(_) => "pair-status answer",
                    Response::Pairings(_) => "pairings answer",
                }),
            Stream::Notice => Some("Notice"),
        };
        if let Some(kind) = kind {
            if let Some(entry) = self.kinds.get_mut(kind) {
                entry.0 += 1;
                entry.1 += bytes.len() as u64;
            } else {
                self.kinds.insert(kind.to_string(), (1, bytes.len() as u64));
            }
        }
        if self.sc.transport == Transport::Stream {
            self.messages += 1;
            self.bytes += bytes.len() as u64;
            let now = self.now;
            let mtu = self.sc.stream.mtu;
            let id = &mut self.next_conn;
            let conn = self.conns.entry((from, to)).or_insert_with(|| {
                *id += 1;
                crate::stream::Conn::new(*id, now)
            });
            conn.push(now, stream, Arc::new(bytes), mtu);
            self.pump_conn(from, to);
            return;
        }
        self.transmit(from, to, stream, Arc::new(bytes));
    }

    /// Stream transport: sends what the connection's window lets out.
    fn pump_conn(&mut self, from: u32, to: u32) {
        loop {
            let Some(c) = self.conns.get_mut(&(from, to)) else { return };
            let Some((packet, len)) = c.next_to_send() else { return };
            let conn = c.id;
            self.send_packet(from, to, conn, packet, len, 1);
        }
    }

    /// Stream transport: one transmission of a packet, through the network model, with its timer.
    fn send_packet(&mut self, from: u32, to: u32, conn: u32, packet: u32, len: usize, attempt: u32) {
        let now = self.now;
        let Some(c) = self.conns.get_mut(&(from, to)) else { return };
        c.inflight.insert(packet, crate::stream::InFlight { sent_at: now, len, attempt });
        let rto = c.rto(attempt);
        self.stream_stats.0 += 1;
        if attempt > 1 {
            self.stream_stats.1 += 1;
        }
        let sent = self.net.transmit(&mut self.rng, now, from, to, len);
        for &delay in sent.arrive.as_slice() {
            self.push(now + delay, Payload::Packet { to, from, conn, packet });
        }
        let twin = sent.relay.twin;
        for &delay in sent.relay.delays.as_slice() {
            let what = Carried::Packet { conn, packet, len: len as u32 };
            self.push(now + delay, Payload::Relay { to, from, twin, what });
        }
        self.push(now + rto, Payload::PacketTimer { from, to, conn, packet, attempt });
    }

    /// Stream transport: a packet reaches `to`; complete messages are delivered in order and the
    /// packet is acknowledged.
    fn packet_arrived(&mut self, to: u32, from: u32, conn: u32, packet: u32) {
        if !self.up(to) {
            return;
        }
        let now = self.now;
        let Some(c) = self.conns.get_mut(&(from, to)).filter(|c| c.id == conn) else { return };
        let sent_at = c.inflight.get(&packet).map_or(now, |f| f.sent_at);
        let done = c.receive(packet);
        // The acknowledgement takes the packet's own one-way delay back.
        let back = now.saturating_sub(sent_at).max(1);
        self.push(now + back, Payload::Ack { from, to, conn, packet });
        for m in done {
            if tracing::enabled!(tracing::Level::TRACE) {
                let (sid, step, kind) = match m.stream {
                    Stream::Sync => engine::wire::peek(&m.bytes).unwrap_or((0, 0, "?")),
                    Stream::Request(_) => {
                        let request =
                            engine::control::decode::<Request>(&m.bytes, engine::control::CONTROL_MAX);
                        (0, 0, request.map_or("request", |r| r.kind()))
                    }
                    Stream::Response(_) => (0, 0, "response"),
                    Stream::Notice => (0, 0, "notice"),
                };
                // A refused answer says why.
                let refused = match m.stream {
                    Stream::Response(_) => {
                        match engine::control::decode::<Response>(&m.bytes, engine::control::CONTROL_MAX) {
                            Ok(Response::Refused(e)) => format!("{e:?}"),
                            _ => String::new(),
                        }
                    }
                    _ => String::new(),
                };
                tracing::trace!(
                    t_us = now,
                    from,
                    to,
                    sid,
                    step,
                    kind,
                    refused,
                    len = m.bytes.len(),
                    "deliver (stream)"
                );
            }
            self.trace.update(b"deliver");
            self.trace.update(&to.to_le_bytes());
            self.trace.update(&m.bytes);
            self.deliver(to, from, m.stream, &m.bytes);
            self.check_touched(to);
            // Delivering may have crashed `to` or broken the connection.
            if self.conns.get(&(from, to)).is_none_or(|c| c.id != conn) || !self.up(to) {
                return;
            }
        }
    }

    /// Stream transport: a packet's timer. Lost: the window halves and it goes again, unless
    /// the connection made no progress for the idle timeout: then it breaks.
    fn packet_timer(&mut self, from: u32, to: u32, conn: u32, packet: u32, attempt: u32) {
        let now = self.now;
        let idle = self.sc.stream.idle_timeout_ms * 1_000;
        let Some(c) = self.conns.get_mut(&(from, to)).filter(|c| c.id == conn) else { return };
        let Some(f) = c.lost(packet, attempt) else { return };
        if now.saturating_sub(c.progress_at) >= idle {
            tracing::debug!(t_us = now, from, to, conn, "connection broke (idle timeout)");
            self.conns.remove(&(from, to));
            self.stream_stats.2 += 1;
            return;
        }
        self.send_packet(from, to, conn, packet, f.len, attempt + 1);
        self.pump_conn(from, to);
    }

    /// Hands a datagram to the network model and schedules its arriving copies (and the relay's
    /// forwarding of relayed ones).
    fn transmit(&mut self, from: u32, to: u32, stream: Stream, bytes: Arc<Vec<u8>>) {
        self.messages += 1;
        self.bytes += bytes.len() as u64;
        let sent = self.net.transmit(&mut self.rng, self.now, from, to, bytes.len());
        tracing::trace!(
            t_us = self.now,
            from,
            to,
            len = bytes.len(),
            copies = sent.arrive.len(),
            relayed = sent.relay.delays.len(),
            "send"
        );
        for &delay in sent.arrive.as_slice() {
            self.push(
                self.now + delay,
                Payload::Deliver { to, from, tag: Tag::of(stream), bytes: bytes.clone() },
            );
        }
        let twin = sent.relay.twin;
        for &delay in sent.relay.delays.as_slice() {
            let what = Carried::Datagram { tag: Tag::of(stream), bytes: bytes.clone() };
            self.push(self.now + delay, Payload::Relay { to, from, twin, what });
        }
    }

    /// A no-op node's datagram: through the network model, delivered to nobody in particular.
    fn ping(&mut self, from: u32, to: u32) {
        self.messages += 1;
        self.bytes += PING_LEN as u64;
        let sent = self.net.transmit(&mut self.rng, self.now, from, to, PING_LEN);
        for &delay in sent.arrive.as_slice() {
            self.push(self.now + delay, Payload::Ping { to });
        }
        let twin = sent.relay.twin;
        for &delay in sent.relay.delays.as_slice() {
            self.push(self.now + delay, Payload::Relay { to, from, twin, what: Carried::Ping });
        }
    }

    fn write(&mut self, node: u32) {
        let item = crate::net::sample_cdf(&self.zipf_cdf, self.rng.random_range(0..u64::MAX));
        let draw = self.rng.random_range(0..1_000_000);
        let delete = draw < self.sc.workload.delete_ppm;
        let resolve =
            !delete && draw < self.sc.workload.delete_ppm.saturating_add(self.sc.workload.resolve_ppm);
        let folder = self.folder;
        let now = self.now;
        let n = &mut self.nodes[node as usize];
        let clock_ms = n.clock_ms(now);
        let when = When::from_unix_secs(EPOCH_UNIX_SECS + clock_ms.div_euclid(1_000))
            .expect("simulated times are in range");
        let id = ItemId::new(&format!("item-{item}")).expect("generated ids are valid");
        let Host::Device(d) = &mut n.host else { return };
        let content = Arc::new(feedsync::Content {
            attrs: "".into(),
            inner: format!("<title>{} by {} at {}</title>", id, d.endpoint(), now).into(),
            ..feedsync::Content::empty()
        });
        let edit = Edit { content: Some(content), delete, resolve };
        if let Ok(state) = d.write(folder, &id, &when, &edit) {
            if let Some(world) = self.mesh.as_mut() {
                world.write_times.insert(crate::mesh::version_key(&state.version), now);
            }
            self.checker.write(node, &state, now);
        }
        // The write's commit is the checker's `write` above.
        if let Host::Device(d) = &mut self.nodes[node as usize].host {
            while d.poll_persist().is_some() {}
        }
    }

    fn finish(mut self) -> Report {
        // In a peer mesh the cloud only relays: it holds no replica of the feed.
        let first = if self.sc.topology == Topology::Mesh { 1 } else { CLOUD };
        let live: Vec<u32> = (first..=self.sc.devices).filter(|&i| self.up(i) && self.expected(i)).collect();
        let reference = live.first().copied().unwrap_or(CLOUD);
        let digest_of = |sim: &Self, i: u32| sim.replica(i).map_or(0, Replica::digest);
        let digest = digest_of(&self, reference);
        let mut failure = self.violation.take();
        if self.overlay_split {
            failure.get_or_insert_with(|| {
                "overlay: the graph leaves devices that must converge apart (the scenario cannot converge)".into()
            });
        }
        let converged = live.iter().all(|&i| digest_of(&self, i) == digest);
        if !converged {
            let other = live.iter().find(|&&i| digest_of(&self, i) != digest).copied();
            failure = Some(format!(
                "convergence: node {} differs from node {reference}",
                other.unwrap_or_default()
            ));
        }
        if std::env::var_os("FEEDMESH_SIM_DEBUG").is_some() && !converged {
            for &i in &live {
                let neighbors =
                    self.graph.as_ref().map(|g| g.neighbors(i - 1).iter().map(|p| p + 1).collect::<Vec<_>>());
                let known = self.nodes[i as usize].mesh.as_ref().map(|m| m.known.clone());
                eprintln!("node {i}: overlay neighbours {neighbors:?}, known peers {known:?}");
            }
            if let Some(r) = self.replica(reference) {
                for &i in &live {
                    let Some(other) = self.replica(i) else { continue };
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
                    let sessions = match &self.nodes[i as usize].host {
                        Host::Device(d) => d.sessions(),
                        _ => 0,
                    };
                    eprintln!("node {i}: {} items vs {}; sessions open {sessions}", other.len(), r.len());
                }
            }
        }
        for i in 0..=self.sc.devices {
            if let Some(Err(e)) = self.replica(i).map(Replica::check_invariants) {
                failure.get_or_insert(format!("replica invariants: {e}"));
            }
        }
        let finals: Vec<Arc<Item>> =
            self.replica(reference).map(|r| r.items().cloned().collect()).unwrap_or_default();
        // Durability is judged against every live node's final items, not one node's (they are
        // the same when the run converged: each distinct replica state is taken once).
        let mut judged = finals.clone();
        let mut digests = BTreeSet::from([digest]);
        for &i in &live {
            if let Some(r) = self.replica(i).filter(|r| digests.insert(r.digest())) {
                judged.extend(r.items().cloned());
            }
        }
        let conflicts = self.checker.conflicts(&finals);
        let online: Vec<u32> =
            live.iter().copied().filter(|&i| i != CLOUD && !self.offline_for_run.contains(&i)).collect();
        let propagation = self.checker.propagation(&online);
        if self.mesh.as_ref().is_some_and(|w| w.spec.remove_user.is_some()) {
            let keep: Vec<bool> = (0..=self.sc.devices).map(|i| i == CLOUD || self.expected(i)).collect();
            self.faults_applied.writes_cut_off_by_removal =
                self.checker.cut_off(|n| keep.get(n as usize).copied().unwrap_or(false));
        }
        let lost = self.checker.lost_writes(&judged);
        if lost > 0 && failure.is_none() {
            failure = Some(format!(
                "durability: {lost} accepted writes are neither final versions nor in the causal past of one"
            ));
        }
        let (p50, p99, max, unconverged) = self.checker.convergence(&live);
        if unconverged > 0 && failure.is_none() {
            failure = Some(format!("propagation: {unconverged} writes did not reach every live node"));
        }
        let mesh = self.mesh.take().map(|mut world| {
            let mut report = std::mem::take(&mut world.report);
            for (i, n) in self.nodes.iter().enumerate() {
                let Some(m) = &n.mesh else { continue };
                report.removal_known_by += u32::from(m.removal_known_at.is_some());
                if m.role == Role::Forger || m.role == Role::Injected {
                    continue;
                }
                let Some(replica) = self.replica(i as u32) else { continue };
                for item in replica.items() {
                    let forged = crate::mesh::versions(item)
                        .filter(|v| world.forged.contains(&crate::mesh::version_key(v)))
                        .count();
                    if forged > 0 {
                        report.forged_present += forged as u64;
                        failure.get_or_insert(format!(
                            "forgery: node {i} holds a forged version of {}",
                            item.id()
                        ));
                    }
                }
            }
            report.expected_devices = live.len() as u32;
            if report.removed_leaks > 0 {
                failure.get_or_insert(format!(
                    "removal: {} versions reached a removed member after its sender knew",
                    report.removed_leaks
                ));
            }
            report
        });
        self.trace.update(&digest.to_le_bytes());
        let (direct_paths, relayed_paths) = self.net.paths();
        let stats = self.net.stats();
        let applied = &mut self.faults_applied;
        applied.datagrams_partitioned = stats.partitioned;
        applied.datagrams_lost = stats.lost;
        applied.datagrams_duplicated = stats.duplicated;
        applied.datagrams_reordered = stats.reordered;
        applied.punches_failed = stats.punches_failed;
        applied.datagrams_disconnected = stats.disconnected;
        applied.datagrams_unrelayed = stats.unrelayed;
        applied.devices_skewed = self.nodes.iter().skip(1).filter(|n| n.skew_ms != 0).count() as u64;
        applied.devices_drifting = self.nodes.iter().skip(1).filter(|n| n.drift_ppm != 0).count() as u64;
        let inert_faults = self.inert_faults(stats);
        if self.sc.require_faults_act && !inert_faults.is_empty() {
            failure.get_or_insert_with(|| {
                format!("faults: configured but never applied: {}", inert_faults.join(", "))
            });
        }
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
            dropped: self.net.stats().dropped,
            sessions_started: self.sessions_started,
            sessions_failed: self.sessions_failed,
            sessions_failed_by: self.failed_by.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            relayed_paths,
            direct_paths,
            relayed_datagrams: self.net.stats().relayed,
            direct_datagrams: self.net.stats().direct,
            inert_faults,
            propagation,
            conflicts,
            queue_drops: self.net.stats().queue_drops,
            repunches: self.net.stats().repunches,
            hairpinned: self.net.stats().hairpinned,
            departures: self.departures,
            message_kinds: std::mem::take(&mut self.kinds),
            digest: format!("{digest:016x}"),
            trace_hash: self.trace.finalize().to_hex().to_string(),
            failure,
            faults: self.faults_applied,
            packets: self.stream_stats.0,
            packets_retransmitted: self.stream_stats.1,
            connections_broken: self.stream_stats.2,
            mesh,
            timelines: self.checker.timelines(),
            replica_nodes: self.sc.devices + u32::from(first == CLOUD),
        }
    }
}

impl Sim {
    /// The faults the scenario configures that never acted in this run.
    fn inert_faults(&self, stats: crate::net::NetStats) -> Vec<String> {
        let (sc, a) = (&self.sc, &self.faults_applied);
        let f = &sc.faults;
        let mut inert = Vec::new();
        let mut check = |configured: bool, acted: bool, name: &str| {
            if configured && !acted {
                inert.push(name.to_string());
            }
        };
        check(f.crashes_per_min > 0.0, a.device_crashes > 0, "crashes");
        check(f.offline_ppm > 0, a.devices_offline > 0, "offline devices");
        check(f.clock_skew_ms > 0, a.devices_skewed > 0, "clock skew");
        check(f.clock_drift_ppm > 0, a.devices_drifting > 0, "clock drift");
        check(f.churn_per_min > 0.0, self.departures > 0, "churn");
        check(!f.cloud_crashes_ms.is_empty(), a.cloud_crashes > 0, "cloud crashes");
        check(f.crash_before_commit_ppm > 0, a.crashes_before_commit > 0, "crashes before commit");
        check(f.lost_store_ppm > 0, a.stores_lost > 0, "lost stores");
        check(!sc.windows.is_empty(), a.disconnections > 0, "connectivity windows");
        check(f.device_skews_ms.iter().any(|&(_, ms)| ms != 0), a.devices_skewed > 0, "device skews");
        let net = &sc.network;
        check(net.loss_ppm > 0 || net.burst.is_some(), stats.lost > 0, "loss");
        check(net.dup_ppm > 0, stats.duplicated > 0, "duplication");
        check(sc.nat.mapping_timeout_ms > 0, stats.repunches > 0, "NAT mapping timeouts");
        let n = &sc.nat;
        let nats = n.full_cone_ppm + n.restricted_ppm + n.port_restricted_ppm + n.symmetric_ppm > 0;
        check(
            nats && sc.model == NodeModel::Engine,
            stats.direct + stats.relayed > 0,
            "NATs (no device-to-device path crossed one)",
        );
        let drops = self.net.cut_drops();
        for (i, p) in sc.partitions.iter().enumerate() {
            let started = p.at_ms < sc.duration_ms;
            check(true, started && drops.get(&i).is_some_and(|&d| d > 0), &format!("partition {}", i + 1));
        }
        inert
    }
}

/// A failed session's reason, as the report counts it.
fn failure_reason(err: &engine::sync::SyncError) -> &'static str {
    use engine::sync::SyncError;
    match err {
        SyncError::Timeout(_) => "timeout",
        SyncError::Protocol(_) => "protocol",
        SyncError::Aborted(_) => "aborted by the peer",
        SyncError::ConnectionLost => "connection lost",
        SyncError::TooManySymbols(_) => "too many symbols",
        SyncError::Symbols(_) => "bad symbols",
        SyncError::Wire(_) => "wire",
        SyncError::Refused(_) => "refused",
        SyncError::Signature(_) => "refused version",
    }
}

/// Runs a scenario with a seed.
pub fn run(sc: &Scenario, seed: u64, progress: Progress<'_>) -> Report {
    let mut report = Sim::new(sc.clone(), seed).run(progress);
    report.seed = seed;
    report
}

//! Scenarios: what a simulation runs, read from TOML (`netsim/scenarios/*.toml`; the format is
//! documented in `netsim/README.md`). Unknown fields are errors that name the field.

use serde::{Deserialize, Serialize};

/// The embedded default: a few hundred devices, a cloud, LAN groups, a NAT mix, 5% loss and a
/// partition that heals.
pub const DEFAULT: &str = include_str!("../scenarios/default.toml");

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A name for reports.
    #[serde(default = "default_name")]
    pub name: String,
    /// Seed of the run (overridden by `--seed`).
    #[serde(default)]
    pub seed: u64,
    /// Devices (the cloud is extra).
    pub devices: u32,
    /// `star` (every device syncs with the cloud), `mesh` (push-pull gossip with random peers)
    /// or `hybrid` (cloud plus LAN groups).
    #[serde(default = "default_topology")]
    pub topology: Topology,
    /// With `mesh`: the overlay devices gossip over (each tick picks a random neighbour):
    /// `{ kind = "random_regular", degree = D }`, `{ kind = "small_world", k = K, beta_ppm = B }`,
    /// `{ kind = "scale_free", m = M }`, `{ kind = "explicit", edges = [[0, 1], ...] }` (device
    /// indices from 0) or `{ kind = "complete" }`; none means complete.
    #[serde(default)]
    pub graph: Option<crate::topology::GraphSpec>,
    /// Devices per LAN group (hybrid).
    #[serde(default = "default_lan")]
    pub lan_group: u32,
    /// Hybrid: the share of sync ticks (ppm) on which a device syncs with a random device outside
    /// its LAN group, over a hole-punched path or through the relay as their NATs allow (the
    /// rest go half to the cloud, half to a LAN peer). Other topologies ignore it.
    #[serde(default)]
    pub remote_peer_ppm: u32,
    /// Fail the run (check `faults`) when a fault the scenario configures never acted: a
    /// scenario must do what it says. The swarm turns this off and counts such faults instead.
    #[serde(default = "default_true")]
    pub require_faults_act: bool,
    /// Virtual time with writes and faults, then `quiet_ms` without either.
    pub duration_ms: u64,
    #[serde(default = "default_quiet")]
    pub quiet_ms: u64,
    /// Each device starts a sync session this often (plus up to 50% jitter).
    #[serde(default = "default_interval")]
    pub sync_interval_ms: u64,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub nat: Nat,
    #[serde(default)]
    pub faults: Faults,
    #[serde(default)]
    pub partitions: Vec<Partition>,
    /// Connectivity windows per device (see [`Window`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
    /// What the nodes run: `engine` (replicas and sync sessions) or `noop` (each tick sends one
    /// small datagram to the chosen peer and a delivery does nothing: the kernel and network
    /// model alone, for benchmarks).
    #[serde(default)]
    pub model: NodeModel,
    /// Check every touched replica's full invariants after every event (slow; the constant-time
    /// structural checks always run).
    #[serde(default)]
    pub paranoid: bool,
    /// The mesh security model (issue 5): signed replicas, tickets, the verified directory and
    /// authorized sessions, with adversaries. None (or `enabled = false`): plain sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<Mesh>,
    /// How engine messages travel. `datagram` (default): each message is one datagram, lost,
    /// duplicated or queued whole, and the sessions retransmit (0.6 to 2.4 s). `stream`: as over
    /// QUIC in the binaries: a connection per ordered pair of nodes, messages cut into MTU-sized
    /// packets that each meet loss, bandwidth and queues, retransmitted under a congestion
    /// window and delivered reliably and in order; a connection that makes no progress for
    /// `idle_timeout_ms` breaks (what it held is lost) and the next message opens a new one.
    #[serde(default)]
    pub transport: Transport,
    /// `[stream]`: the stream transport's and its sessions' settings.
    #[serde(default)]
    pub stream: StreamSpec,
    /// A bug planted in every node's sync sessions on purpose, to show that the swarm finds it
    /// and the shrinker keeps it (`planted_bug = "cursor-skips-one-change"`). Never in a real
    /// scenario.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planted_bug: Option<engine::sync::PlantedBug>,
}

/// How engine messages travel (see [`Scenario::transport`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Datagram,
    Stream,
}

/// `[stream]`: packets, connections and the sessions above them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// Packet payload, bytes (QUIC's 1200 by default).
    #[serde(default = "default_mtu")]
    pub mtu: usize,
    /// A connection with data outstanding and no packet acknowledged for this long breaks.
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    /// Largest engine message: sessions size their messages to the link (a message must cross
    /// the slowest uplink well within `session_timeout_ms`).
    #[serde(default = "default_stream_message")]
    pub max_message_kb: usize,
    /// The sessions' own timer (the stream is reliable: it only detects a peer that went away
    /// or a broken connection), doubled per retry, three tries.
    #[serde(default = "default_session_timeout")]
    pub session_timeout_ms: u64,
}

impl Default for StreamSpec {
    fn default() -> Self {
        Self {
            mtu: default_mtu(),
            idle_timeout_ms: default_idle(),
            max_message_kb: default_stream_message(),
            session_timeout_ms: default_session_timeout(),
        }
    }
}

fn default_mtu() -> usize {
    1200
}
fn default_idle() -> u64 {
    30_000
}
fn default_stream_message() -> usize {
    1024
}
fn default_session_timeout() -> u64 {
    30_000
}

/// `[mesh]`: devices belong to `users` (device `i` of the non-injected devices, in index order,
/// to user `(i - 1) % users`; user 0 owns the one shared folder, every other user is an active
/// member, every device maps it; the cloud's replica is a device of user 0). Device indices
/// below count from 1 (0 is the cloud).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mesh {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_users")]
    pub users: u32,
    /// Lifetime of the cloud's tickets; each device gets a fresh one every half lifetime.
    #[serde(default = "default_ticket_lifetime")]
    pub ticket_lifetime_ms: u64,
    /// The folder owner (device 1) removes this user (1..users) at `remove_at_ms`.
    #[serde(default)]
    pub remove_user: Option<u32>,
    #[serde(default)]
    pub remove_at_ms: Option<u64>,
    /// Devices that stop refreshing their tickets at `stale_after_ms`.
    #[serde(default)]
    pub stale_tickets: Vec<u32>,
    #[serde(default)]
    pub stale_after_ms: u64,
    /// Member devices that forge versions (another device's name, a signature that does not
    /// verify) every `forge_every_ms` and offer them in their sessions.
    #[serde(default)]
    pub forgers: Vec<u32>,
    #[serde(default = "default_forge_every")]
    pub forge_every_ms: u64,
    /// Devices that present device 1's ticket instead of their own.
    #[serde(default)]
    pub replayers: Vec<u32>,
    /// Devices the cloud makes up: not in the directory, with a cloud-signed ticket for the
    /// folder; they offer a cloud-signed `AddDevice` of themselves into user 0.
    #[serde(default)]
    pub injected: Vec<u32>,
    /// Parts per million of the item-carrying feed messages whose first item the cloud (as the
    /// relay on the path) alters in transit, keeping its signature.
    #[serde(default)]
    pub cloud_tamper_ppm: u32,
    /// Fixed clock offsets `[[device, ms], ...]` (replacing `faults.clock_skew_ms` for them).
    #[serde(default)]
    pub skews_ms: Vec<(u32, i64)>,
    /// Devices that are not in the genesis directory: at `pair_at_ms` each pairs into its user
    /// over the control plane (request with the account's password, the user's first device
    /// answers with its nonce, consent, the first device adds it), maps the folder, and must
    /// converge like the rest.
    #[serde(default)]
    pub late_devices: Vec<u32>,
    #[serde(default = "default_pair_at")]
    pub pair_at_ms: u64,
    /// Extra loss (ppm) on the cloud's notices: a lost notice costs only the wait for the
    /// device's own sync schedule.
    #[serde(default)]
    pub notice_loss_ppm: u32,
}

fn default_pair_at() -> u64 {
    10_000
}

fn default_users() -> u32 {
    3
}
fn default_ticket_lifetime() -> u64 {
    600_000
}
fn default_forge_every() -> u64 {
    5_000
}

impl Mesh {
    /// Devices with an adversary's role (they make no writes and need not converge).
    pub fn adversaries(&self) -> impl Iterator<Item = u32> + '_ {
        self.stale_tickets.iter().chain(&self.forgers).chain(&self.replayers).chain(&self.injected).copied()
    }

    fn validate(&self, devices: u32, model: NodeModel) -> Result<(), ScenarioError> {
        let bad = |field: &'static str, why: &str| Err(ScenarioError::Invalid { field, why: why.into() });
        if model != NodeModel::Engine {
            return bad("mesh.enabled", "the mesh model needs model = \"engine\"");
        }
        if devices > 500 {
            return bad("devices", "at most 500 with the mesh model");
        }
        let lists: [(&'static str, &Vec<u32>); 5] = [
            ("mesh.stale_tickets", &self.stale_tickets),
            ("mesh.forgers", &self.forgers),
            ("mesh.replayers", &self.replayers),
            ("mesh.injected", &self.injected),
            ("mesh.late_devices", &self.late_devices),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (field, list) in lists {
            for &d in list {
                if d < 2 || d > devices {
                    return bad(field, "device indices must be 2..=devices (device 1 owns the folder)");
                }
                if !seen.insert(d) {
                    return bad(field, "a device has at most one adversary role");
                }
            }
        }
        let directory_devices = devices - self.injected.len() as u32;
        if self.users == 0 || self.users > directory_devices {
            return bad("mesh.users", "must be 1..=the devices that are not injected");
        }
        // Each user's first device (the first `users` directory devices) is in the genesis.
        if self.late_devices.iter().any(|&d| d <= self.users + self.injected.len() as u32) {
            return bad("mesh.late_devices", "a late device cannot be a user's first device (index > users)");
        }
        if self.notice_loss_ppm > 1_000_000 {
            return bad("mesh.notice_loss_ppm", "must be at most 1000000");
        }
        if self.ticket_lifetime_ms < 2 || self.ticket_lifetime_ms > 3_600_000 {
            return bad("mesh.ticket_lifetime_ms", "must be 2..=3600000 (the verifiers' maximum)");
        }
        match (self.remove_user, self.remove_at_ms) {
            (Some(u), Some(_)) if u == 0 || u >= self.users => {
                return bad("mesh.remove_user", "must be 1..users (user 0 owns the folder)");
            }
            (Some(_), None) => return bad("mesh.remove_at_ms", "is needed with remove_user"),
            (None, Some(_)) => return bad("mesh.remove_user", "is needed with remove_at_ms"),
            _ => {}
        }
        if self.forge_every_ms == 0 {
            return bad("mesh.forge_every_ms", "must be at least 1");
        }
        if self.cloud_tamper_ppm > 1_000_000 {
            return bad("mesh.cloud_tamper_ppm", "must be at most 1000000");
        }
        for &(d, ms) in &self.skews_ms {
            if d == 0 || d > devices {
                return bad("mesh.skews_ms", "device indices must be 1..=devices");
            }
            if ms.unsigned_abs() > 86_400_000 {
                return bad("mesh.skews_ms", "offsets must be within one day");
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeModel {
    #[default]
    Engine,
    Noop,
}

fn default_name() -> String {
    "unnamed".into()
}
fn default_topology() -> Topology {
    Topology::Hybrid
}
fn default_lan() -> u32 {
    8
}
fn default_quiet() -> u64 {
    60_000
}
fn default_interval() -> u64 {
    2_000
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    Star,
    Mesh,
    Hybrid,
}

/// One-way latency, in milliseconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "dist", rename_all = "lowercase")]
pub enum Latency {
    Constant {
        ms: u64,
    },
    Uniform {
        min_ms: u64,
        max_ms: u64,
    },
    /// Lognormal with the given median and shape `sigma` (of the underlying normal).
    Lognormal {
        median_ms: u64,
        sigma: f64,
    },
    /// Pareto with minimum `min_ms` and tail index `alpha` (heavy tail for alpha near 1).
    Pareto {
        min_ms: u64,
        alpha: f64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Wide-area paths (device to cloud, device to device across the internet).
    #[serde(default = "default_wan")]
    pub wan: Latency,
    /// Within a LAN group.
    #[serde(default = "default_lan_latency")]
    pub lan: Latency,
    /// Loss and duplication per datagram, parts per million (WAN; LAN has none).
    #[serde(default)]
    pub loss_ppm: u32,
    #[serde(default)]
    pub dup_ppm: u32,
    /// Bursty loss (Gilbert-Elliott): each directed wide-area path is in a good state (loss
    /// `loss_ppm`) or a bad one (loss `bad_loss_ppm`), moving good->bad with `p_ppm` and bad->good
    /// with `r_ppm` per datagram.
    #[serde(default)]
    pub burst: Option<Burst>,
    /// Each node's uplink in kilobits per second (0: unlimited), and its send queue in kilobytes:
    /// a datagram waits for the link (serialisation delay) and is dropped when the queue is full.
    #[serde(default)]
    pub bandwidth_kbps: u64,
    #[serde(default = "default_queue")]
    pub queue_kb: u64,
    /// The cloud's uplink (0: unlimited).
    #[serde(default)]
    pub cloud_bandwidth_kbps: u64,
    /// Each device's LAN link in kilobits per second, a link of its own (0: LAN traffic shares
    /// the uplink, as before this field existed).
    #[serde(default)]
    pub lan_bandwidth_kbps: u64,
    /// Devices of one LAN group find each other on the LAN (true), or must go through their
    /// shared NAT's public address, which works only if it hairpins, else through the relay.
    #[serde(default = "default_true")]
    pub lan_discovery: bool,
    /// The cloud relays datagrams between devices that cannot punch a direct path (true), or
    /// does not (false: such pairs cannot talk at all; for experiments).
    #[serde(default = "default_true")]
    pub relay: bool,
}

fn default_queue() -> u64 {
    256
}
fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    pub p_ppm: u32,
    pub r_ppm: u32,
    pub bad_loss_ppm: u32,
}

fn default_wan() -> Latency {
    Latency::Uniform { min_ms: 20, max_ms: 120 }
}
fn default_lan_latency() -> Latency {
    Latency::Uniform { min_ms: 1, max_ms: 3 }
}

impl Default for Network {
    fn default() -> Self {
        Self {
            wan: default_wan(),
            lan: default_lan_latency(),
            loss_ppm: 0,
            dup_ppm: 0,
            burst: None,
            bandwidth_kbps: 0,
            queue_kb: default_queue(),
            cloud_bandwidth_kbps: 0,
            lan_bandwidth_kbps: 0,
            lan_discovery: true,
            relay: true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Writes per device per minute (during `duration_ms`).
    #[serde(default = "default_rate")]
    pub writes_per_min: f64,
    /// Distinct items the writes touch.
    #[serde(default = "default_items")]
    pub items: u32,
    /// Zipf exponent of item popularity; 0 means uniform.
    #[serde(default)]
    pub zipf_s: f64,
    /// Share of writes that are deletes, parts per million.
    #[serde(default)]
    pub delete_ppm: u32,
    /// Share of writes that resolve the item's conflicts (FeedSync 3.4), parts per million.
    #[serde(default)]
    pub resolve_ppm: u32,
}

fn default_rate() -> f64 {
    2.0
}
fn default_items() -> u32 {
    200
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            writes_per_min: default_rate(),
            items: default_items(),
            zipf_s: 0.0,
            delete_ppm: 0,
            resolve_ppm: 0,
        }
    }
}

/// The share of LAN groups behind each kind of NAT (RFC 4787 mapping/filtering), parts per
/// million; the rest have public addresses. The devices of one LAN group share its NAT. Two
/// devices outside one LAN reach each other directly when UDP hole punching through their NATs
/// succeeds, and through the cloud relay otherwise.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nat {
    #[serde(default)]
    pub full_cone_ppm: u32,
    #[serde(default)]
    pub restricted_ppm: u32,
    #[serde(default)]
    pub port_restricted_ppm: u32,
    #[serde(default)]
    pub symmetric_ppm: u32,
    /// Share of NATs that hairpin (forward a packet sent to their own public address back in).
    #[serde(default)]
    pub hairpin_ppm: u32,
    /// A NAT forgets an idle mapping after this long (0: never): the next datagram on that
    /// direct path is dropped and the path is punched again.
    #[serde(default)]
    pub mapping_timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Device crashes per device per minute; a crashed device is down `down_ms` and loses its
    /// volatile state (sessions, cursors), keeping its replica (durable).
    #[serde(default)]
    pub crashes_per_min: f64,
    #[serde(default = "default_down")]
    pub down_ms: u64,
    /// Each device's clock is off by a uniform amount in `[-clock_skew_ms, +clock_skew_ms]`.
    #[serde(default)]
    pub clock_skew_ms: u64,
    /// Share of devices offline for most of the run (back for the quiet phase), ppm.
    #[serde(default)]
    pub offline_ppm: u32,
    /// Each device's clock runs fast or slow by a uniform amount in `[-clock_drift_ppm,
    /// +clock_drift_ppm]` (parts per million of elapsed time), on top of its skew.
    #[serde(default)]
    pub clock_drift_ppm: u32,
    /// Churn: each device leaves about this often per minute of its time online (0: never) and
    /// stays away about `churn_away_ms` (each 0.5-1.5x, uniform); like a crash it loses volatile
    /// state and keeps its replica.
    #[serde(default)]
    pub churn_per_min: f64,
    #[serde(default = "default_away")]
    pub churn_away_ms: u64,
    /// The cloud crashes at these virtual times (ms) and restarts `down_ms` later: its sessions,
    /// address book, pairings and queued notices are lost, its store (directory, replicas) kept,
    /// and its replicas come back under a new epoch. Relayed traffic is lost while it is down.
    #[serde(default)]
    pub cloud_crashes_ms: Vec<u64>,
    /// Per merge a device accepts before `duration_ms` (faults stop there), the chance (ppm)
    /// that it crashes before committing it: the
    /// merge is lost with the device's volatile state, and the device restarts `down_ms` later
    /// from what it had committed.
    #[serde(default)]
    pub crash_before_commit_ppm: u32,
    /// Per device crash, the chance (ppm) that the device's store is lost too: it comes back as a
    /// new endpoint with an empty replica (FeedSync profile: a lost store is a new endpoint).
    /// Writes only that device held are counted as lost by the fault, not by the protocol.
    /// Plain model only (a keyed device that lost its key must be paired again).
    #[serde(default)]
    pub lost_store_ppm: u32,
    /// The share of devices (ppm) whose clock is skewed by `clock_skew_ms` (the rest keep exact
    /// time; default: all).
    #[serde(default = "all_ppm")]
    pub clock_skew_share_ppm: u32,
    /// Fixed clock offsets `[[device, ms], ...]`, replacing the drawn skew of those devices.
    #[serde(default)]
    pub device_skews_ms: Vec<(u32, i64)>,
    /// Offline devices (`offline_ppm`) stay on and keep writing while disconnected, as a laptop
    /// on a plane would; they reconnect for the quiet phase. Default: they are off.
    #[serde(default)]
    pub offline_writes: bool,
    /// The share of devices (ppm) that churn (default: all).
    #[serde(default = "all_ppm")]
    pub churn_share_ppm: u32,
}

fn all_ppm() -> u32 {
    1_000_000
}

impl Default for Faults {
    /// What a scenario with an empty `[faults]` table gets.
    fn default() -> Self {
        Self {
            crashes_per_min: 0.0,
            down_ms: default_down(),
            clock_skew_ms: 0,
            offline_ppm: 0,
            clock_drift_ppm: 0,
            churn_per_min: 0.0,
            churn_away_ms: default_away(),
            cloud_crashes_ms: Vec::new(),
            crash_before_commit_ppm: 0,
            lost_store_ppm: 0,
            clock_skew_share_ppm: all_ppm(),
            device_skews_ms: Vec::new(),
            offline_writes: false,
            churn_share_ppm: all_ppm(),
        }
    }
}

/// `[[windows]]`: a device connected only within its windows during the write phase (always in
/// the quiet phase); it stays on and keeps writing while disconnected.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub device: u32,
    /// `[[from_ms, to_ms], ...]`, in order, not overlapping.
    pub online_ms: Vec<(u64, u64)>,
}

fn default_away() -> u64 {
    30_000
}

fn default_down() -> u64 {
    5_000
}

/// A partition from `at_ms` to `heal_ms`. Devices are numbered 1..=devices; the cloud is 0.
/// - `split` (default): the first `share_ppm` of devices are cut off from everyone else (the
///   cloud included), both ways;
/// - `oneway`: the same side, but only its packets to the rest are lost (asymmetric);
/// - `ring`: devices form `groups` consecutive groups in a ring (the cloud joins group 0); a
///   packet passes only within a group or to an adjacent group;
/// - `bridge`: two halves (the first `share_ppm` of devices, and the rest with the cloud) joined
///   only through the last `bridges` devices of the first half, which reach both.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub at_ms: u64,
    pub heal_ms: u64,
    #[serde(default)]
    pub kind: PartitionKind,
    /// The first `share_ppm` of devices form the cut-off side (`split`, `oneway`, `bridge`).
    #[serde(default)]
    pub share_ppm: u32,
    /// Groups of a `ring` (at least 3).
    #[serde(default)]
    pub groups: u32,
    /// Bridge devices of a `bridge` (at least 1).
    #[serde(default)]
    pub bridges: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionKind {
    #[default]
    Split,
    Oneway,
    Ring,
    Bridge,
}

/// A scenario error, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{0}")]
    Parse(String),
    #[error("invalid value for `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse(e.to_string()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    pub fn default_scenario() -> Self {
        // The embedded default is tested to parse.
        Self::parse(DEFAULT).unwrap_or_else(|e| panic!("embedded default scenario: {e}"))
    }

    fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |field: &'static str, why: &str| Err(ScenarioError::Invalid { field, why: why.into() });
        if self.devices == 0 || self.devices > 100_000 {
            return bad("devices", "must be 1..=100000");
        }
        if self.duration_ms == 0 || self.duration_ms > 86_400_000 {
            return bad("duration_ms", "must be 1..=86400000");
        }
        if self.quiet_ms > 86_400_000 {
            return bad("quiet_ms", "must be at most 86400000");
        }
        if self.sync_interval_ms < 10 {
            return bad("sync_interval_ms", "must be at least 10");
        }
        if let Some(graph) = &self.graph {
            if self.topology != Topology::Mesh {
                return bad("graph", "only a mesh topology gossips over a graph");
            }
            if *graph != crate::topology::GraphSpec::Complete {
                use rand::SeedableRng as _;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
                if let Err(e) = graph.build(self.devices, &mut rng) {
                    return Err(ScenarioError::Invalid { field: "graph", why: e.to_string() });
                }
            }
        }
        if self.remote_peer_ppm > 1_000_000 {
            return bad("remote_peer_ppm", "must be at most 1000000");
        }
        if self.lan_group == 0 {
            return bad("lan_group", "must be at least 1");
        }
        for (field, latency) in [("network.wan", &self.network.wan), ("network.lan", &self.network.lan)] {
            match latency {
                Latency::Uniform { min_ms, max_ms } if min_ms > max_ms => {
                    return bad(field, "min_ms is above max_ms");
                }
                Latency::Lognormal { sigma, .. } if !(0.0..=3.0).contains(sigma) => {
                    return bad(field, "sigma must be 0..=3");
                }
                Latency::Pareto { alpha, .. } if !(0.5..=10.0).contains(alpha) => {
                    return bad(field, "alpha must be 0.5..=10");
                }
                _ => {}
            }
        }
        if self.network.loss_ppm >= 1_000_000 {
            return bad("network.loss_ppm", "must be below 1000000");
        }
        if let Some(b) = &self.network.burst {
            if b.p_ppm > 1_000_000 || b.r_ppm == 0 || b.r_ppm > 1_000_000 || b.bad_loss_ppm > 1_000_000 {
                return bad(
                    "network.burst",
                    "p_ppm and bad_loss_ppm must be at most 1000000, r_ppm 1..=1000000",
                );
            }
        }
        if self.network.dup_ppm >= 1_000_000 {
            return bad("network.dup_ppm", "must be below 1000000");
        }
        if !(0.0..=1000.0).contains(&self.workload.writes_per_min) {
            return bad("workload.writes_per_min", "must be 0..=1000");
        }
        if self.workload.items == 0 {
            return bad("workload.items", "must be at least 1");
        }
        if u64::from(self.workload.delete_ppm) + u64::from(self.workload.resolve_ppm) > 1_000_000 {
            return bad("workload.resolve_ppm", "delete_ppm plus resolve_ppm is over 1000000");
        }
        if !(0.0..=5.0).contains(&self.workload.zipf_s) {
            return bad("workload.zipf_s", "must be 0..=5");
        }
        let nat = &self.nat;
        let total = u64::from(nat.full_cone_ppm)
            + u64::from(nat.restricted_ppm)
            + u64::from(nat.port_restricted_ppm)
            + u64::from(nat.symmetric_ppm);
        if total > 1_000_000 {
            return bad("nat", "shares add up to more than 1000000 ppm");
        }
        if !(0.0..=60.0).contains(&self.faults.crashes_per_min) {
            return bad("faults.crashes_per_min", "must be 0..=60");
        }
        for p in &self.partitions {
            if p.heal_ms < p.at_ms {
                return bad("partitions.heal_ms", "is before at_ms");
            }
            if p.share_ppm > 1_000_000 {
                return bad("partitions.share_ppm", "must be at most 1000000");
            }
            match p.kind {
                PartitionKind::Ring if p.groups < 3 || p.groups > self.devices => {
                    return bad("partitions.groups", "a ring needs 3 to `devices` groups");
                }
                PartitionKind::Bridge if p.bridges == 0 => {
                    return bad("partitions.bridges", "a bridge needs at least 1 bridge device");
                }
                PartitionKind::Bridge
                    if u64::from(p.bridges)
                        > u64::from(self.devices) * u64::from(p.share_ppm) / 1_000_000 =>
                {
                    return bad("partitions.bridges", "more bridges than devices on the first side");
                }
                _ => {}
            }
        }
        if self.nat.hairpin_ppm > 1_000_000 {
            return bad("nat.hairpin_ppm", "must be at most 1000000");
        }
        if self.network.queue_kb == 0 {
            return bad("network.queue_kb", "must be at least 1");
        }
        if self.faults.clock_drift_ppm > 100_000 {
            return bad("faults.clock_drift_ppm", "must be at most 100000 (10%)");
        }
        if !(0.0..=60.0).contains(&self.faults.churn_per_min) {
            return bad("faults.churn_per_min", "must be 0..=60");
        }
        if !(256..=65_536).contains(&self.stream.mtu) {
            return bad("stream.mtu", "must be 256..=65536 bytes");
        }
        if self.stream.idle_timeout_ms == 0 || self.stream.session_timeout_ms == 0 {
            return bad("stream", "idle_timeout_ms and session_timeout_ms must be at least 1");
        }
        if !(16..=1024).contains(&self.stream.max_message_kb) {
            return bad("stream.max_message_kb", "must be 16..=1024 (the engine's limit is 1 MiB)");
        }
        if self.faults.cloud_crashes_ms.iter().any(|&at| at >= self.duration_ms) {
            return bad("faults.cloud_crashes_ms", "every crash must be before duration_ms");
        }
        if self.faults.crash_before_commit_ppm > 1_000_000 || self.faults.lost_store_ppm > 1_000_000 {
            return bad("faults", "crash_before_commit_ppm and lost_store_ppm are at most 1000000");
        }
        if self.faults.lost_store_ppm > 0 && self.mesh.as_ref().is_some_and(|m| m.enabled) {
            return bad(
                "faults.lost_store_ppm",
                "only without [mesh]: a keyed device that lost its key must be paired again",
            );
        }
        if self.faults.clock_skew_share_ppm > 1_000_000 || self.faults.churn_share_ppm > 1_000_000 {
            return bad("faults", "clock_skew_share_ppm and churn_share_ppm are at most 1000000");
        }
        for &(d, ms) in &self.faults.device_skews_ms {
            if d == 0 || d > self.devices {
                return bad("faults.device_skews_ms", "device indices must be 1..=devices");
            }
            if ms.unsigned_abs() > 86_400_000 {
                return bad("faults.device_skews_ms", "offsets must be within one day");
            }
        }
        for w in &self.windows {
            if w.device == 0 || w.device > self.devices {
                return bad("windows.device", "device indices must be 1..=devices");
            }
            if w.online_ms.iter().any(|&(from, to)| from > to)
                || w.online_ms.windows(2).any(|pair| pair[0].1 > pair[1].0)
            {
                return bad(
                    "windows.online_ms",
                    "windows must be [from, to] with from <= to, in order, not overlapping",
                );
            }
        }
        if self.faults.churn_per_min > 0.0 && self.faults.churn_away_ms == 0 {
            return bad("faults.churn_away_ms", "must be at least 1 with churn");
        }
        if let Some(mesh) = self.mesh.as_ref().filter(|m| m.enabled) {
            mesh.validate(self.devices, self.model)?;
        }
        Ok(())
    }
}

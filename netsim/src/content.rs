//! Live Folders' content in the simulator: one file written on one device and fetched by every
//! other device and by the cloud (a `cloud` folder), each an engine [`Device`] whose content
//! scheduler ([`engine::folder::Fetcher`], driven through [`Device::want_content`],
//! [`Device::poll_content`] and the device's timers, as the node drives it) runs over the network
//! model: LAN groups behind NATs, hole punching or
//! the relay, uplinks with bandwidth and queues, the cloud's uplink.
//!
//! The experiment of issue 14 (item 6): how long until a large file written on one device is on
//! every device of its LAN group and on the devices elsewhere, choosing sources nearest first
//! (LAN, direct, relayed, cloud) against "any source" (as Live Mesh did) and "cloud only". The
//! model is at the level of chunk groups (16 KiB): a request is a small message to the source,
//! which serves the requests it holds round robin, one group at a time, each when its link (the
//! uplink, or the LAN link) has sent the previous one, as a QUIC sender with one stream per
//! request would; each group travels as one datagram of the network model (a relayed one books
//! the cloud's uplink too), a lost one is sent again after [`RTO_US`]; a cancel stops what the
//! source has not sent yet. A device becomes a holder when it has the whole file and the cloud
//! tells every device so after `notice_ms` (holders of partial files are not modelled).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use engine::device::{Device, DeviceConfig, Identity, OPEN_FOLDER};
use engine::directory::Directory;
use engine::feedsync::Endpoint;
use engine::folder::fetch::{Command, Event, FetchConfig, Policy, RequestId, Route, GROUP_BYTES};
use engine::folder::ContentHash;
use rand::SeedableRng as _;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::net::{Net, PathKind};
use crate::queue::CalendarQueue;
use crate::scenario::{self, Network};

/// A lost datagram (group, request) is sent again after this long.
pub const RTO_US: u64 = 250_000;
/// Most devices in a content experiment.
pub const DEVICES_MAX: u32 = 10_000;
/// Largest simulated file, in MiB.
pub const FILE_MIB_MAX: u64 = 64 * 1024;
/// Bytes of a request message (its header; the groups come back).
const REQUEST_BYTES: usize = 96;

/// A content experiment (TOML; see `netsim/experiments/content.toml`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentScenario {
    pub name: String,
    pub seed: u64,
    /// The file's size, in MiB.
    pub file_mib: u64,
    /// Devices per LAN group; the writer (device 1) is in group 0 with `lan_group - 1` others.
    pub lan_group: u32,
    /// Devices outside the writer's LAN group (in groups of `lan_group`).
    pub elsewhere: u32,
    /// How long after a device has the whole file every device knows it holds it.
    #[serde(default = "default_notice")]
    pub notice_ms: u64,
    /// While a device fetches, it tells the others (through the cloud, `notice_ms` later) which
    /// groups it holds this often, so they can fetch those from it (0: never; holders of the
    /// whole file only).
    #[serde(default = "default_announce")]
    pub announce_ms: u64,
    /// Simulated time after which a run stops, done or not.
    pub limit_s: u64,
    /// The policies to compare, in the report's order.
    #[serde(default = "all_policies")]
    pub policies: Vec<PolicyName>,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub nat: scenario::Nat,
}

fn default_notice() -> u64 {
    200
}

fn default_announce() -> u64 {
    1_000
}

fn all_policies() -> Vec<PolicyName> {
    vec![PolicyName::Nearest, PolicyName::Any, PolicyName::CloudOnly]
}

/// A source-choice policy, by name (the engine's [`Policy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    Nearest,
    Any,
    CloudOnly,
}

impl PolicyName {
    fn policy(self) -> Policy {
        match self {
            PolicyName::Nearest => Policy::Nearest,
            PolicyName::Any => Policy::Any,
            PolicyName::CloudOnly => Policy::CloudOnly,
        }
    }
}

/// Why an experiment cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    #[error("{devices} devices: at least 2 and at most {max}", max = DEVICES_MAX)]
    Devices { devices: u64 },
    #[error("file_mib = {mib}: at least 1 and at most {max}", max = FILE_MIB_MAX)]
    FileSize { mib: u64 },
    #[error("lan_group must be at least 1")]
    LanGroup,
    #[error("no policy to run")]
    NoPolicy,
}

/// One policy's run.
#[derive(Clone, Debug, Serialize)]
pub struct ContentRun {
    pub policy: PolicyName,
    /// When every device of the writer's LAN group had the file (seconds of simulated time).
    pub lan_group_done_s: Option<f64>,
    /// When every device outside it had the file.
    pub elsewhere_done_s: Option<f64>,
    /// When the cloud had it.
    pub cloud_done_s: Option<f64>,
    /// The median device (the writer excluded).
    pub median_done_s: Option<f64>,
    /// Per device, device 2 first (the writer has it at 0).
    pub done_s: Vec<Option<f64>>,
    /// Bytes of chunk groups delivered, by the route they came by (duplicates included).
    pub bytes_by_route: BTreeMap<String, u64>,
    /// Bytes the writer sent, and bytes the cloud sent (its copy and relayed traffic).
    pub writer_sent_bytes: u64,
    pub cloud_sent_bytes: u64,
    /// Requests cancelled as stalled, and datagrams sent again after a loss.
    pub stalls: u64,
    pub resent: u64,
    pub events: u64,
}

/// The experiment's report.
#[derive(Clone, Debug, Serialize)]
pub struct ContentReport {
    pub name: String,
    pub seed: u64,
    pub file_bytes: u64,
    pub devices: u32,
    pub lan_group: u32,
    /// How many device pairs reach each other directly, through the relay, or on a LAN.
    pub pairs_lan: u64,
    pub pairs_direct: u64,
    pub pairs_relayed: u64,
    pub runs: Vec<ContentRun>,
}

/// Runs every policy of `sc` on the same network (same seed, same NATs).
pub fn run(sc: &ContentScenario) -> Result<ContentReport, ContentError> {
    let devices = u64::from(sc.lan_group) + u64::from(sc.elsewhere);
    if sc.lan_group == 0 {
        return Err(ContentError::LanGroup);
    }
    if !(2..=u64::from(DEVICES_MAX)).contains(&devices) {
        return Err(ContentError::Devices { devices });
    }
    if !(1..=FILE_MIB_MAX).contains(&sc.file_mib) {
        return Err(ContentError::FileSize { mib: sc.file_mib });
    }
    if sc.policies.is_empty() {
        return Err(ContentError::NoPolicy);
    }
    let devices = devices as u32;
    let net = network(sc, devices);
    let (mut lan, mut direct, mut relayed) = (0, 0, 0);
    for a in 1..=devices {
        for b in a + 1..=devices {
            match net.path_kind(a, b) {
                Some(PathKind::Lan) => lan += 1,
                Some(PathKind::Direct) => direct += 1,
                Some(PathKind::Relayed) => relayed += 1,
                _ => {}
            }
        }
    }
    // One thread per policy: the worlds share nothing, so the report is the same as one by one.
    let runs = std::thread::scope(|scope| {
        let handles: Vec<_> = sc
            .policies
            .iter()
            .map(|&policy| scope.spawn(move || World::new(sc, devices, policy).run()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    Ok(ContentReport {
        name: sc.name.clone(),
        seed: sc.seed,
        file_bytes: sc.file_mib << 20,
        devices,
        lan_group: sc.lan_group,
        pairs_lan: lan,
        pairs_direct: direct,
        pairs_relayed: relayed,
        runs,
    })
}

/// The report as a readable table.
pub fn table(report: &ContentReport) -> String {
    use std::fmt::Write as _;
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let secs = |s: Option<f64>| s.map_or_else(|| "not done".to_string(), |s| format!("{s:.1} s"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "content experiment {:?} (seed {}): a {:.0} MiB file written on device 1; {} devices, LAN groups of {}",
        report.name,
        report.seed,
        mib(report.file_bytes),
        report.devices,
        report.lan_group
    );
    let _ = writeln!(
        out,
        "device pairs: {} on a LAN, {} direct (hole punched), {} relayed",
        report.pairs_lan, report.pairs_direct, report.pairs_relayed
    );
    let _ = writeln!(
        out,
        "{:<11} {:>10} {:>10} {:>10} {:>10} | MiB by route: {:>8} {:>8} {:>8} {:>8} | {:>11} {:>10} {:>6}",
        "policy",
        "LAN group",
        "elsewhere",
        "median",
        "cloud",
        "lan",
        "direct",
        "relayed",
        "cloud",
        "writer sent",
        "cloud sent",
        "stalls"
    );
    for run in &report.runs {
        let route = |name: &str| mib(run.bytes_by_route.get(name).copied().unwrap_or(0));
        let _ = writeln!(
            out,
            "{:<11} {:>10} {:>10} {:>10} {:>10} | {:>21.0} {:>8.0} {:>8.0} {:>8.0} | {:>11.0} {:>10.0} {:>6}",
            format!("{:?}", run.policy).to_lowercase(),
            secs(run.lan_group_done_s),
            secs(run.elsewhere_done_s),
            secs(run.median_done_s),
            secs(run.cloud_done_s),
            route("lan"),
            route("direct"),
            route("relayed"),
            route("cloud"),
            mib(run.writer_sent_bytes),
            mib(run.cloud_sent_bytes),
            run.stalls
        );
    }
    out
}

/// The network of `sc`: one NAT per LAN group, drawn from the seed alone, so every policy runs
/// on the same one.
fn network(sc: &ContentScenario, devices: u32) -> Net {
    let mut rng = ChaCha8Rng::seed_from_u64(sc.seed);
    let groups = devices.div_ceil(sc.lan_group);
    let nats = crate::net::group_nats(&sc.nat, groups, &mut rng);
    Net::new(sc.network.clone(), devices, sc.lan_group, nats, false, sc.nat.mapping_timeout_ms)
}

/// What happens at an instant.
#[derive(Clone, Debug)]
enum Ev {
    /// The file's metadata reaches `device`: it wants the file from the writer.
    Want {
        device: u32,
    },
    /// A request reaches its source.
    Request {
        source: u32,
        client: u32,
        id: RequestId,
        groups: (u64, u64),
    },
    /// A cancel reaches the source.
    Cancel {
        source: u32,
        client: u32,
        id: RequestId,
    },
    /// The source's link (`lan` or the uplink) has sent what was booked: the next group goes.
    Tick {
        source: u32,
        lan: bool,
    },
    /// A chunk group reaches its client.
    Group {
        client: u32,
        source: u32,
        id: RequestId,
        group: u64,
    },
    /// A relayed datagram reaches the cloud, to go on to `to`.
    AtRelay {
        to: u32,
        len: usize,
        twin: u32,
        then: Box<Ev>,
    },
    /// A datagram that was lost is sent again.
    Resend {
        from: u32,
        to: u32,
        len: usize,
        then: Box<Ev>,
    },
    /// The cloud's notice that `holder` has the file reaches `device`.
    Holder {
        device: u32,
        holder: u32,
    },
    /// Time for `device` to announce what it holds.
    Announce {
        device: u32,
    },
    /// The cloud's notice that `holder` holds the groups `runs` reaches `device`.
    HolderRuns {
        device: u32,
        holder: u32,
        runs: std::sync::Arc<[std::ops::Range<u64>]>,
    },
    Timer {
        device: u32,
    },
}

struct World {
    sc: ContentScenario,
    policy: PolicyName,
    devices: u32,
    size: u64,
    hash: ContentHash,
    net: Net,
    rng: ChaCha8Rng,
    queue: CalendarQueue<Ev>,
    seq: u64,
    now: u64,
    /// Node 0 is the cloud; the writer (1) has none (it only serves). Each fetches into the
    /// open folder.
    roles: Vec<Option<Device<u32>>>,
    timer_at: Vec<Option<u64>>,
    done_at: Vec<Option<u64>>,
    /// Cancels that reached their source before the request did.
    cancelled: BTreeSet<(u32, RequestId)>,
    /// Where each request in flight went (to send its cancel there).
    request_source: BTreeMap<(u32, RequestId), u32>,
    /// Per node and link (uplink, LAN link): the requests it serves, round robin.
    serving: Vec<[VecDeque<Serve>; 2]>,
    ticking: Vec<[bool; 2]>,
    bytes_by_route: BTreeMap<String, u64>,
    sent: Vec<u64>,
    stalls: u64,
    resent: u64,
    events: u64,
}

/// A request a source is serving: the groups `next..end` are still to send.
#[derive(Clone, Debug)]
struct Serve {
    client: u32,
    id: RequestId,
    next: u64,
    end: u64,
}

const WRITER: u32 = 1;
const CLOUD: u32 = 0;

impl World {
    fn new(sc: &ContentScenario, devices: u32, policy: PolicyName) -> Self {
        let net = network(sc, devices);
        let size = sc.file_mib << 20;
        let mut roles: Vec<Option<Device<u32>>> = Vec::with_capacity(devices as usize + 1);
        for node in 0..=devices {
            if node == WRITER {
                roles.push(None);
                continue;
            }
            // The cloud takes the file from whoever has it; devices by the policy.
            let policy = if node == CLOUD { Policy::Any } else { policy.policy() };
            let content = FetchConfig { policy, spread: u64::from(node), ..FetchConfig::default() };
            let cfg = DeviceConfig { content: content.into(), ..DeviceConfig::default() };
            // Invariant: a name of digits is a valid endpoint.
            let name = Endpoint::new(&format!("n{node}")).expect("a valid endpoint name");
            let mut device = Device::new(Identity::Open(name), None, Directory::new(), Vec::new(), 0, cfg);
            for peer in 0..=devices {
                if peer == node {
                    continue;
                }
                let route = match net.path_kind(node, peer) {
                    Some(PathKind::Lan) => Some(Route::Lan),
                    // The cloud's own copy; and a device seen from the cloud is an upload.
                    Some(PathKind::Cloud) if peer == CLOUD => Some(Route::Cloud),
                    Some(PathKind::Cloud) | Some(PathKind::Direct) => Some(Route::Direct),
                    Some(PathKind::Relayed) => Some(Route::Relayed),
                    None => None,
                };
                // Invariant: fewer peers than SOURCES_MAX (DEVICES_MAX is below it).
                let _ = device.handle_content_route(0, OPEN_FOLDER, peer, route);
            }
            roles.push(Some(device));
        }
        let mut done_at = vec![None; devices as usize + 1];
        done_at[WRITER as usize] = Some(0);
        Self {
            sc: sc.clone(),
            policy,
            devices,
            size,
            hash: ContentHash::of(format!("{} {}", sc.name, sc.seed).as_bytes()),
            net,
            // Its own stream: the policies see the same network and the same draws.
            rng: ChaCha8Rng::seed_from_u64(sc.seed ^ 0xc0_47e4_7000),
            queue: CalendarQueue::new(),
            seq: 0,
            now: 0,
            roles,
            timer_at: vec![None; devices as usize + 1],
            done_at,
            cancelled: BTreeSet::new(),
            request_source: BTreeMap::new(),
            serving: (0..=devices).map(|_| [VecDeque::new(), VecDeque::new()]).collect(),
            ticking: vec![[false; 2]; devices as usize + 1],
            bytes_by_route: BTreeMap::new(),
            sent: vec![0; devices as usize + 1],
            stalls: 0,
            resent: 0,
            events: 0,
        }
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(at, self.seq, ev);
    }

    fn run(mut self) -> ContentRun {
        let notice_us = self.sc.notice_ms * 1_000;
        for device in 0..=self.devices {
            if device != WRITER {
                self.push(notice_us, Ev::Want { device });
                if self.sc.announce_ms > 0 && device != CLOUD {
                    self.push(notice_us + self.sc.announce_ms * 1_000, Ev::Announce { device });
                }
            }
        }
        let limit_us = self.sc.limit_s.saturating_mul(1_000_000);
        // Bound: the queue holds what the file's groups, requests and timers make, and the run
        // stops at `limit_s` of simulated time.
        while let Some(entry) = self.queue.pop() {
            if entry.time > limit_us || self.done_at.iter().all(Option::is_some) {
                break;
            }
            self.now = entry.time;
            self.events += 1;
            self.handle(entry.value);
        }
        self.report()
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Want { device } => {
                let (hash, size) = (self.hash, self.size);
                if let Some(d) = self.role(device) {
                    // Invariant: one file, under FILE_BYTES_MAX (FILE_MIB_MAX is below it).
                    let _ = d.want_content(now, OPEN_FOLDER, hash, size, &[], &[WRITER]);
                }
                self.drain(device);
            }
            Ev::Request { source, client, id, groups } => {
                if self.cancelled.remove(&(client, id)) {
                    return;
                }
                let lan = self.lan_link(source, client);
                self.serving[source as usize][lan as usize].push_back(Serve {
                    client,
                    id,
                    next: groups.0,
                    end: groups.1,
                });
                if !self.ticking[source as usize][lan as usize] {
                    self.ticking[source as usize][lan as usize] = true;
                    self.push(now, Ev::Tick { source, lan });
                }
            }
            Ev::Cancel { source, client, id } => {
                let mut found = false;
                for queue in self.serving[source as usize].iter_mut() {
                    let before = queue.len();
                    queue.retain(|s| (s.client, s.id) != (client, id));
                    found |= queue.len() != before;
                }
                if !found {
                    // Bound: one entry per cancel of a request still on its way (removed when
                    // it arrives); a cancel of a request served to its end finds nothing and
                    // is dropped by the request's absence, as its entry is never looked up.
                    self.cancelled.insert((client, id));
                }
            }
            Ev::Tick { source, lan } => {
                let queue = &mut self.serving[source as usize][lan as usize];
                let Some(mut serve) = queue.pop_front() else {
                    self.ticking[source as usize][lan as usize] = false;
                    return;
                };
                let (client, id, group) = (serve.client, serve.id, serve.next);
                serve.next += 1;
                if serve.next < serve.end {
                    queue.push_back(serve);
                }
                let len = self.group_len(group);
                self.send(source, client, len, Ev::Group { client, source, id, group });
                if self.serving[source as usize][lan as usize].is_empty() {
                    self.ticking[source as usize][lan as usize] = false;
                } else {
                    let at = self.net.link_free_at(source, lan).max(now);
                    self.push(at, Ev::Tick { source, lan });
                }
            }
            Ev::Group { client, source, id, group } => {
                let route = match self.net.path_kind(client, source) {
                    Some(PathKind::Lan) => "lan",
                    Some(PathKind::Cloud) if source == CLOUD => "cloud",
                    Some(PathKind::Cloud) | Some(PathKind::Direct) => "direct",
                    _ => "relayed",
                };
                *self.bytes_by_route.entry(route.to_string()).or_default() += self.group_len(group) as u64;
                if let Some(d) = self.role(client) {
                    d.handle_content_groups(now, OPEN_FOLDER, id, group..group + 1);
                }
                self.drain(client);
            }
            Ev::AtRelay { to, len, twin, then } => {
                let copies = self.net.forward(&mut self.rng, now, to, len, twin);
                self.sent[CLOUD as usize] += len as u64;
                match copies.as_slice().iter().min() {
                    Some(&delay) => self.push(now + delay, *then),
                    None if twin == 0 => self.push(now + RTO_US, Ev::Resend { from: CLOUD, to, len, then }),
                    None => {}
                }
            }
            Ev::Resend { from, to, len, then } => {
                self.resent += 1;
                self.send(from, to, len, *then);
            }
            Ev::Holder { device, holder } => {
                let hash = self.hash;
                if let Some(d) = self.role(device) {
                    d.handle_content_holder(now, OPEN_FOLDER, holder, hash);
                }
                self.drain(device);
            }
            Ev::Announce { device } => {
                let hash = self.hash;
                let Some(runs) = self.role(device).and_then(|d| d.content(OPEN_FOLDER)?.have(&hash)) else {
                    return;
                };
                if !runs.is_empty() {
                    let runs: std::sync::Arc<[std::ops::Range<u64>]> = runs.into();
                    let at = now + self.sc.notice_ms * 1_000;
                    for other in 0..=self.devices {
                        if other != device && other != WRITER && self.done_at[other as usize].is_none() {
                            self.push(
                                at,
                                Ev::HolderRuns { device: other, holder: device, runs: runs.clone() },
                            );
                        }
                    }
                }
                self.push(now + self.sc.announce_ms * 1_000, Ev::Announce { device });
            }
            Ev::HolderRuns { device, holder, runs } => {
                let hash = self.hash;
                if let Some(d) = self.role(device) {
                    // Invariant: the runs are a scheduler's own (ascending, inside the file).
                    let _ = d.handle_content_holder_runs(now, OPEN_FOLDER, holder, hash, &runs);
                }
                self.drain(device);
            }
            Ev::Timer { device } => {
                self.timer_at[device as usize] = None;
                if let Some(d) = self.role(device) {
                    d.handle_timeout(now);
                }
                self.drain(device);
            }
        }
    }

    fn role(&mut self, device: u32) -> Option<&mut Device<u32>> {
        self.roles.get_mut(device as usize).and_then(Option::as_mut)
    }

    /// Whether `from` sends to `to` on its LAN link (else its uplink).
    fn lan_link(&self, from: u32, to: u32) -> bool {
        self.sc.network.lan_discovery && self.net.path_kind(from, to) == Some(PathKind::Lan)
    }

    fn group_len(&self, group: u64) -> usize {
        ((group + 1) * GROUP_BYTES).min(self.size).saturating_sub(group * GROUP_BYTES) as usize
    }

    /// One datagram `from` -> `to`: its first arriving copy delivers `then`; a lost one is sent
    /// again after [`RTO_US`].
    fn send(&mut self, from: u32, to: u32, len: usize, then: Ev) {
        let now = self.now;
        self.sent[from as usize] += len as u64;
        let sent = self.net.transmit(&mut self.rng, now, from, to, len);
        if let Some(&delay) = sent.arrive.as_slice().iter().min() {
            self.push(now + delay, then);
        } else if let Some(&delay) = sent.relay.delays.as_slice().iter().min() {
            let twin = if sent.relay.delays.len() > 1 { sent.relay.twin } else { 0 };
            self.push(now + delay, Ev::AtRelay { to, len, twin, then: Box::new(then) });
        } else {
            self.push(now + RTO_US, Ev::Resend { from, to, len, then: Box::new(then) });
        }
    }

    /// Carries out what `device`'s scheduler asks for, records what it reports, arms its timer.
    fn drain(&mut self, device: u32) {
        let now = self.now;
        let mut commands = Vec::new();
        let mut events = Vec::new();
        let mut timeout = None;
        if let Some(d) = self.role(device) {
            while let Some(command) = d.poll_content(OPEN_FOLDER) {
                commands.push(command);
            }
            while let Some(event) = d.poll_content_event(OPEN_FOLDER) {
                events.push(event);
            }
            timeout = d.poll_timeout();
        }
        for command in commands {
            match command {
                Command::Request(r) => {
                    self.request_source.insert((device, r.id), r.peer);
                    let ev = Ev::Request {
                        source: r.peer,
                        client: device,
                        id: r.id,
                        groups: (r.groups.start, r.groups.end),
                    };
                    self.send(device, r.peer, REQUEST_BYTES, ev);
                }
                // Groups already sent still come (and are dropped by the scheduler).
                Command::Cancel(id) => {
                    let source = self.request_source.remove(&(device, id));
                    if let Some(source) = source {
                        self.send(device, source, REQUEST_BYTES, Ev::Cancel { source, client: device, id });
                    }
                }
            }
        }
        for event in events {
            match event {
                Event::Done { .. } => {
                    self.done_at[device as usize] = Some(now);
                    let notice = now + self.sc.notice_ms * 1_000;
                    for other in 0..=self.devices {
                        if other != device && other != WRITER {
                            self.push(notice, Ev::Holder { device: other, holder: device });
                        }
                    }
                }
                Event::Stalled { .. } => self.stalls += 1,
                Event::Corrupt { .. } => {}
            }
        }
        if let Some(at) = timeout {
            let at = at.max(now);
            if self.timer_at[device as usize].is_none_or(|armed| at < armed) {
                self.timer_at[device as usize] = Some(at);
                self.push(at, Ev::Timer { device });
            }
        }
    }

    fn report(self) -> ContentRun {
        let secs = |us: u64| us as f64 / 1e6;
        let lan = self.sc.lan_group.min(self.devices);
        let all_of = |range: std::ops::RangeInclusive<u32>| -> Option<f64> {
            let mut latest = 0;
            for d in range {
                latest = latest.max(self.done_at[d as usize]?);
            }
            Some(secs(latest))
        };
        let done_s: Vec<Option<f64>> =
            (2..=self.devices).map(|d| self.done_at[d as usize].map(secs)).collect();
        let mut finished: Vec<f64> = done_s.iter().flatten().copied().collect();
        finished.sort_by(f64::total_cmp);
        let median_done_s =
            (finished.len() == done_s.len() && !finished.is_empty()).then(|| finished[finished.len() / 2]);
        ContentRun {
            policy: self.policy,
            lan_group_done_s: all_of(1..=lan),
            elsewhere_done_s: if lan < self.devices { all_of(lan + 1..=self.devices) } else { Some(0.0) },
            cloud_done_s: self.done_at[CLOUD as usize].map(secs),
            median_done_s,
            done_s,
            bytes_by_route: self.bytes_by_route,
            writer_sent_bytes: self.sent[WRITER as usize],
            cloud_sent_bytes: self.sent[CLOUD as usize],
            stalls: self.stalls,
            resent: self.resent,
            events: self.events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(policies: Vec<PolicyName>) -> ContentScenario {
        let mut sc: ContentScenario = toml::from_str(include_str!("../experiments/content-ci.toml")).unwrap();
        sc.policies = policies;
        sc
    }

    #[test]
    fn every_device_gets_the_file_under_every_policy_and_nearest_first_is_fastest_on_the_lan() {
        let report = run(&small(all_policies())).unwrap();
        assert_eq!(report.devices, 12);
        assert_eq!(report.pairs_lan, 3 * 6);
        let by = |p: PolicyName| report.runs.iter().find(|r| r.policy == p).unwrap();
        for run in &report.runs {
            assert!(run.done_s.iter().all(Option::is_some), "{:?}: {:?}", run.policy, run.done_s);
            assert!(run.cloud_done_s.is_some());
        }
        let nearest = by(PolicyName::Nearest);
        let any = by(PolicyName::Any);
        let cloud = by(PolicyName::CloudOnly);
        // Cloud only: nothing moves between devices (the writer uploads to the cloud only).
        assert_eq!(cloud.bytes_by_route.keys().collect::<Vec<_>>(), vec!["cloud", "direct"]);
        let file = report.file_bytes;
        assert_eq!(cloud.bytes_by_route["direct"], file, "only the cloud's upload is direct");
        // The writer's LAN group has the file at LAN speed; nearest first moves less across the
        // internet than any source does.
        let lan = nearest.lan_group_done_s.unwrap();
        assert!(lan <= any.lan_group_done_s.unwrap(), "{lan} against any {:?}", any.lan_group_done_s);
        assert!(
            lan < cloud.lan_group_done_s.unwrap(),
            "{lan} against cloud only {:?}",
            cloud.lan_group_done_s
        );
        assert!(nearest.bytes_by_route["lan"] >= 2 * file);
        let wan = |r: &ContentRun| {
            r.bytes_by_route.get("direct").unwrap_or(&0) + r.bytes_by_route.get("relayed").unwrap_or(&0)
        };
        assert!(wan(nearest) < wan(any), "{:?} against {:?}", nearest.bytes_by_route, any.bytes_by_route);
        assert!(nearest.elsewhere_done_s.unwrap() < any.elsewhere_done_s.unwrap());
        print!("{}", table(&report));
    }

    #[test]
    fn a_run_replays_bit_for_bit() {
        let sc = small(vec![PolicyName::Nearest]);
        let a = serde_json::to_string(&run(&sc).unwrap()).unwrap();
        let b = serde_json::to_string(&run(&sc).unwrap()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_experiments_are_refused() {
        let mut sc = small(vec![]);
        assert_eq!(run(&sc).unwrap_err(), ContentError::NoPolicy);
        sc.policies = all_policies();
        sc.file_mib = 0;
        assert_eq!(run(&sc).unwrap_err(), ContentError::FileSize { mib: 0 });
        sc.file_mib = 1;
        sc.lan_group = 0;
        assert_eq!(run(&sc).unwrap_err(), ContentError::LanGroup);
    }
}

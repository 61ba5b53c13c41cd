//! Swarm testing: each seed draws a whole scenario (size, topology and overlay graph, latency,
//! loss, bursts, duplication, bandwidth, NAT mix and mapping timeouts, partitions of every kind,
//! crashes, lost stores, churn, skew and drift, the stream or datagram transport, the workload,
//! and the mesh model with its adversaries), runs it, and demands what every scenario demands:
//! convergence once faults stop, no lost write, every invariant. A failing seed is shrunk (see
//! [`crate::shrink`]) and written as a scenario file that replays it.
//!
//! [`draw`] is a pure function of the seed: the same seed gives the same scenario on every
//! machine, so a failure is named by its seed and the commit. The distribution is documented in
//! `netsim/README.md` ("Swarm testing"); keep the two in step.
//!
//! The quiet phase of a drawn scenario is long enough for every fault it draws to drain: 120 s
//! plus the longest a session to a vanished peer can hang (six session timeouts on streams, the
//! whole retransmission schedule on datagrams) plus the crash down time. A failure therefore is
//! not "the run ended too early"; the shrinker confirms that with a longer quiet phase.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::scenario::{Burst, Latency, Mesh, Partition, PartitionKind, Scenario, Topology, Transport};
use crate::topology::GraphSpec;
use crate::Report;

/// Keeps a swarm seed's draws apart from the same number used as a simulation seed.
const DOMAIN: u64 = 0x5357_4152_4d00_0002; // "SWARM", version 2 of the distribution

/// Largest drawn scenario, in devices: small enough that 100 seeds run in a minute or two on two
/// cores, large enough for LAN groups, rings and bridges.
pub const MAX_DEVICES: u32 = 48;

/// The scenario seed `seed` draws (named `swarm-SEED`; its own `seed` field is `seed`).
pub fn draw(seed: u64) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ DOMAIN);
    let r = &mut rng;
    let mut s = Scenario::parse("devices = 1\nduration_ms = 1000").expect("the minimal scenario parses");
    s.name = format!("swarm-{seed}");
    s.seed = seed;
    s.devices = match r.random_range(0..100) {
        0..30 => r.random_range(2..=6),
        30..75 => r.random_range(7..=20),
        _ => r.random_range(21..=MAX_DEVICES),
    };
    let n = s.devices;
    s.topology = match r.random_range(0..100) {
        0..25 => Topology::Star,
        25..60 => Topology::Mesh,
        _ => Topology::Hybrid,
    };
    let mesh_model = r.random_range(0..100) < 25;
    if s.topology == Topology::Mesh {
        // Sparse overlays (a ring, a tree) fall apart when the mesh model's adversaries and a
        // removed user's devices are taken out: with the mesh model, degree 3 and more.
        let least = if mesh_model { 3 } else { 2 };
        s.graph = match r.random_range(0..100) {
            0..30 => None,
            30..60 if n > least => {
                let degree = r.random_range(least..=(least + 1).min(n - 1));
                // A regular graph needs an even degree sum.
                let degree = if (n * degree) % 2 == 1 { degree + 1 } else { degree };
                (degree < n).then_some(GraphSpec::RandomRegular { degree })
            }
            60..80 if n >= 7 => {
                Some(GraphSpec::SmallWorld { k: 2 * least, beta_ppm: r.random_range(0..=300_000) })
            }
            80..100 if n > least => {
                Some(GraphSpec::ScaleFree { m: r.random_range(least - 1..=(least).min(n - 1)) })
            }
            _ => None,
        };
    }
    s.lan_group = r.random_range(1..=8);
    if s.topology == Topology::Hybrid && r.random_range(0..2) == 0 {
        s.remote_peer_ppm = r.random_range(0..=500_000);
    }
    s.duration_ms = r.random_range(20_000..=120_000);
    s.sync_interval_ms = r.random_range(500..=4_000);
    s.transport = if r.random_range(0..100) < 40 { Transport::Stream } else { Transport::Datagram };
    if s.transport == Transport::Stream {
        s.stream.idle_timeout_ms = r.random_range(5_000..=30_000);
        s.stream.session_timeout_ms = r.random_range(5_000..=15_000);
        s.stream.max_message_kb = [64, 256, 1024][r.random_range(0..3)];
    }

    let net = &mut s.network;
    net.wan = match r.random_range(0..4) {
        0 => Latency::Constant { ms: r.random_range(5..=100) },
        1 => {
            let min_ms = r.random_range(5..=60);
            Latency::Uniform { min_ms, max_ms: min_ms + r.random_range(0..=150) }
        }
        2 => Latency::Lognormal {
            median_ms: r.random_range(20..=100),
            sigma: f64::from(r.random_range(2..=10u32)) / 10.0,
        },
        _ => Latency::Pareto {
            min_ms: r.random_range(10..=50),
            alpha: f64::from(r.random_range(15..=30u32)) / 10.0,
        },
    };
    net.lan = Latency::Uniform { min_ms: 1, max_ms: r.random_range(1..=5) };
    net.loss_ppm = if r.random_range(0..100) < 30 { 0 } else { r.random_range(0..=150_000) };
    net.dup_ppm = if r.random_range(0..100) < 50 { 0 } else { r.random_range(0..=50_000) };
    net.burst = (r.random_range(0..100) < 20).then(|| Burst {
        p_ppm: r.random_range(1_000..=20_000),
        r_ppm: r.random_range(100_000..=500_000),
        bad_loss_ppm: r.random_range(300_000..=900_000),
    });
    if r.random_range(0..100) < 40 {
        net.bandwidth_kbps = r.random_range(256..=8_000);
        // A datagram larger than the uplink's queue never passes, and over datagrams a whole
        // message (up to 1 MiB) is one datagram: the queue must hold the largest message.
        net.queue_kb = match s.transport {
            Transport::Stream => r.random_range(32..=256),
            Transport::Datagram => r.random_range(1_100..=2_048),
        };
        net.cloud_bandwidth_kbps = if r.random_range(0..2) == 0 { 0 } else { r.random_range(2_000..=50_000) };
    }
    net.lan_discovery = r.random_range(0..100) < 80;

    let nat = &mut s.nat;
    nat.full_cone_ppm = r.random_range(0..=250_000);
    nat.restricted_ppm = r.random_range(0..=250_000);
    nat.port_restricted_ppm = r.random_range(0..=250_000);
    nat.symmetric_ppm = r.random_range(0..=250_000);
    nat.hairpin_ppm = r.random_range(0..=1_000_000);
    nat.mapping_timeout_ms = if r.random_range(0..100) < 60 { 0 } else { r.random_range(2_000..=30_000) };

    let f = &mut s.faults;
    f.down_ms = r.random_range(1_000..=15_000);
    if r.random_range(0..2) == 0 {
        f.crashes_per_min = f64::from(r.random_range(1..=50u32)) / 100.0;
    }
    if r.random_range(0..2) == 0 {
        f.clock_skew_ms = r.random_range(0..=60_000);
    }
    if r.random_range(0..100) < 30 {
        f.clock_drift_ppm = r.random_range(0..=1_000);
    }
    if r.random_range(0..100) < 30 {
        f.offline_ppm = r.random_range(0..=200_000);
        f.offline_writes = r.random_range(0..2) == 0;
    }
    if r.random_range(0..100) < 30 {
        f.churn_per_min = f64::from(r.random_range(1..=20u32)) / 10.0;
        f.churn_away_ms = r.random_range(2_000..=30_000);
        if r.random_range(0..2) == 0 {
            f.churn_share_ppm = r.random_range(100_000..=900_000);
        }
    }
    if f.clock_skew_ms > 0 && r.random_range(0..2) == 0 {
        f.clock_skew_share_ppm = r.random_range(100_000..=900_000);
    }
    if r.random_range(0..100) < 20 {
        let crashes = r.random_range(1..=2);
        f.cloud_crashes_ms = (0..crashes).map(|_| r.random_range(0..s.duration_ms)).collect();
        f.cloud_crashes_ms.sort_unstable();
    }
    if r.random_range(0..100) < 20 {
        f.crash_before_commit_ppm = r.random_range(0..=50_000);
    }
    if !mesh_model && r.random_range(0..100) < 15 {
        f.lost_store_ppm = r.random_range(0..=500_000);
    }

    for _ in 0..r.random_range(0..=2) {
        let at_ms = r.random_range(0..s.duration_ms);
        let heal_ms = r.random_range(at_ms..=s.duration_ms);
        let share_ppm = r.random_range(100_000..=600_000);
        let first = (u64::from(n) * u64::from(share_ppm) / 1_000_000) as u32;
        let p = match r.random_range(0..4) {
            1 => Partition { kind: PartitionKind::Oneway, ..split(at_ms, heal_ms, share_ppm) },
            2 if n >= 3 => Partition {
                kind: PartitionKind::Ring,
                groups: r.random_range(3..=n.min(6)),
                ..split(at_ms, heal_ms, 0)
            },
            3 if first >= 1 => Partition {
                kind: PartitionKind::Bridge,
                bridges: r.random_range(1..=first.min(2)),
                ..split(at_ms, heal_ms, share_ppm)
            },
            _ => split(at_ms, heal_ms, share_ppm),
        };
        s.partitions.push(p);
    }

    // Connectivity windows: up to two devices online only in one or two stretches.
    if r.random_range(0..100) < 20 {
        for _ in 0..r.random_range(1..=2u32.min(n)) {
            let device = r.random_range(1..=n);
            if s.windows.iter().any(|w| w.device == device) {
                continue;
            }
            let mut online_ms = Vec::new();
            let mut at = r.random_range(0..s.duration_ms / 2);
            for _ in 0..r.random_range(1..=2) {
                let to = (at + r.random_range(1_000..=20_000)).min(s.duration_ms);
                online_ms.push((at, to));
                at = to + r.random_range(1_000..=20_000);
                if at >= s.duration_ms {
                    break;
                }
            }
            s.windows.push(crate::scenario::Window { device, online_ms });
        }
    }
    let w = &mut s.workload;
    w.writes_per_min = f64::from(r.random_range(5..=100u32)) / 10.0;
    w.items = match r.random_range(0..3) {
        0 => r.random_range(1..=5),
        1 => r.random_range(6..=50),
        _ => r.random_range(51..=300),
    };
    w.zipf_s = if r.random_range(0..2) == 0 { 0.0 } else { f64::from(r.random_range(5..=15u32)) / 10.0 };
    w.delete_ppm = r.random_range(0..=100_000);
    w.resolve_ppm = r.random_range(0..=300_000);

    if mesh_model {
        s.mesh = Some(draw_mesh(r, n, s.duration_ms));
    }

    // A drawn fault may not act in a small run (a 1% crash-before-commit chance with few
    // merges): the swarm counts those in its summary instead of failing the seed.
    s.require_faults_act = false;
    // Long enough to drain every fault drawn above (see the module documentation).
    let hang_ms = match s.transport {
        Transport::Stream => 6 * s.stream.session_timeout_ms.max(s.stream.idle_timeout_ms),
        Transport::Datagram => 25_000,
    };
    s.quiet_ms = 120_000 + hang_ms + s.faults.down_ms;
    // Anything the draw got wrong shows here, with the seed, rather than as a run that cannot
    // start.
    let text = toml::to_string(&s).expect("a scenario serializes");
    Scenario::parse(&text)
        .unwrap_or_else(|e| panic!("swarm seed {seed} drew an invalid scenario: {e}\n{text}"))
}

fn split(at_ms: u64, heal_ms: u64, share_ppm: u32) -> Partition {
    Partition { at_ms, heal_ms, kind: PartitionKind::Split, share_ppm, groups: 0, bridges: 0 }
}

/// The mesh model (signed replicas, tickets, the directory, authorized sessions) with some of its
/// adversaries.
fn draw_mesh(r: &mut ChaCha8Rng, n: u32, duration_ms: u64) -> Mesh {
    let mut m = Mesh {
        enabled: true,
        users: r.random_range(1..=n.min(3)),
        ticket_lifetime_ms: r.random_range(60_000..=600_000),
        forge_every_ms: r.random_range(2_000..=10_000),
        ..Mesh::default()
    };
    if r.random_range(0..100) < 20 {
        m.notice_loss_ppm = r.random_range(0..=500_000);
    }
    if n < 5 {
        return m;
    }
    // Adversaries take the highest indices, one role each, at most a quarter of the devices.
    let mut free: Vec<u32> = (m.users + 1..=n).rev().collect();
    free.truncate((n / 4) as usize);
    let mut take = |r: &mut ChaCha8Rng, chance: u32| {
        if r.random_range(0..100) < chance {
            free.pop()
        } else {
            None
        }
    };
    m.forgers.extend(take(r, 20));
    m.replayers.extend(take(r, 20));
    m.stale_tickets.extend(take(r, 15));
    if m.stale_tickets.is_empty() {
        m.stale_after_ms = 0;
    } else {
        m.stale_after_ms = r.random_range(0..duration_ms);
    }
    m.injected.extend(take(r, 15));
    if r.random_range(0..100) < 10 {
        m.cloud_tamper_ppm = r.random_range(0..=100_000);
    }
    if m.users >= 2 && r.random_range(0..100) < 20 {
        m.remove_user = Some(r.random_range(1..m.users));
        m.remove_at_ms = Some(r.random_range(0..duration_ms));
    }
    // A late device must not be a user's first device (whose index is at most users + injected).
    let first_late = m.users + m.injected.len() as u32 + 1;
    if r.random_range(0..100) < 20 {
        if let Some(d) = (first_late..=n).find(|d| !m.adversaries().any(|a| a == *d)) {
            m.late_devices.push(d);
            m.pair_at_ms = r.random_range(1_000..=duration_ms.max(1_001));
        }
    }
    m
}

/// One seed's run: the scenario it drew and what the run reported.
#[derive(Clone, Debug)]
pub struct SeedRun {
    pub seed: u64,
    pub scenario: Scenario,
    pub report: Report,
}

/// Draws and runs `seed`; `plant` plants a bug in every node (the swarm test's own check).
pub fn run_seed(seed: u64, plant: Option<engine::sync::PlantedBug>) -> SeedRun {
    let mut scenario = draw(seed);
    scenario.planted_bug = plant;
    let report = crate::run(&scenario, seed, &mut |_, _| {});
    SeedRun { seed, scenario, report }
}

/// Runs seeds `first..first + count` on `jobs` threads; `done` is called after each (from the
/// thread that ran it). Results come back in seed order, whatever order the threads finished in.
pub fn run_seeds(
    first: u64,
    count: u64,
    jobs: usize,
    plant: Option<engine::sync::PlantedBug>,
    done: &(dyn Fn(&SeedRun) + Sync),
) -> Vec<SeedRun> {
    let next = AtomicU64::new(0);
    let results: Mutex<Vec<SeedRun>> = Mutex::new(Vec::with_capacity(count as usize));
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let run = run_seed(first.wrapping_add(i), plant);
                done(&run);
                // Held only to push one finished run.
                results.lock().unwrap_or_else(|e| e.into_inner()).push(run);
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|r| r.seed.wrapping_sub(first));
    results
}

/// What a swarm run covered and found.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub seeds: u64,
    pub failed: u64,
    /// Failures by the check that failed ("convergence", "durability", ...).
    pub failures_by_kind: BTreeMap<String, u64>,
    /// Drawn scenarios by feature ("topology star", "transport stream", "mesh model", ...).
    pub drawn: BTreeMap<&'static str, u64>,
    pub devices: u64,
    pub events: u64,
    pub writes: u64,
    pub sessions_started: u64,
    pub sessions_failed: u64,
    pub direct_paths: u64,
    pub relayed_paths: u64,
    pub cloud_crashes: u64,
    pub crashes_before_commit: u64,
    pub stores_lost: u64,
    pub departures: u64,
    /// Drawn faults that never acted in their run, by fault.
    pub inert: BTreeMap<String, u64>,
}

impl Summary {
    pub fn of(runs: &[SeedRun]) -> Self {
        let mut s = Summary { seeds: runs.len() as u64, ..Summary::default() };
        for run in runs {
            let (sc, r) = (&run.scenario, &run.report);
            if let Some(f) = &r.failure {
                s.failed += 1;
                *s.failures_by_kind.entry(crate::shrink::failure_kind(f).to_string()).or_default() += 1;
            }
            let mut drawn =
                |what: &'static str, yes: bool| *s.drawn.entry(what).or_default() += u64::from(yes);
            drawn("topology star", sc.topology == Topology::Star);
            drawn("topology mesh", sc.topology == Topology::Mesh);
            drawn("topology hybrid", sc.topology == Topology::Hybrid);
            drawn("remote peers", sc.remote_peer_ppm > 0);
            drawn("overlay graph", sc.graph.is_some());
            drawn("transport stream", sc.transport == Transport::Stream);
            drawn("loss", sc.network.loss_ppm > 0);
            drawn("burst loss", sc.network.burst.is_some());
            drawn("duplication", sc.network.dup_ppm > 0);
            drawn("bandwidth limits", sc.network.bandwidth_kbps > 0);
            drawn("NAT mapping timeouts", sc.nat.mapping_timeout_ms > 0);
            drawn("partitions", !sc.partitions.is_empty());
            drawn("crashes", sc.faults.crashes_per_min > 0.0);
            drawn("churn", sc.faults.churn_per_min > 0.0);
            drawn("clock skew", sc.faults.clock_skew_ms > 0);
            drawn("clock drift", sc.faults.clock_drift_ppm > 0);
            drawn("offline devices", sc.faults.offline_ppm > 0);
            drawn("offline writers", sc.faults.offline_ppm > 0 && sc.faults.offline_writes);
            drawn("connectivity windows", !sc.windows.is_empty());
            drawn(
                "skew on a share",
                sc.faults.clock_skew_ms > 0 && sc.faults.clock_skew_share_ppm < 1_000_000,
            );
            drawn("churn on a share", sc.faults.churn_per_min > 0.0 && sc.faults.churn_share_ppm < 1_000_000);
            drawn("cloud crashes", !sc.faults.cloud_crashes_ms.is_empty());
            drawn("crashes before commit", sc.faults.crash_before_commit_ppm > 0);
            drawn("lost stores", sc.faults.lost_store_ppm > 0);
            let mesh = sc.mesh.as_ref().filter(|m| m.enabled);
            drawn("mesh model", mesh.is_some());
            drawn("mesh adversaries", mesh.is_some_and(|m| m.adversaries().next().is_some()));
            s.devices += u64::from(sc.devices);
            s.events += r.events;
            s.writes += r.writes;
            s.sessions_started += r.sessions_started;
            s.sessions_failed += r.sessions_failed;
            s.direct_paths += r.direct_paths;
            s.relayed_paths += r.relayed_paths;
            s.cloud_crashes += r.faults.cloud_crashes;
            s.crashes_before_commit += r.faults.crashes_before_commit;
            s.stores_lost += r.faults.stores_lost;
            s.departures += r.departures;
            for fault in &r.inert_faults {
                *s.inert.entry(fault.clone()).or_default() += 1;
            }
        }
        s
    }

    /// The summary as readable text.
    pub fn print(&self) {
        let kinds: Vec<String> = self.failures_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "swarm: {} seeds, {} passed, {} failed{}",
            self.seeds,
            self.seeds - self.failed,
            self.failed,
            if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join(", ")) }
        );
        println!(
            "  ran {} devices, {} events, {} writes, {} sessions ({} failed)",
            self.devices, self.events, self.writes, self.sessions_started, self.sessions_failed
        );
        println!(
            "  device pairs direct {} relayed {}; cloud crashes {}, crashes before commit {}, stores lost {}, departures {}",
            self.direct_paths,
            self.relayed_paths,
            self.cloud_crashes,
            self.crashes_before_commit,
            self.stores_lost,
            self.departures
        );
        let drawn: Vec<String> = self.drawn.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("  scenarios drawn with: {}", drawn.join(", "));
        let inert: Vec<String> = self.inert.iter().map(|(k, n)| format!("{k} {n}")).collect();
        if !inert.is_empty() {
            println!("  drawn but never applied in the run: {}", inert.join(", "));
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "seeds": self.seeds,
            "failed": self.failed,
            "failures_by_kind": self.failures_by_kind,
            "drawn": self.drawn,
            "devices": self.devices,
            "events": self.events,
            "writes": self.writes,
            "sessions_started": self.sessions_started,
            "sessions_failed": self.sessions_failed,
            "direct_paths": self.direct_paths,
            "relayed_paths": self.relayed_paths,
            "cloud_crashes": self.cloud_crashes,
            "crashes_before_commit": self.crashes_before_commit,
            "stores_lost": self.stores_lost,
            "departures": self.departures,
            "inert_faults": self.inert,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_scenario_every_time() {
        for seed in 0..200 {
            let a = toml::to_string(&draw(seed)).unwrap();
            let b = toml::to_string(&draw(seed)).unwrap();
            assert_eq!(a, b, "seed {seed}");
        }
    }

    #[test]
    fn the_draws_cover_every_kind_of_fault() {
        let draws: Vec<Scenario> = (0..300).map(draw).collect();
        let any = |f: &dyn Fn(&Scenario) -> bool| draws.iter().any(f);
        assert!(any(&|s| s.topology == Topology::Star));
        assert!(any(&|s| s.topology == Topology::Mesh && s.graph.is_some()));
        assert!(any(&|s| s.topology == Topology::Hybrid));
        assert!(any(&|s| s.transport == Transport::Stream));
        assert!(any(&|s| s.network.burst.is_some()));
        assert!(any(&|s| s.network.bandwidth_kbps > 0));
        assert!(any(&|s| s.nat.mapping_timeout_ms > 0));
        for kind in [PartitionKind::Split, PartitionKind::Oneway, PartitionKind::Ring, PartitionKind::Bridge]
        {
            assert!(any(&|s| s.partitions.iter().any(|p| p.kind == kind)), "{kind:?}");
        }
        assert!(any(&|s| s.faults.crashes_per_min > 0.0));
        assert!(any(&|s| s.faults.churn_per_min > 0.0));
        assert!(any(&|s| !s.faults.cloud_crashes_ms.is_empty()));
        assert!(any(&|s| s.faults.lost_store_ppm > 0));
        assert!(any(&|s| s.faults.crash_before_commit_ppm > 0));
        assert!(any(&|s| s.faults.clock_drift_ppm > 0));
        assert!(any(&|s| s.faults.offline_writes && s.faults.offline_ppm > 0));
        assert!(any(&|s| !s.windows.is_empty()));
        assert!(any(&|s| s.faults.churn_share_ppm < 1_000_000));
        assert!(any(&|s| s.faults.clock_skew_share_ppm < 1_000_000));
        assert!(any(&|s| s.mesh.as_ref().is_some_and(|m| !m.forgers.is_empty())));
        assert!(any(&|s| s.mesh.as_ref().is_some_and(|m| !m.injected.is_empty())));
        assert!(any(&|s| s.mesh.as_ref().is_some_and(|m| !m.late_devices.is_empty())));
        assert!(draws.iter().all(|s| s.devices <= MAX_DEVICES && s.planted_bug.is_none()));
    }
}

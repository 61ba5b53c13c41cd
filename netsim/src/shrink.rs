//! Shrinking a failing run: greedily reduce devices, faults, writes and duration while the run
//! still fails with the same check, so a failure found at scale can be read at its smallest.
//!
//! A reduction is kept only if the candidate fails the same check (the failure's kind) and still
//! does with its quiet phase doubled (and never shorter than the original's): a failure that a
//! longer quiet phase makes go away is the run ending too early, not the bug being kept. The
//! quiet phase itself is never reduced. `netsim/README.md` lists every reduction.
//!
//! [`shrink`] is generic over the predicate (`Fn(&Scenario, seed) -> Option<failure>`): the CLI
//! passes [`simulate`], tests pass synthetic predicates whose minimum is known.

use crate::Scenario;

/// Besides the original seed, each reduction is tried with this many seeds derived from it.
pub const SEEDS_DERIVED: u64 = 2;

/// The check a failure names: the text before its first colon ("convergence", "durability", ...).
pub fn failure_kind(failure: &str) -> &str {
    failure.split(':').next().unwrap_or(failure).trim()
}

/// The real predicate: run the simulation and return its first failed check.
pub fn simulate(scenario: &Scenario, seed: u64) -> Option<String> {
    crate::run(scenario, seed, &mut |_, _| {}).failure
}

/// The seeds tried besides the original one: splitmix64 of the seed and a counter, so they are the
/// same on every machine and every run.
pub fn derived_seeds(seed: u64) -> Vec<u64> {
    (1..=SEEDS_DERIVED)
        .map(|k| {
            let mut z = seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
        .collect()
}

/// One run of the predicate during a shrink.
#[derive(Debug)]
pub struct Attempt<'a> {
    /// 1-based count of predicate runs so far.
    pub run: usize,
    /// The reduction tried ("devices 300 -> 150"), or "original".
    pub change: &'a str,
    pub seed: u64,
    /// The failure the run reported, if any.
    pub failure: Option<&'a str>,
    /// Whether the reduction was kept (it failed with the original failure's check).
    pub kept: bool,
}

/// The smallest failing scenario found.
#[derive(Clone, Debug)]
pub struct Shrunk {
    pub scenario: Scenario,
    pub seed: u64,
    /// The failure of `scenario` with `seed`.
    pub failure: String,
    /// Predicate runs used, the first (the original scenario) included.
    pub runs: usize,
    /// The reductions kept, in order.
    pub kept: Vec<String>,
    /// False when the run budget ran out before no reduction applied any more.
    pub minimal: bool,
}

/// Shrinks `scenario` failing with `seed`, with at most `budget` runs of `predicate`. `None` when
/// the original does not fail (or `budget` is 0).
pub fn shrink(
    scenario: &Scenario,
    seed: u64,
    predicate: impl Fn(&Scenario, u64) -> Option<String>,
    budget: usize,
) -> Option<Shrunk> {
    shrink_observed(scenario, seed, predicate, budget, &mut |_| {})
}

/// [`shrink`], calling `observe` after every predicate run.
pub fn shrink_observed(
    scenario: &Scenario,
    seed: u64,
    predicate: impl Fn(&Scenario, u64) -> Option<String>,
    budget: usize,
    observe: &mut dyn FnMut(&Attempt<'_>),
) -> Option<Shrunk> {
    if budget == 0 {
        return None;
    }
    let failure = predicate(scenario, seed);
    let kept = failure.is_some();
    observe(&Attempt { run: 1, change: "original", seed, failure: failure.as_deref(), kept });
    let failure = failure?;
    let kind = failure_kind(&failure).to_string();
    let mut seeds = vec![seed];
    seeds.extend(derived_seeds(seed).into_iter().filter(|s| *s != seed));
    let mut best =
        Shrunk { scenario: scenario.clone(), seed, failure, runs: 1, kept: Vec::new(), minimal: false };
    loop {
        let mut changed = false;
        for step in STEPS {
            // Apply the step while it keeps failing; it offers nothing once it cannot reduce.
            'again: loop {
                for (change, candidate) in step(&best.scenario) {
                    let Some(candidate) = valid(candidate) else { continue };
                    // The current seed first, then the original and the derived ones.
                    let mut order = vec![best.seed];
                    order.extend(seeds.iter().copied().filter(|s| *s != best.seed));
                    for try_seed in order {
                        if best.runs >= budget {
                            return Some(best);
                        }
                        best.runs += 1;
                        let failure = predicate(&candidate, try_seed);
                        let same = failure.as_deref().is_some_and(|f| failure_kind(f) == kind);
                        observe(&Attempt {
                            run: best.runs,
                            change: &change,
                            seed: try_seed,
                            failure: failure.as_deref(),
                            kept: same,
                        });
                        // A run that fails only because its quiet phase is too short to drain
                        // is not the bug: confirm with a quiet phase twice the candidate's and no
                        // shorter than the original's.
                        let confirmed = same && {
                            let mut longer = candidate.clone();
                            longer.quiet_ms = (candidate.quiet_ms.saturating_mul(2)).max(scenario.quiet_ms);
                            if best.runs >= budget {
                                return Some(best);
                            }
                            best.runs += 1;
                            let again = predicate(&longer, try_seed);
                            let same_again = again.as_deref().is_some_and(|f| failure_kind(f) == kind);
                            observe(&Attempt {
                                run: best.runs,
                                change: &format!("confirm \"{change}\" with quiet_ms {}", longer.quiet_ms),
                                seed: try_seed,
                                failure: again.as_deref(),
                                kept: same_again,
                            });
                            same_again
                        };
                        if let (true, Some(failure)) = (confirmed, failure) {
                            best.scenario = candidate;
                            best.seed = try_seed;
                            best.failure = failure;
                            best.kept.push(change);
                            changed = true;
                            continue 'again;
                        }
                    }
                }
                break;
            }
        }
        if !changed {
            best.minimal = true;
            return Some(best);
        }
    }
}

/// The shrunk scenario as a file that replays it: comment lines saying where it came from, what
/// fails, the reductions kept and the command (`target` is the path it is written to), then the
/// scenario with the failing seed.
pub fn replay_file(
    shrunk: &Shrunk,
    source: &str,
    seed: u64,
    target: &str,
) -> Result<String, toml::ser::Error> {
    let mut minimal = shrunk.scenario.clone();
    minimal.seed = shrunk.seed;
    let body = toml::to_string(&minimal)?;
    let mut text = format!("# Shrunk by feedmesh-sim from {source}, seed {seed}, in {} runs", shrunk.runs);
    text.push_str(if shrunk.minimal { ".\n" } else { " (the run budget ran out: not minimal).\n" });
    text.push_str(&format!("# Fails: {}\n", shrunk.failure));
    text.push_str(&format!("# Reductions: {}\n", shrunk.kept.join("; ")));
    text.push_str(&format!("# Replay: feedmesh-sim run {target} --seed {}\n", shrunk.seed));
    text.push_str(&body);
    Ok(text)
}

/// A candidate as the scenario format would read it back, or `None` when validation refuses it.
fn valid(candidate: Scenario) -> Option<Scenario> {
    let text = toml::to_string(&candidate).ok()?;
    Scenario::parse(&text).ok()
}

type Step = fn(&Scenario) -> Vec<(String, Scenario)>;

/// The reductions, largest first: devices (which make runs cheaper), faults, writes, time. The
/// quiet phase is never shortened: a run whose faults and writes have not drained is expected not
/// to converge, so a "smaller" scenario with less quiet time would only show that.
const STEPS: [Step; 11] = [
    devices,
    partitions,
    mesh,
    crashes_skew_offline,
    storage,
    loss,
    nat,
    write_rate,
    items,
    workload_mix,
    duration,
];

fn with(s: &Scenario, change: String, edit: impl FnOnce(&mut Scenario)) -> (String, Scenario) {
    let mut candidate = s.clone();
    edit(&mut candidate);
    (change, candidate)
}

/// Smaller counts to try for `n`, down to `min`: half, three quarters, one less.
fn fewer(n: u64, min: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for m in [n / 2, n - n / 4, n.saturating_sub(1)] {
        if m >= min && m < n && !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

fn devices(s: &Scenario) -> Vec<(String, Scenario)> {
    fewer(u64::from(s.devices), 1)
        .into_iter()
        .map(|n| {
            let n = n as u32; // below `s.devices`, a u32
            with(s, format!("devices {} -> {n}", s.devices), |c| c.devices = n)
        })
        .collect()
}

fn partitions(s: &Scenario) -> Vec<(String, Scenario)> {
    (0..s.partitions.len())
        .map(|i| {
            with(s, format!("drop partition {} of {}", i + 1, s.partitions.len()), |c| {
                c.partitions.remove(i);
            })
        })
        .collect()
}

fn crashes_skew_offline(s: &Scenario) -> Vec<(String, Scenario)> {
    let mut out = Vec::new();
    if s.faults.crashes_per_min != 0.0 {
        out.push(with(s, "no crashes".into(), |c| c.faults.crashes_per_min = 0.0));
    }
    if s.faults.clock_skew_ms != 0 {
        out.push(with(s, "no clock skew".into(), |c| c.faults.clock_skew_ms = 0));
    }
    if s.faults.offline_ppm != 0 {
        out.push(with(s, "no offline devices".into(), |c| c.faults.offline_ppm = 0));
    }
    if s.faults.clock_drift_ppm != 0 {
        out.push(with(s, "no clock drift".into(), |c| c.faults.clock_drift_ppm = 0));
    }
    if s.faults.churn_per_min != 0.0 {
        out.push(with(s, "no churn".into(), |c| c.faults.churn_per_min = 0.0));
    }
    if s.nat.mapping_timeout_ms != 0 {
        out.push(with(s, "no NAT mapping timeouts".into(), |c| c.nat.mapping_timeout_ms = 0));
    }
    if s.network.bandwidth_kbps != 0 || s.network.cloud_bandwidth_kbps != 0 {
        out.push(with(s, "unlimited bandwidth".into(), |c| {
            c.network.bandwidth_kbps = 0;
            c.network.cloud_bandwidth_kbps = 0;
        }));
    }
    if !s.network.lan_discovery {
        out.push(with(s, "LAN discovery".into(), |c| c.network.lan_discovery = true));
    }
    if s.graph.is_some() {
        out.push(with(s, "complete mesh".into(), |c| c.graph = None));
    }
    out
}

/// The mesh model's adversaries, then the mesh model itself, then the stream transport.
fn mesh(s: &Scenario) -> Vec<(String, Scenario)> {
    let mut out = Vec::new();
    if let Some(m) = s.mesh.as_ref().filter(|m| m.enabled) {
        if m.adversaries().next().is_some() {
            out.push(with(s, "no mesh adversaries".into(), |c| {
                if let Some(m) = c.mesh.as_mut() {
                    m.forgers.clear();
                    m.replayers.clear();
                    m.stale_tickets.clear();
                    m.injected.clear();
                }
            }));
        }
        if m.cloud_tamper_ppm != 0
            || m.notice_loss_ppm != 0
            || m.remove_user.is_some()
            || !m.late_devices.is_empty()
        {
            out.push(with(s, "no tampering, notice loss, removal or late devices".into(), |c| {
                if let Some(m) = c.mesh.as_mut() {
                    m.cloud_tamper_ppm = 0;
                    m.notice_loss_ppm = 0;
                    m.remove_user = None;
                    m.remove_at_ms = None;
                    m.late_devices.clear();
                }
            }));
        }
        out.push(with(s, "no mesh model".into(), |c| c.mesh = None));
    }
    if s.transport == crate::scenario::Transport::Stream {
        out.push(with(s, "datagram transport".into(), |c| {
            c.transport = crate::scenario::Transport::Datagram
        }));
    }
    out
}

/// Storage faults: cloud crashes, crashes before commit, lost stores.
fn storage(s: &Scenario) -> Vec<(String, Scenario)> {
    let mut out = Vec::new();
    if !s.faults.cloud_crashes_ms.is_empty() {
        out.push(with(s, "no cloud crashes".into(), |c| c.faults.cloud_crashes_ms.clear()));
    }
    if s.faults.crash_before_commit_ppm != 0 {
        out.push(with(s, "no crashes before commit".into(), |c| c.faults.crash_before_commit_ppm = 0));
    }
    if s.faults.lost_store_ppm != 0 {
        out.push(with(s, "no lost stores".into(), |c| c.faults.lost_store_ppm = 0));
    }
    out
}

fn loss(s: &Scenario) -> Vec<(String, Scenario)> {
    let mut out = Vec::new();
    if s.network.loss_ppm != 0 {
        out.push(with(s, "no loss".into(), |c| c.network.loss_ppm = 0));
    }
    if s.network.dup_ppm != 0 {
        out.push(with(s, "no duplication".into(), |c| c.network.dup_ppm = 0));
    }
    if s.network.burst.is_some() {
        out.push(with(s, "no burst loss".into(), |c| c.network.burst = None));
    }
    out
}

fn nat(s: &Scenario) -> Vec<(String, Scenario)> {
    let n = &s.nat;
    let shares = [n.full_cone_ppm, n.restricted_ppm, n.port_restricted_ppm, n.symmetric_ppm];
    let mut out = Vec::new();
    if shares.iter().filter(|&&v| v != 0).count() > 1 {
        out.push(with(s, "no NATs".into(), |c| c.nat = Default::default()));
    }
    if n.full_cone_ppm != 0 {
        out.push(with(s, "no full-cone NATs".into(), |c| c.nat.full_cone_ppm = 0));
    }
    if n.restricted_ppm != 0 {
        out.push(with(s, "no restricted NATs".into(), |c| c.nat.restricted_ppm = 0));
    }
    if n.port_restricted_ppm != 0 {
        out.push(with(s, "no port-restricted NATs".into(), |c| c.nat.port_restricted_ppm = 0));
    }
    if n.symmetric_ppm != 0 {
        out.push(with(s, "no symmetric NATs".into(), |c| c.nat.symmetric_ppm = 0));
    }
    out
}

/// Writes per device per minute below which halving stops.
pub const WRITE_RATE_MIN: f64 = 0.1;

fn write_rate(s: &Scenario) -> Vec<(String, Scenario)> {
    let rate = s.workload.writes_per_min;
    if rate / 2.0 < WRITE_RATE_MIN {
        return Vec::new();
    }
    vec![with(s, format!("writes_per_min {rate} -> {}", rate / 2.0), |c| {
        c.workload.writes_per_min = rate / 2.0
    })]
}

fn items(s: &Scenario) -> Vec<(String, Scenario)> {
    fewer(u64::from(s.workload.items), 1)
        .into_iter()
        .map(|n| {
            let n = n as u32; // below `s.workload.items`, a u32
            with(s, format!("items {} -> {n}", s.workload.items), |c| c.workload.items = n)
        })
        .collect()
}

fn workload_mix(s: &Scenario) -> Vec<(String, Scenario)> {
    let mut out = Vec::new();
    if s.workload.delete_ppm != 0 {
        out.push(with(s, "no deletes".into(), |c| c.workload.delete_ppm = 0));
    }
    if s.workload.resolve_ppm != 0 {
        out.push(with(s, "no resolves".into(), |c| c.workload.resolve_ppm = 0));
    }
    if s.workload.zipf_s != 0.0 {
        out.push(with(s, "uniform items".into(), |c| c.workload.zipf_s = 0.0));
    }
    out
}

fn duration(s: &Scenario) -> Vec<(String, Scenario)> {
    let ms = s.duration_ms;
    if ms < 2 {
        return Vec::new();
    }
    vec![with(s, format!("duration_ms {ms} -> {}", ms / 2), |c| c.duration_ms = ms / 2)]
}

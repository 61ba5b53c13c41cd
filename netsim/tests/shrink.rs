//! Shrinking through its public boundary: synthetic predicates whose minimal failing scenario is
//! known, and the CLI on a scenario that passes.

use std::process::Command;

use netsim::shrink::{derived_seeds, failure_kind, shrink, SEEDS_DERIVED, WRITE_RATE_MIN};
use netsim::Scenario;

fn default() -> Scenario {
    Scenario::default_scenario()
}

/// Fails with "convergence" when at least 7 devices and a partition exist.
fn synthetic(s: &Scenario, _seed: u64) -> Option<String> {
    (s.devices >= 7 && !s.partitions.is_empty()).then(|| "convergence: synthetic".to_string())
}

#[test]
fn reaches_the_minimal_scenario() {
    let mut start = default();
    let first = start.partitions[0].clone();
    start.partitions.push(first);
    let shrunk = shrink(&start, 1, synthetic, 1_000).expect("the default fails the predicate");
    assert!(shrunk.minimal, "budget left: {} runs", shrunk.runs);
    let s = &shrunk.scenario;
    assert_eq!(s.devices, 7);
    assert_eq!(s.partitions.len(), 1);
    assert_eq!(s.faults.crashes_per_min, 0.0);
    assert_eq!(s.faults.clock_skew_ms, 0);
    assert_eq!(s.faults.offline_ppm, 0);
    assert_eq!((s.network.loss_ppm, s.network.dup_ppm), (0, 0));
    let n = &s.nat;
    assert_eq!((n.full_cone_ppm, n.restricted_ppm, n.port_restricted_ppm, n.symmetric_ppm), (0, 0, 0, 0));
    assert!(s.workload.writes_per_min < 2.0 * WRITE_RATE_MIN);
    assert_eq!(s.workload.items, 1);
    assert_eq!((s.workload.delete_ppm, s.workload.resolve_ppm), (0, 0));
    assert_eq!((s.duration_ms, s.quiet_ms), (1, start.quiet_ms), "the quiet phase is never shortened");
    assert_eq!(shrunk.seed, 1, "the original seed kept failing");
    assert_eq!(shrunk.failure, "convergence: synthetic");
    assert!(shrunk.kept.iter().any(|k| k == "drop partition 1 of 2"));
    // Deterministic: the same input shrinks the same way.
    let again = shrink(&start, 1, synthetic, 1_000).unwrap();
    assert_eq!(again.kept, shrunk.kept);
    assert_eq!(again.runs, shrunk.runs);
}

#[test]
fn keeps_the_failure_kind() {
    // Below 10 devices the failure changes check; the shrink must stop at 10.
    let predicate = |s: &Scenario, _: u64| match s.devices {
        10.. => Some("durability: lost".to_string()),
        2.. => Some("convergence: differs".to_string()),
        _ => None,
    };
    let shrunk = shrink(&default(), 3, predicate, 1_000).unwrap();
    assert_eq!(shrunk.scenario.devices, 10);
    assert_eq!(failure_kind(&shrunk.failure), "durability");
}

#[test]
fn switches_to_a_derived_seed_that_fails() {
    // The original seed fails only with at least 40 devices, the derived seeds always.
    let other = derived_seeds(5)[0];
    let predicate = move |s: &Scenario, seed: u64| {
        (seed == other || s.devices >= 40).then(|| "propagation: slow".to_string())
    };
    let shrunk = shrink(&default(), 5, predicate, 1_000).unwrap();
    assert_eq!(shrunk.scenario.devices, 1);
    assert_eq!(shrunk.seed, other);
}

#[test]
fn a_passing_scenario_does_not_shrink_and_the_budget_holds() {
    assert!(shrink(&default(), 1, |_, _| None, 100).is_none());
    let shrunk = shrink(&default(), 1, synthetic, 10).unwrap();
    assert_eq!(shrunk.runs, 10);
    assert!(!shrunk.minimal);
    assert!(shrunk.scenario.devices < 300 && shrunk.scenario.devices >= 7);
}

#[test]
fn derived_seeds_are_fixed() {
    assert_eq!(derived_seeds(1), derived_seeds(1));
    assert_eq!(derived_seeds(1).len(), SEEDS_DERIVED as usize);
    assert!(!derived_seeds(1).contains(&1));
}

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_feedmesh-sim")).args(args).output().expect("run feedmesh-sim")
}

#[test]
fn cli_shrink_of_a_passing_scenario_exits_1_and_bad_input_2() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("feedmesh-sim-shrink");
    std::fs::create_dir_all(&dir).unwrap();
    let passing = dir.join("passing.toml");
    std::fs::write(&passing, "devices = 3\nduration_ms = 2000\nquiet_ms = 10000\n").unwrap();
    let path = passing.to_str().unwrap();
    let out = sim(&["shrink", path, "--seed", "4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing to shrink"), "{stderr}");
    assert!(out.stdout.is_empty(), "no scenario printed");
    assert_eq!(sim(&["shrink", path, "--max-runs", "0"]).status.code(), Some(2));
    assert_eq!(sim(&["shrink", "/no/such/scenario.toml"]).status.code(), Some(2));
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "devices = 3\nduration_ms = 2000\nfrob = 1\n").unwrap();
    let out = sim(&["shrink", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("frob"));
}

/// Writes until 0.5 s before the end with syncs every 2 s: the last writes cannot reach everyone.
const NO_QUIET: &str = "devices = 12\nduration_ms = 20000\nquiet_ms = 500\n[network]\nloss_ppm = 100000\n\
    [faults]\nclock_skew_ms = 1000\n[[partitions]]\nat_ms = 5000\nheal_ms = 10000\nshare_ppm = 300000\n";

#[test]
fn cli_shrinks_a_real_failure_to_a_scenario_that_still_fails() {
    let original = Scenario::parse(NO_QUIET).unwrap();
    let failure = netsim::shrink::simulate(&original, 1).expect("the scenario fails");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("feedmesh-sim-shrink-real");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("no-quiet.toml");
    std::fs::write(&path, NO_QUIET).unwrap();
    let out = sim(&["shrink", path.to_str().unwrap(), "--seed", "1", "--max-runs", "100"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("shrink: run   2"), "progress per attempt: {stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("# Replay: feedmesh-sim run <this file> --seed "), "{text}");
    let shrunk = Scenario::parse(&text).expect("the printed scenario parses");
    assert!(shrunk.devices < original.devices, "{text}");
    assert!(shrunk.partitions.is_empty() || shrunk.network.loss_ppm == 0 || shrunk.faults.clock_skew_ms == 0);
    let again = netsim::shrink::simulate(&shrunk, shrunk.seed).expect("the shrunk scenario still fails");
    assert_eq!(failure_kind(&again), failure_kind(&failure));
}

/// A reduction whose failure a longer quiet phase cures is the run ending too early, not the bug:
/// not kept. Here 50 devices and more fail whatever the quiet phase; 20 to 49 fail only when the
/// quiet phase is at most 60 s, so the shrink must stop at 50 (and never shorten the quiet phase).
#[test]
fn a_failure_a_longer_quiet_phase_cures_is_not_kept() {
    let predicate = |s: &Scenario, _: u64| {
        let fails = s.devices >= 50 || (s.devices >= 20 && s.quiet_ms <= 60_000);
        fails.then(|| "convergence: synthetic".to_string())
    };
    let start = default();
    assert_eq!(start.quiet_ms, 60_000);
    let shrunk = shrink(&start, 1, predicate, 1_000).unwrap();
    assert!(shrunk.minimal);
    assert_eq!(shrunk.scenario.devices, 50);
    assert_eq!(shrunk.scenario.quiet_ms, start.quiet_ms);
}

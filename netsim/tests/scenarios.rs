//! The simulator's scenarios in CI: each must converge with no lost write; one seed replays bit
//! for bit; bad scenarios are refused naming the field; the CLI keeps its contract.

use std::process::Command;

use netsim::{run, Scenario};

fn check(text: &str) -> netsim::Report {
    let scenario = Scenario::parse(text).expect("scenario parses");
    let report = run(&scenario, scenario.seed, &mut |_, _| {});
    println!(
        "scenario {}: seed {}, {} writes, {} messages, converged {}, lost {}, p99 {} ms, {} relayed / {} direct, trace {}",
        report.scenario,
        report.seed,
        report.writes,
        report.messages,
        report.converged,
        report.lost_writes,
        report.convergence_ms_p99,
        report.relayed_paths,
        report.direct_paths,
        &report.trace_hash[..16]
    );
    assert!(
        report.failure.is_none(),
        "{}: {:?} (replay: feedmesh-sim run --seed {})",
        report.scenario,
        report.failure,
        report.seed
    );
    assert!(report.converged);
    assert_eq!(report.lost_writes, 0);
    assert_eq!(report.unconverged_writes, 0);
    assert!(report.writes > 0, "the scenario made writes");
    report
}

#[test]
fn partition_heals() {
    check(include_str!("../scenarios/partition-heal.toml"));
}

#[test]
fn symmetric_nats_are_relayed() {
    let report = check(include_str!("../scenarios/symmetric-nat.toml"));
    assert!(report.relayed_paths > 0, "symmetric/port-restricted pairs must go through the relay");
    assert!(report.direct_paths > 0, "the other pairs punch through");
}

#[test]
fn crash_and_restart() {
    check(include_str!("../scenarios/crash-restart.toml"));
}

#[test]
fn clock_skew() {
    check(include_str!("../scenarios/clock-skew.toml"));
}

#[test]
fn thirty_percent_loss() {
    let report = check(include_str!("../scenarios/loss-30.toml"));
    assert!(report.dropped > 0);
}

/// Most of the network model at once (see the scenario's header); each feature must have acted.
#[test]
fn a_hostile_mesh_converges() {
    let report = check(include_str!("../scenarios/hostile-mesh.toml"));
    assert!(report.queue_drops > 0, "thin uplinks overflowed");
    assert!(report.repunches > 0, "idle NAT mappings timed out");
    assert!(report.hairpinned > 0, "same-NAT devices hairpinned");
    assert!(report.departures > 0, "devices churned");
    assert!(report.relayed_paths > 0 && report.direct_paths > 0);
}

/// Eight devices, each alone behind a symmetric NAT, so every datagram between two of them goes
/// through the cloud, whose uplink runs at `kbps`; `model` is `noop` (a fixed stream of pings) or
/// `engine` (sync sessions, checked like every scenario).
fn relayed(model: &str, kbps: u64) -> netsim::Report {
    let text = format!(
        "name = \"relayed-{model}-{kbps}-kbps\"\nseed = 7\ndevices = 8\ntopology = \"mesh\"\nlan_group = 1\n\
         model = \"{model}\"\nduration_ms = 30000\nquiet_ms = 10000\nsync_interval_ms = 200\n\
         [network]\nwan = {{ dist = \"uniform\", min_ms = 20, max_ms = 120 }}\ncloud_bandwidth_kbps = {kbps}\n\
         [workload]\nwrites_per_min = 30.0\nitems = 50\n[nat]\nsymmetric_ppm = 1000000\n"
    );
    if model == "engine" {
        return check(&text);
    }
    // No-op nodes write nothing for `check` to look for.
    let scenario = Scenario::parse(&text).expect("scenario parses");
    let report = run(&scenario, scenario.seed, &mut |_, _| {});
    assert!(report.failure.is_none(), "{}: {:?}", report.scenario, report.failure);
    report
}

/// The cloud's uplink as a relay (issue 12): the same relayed workload at 10 Mbit/s to 10 Gbit/s.
/// A faster link never drops more, and a fast one drops nothing. (A relayed datagram used to book
/// the cloud's uplink when it was sent, not when it got there, so later sends counted the idle
/// gap before it as queued bytes, the more the faster the link: no-op pings lost 0, 219, 417 and
/// 454 datagrams, sync sessions 0, 1125, 1457 and 1482.)
#[test]
fn a_faster_cloud_uplink_never_drops_more_relayed_datagrams() {
    const RATES_KBPS: [u64; 4] = [10_000, 100_000, 1_000_000, 10_000_000];
    let runs: Vec<(&str, Vec<netsim::Report>)> = ["noop", "engine"]
        .into_iter()
        .map(|model| (model, RATES_KBPS.iter().map(|&kbps| relayed(model, kbps)).collect()))
        .collect();
    let drops: Vec<Vec<u64>> =
        runs.iter().map(|(_, reports)| reports.iter().map(|r| r.queue_drops).collect()).collect();
    println!("queue drops at {RATES_KBPS:?} kbps: noop {:?}, engine {:?}", drops[0], drops[1]);
    for ((model, reports), drops) in runs.iter().zip(&drops) {
        assert!(drops.windows(2).all(|w| w[0] >= w[1]), "{model}: more bandwidth, more drops: {drops:?}");
        assert_eq!(drops[2..], [0, 0], "{model}: a fast link drops nothing");
        for r in reports {
            assert!(
                r.relayed_datagrams > 0 && r.direct_datagrams == 0,
                "{}: all through the relay",
                r.scenario
            );
            assert_eq!(r.dropped, r.queue_drops, "{}: no other loss", r.scenario);
        }
    }
    let pings: Vec<u64> = runs[0].1.iter().map(|r| r.messages).collect();
    assert!(pings.windows(2).all(|w| w[0] == w[1]), "the same pings at every rate: {pings:?}");
}

/// Paranoid mode checks every touched replica's full invariants after every event.
#[test]
fn paranoid_checks_hold_after_every_event() {
    let text = "paranoid = true\n".to_string() + include_str!("../scenarios/crash-restart.toml");
    check(&text);
}

#[test]
fn the_embedded_default_passes() {
    let report = check(netsim::scenario::DEFAULT);
    assert_eq!(report.nodes, 301);
    // The NAT mix acts: device pairs talk over punched paths and through the relay.
    assert!(report.direct_paths > 0 && report.relayed_paths > 0, "{report:?}");
    assert!(report.inert_faults.is_empty());
    let f = &report.faults;
    assert!(
        f.device_crashes > 0 && f.devices_offline > 0 && f.devices_skewed > 0 && f.partitions_started == 1
    );
    assert!(f.datagrams_lost > 0 && f.datagrams_duplicated > 0 && f.datagrams_partitioned > 0);
    // Propagation among the devices online: every write reached all of them, and half of them
    // no later than all of them.
    let p = &report.propagation;
    assert!(p.devices > 250 && p.devices < 300 && p.writes > 0, "{p:?}");
    assert_eq!(p.short_of, [0, 0, 0]);
    for i in 0..3 {
        assert!(p.to_50_ms[i] <= p.to_99_ms[i] && p.to_99_ms[i] <= p.to_100_ms[i], "{p:?}");
    }
    assert!(p.to_100_ms[2] <= report.convergence_ms_max, "the online devices are among the live nodes");
    let c = &report.conflicts;
    assert!(c.items > 0 && c.versions >= c.items && c.later_edit_lost <= c.versions, "{c:?}");
}

/// Devices left on while off the network keep writing, and nothing they wrote is lost: offline
/// writers (back for the quiet phase) and a device online only in two windows. Skew and churn
/// limited to a share of the devices.
#[test]
fn devices_writing_while_off_the_network_lose_nothing() {
    let text = "name = \"offline-writers\"\nseed = 9\ndevices = 20\ntopology = \"hybrid\"\nlan_group = 4\n\
        remote_peer_ppm = 200000\nduration_ms = 60000\nquiet_ms = 60000\nsync_interval_ms = 1000\n\
        [workload]\nwrites_per_min = 6.0\nitems = 30\n\
        [faults]\noffline_ppm = 300000\noffline_writes = true\nclock_skew_ms = 10000\nclock_skew_share_ppm = 300000\n\
        churn_per_min = 2.0\nchurn_away_ms = 5000\nchurn_share_ppm = 200000\n\
        [[windows]]\ndevice = 2\nonline_ms = [[20000, 25000], [50000, 55000]]\n";
    let report = check(text);
    let f = &report.faults;
    assert!(f.devices_offline > 0 && f.disconnections > 0 && f.datagrams_disconnected > 0, "{f:?}");
    assert!(f.devices_skewed > 0 && f.devices_skewed < 20, "a share of the devices is skewed: {f:?}");
    assert!(report.departures > 0);
    // The same run with the offline devices off: fewer writes (they made none while away).
    let off = run(
        &Scenario::parse(&text.replace("offline_writes = true", "offline_writes = false")).unwrap(),
        9,
        &mut |_, _| {},
    );
    assert!(off.failure.is_none(), "{:?}", off.failure);
    assert!(report.writes > off.writes, "offline writers wrote: {} against {}", report.writes, off.writes);
}

/// Every fault a small scenario configures acts, and removing any one of them changes the run's
/// trace hash: a scenario does what it says (issue 15: the default's NAT mix used to change
/// nothing).
#[test]
fn removing_any_configured_fault_changes_the_trace_hash() {
    const ALL: &str = "name = \"every-fault\"\nseed = 3\ndevices = 24\ntopology = \"hybrid\"\nlan_group = 4\n\
        remote_peer_ppm = 300000\nduration_ms = 60000\nquiet_ms = 60000\nsync_interval_ms = 1000\n\
        [network]\nloss_ppm = 30000\ndup_ppm = 20000\n\
        [workload]\nwrites_per_min = 6.0\nitems = 40\n\
        [nat]\nfull_cone_ppm = 250000\nport_restricted_ppm = 250000\nsymmetric_ppm = 250000\nmapping_timeout_ms = 3000\n\
        [faults]\ncrashes_per_min = 0.5\ndown_ms = 3000\nclock_skew_ms = 5000\nclock_drift_ppm = 500\noffline_ppm = 100000\n\
        churn_per_min = 2.0\nchurn_away_ms = 5000\ncloud_crashes_ms = [20000]\ncrash_before_commit_ppm = 20000\nlost_store_ppm = 300000\n\
        device_skews_ms = [[3, -40000]]\n\
        [[partitions]]\nat_ms = 10000\nheal_ms = 30000\nshare_ppm = 300000\n\
        [[windows]]\ndevice = 5\nonline_ms = [[10000, 20000], [40000, 45000]]\n";
    let all = check(ALL);
    assert!(all.inert_faults.is_empty(), "{:?}", all.inert_faults);
    let base = Scenario::parse(ALL).unwrap();
    type Removal = (&'static str, fn(&mut Scenario));
    let removals: [Removal; 16] = [
        ("the connectivity window", |s| s.windows.clear()),
        ("the device skew", |s| s.faults.device_skews_ms.clear()),
        ("loss", |s| s.network.loss_ppm = 0),
        ("duplication", |s| s.network.dup_ppm = 0),
        ("NATs", |s| s.nat = Default::default()),
        ("NAT mapping timeouts", |s| s.nat.mapping_timeout_ms = 0),
        ("remote peers", |s| s.remote_peer_ppm = 0),
        ("crashes", |s| s.faults.crashes_per_min = 0.0),
        ("clock skew", |s| s.faults.clock_skew_ms = 0),
        ("clock drift", |s| s.faults.clock_drift_ppm = 0),
        ("offline devices", |s| s.faults.offline_ppm = 0),
        ("churn", |s| s.faults.churn_per_min = 0.0),
        ("cloud crashes", |s| s.faults.cloud_crashes_ms.clear()),
        ("crashes before commit", |s| s.faults.crash_before_commit_ppm = 0),
        ("lost stores", |s| s.faults.lost_store_ppm = 0),
        ("the partition", |s| s.partitions.clear()),
    ];
    for (what, remove) in removals {
        let mut less = base.clone();
        remove(&mut less);
        let report = run(&less, less.seed, &mut |_, _| {});
        assert_ne!(report.trace_hash, all.trace_hash, "removing {what} changed nothing");
    }
}

/// Runs a scenario twice with its seed: the same trace, digest and fault counts.
fn check_replays(text: &str) -> netsim::Report {
    let first = check(text);
    let scenario = Scenario::parse(text).unwrap();
    let again = run(&scenario, scenario.seed, &mut |_, _| {});
    assert_eq!(first.trace_hash, again.trace_hash, "the same seed replays bit for bit");
    assert_eq!(first.digest, again.digest);
    assert_eq!(first.faults.cloud_crashes, again.faults.cloud_crashes);
    assert_eq!(first.faults.crashes_before_commit, again.faults.crashes_before_commit);
    assert_eq!(first.faults.stores_lost, again.faults.stores_lost);
    first
}

#[test]
fn the_cloud_crashes_and_restarts_with_no_lost_write() {
    let report = check_replays(include_str!("../scenarios/cloud-crash.toml"));
    assert_eq!(report.faults.cloud_crashes, 2, "both crashes happened");
}

#[test]
fn the_mesh_cloud_crashes_and_ticket_requests_are_retried() {
    let report = check_replays(include_str!("../scenarios/mesh-cloud-crash.toml"));
    assert_eq!(report.faults.cloud_crashes, 1);
    let mesh = report.mesh.as_ref().expect("mesh model");
    assert_eq!(mesh.forged_present, 0);
    // Ticket requests went out over the control plane, some were lost while the cloud was down
    // and retried: more requests than answers, and every device got fresh tickets after it.
    let requests = report.message_kinds.get("ticket").map_or(0, |k| k.0);
    let answers = report.message_kinds.get("ticket answer").map_or(0, |k| k.0);
    assert!(requests > answers, "{requests} ticket requests, {answers} answers");
    // 12 first tickets, then one refresh per device per 10 s over 90 s; the crash costs a few.
    assert!(mesh.tickets_issued >= 12 + 12 * 6, "{} tickets", mesh.tickets_issued);
    assert_eq!(mesh.refusals.get("ticket-expired"), None, "{:?}", mesh.refusals);
}

#[test]
fn a_device_crashing_before_it_commits_a_merge_loses_no_write() {
    let report = check_replays(include_str!("../scenarios/crash-before-commit.toml"));
    assert!(report.faults.crashes_before_commit >= 10, "{:?}", report.faults);
}

#[test]
fn a_device_that_lost_its_store_comes_back_as_a_new_endpoint() {
    let report = check_replays(include_str!("../scenarios/lost-store.toml"));
    assert!(report.faults.stores_lost >= 3, "{:?}", report.faults);
}

#[test]
fn slow_links_with_nat_timeouts_churn_and_a_bridge_partition_converge() {
    let report = check_replays(include_str!("../scenarios/slow-links.toml"));
    // Every fault it lists acted: churn, NAT mappings that expired and were punched again,
    // relayed and direct paths, packets lost and sent again over the stream transport.
    assert!(report.departures > 0, "churn");
    assert!(report.repunches > 0, "NAT mapping timeouts");
    assert!(report.relayed_paths > 0 && report.direct_paths > 0);
    assert!(report.packets > report.messages, "messages travel as packets");
    assert!(report.packets_retransmitted > 0);
}

#[test]
fn the_stream_transport_carries_every_fault_scenario() {
    // The same scenarios over QUIC-like streams instead of whole-message datagrams.
    for text in [
        include_str!("../scenarios/partition-heal.toml"),
        include_str!("../scenarios/crash-restart.toml"),
        include_str!("../scenarios/loss-30.toml"),
        include_str!("../scenarios/cloud-crash.toml"),
    ] {
        let at = text.find("\n[").expect("a section");
        let text = format!("{}\ntransport = \"stream\"{}", &text[..at], &text[at..]);
        let report = check(&text);
        assert!(report.packets >= report.messages);
    }
}

#[test]
fn one_seed_replays_bit_for_bit() {
    let scenario = Scenario::parse(include_str!("../scenarios/partition-heal.toml")).unwrap();
    let first = run(&scenario, 42, &mut |_, _| {});
    let second = run(&scenario, 42, &mut |_, _| {});
    let other = run(&scenario, 43, &mut |_, _| {});
    assert_eq!(first.trace_hash, second.trace_hash);
    assert_eq!(first.digest, second.digest);
    assert_eq!(first.events, second.events);
    assert_ne!(first.trace_hash, other.trace_hash, "another seed is another run");
}

#[test]
fn bad_scenarios_name_the_field() {
    let cases = [
        ("devices = 0\nduration_ms = 1000\n", "devices"),
        ("devices = 3\nduration_ms = 1000\nfrobs = 1\n", "frobs"),
        ("devices = 3\nduration_ms = 1000\n[network]\nloss_ppm = 1000000\n", "network.loss_ppm"),
        ("devices = 3\nduration_ms = 1000\ntopology = \"ring\"\n", "topology"),
        (
            "devices = 3\nduration_ms = 1000\n[[partitions]]\nat_ms = 5\nheal_ms = 1\nshare_ppm = 10\n",
            "heal_ms",
        ),
        ("devices = 3\n", "duration_ms"),
        (
            "devices = 3\nduration_ms = 1000\n[[partitions]]\nkind = \"ring\"\nat_ms = 1\nheal_ms = 5\ngroups = 2\n",
            "partitions.groups",
        ),
        ("devices = 3\nduration_ms = 1000\ngraph = { kind = \"scale_free\", m = 1 }\n", "graph"),
        (
            "devices = 5\nduration_ms = 1000\ntopology = \"mesh\"\ngraph = { kind = \"random_regular\", degree = 3 }\n",
            "graph",
        ),
        ("devices = 3\nduration_ms = 1000\n[faults]\nclock_drift_ppm = 200000\n", "faults.clock_drift_ppm"),
    ];
    for (text, field) in cases {
        let err = Scenario::parse(text).expect_err(text).to_string();
        assert!(err.contains(field), "{text:?}: {err}");
    }
}

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_feedmesh-sim")).args(args).output().expect("run feedmesh-sim")
}

#[test]
fn cli_json_and_exit_statuses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/crash-restart.toml");
    let out = sim(&["run", path, "--seed", "5", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "seed",
        "nodes",
        "events",
        "virtual_ms",
        "wall_ms",
        "converged",
        "convergence_ms_p50",
        "convergence_ms_p99",
        "convergence_ms_max",
        "writes",
        "lost_writes",
        "messages",
        "bytes",
        "digest",
        "trace_hash",
    ] {
        assert!(value.get(key).is_some(), "missing {key}");
    }
    assert_eq!(value["seed"], 5);
    let dir = tempfile_dir();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "devices = 3\nduration_ms = 1000\nloss = 1\n").unwrap();
    let out = sim(&["run", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loss"));
    assert_eq!(sim(&["run", "--nope"]).status.code(), Some(2));
    assert_eq!(sim(&["run", "/no/such/file.toml"]).status.code(), Some(2));
}

/// `replay` traces every event of the run (the faults at `debug`), and `--plot` draws it.
#[test]
fn replay_traces_and_plot_draws() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/crash-restart.toml");
    let out = sim(&["replay", path, "--seed", "5"]);
    assert_eq!(out.status.code(), Some(0));
    let trace = String::from_utf8_lossy(&out.stderr);
    for needle in ["tick", "session start", "send", "deliver", "kind=\"Hello\"", "kind=\"Changes\"", "crash"]
    {
        assert!(trace.contains(needle), "the trace has no {needle:?}");
    }
    let faults = sim(&["replay", path, "--seed", "5", "--filter", "netsim=debug"]);
    let faults = String::from_utf8_lossy(&faults.stderr);
    assert!(faults.contains("crash") && !faults.contains("deliver"), "debug shows faults only");
    assert_eq!(sim(&["replay", path, "--filter", "netsim=[=nonsense"]).status.code(), Some(2));
    let svg = tempfile_dir().join("run.svg");
    let out = sim(&["run", path, "--seed", "5", "--plot", svg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let text = std::fs::read_to_string(&svg).expect("the plot was written");
    assert!(text.starts_with("<svg") && text.contains("sampled writes") && text.contains("<polyline"));
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("feedmesh-sim-cli");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

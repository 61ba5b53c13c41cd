//! `feedmesh-sim`: runs convergence simulations. Only this binary reads the wall clock (for
//! `wall_ms` and the progress bar); neither enters the trace hash.
//!
//! Exit status: 0 when every check passes, 1 when one fails (the failed check and a command that
//! replays it are printed), 2 on a bad scenario or usage.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use netsim::{Report, Scenario};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(name = "feedmesh-sim", version, about = "Deterministic convergence simulations of feedmesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scenario (the embedded default when none is given) and report.
    Run {
        /// A scenario TOML file (see netsim/README.md and netsim/scenarios/).
        scenario: Option<PathBuf>,
        /// Override the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Print one JSON object instead of the readable report.
        #[arg(long)]
        json: bool,
        /// Also draw the run as SVG: the fraction of nodes holding each (sampled) write over
        /// virtual time.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Re-run a scenario and seed with full tracing of every event on stderr (send, deliver with
    /// message kind, session start and end, timers, writes, faults), then the report.
    Replay {
        /// A scenario TOML file (the embedded default when none is given).
        scenario: Option<PathBuf>,
        /// The seed to replay (as printed by a failing run).
        #[arg(long)]
        seed: Option<u64>,
        /// A tracing filter, e.g. `netsim=debug` for faults only (default: everything).
        #[arg(long, default_value = "netsim=trace")]
        filter: String,
    },
    /// Measure the simulator itself: events per second of the kernel and network model with
    /// no-op nodes (10^2 to 10^5 nodes), messages per second of real engine nodes, and memory.
    Bench {
        /// Node counts for the no-op kernel benchmark.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000,100000")]
        nodes: Vec<u32>,
        /// Events per no-op run (about).
        #[arg(long, default_value_t = 5_000_000)]
        events: u64,
        /// Devices of the engine-node runs (messages per second, then memory).
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        engine_nodes: Vec<u32>,
        /// Virtual seconds of each engine-node run.
        #[arg(long, default_value_t = 60)]
        engine_secs: u64,
        /// Writes per device per minute in the engine-node runs (0: idle feeds, so the figures
        /// are the sync machinery's own; otherwise item processing dominates).
        #[arg(long, value_delimiter = ',', default_value = "0")]
        engine_writes: Vec<f64>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Run a content experiment (Live Folders): one large file written on one device, fetched by
    /// every other device and the cloud under each source-choice policy; print a table, or JSON.
    Content {
        /// An experiment TOML file (e.g. netsim/experiments/content.toml).
        experiment: PathBuf,
        /// Override the experiment's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Also write the report as JSON to this file.
        #[arg(long, value_name = "FILE.json")]
        json: Option<PathBuf>,
    },
    /// Print the embedded default scenario.
    Default,
    /// Run a grid of parameters x seeds in parallel; write sweep.csv and sweep.json (see the
    /// README for the grid format). Exit 0 when every run passes, 1 when one fails, 2 on a bad grid.
    Sweep {
        /// A grid TOML file (e.g. netsim/sweeps/loss.toml).
        grid: PathBuf,
        /// Simulations run at once (default: the available cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Directory for sweep.csv, sweep.json and the scenarios of failing runs.
        #[arg(long, default_value = "sweep-out")]
        out: PathBuf,
        /// Run only the first seed of each cell: a quick look at a grid.
        #[arg(long)]
        quick: bool,
    },
    /// Swarm testing: each seed draws a whole scenario at random (see "Swarm testing" in
    /// netsim/README.md), runs it and demands convergence, no lost write and every invariant. A
    /// failing seed is shrunk and written to --out as a scenario file with the command that
    /// replays it. Exit 0 when every seed passes, 1 when one fails, 2 on bad usage.
    Swarm {
        /// How many seeds to run.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// The first seed (seeds `first..first + seeds` run).
        #[arg(long, default_value_t = 0)]
        first: u64,
        /// Simulations run at once (default: the available cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Directory for swarm.json and the scenarios of failing seeds.
        #[arg(long, default_value = "swarm-out")]
        out: PathBuf,
        /// At most this many simulations to shrink each failure (0: do not shrink).
        #[arg(long, default_value_t = 200)]
        shrink_runs: usize,
        /// Plant a bug in every node, to see the swarm find it: `cursor-skips-one-change`.
        #[arg(long)]
        plant: Option<String>,
    },
    /// Shrink a failing scenario and seed: reduce devices, faults, writes and duration while the
    /// same check keeps failing, then print the smallest failing scenario.
    Shrink {
        /// The failing scenario TOML file.
        scenario: PathBuf,
        /// The failing seed (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// Write the shrunk scenario here instead of to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// At most this many simulations.
        #[arg(long, default_value_t = 200)]
        max_runs: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Default => {
            print!("{}", netsim::scenario::DEFAULT);
            ExitCode::SUCCESS
        }
        Command::Run { scenario, seed, json, plot } => run(scenario, seed, json, plot),
        Command::Bench { nodes, events, engine_nodes, engine_secs, engine_writes, json } => {
            bench(&nodes, events, &engine_nodes, engine_secs, &engine_writes, json)
        }
        Command::Sweep { grid, jobs, out, quick } => sweep(&grid, jobs, &out, quick),
        Command::Content { experiment, seed, json } => content(&experiment, seed, json.as_deref()),
        Command::Swarm { seeds, first, jobs, out, shrink_runs, plant } => {
            swarm(seeds, first, jobs, &out, shrink_runs, plant.as_deref())
        }
        Command::Shrink { scenario, seed, out, max_runs } => {
            shrink(&scenario, seed, out.as_deref(), max_runs)
        }
        Command::Replay { scenario, seed, filter } => {
            let filter = match tracing_subscriber::EnvFilter::try_new(&filter) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("feedmesh-sim: bad --filter {filter:?}: {e}");
                    return ExitCode::from(2);
                }
            };
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .without_time()
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .init();
            run(scenario, seed, false, None)
        }
    }
}

/// Reads a scenario file, or the embedded default; the error is printed, naming the file.
fn load(path: &Option<PathBuf>) -> Result<(Scenario, String), ExitCode> {
    Ok(match path {
        None => (Scenario::default_scenario(), "the embedded default".to_string()),
        Some(path) => {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("feedmesh-sim: {}: {e}", path.display());
                    return Err(ExitCode::from(2));
                }
            };
            match Scenario::parse(&text) {
                Ok(s) => (s, path.display().to_string()),
                Err(e) => {
                    eprintln!("feedmesh-sim: {}: {e}", path.display());
                    return Err(ExitCode::from(2));
                }
            }
        }
    })
}

fn run(path: Option<PathBuf>, seed: Option<u64>, json: bool, plot: Option<PathBuf>) -> ExitCode {
    let (scenario, source) = match load(&path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let seed = seed.unwrap_or(scenario.seed);
    let started = Instant::now();
    let tracing_on = tracing::enabled!(target: "netsim", tracing::Level::TRACE);
    let bar = (!json && !tracing_on && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} simulating {pos}/{len} virtual ms [{bar:40}] {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut progress = |now: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(now);
        }
    };
    let report = netsim::run(&scenario, seed, &mut progress);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let wall_ms = started.elapsed().as_millis() as u64;
    if let Some(path) = &plot {
        if let Err(e) = plot_run(path, &report) {
            eprintln!("feedmesh-sim: {e}");
            return ExitCode::from(2);
        }
    }
    let replay = match &path {
        Some(p) => format!("feedmesh-sim run {} --seed {seed}", p.display()),
        None => format!("feedmesh-sim run --seed {seed}"),
    };
    if json {
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("wall_ms".into(), wall_ms.into());
            map.insert("replay".into(), replay.clone().into());
        }
        println!("{value}");
    } else {
        print_report(&report, &source, wall_ms);
    }
    match &report.failure {
        None => ExitCode::SUCCESS,
        Some(failure) => {
            eprintln!("feedmesh-sim: check failed: {failure}");
            eprintln!("feedmesh-sim: replay with: {replay}");
            ExitCode::from(1)
        }
    }
}

fn print_report(r: &Report, source: &str, wall_ms: u64) {
    let verdict = if r.failure.is_none() { "PASS" } else { "FAIL" };
    println!("feedmesh-sim: scenario \"{}\" from {source}, seed {}", r.scenario, r.seed);
    println!();
    println!("  nodes                {:>12}   (devices plus the cloud)", r.nodes);
    println!(
        "  virtual time         {:>12} ms  ({} events in {wall_ms} ms of wall time)",
        r.virtual_ms, r.events
    );
    println!("  writes               {:>12}", r.writes);
    println!("  sessions             {:>12}   ({} failed)", r.sessions_started, r.sessions_failed);
    for (reason, count) in &r.sessions_failed_by {
        println!("    failed: {reason:<16} {count:>8}");
    }
    println!(
        "  messages             {:>12}   ({} bytes, {} datagrams lost or cut)",
        r.messages, r.bytes, r.dropped
    );
    for (kind, (count, bytes)) in &r.message_kinds {
        println!("    {kind:<18} {count:>12}   ({bytes} bytes)");
    }
    println!(
        "  device pairs         {:>12}   talked directly (hole punched), {} through the relay ({} and {} datagrams)",
        r.direct_paths, r.relayed_paths, r.direct_datagrams, r.relayed_datagrams
    );
    if r.packets > 0 {
        println!(
            "  packets              {:>12}   ({} retransmitted; {} connections broke on their idle timeout)",
            r.packets, r.packets_retransmitted, r.connections_broken
        );
    }
    let f = &r.faults;
    println!("  faults applied");
    for (count, what) in [
        (f.device_crashes, "device crashes".to_string()),
        (r.departures, "departures (churn)".into()),
        (f.devices_offline, "devices offline for the run".into()),
        (
            f.disconnections,
            format!(
                "disconnections of devices left on ({} datagrams lost to them)",
                f.datagrams_disconnected
            ),
        ),
        (f.devices_skewed, "devices with a skewed clock".into()),
        (f.devices_drifting, "devices with a drifting clock".into()),
        (f.partitions_started, format!("partitions ({} datagrams stopped)", f.datagrams_partitioned)),
        (f.datagrams_lost, "datagrams lost".into()),
        (f.datagrams_duplicated, "datagrams duplicated".into()),
        (f.datagrams_reordered, "datagrams reordered (overtook one sent earlier on the same pair)".into()),
        (r.repunches, "NAT mappings expired and punched again".into()),
        (f.punches_failed, "direct paths not punched: the relay was down or cut off".into()),
        (f.datagrams_unrelayed, "datagrams no punched path nor relay could carry (relay = false)".into()),
        (f.writes_cut_off_by_removal, "writes of a removed member no one else held (excused)".into()),
        (r.queue_drops, "datagrams dropped by full uplink queues".into()),
        (f.cloud_crashes, "cloud crashes".into()),
        (f.crashes_before_commit, "crashes before commit".into()),
        (f.stores_lost, format!("stores lost ({} writes only they held)", f.writes_lost_with_store)),
    ] {
        if count > 0 {
            println!("    {count:>29}   {what}");
        }
    }
    if !r.inert_faults.is_empty() {
        println!("    configured, never applied:  {}", r.inert_faults.join(", "));
    }
    println!();
    if r.converged {
        println!("  converged            {:>12}   (every live replica holds digest {})", "yes", r.digest);
    } else {
        println!(
            "  converged            {:>12}   (live replicas differ; the first holds digest {})",
            "NO", r.digest
        );
    }
    println!("  lost writes          {:>12}", r.lost_writes);
    println!("  writes not everywhere{:>12}", r.unconverged_writes);
    let p = &r.propagation;
    println!(
        "  propagation          per write, to the {} devices online (median / p99 / max over {} writes, ms; log-linear histogram, within 1/16)",
        p.devices, p.writes
    );
    for (share, [p50, p99, max], short) in [
        ("50%", p.to_50_ms, p.short_of[0]),
        ("99%", p.to_99_ms, p.short_of[1]),
        ("100%", p.to_100_ms, p.short_of[2]),
    ] {
        let short = if short > 0 { format!("   ({short} writes never got there)") } else { String::new() };
        println!("    to {share:<4} of them    {p50:>9} / {p99} / {max}{short}");
    }
    println!(
        "  to every live node   p50 {} ms, p99 {} ms, max {} ms   (the cloud and offline devices included)",
        r.convergence_ms_p50, r.convergence_ms_p99, r.convergence_ms_max
    );
    let c = &r.conflicts;
    println!(
        "  conflicts            {:>12}   items hold {} conflicting versions; {} of them were written after the version that won",
        c.items, c.versions, c.later_edit_lost
    );
    if let Some(m) = &r.mesh {
        println!();
        println!(
            "  mesh model           {:>12}   devices must converge (honest, not removed)",
            m.expected_devices
        );
        println!(
            "  authorized sessions  {:>12}   done ({} tickets issued)",
            m.sessions_done, m.tickets_issued
        );
        for (reason, count) in &m.refusals {
            let first = m.refusal_first_ms.get(reason).copied().unwrap_or_default();
            println!("    refused {reason:<26} {count:>6}   (first at {first} ms)");
        }
        println!(
            "  forged versions      {:>12}   made, {} sessions refused one, {} in honest replicas",
            m.forged_made, m.forged_rejected, m.forged_present
        );
        println!(
            "  removal              {:>12}   devices knew it; {} versions leaked to the removed member ({} item states reached it in all)",
            m.removal_known_by, m.removed_leaks, m.removed_received
        );
    }
    println!("  trace hash           {}", r.trace_hash);
    println!();
    match &r.failure {
        None => println!("{verdict}: every check held."),
        Some(f) => println!("{verdict}: {f}"),
    }
}

/// Peak resident memory of this process so far, in bytes (Linux; 0 elsewhere).
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).map(|kb| kb * 1_024)
            })
        })
        .unwrap_or(0)
}

fn bench_scenario(text: &str) -> Result<Scenario, ExitCode> {
    Scenario::parse(text).map_err(|e| {
        eprintln!("feedmesh-sim: bench scenario: {e}");
        ExitCode::from(2)
    })
}

/// One timed run: (report, setup ms, loop ms).
fn timed(scenario: Scenario, seed: u64) -> (Report, f64, f64) {
    let t0 = Instant::now();
    let sim = netsim::sim::Sim::new(scenario, seed);
    let setup = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let mut report = sim.run(&mut |_, _| {});
    report.seed = seed;
    (report, setup, t1.elapsed().as_secs_f64() * 1e3)
}

/// `runs` timed runs of the same scenario and seed (the same events each time); the fastest.
fn best_of(runs: u32, scenario: &Scenario) -> (Report, f64, f64) {
    let mut best = timed(scenario.clone(), 1);
    for _ in 1..runs {
        let next = timed(scenario.clone(), 1);
        if next.2 < best.2 {
            best = next;
        }
    }
    best
}

fn bench(
    nodes: &[u32],
    events: u64,
    engine_nodes: &[u32],
    engine_secs: u64,
    engine_writes: &[f64],
    json: Option<PathBuf>,
) -> ExitCode {
    let mut results = Vec::new();
    println!("kernel and network model, no-op nodes (mesh, 1 s ticks, uniform 20-120 ms, 1% loss):");
    println!("  {:>8} {:>12} {:>10} {:>14} {:>10}", "nodes", "events", "loop ms", "events/s", "setup ms");
    for &n in nodes {
        // Each node ticks once a virtual second and each tick's datagram is delivered: ~2n events/s.
        let duration_ms = (events * 1_000 / (2 * u64::from(n.max(1)))).max(1_000);
        let text = format!(
            "name = \"noop-{n}\"\ndevices = {n}\ntopology = \"mesh\"\nmodel = \"noop\"\n\
             duration_ms = {duration_ms}\nquiet_ms = 0\nsync_interval_ms = 1000\n\
             [network]\nwan = {{ dist = \"uniform\", min_ms = 20, max_ms = 120 }}\nloss_ppm = 10000\n\
             [workload]\nwrites_per_min = 0.0\n"
        );
        let scenario = match bench_scenario(&text) {
            Ok(s) => s,
            Err(code) => return code,
        };
        // The best of three: a shared machine's noise only ever slows a run down.
        let (report, setup, ms) = best_of(3, &scenario);
        let rate = report.events as f64 / (ms / 1e3);
        println!("  {n:>8} {:>12} {ms:>10.0} {:>14.0} {setup:>10.0}", report.events, rate);
        results.push(serde_json::json!({
            "bench": "noop", "nodes": n, "events": report.events, "loop_ms": ms, "events_per_s": rate,
            "setup_ms": setup,
        }));
    }
    println!();
    println!(
        "engine nodes syncing (star: every device syncs with the cloud every 2-3 s; writes over 1,000 \
         items; 1% loss), {engine_secs} virtual s + 30 s quiet:"
    );
    println!(
        "  {:>8} {:>10} {:>10} {:>10} {:>14} {:>8} {:>12} {:>12}",
        "devices", "writes/min", "messages", "loop ms", "messages/s", "writes", "peak RSS MB", "bytes/node"
    );
    for (&rate, &n) in engine_writes.iter().flat_map(|r| engine_nodes.iter().map(move |n| (r, n))) {
        let text = format!(
            "name = \"engine-{n}\"\ndevices = {n}\ntopology = \"star\"\n\
             duration_ms = {}\nquiet_ms = 30000\nsync_interval_ms = 2000\n\
             [network]\nwan = {{ dist = \"uniform\", min_ms = 20, max_ms = 120 }}\nloss_ppm = 10000\n\
             [workload]\nwrites_per_min = {rate}\nitems = 1000\n",
            engine_secs * 1_000
        );
        let scenario = match bench_scenario(&text) {
            Ok(s) => s,
            Err(code) => return code,
        };
        // Small runs take the best of three; a 100,000-device run takes half a minute, once.
        let (report, _setup, ms) = best_of(if n <= 10_000 { 3 } else { 1 }, &scenario);
        let per_s = report.messages as f64 / (ms / 1e3);
        let rss = peak_rss();
        let per_node = rss / u64::from(n + 1);
        println!(
            "  {n:>8} {rate:>10} {:>10} {ms:>10.0} {:>14.0} {:>8} {:>12.0} {per_node:>12}   {}",
            report.messages,
            per_s,
            report.writes,
            rss as f64 / 1e6,
            if report.failure.is_none() { "converged" } else { "FAILED" }
        );
        results.push(serde_json::json!({
            "bench": "engine", "devices": n, "writes_per_min": rate, "messages": report.messages, "loop_ms": ms,
            "messages_per_s": per_s, "writes": report.writes, "peak_rss_bytes": rss,
            "rss_bytes_per_node": per_node, "converged": report.converged, "failure": report.failure,
        }));
    }
    println!();
    println!(
        "Each row is the fastest of three identical runs (one for 100,000 devices). Peak RSS is the \
         process's high-water mark so far (it includes every earlier run)."
    );
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&results).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("feedmesh-sim: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

/// Draws the fraction of replica-holding nodes that have each sampled write, over virtual time.
fn plot_run(path: &std::path::Path, report: &Report) -> Result<(), netsim::plot::PlotError> {
    use netsim::plot::{Chart, Series};
    let total = f64::from(report.replica_nodes.max(1));
    let mut series = Vec::new();
    for (i, (at, times)) in report.timelines.iter().enumerate().take(netsim::plot::SERIES_MAX) {
        // A step curve: one point per node reached (at most a few hundred points per write).
        let mut times = times.clone();
        times.sort_unstable();
        let stride = (times.len() / 200).max(1);
        let mut points = vec![(*at as f64 / 1e6, 0.0)];
        for (k, t) in times.iter().enumerate() {
            if k % stride == 0 || k + 1 == times.len() {
                points.push((*t as f64 / 1e6, (k + 1) as f64 / total));
            }
        }
        points.push((report.virtual_ms as f64 / 1e3, times.len() as f64 / total));
        let name = if i == 0 { format!("{} sampled writes", report.timelines.len()) } else { String::new() };
        series.push(Series::line(name, points).with_color(netsim::plot::PALETTE[i % 10]));
    }
    let title = format!("{} (seed {}): fraction of nodes holding each write", report.scenario, report.seed);
    let chart = Chart {
        title: &title,
        x_label: "virtual time (s)",
        y_label: "fraction of nodes",
        log_x: false,
        y_range: Some((0.0, 1.0)),
    };
    netsim::plot::write_svg(path, &chart, &series)
}

fn content(path: &Path, seed: Option<u64>, json: Option<&Path>) -> ExitCode {
    use netsim::content;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("feedmesh-sim: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let mut experiment: content::ContentScenario = match toml::from_str(&text) {
        Ok(experiment) => experiment,
        Err(e) => {
            eprintln!("feedmesh-sim: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    if let Some(seed) = seed {
        experiment.seed = seed;
    }
    let started = std::time::Instant::now();
    let report = match content::run(&experiment) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("feedmesh-sim: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    print!("{}", content::table(&report));
    println!("({:.1} s of wall time)", started.elapsed().as_secs_f64());
    if let Some(json) = json {
        let text = match serde_json::to_string_pretty(&report) {
            Ok(text) => text + "\n",
            Err(e) => {
                eprintln!("feedmesh-sim: {e}");
                return ExitCode::from(2);
            }
        };
        if let Err(e) = std::fs::write(json, text) {
            eprintln!("feedmesh-sim: {}: {e}", json.display());
            return ExitCode::from(2);
        }
    }
    let all_done = report.runs.iter().all(|r| r.done_s.iter().all(Option::is_some));
    if all_done {
        ExitCode::SUCCESS
    } else {
        eprintln!("feedmesh-sim: some device did not get the file within limit_s (see the table)");
        ExitCode::from(1)
    }
}

fn sweep(grid_path: &Path, jobs: Option<usize>, out: &Path, quick: bool) -> ExitCode {
    use netsim::sweep;
    let plan = match sweep::Grid::load(grid_path).and_then(|mut grid| {
        if quick {
            grid.seeds.truncate(1);
        }
        grid.plan()
    }) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("feedmesh-sim: {}: {e}", grid_path.display());
            return ExitCode::from(2);
        }
    };
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if jobs == 0 {
        eprintln!("feedmesh-sim: --jobs must be at least 1");
        return ExitCode::from(2);
    }
    if let Err(e) = std::fs::create_dir_all(out) {
        eprintln!("feedmesh-sim: {}: {e}", out.display());
        return ExitCode::from(2);
    }
    eprintln!(
        "feedmesh-sim: sweep {}: {} cells x {} seeds = {} runs on {jobs} threads",
        grid_path.display(),
        plan.cells.len(),
        plan.seeds.len(),
        plan.runs()
    );
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(plan.runs() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {pos}/{len} runs [{bar:40}] {elapsed} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let started = Instant::now();
    let clock_ms = || started.elapsed().as_millis() as u64;
    let rows = sweep::run(&plan, jobs, &clock_ms, &|_| {
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let wall_ms = started.elapsed().as_millis();
    let mut files = vec![
        (out.join("sweep.csv"), sweep::csv(&plan, &rows)),
        (out.join("sweep.json"), format!("{:#}\n", sweep::json(&plan, &rows))),
    ];
    let failed: Vec<&sweep::Row> = rows.iter().filter(|r| r.report.failure.is_some()).collect();
    for row in &failed {
        files.push((out.join(sweep::failure_file(row)), sweep::scenario_toml(&plan, row)));
    }
    for (path, text) in &files {
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("feedmesh-sim: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    print_cells(&plan, &rows);
    println!(
        "{} runs, {} failed, {wall_ms} ms of wall time; wrote {} and {}",
        rows.len(),
        failed.len(),
        files[0].0.display(),
        files[1].0.display()
    );
    for row in &failed {
        let params: Vec<String> = plan.cells[row.cell]
            .params
            .iter()
            .map(|(p, v)| format!("{p} = {}", sweep::display_value(v)))
            .collect();
        eprintln!(
            "feedmesh-sim: cell {} ({}) seed {}: {}",
            row.cell,
            params.join(", "),
            row.seed,
            row.report.failure.as_deref().unwrap_or_default()
        );
        eprintln!(
            "feedmesh-sim:   replay with: feedmesh-sim run {} --seed {}",
            out.join(sweep::failure_file(row)).display(),
            row.seed
        );
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// One line per cell: its parameters, failures, and means over its seeds.
fn print_cells(plan: &netsim::sweep::Plan, rows: &[netsim::sweep::Row]) {
    for (index, cell) in plan.cells.iter().enumerate() {
        let mine: Vec<&Report> = rows.iter().filter(|r| r.cell == index).map(|r| &r.report).collect();
        let n = mine.len().max(1) as u64;
        let mean = |f: fn(&Report) -> u64| mine.iter().map(|r| f(r)).sum::<u64>() / n;
        let params: Vec<String> =
            cell.params.iter().map(|(p, v)| format!("{p}={}", netsim::sweep::display_value(v))).collect();
        println!(
            "cell {index:>3} {:<40} failed {}/{}  p50 {} ms  p99 {} ms  max {} ms  messages {}  sessions failed {}",
            params.join(" "),
            mine.iter().filter(|r| r.failure.is_some()).count(),
            mine.len(),
            mean(|r| r.convergence_ms_p50),
            mean(|r| r.convergence_ms_p99),
            mean(|r| r.convergence_ms_max),
            mean(|r| r.messages),
            mean(|r| r.sessions_failed),
        );
    }
}

/// One line per shrink attempt, on stderr.
fn print_attempt(a: &netsim::shrink::Attempt<'_>, started: &Instant) {
    use netsim::shrink;
    let outcome = match (a.failure, a.kept) {
        (None, _) => "passes".to_string(),
        (Some(f), true) => format!("fails ({}): kept", shrink::failure_kind(f)),
        (Some(f), false) => format!("fails ({}): not kept", shrink::failure_kind(f)),
    };
    eprintln!(
        "shrink: run {:>3} [{:>6} ms] {:<36} seed {:<20} {outcome}",
        a.run,
        started.elapsed().as_millis(),
        a.change,
        a.seed
    );
}

fn shrink(path: &Path, seed: Option<u64>, out: Option<&Path>, max_runs: usize) -> ExitCode {
    use netsim::shrink;
    if max_runs == 0 {
        eprintln!("feedmesh-sim: --max-runs must be at least 1");
        return ExitCode::from(2);
    }
    let (scenario, source) = match load(&Some(path.to_path_buf())) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let seed = seed.unwrap_or(scenario.seed);
    let started = Instant::now();
    let mut observe = |a: &shrink::Attempt<'_>| print_attempt(a, &started);
    let Some(shrunk) = shrink::shrink_observed(&scenario, seed, shrink::simulate, max_runs, &mut observe)
    else {
        eprintln!("feedmesh-sim: {source} passes with seed {seed}: nothing to shrink");
        return ExitCode::from(1);
    };
    let target = out.map_or_else(|| "<this file>".to_string(), |p| p.display().to_string());
    let replay = format!("feedmesh-sim run {target} --seed {}", shrunk.seed);
    let text = match shrink::replay_file(&shrunk, &source, seed, &target) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("feedmesh-sim: cannot write the shrunk scenario: {e}");
            return ExitCode::from(2);
        }
    };
    match out {
        Some(p) => {
            if let Err(e) = std::fs::write(p, &text) {
                eprintln!("feedmesh-sim: {}: {e}", p.display());
                return ExitCode::from(2);
            }
        }
        None => print!("{text}"),
    }
    eprintln!(
        "feedmesh-sim: shrunk to {} devices, seed {}, in {} runs ({}): {}",
        shrunk.scenario.devices,
        shrunk.seed,
        shrunk.runs,
        if shrunk.minimal { "minimal" } else { "budget ran out" },
        shrunk.failure
    );
    eprintln!("feedmesh-sim: replay with: {replay}");
    ExitCode::SUCCESS
}

fn swarm(
    seeds: u64,
    first: u64,
    jobs: Option<usize>,
    out: &Path,
    shrink_runs: usize,
    plant: Option<&str>,
) -> ExitCode {
    use netsim::swarm;
    let plant = match plant.map(|p| toml::Value::String(p.to_string()).try_into::<engine::sync::PlantedBug>())
    {
        None => None,
        Some(Ok(bug)) => Some(bug),
        Some(Err(_)) => {
            eprintln!("feedmesh-sim: --plant: unknown bug (known: cursor-skips-one-change)");
            return ExitCode::from(2);
        }
    };
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if jobs == 0 || seeds == 0 {
        eprintln!("feedmesh-sim: --jobs and --seeds must be at least 1");
        return ExitCode::from(2);
    }
    if let Err(e) = std::fs::create_dir_all(out) {
        eprintln!("feedmesh-sim: {}: {e}", out.display());
        return ExitCode::from(2);
    }
    eprintln!(
        "feedmesh-sim: swarm: seeds {first}..{} on {jobs} threads{}",
        first.saturating_add(seeds),
        plant.map_or(String::new(), |b| format!(", bug planted: {b:?}"))
    );
    let started = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(seeds);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {pos}/{len} seeds [{bar:40}] {elapsed} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let failed_so_far = std::sync::atomic::AtomicU64::new(0);
    let runs = swarm::run_seeds(first, seeds, jobs, plant, &|run| {
        if let Some(failure) = &run.report.failure {
            let n = failed_so_far.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let line = format!("seed {} fails: {failure}", run.seed);
            match &bar {
                Some(bar) => {
                    bar.set_message(format!("{n} failed"));
                    bar.println(line);
                }
                None => eprintln!("feedmesh-sim: {line}"),
            }
        }
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let run_ms = started.elapsed().as_millis() as u64;
    let summary = swarm::Summary::of(&runs);
    summary.print();
    let mut failures = Vec::new();
    for run in runs.iter().filter(|r| r.report.failure.is_some()) {
        let failure = run.report.failure.clone().unwrap_or_default();
        let original = out.join(format!("swarm-{}-original.toml", run.seed));
        let mut entry = serde_json::json!({
            "seed": run.seed,
            "failure": failure,
            "devices": run.scenario.devices,
            "original": original.display().to_string(),
            "replay_original": format!("feedmesh-sim run {} --seed {}", original.display(), run.seed),
        });
        let text = match toml::to_string(&run.scenario) {
            Ok(body) => format!(
                "# Drawn by feedmesh-sim swarm, seed {}; fails: {failure}\n# Replay: feedmesh-sim run {} --seed {}\n{body}",
                run.seed,
                original.display(),
                run.seed
            ),
            Err(e) => {
                eprintln!("feedmesh-sim: cannot write seed {}'s scenario: {e}", run.seed);
                return ExitCode::from(2);
            }
        };
        if let Err(e) = std::fs::write(&original, text) {
            eprintln!("feedmesh-sim: {}: {e}", original.display());
            return ExitCode::from(2);
        }
        println!("seed {} fails: {failure}", run.seed);
        println!("  replay: feedmesh-sim run {} --seed {}", original.display(), run.seed);
        if shrink_runs > 0 {
            eprintln!("feedmesh-sim: shrinking seed {} (at most {shrink_runs} runs)", run.seed);
            let shrink_started = Instant::now();
            let mut observe = |a: &netsim::shrink::Attempt<'_>| print_attempt(a, &shrink_started);
            let source = format!("swarm seed {}", run.seed);
            if let Some(shrunk) = netsim::shrink::shrink_observed(
                &run.scenario,
                run.seed,
                netsim::shrink::simulate,
                shrink_runs,
                &mut observe,
            ) {
                let path = out.join(format!("swarm-{}.toml", run.seed));
                let target = path.display().to_string();
                match netsim::shrink::replay_file(&shrunk, &source, run.seed, &target)
                    .map_err(|e| e.to_string())
                    .and_then(|text| std::fs::write(&path, text).map_err(|e| e.to_string()))
                {
                    Ok(()) => {}
                    Err(e) => {
                        eprintln!("feedmesh-sim: {target}: {e}");
                        return ExitCode::from(2);
                    }
                }
                println!(
                    "  shrunk to {} devices in {} runs ({}): {}",
                    shrunk.scenario.devices,
                    shrunk.runs,
                    if shrunk.minimal { "minimal" } else { "budget ran out" },
                    shrunk.failure
                );
                println!("  replay: feedmesh-sim run {target} --seed {}", shrunk.seed);
                entry["shrunk"] = serde_json::json!({
                    "file": target,
                    "devices": shrunk.scenario.devices,
                    "seed": shrunk.seed,
                    "failure": shrunk.failure,
                    "runs": shrunk.runs,
                    "minimal": shrunk.minimal,
                    "reductions": shrunk.kept,
                    "replay": format!("feedmesh-sim run {target} --seed {}", shrunk.seed),
                });
            }
        }
        failures.push(entry);
    }
    let json = serde_json::json!({
        "first": first,
        "seeds": seeds,
        "jobs": jobs,
        "planted_bug": plant.map(|b| format!("{b:?}")),
        "run_ms": run_ms,
        "summary": summary.json(),
        "failures": failures,
    });
    let path = out.join("swarm.json");
    if let Err(e) = std::fs::write(&path, format!("{json:#}\n")) {
        eprintln!("feedmesh-sim: {}: {e}", path.display());
        return ExitCode::from(2);
    }
    println!("wrote {} ({} ms of wall time for the runs)", path.display(), run_ms);
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

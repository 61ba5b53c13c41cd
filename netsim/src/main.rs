//! `feedmesh-sim`: runs convergence simulations. Only this binary reads the wall clock (for
//! `wall_ms` and the progress bar); neither enters the trace hash.
//!
//! Exit status: 0 when every check passes, 1 when one fails (the failed check and a command that
//! replays it are printed), 2 on a bad scenario or usage.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use netsim::{Report, Scenario};

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
        #[arg(long, value_delimiter = ',', default_value = "0,0.05")]
        engine_writes: Vec<f64>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Print the embedded default scenario.
    Default,
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
    println!(
        "  messages             {:>12}   ({} bytes, {} datagrams lost or cut)",
        r.messages, r.bytes, r.dropped
    );
    for (kind, (count, bytes)) in &r.message_kinds {
        println!("    {kind:<18} {count:>12}   ({bytes} bytes)");
    }
    println!(
        "  device paths         {:>12}   direct, {} relayed through the cloud",
        r.direct_paths, r.relayed_paths
    );
    println!();
    println!(
        "  converged            {:>12}   (all live replicas hold digest {})",
        yes(r.converged),
        r.digest
    );
    println!("  lost writes          {:>12}", r.lost_writes);
    println!("  writes not everywhere{:>12}", r.unconverged_writes);
    println!(
        "  propagation          p50 {} ms, p99 {} ms, max {} ms   (write to every live node)",
        r.convergence_ms_p50, r.convergence_ms_p99, r.convergence_ms_max
    );
    println!("  trace hash           {}", r.trace_hash);
    println!();
    match &r.failure {
        None => println!("{verdict}: every check held."),
        Some(f) => println!("{verdict}: {f}"),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
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
        let (report, setup, ms) = timed(scenario, 1);
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
        let (report, _setup, ms) = timed(scenario, 1);
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
    println!("Peak RSS is the process's high-water mark so far (it includes every earlier run).");
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

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
        Command::Run { scenario, seed, json } => run(scenario, seed, json),
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
            run(scenario, seed, false)
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

fn run(path: Option<PathBuf>, seed: Option<u64>, json: bool) -> ExitCode {
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

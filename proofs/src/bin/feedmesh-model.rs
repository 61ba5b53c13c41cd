//! Model-checks the authorized sync protocol at a bound and prints (or writes as JSON) the state
//! counts and which properties held. `proofs/README.md` explains the model; the default suite
//! runs the small bound (`proofs/tests/model.rs`).

use clap::Parser;
use proofs::model::{check, configurations};

/// Model-check feedmesh's authorized sync protocol (the engine's own state machines).
#[derive(Parser)]
#[command(name = "feedmesh-model")]
struct Args {
    /// `small` (what CI checks) or `large` (more loss, duplication and writes).
    #[arg(long, default_value = "small", value_parser = ["small", "large"])]
    bound: String,
    /// Checker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also write the reports as JSON to this file (e.g. papers/results/model-check.json).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Only the configurations whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Override every configuration's depth bound (steps from the start).
    #[arg(long)]
    max_depth: Option<usize>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let large = args.bound == "large";
    let mut rows = Vec::new();
    let mut failed = false;
    for mut config in configurations(large) {
        if args.only.as_ref().is_some_and(|o| !config.name.contains(o.as_str())) {
            continue;
        }
        if args.max_depth.is_some() {
            config.max_depth = args.max_depth;
        }
        eprintln!(
            "checking {} ({:?}, {} writes, {} sessions) ...",
            config.name, config.faults, config.writes, config.sessions
        );
        let report = check(&config, args.threads);
        println!(
            "{:<40} {:>10} distinct states {:>11} generated  depth {:>3}  {:>7.1} s",
            report.name, report.distinct_states, report.generated_states, report.max_depth, report.seconds
        );
        for (property, holds) in &report.properties {
            println!("    {:<60} {}", property, if *holds { "holds" } else { "FAILS" });
        }
        if let Some(c) = &report.counterexample {
            failed = true;
            println!("{c}");
        }
        rows.push(serde_json::json!({
            "configuration": report.name,
            "faults": {
                "lose": config.faults.lose,
                "duplicate": config.faults.duplicate,
                "corrupt": config.faults.corrupt,
                "early_timers": config.faults.early_timers,
                "timers_only_when_idle": config.faults.timely,
            },
            "writes_per_member": config.writes,
            "sessions": config.sessions,
            "max_depth": config.max_depth,
            "distinct_states": report.distinct_states,
            "generated_states": report.generated_states,
            "properties": report.properties.iter().map(|(p, h)| serde_json::json!({"property": p, "holds": h})).collect::<Vec<_>>(),
        }));
    }
    if let Some(path) = args.json {
        let doc = serde_json::json!({
            "experiment": "model-check",
            "command": format!("cargo run --release -p feedmesh-proofs --bin feedmesh-model -- --bound {} --json {}", args.bound, path.display()),
            "checker": "stateright 0.31, depth-first, exhaustive within the bounds",
            "bound": args.bound,
            "configurations": rows,
        });
        let text = serde_json::to_string_pretty(&doc).expect("JSON of plain values") + "\n";
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("feedmesh-model: cannot write {}: {e}", path.display());
            return std::process::ExitCode::from(2);
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

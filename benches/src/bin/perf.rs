//! `perf`: issue 16's headline numbers in one command, written to `papers/results/perf.json` and
//! printed as the table README.md shows.
//!
//! It builds the release binaries it runs (unless `--no-build`), then runs, one after another so
//! that no two share the cores:
//! 1. `e2e_sync`: 10^5 batch-signed items from A to B, direct and relayed (best of 3), beside a
//!    bare iroh stream, a bare stream into a synced file, and checking the signatures alone; then
//!    again with `--preverified` (B holds the checked signatures first: item 3's measurement of
//!    the rest of the pipeline against the bare stream into a synced file);
//! 2. `restart`: a node and a relay opening a store of 10^6 items (best of 3);
//! 3. the criterion `merge` bench at n = 10^5 (c in {0, 0.01, 1}, h in {1, 8}: every cell automerge
//!    runs at), feedmesh beside automerge in one group per cell;
//! 4. `feedmesh-sim bench` (10^5 engine devices);
//! 5. `feedmesh-sim run` of `hot-items.toml` and `uniform-items.toml`: events per second of each;
//! 6. `e2e_sync --idle-devices 1000`: the relay's memory per idle connected device.
//!
//! `--quick` runs every step at a small size, one run each (a smoke run of the whole pipeline in a
//! few minutes): its figures are not the headline ones and the JSON says so.
//!
//! Usage (from anywhere in the workspace):
//! `cargo run --release -p feedmesh-benches --bin perf -- [--quick] [--json FILE] [--no-build]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use benches::report::{machine, merge_results, scan, workspace_dir};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "Issue 16's headline numbers in one command: papers/results/perf.json and a table")]
struct Args {
    /// Small sizes and one run of each step: a smoke run of the pipeline, not figures to quote.
    #[arg(long)]
    quick: bool,
    /// Where to write the results (relative to the workspace root).
    #[arg(long, default_value = "papers/results/perf.json")]
    json: PathBuf,
    /// Do not `cargo build --release` the binaries first (they must be there already).
    #[arg(long)]
    no_build: bool,
}

/// The sizes of one run.
struct Sizes {
    items: usize,
    runs: usize,
    restart_items: usize,
    merge_items: usize,
    engine_nodes: usize,
    idle_devices: usize,
}

impl Sizes {
    fn of(quick: bool) -> Self {
        if quick {
            Self {
                items: 10_000,
                runs: 1,
                restart_items: 10_000,
                merge_items: 10_000,
                engine_nodes: 1_000,
                idle_devices: 100,
            }
        } else {
            Self {
                items: 100_000,
                runs: 3,
                restart_items: 1_000_000,
                merge_items: 100_000,
                engine_nodes: 100_000,
                idle_devices: 1_000,
            }
        }
    }
}

/// Runs `program` with `args` in the workspace, its output passed through; fails on a non-zero
/// exit with the command line.
fn run(program: &Path, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<()> {
    let mut command = Command::new(program);
    command.args(args).current_dir(workspace_dir());
    for (k, v) in env {
        command.env(k, v);
    }
    let line = format!("{} {}", program.display(), args.join(" "));
    let status = command.status().with_context(|| format!("starting {line}"))?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}

/// Runs `program` and parses its standard output as JSON.
fn run_json(program: &Path, args: &[&str]) -> anyhow::Result<Value> {
    let line = format!("{} {}", program.display(), args.join(" "));
    let out = Command::new(program)
        .args(args)
        .current_dir(workspace_dir())
        .output()
        .with_context(|| format!("starting {line}"))?;
    if !out.status.success() {
        bail!("{line} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{line} printed no JSON"))
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn num(v: &Value, pointer: &str) -> anyhow::Result<f64> {
    v.pointer(pointer).and_then(Value::as_f64).with_context(|| format!("no number at {pointer}"))
}

/// One headline figure: what, how much, the goal and whether it is met (`None`: reported only).
fn figure(name: &str, value: f64, unit: &str, goal: &str, met: Option<bool>) -> Value {
    json!({ "figure": name, "value": (value * 1000.0).round() / 1000.0, "unit": unit, "goal": goal, "met": met })
}

fn step(n: usize, what: &str) {
    println!("\n=== perf [{n}/6] {what}");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sizes = Sizes::of(args.quick);
    let root = workspace_dir();
    let bin = root.join("target").join("release");
    let bin = |name: &str| {
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from);
        target.map_or_else(|| bin.join(name), |t| t.join("release").join(name))
    };
    let scratch = tempfile::tempdir()?;
    let tmp = |name: &str| scratch.path().join(name).to_string_lossy().into_owned();
    let started = Instant::now();

    if !args.no_build {
        println!("=== perf: building the release binaries");
        let cargo = std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
        run(
            &cargo,
            &[
                "build",
                "--release",
                "-p",
                "feedmesh-netsim",
                "-p",
                "feedmesh-relay",
                "-p",
                "feedmesh-benches",
                "--bins",
            ],
            &[],
        )?;
    }

    step(1, &format!("end-to-end sync of {} items, direct and relayed", sizes.items));
    let (items, runs) = (sizes.items.to_string(), sizes.runs.to_string());
    run(&bin("e2e_sync"), &["--items", &items, "--runs", &runs, "--json", &tmp("e2e.json")], &[])?;
    // Item 3: the same, with B given the checked signatures first (verification out of the
    // measurement), each mode beside its own bare stream into a synced file (its own section).
    run(
        &bin("e2e_sync"),
        &["--items", &items, "--runs", &runs, "--preverified", "--json", &tmp("e2e.json")],
        &[],
    )?;
    let e2e = read_json(&scratch.path().join("e2e.json"))?;
    let mode = |section: &str, name: &str| -> anyhow::Result<Value> {
        e2e.pointer(&format!("/{section}/modes"))
            .and_then(Value::as_array)
            .and_then(|modes| modes.iter().find(|m| m["mode"] == name))
            .cloned()
            .with_context(|| format!("no {name} mode in e2e_sync's {section} results"))
    };
    let (direct, relayed) = (mode("sync", "direct")?, mode("sync", "relayed")?);
    let (pre_direct, pre_relayed) =
        (mode("sync_preverified", "direct")?, mode("sync_preverified", "relayed")?);

    step(2, &format!("restart with {} items", sizes.restart_items));
    let restart_items = sizes.restart_items.to_string();
    run(&bin("restart"), &["--items", &restart_items, "--runs", &runs, "--json", &tmp("restart.json")], &[])?;
    let restart = read_json(&scratch.path().join("restart.json"))?;

    step(3, &format!("merge beside automerge at n = {}", sizes.merge_items));
    let cargo = std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
    let mut merge_env =
        vec![("FEEDMESH_BENCH_QUICK", "1".to_string()), ("FEEDMESH_BENCH_N", sizes.merge_items.to_string())];
    if !args.quick {
        merge_env.push(("FEEDMESH_BENCH_C", "0,0.01,1".to_string()));
        merge_env.push(("FEEDMESH_BENCH_H", "1,8".to_string()));
    }
    run(&cargo, &["bench", "-p", "feedmesh-benches", "--bench", "merge"], &merge_env)?;
    let criterion = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("criterion");
    let merge = merge_results(&scan(&criterion)?, machine(""));
    let merge_cells: Vec<_> = merge.cells.iter().filter(|c| c.items == sizes.merge_items).collect();
    let speedups: Vec<f64> = merge_cells.iter().filter_map(|c| c.feedmesh_speedup_over_automerge).collect();
    if speedups.is_empty() {
        bail!(
            "the merge bench left no n={} cell with both engines in {}",
            sizes.merge_items,
            criterion.display()
        );
    }
    let min_speedup = speedups.iter().copied().fold(f64::INFINITY, f64::min);

    step(4, &format!("feedmesh-sim bench, {} engine devices", sizes.engine_nodes));
    let engine_nodes = sizes.engine_nodes.to_string();
    run(
        &bin("feedmesh-sim"),
        &[
            "bench",
            "--nodes",
            "100",
            "--events",
            "1000",
            "--engine-nodes",
            &engine_nodes,
            "--json",
            &tmp("sim.json"),
        ],
        &[],
    )?;
    let sim = read_json(&scratch.path().join("sim.json"))?;

    step(5, "hot items against a uniform workload in feedmesh-sim");
    let scenario =
        |name: &str| root.join("netsim").join("scenarios").join(name).to_string_lossy().into_owned();
    let hot = run_json(&bin("feedmesh-sim"), &["run", &scenario("hot-items.toml"), "--json"])?;
    let uniform = run_json(&bin("feedmesh-sim"), &["run", &scenario("uniform-items.toml"), "--json"])?;
    let rate = |r: &Value| -> anyhow::Result<f64> { Ok(num(r, "/events")? / (num(r, "/wall_ms")? / 1000.0)) };
    let (hot_rate, uniform_rate) = (rate(&hot)?, rate(&uniform)?);

    step(6, &format!("relay memory with {} idle devices", sizes.idle_devices));
    let devices = sizes.idle_devices.to_string();
    run(&bin("e2e_sync"), &["--idle-devices", &devices, "--json", &tmp("idle.json")], &[])?;
    let idle = read_json(&scratch.path().join("idle.json"))?;

    let direct_rate = num(&direct, "/feedmesh/items_per_s")?;
    let relayed_rate = num(&relayed, "/feedmesh/items_per_s")?;
    let verify_rate = sizes.items as f64 / num(&direct, "/receive_floor/verify_seconds")?.max(1e-9);
    let restart_node = num(&restart, "/node_open_seconds")?;
    let restart_relay = num(&restart, "/relay_load_seconds")?;
    let idle_kib = num(&idle, "/idle_devices/relay_bytes_per_connected_device")? / 1024.0;
    let headline = vec![
        figure("direct sync, items/s", direct_rate, "items/s", ">= 60,000", Some(direct_rate >= 60_000.0)),
        figure(
            "relayed / direct",
            relayed_rate / direct_rate,
            "ratio",
            ">= 0.9",
            Some(relayed_rate >= 0.9 * direct_rate),
        ),
        figure(
            "direct / checking the signatures alone",
            direct_rate / verify_rate,
            "ratio",
            "reported",
            None,
        ),
        figure(
            "direct vs bare stream into a file (with verification)",
            num(&direct, "/throughput_vs_bare_file")?,
            "ratio",
            "reported",
            None,
        ),
        figure(
            "direct vs bare stream into a file, pre-verified",
            num(&pre_direct, "/throughput_vs_bare_file")?,
            "ratio",
            ">= 0.5",
            Some(num(&pre_direct, "/throughput_vs_bare_file")? >= 0.5),
        ),
        figure(
            "relayed vs bare stream into a file, pre-verified",
            num(&pre_relayed, "/throughput_vs_bare_file")?,
            "ratio",
            ">= 0.5",
            Some(num(&pre_relayed, "/throughput_vs_bare_file")? >= 0.5),
        ),
        figure("node restart", restart_node, "s", "<= 2", Some(restart_node <= 2.0)),
        figure("relay restart", restart_relay, "s", "<= 2", Some(restart_relay <= 2.0)),
        figure("merge vs automerge, worst cell", min_speedup, "x", ">= 100", Some(min_speedup >= 100.0)),
        figure("relay memory per idle device", idle_kib, "KiB", "<= 64", Some(idle_kib <= 64.0)),
        figure(
            "hot / uniform events per second",
            hot_rate / uniform_rate,
            "ratio",
            ">= 0.5",
            Some(hot_rate >= 0.5 * uniform_rate),
        ),
    ];
    let out = json!({
        "benchmark": "perf",
        "command": "cargo run --release -p feedmesh-benches --bin perf",
        "quick": args.quick,
        "note": if args.quick { "--quick: small sizes, one run each; a smoke run, not headline figures" } else { "" },
        "machine": machine(""),
        "seconds": started.elapsed().as_secs_f64().round(),
        "headline": headline,
        "e2e_sync": e2e["sync"],
        "e2e_sync_preverified": e2e["sync_preverified"],
        "restart": restart,
        "merge_cells": merge_cells,
        "simulator_bench": sim,
        "hot_items": { "events": hot["events"], "wall_ms": hot["wall_ms"], "events_per_s": hot_rate.round() },
        "uniform_items": { "events": uniform["events"], "wall_ms": uniform["wall_ms"], "events_per_s": uniform_rate.round() },
        "idle_devices": idle["idle_devices"],
    });
    let path = root.join(&args.json);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, format!("{:#}\n", out)).with_context(|| format!("writing {}", path.display()))?;

    let m = machine("");
    println!(
        "\nperf: {} ({} CPUs), commit {}{}",
        m.cpu_model,
        m.cpus,
        m.commit,
        if args.quick { ", --quick" } else { "" }
    );
    println!("\n| figure | value | goal | met |\n| --- | --- | --- | --- |");
    for h in out["headline"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} {} | {} | {} |",
            h["figure"].as_str().unwrap_or(""),
            h["value"],
            h["unit"].as_str().unwrap_or(""),
            h["goal"].as_str().unwrap_or(""),
            match h["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            }
        );
    }
    println!("\nwrote {} in {:.0} s", path.display(), started.elapsed().as_secs_f64());
    Ok(())
}

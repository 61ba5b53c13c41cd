//! `feedmesh-experiments`: regenerates the simulator's paper results and figures (gossip spread
//! against theory, FeedSync's winner rule under clock skew) into `papers/results/*.json` and
//! `papers/figures/*.svg`. Deterministic: the same seed writes the same bytes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, ValueEnum};
use netsim::clock_skew::{self, Cell};
use netsim::gossip::{self, cell_rng, Faults, Timed};
use netsim::plot::{self, Chart, Series};
use netsim::scenario::Latency;
use netsim::topology::GraphSpec;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "feedmesh-experiments", about = "Regenerate the simulator's paper results and figures")]
struct Cli {
    /// Which experiment to run.
    which: Which,
    /// Fewer trials (a smoke run; the committed results are from a full run).
    #[arg(long)]
    quick: bool,
    /// The papers folder: results go to OUT/results, figures to OUT/figures.
    #[arg(long, default_value = "papers")]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Gossip,
    ClockSkew,
    All,
}

/// N = 16, 32, ..., 4096.
const SIZES: [u32; 9] = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096];
const LOSSY: Faults = Faults { loss_ppm: 100_000, down_ppm: 200_000 };

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = run(&cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    if matches!(cli.which, Which::Gossip | Which::All) {
        gossip_experiment(cli)?;
    }
    if matches!(cli.which, Which::ClockSkew | Which::All) {
        clock_skew_experiment(cli)?;
    }
    Ok(())
}

fn command(cli: &Cli, which: &str) -> String {
    let quick = if cli.quick { " --quick" } else { "" };
    format!(
        "cargo run --release -p feedmesh-netsim --bin feedmesh-experiments -- {which}{quick} --seed {}",
        cli.seed
    )
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn gossip_experiment(cli: &Cli) -> Result<()> {
    let ideal_trials = if cli.quick { 200 } else { 4_000 };
    let timed_trials = if cli.quick { 10 } else { 200 };
    // Stream layout: kind in the high bits, N in the low ones.
    let stream = |kind: u64, n: u32| (kind << 32) | u64::from(n);

    let mut ideal_rows = Vec::new();
    // Each idealised series shares its colour with its bound.
    let [c0, c1, c2, c3, c4, c5, c6, c7, ..] = plot::PALETTE;
    let mut ideal_series = [
        Series::new("idealised: mean", vec![]).with_color(c0),
        Series::new("idealised: p99", vec![]).with_color(c1),
        Series::new("10% loss, 20% down: mean", vec![]).with_color(c2),
        Series::new("10% loss, 20% down: p99", vec![]).with_color(c3),
    ];
    for &n in &SIZES {
        eprintln!("gossip: idealised N={n} ({ideal_trials} trials, clean and lossy)");
        let clean =
            gossip::idealised(n, ideal_trials, Faults::default(), &mut cell_rng(cli.seed, stream(0, n)))?;
        let lossy = gossip::idealised(n, ideal_trials, LOSSY, &mut cell_rng(cli.seed, stream(1, n)))?;
        let (mean_bound, p99_bound) = (gossip::mean_rounds_bound(n), gossip::p99_rounds_bound(n));
        let x = f64::from(n);
        ideal_series[0].points.push((x, clean.mean));
        ideal_series[1].points.push((x, f64::from(clean.p99)));
        ideal_series[2].points.push((x, lossy.mean));
        ideal_series[3].points.push((x, f64::from(lossy.p99)));
        ideal_rows.push(json!({
            "n": n,
            "mean_bound": mean_bound,
            "p99_bound": p99_bound,
            "clean": clean,
            "clean_within_bounds": clean.mean <= mean_bound && f64::from(clean.p99) <= p99_bound,
            "lossy": lossy,
            "lossy_within_1_5x_bounds":
                lossy.mean <= 1.5 * mean_bound && f64::from(lossy.p99) <= 1.5 * p99_bound,
            "lossy_mean_over_clean_mean": lossy.mean / clean.mean,
        }));
    }

    let cfg =
        Timed { interval_ms: 1_000, latency: Latency::Lognormal { median_ms: 50, sigma: 0.5 }, loss_ppm: 0 };
    let topologies: [(&str, Option<GraphSpec>); 4] = [
        ("complete", None),
        ("random regular (d=6)", Some(GraphSpec::RandomRegular { degree: 6 })),
        ("small world (k=6, beta=0.1)", Some(GraphSpec::SmallWorld { k: 6, beta_ppm: 100_000 })),
        ("scale free (m=3)", Some(GraphSpec::ScaleFree { m: 3 })),
    ];
    let mut timed_out = Vec::new();
    let mut timed_series = Vec::new();
    for (t, (name, spec)) in topologies.iter().enumerate() {
        let mut rows = Vec::new();
        let mut points = Vec::new();
        for &n in &SIZES {
            eprintln!("gossip: timed {name} N={n} ({timed_trials} trials)");
            let mut rng = cell_rng(cli.seed, stream(2 + t as u64, n));
            let mut build_error = None;
            let stats = gossip::timed(n, timed_trials, &cfg, &mut rng, |rng| {
                let spec = spec.as_ref()?;
                match spec.build(n, rng) {
                    Ok(topology) => Some(topology),
                    Err(e) => {
                        build_error.get_or_insert(e);
                        None
                    }
                }
            })?;
            if let Some(e) = build_error {
                bail!("building {name} on {n} nodes: {e}");
            }
            if stats.incomplete > 0 {
                eprintln!(
                    "  {} of {} trials incomplete (a disconnected graph)",
                    stats.incomplete, stats.trials
                );
            }
            points.push((f64::from(n), stats.rounds_mean));
            rows.push(stats);
        }
        let color = [c4, c5, c6, c7][t];
        timed_series.push(Series::new(format!("timed, {name}: mean"), points).with_color(color));
        timed_out.push(json!({ "name": name, "graph": spec, "rows": rows }));
    }

    let out = json!({
        "experiment": "gossip",
        "command": command(cli, "gossip"),
        "seed": cli.seed,
        "quick": cli.quick,
        "idealised": {
            "model": "complete graph, synchronous rounds, each live node push-pulls with one uniformly random \
                      other node (down nodes included: it does not know who is down); a reply only answers a \
                      request that arrived; rounds until the write, made at a random live node, is on every live node",
            "trials": ideal_trials,
            "lossy_faults": LOSSY,
            "rows": ideal_rows,
        },
        "timed": {
            "model": "each node push-pulls with a random neighbour every interval (uniform random phase); every \
                      datagram crosses netsim's Net::transmit; a fresh random graph per trial; rounds = time / interval",
            "interval_ms": cfg.interval_ms,
            "latency": cfg.latency,
            "loss_ppm": cfg.loss_ppm,
            "trials": timed_trials,
            "topologies": timed_out,
        },
    });
    write_json(&cli.out.join("results/gossip.json"), &out)?;

    let bound =
        |f: fn(u32) -> f64, k: f64| SIZES.iter().map(|&n| (f64::from(n), k * f(n))).collect::<Vec<_>>();
    let mut series: Vec<Series> = ideal_series.into_iter().chain(timed_series).collect();
    series.push(
        Series::dashed("bound: log3 N + ln ln N + 1", bound(gossip::mean_rounds_bound, 1.0)).with_color(c0),
    );
    series.push(Series::dashed("bound: log2 N + 2", bound(gossip::p99_rounds_bound, 1.0)).with_color(c1));
    series.push(
        Series::dashed("1.5 x (log3 N + ln ln N + 1)", bound(gossip::mean_rounds_bound, 1.5)).with_color(c2),
    );
    series.push(Series::dashed("1.5 x (log2 N + 2)", bound(gossip::p99_rounds_bound, 1.5)).with_color(c3));
    let chart = Chart {
        title: "Push-pull gossip: rounds until one write reaches every live node",
        x_label: "nodes N",
        y_label: "rounds (timed: time / gossip interval)",
        log_x: true,
        // Headroom for the legend in the upper left.
        y_range: Some((0.0, 32.0)),
    };
    let path = cli.out.join("figures/gossip.svg");
    plot::write_svg(&path, &chart, &series)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn clock_skew_experiment(cli: &Cli) -> Result<()> {
    let trials = if cli.quick { 1_000 } else { 20_000 };
    const SKEWS_MS: [u64; 7] = [0, 1, 10, 100, 1_000, 10_000, 60_000];
    const GAPS_MS: [u64; 5] = [100, 1_000, 10_000, 60_000, 600_000];
    // Skew 0 cannot sit on a log axis: it is drawn here.
    const ZERO_AT_MS: f64 = 0.1;
    let mut cells = Vec::new();
    let mut series = Vec::new();
    for (g, &gap_ms) in GAPS_MS.iter().enumerate() {
        let mut points = Vec::new();
        for (s, &skew_ms) in SKEWS_MS.iter().enumerate() {
            eprintln!("clock-skew: skew {skew_ms} ms, mean gap {gap_ms} ms ({trials} trials)");
            let cell = Cell { skew_us: skew_ms * 1_000, gap_mean_us: gap_ms * 1_000, devices: 2, trials };
            let outcome = clock_skew::run_cell(cell, &mut cell_rng(cli.seed, ((g as u64) << 32) | s as u64))?;
            let x = if skew_ms == 0 { ZERO_AT_MS } else { skew_ms as f64 };
            points.push((x, outcome.rate));
            cells.push(outcome);
        }
        series.push(Series::new(format!("mean gap {}", human_ms(gap_ms)), points));
    }
    let coin: Vec<(f64, f64)> =
        [ZERO_AT_MS, SKEWS_MS[SKEWS_MS.len() - 1] as f64].iter().map(|&x| (x, 0.5)).collect();
    series.push(Series::dashed("coin flip (0.5)", coin));
    let out = json!({
        "experiment": "clock-skew",
        "command": command(cli, "clock-skew"),
        "seed": cli.seed,
        "quick": cli.quick,
        "method": "engine replicas: a common base item; each of two devices edits it once from that base (equal \
                   updates), at real times t1 < t2 = t1 + Exp(mean gap); each device's clock is real time plus a \
                   uniform offset in [-skew, +skew]; FeedSync writes when at whole seconds; both replicas merge \
                   both edits (convergence checked). later_lost: the winner is not the real-time later edit; \
                   by_clock: the earlier edit's when was later; by_tie: same second, endpoint name decided. \
                   95% Wilson intervals.",
        "trials_per_cell": trials,
        "cells": cells,
    });
    write_json(&cli.out.join("results/clock-skew.json"), &out)?;
    let chart = Chart {
        title: "FeedSync winner rule under clock skew: share of conflicts the later edit loses",
        x_label: "clock skew bound per device, ms (log; 0 drawn at 0.1)",
        y_label: "share of conflicts lost by the later edit",
        log_x: true,
        y_range: Some((0.0, 0.75)),
    };
    let path = cli.out.join("figures/clock-skew.svg");
    plot::write_svg(&path, &chart, &series)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn human_ms(ms: u64) -> String {
    match ms {
        ms if ms >= 60_000 && ms % 60_000 == 0 => format!("{} min", ms / 60_000),
        ms if ms >= 1_000 && ms % 1_000 == 0 => format!("{} s", ms / 1_000),
        ms => format!("{ms} ms"),
    }
}

//! Parameter sweeps: a grid file names a base scenario, dotted parameter paths with lists of values
//! and seeds; [`run`] simulates the cartesian product x seeds on several threads and returns the
//! rows in grid order whatever the thread timing. Parameters are set through the scenario's serde
//! form ([`set_path`]), so fields added to [`Scenario`] can be swept without touching this file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_json::json;

use crate::{Report, Scenario};

/// At most this many seeds per cell, cells per grid, and runs per sweep.
pub const SEEDS_MAX: u64 = 100_000;
pub const CELLS_MAX: usize = 100_000;
pub const RUNS_MAX: usize = 1_000_000;

/// A bad grid file; every variant names the field or parameter path at fault.
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{0}")]
    Parse(String),
    #[error("`{field}`: {why}")]
    Field { field: String, why: String },
    #[error("base scenario {path}: {error}")]
    Base { path: PathBuf, error: crate::scenario::ScenarioError },
    #[error("parameter `{path}`: {why}")]
    Path { path: String, why: String },
}

fn field_error(field: &str, why: impl Into<String>) -> GridError {
    GridError::Field { field: field.into(), why: why.into() }
}

fn path_error(path: &str, why: impl Into<String>) -> GridError {
    GridError::Path { path: path.into(), why: why.into() }
}

/// Sets the dotted `path` (table keys, or indices into arrays such as `partitions.0.share_ppm`) of
/// `scenario` to `value` and validates the result. A path the scenario format does not know is an
/// error naming it, as is a value it refuses.
pub fn set_path(scenario: &Scenario, path: &str, value: &toml::Value) -> Result<Scenario, GridError> {
    if path == "seed" {
        return Err(path_error(path, "seeds are set with the grid's `seeds`"));
    }
    let mut root = toml::Value::try_from(scenario).map_err(|e| path_error(path, e.to_string()))?;
    let segments: Vec<&str> = path.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(path_error(path, "empty segment in the dotted path"));
    }
    let mut at = &mut root;
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        at = match at {
            toml::Value::Table(table) => {
                if !table.contains_key(*segment) {
                    if !last {
                        // An absent optional section (e.g. `network.burst`): the parse below
                        // says which of its fields are missing.
                        table.insert(segment.to_string(), toml::Value::Table(toml::Table::new()));
                    } else {
                        table.insert(segment.to_string(), toml::Value::Boolean(false));
                    }
                }
                table.get_mut(*segment).ok_or_else(|| path_error(path, "no such field"))?
            }
            toml::Value::Array(items) => {
                let index: usize = segment
                    .parse()
                    .map_err(|_| path_error(path, format!("`{segment}` is not an index into a list")))?;
                let len = items.len();
                items.get_mut(index).ok_or_else(|| {
                    path_error(path, format!("index {index} is past the list's {len} items"))
                })?
            }
            _ => return Err(path_error(path, format!("`{segment}` is inside a value that has no fields"))),
        };
    }
    *at = value.clone();
    let text = toml::to_string(&root).map_err(|e| path_error(path, e.to_string()))?;
    Scenario::parse(&text).map_err(|e| path_error(path, reason(&e)))
}

/// A scenario error without the excerpt of the generated TOML a parse error quotes (the user never
/// saw that text): the last line, which says what is wrong.
fn reason(error: &crate::scenario::ScenarioError) -> String {
    let text = error.to_string();
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(&text).trim().to_string()
}

/// Which base scenario a grid varies.
#[derive(Clone, Debug)]
pub enum Base {
    /// The embedded default.
    Default,
    /// A scenario file (resolved relative to the grid file).
    File(PathBuf),
}

/// A parsed grid: the base, fixed overrides (`[set]`), the varied parameters (sorted by path, so
/// the order does not depend on how the TOML parser keeps tables) and the seeds.
#[derive(Clone, Debug)]
pub struct Grid {
    pub base: Base,
    pub set: Vec<(String, toml::Value)>,
    pub vary: Vec<(String, Vec<toml::Value>)>,
    pub seeds: Vec<u64>,
}

/// One combination of the varied parameters, with the scenario it makes.
#[derive(Clone, Debug)]
pub struct Cell {
    pub params: Vec<(String, toml::Value)>,
    pub scenario: Scenario,
}

/// A grid resolved into cells: what [`run`] simulates.
#[derive(Clone, Debug)]
pub struct Plan {
    pub base: Base,
    /// The varied paths, in the order of `Cell::params`.
    pub paths: Vec<String>,
    pub cells: Vec<Cell>,
    pub seeds: Vec<u64>,
}

impl Plan {
    pub fn runs(&self) -> usize {
        self.cells.len() * self.seeds.len()
    }
}

impl Grid {
    /// Parses a grid file's text. `base` is kept as written; [`Grid::plan`] resolves it.
    pub fn parse(text: &str, dir: &Path) -> Result<Self, GridError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| GridError::Parse(e.to_string()))?;
        let mut base = Base::Default;
        let mut set = Vec::new();
        let mut vary = Vec::new();
        let mut seeds = None;
        for (key, value) in &table {
            match key.as_str() {
                "base" => {
                    let name = value.as_str().ok_or_else(|| {
                        field_error("base", "must be \"default\" or a scenario file's path")
                    })?;
                    base = if name == "default" { Base::Default } else { Base::File(dir.join(name)) };
                }
                "seeds" => seeds = Some(parse_seeds(value)?),
                "set" => {
                    let t = value.as_table().ok_or_else(|| field_error("set", "must be a table"))?;
                    set = t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                }
                "vary" => {
                    let t = value.as_table().ok_or_else(|| field_error("vary", "must be a table"))?;
                    for (path, values) in t {
                        let list = values.as_array().ok_or_else(|| {
                            field_error(&format!("vary.\"{path}\""), "must be a list of values")
                        })?;
                        if list.is_empty() {
                            return Err(field_error(&format!("vary.\"{path}\""), "is an empty list"));
                        }
                        vary.push((path.clone(), list.clone()));
                    }
                }
                other => {
                    return Err(field_error(other, "unknown field (expected base, seeds, set, vary)"));
                }
            }
        }
        set.sort_by(|a, b| a.0.cmp(&b.0));
        vary.sort_by(|a, b| a.0.cmp(&b.0));
        let seeds = seeds.ok_or_else(|| field_error("seeds", "missing (a count, or a list of seeds)"))?;
        Ok(Self { base, set, vary, seeds })
    }

    /// Reads and parses a grid file.
    pub fn load(path: &Path) -> Result<Self, GridError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| GridError::Io { path: path.into(), error })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, dir)
    }

    /// Resolves the base, applies `[set]`, checks every varied value on its own (so an error names
    /// its path) and then builds every cell, first path varying slowest.
    pub fn plan(&self) -> Result<Plan, GridError> {
        let mut base = match &self.base {
            Base::Default => Scenario::default_scenario(),
            Base::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| GridError::Io { path: path.clone(), error })?;
                Scenario::parse(&text).map_err(|error| GridError::Base { path: path.clone(), error })?
            }
        };
        for (path, value) in &self.set {
            base = set_path(&base, path, value)?;
        }
        let mut cells_count: usize = 1;
        for (path, values) in &self.vary {
            for value in values {
                set_path(&base, path, value)?;
            }
            cells_count = cells_count
                .checked_mul(values.len())
                .filter(|&n| n <= CELLS_MAX)
                .ok_or_else(|| field_error("vary", format!("more than {CELLS_MAX} cells")))?;
        }
        if cells_count.saturating_mul(self.seeds.len()) > RUNS_MAX {
            return Err(field_error("seeds", format!("cells x seeds is more than {RUNS_MAX} runs")));
        }
        let mut cells = Vec::with_capacity(cells_count);
        for index in 0..cells_count {
            // Mixed-radix digits of `index`, the last path the fastest.
            let mut digits = vec![0; self.vary.len()];
            let mut rest = index;
            for (slot, (_, values)) in digits.iter_mut().zip(&self.vary).rev() {
                *slot = rest % values.len();
                rest /= values.len();
            }
            let mut scenario = base.clone();
            let mut params = Vec::with_capacity(self.vary.len());
            for ((path, values), digit) in self.vary.iter().zip(&digits) {
                scenario = set_path(&scenario, path, &values[*digit])?;
                params.push((path.clone(), values[*digit].clone()));
            }
            cells.push(Cell { params, scenario });
        }
        Ok(Plan {
            base: self.base.clone(),
            paths: self.vary.iter().map(|(p, _)| p.clone()).collect(),
            cells,
            seeds: self.seeds.clone(),
        })
    }
}

fn parse_seeds(value: &toml::Value) -> Result<Vec<u64>, GridError> {
    let seed = |v: &toml::Value| -> Result<u64, GridError> {
        v.as_integer()
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| field_error("seeds", "seeds are non-negative integers"))
    };
    match value {
        toml::Value::Integer(_) => {
            let count = seed(value)?;
            if count == 0 || count > SEEDS_MAX {
                return Err(field_error("seeds", format!("a count must be 1..={SEEDS_MAX}")));
            }
            Ok((1..=count).collect())
        }
        toml::Value::Array(list) => {
            if list.is_empty() || list.len() as u64 > SEEDS_MAX {
                return Err(field_error("seeds", format!("a list must hold 1..={SEEDS_MAX} seeds")));
            }
            list.iter().map(seed).collect()
        }
        _ => Err(field_error("seeds", "must be a count or a list of seeds")),
    }
}

/// One simulation of a sweep: cell `cell` of the plan with `seed`.
#[derive(Clone, Debug)]
pub struct Row {
    pub cell: usize,
    pub seed: u64,
    pub report: Report,
    /// Wall-clock time of the run, the one figure that differs between identical sweeps.
    pub wall_ms: u64,
}

/// Runs every cell x seed on `jobs` threads (at least one), calling `done` after each run (from
/// the worker thread). Rows come back in grid order (cell, then seed), whatever the timing.
/// `clock_ms` is the caller's monotonic clock in milliseconds, read only for `Row::wall_ms` (the
/// library reads no clock itself).
pub fn run(
    plan: &Plan,
    jobs: usize,
    clock_ms: &(dyn Fn() -> u64 + Sync),
    done: &(dyn Fn(&Row) + Sync),
) -> Vec<Row> {
    let total = plan.runs();
    let next = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<Row>>> = Mutex::new(vec![None; total]);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, total.max(1)) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= total {
                    break;
                }
                let cell = index / plan.seeds.len();
                let seed = plan.seeds[index % plan.seeds.len()];
                let started = clock_ms();
                let report = crate::run(&plan.cells[cell].scenario, seed, &mut |_, _| {});
                let wall_ms = clock_ms().saturating_sub(started);
                let row = Row { cell, seed, report, wall_ms };
                done(&row);
                // A poisoned lock means another worker panicked; the scope re-raises that panic.
                if let Ok(mut slots) = slots.lock() {
                    slots[index] = Some(row);
                }
            });
        }
    });
    let slots = slots.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Every index below `total` was taken by exactly one worker, which filled its slot.
    slots.into_iter().flatten().collect()
}

/// The CSV's columns after the parameters and the seed: `converged`, every [`FIGURES`] entry,
/// then these.
pub const TRAILING_COLUMNS: [&str; 4] = ["wall_ms", "trace_hash", "failure", "scenario_file"];

/// The figures averaged over a cell's seeds in `sweep.json`.
pub const FIGURES: [&str; 16] = [
    "convergence_ms_p50",
    "convergence_ms_p99",
    "convergence_ms_max",
    "writes",
    "lost_writes",
    "messages",
    "bytes",
    "events",
    "virtual_ms",
    "sessions_started",
    "sessions_failed",
    "direct_paths",
    "relayed_paths",
    "datagrams_unrelayed",
    "online_to_50_ms_p50",
    "online_to_100_ms_p50",
];

fn figure(report: &Report, name: &str) -> u64 {
    match name {
        "convergence_ms_p50" => report.convergence_ms_p50,
        "convergence_ms_p99" => report.convergence_ms_p99,
        "convergence_ms_max" => report.convergence_ms_max,
        "writes" => report.writes,
        "lost_writes" => report.lost_writes,
        "messages" => report.messages,
        "bytes" => report.bytes,
        "events" => report.events,
        "virtual_ms" => report.virtual_ms,
        "sessions_started" => report.sessions_started,
        "sessions_failed" => report.sessions_failed,
        "direct_paths" => report.direct_paths,
        "relayed_paths" => report.relayed_paths,
        "datagrams_unrelayed" => report.faults.datagrams_unrelayed,
        "online_to_50_ms_p50" => report.propagation.to_50_ms[0],
        "online_to_100_ms_p50" => report.propagation.to_100_ms[0],
        _ => 0,
    }
}

/// A parameter value as one CSV/plain-text field: scalars bare, tables and lists as inline TOML.
pub fn display_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// The file name a failing run's scenario is written to (in the sweep's output directory).
pub fn failure_file(row: &Row) -> String {
    format!("fail-cell{}-seed{}.toml", row.cell, row.seed)
}

/// `sweep.csv`: a header, then one line per row: the varied parameters, seed, report scalars and,
/// for a failing run, the scenario file that replays it.
pub fn csv(plan: &Plan, rows: &[Row]) -> String {
    let mut out = String::new();
    let header: Vec<String> = plan
        .paths
        .iter()
        .map(|p| csv_field(p))
        .chain(["seed".to_string()])
        .chain(std::iter::once("converged".to_string()))
        .chain(FIGURES.map(String::from))
        .chain(TRAILING_COLUMNS.map(String::from))
        .collect();
    out.push_str(&header.join(","));
    out.push('\n');
    for row in rows {
        let r = &row.report;
        let mut fields: Vec<String> =
            plan.cells[row.cell].params.iter().map(|(_, v)| csv_field(&display_value(v))).collect();
        fields.push(row.seed.to_string());
        fields.push(r.converged.to_string());
        for name in FIGURES {
            fields.push(figure(r, name).to_string());
        }
        fields.push(row.wall_ms.to_string());
        fields.push(r.trace_hash.clone());
        fields.push(csv_field(r.failure.as_deref().unwrap_or("")));
        fields.push(if r.failure.is_some() { csv_field(&failure_file(row)) } else { String::new() });
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn params_json(params: &[(String, toml::Value)]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = params
        .iter()
        .map(|(p, v)| (p.clone(), serde_json::to_value(v).unwrap_or(serde_json::Value::Null)))
        .collect();
    serde_json::Value::Object(map)
}

/// `sweep.json`: the rows of `sweep.csv`, and per cell the mean, min and max of [`FIGURES`] over
/// its seeds with the counts of runs, converged runs and failures.
pub fn json(plan: &Plan, rows: &[Row]) -> serde_json::Value {
    let rows_json: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            let r = &row.report;
            let mut value = json!({
                "cell": row.cell,
                "params": params_json(&plan.cells[row.cell].params),
                "seed": row.seed,
                "converged": r.converged,
                "wall_ms": row.wall_ms,
                "trace_hash": r.trace_hash,
                "failure": r.failure,
                "scenario_file": r.failure.as_ref().map(|_| failure_file(row)),
            });
            if let Some(map) = value.as_object_mut() {
                for name in FIGURES {
                    map.insert(name.into(), figure(r, name).into());
                }
            }
            value
        })
        .collect();
    let cells_json: Vec<serde_json::Value> = plan
        .cells
        .iter()
        .enumerate()
        .map(|(index, cell)| {
            let mine: Vec<&Row> = rows.iter().filter(|r| r.cell == index).collect();
            let mut figures = serde_json::Map::new();
            for name in FIGURES {
                let values: Vec<u64> = mine.iter().map(|r| figure(&r.report, name)).collect();
                let (Some(min), Some(max)) = (values.iter().min(), values.iter().max()) else {
                    continue;
                };
                let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
                figures.insert(name.into(), json!({ "mean": mean, "min": min, "max": max }));
            }
            json!({
                "cell": index,
                "params": params_json(&cell.params),
                "runs": mine.len(),
                "converged": mine.iter().filter(|r| r.report.converged).count(),
                "failures": mine.iter().filter(|r| r.report.failure.is_some()).count(),
                "figures": figures,
            })
        })
        .collect();
    json!({
        "base": match &plan.base {
            Base::Default => "default".to_string(),
            Base::File(p) => p.display().to_string(),
        },
        "parameters": plan.paths,
        "seeds": plan.seeds,
        "rows": rows_json,
        "cells": cells_json,
    })
}

/// The scenario of a row as a TOML file that replays it (its `seed` set to the row's).
pub fn scenario_toml(plan: &Plan, row: &Row) -> String {
    let mut scenario = plan.cells[row.cell].scenario.clone();
    scenario.seed = row.seed;
    let params: Vec<String> =
        plan.cells[row.cell].params.iter().map(|(p, v)| format!("{p} = {}", display_value(v))).collect();
    let body = toml::to_string(&scenario).unwrap_or_default();
    format!(
        "# A failing run of a feedmesh-sim sweep: cell {} ({}), seed {}.\n# {}\n{body}",
        row.cell,
        params.join(", "),
        row.seed,
        row.report.failure.as_deref().unwrap_or("passed"),
    )
}

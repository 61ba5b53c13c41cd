//! Reads criterion's output (`criterion/**/new/{benchmark,estimates}.json`) and builds the
//! results files `papers/results/merge.json` and `xml.json`: fixed field order, cells sorted,
//! figures rounded, no timestamps, so `git diff` of a results file shows drift and nothing else.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::grid::{automerge_covers, AUTOMERGE_OMITTED_REASON};
use crate::{ppm_parse, ppm_text, Cell, BATCH_ITEMS};

/// Group id prefix of the merge benchmark: `merge/n=…/c=…/h=…`.
pub const MERGE_GROUP_PREFIX: &str = "merge/";
/// Group id prefix of the XML benchmark: `xml/read`, `xml/write`.
pub const XML_GROUP_PREFIX: &str = "xml/";
/// Deepest directory nesting searched under the criterion directory.
const DEPTH_MAX: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot parse {path}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("no criterion results under {0}")]
    Empty(PathBuf),
}

/// One measured benchmark, as criterion recorded it.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    pub group_id: String,
    pub function_id: String,
    pub value_str: String,
    /// Elements or bytes per iteration, if the group declared a throughput.
    pub elements: Option<u64>,
    pub bytes: Option<u64>,
    pub mean_ns: f64,
    pub mean_lower_ns: f64,
    pub mean_upper_ns: f64,
    pub median_ns: f64,
}

#[derive(Deserialize)]
struct BenchmarkJson {
    group_id: String,
    function_id: Option<String>,
    value_str: Option<String>,
    throughput: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct EstimatesJson {
    mean: EstimateJson,
    median: EstimateJson,
}

#[derive(Deserialize)]
struct EstimateJson {
    confidence_interval: IntervalJson,
    point_estimate: f64,
}

#[derive(Deserialize)]
struct IntervalJson {
    lower_bound: f64,
    upper_bound: f64,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ReportError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ReportError::Io { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|source| ReportError::Json { path: path.into(), source })
}

/// Every benchmark under `criterion_dir` (the `new/` directories), sorted by full id.
pub fn scan(criterion_dir: &Path) -> Result<Vec<Measured>, ReportError> {
    let mut found = Vec::new();
    walk(criterion_dir, 0, &mut found)?;
    if found.is_empty() {
        return Err(ReportError::Empty(criterion_dir.into()));
    }
    found.sort_by(|a: &Measured, b: &Measured| {
        (&a.group_id, &a.function_id, &a.value_str).cmp(&(&b.group_id, &b.function_id, &b.value_str))
    });
    Ok(found)
}

fn walk(dir: &Path, depth: usize, found: &mut Vec<Measured>) -> Result<(), ReportError> {
    if depth > DEPTH_MAX {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|source| ReportError::Io { path: dir.into(), source })?;
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ReportError::Io { path: dir.into(), source })?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    for path in dirs {
        let benchmark = path.join("benchmark.json");
        let estimates = path.join("estimates.json");
        if path.file_name().is_some_and(|name| name == "new") && benchmark.is_file() && estimates.is_file() {
            found.push(measured(&benchmark, &estimates)?);
        } else {
            walk(&path, depth + 1, found)?;
        }
    }
    Ok(())
}

fn measured(benchmark: &Path, estimates: &Path) -> Result<Measured, ReportError> {
    let bench: BenchmarkJson = read_json(benchmark)?;
    let est: EstimatesJson = read_json(estimates)?;
    let count = |kind: &str| bench.throughput.as_ref().and_then(|t| t.get(kind)).and_then(|v| v.as_u64());
    Ok(Measured {
        group_id: bench.group_id,
        function_id: bench.function_id.unwrap_or_default(),
        value_str: bench.value_str.unwrap_or_default(),
        elements: count("Elements"),
        bytes: count("Bytes").or_else(|| count("BytesDecimal")),
        mean_ns: est.mean.point_estimate,
        mean_lower_ns: est.mean.confidence_interval.lower_bound,
        mean_upper_ns: est.mean.confidence_interval.upper_bound,
        median_ns: est.median.point_estimate,
    })
}

/// The machine and the code the figures were measured on.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    /// The workspace's `HEAD` commit when the results were written, `-dirty` appended if
    /// `engine/` or `benches/` differed from it; `unknown` outside a git checkout.
    pub commit: String,
    /// How the run was made (load, priority), as given to the `results` binary; may be empty.
    pub conditions: String,
}

/// Time figures of one benchmark, rounded to whole nanoseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Timing {
    pub mean_ns: u64,
    /// Criterion's 95% confidence interval of the mean.
    pub mean_ci95_ns: [u64; 2],
    pub median_ns: u64,
}

impl Timing {
    fn of(m: &Measured) -> Self {
        let ns = |x: f64| x.round().max(0.0) as u64;
        Self {
            mean_ns: ns(m.mean_ns),
            mean_ci95_ns: [ns(m.mean_lower_ns), ns(m.mean_upper_ns)],
            median_ns: ns(m.median_ns),
        }
    }
}

/// One engine's figure in one merge cell.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MergeFigure {
    /// Batch items merged per second, from the mean time.
    pub items_per_sec: u64,
    #[serde(flatten)]
    pub timing: Timing,
}

/// One cell of the merge grid.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MergeCell {
    /// `n=…/c=…/h=…`.
    pub cell: String,
    pub items: usize,
    pub concurrent: String,
    pub history: usize,
    pub concurrent_items: usize,
    pub feedmesh: Option<MergeFigure>,
    pub automerge: Option<MergeFigure>,
    /// automerge's mean time over feedmesh's: how many times faster feedmesh merges the batch.
    pub feedmesh_speedup_over_automerge: Option<f64>,
}

/// Cells without an automerge figure, grouped by why.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Omitted {
    pub reason: String,
    pub cells: Vec<String>,
}

/// `papers/results/merge.json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MergeResults {
    pub benchmark: &'static str,
    pub workload: &'static str,
    pub measured: &'static str,
    pub batch_items: usize,
    pub machine: Machine,
    pub cells: Vec<MergeCell>,
    pub automerge_omitted: Vec<Omitted>,
}

const MERGE_WORKLOAD: &str = "Store of n items, each created then updated h-1 times by two local \
     endpoints in turn (automerge: a map per item under ROOT, one change per update). Incoming \
     batch of 10^4 distinct store items updated by a remote endpoint (automerge: 10^4 changes by \
     another actor on a fork); a fraction c of them made from the store version's parent, so \
     merge keeps a conflict (automerge: the same field set concurrently), the rest strictly \
     newer. Seeded (ChaCha8); see benches/src/lib.rs.";
const MERGE_MEASURED: &str = "Wall time to merge the parsed batch into a fresh copy of the store \
     (feedmesh: merge_one per item; automerge: Automerge::apply_changes of the batch's Change \
     values); copying the store is not timed. Criterion, 10 samples, flat sampling, one thread.";

/// Why a cell automerge could run at has no automerge figure.
const AUTOMERGE_NOT_RUN_REASON: &str = "not run in the measured grid";

/// Rounds to one decimal.
fn one_decimal(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Parses `n=…/c=…/h=…` (what [`Cell::label`] writes).
pub fn parse_cell(label: &str) -> Option<Cell> {
    let mut parts = label.split('/');
    let items = parts.next()?.strip_prefix("n=")?.parse().ok()?;
    let concurrent_ppm = ppm_parse(parts.next()?.strip_prefix("c=")?)?;
    let history = parts.next()?.strip_prefix("h=")?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(Cell { items, concurrent_ppm, history })
}

/// Builds the merge results from every `merge/…` benchmark in `measured`.
pub fn merge_results(measured: &[Measured], machine: Machine) -> MergeResults {
    let mut cells: Vec<(Cell, MergeCell)> = Vec::new();
    for m in measured {
        let Some(cell) = m.group_id.strip_prefix(MERGE_GROUP_PREFIX).and_then(parse_cell) else {
            continue;
        };
        let position = match cells.iter().position(|(c, _)| *c == cell) {
            Some(position) => position,
            None => {
                cells.push((
                    cell,
                    MergeCell {
                        cell: cell.label(),
                        items: cell.items,
                        concurrent: ppm_text(cell.concurrent_ppm),
                        history: cell.history,
                        concurrent_items: cell.concurrent_items(),
                        feedmesh: None,
                        automerge: None,
                        feedmesh_speedup_over_automerge: None,
                    },
                ));
                cells.len() - 1
            }
        };
        let elements = m.elements.unwrap_or(BATCH_ITEMS as u64) as f64;
        let figure = MergeFigure {
            items_per_sec: (elements / (m.mean_ns * 1e-9)).round() as u64,
            timing: Timing::of(m),
        };
        match m.function_id.as_str() {
            "feedmesh" => cells[position].1.feedmesh = Some(figure),
            "automerge" => cells[position].1.automerge = Some(figure),
            _ => {}
        }
    }
    cells.sort_by_key(|(cell, _)| *cell);
    let mut omitted = Vec::new();
    let cells: Vec<MergeCell> = cells
        .into_iter()
        .map(|(cell, mut out)| {
            if let (Some(fm), Some(am)) = (&out.feedmesh, &out.automerge) {
                out.feedmesh_speedup_over_automerge =
                    Some(one_decimal(am.timing.mean_ns as f64 / fm.timing.mean_ns.max(1) as f64));
            }
            if out.automerge.is_none() {
                let reason = if automerge_covers(cell.items, cell.history) {
                    AUTOMERGE_NOT_RUN_REASON
                } else {
                    AUTOMERGE_OMITTED_REASON
                };
                match omitted.iter_mut().find(|o: &&mut Omitted| o.reason == reason) {
                    Some(group) => group.cells.push(out.cell.clone()),
                    None => {
                        omitted.push(Omitted { reason: reason.to_string(), cells: vec![out.cell.clone()] })
                    }
                }
            }
            out
        })
        .collect();
    MergeResults {
        benchmark: "merge",
        workload: MERGE_WORKLOAD,
        measured: MERGE_MEASURED,
        batch_items: BATCH_ITEMS,
        machine,
        cells,
        automerge_omitted: omitted,
    }
}

/// One XML benchmark: one operation on one feed.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct XmlCell {
    /// `n=…/c=…/h=…` of the feed (the store with that cell's batch merged in).
    pub feed: String,
    /// `read` (`read_feed`) or `write` (`write_feed`).
    pub operation: String,
    pub bytes: u64,
    /// 10^6 bytes per second, from the mean time.
    pub mb_per_sec: f64,
    /// 2^20 bytes per second (criterion's own unit).
    pub mib_per_sec: f64,
    #[serde(flatten)]
    pub timing: Timing,
}

/// `papers/results/xml.json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct XmlResults {
    pub benchmark: &'static str,
    pub workload: &'static str,
    pub machine: Machine,
    pub cells: Vec<XmlCell>,
}

const XML_WORKLOAD: &str = "FeedSync RSS feed: the merge workload's store of n items with \
     history h, with a batch of concurrent fraction c merged in (so that fraction of the batch \
     carries a conflict). read = engine::feedsync::xml::read_feed of the UTF-8 document; write = \
     write_feed of the parsed feed. One thread.";

/// Builds the XML results from every `xml/…` benchmark in `measured`.
pub fn xml_results(measured: &[Measured], machine: Machine) -> XmlResults {
    let mut cells: Vec<XmlCell> = measured
        .iter()
        .filter_map(|m| {
            let operation = m.group_id.strip_prefix(XML_GROUP_PREFIX)?;
            let bytes = m.bytes?;
            let per_sec = bytes as f64 / (m.mean_ns * 1e-9);
            Some(XmlCell {
                feed: m.value_str.clone(),
                operation: operation.to_string(),
                bytes,
                mb_per_sec: one_decimal(per_sec / 1e6),
                mib_per_sec: one_decimal(per_sec / f64::from(1u32 << 20)),
                timing: Timing::of(m),
            })
        })
        .collect();
    cells.sort_by(|a, b| {
        let key = |c: &XmlCell| (parse_cell(&c.feed), c.feed.clone(), c.operation.clone());
        key(a).cmp(&key(b))
    });
    XmlResults { benchmark: "xml", workload: XML_WORKLOAD, machine, cells }
}

/// Pretty JSON with a trailing newline.
pub fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs (strings, integers, finite floats) cannot fail; a
    // non-finite float becomes `null`.
    let mut text =
        serde_json::to_string_pretty(value).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"));
    text.push('\n');
    text
}

/// The workspace root: this crate's parent directory.
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `HEAD` of the workspace, `-dirty` if `engine/` or `benches/` differ from it. Read-only git
/// commands (`rev-parse`, `diff-index`), which never write the index.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git").arg("-C").arg(workspace_dir()).args(args).output().ok()
    };
    let Some(head) = git(&["rev-parse", "HEAD"]).filter(|out| out.status.success()) else {
        return "unknown".to_string();
    };
    let mut commit = String::from_utf8_lossy(&head.stdout).trim().to_string();
    let clean = git(&["diff-index", "--quiet", "HEAD", "--", "engine", "benches"])
        .is_some_and(|out| out.status.success());
    if !clean {
        commit.push_str("-dirty");
    }
    commit
}

/// CPU model from /proc/cpuinfo (Linux), the CPUs this process may use, and the commit.
pub fn machine(conditions: &str) -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown".to_string());
    let cpus = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    Machine { cpu_model, cpus, commit: commit(), conditions: conditions.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(group: &str, function: &str, value: &str, mean_ns: f64) -> Measured {
        Measured {
            group_id: group.into(),
            function_id: function.into(),
            value_str: value.into(),
            elements: group.starts_with("merge").then_some(BATCH_ITEMS as u64),
            bytes: group.starts_with("xml").then_some(2_000_000),
            mean_ns,
            mean_lower_ns: mean_ns * 0.9,
            mean_upper_ns: mean_ns * 1.1,
            median_ns: mean_ns,
        }
    }

    fn machine() -> Machine {
        Machine { cpu_model: "test".into(), cpus: 2, commit: "unknown".into(), conditions: String::new() }
    }

    #[test]
    fn merge_cells_pair_up_and_sort() {
        let all = [
            measured("merge/n=1000000/c=0/h=64", "feedmesh", "1000000", 20e6),
            measured("merge/n=10000/c=0.01/h=8", "automerge", "10000", 1e9),
            measured("merge/n=10000/c=0.01/h=8", "feedmesh", "10000", 5e6),
            measured("xml/read", "feedmesh", "n=10000/c=0.1/h=8", 1e6),
        ];
        let results = merge_results(&all, machine());
        assert_eq!(results.cells.len(), 2);
        let first = &results.cells[0];
        assert_eq!(first.cell, "n=10000/c=0.01/h=8");
        assert_eq!(first.concurrent_items, 100);
        assert_eq!(first.feedmesh.as_ref().map(|f| f.items_per_sec), Some(2_000_000));
        assert_eq!(first.feedmesh_speedup_over_automerge, Some(200.0));
        assert_eq!(results.automerge_omitted.len(), 1);
        assert_eq!(results.automerge_omitted[0].cells, ["n=1000000/c=0/h=64"]);
        assert_eq!(results.automerge_omitted[0].reason, AUTOMERGE_OMITTED_REASON);

        let xml = xml_results(&all, machine());
        assert_eq!(xml.cells.len(), 1);
        assert_eq!(xml.cells[0].mb_per_sec, 2000.0);
        assert!(to_json(&xml).ends_with("}\n"));
    }

    #[test]
    fn cell_labels_parse_back() {
        let cell = Cell { items: 100_000, concurrent_ppm: 10_000, history: 64 };
        assert_eq!(parse_cell(&cell.label()), Some(cell));
        assert_eq!(parse_cell("n=1/c=0/h=1/x"), None);
    }
}

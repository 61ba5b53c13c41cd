//! The merge benchmark's grid (which cells run, and for how long) and where automerge is left out.
//!
//! `cargo bench` runs the full grid; `FEEDMESH_BENCH_QUICK=1` a reduced one with shorter times;
//! `FEEDMESH_BENCH_N`, `FEEDMESH_BENCH_C` and `FEEDMESH_BENCH_H` (comma-separated store sizes,
//! fractions and history lengths) replace one axis each; `FEEDMESH_BENCH_AUTOMERGE=0` leaves
//! automerge out (to profile feedmesh alone). Under `cargo test --benches` (criterion's
//! test mode, one iteration per benchmark) only a smoke grid runs.

use std::time::Duration;

use crate::{ppm_parse, Cell, BATCH_ITEMS};

/// Store sizes of the full grid.
pub const ITEMS_FULL: [usize; 3] = [10_000, 100_000, 1_000_000];
/// Concurrent fractions of the full grid, in parts per million (0, 0.01, 1).
pub const CONCURRENT_PPM_FULL: [u32; 3] = [0, 10_000, 1_000_000];
/// History lengths of the full grid.
pub const HISTORY_FULL: [usize; 3] = [1, 8, 64];

/// Largest store automerge runs at. An automerge store is built with one transaction per change
/// (`n * h` of them), at about 13k changes/s on the 2-core bench machine (n = 10^5, h = 8:
/// 8 * 10^5 changes in about 62 s), and every timed iteration clones the whole document; the
/// stores beyond these bounds hold 10^6 to 6.4 * 10^7 changes, 1.3 to 82 minutes at that rate
/// each, so the grid leaves them out to keep a full run near ten minutes.
pub const AUTOMERGE_ITEMS_MAX: usize = 100_000;
/// Longest history automerge runs at (see [`AUTOMERGE_ITEMS_MAX`]).
pub const AUTOMERGE_HISTORY_MAX: usize = 8;
/// Why cells beyond [`AUTOMERGE_ITEMS_MAX`] / [`AUTOMERGE_HISTORY_MAX`] have no automerge figure.
pub const AUTOMERGE_OMITTED_REASON: &str = "automerge runs only at n <= 10^5 and h <= 8: its store \
     is built with one transaction per change, about 13k changes/s on the 2-core bench machine \
     (n=10^5, h=8: 8*10^5 changes in about 62 s), and every timed iteration clones the whole \
     document; the omitted stores hold 10^6 to 6.4*10^7 changes (at that rate, 1.3 to 82 minutes to \
     build each), left out to keep a full run near ten minutes";

/// Environment variable that selects the quick grid.
pub const ENV_QUICK: &str = "FEEDMESH_BENCH_QUICK";
/// Environment variables that replace one axis of the grid.
pub const ENV_ITEMS: &str = "FEEDMESH_BENCH_N";
pub const ENV_CONCURRENT: &str = "FEEDMESH_BENCH_C";
pub const ENV_HISTORY: &str = "FEEDMESH_BENCH_H";
/// Environment variable that turns automerge off (`0`).
pub const ENV_AUTOMERGE: &str = "FEEDMESH_BENCH_AUTOMERGE";

/// Which cells run and criterion's timing for each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grid {
    pub items: Vec<usize>,
    pub concurrent_ppm: Vec<u32>,
    pub history: Vec<usize>,
    /// Whether automerge runs (where [`automerge_covers`] allows).
    pub automerge: bool,
    pub warm_up: Duration,
    pub measurement: Duration,
    /// Criterion's samples per benchmark (criterion's minimum is 10).
    pub samples: usize,
}

impl Grid {
    /// 3 store sizes x 3 fractions x 3 history lengths.
    pub fn full() -> Self {
        Self {
            items: ITEMS_FULL.to_vec(),
            concurrent_ppm: CONCURRENT_PPM_FULL.to_vec(),
            history: HISTORY_FULL.to_vec(),
            automerge: true,
            warm_up: Duration::from_secs(1),
            measurement: Duration::from_secs(3),
            samples: 10,
        }
    }

    /// A few minutes on 2 cores: the smallest store, both ends of the fraction axis, short times.
    pub fn quick() -> Self {
        Self {
            items: vec![10_000],
            concurrent_ppm: vec![0, 1_000_000],
            history: vec![1, 8],
            automerge: true,
            warm_up: Duration::from_millis(300),
            measurement: Duration::from_secs(1),
            samples: 10,
        }
    }

    /// One cell, for criterion's test mode.
    pub fn smoke() -> Self {
        Self { items: vec![BATCH_ITEMS], concurrent_ppm: vec![10_000], history: vec![2], ..Self::quick() }
    }

    /// The grid for this process: [`Self::smoke`] unless `bench_mode`, else [`Self::quick`] if
    /// [`ENV_QUICK`] is set (to anything but `0` or empty), else [`Self::full`]; then the axis
    /// overrides.
    pub fn from_env(bench_mode: bool) -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut grid = if !bench_mode {
            Self::smoke()
        } else if var(ENV_QUICK).is_some_and(|v| v != "0") {
            Self::quick()
        } else {
            Self::full()
        };
        if let Some(text) = var(ENV_ITEMS) {
            grid.items = parse_list(ENV_ITEMS, &text, |t| t.parse().ok().filter(|&n| n >= BATCH_ITEMS))?;
        }
        if let Some(text) = var(ENV_CONCURRENT) {
            grid.concurrent_ppm = parse_list(ENV_CONCURRENT, &text, ppm_parse)?;
        }
        if let Some(text) = var(ENV_HISTORY) {
            grid.history = parse_list(ENV_HISTORY, &text, |t| t.parse().ok().filter(|&h| h >= 1))?;
        }
        if var(ENV_AUTOMERGE).is_some_and(|v| v == "0") {
            grid.automerge = false;
        }
        Ok(grid)
    }

    /// Whether automerge runs at this store size and history length in this grid.
    pub fn runs_automerge(&self, items: usize, history: usize) -> bool {
        self.automerge && automerge_covers(items, history)
    }

    /// Every cell, in the order the merge benchmark runs them (store size, history, fraction).
    pub fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for &items in &self.items {
            for &history in &self.history {
                for &concurrent_ppm in &self.concurrent_ppm {
                    cells.push(Cell { items, concurrent_ppm, history });
                }
            }
        }
        cells
    }
}

/// Whether automerge runs at this store size and history length.
pub fn automerge_covers(items: usize, history: usize) -> bool {
    items <= AUTOMERGE_ITEMS_MAX && history <= AUTOMERGE_HISTORY_MAX
}

/// Whether this process is a real benchmark run: `cargo bench` passes `--bench`, `cargo test
/// --benches` does not (criterion's own rule; `--bench --test` is test mode too).
pub fn bench_mode(args: impl IntoIterator<Item = String>) -> bool {
    let (mut bench, mut test) = (false, false);
    for arg in args {
        bench |= arg == "--bench";
        test |= arg == "--test";
    }
    bench && !test
}

fn parse_list<T>(name: &str, text: &str, parse: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    text.split(',')
        .map(str::trim)
        .map(|item| parse(item).ok_or_else(|| format!("{name}: cannot use {item:?} (in {text:?})")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_grid_is_27_cells_with_12_for_automerge() {
        let cells = Grid::full().cells();
        assert_eq!(cells.len(), 27);
        assert_eq!(cells.iter().filter(|c| automerge_covers(c.items, c.history)).count(), 12);
    }

    #[test]
    fn bench_mode_follows_criterion() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(bench_mode(args(&["merge", "--bench"])));
        assert!(!bench_mode(args(&["merge"])));
        assert!(!bench_mode(args(&["merge", "--bench", "--test"])));
    }

    #[test]
    fn lists_parse() {
        assert_eq!(parse_list("X", "0, 0.01,1", ppm_parse), Ok(vec![0, 10_000, 1_000_000]));
        assert!(parse_list("X", "0,2", ppm_parse).is_err());
    }
}

//! The clock-skew paper experiment: how often FeedSync's clock-based winner rule picks an edit
//! other than the real-time latest among concurrent edits of one item, as device clocks drift
//! apart.
//!
//! Each trial uses the engine itself: an item is created and merged into every device's
//! replica (the common base); then each device edits it once, at real times `t1 < t2 < ...`
//! (gaps drawn from an exponential distribution), stamping `when` from its own clock (real time
//! plus an offset drawn uniformly from `[-skew, +skew]`); then every replica merges every other's
//! edit. All edits come from the same base, so they have the same `updates` and the winner rule
//! falls to `when` (whole seconds, as FeedSync writes it) and then to the endpoint name. The
//! trial records whether the winner is the real-time latest edit, and why not: an earlier
//! clock reading, or a tie within the same second broken by name.

use std::sync::Arc;

use engine::feedsync::{Content, Edit, Endpoint, ItemId, When};
use engine::replica::Replica;
use rand::Rng as _;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Virtual epoch of the devices' clocks (2024-01-01T00:00:00Z), as in the simulator.
const EPOCH_UNIX_SECS: i64 = 1_704_067_200;
/// Most devices editing concurrently in one trial, and most trials per cell.
pub const DEVICES_MAX: u32 = 64;
pub const TRIALS_MAX: u32 = 10_000_000;
/// Gaps and skews are capped at a day.
pub const SPAN_US_MAX: u64 = 86_400_000_000;

/// Why a cell cannot run, or the engine did something the experiment does not expect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockSkewError {
    #[error("devices must be 2 to {max}, got {devices}")]
    Devices { devices: u32, max: u32 },
    #[error("trials must be 1 to {max}, got {trials}")]
    Trials { trials: u32, max: u32 },
    #[error("{field} = {value_us} us is above the limit of {max_us} us")]
    Span { field: &'static str, value_us: u64, max_us: u64 },
    #[error("gap_mean_us must be at least 1")]
    Gap,
    #[error("engine: {0}")]
    Engine(String),
    #[error("replicas did not converge in trial {trial}")]
    Diverged { trial: u32 },
}

/// One cell of the sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// Each device's clock is off by a uniform draw in `[-skew_us, +skew_us]`.
    pub skew_us: u64,
    /// Mean real-time gap between consecutive edits (exponential).
    pub gap_mean_us: u64,
    /// Devices editing the item concurrently.
    pub devices: u32,
    pub trials: u32,
}

/// What a cell measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    pub skew_ms: f64,
    pub gap_mean_ms: f64,
    pub devices: u32,
    pub trials: u32,
    /// Trials in which the real-time latest edit did not win.
    pub later_lost: u32,
    /// ... because another edit's `when` was later (clock skew, or a later second).
    pub later_lost_by_clock: u32,
    /// ... because `when` tied at whole seconds and the endpoint name decided.
    pub later_lost_by_tie: u32,
    /// `later_lost / trials`, with a 95% Wilson score interval.
    pub rate: f64,
    pub rate_ci95_lo: f64,
    pub rate_ci95_hi: f64,
    /// Trials in which every losing edit was kept as a conflict (no data lost, only the winner
    /// slot): should equal `trials`.
    pub losers_kept_as_conflicts: u32,
}

/// The 95% Wilson score interval for `k` successes in `n` trials.
pub fn wilson95(k: u32, n: u32) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let (k, n) = (f64::from(k), f64::from(n));
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * libm::sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom;
    // At the edges the interval ends exactly at 0 or 1 (no rounding residue).
    let lo = if k == 0.0 { 0.0 } else { (centre - half).max(0.0) };
    let hi = if k == n { 1.0 } else { (centre + half).min(1.0) };
    (lo, hi)
}

/// An exponential draw with mean `mean_us`, by inversion with `libm`'s software `log`.
fn exponential_us(rng: &mut ChaCha8Rng, mean_us: u64) -> u64 {
    let unit = ((rng.random::<u64>() >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let us = -(mean_us as f64) * libm::log(unit);
    us.clamp(0.0, SPAN_US_MAX as f64) as u64
}

/// A device's clock reading at real time `real_us` (microseconds since the epoch) with offset
/// `offset_us`, as a `When` at full precision (the engine keeps whole seconds).
fn clock(real_us: u64, offset_us: i64) -> Result<When, ClockSkewError> {
    let us = real_us as i64 + offset_us;
    let secs = EPOCH_UNIX_SECS + us.div_euclid(1_000_000);
    let nanos = (us.rem_euclid(1_000_000) * 1_000) as u32;
    When::from_parts(secs, nanos, None).map_err(|e| ClockSkewError::Engine(e.to_string()))
}

/// Runs one cell.
pub fn run_cell(cell: Cell, rng: &mut ChaCha8Rng) -> Result<Outcome, ClockSkewError> {
    if !(2..=DEVICES_MAX).contains(&cell.devices) {
        return Err(ClockSkewError::Devices { devices: cell.devices, max: DEVICES_MAX });
    }
    if !(1..=TRIALS_MAX).contains(&cell.trials) {
        return Err(ClockSkewError::Trials { trials: cell.trials, max: TRIALS_MAX });
    }
    for (field, value_us) in [("skew_us", cell.skew_us), ("gap_mean_us", cell.gap_mean_us)] {
        if value_us > SPAN_US_MAX {
            return Err(ClockSkewError::Span { field, value_us, max_us: SPAN_US_MAX });
        }
    }
    if cell.gap_mean_us == 0 {
        return Err(ClockSkewError::Gap);
    }
    let engine = |e: engine::feedsync::FeedsyncError| ClockSkewError::Engine(e.to_string());
    let id = ItemId::new("shared-item").map_err(engine)?;
    let origin = Endpoint::new("origin").map_err(engine)?;
    let devices: Vec<Endpoint> = (0..cell.devices)
        .map(|i| Endpoint::new(&format!("device-{i:02}")))
        .collect::<Result<_, _>>()
        .map_err(engine)?;
    let skew = cell.skew_us as i64;
    let mut out = Outcome {
        skew_ms: cell.skew_us as f64 / 1_000.0,
        gap_mean_ms: cell.gap_mean_us as f64 / 1_000.0,
        devices: cell.devices,
        trials: cell.trials,
        later_lost: 0,
        later_lost_by_clock: 0,
        later_lost_by_tie: 0,
        rate: 0.0,
        rate_ci95_lo: 0.0,
        rate_ci95_hi: 0.0,
        losers_kept_as_conflicts: 0,
    };
    for trial in 0..cell.trials {
        // The base, created some time in the first day (so the sub-second phase is uniform).
        let base_us = rng.random_range(0..SPAN_US_MAX);
        let mut origin_replica = Replica::new(0);
        origin_replica.change(&id, &origin, &clock(base_us, 0)?, &Edit::default()).map_err(engine)?;
        let base =
            origin_replica.item(&id).cloned().ok_or_else(|| ClockSkewError::Engine("no base".into()))?;
        // Edits a minute later, in a random order of devices.
        let mut order: Vec<usize> = (0..devices.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut real_us = base_us + 60_000_000;
        let mut edits = Vec::with_capacity(devices.len());
        let mut stamps = Vec::with_capacity(devices.len());
        for (k, &d) in order.iter().enumerate() {
            if k > 0 {
                // Strictly later in real time.
                real_us += exponential_us(rng, cell.gap_mean_us).max(1);
            }
            let offset = if skew == 0 { 0 } else { rng.random_range(-skew..=skew) };
            let when = clock(real_us, offset)?;
            let mut replica = Replica::new(1 + d as u64);
            replica.merge(&base).map_err(engine)?;
            let content = Arc::new(Content {
                attrs: "".into(),
                inner: format!("<title>edit by {} at {real_us}</title>", devices[d]).into(),
                ..Content::empty()
            });
            let edit = Edit { content: Some(content), ..Edit::default() };
            replica.change(&id, &devices[d], &when, &edit).map_err(engine)?;
            stamps.push(when.unix_secs());
            edits.push((d, replica));
        }
        // Everyone merges everyone's edit.
        let items: Vec<_> = edits
            .iter()
            .map(|(_, r)| r.item(&id).cloned())
            .collect::<Option<_>>()
            .ok_or_else(|| ClockSkewError::Engine("an edit vanished".into()))?;
        for (_, replica) in &mut edits {
            for item in &items {
                replica.merge(item).map_err(engine)?;
            }
        }
        let digest = edits[0].1.digest();
        if edits.iter().any(|(_, r)| r.digest() != digest) {
            return Err(ClockSkewError::Diverged { trial });
        }
        let merged =
            edits[0].1.item(&id).ok_or_else(|| ClockSkewError::Engine("merged item vanished".into()))?;
        let winner = merged.version.topmost().by.clone();
        let latest = order[order.len() - 1];
        if merged.conflicts.len() + 1 == devices.len() {
            out.losers_kept_as_conflicts += 1;
        }
        if winner.as_ref() != Some(&devices[latest]) {
            out.later_lost += 1;
            let latest_secs = stamps[stamps.len() - 1];
            if stamps.iter().any(|&s| s > latest_secs) {
                out.later_lost_by_clock += 1;
            } else {
                out.later_lost_by_tie += 1;
            }
        }
    }
    out.rate = f64::from(out.later_lost) / f64::from(out.trials);
    (out.rate_ci95_lo, out.rate_ci95_hi) = wilson95(out.later_lost, out.trials);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::cell_rng;

    fn cell(skew_ms: u64, gap_mean_ms: u64) -> Cell {
        Cell { skew_us: skew_ms * 1_000, gap_mean_us: gap_mean_ms * 1_000, devices: 2, trials: 2_000 }
    }

    #[test]
    fn without_skew_only_same_second_ties_lose() {
        // Gaps of minutes: the later edit has a later second almost always, and wins.
        let slow = run_cell(cell(0, 600_000), &mut cell_rng(1, 0)).unwrap();
        assert_eq!(slow.later_lost_by_clock, 0, "no skew: a later edit never reads an earlier clock");
        assert!(slow.rate < 0.01, "{slow:?}");
        // Gaps of 100 ms: mostly the same second, a coin flip by endpoint name.
        let fast = run_cell(cell(0, 100), &mut cell_rng(1, 1)).unwrap();
        assert_eq!(fast.later_lost_by_clock, 0);
        assert!((0.38..0.50).contains(&fast.rate), "{fast:?}");
        assert_eq!(fast.losers_kept_as_conflicts, fast.trials, "the loser stays as a conflict");
    }

    #[test]
    fn large_skew_makes_the_winner_a_coin_flip() {
        // Clocks off by up to 10 min, edits ~1 s apart: the clocks decide, at random.
        let o = run_cell(cell(600_000, 1_000), &mut cell_rng(2, 0)).unwrap();
        assert!((0.45..0.55).contains(&o.rate), "{o:?}");
        assert!(o.rate_ci95_lo < o.rate && o.rate < o.rate_ci95_hi);
        assert!(o.later_lost_by_clock > 10 * o.later_lost_by_tie, "{o:?}");
        // More skew, more lost at the same gap.
        let small = run_cell(cell(1_000, 10_000), &mut cell_rng(2, 1)).unwrap();
        let large = run_cell(cell(60_000, 10_000), &mut cell_rng(2, 1)).unwrap();
        assert!(small.rate + 0.1 < large.rate, "{small:?} vs {large:?}");
    }

    #[test]
    fn deterministic_and_checked() {
        let a = run_cell(Cell { trials: 200, ..cell(1_000, 1_000) }, &mut cell_rng(3, 0)).unwrap();
        let b = run_cell(Cell { trials: 200, ..cell(1_000, 1_000) }, &mut cell_rng(3, 0)).unwrap();
        assert_eq!(a, b);
        let three = run_cell(Cell { devices: 3, trials: 200, ..cell(0, 100) }, &mut cell_rng(3, 1)).unwrap();
        assert_eq!(three.losers_kept_as_conflicts, 200);
        let mut rng = cell_rng(0, 0);
        assert!(matches!(
            run_cell(Cell { devices: 1, ..cell(0, 1) }, &mut rng),
            Err(ClockSkewError::Devices { .. })
        ));
        assert!(matches!(run_cell(cell(0, 0), &mut rng), Err(ClockSkewError::Gap)));
        assert!(matches!(run_cell(cell(100_000_000, 1), &mut rng), Err(ClockSkewError::Span { .. })));
        let (lo, hi) = wilson95(0, 100);
        assert!(lo == 0.0 && (0.03..0.04).contains(&hi), "({lo}, {hi})");
    }
}

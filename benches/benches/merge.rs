//! Merge of a 10^4-item incoming batch into a store: feedmesh (FeedSync `merge_one`) beside
//! automerge (`apply_changes`) in one criterion group per cell `merge/n=…/c=…/h=…`.
//!
//! Grid (see `benches::grid`): feedmesh at n in {10^4, 10^5, 10^6} x c in {0, 0.01, 1} x h in
//! {1, 8, 64}; automerge only at n <= 10^5 and h <= 8: an automerge store takes one transaction
//! per change to build (about 13k changes/s here), so the larger stores (10^6 to 6.4 * 10^7
//! changes) take 1.3 to 82 minutes each; the results JSON lists those cells as omitted
//! (`benches::grid::AUTOMERGE_OMITTED_REASON`). `FEEDMESH_BENCH_QUICK=1` runs a reduced grid.
//!
//! Each store (n, h) is built once and serves every fraction c; only the merge is timed: every
//! iteration gets a fresh copy of the store from an untimed setup and hands the merged store back
//! so that dropping it is untimed as well.

use std::time::Instant;

use benches::automerge_workload::AutomergeWorkload;
use benches::feedsync_workload::{self, Batch};
use benches::grid::{self, Grid};
use benches::{Cell, BATCH_ITEMS};
use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput};
use engine::feedsync::Feed;

fn bench_cell(
    criterion: &mut Criterion,
    grid: &Grid,
    cell: &Cell,
    store: &Feed,
    batch: &Batch,
    automerge: Option<&AutomergeWorkload>,
) {
    let mut group = criterion.benchmark_group(format!("merge/{}", cell.label()));
    group
        .throughput(Throughput::Elements(BATCH_ITEMS as u64))
        .sample_size(grid.samples)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(grid.warm_up)
        .measurement_time(grid.measurement);

    group.bench_function(BenchmarkId::new("feedmesh", cell.items), |b| {
        b.iter_batched(
            || store.clone(),
            |mut feed| {
                let stats = feedsync_workload::merge_batch(&mut feed, &batch.feed);
                (feed, stats)
            },
            BatchSize::PerIteration,
        )
    });

    if let Some(workload) = automerge {
        // The workload was built with every fraction of the grid.
        let changes = workload.batch(cell.concurrent_ppm).expect("automerge batch for every grid fraction");
        group.bench_function(BenchmarkId::new("automerge", cell.items), |b| {
            b.iter_batched(
                || (workload.local.clone(), changes.clone()),
                |(mut doc, changes)| {
                    // The batch was made on a fork of this very document.
                    doc.apply_changes(changes).expect("automerge batch applies to its own store");
                    doc
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn main() {
    let bench_mode = grid::bench_mode(std::env::args());
    let grid = match Grid::from_env(bench_mode) {
        Ok(grid) => grid,
        Err(err) => {
            eprintln!("merge bench: {err}");
            std::process::exit(2);
        }
    };
    let mut criterion = Criterion::default().configure_from_args();
    let started = Instant::now();
    for &items in &grid.items {
        for &history in &grid.history {
            let clock = Instant::now();
            let store = feedsync_workload::store(items, history);
            eprintln!("# feedmesh store n={items} h={history}: built in {:.1?}", clock.elapsed());
            let automerge = grid.runs_automerge(items, history).then(|| {
                let clock = Instant::now();
                let workload = AutomergeWorkload::build(items, history, &grid.concurrent_ppm);
                eprintln!("# automerge store n={items} h={history}: built in {:.1?}", clock.elapsed());
                workload
            });
            for &concurrent_ppm in &grid.concurrent_ppm {
                let cell = Cell { items, concurrent_ppm, history };
                let batch = feedsync_workload::batch(&cell);
                bench_cell(&mut criterion, &grid, &cell, &store, &batch, automerge.as_ref());
            }
        }
    }
    criterion.final_summary();
    eprintln!("# merge bench: {:.1?} in all", started.elapsed());
}

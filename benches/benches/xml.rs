//! FeedSync XML throughput: `read_feed` and `write_feed` of generated RSS feeds of 10^4 items,
//! in groups `xml/read` and `xml/write`, one benchmark per feed, `Throughput::Bytes`.
//!
//! Feeds (named by the merge cell they come from, `n=…/c=…/h=…`): a plain one (history 1, no
//! conflicts) and a busier one (history 8, a tenth of the items with a conflict).

use std::time::Duration;

use benches::feedsync_workload;
use benches::grid::bench_mode;
use benches::Cell;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use engine::feedsync::xml::{read_feed, write_feed};

/// The feeds read and written.
const FEEDS: [Cell; 2] = [
    Cell { items: 10_000, concurrent_ppm: 0, history: 1 },
    Cell { items: 10_000, concurrent_ppm: 100_000, history: 8 },
];

fn main() {
    let quick = !bench_mode(std::env::args())
        || std::env::var(benches::grid::ENV_QUICK).is_ok_and(|v| !v.is_empty() && v != "0");
    let mut criterion = Criterion::default().configure_from_args();
    let feeds: Vec<(Cell, String)> = FEEDS
        .iter()
        .map(|cell| {
            let xml = write_feed(&feedsync_workload::merged_feed(cell));
            eprintln!("# xml feed {}: {} bytes", cell.label(), xml.len());
            (*cell, xml)
        })
        .collect();
    let (warm_up, measurement) = if quick {
        (Duration::from_millis(300), Duration::from_secs(1))
    } else {
        (Duration::from_secs(1), Duration::from_secs(4))
    };

    let mut group = criterion.benchmark_group("xml/read");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(warm_up)
        .measurement_time(measurement);
    for (cell, xml) in &feeds {
        group.throughput(Throughput::Bytes(xml.len() as u64));
        group.bench_with_input(BenchmarkId::new("feedmesh", cell.label()), xml.as_bytes(), |b, bytes| {
            // The document is the engine's own output.
            b.iter(|| read_feed(bytes).expect("the engine reads back what it wrote"))
        });
    }
    group.finish();

    let mut group = criterion.benchmark_group("xml/write");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(warm_up)
        .measurement_time(measurement);
    for (cell, xml) in &feeds {
        // The document is the engine's own output.
        let feed = read_feed(xml.as_bytes()).expect("the engine reads back what it wrote");
        assert_eq!(write_feed(&feed), *xml, "write(read(x)) == x for the engine's own output");
        group.throughput(Throughput::Bytes(xml.len() as u64));
        group.bench_with_input(BenchmarkId::new("feedmesh", cell.label()), &feed, |b, feed| {
            b.iter(|| write_feed(feed))
        });
    }
    group.finish();
    criterion.final_summary();
}

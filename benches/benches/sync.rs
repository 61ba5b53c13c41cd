//! Time of one sync session, feedmesh beside automerge's sync protocol on the same workload (see
//! `src/bin/sync_sweep.rs`, which reports bytes and round trips for the full grid). Cells: n in
//! {10^4, 10^5} shared items, d in {1, 100} one-sided differences, fresh and retained state.
//! `FEEDMESH_BENCH_QUICK=1` keeps n = 10^4 only.

use automerge::sync as am_sync;
use benches::sync_workload::{am_diverge, am_doc, am_session, diverge, replica, session};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use engine::sync::Retained;

fn bench(c: &mut Criterion) {
    let quick = std::env::var_os("FEEDMESH_BENCH_QUICK").is_some();
    let sizes: &[usize] = if quick { &[10_000] } else { &[10_000, 100_000] };
    for &n in sizes {
        let base = replica(n);
        let doc = am_doc(n);
        for retained in [false, true] {
            let mut group =
                c.benchmark_group(format!("sync/n={n}/{}", if retained { "retained" } else { "fresh" }));
            group.sample_size(10);
            for d in [1usize, 100] {
                group.throughput(Throughput::Elements(d as u64));
                group.bench_with_input(BenchmarkId::new("feedmesh", d), &d, |bch, &d| {
                    bch.iter_batched(
                        || {
                            let (mut a, mut b) = (base.clone(), base.clone());
                            let keep = if retained {
                                session(&mut a, &mut b, Retained::default()).retained
                            } else {
                                Retained::default()
                            };
                            diverge(&mut a, "a", d);
                            (a, b, keep)
                        },
                        // Return the replicas, so that dropping them is not timed.
                        |(mut a, mut b, keep)| {
                            let kept = session(&mut a, &mut b, keep).retained;
                            (a, b, kept)
                        },
                        BatchSize::PerIteration,
                    )
                });
                group.bench_with_input(BenchmarkId::new("automerge", d), &d, |bch, &d| {
                    bch.iter_batched(
                        || {
                            let (mut a, mut b) = (doc.fork(), doc.fork());
                            let (mut sa, mut sb) = (am_sync::State::new(), am_sync::State::new());
                            if retained {
                                let _ = am_session(&mut a, &mut b, &mut sa, &mut sb);
                            }
                            am_diverge(&mut a, "a", d);
                            (a, b, sa, sb)
                        },
                        |(mut a, mut b, mut sa, mut sb)| {
                            let _ = am_session(&mut a, &mut b, &mut sa, &mut sb);
                            (a, b, sa, sb)
                        },
                        BatchSize::PerIteration,
                    )
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

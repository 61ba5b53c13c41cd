//! Time of one sync session, feedmesh beside automerge's sync protocol on the same workload (see
//! `src/bin/sync_sweep.rs`, which reports bytes and round trips for the full grid). Cells: n in
//! {10^4, 10^5} shared items, d in {1, 100} one-sided differences, fresh and retained state.
//! `FEEDMESH_BENCH_QUICK=1` keeps n = 10^4 only.

use std::sync::Arc;

use automerge::sync::{self as am_sync, SyncDoc as _};
use automerge::transaction::Transactable as _;
use automerge::{ActorId, Automerge, ObjType, ROOT};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use engine::feedsync::{Content, Edit, Endpoint, ItemId, When};
use engine::replica::Replica;
use engine::sync::{Config, Outcome, Retained, Session};

fn edit(text: &str) -> Edit {
    Edit {
        content: Some(Arc::new(Content {
            attrs: "".into(),
            inner: format!("<title>{text}</title><description>item {text}</description>").into(),
            ..Content::empty()
        })),
        ..Edit::default()
    }
}

fn replica(n: usize) -> Replica {
    let mut r = Replica::new(0);
    let by = Endpoint::new("origin").expect("valid");
    let when = When::from_unix_secs(1_600_000_000).expect("in range");
    for i in 0..n {
        r.change(&ItemId::new(&format!("item-{i}")).expect("valid"), &by, &when, &edit(&i.to_string()))
            .expect("ok");
    }
    r
}

fn diverge(r: &mut Replica, d: usize) {
    let by = Endpoint::new("a").expect("valid");
    let when = When::from_unix_secs(1_700_000_000).expect("in range");
    for k in 0..d {
        r.change(&ItemId::new(&format!("a-{k}")).expect("valid"), &by, &when, &edit("a")).expect("ok");
    }
}

fn session(a: &mut Replica, b: &mut Replica, retained: Retained) -> Retained {
    let mut sa = Session::initiate(1, 0, a, Config::default(), retained);
    let mut sb = Session::respond(1, b, Config::default(), None);
    loop {
        let mut moved = false;
        while let Some(m) = sa.poll_transmit() {
            moved = true;
            let _ = sb.handle_message(0, b, &m);
        }
        while let Some(m) = sb.poll_transmit() {
            moved = true;
            let _ = sa.handle_message(0, a, &m);
        }
        if !moved {
            break;
        }
    }
    match sa.outcome() {
        Outcome::Done { retained, .. } => *retained,
        _ => Retained::default(),
    }
}

fn am_doc(n: usize) -> Automerge {
    let mut doc = Automerge::new();
    doc.set_actor(ActorId::from(b"origin".as_slice()));
    for i in 0..n {
        let mut tx = doc.transaction();
        let obj = tx.put_object(ROOT, format!("item-{i}"), ObjType::Map).expect("put");
        tx.put(&obj, "title", i.to_string()).expect("put");
        tx.put(&obj, "description", format!("item {i}")).expect("put");
        tx.commit();
    }
    doc
}

fn am_diverge(doc: &mut Automerge, d: usize) {
    doc.set_actor(ActorId::from(b"a".as_slice()));
    for k in 0..d {
        let mut tx = doc.transaction();
        let obj = tx.put_object(ROOT, format!("a-{k}"), ObjType::Map).expect("put");
        tx.put(&obj, "title", "a").expect("put");
        tx.commit();
    }
}

fn am_session(a: &mut Automerge, b: &mut Automerge, sa: &mut am_sync::State, sb: &mut am_sync::State) {
    loop {
        let mut moved = false;
        if let Some(m) = a.generate_sync_message(sa) {
            b.receive_sync_message(sb, m).expect("valid");
            moved = true;
        }
        if let Some(m) = b.generate_sync_message(sb) {
            a.receive_sync_message(sa, m).expect("valid");
            moved = true;
        }
        if !moved {
            break;
        }
    }
}

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
                                session(&mut a, &mut b, Retained::default())
                            } else {
                                Retained::default()
                            };
                            diverge(&mut a, d);
                            (a, b, keep)
                        },
                        // Return the replicas, so that dropping them is not timed.
                        |(mut a, mut b, keep)| {
                            let kept = session(&mut a, &mut b, keep);
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
                                am_session(&mut a, &mut b, &mut sa, &mut sb);
                            }
                            am_diverge(&mut a, d);
                            (a, b, sa, sb)
                        },
                        |(mut a, mut b, mut sa, mut sb)| {
                            am_session(&mut a, &mut b, &mut sa, &mut sb);
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

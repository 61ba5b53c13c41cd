//! Cost of signed versions: ed25519 sign and verify time per version (over its canonical
//! encoding), and one sync session between signed replicas (every received version verified)
//! beside the same session unsigned. n = 10^4 shared items, d in {1, 100} one-sided differences.

use benches::sync_workload::{device_key, diverge, diverge_signed, replica, replica_signed, session, SCOPE};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use engine::signing::{sign_version, verify_version};
use engine::sync::Retained;

fn bench(c: &mut Criterion) {
    let key = device_key(0);
    let signed = replica_signed(1_000, &key);
    let versions: Vec<_> = signed.items().map(|i| i.version.clone()).collect();
    let mut group = c.benchmark_group("signing/version");
    group.throughput(Throughput::Elements(versions.len() as u64));
    group.bench_function("sign", |b| {
        b.iter(|| versions.iter().map(|v| sign_version(v, &SCOPE, &key).to_bytes()[0] as u64).sum::<u64>())
    });
    group.bench_function("verify", |b| {
        b.iter(|| versions.iter().filter(|v| verify_version(v, &SCOPE).is_ok()).count())
    });
    // The part of a verification that a per-device key cache would save.
    let device = engine::signing::DeviceId::of(&key);
    group.bench_function("decompress-key", |b| {
        b.iter(|| versions.iter().filter(|_| device.verifying_key().is_ok()).count())
    });
    group.finish();

    let n = 10_000;
    let (plain, signed) = (replica(n), replica_signed(n, &key));
    let mut group = c.benchmark_group(format!("signing/sync/n={n}/fresh"));
    group.sample_size(10);
    for d in [1usize, 100] {
        group.throughput(Throughput::Elements(d as u64));
        for (name, base) in [("unsigned", &plain), ("signed", &signed)] {
            group.bench_with_input(BenchmarkId::new(name, d), &d, |bch, &d| {
                bch.iter_batched(
                    || {
                        let (mut a, b) = (base.clone(), base.clone());
                        if name == "signed" {
                            diverge_signed(&mut a, &device_key(1), "a", d);
                        } else {
                            diverge(&mut a, "a", d);
                        }
                        (a, b)
                    },
                    |(mut a, mut b)| {
                        let run = session(&mut a, &mut b, Retained::default());
                        (a, b, run.messages)
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

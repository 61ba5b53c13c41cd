//! The sync sweep: round trips, bytes, bytes beyond the payload and time of one session between two
//! replicas, feedmesh beside automerge's sync protocol on the same workload, written to
//! `papers/results/sync.json`.
//!
//! Workload: `n` items shared by both sides; `d` differences: one-sided (A has `d` items B lacks)
//! or two-sided (A has `ceil(d/2)` new items, B `floor(d/2)`); fresh (no sync state) or retained
//! (a first session synced the common items, then the differences were made). automerge: each item
//! is a map under ROOT made by one change; the same differences as changes; `sync::State` fresh or
//! kept from the first sync.
//!
//! Usage: `cargo run --release -p feedmesh-benches --bin sync_sweep [--quick] [--signed] [--sizes N,N] [--out FILE]`.
//! `--signed`: signed replicas (every version signed by its device, every received version
//! verified), written to `papers/results/sync_signed.json` with the per-version signing cost;
//! automerge is left out (its figures do not change).
//! `--quick` (or `FEEDMESH_BENCH_QUICK=1`) stops at n = 10^4. automerge runs up to n = 10^5: its
//! document of 10^6 one-change items takes too long to build on 2 cores.

use std::collections::BTreeMap;
use std::time::Instant;

use automerge::sync as am_sync;
use automerge::Automerge;
use benches::sync_workload::{
    am_diverge, am_doc, am_session, device_key, diverge, diverge_signed, replica, replica_signed, session,
    SCOPE,
};
use engine::replica::Replica;
use engine::sync::Retained;
use serde_json::{json, Value};

struct Measured {
    messages: u64,
    bytes: u64,
    payload: u64,
    micros: u128,
    retained: Retained,
    converged: bool,
}

/// One timed session.
fn measured(a: &mut Replica, b: &mut Replica, retained: Retained) -> Measured {
    let start = Instant::now();
    let run = session(a, b, retained);
    let micros = start.elapsed().as_micros();
    let (x, y) = (run.initiator, run.responder);
    Measured {
        messages: run.messages,
        bytes: x.bytes_sent + y.bytes_sent,
        payload: x.payload_bytes_sent + y.payload_bytes_sent,
        micros,
        retained: run.retained,
        converged: a.digest() == b.digest(),
    }
}

/// d (64 - log2 d + 1.44) / 8 bytes: the information needed to name d of 2^64 fingerprints.
fn lower_bound(d: usize) -> f64 {
    let d = d as f64;
    d * (64.0 - d.log2() + 1.44) / 8.0
}

fn feedmesh_cell(base_replica: &Replica, d: usize, two_sided: bool, retained: bool, signed: bool) -> Value {
    // Both sides start as clones of one replica (payloads shared, as in a simulator).
    let mut a = base_replica.clone();
    let mut b = base_replica.clone();
    let mut keep = Retained::default();
    if retained {
        keep = measured(&mut a, &mut b, Retained::default()).retained;
    }
    let (da, db) = if two_sided { (d.div_ceil(2), d / 2) } else { (d, 0) };
    if signed {
        diverge_signed(&mut a, &device_key(1), "a", da);
        diverge_signed(&mut b, &device_key(2), "b", db);
    } else {
        diverge(&mut a, "a", da);
        diverge(&mut b, "b", db);
    }
    let m = measured(&mut a, &mut b, keep);
    let beyond = m.bytes - m.payload;
    json!({
        "round_trips": m.messages.div_ceil(2),
        "messages": m.messages,
        "bytes": m.bytes,
        "payload_bytes": m.payload,
        "beyond_payload_bytes": beyond,
        "lower_bound_bytes": (lower_bound(d) * 10.0).round() / 10.0,
        "beyond_over_lower_bound": ((beyond as f64 / lower_bound(d)) * 100.0).round() / 100.0,
        "micros": m.micros,
        "converged": m.converged,
    })
}

struct AmPair {
    a: Automerge,
    b: Automerge,
}

/// Runs automerge sync to quiescence, timed; returns (messages, bytes, micros).
fn am_sync(p: &mut AmPair, sa: &mut am_sync::State, sb: &mut am_sync::State) -> (u64, u64, u128) {
    let start = Instant::now();
    let (messages, bytes) = am_session(&mut p.a, &mut p.b, sa, sb);
    (messages, bytes, start.elapsed().as_micros())
}

fn automerge_cell(doc: &Automerge, d: usize, two_sided: bool, retained: bool) -> Value {
    let mut p = AmPair { a: doc.fork(), b: doc.fork() };
    let (mut sa, mut sb) = (am_sync::State::new(), am_sync::State::new());
    if !retained {
        // Fresh state: neither side has synced with the other before.
    } else {
        am_sync(&mut p, &mut sa, &mut sb);
    }
    let (da, db) = if two_sided { (d.div_ceil(2), d / 2) } else { (d, 0) };
    let before_a = p.a.get_heads();
    let before_b = p.b.get_heads();
    am_diverge(&mut p.a, "a", da);
    am_diverge(&mut p.b, "b", db);
    let payload: u64 =
        p.a.get_changes(&before_a)
            .iter()
            .chain(p.b.get_changes(&before_b).iter())
            .map(|c| c.raw_bytes().len() as u64)
            .sum();
    let (messages, bytes, micros) = am_sync(&mut p, &mut sa, &mut sb);
    json!({
        "round_trips": messages.div_ceil(2),
        "messages": messages,
        "bytes": bytes,
        "payload_bytes": payload,
        "beyond_payload_bytes": bytes.saturating_sub(payload),
        "micros": micros,
        "converged": p.a.get_heads() == p.b.get_heads(),
    })
}

fn main() -> anyhow::Result<()> {
    if benches::help_requested(
        "sync_sweep: one sync session per (n, d, sides, state), feedmesh beside automerge\n\n\
         usage: sync_sweep [--quick] [--signed] [--sizes N,N,...] [--out FILE]\n  \
         --quick       a reduced grid (also FEEDMESH_BENCH_QUICK=1)\n  \
         --signed      signed replicas (writes papers/results/sync_signed.json)\n  \
         --sizes N,N   the item counts n to run\n  \
         --out FILE    where the JSON goes (default papers/results/sync.json)",
    ) {
        return Ok(());
    }
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || std::env::var_os("FEEDMESH_BENCH_QUICK").is_some();
    let signed = args.iter().any(|a| a == "--signed");
    let default_out = if signed { "papers/results/sync_signed.json" } else { "papers/results/sync.json" };
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default_out.to_string());
    let sizes: Vec<usize> = match args.iter().position(|a| a == "--sizes").and_then(|i| args.get(i + 1)) {
        Some(list) => list.split(',').filter_map(|s| s.parse().ok()).collect(),
        None if quick => vec![1_000, 10_000],
        None => vec![1_000, 10_000, 100_000, 1_000_000],
    };
    let diffs = [1usize, 2, 10, 100, 1000];
    let mut cells: Vec<Value> = Vec::new();
    for &n in &sizes {
        eprintln!("sync sweep: n = {n}: building replicas");
        let replica = if signed { replica_signed(n, &device_key(0)) } else { replica(n) };
        let am = (n <= 100_000 && !signed).then(|| am_doc(n));
        for &d in &diffs {
            for two_sided in [false, true] {
                for retained in [false, true] {
                    let feedmesh = feedmesh_cell(&replica, d, two_sided, retained, signed);
                    let automerge = am.as_ref().map(|doc| automerge_cell(doc, d, two_sided, retained));
                    let mut cell: BTreeMap<&str, Value> = BTreeMap::new();
                    cell.insert("n", json!(n));
                    cell.insert("d", json!(d));
                    cell.insert("sides", json!(if two_sided { "two" } else { "one" }));
                    cell.insert("state", json!(if retained { "retained" } else { "fresh" }));
                    if let Some(am) = &automerge {
                        let ratio =
                            am["bytes"].as_f64().unwrap_or(0.0) / feedmesh["bytes"].as_f64().unwrap_or(1.0);
                        let time_ratio = am["micros"].as_f64().unwrap_or(0.0)
                            / feedmesh["micros"].as_f64().unwrap_or(1.0).max(1.0);
                        cell.insert("automerge_bytes_over_feedmesh", json!((ratio * 10.0).round() / 10.0));
                        cell.insert(
                            "automerge_time_over_feedmesh",
                            json!((time_ratio * 10.0).round() / 10.0),
                        );
                    }
                    cell.insert("feedmesh", feedmesh);
                    cell.insert("automerge", automerge.unwrap_or(Value::Null));
                    eprintln!("sync sweep: {}", serde_json::to_string(&cell)?);
                    cells.push(json!(cell));
                }
            }
        }
    }
    let mut doc = json!({
        "benchmark": if signed { "sync_signed" } else { "sync" },
        "workload": "n shared items; d differences, one-sided (A has d new items) or two-sided (A ceil(d/2), B floor(d/2)); fresh or retained sync state (a first session synced the shared items). automerge: one change per item (a map under ROOT), the same differences as changes, sync::State fresh or kept.",
        "definitions": "round trip = a message and its answer; bytes = all session messages both ways as encoded for the wire; payload = encoded differing item versions (automerge: raw bytes of the differing changes); lower bound = d(64 - log2 d + 1.44)/8 bytes.",
        "omitted": "automerge at n = 10^6: building a document of 10^6 one-change items takes too long on 2 cores.",
        "command": "cargo run --release -p feedmesh-benches --bin sync_sweep",
        "cells": cells,
    });
    if signed {
        doc["command"] = json!("cargo run --release -p feedmesh-benches --bin sync_sweep -- --signed");
        doc["signing"] = signing_cost();
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    eprintln!("sync sweep: wrote {out}");
    Ok(())
}

/// Sign and verify time per version and bytes added per version (wire and FeedSync XML), on the
/// sweep's item shape, measured over 2,000 versions.
fn signing_cost() -> Value {
    use engine::signing::{sign_version, verify_version};
    let n = 2_000;
    let plain = replica(n);
    let key = device_key(0);
    let signed = replica_signed(n, &key);
    let versions: Vec<_> = signed.items().map(|i| i.version.clone()).collect();
    let start = Instant::now();
    let mut sigs = 0usize;
    for v in &versions {
        sigs += sign_version(v, &SCOPE, &key).to_bytes()[0] as usize;
    }
    let sign_ns = start.elapsed().as_nanos() as f64 / n as f64;
    let start = Instant::now();
    let ok = versions.iter().filter(|v| verify_version(v, &SCOPE).is_ok()).count();
    let verify_ns = start.elapsed().as_nanos() as f64 / n as f64;
    assert_eq!(ok, n, "every signed version verifies");
    let wire = |r: &Replica| -> usize {
        r.items().map(|i| engine::wire::encoded_len(&engine::wire::to_wire(i))).sum()
    };
    let xml = |r: &Replica| -> usize {
        let mut feed = engine::feedsync::Feed::new(engine::feedsync::Dialect::Rss);
        for item in r.items() {
            let _ = feed.put((**item).clone());
        }
        engine::feedsync::write_feed(&feed).len()
    };
    std::hint::black_box(sigs);
    json!({
        "versions": n,
        "sign_us_per_version": (sign_ns / 100.0).round() / 10.0,
        "verify_us_per_version": (verify_ns / 100.0).round() / 10.0,
        "wire_bytes_unsigned_per_version": wire(&plain) as f64 / n as f64,
        "wire_bytes_signed_per_version": wire(&signed) as f64 / n as f64,
        "xml_bytes_added_per_version": (xml(&signed) as f64 - xml(&plain) as f64) / n as f64,
        "note": "signed endpoints are 64 hex digits (the device key) where the unsigned workload writes 'origin', so wire bytes added = 64 (signature) + 1 (option tag) + 58 (longer endpoint); the sweep's difference items are made by the same devices.",
    })
}

//! Restart time of a node and of a relay holding many items (issue 16, item 2).
//!
//! A device (`node::state::create`, its own user, one mapped folder) writes `--items` signed
//! items, committed to its redb store in batches; the same items and the directory go into a
//! relay's store. Then, `--runs` times each: `Node::open` (the node is ready to sync when it
//! returns: directory, replicas and outbox in memory) and `relay::cloud::Cloud::load` (the same
//! for the cloud) are timed from the store on disk, page cache warm, as a restarted process
//! finds it. Nothing is verified again at load: every stored item was verified before it was
//! stored (`Replica::restore`).
//!
//! Usage: `cargo run --release -p feedmesh-benches --bin restart -- [--items 1000000] [--runs 3]
//! [--json papers/results/restart.json]`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context};
use clap::Parser;
use engine::directory::Op;
use engine::feedsync::{Edit, ItemId, When};
use engine::signing::{DeviceId, DeviceKey};
use node::state::{Node, NodeConfig};
use serde_json::json;
use transport::store::Store;

#[derive(Parser, Debug)]
#[command(about = "Restart time of a node and a relay whose stores hold many items")]
struct Args {
    /// Items in the folder.
    #[arg(long, default_value_t = 1_000_000)]
    items: usize,
    /// Timed loads of each kind (the fastest is reported, every one is kept).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where to write the results.
    #[arg(long, default_value = "papers/results/restart.json")]
    json: PathBuf,
}

/// Items written and committed per redb transaction while the store is built.
const BATCH: usize = 50_000;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = tempfile::tempdir()?;
    let node_dir = root.path().join("node");
    let cloud_key = DeviceKey::from_bytes(&[7; 32]);
    let cfg = NodeConfig {
        cloud: DeviceId::of(&cloud_key),
        relay_url: "https://127.0.0.1:1".into(),
        cloud_addrs: Vec::new(),
        relay_ca_pem: None,
        relay_qad_port: None,
    };
    node::state::create(&node_dir, &cfg)?;

    // Build: a user, a folder mapped here, and the items (signing dominates this part).
    let t = Instant::now();
    let folder = {
        let mut n = Node::open(&node_dir)?;
        n.make(Op::CreateUser { name: "restart-bench".into() })?;
        let folder = n.make(Op::CreateFolder { name: "bench".into() })?.folder_id();
        n.make(Op::Map { folder })?;
        let when = When::from_unix_secs(transport::now_secs()).map_err(|e| anyhow!("{e}"))?;
        for start in (0..args.items).step_by(BATCH) {
            let end = (start + BATCH).min(args.items);
            let mut changes = Vec::with_capacity(end - start);
            for i in start..end {
                let id = ItemId::new(&format!("item-{i:07}")).map_err(|e| anyhow!("{e}"))?;
                let text = format!("item {i:07}: {}", "restart benchmark text ".repeat(4));
                changes
                    .push((id, Edit { content: Some(node::state::content(None, &text)), ..Edit::default() }));
            }
            // A bulk write (batch signatures), one commit per BATCH items.
            n.device.write_many(folder, &when, &changes).map_err(|e| anyhow!("{e}"))?;
            n.commit()?;
            eprint!("\rwriting: {end} of {} items", args.items);
        }
        eprintln!();
        // The relay's store: the same directory and items.
        let relay_store = Store::open(&root.path().join("relay.redb"), "relay")?;
        relay_store.save_changes(&n.dir().changes().cloned().collect::<Vec<_>>())?;
        let replica = n.replica(&folder).ok_or_else(|| anyhow!("no replica of the folder"))?;
        let items: Vec<Arc<_>> = replica.items().cloned().collect();
        for chunk in items.chunks(BATCH) {
            relay_store.save_items(&folder, chunk)?;
        }
        folder
    };
    let build_s = t.elapsed().as_secs_f64();
    let db_bytes = std::fs::metadata(node_dir.join(node::state::DB_FILE)).map(|m| m.len()).unwrap_or(0);
    println!("built: {} items in {build_s:.1} s; node store {:.1} MB", args.items, db_bytes as f64 / 1e6);

    let mut node_s = Vec::new();
    for _ in 0..args.runs.max(1) {
        let t = Instant::now();
        let n = Node::open(&node_dir)?;
        let s = t.elapsed().as_secs_f64();
        let held = n.replica(&folder).map_or(0, |r| r.len());
        anyhow::ensure!(held == args.items, "the node came back with {held} items, not {}", args.items);
        drop(n);
        println!("node open: {s:.3} s");
        node_s.push(s);
    }
    let mut relay_s = Vec::new();
    for epoch in 1..=args.runs.max(1) as u64 {
        let store = Store::open(&root.path().join("relay.redb"), "relay")?;
        let t = Instant::now();
        let cloud = relay::cloud::Cloud::load(store, cloud_key.clone(), Default::default(), epoch)
            .context("loading the relay's cloud")?;
        let s = t.elapsed().as_secs_f64();
        let held = cloud.lock().control.replica(&folder).map_or(0, |r| r.len());
        anyhow::ensure!(held == args.items, "the relay came back with {held} items, not {}", args.items);
        drop(cloud);
        println!("relay load: {s:.3} s");
        relay_s.push(s);
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let value = json!({
        "benchmark": "restart",
        "items": args.items,
        "node_store_bytes": db_bytes,
        "node_open_seconds": best(&node_s),
        "node_open_seconds_per_run": node_s,
        "relay_load_seconds": best(&relay_s),
        "relay_load_seconds_per_run": relay_s,
        "machine": { "cores": std::thread::available_parallelism().map_or(0, |n| n.get()) },
    });
    println!(
        "restart with {} items: node {:.3} s, relay {:.3} s (best of {})",
        args.items,
        best(&node_s),
        best(&relay_s),
        args.runs.max(1)
    );
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&value)? + "\n")?;
    println!("wrote {}", args.json.display());
    Ok(())
}

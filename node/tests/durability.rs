//! Killing a node with SIGKILL while it takes writes loses no acknowledged write: every write
//! the local API answered 200 to is there after a restart (redb commits before the answer).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

#[test]
fn sigkill_during_writes_loses_no_acknowledged_write() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let mut a1 = Dev::new(root.path(), "a1");
    a1.ok(&["init", "--relay", &relay.url, "--name", "alice"]);
    a1.ok(&["folder", "create", "notes"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut acked_total = 0;
    for round in 0..3 {
        a1.start();
        let (base, token) = a1.api();
        let acked = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        // Writers hammer the API until the process dies under them.
        let writer = {
            let (acked, stop) = (acked.clone(), stop.clone());
            let handle = rt.handle().clone();
            std::thread::spawn(move || {
                handle.block_on(async move {
                    let client = reqwest::Client::new();
                    let mut i = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("r{round}-k{i}");
                        i += 1;
                        let resp = client
                            .put(format!("{base}/v1/folders/notes/items/{id}"))
                            .bearer_auth(&token)
                            .json(&serde_json::json!({ "title": id, "text": "x".repeat(200) }))
                            .send()
                            .await;
                        match resp {
                            Ok(r) if r.status().is_success() => acked.lock().unwrap().push(id),
                            Ok(r) => panic!("write refused: {}", r.status()),
                            Err(_) => break, // the process is gone
                        }
                    }
                })
            })
        };
        wait_for(Duration::from_secs(30), || acked.lock().unwrap().len() >= 150, "150 acknowledged writes");
        a1.kill();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let acked = acked.lock().unwrap().clone();
        acked_total += acked.len();
        // Reopened without a daemon: every acknowledged write is there.
        let have = ids(&a1, "notes");
        let missing: Vec<&String> = acked.iter().filter(|id| !have.contains(id)).collect();
        assert!(missing.is_empty(), "round {round}: {} acknowledged writes lost: {missing:?}", missing.len());
    }
    assert!(acked_total >= 450);
    // And the database is still sound: the daemon starts, syncs everything to the cloud.
    a1.start();
    a1.ok(&["sync"]);
    let items = {
        let st = relay.cloud().lock();
        st.replicas.values().map(|r| r.len()).sum::<usize>()
    };
    assert!(items >= acked_total, "cloud has {items} of {acked_total}");
}

//! The relay's HTTP API against real devices: login and admin tokens, REST resources, a feed as
//! FeedSync Atom (with `since`), a FeedSync feed merged by POST (signed versions only), the
//! long-poll notification endpoint, health and metrics.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[test]
fn the_http_api_serves_what_the_devices_synced() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let mut a1 = Dev::new(root.path(), "a1");
    a1.ok(&["init", "--relay", &relay.url, "--name", "alice", "--account", "alice"]);
    let folder_line = a1.ok(&["folder", "create", "photos"]);
    let folder = folder_line.split_whitespace().last().unwrap().to_string();
    a1.ok(&["put", "photos", "p1", "first", "--title", "One"]);
    a1.ok(&["sync"]);
    let url = relay.url.clone();
    let admin = relay.admin_token();
    let c = reqwest::Client::new();
    let rt = &relay.rt;
    let get = |path: &str, token: &str| -> (u16, Value) {
        rt.block_on(async {
            let r = c.get(format!("{url}{path}")).bearer_auth(token).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json().await.unwrap_or(Value::Null))
        })
    };

    // Login with the account's password; a wrong one is refused.
    let (token, bad) = rt.block_on(async {
        let ok: Value = c
            .post(format!("{url}/v1/login"))
            .json(&json!({"account": "alice", "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let bad = c
            .post(format!("{url}/v1/login"))
            .json(&json!({"account": "alice", "password": "nope-nope"}))
            .send()
            .await
            .unwrap();
        (ok["token"].as_str().unwrap().to_string(), bad.status().as_u16())
    });
    assert_eq!(bad, 401);

    // REST resources.
    let (s, users) = get("/v1/users", &token);
    assert_eq!(s, 200);
    assert_eq!(users["users"].as_array().unwrap().len(), 1);
    assert_eq!(users["users"][0]["name"], "alice");
    assert_eq!(users["users"][0]["account"], "alice");
    let (_, devices) = get("/v1/devices", &token);
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1);
    let (_, folders) = get("/v1/folders", &token);
    assert_eq!(folders["folders"][0]["name"], "photos");
    assert_eq!(folders["folders"][0]["id"], folder);
    let (_, members) = get(&format!("/v1/folders/{folder}/members"), &token);
    assert_eq!(members["members"][0]["role"], "owner");
    let (_, items) = get(&format!("/v1/folders/{folder}/items"), &token);
    assert_eq!(items["items"][0]["id"], "p1");
    assert_eq!(items["items"][0]["title"], "One");
    assert_eq!(items["items"][0]["signed"], true);
    let (s, item) = get(&format!("/v1/folders/{folder}/items/p1"), &token);
    assert_eq!(s, 200);
    assert_eq!(item["text"], "first");
    let (_, invitations) = get("/v1/invitations", &token);
    assert!(invitations["invitations"].as_array().unwrap().is_empty());

    // The admin issues a token for the account; the admin sees every user.
    let admin_issued: Value = rt.block_on(async {
        c.post(format!("{url}/v1/accounts/alice/tokens"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let issued = admin_issued["token"].as_str().unwrap().to_string();
    assert_eq!(get("/v1/folders", &issued).1["folders"][0]["name"], "photos");
    let forbidden = rt.block_on(async {
        c.post(format!("{url}/v1/accounts/alice/tokens"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(forbidden, 403, "only the admin issues tokens");

    // Another user's account sees none of Alice's folders.
    let b1 = Dev::new(root.path(), "b1");
    b1.ok(&["init", "--relay", &relay.url, "--name", "bob", "--account", "bob"]);
    let bob: Value = rt.block_on(async {
        c.post(format!("{url}/v1/login"))
            .json(&json!({"account": "bob", "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let bob = bob["token"].as_str().unwrap().to_string();
    assert!(get("/v1/folders", &bob).1["folders"].as_array().unwrap().is_empty());
    assert_eq!(get(&format!("/v1/folders/{folder}/items"), &bob).0, 404);

    // The feed as FeedSync Atom, whole and since a cursor.
    let (atom, epoch, head) = rt.block_on(async {
        let r =
            c.get(format!("{url}/v1/folders/{folder}/feed.atom")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.headers()["content-type"], "application/atom+xml; charset=utf-8");
        let epoch = r.headers()["x-feedmesh-epoch"].to_str().unwrap().to_string();
        let head = r.headers()["x-feedmesh-head"].to_str().unwrap().to_string();
        (r.text().await.unwrap(), epoch, head)
    });
    let feed = engine::feedsync::read_feed(atom.as_bytes()).unwrap();
    assert_eq!(feed.len(), 1);
    a1.ok(&["put", "photos", "p2", "second"]);
    a1.ok(&["sync"]);
    let since = rt.block_on(async {
        c.get(format!("{url}/v1/folders/{folder}/feed.atom?since={head}&epoch={epoch}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let since = engine::feedsync::read_feed(since.as_bytes()).unwrap();
    assert_eq!(since.items().map(|i| i.id().as_str().to_string()).collect::<Vec<_>>(), vec!["p2"]);

    // POST: a device's signed export merges; an unsigned feed is refused item by item.
    let export = root.path().join("x.atom");
    a1.ok(&["put", "photos", "p3", "third"]);
    a1.ok(&["export", "photos", "--output", export.to_str().unwrap()]);
    let (merged, unsigned) = rt.block_on(async {
        let body = std::fs::read(&export).unwrap();
        let merged: Value =
            c.post(format!("{url}/v1/folders/{folder}/feed")).bearer_auth(&token).body(body).send().await.unwrap().json().await.unwrap();
        let unsigned_feed = r#"<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom" xmlns:sx="http://feedsync.org/2007/feedsync"><title>t</title><id>urn:t</id><updated>2020-01-01T00:00:00Z</updated><entry><sx:sync id="evil" updates="1"><sx:history sequence="1" when="2020-01-01T00:00:00Z" by="mallory"/></sx:sync><title>x</title></entry></feed>"#;
        let unsigned: Value = c
            .post(format!("{url}/v1/folders/{folder}/feed"))
            .bearer_auth(&token)
            .body(unsigned_feed)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (merged, unsigned)
    });
    assert_eq!(merged["merged"], 3, "{merged}");
    assert_eq!(merged["changed"], 1, "p3 was new to the cloud: {merged}");
    assert_eq!(unsigned["merged"], 0);
    assert_eq!(unsigned["refused"].as_array().unwrap().len(), 1, "{unsigned}");
    assert_eq!(get(&format!("/v1/folders/{folder}/items"), &token).1["items"].as_array().unwrap().len(), 3);

    // Long-poll: held while nothing happens, answered when the folder changes.
    let latest = get("/v1/notifications?timeout=0", &token).1["latest"].as_u64().unwrap();
    a1.start();
    let t0 = Instant::now();
    let poll = {
        let (c, url, token) = (c.clone(), url.clone(), token.clone());
        relay.rt.spawn(async move {
            c.get(format!("{url}/v1/notifications?since={latest}&timeout=30"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    let cloud = relay.running.as_ref().unwrap().cloud.clone();
    wait_for(
        Duration::from_secs(30),
        || cloud.metrics.render(0).contains("feedmesh_long_polls 1"),
        "the relay to hold the poll",
    );
    assert!(!poll.is_finished(), "the poll is held while nothing changes");
    a1.ok(&["put", "photos", "p4", "fourth"]);
    let events = relay.rt.block_on(poll).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(25), "answered by the change, not the timeout");
    let evs = events["events"].as_array().unwrap();
    assert!(evs.iter().any(|e| e["kind"] == "folder" && e["folder"] == folder), "{events}");
    // An empty poll with a short timeout returns empty.
    let quiet = get(&format!("/v1/notifications?since={}&timeout=1", events["latest"]), &bob).1;
    assert!(
        quiet["events"].as_array().unwrap().iter().all(|e| e["kind"] != "folder"),
        "bob sees no folder of alice: {quiet}"
    );

    // Health and metrics.
    let (s, health) = get("/health", "");
    assert_eq!(s, 200);
    assert_eq!(health["status"], "ok");
    let metrics =
        rt.block_on(async { c.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap() });
    for name in [
        "feedmesh_connections",
        "feedmesh_sessions_total",
        "feedmesh_tickets_issued_total",
        "feedmesh_items_stored_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    drop(b1);
}

/// Issue 13, item 2: a relay restarted between two long-polls loses no notification. The
/// second poll carries the first answer's `latest` and `epoch`; the restarted relay counts
/// events from 0 again, so it answers at once with `resync: true` and the events it has,
/// instead of holding the poll until its counter passes the old one.
#[test]
fn a_relay_restarted_between_two_long_polls_loses_no_notification() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let a1 = Dev::new(root.path(), "a1");
    a1.ok(&["init", "--relay", &relay.url, "--name", "alice", "--account", "alice"]);
    let folder = a1.ok(&["folder", "create", "photos"]).split_whitespace().last().unwrap().to_string();
    for i in 0..5 {
        a1.ok(&["put", "photos", &format!("p{i}"), "text"]);
        a1.ok(&["sync"]);
    }
    let url = relay.url.clone();
    let c = reqwest::Client::new();
    let token = relay.rt.block_on(async {
        let v: Value = c
            .post(format!("{url}/v1/login"))
            .json(&json!({"account": "alice", "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["token"].as_str().unwrap().to_string()
    });
    let poll = |relay: &Relay, query: &str| -> Value {
        relay.rt.block_on(async {
            c.get(format!("{url}/v1/notifications?{query}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    };
    let first = poll(&relay, "timeout=0");
    let (latest, epoch) = (first["latest"].as_u64().unwrap(), first["epoch"].as_u64().unwrap());
    assert!(latest >= 5, "five folder changes at least: {first}");
    assert_eq!(first["resync"], false);

    relay.restart();
    // One change after the restart: the new epoch's first events.
    a1.ok(&["put", "photos", "after", "the restart"]);
    a1.ok(&["sync"]);

    let t0 = Instant::now();
    let second = poll(&relay, &format!("since={latest}&epoch={epoch}&timeout=30"));
    assert!(t0.elapsed() < Duration::from_secs(10), "answered at once, not held: {second}");
    assert_eq!(second["resync"], true, "{second}");
    assert_ne!(second["epoch"].as_u64().unwrap(), epoch, "a new epoch: {second}");
    let evs = second["events"].as_array().unwrap();
    assert!(
        evs.iter().any(|e| e["kind"] == "folder" && e["folder"] == folder),
        "the change is there: {second}"
    );
    // In the new epoch, a poll with the new cursor is held as usual (no resync).
    let third = poll(&relay, &format!("since={}&epoch={}&timeout=1", second["latest"], second["epoch"]));
    assert_eq!(third["resync"], false, "{third}");
    assert!(third["events"].as_array().unwrap().is_empty(), "{third}");
}

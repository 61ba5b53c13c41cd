//! End to end over loopback: a relay (in this process) and real `feedmesh` processes.
//!
//! Alice has two devices (a1, a2, paired with a short code), Bob one (b1); Alice shares a folder
//! with Bob. Every device writes; b1 goes offline, writes, and comes back; a2 is killed and
//! restarted; all replicas converge (equal exports, equal to the cloud's copy). A device of a
//! user who is not a member is refused by the cloud.

mod common;

use std::time::Duration;

use common::*;

const WITHIN: Duration = Duration::from_secs(60);

fn converged(devs: &[&Dev], folder: &str, want: &[&str]) -> bool {
    devs.iter().all(|d| {
        let have = ids(d, folder);
        want.iter().all(|w| have.iter().any(|h| h == w))
    }) && {
        let first = export(devs[0], folder);
        devs[1..].iter().all(|d| export(d, folder) == first)
    }
}

#[test]
fn three_nodes_two_users_converge_through_offline_and_restart() {
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let (mut a1, mut a2, mut b1) =
        (Dev::new(root.path(), "a1"), Dev::new(root.path(), "a2"), Dev::new(root.path(), "b1"));

    // Alice's first device creates her user and cloud account.
    a1.ok(&["init", "--relay", &relay.url, "--name", "alice", "--account", "alice"]);
    a1.start();
    // Her second device pairs: it shows a code, which she confirms on a1.
    a2.ok(&["init", "--relay", &relay.url]);
    let (code, mut pairing) = a2.pair("alice");
    assert_eq!(code.len(), 6);
    // A wrong code is refused.
    let wrong = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
    assert!(!a1.cmd(&["device", "approve", &wrong]).status.success());
    a1.ok(&["device", "approve", &code]);
    assert!(pairing.wait().unwrap().success(), "pair finishes once approved");
    assert!(a2.ok(&["whoami"]).contains("alice"));
    assert_eq!(a1.ok(&["device", "ls"]).lines().count(), 2);

    b1.ok(&["init", "--relay", &relay.url, "--name", "bob"]);
    b1.start();

    // Alice creates a folder and shares it with Bob (once Bob's user reached her directory).
    a1.ok(&["folder", "create", "photos"]);
    a1.ok_eventually(&["folder", "share", "photos", "bob"], WITHIN);
    b1.ok_eventually(&["folder", "accept", "photos"], WITHIN);
    a2.start();
    a2.ok_eventually(&["folder", "map", "photos"], WITHIN);

    // Writes on every side.
    a1.ok(&["put", "photos", "a1-first", "from a1", "--title", "A1"]);
    b1.ok_eventually(&["put", "photos", "b1-first", "from b1"], WITHIN);
    a2.ok_eventually(&["put", "photos", "a2-first", "from a2"], WITHIN);
    let all = ["a1-first", "b1-first", "a2-first"];
    wait_for(WITHIN, || converged(&[&a1, &a2, &b1], "photos", &all), "first convergence");

    // b1 goes offline, writes there; others write meanwhile; b1 comes back.
    b1.kill();
    b1.ok(&["put", "photos", "b1-offline", "written offline"]);
    let status = b1.ok(&["status"]);
    assert!(status.contains("1 changes not yet acknowledged"), "{status}");
    a1.ok(&["put", "photos", "a1-while-b-away", "hello"]);
    b1.start();
    let all = ["a1-first", "b1-first", "a2-first", "b1-offline", "a1-while-b-away"];
    wait_for(WITHIN, || converged(&[&a1, &a2, &b1], "photos", &all), "convergence after b1 came back");

    // a2 is killed and restarted; a concurrent edit of one item on two devices becomes a
    // conflict that every side sees the same way.
    a2.kill();
    a2.ok(&["put", "photos", "a1-first", "edited on a2 while down"]);
    b1.ok(&["put", "photos", "a1-first", "edited on b1"]);
    a2.start();
    wait_for(
        WITHIN,
        || {
            converged(&[&a1, &a2, &b1], "photos", &all)
                && a1.ok(&["get", "photos", "a1-first"]).contains("conflicts: 1")
        },
        "convergence after the restart, with the conflict",
    );
    let conflicts = b1.ok(&["conflicts", "photos"]);
    assert!(
        conflicts.contains("edited on a2 while down") && conflicts.contains("edited on b1"),
        "{conflicts}"
    );
    b1.ok(&["resolve", "photos", "a1-first", "resolved by bob"]);
    wait_for(
        WITHIN,
        || {
            converged(&[&a1, &a2, &b1], "photos", &all)
                && a2.ok(&["get", "photos", "a1-first"]).contains("conflicts: 0")
        },
        "the resolution everywhere",
    );

    // The cloud's replica is the same.
    let cloud_items = {
        let st = relay.cloud().lock();
        let f = st.dir().state().folders.iter().find(|(_, f)| f.name == "photos").map(|(id, _)| *id).unwrap();
        st.replicas.get(&f).map(|r| r.len()).unwrap_or(0)
    };
    assert_eq!(cloud_items, all.len());

    // Status names how each peer is reached.
    let status = a1.ok(&["status"]);
    assert!(status.contains("cloud: online"), "{status}");
    assert!(status.contains("lan") || status.contains("direct") || status.contains("relayed"), "{status}");
    // ...and names each peer by its user and which of the user's devices it is (issue 13).
    assert!(status.contains("alice's device 2") || status.contains("bob's device 1"), "{status}");
    assert!(!status.contains("unknown device"), "{status}");

    // Export and import round-trip into another folder.
    let file = root.path().join("photos.atom");
    a1.ok(&["export", "photos", "--format", "atom", "--output", file.to_str().unwrap()]);
    a1.ok(&["folder", "create", "copy"]);
    let out = a1.ok(&["import", "copy", file.to_str().unwrap()]);
    assert!(out.contains(&format!("imported {} items", all.len())), "{out}");
    assert_eq!(ids(&a1, "copy").len(), all.len());
    // And through RSS.
    let rss = root.path().join("photos.rss");
    a1.ok(&["export", "photos", "--format", "rss", "--output", rss.to_str().unwrap()]);
    a1.ok(&["folder", "create", "copy-rss"]);
    a1.ok(&["import", "copy-rss", rss.to_str().unwrap()]);
    assert_eq!(ids(&a1, "copy-rss"), ids(&a1, "photos"));
    // Nothing is left unacknowledged once the daemons have synced.
    wait_for_showing(
        WITHIN,
        || !a1.ok(&["status"]).lines().any(|l| l.contains("changes not yet") && !l.contains(", 0 changes")),
        "a1's outbox to empty",
        || a1.ok(&["status"]),
    );
}

/// Carol is a user of the same cloud but not a member: the cloud refuses her sessions for the
/// folder, and she gets nothing of it.
#[test]
fn a_device_without_rights_is_refused() {
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let mut a1 = Dev::new(root.path(), "a1");
    a1.ok(&["init", "--relay", &relay.url, "--name", "alice"]);
    a1.ok(&["folder", "create", "secret"]);
    a1.ok(&["put", "secret", "s1", "top secret"]);
    a1.ok(&["sync"]);
    let folder = {
        let st = relay.cloud().lock();
        let f = st.dir().state().folders.iter().find(|(_, f)| f.name == "secret").map(|(id, _)| *id).unwrap();
        assert_eq!(st.replicas.get(&f).map(|r| r.len()), Some(1), "the cloud has the item");
        f
    };
    a1.start();

    let c1 = Dev::new(root.path(), "c1");
    c1.ok(&["init", "--relay", &relay.url, "--name", "carol"]);
    // Carol cannot map it: her own directory says she is not a member.
    let out = c1.cmd(&["folder", "map", &engine::signing::hex(&folder.0)]);
    assert!(!out.status.success());
    // Forcing a session anyway (through the library): the cloud refuses it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = std::sync::Arc::new(std::sync::Mutex::new(node::state::Node::open(&c1.dir).unwrap()));
    let outcome = rt.block_on(async {
        let net = node::net::Net::bind(node.clone(), None).await.unwrap();
        net.sync_directory().await.unwrap();
        net.refresh_ticket().await.unwrap();
        net.force_sync(None, folder).await.unwrap()
    });
    match &outcome {
        engine::sync::Outcome::Failed(engine::sync::SyncError::Refused(r)) => {
            let text = r.to_string();
            assert!(text.contains("does not grant") || text.contains("member"), "{text}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(node::net::lock(&node).replica(&folder).is_none_or(|r| r.is_empty()));
    // The cloud counts the session as refused once its side of the session has ended, which may
    // be just after Carol's side saw the refusal.
    wait_for(
        WITHIN,
        || relay.cloud().metrics.render(0).contains("feedmesh_sessions_total{kind=\"refused\"}"),
        "the cloud to count the refused session",
    );
}

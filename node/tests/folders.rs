//! Mapped directories over loopback (issue 14, item 1, as far as the node has it): a relay and two
//! real `feedmesh` daemons of two users sharing a folder, each folder mapped to a directory.
//! Local files are published, a bad name is skipped with its reason, a file the other side holds
//! already is adopted, a rename moves no content (the other side copies its own file and trashes
//! the old name), a delete removes the file there (into the trash, still retrievable), a file
//! only the other device has is fetched from it (verified, written whole), and concurrent edits
//! leave the same conflict copy on both sides.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;

const WITHIN: Duration = Duration::from_secs(60);

/// Writes a file whose mtime is an hour ago (a file still being written is not published).
fn put(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    age(&path);
}

fn age(path: &Path) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
}

/// Alice and Bob, two users with a running daemon each (Alice's with `alice_env`), share the
/// folder `docs` (Alice owns it, Bob accepted it).
fn alice_shares_docs_with_bob(relay: &Relay, root: &Path, alice_env: &[(&str, &str)]) -> (Dev, Dev) {
    alice_shares_with_bob(relay, root, alice_env, &[], &[])
}

/// [`alice_shares_docs_with_bob`], `docs` created with `create_args` (`--p2p`), both daemons
/// run with `daemon_args`.
fn alice_shares_with_bob(
    relay: &Relay,
    root: &Path,
    alice_env: &[(&str, &str)],
    create_args: &[&str],
    daemon_args: &[&str],
) -> (Dev, Dev) {
    let (mut a, mut b) = (Dev::new(root, "a1"), Dev::new(root, "b1"));
    a.ok(&["init", "--relay", &relay.url, "--name", "alice", "--account", "alice"]);
    a.start_with(daemon_args, alice_env);
    b.ok(&["init", "--relay", &relay.url, "--name", "bob"]);
    b.start_with(daemon_args, &[]);
    a.ok(&[&["folder", "create", "docs"][..], create_args].concat());
    a.ok_eventually(&["folder", "share", "docs", "bob"], WITHIN);
    b.ok_eventually(&["folder", "accept", "docs"], WITHIN);
    (a, b)
}

fn scan(dev: &Dev) -> String {
    dev.ok(&["folder", "scan", "docs"])
}

#[test]
fn two_users_mapped_directories_converge_on_disk() {
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let (mut a, mut b) = alice_shares_docs_with_bob(&relay, root.path(), &[]);

    let (da, db) = (root.path().join("alice-docs"), root.path().join("bob-docs"));
    put(&da, "shared.txt", "the same on both sides");
    put(&db, "shared.txt", "the same on both sides");
    put(&da, "only-a.txt", "alice's alone");
    put(&da, "bad\\name", "a backslash: a separator on Windows");
    let mapped = a.ok(&["folder", "map", "docs", da.to_str().unwrap()]);
    assert!(mapped.contains("mapped to"), "{mapped}");
    let out = scan(&a);
    assert!(out.contains("refused: bad\\name: backslash"), "{out}");
    assert!(a.ok(&["status"]).contains("docs is mapped to"));
    wait_for(WITHIN, || export(&b, "docs").contains("only-a.txt"), "alice's entries at bob");

    // Bob maps his directory: his copy of shared.txt is what the folder says already; only-a.txt
    // comes from Alice's device, verified group by group, and is written whole.
    b.ok(&["folder", "map", "docs", db.to_str().unwrap()]);
    wait_for(
        WITHIN,
        || {
            scan(&b);
            db.join("only-a.txt").exists()
        },
        "only-a.txt fetched from alice",
    );
    assert_eq!(std::fs::read_to_string(db.join("only-a.txt")).unwrap(), "alice's alone");
    assert_eq!(std::fs::read_to_string(db.join("shared.txt")).unwrap(), "the same on both sides");

    // Concurrent edits of one file: the winner at its name and the loser beside it, on both
    // sides, both contents kept.
    put(&da, "notes.txt", "first");
    scan(&a);
    wait_for(
        WITHIN,
        || {
            scan(&b);
            db.join("notes.txt").exists()
        },
        "notes.txt at bob",
    );
    // Edits of one file on both sides at once: when they are concurrent, the winner at its name
    // and the loser beside it, the same on both sides, both contents kept; when one side saw the
    // other's edit first, its own wins alone. Either way both directories end the same.
    put(&da, "notes.txt", "alice's edit");
    put(&db, "notes.txt", "bob's edit");
    scan(&a);
    scan(&b);
    let both = |d: &Path| {
        let mut texts: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.starts_with("notes").then(|| std::fs::read_to_string(d.join(&name)).unwrap())
            })
            .collect();
        texts.sort();
        texts
    };
    let edits = ["alice's edit".to_string(), "bob's edit".to_string()];
    let mut last = (Vec::new(), Vec::new());
    wait_for(
        WITHIN,
        || {
            scan(&a);
            scan(&b);
            last = (both(&da), both(&db));
            !last.0.is_empty() && last.0 == last.1 && last.0.iter().all(|t| edits.contains(t))
        },
        "the same notes on both sides",
    );
    let copy = |d: &Path| {
        std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|n| n.contains("(conflict, "))
    };
    assert_eq!(copy(&da), copy(&db), "the same conflict copy name on both sides");
    assert_eq!(copy(&da).is_some(), last.0.len() == 2, "a copy exactly when both edits are kept: {last:?}");

    // Alice renames shared.txt into a subdirectory: Bob copies his own file, trashes the old name.
    std::fs::create_dir_all(da.join("sub")).unwrap();
    std::fs::rename(da.join("shared.txt"), da.join("sub/moved.txt")).unwrap();
    scan(&a);
    wait_for(
        WITHIN,
        || {
            scan(&b);
            db.join("sub/moved.txt").exists() && !db.join("shared.txt").exists()
        },
        "the rename at bob",
    );
    assert_eq!(std::fs::read_to_string(db.join("sub/moved.txt")).unwrap(), "the same on both sides");
    let trash = db.join(".feedmesh/trash");
    let kept = trash.join(blake3::hash(b"the same on both sides").to_hex().as_str());
    assert!(kept.exists(), "the old name's content is in the trash, by root");

    // Alice deletes it: gone at Bob's too, its content still in his trash.
    std::fs::remove_file(da.join("sub/moved.txt")).unwrap();
    scan(&a);
    wait_for(
        WITHIN,
        || {
            scan(&b);
            !db.join("sub/moved.txt").exists()
        },
        "the delete at bob",
    );
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "the same on both sides");

    // Unmapping leaves the files in place.
    let out = b.ok(&["folder", "unmap", "docs"]);
    assert!(out.contains("stay where they are"), "{out}");
    assert!(db.join(".feedmesh").exists());
    a.kill();
    b.kill();
}

#[test]
fn a_file_still_being_written_is_not_published() {
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let a = Dev::new(root.path(), "a1");
    a.ok(&["init", "--relay", &relay.url, "--name", "alice", "--account", "alice"]);
    a.ok(&["folder", "create", "docs"]);
    let da = root.path().join("alice-docs");
    a.ok(&["folder", "map", "docs", da.to_str().unwrap()]);
    std::fs::write(da.join("fresh.txt"), "just written").unwrap();
    let out = scan(&a);
    assert!(out.contains("published 0") && out.contains("1 still being written"), "{out}");
    age(&da.join("fresh.txt"));
    let out = scan(&a);
    assert!(out.contains("published 1"), "{out}");
    assert!(export(&a, "docs").contains("fresh.txt"));
}

/// The groups a partial file of content `size` bytes long logged as written (past the content,
/// a little-endian u64 per group).
fn logged(dir: &Path, root: &str, size: u64) -> Vec<u64> {
    let partial = std::fs::read(dir.join(".feedmesh/partial").join(root)).unwrap_or_default();
    let bytes = partial.get(size as usize..).unwrap_or_default();
    let mut groups: Vec<u64> =
        bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// How many groups a partial file of content `size` bytes long holds.
fn held(dir: &Path, root: &str, size: u64) -> u64 {
    logged(dir, root, size).len() as u64
}

fn fetched_since_start(dev: &Dev) -> u64 {
    let status = dev.ok(&["status"]);
    let line = status.lines().find(|l| l.starts_with("content: ")).unwrap_or_else(|| panic!("{status}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_transfer_killed_midway_resumes_where_it_stopped() {
    const GROUPS: u64 = 400;
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    // Alice serves slowly (2 ms a group), so Bob can be killed in the middle; a `p2p` folder, so
    // Alice's device is the only source (the cloud's copy would be a faster one).
    let slow = [("FEEDMESH_TEST_SERVE_DELAY_US", "2000")];
    let (mut a, mut b) = alice_shares_with_bob(&relay, root.path(), &slow, &["--p2p"], &[]);
    let (da, db) = (root.path().join("alice-docs"), root.path().join("bob-docs"));
    let big: Vec<u8> = (0..GROUPS * 16 * 1024).map(|i| (i % 251) as u8 ^ (i >> 14) as u8).collect();
    std::fs::create_dir_all(&da).unwrap();
    std::fs::write(da.join("big.bin"), &big).unwrap();
    age(&da.join("big.bin"));
    let hex = blake3::hash(&big).to_hex().to_string();
    a.ok(&["folder", "map", "docs", da.to_str().unwrap()]);
    scan(&a);
    wait_for(WITHIN, || export(&b, "docs").contains("big.bin"), "the entry at bob");
    b.ok(&["folder", "map", "docs", db.to_str().unwrap()]);
    // Bob's daemon fetches in its rounds; kill it once a part is held.
    wait_for(WITHIN, || held(&db, &hex, big.len() as u64) >= GROUPS / 4, "a quarter of the file at bob");
    b.kill();
    let at_kill = held(&db, &hex, big.len() as u64);
    assert!(at_kill < GROUPS, "killed before the end ({at_kill} of {GROUPS} groups)");
    // What the partial file holds is the file's own bytes (no corrupt data on disk).
    let partial = std::fs::read(db.join(".feedmesh/partial").join(&hex)).unwrap();
    for group in logged(&db, &hex, big.len() as u64) {
        let (s, e) = ((group * 16384) as usize, ((group + 1) * 16384) as usize);
        assert!(partial[s..e] == big[s..e], "held group {group} is the file's own");
    }
    assert!(!db.join("big.bin").exists(), "a partial file never appears under its final name");

    b.start();
    // `status --watch` follows the transfer (plain lines without a terminal) and ends when
    // nothing is needed.
    let watched = b.ok(&["status", "--watch"]);
    assert!(watched.ends_with("nothing is needed: every mapped folder's files are here\n"), "{watched}");
    wait_for(
        WITHIN,
        || std::fs::read(db.join("big.bin")).is_ok_and(|got| got == big),
        "big.bin whole at bob after the restart",
    );
    let after = fetched_since_start(&b);
    assert!(
        after <= GROUPS - at_kill,
        "after the restart {after} groups were fetched; {at_kill} of {GROUPS} were held: nothing held was fetched again"
    );
    assert!(after >= GROUPS - at_kill, "every missing group was fetched");
    a.kill();
    b.kill();
}

/// Every file under `dir`, read whole: what a store holds at rest.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Issue 14, items 3 and 4: a `cloud` folder's files are uploaded sealed with the folder's key
/// (which reached Bob's device through the signed directory); with Alice's device off, Bob's
/// device fetches them from the cloud; the canary in the file is nowhere in the relay's store at
/// rest nor in any frame the cloud received or sent.
#[test]
fn a_cloud_folder_is_fetched_from_a_cloud_that_cannot_read_it() {
    const CANARY: &str = "CANARY-3c1f-cloud-never-reads-this";
    transport::frame::tap::start();
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let (mut a, b) = alice_shares_docs_with_bob(&relay, root.path(), &[]);
    let (da, db) = (root.path().join("alice-docs"), root.path().join("bob-docs"));
    let text = format!("{CANARY} ").repeat(2500); // 90 KB: 6 chunk groups
    put(&da, "secret.txt", &text);
    a.ok(&["folder", "map", "docs", da.to_str().unwrap()]);
    wait_for_showing(
        WITHIN,
        || {
            scan(&a);
            a.ok(&["status"]).contains("1 of 1 files stored")
        },
        "alice's file stored at the cloud",
        || a.ok(&["status"]),
    );
    wait_for(WITHIN, || b.ok(&["folder", "ls"]).contains("cloud, content key 0"), "the key at bob");
    assert!(a.ok(&["folder", "ls"]).contains("cloud, content key 0"));
    a.kill();

    b.ok(&["folder", "map", "docs", db.to_str().unwrap()]);
    wait_for_showing(
        WITHIN,
        || {
            scan(&b);
            db.join("secret.txt").exists()
        },
        "secret.txt from the cloud while alice is off",
        || b.ok(&["status"]),
    );
    assert_eq!(std::fs::read_to_string(db.join("secret.txt")).unwrap(), text);
    // Item 5: local applications read the files through the API.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (base, token) = b.api();
    let get = |path: &str| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let r =
                reqwest::Client::new().get(format!("{base}{path}")).bearer_auth(&token).send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers().get("etag").map(|v| v.to_str().unwrap().to_string()),
                r.bytes().await.unwrap(),
            )
        })
    };
    let (status, etag, body) = get("/v1/folders/docs/files/secret.txt");
    assert_eq!((status, body.as_ref()), (200, text.as_bytes()));
    let listed = String::from_utf8(get("/v1/folders/docs/files").2.to_vec()).unwrap();
    assert!(listed.contains("\"here\":true") && listed.contains(etag.unwrap().trim_matches('"')), "{listed}");
    assert_eq!(get("/v1/folders/docs/files/missing.txt").0, 404);
    assert_eq!(get("/v1/folders/docs/files/a%2F..%2Fsecret.txt").0, 400, "a path with .. is refused");
    // The relay's HTTP API shows the usage against the quota.
    let users = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let r = reqwest::Client::new()
            .get(format!("{}/v1/users", relay.url))
            .bearer_auth(relay.admin_token())
            .send()
            .await
            .unwrap();
        r.json::<serde_json::Value>().await.unwrap()
    });
    let alice = users["users"].as_array().unwrap().iter().find(|u| u["name"] == "alice").unwrap();
    assert!(alice["content_bytes"].as_u64().unwrap() > text.len() as u64, "{users}");
    assert_eq!(alice["content_quota"].as_u64(), Some(5_000_000_000), "{users}");
    let metrics = &relay.cloud().metrics;
    assert!(metrics.content_groups_stored.get() >= 6, "stored {}", metrics.content_groups_stored.get());
    assert!(metrics.content_groups_served.get() >= 6, "served {}", metrics.content_groups_served.get());
    assert!(transport::frame::tap::len() > text.len(), "the sealed content went through the cloud");
    assert!(!transport::frame::tap::contains(CANARY.as_bytes()), "plaintext in the cloud's traffic");
    let store = files_under(relay._dir.path());
    assert!(store.iter().map(|(_, b)| b.len()).sum::<usize>() > text.len());
    for (path, bytes) in &store {
        assert!(!holds(bytes, CANARY.as_bytes()), "plaintext in {}", path.display());
    }
}

/// Issue 14, item 3: a `p2p` folder's content never reaches the relay; a user past the quota
/// still syncs peer to peer, and `status` says why the cloud keeps nothing.
#[test]
fn p2p_and_over_quota_content_goes_peer_to_peer_only() {
    const P2P: &str = "CANARY-77aa-p2p-folder-content";
    const OVER: &str = "CANARY-91be-over-quota-content";
    transport::frame::tap::start();
    let relay = Relay::start_with(|cfg| cfg.limits.content_quota_bytes_per_user = 50_000);
    let root = tempfile::tempdir().unwrap();
    let (a, b) = alice_shares_with_bob(&relay, root.path(), &[], &["--p2p"], &[]);
    a.ok(&["folder", "create", "big"]);
    a.ok_eventually(&["folder", "share", "big", "bob"], WITHIN);
    b.ok_eventually(&["folder", "accept", "big"], WITHIN);
    let (da, db) = (root.path().join("alice-docs"), root.path().join("bob-docs"));
    let (ba, bb) = (root.path().join("alice-big"), root.path().join("bob-big"));
    let p2p_text = format!("{P2P} ").repeat(1000);
    let over_text = format!("{OVER} ").repeat(4000); // 124 KB, past the 50 KB quota
    put(&da, "p2p.txt", &p2p_text);
    put(&ba, "big.txt", &over_text);
    a.ok(&["folder", "map", "docs", da.to_str().unwrap()]);
    a.ok(&["folder", "map", "big", ba.to_str().unwrap()]);
    b.ok(&["folder", "map", "docs", db.to_str().unwrap()]);
    b.ok(&["folder", "map", "big", bb.to_str().unwrap()]);
    wait_for_showing(
        WITHIN,
        || {
            a.ok(&["folder", "scan", "big"]);
            a.ok(&["status"]).contains("OVER QUOTA")
        },
        "alice's status says the quota is reached",
        || a.ok(&["status"]),
    );
    let status = a.ok(&["status"]);
    assert!(status.contains("new content goes peer to peer only"), "{status}");
    assert!(status.contains("content: between devices only (p2p folder"), "{status}");
    wait_for_showing(
        WITHIN,
        || {
            scan(&a);
            scan(&b);
            b.ok(&["folder", "scan", "big"]);
            db.join("p2p.txt").exists() && bb.join("big.txt").exists()
        },
        "both files at bob, from alice's device",
        || b.ok(&["status"]),
    );
    assert_eq!(std::fs::read_to_string(db.join("p2p.txt")).unwrap(), p2p_text);
    assert_eq!(std::fs::read_to_string(bb.join("big.txt")).unwrap(), over_text);
    assert_eq!(relay.cloud().metrics.content_groups_stored.get(), 0, "nothing stored at the cloud");
    for canary in [P2P, OVER] {
        assert!(!transport::frame::tap::contains(canary.as_bytes()), "{canary} in the cloud's traffic");
        for (path, bytes) in files_under(relay._dir.path()) {
            assert!(!holds(&bytes, canary.as_bytes()), "{canary} in {}", path.display());
        }
    }
}

/// Issue 14, item 1: changes are found by the watcher, not only by the periodic rescan: with
/// rounds an hour apart, a new file, a file written just now (published once stable) and a
/// delete on Alice's side reach Bob's directory without anyone asking for a scan.
#[test]
fn the_watcher_finds_local_changes_between_rounds() {
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = alice_shares_with_bob(&relay, root.path(), &[], &[], &["--interval", "3600"]);
    let (da, db) = (root.path().join("alice-docs"), root.path().join("bob-docs"));
    std::fs::create_dir_all(&da).unwrap();
    a.ok(&["folder", "map", "docs", da.to_str().unwrap()]);
    b.ok(&["folder", "map", "docs", db.to_str().unwrap()]);
    put(&da, "old.txt", "written an hour ago");
    wait_for(WITHIN, || db.join("old.txt").exists(), "old.txt at bob without a scan");
    std::fs::write(da.join("fresh.txt"), "written just now").unwrap();
    wait_for(WITHIN, || db.join("fresh.txt").exists(), "fresh.txt at bob once stable, without a scan");
    assert_eq!(std::fs::read_to_string(db.join("fresh.txt")).unwrap(), "written just now");
    std::fs::remove_file(da.join("old.txt")).unwrap();
    wait_for(WITHIN, || !db.join("old.txt").exists(), "the delete at bob without a scan");
    // A directory made after the watcher started (subdirectories are watched one by one, to
    // leave `.feedmesh` out), then an edit inside it.
    std::fs::create_dir_all(da.join("notes/deep")).unwrap();
    std::fs::write(da.join("notes/deep/new.txt"), "in a new directory").unwrap();
    let new = db.join("notes/deep/new.txt");
    wait_for(WITHIN, || new.exists(), "a file in a new directory at bob without a scan");
    std::fs::write(da.join("notes/deep/new.txt"), "edited in the new directory").unwrap();
    wait_for(
        WITHIN,
        || std::fs::read_to_string(&new).is_ok_and(|t| t == "edited in the new directory"),
        "the edit inside the new directory at bob without a scan",
    );
}

/// A mapped directory's files (not `.feedmesh`), path -> bytes.
fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    files_under(dir)
        .into_iter()
        .filter_map(|(p, bytes)| {
            let rel = p.strip_prefix(dir).ok()?.to_string_lossy().into_owned();
            (!rel.starts_with(".feedmesh")).then_some((rel, bytes))
        })
        .collect()
}

type Tree = std::collections::BTreeMap<String, Vec<u8>>;

/// Waits until the devices' directories are the same and `check` holds of them (scanning each
/// every turn); returns that tree.
fn converged(devs: &[&Dev], dirs: &[std::path::PathBuf], what: &str, check: &dyn Fn(&Tree) -> bool) -> Tree {
    let last = std::cell::RefCell::new(Vec::<Tree>::new());
    wait_for_showing(
        WITHIN,
        || {
            for d in devs {
                scan(d);
            }
            let trees: Vec<Tree> = dirs.iter().map(|d| tree(d)).collect();
            let done = trees.windows(2).all(|w| w[0] == w[1]) && check(&trees[0]);
            *last.borrow_mut() = trees;
            done
        },
        what,
        || {
            format!(
                "{:?}",
                last.borrow().iter().map(|t| t.keys().cloned().collect::<Vec<_>>()).collect::<Vec<_>>()
            )
        },
    );
    last.into_inner().swap_remove(0)
}

/// Issue 14's end-to-end line: a relay and three nodes of two users (Alice's two devices and
/// Bob's) sharing a mapped folder. Files created, edited, renamed and deleted on different
/// sides converge byte for byte in all three directories; concurrent edits (Bob's made while
/// his device was off) leave the same conflict copy everywhere, and deleting the copy on one
/// device resolves it everywhere, the winner staying.
#[test]
fn three_devices_of_two_users_converge_and_a_conflict_resolves() {
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let (mut a1, mut b1) = alice_shares_docs_with_bob(&relay, root.path(), &[]);
    let mut a2 = Dev::new(root.path(), "a2");
    a2.ok(&["init", "--relay", &relay.url]);
    let (code, mut pairing) = a2.pair("alice");
    a1.ok(&["device", "approve", &code]);
    assert!(pairing.wait().unwrap().success(), "a2 paired");
    a2.start();
    let dirs: Vec<std::path::PathBuf> =
        ["a1", "a2", "b1"].iter().map(|d| root.path().join(format!("{d}-docs"))).collect();
    for (dev, dir) in [&a1, &a2, &b1].into_iter().zip(&dirs) {
        std::fs::create_dir_all(dir).unwrap();
        dev.ok_eventually(&["folder", "map", "docs", dir.to_str().unwrap()], WITHIN);
    }
    put(&dirs[0], "from-a1.txt", "one");
    put(&dirs[1], "from-a2.txt", "two");
    put(&dirs[2], "sub/from-b1.txt", "three");
    converged(&[&a1, &a2, &b1], &dirs, "three new files everywhere", &|t| t.len() == 3);
    // An edit on a2, a rename on b1, a delete on a1.
    put(&dirs[1], "from-a1.txt", "one, edited on a2");
    std::fs::rename(dirs[2].join("sub/from-b1.txt"), dirs[2].join("renamed.txt")).unwrap();
    std::fs::remove_file(dirs[0].join("from-a2.txt")).unwrap();
    let t = converged(&[&a1, &a2, &b1], &dirs, "edit, rename and delete everywhere", &|t| {
        t.len() == 2
            && t.contains_key("renamed.txt")
            && t.get("from-a1.txt").is_some_and(|b| b == b"one, edited on a2")
    });
    assert_eq!(t["renamed.txt"], b"three");

    // Concurrent edits: Bob edits while his device is off, Alice edits on a1.
    b1.kill();
    put(&dirs[2], "renamed.txt", "bob's offline edit");
    scan(&b1);
    put(&dirs[0], "renamed.txt", "alice's edit");
    scan(&a1);
    b1.start();
    let t = converged(&[&a1, &a2, &b1], &dirs, "one conflict copy everywhere", &|t| t.len() == 3);
    let copy = t.keys().find(|k| k.contains("(conflict, ")).cloned().expect("a conflict copy");
    let mut texts = vec![t["renamed.txt"].clone(), t[&copy].clone()];
    texts.sort();
    assert_eq!(texts, vec![b"alice's edit".to_vec(), b"bob's offline edit".to_vec()], "both edits kept");
    let winner = t["renamed.txt"].clone();
    // Resolving: a2 deletes the copy; it goes everywhere, the winner stays.
    std::fs::remove_file(dirs[1].join(&copy)).unwrap();
    let t = converged(&[&a1, &a2, &b1], &dirs, "the copy resolved everywhere", &|t| t.len() == 2);
    assert_eq!(t["renamed.txt"], winner);
    for dev in [&mut a1, &mut a2, &mut b1] {
        dev.kill();
    }
}

/// Waits until `dev`'s status says the cloud stores all `n` files of `docs`.
fn stored_at_cloud(dev: &Dev, n: usize) {
    let want = format!("{n} of {n} files stored");
    wait_for_showing(
        WITHIN,
        || {
            scan(dev);
            dev.ok(&["status"]).contains(&want)
        },
        &want,
        || dev.ok(&["status"]),
    );
}

/// Issue 14's hostile peers, end to end: Alice's device answers for a file of a `cloud` folder
/// with wrong bytes (every group altered), then, restarted, endlessly slowly. Bob's device
/// prefers her direct route, finds each out, routes around her to the cloud's sealed copy, and
/// never has a wrong byte on disk: the file is whole and right, no partial holds another byte.
#[test]
fn a_lying_or_endlessly_slow_peer_is_routed_around() {
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let lying = [("FEEDMESH_TEST_SERVE_CORRUPT", "1")];
    let (mut a, b) = alice_shares_with_bob(&relay, root.path(), &lying, &[], &[]);
    let (da, db) = (root.path().join("alice-docs"), root.path().join("bob-docs"));
    let one: Vec<u8> = (0..40 * 16 * 1024).map(|i| (i % 241) as u8).collect();
    let two: Vec<u8> = (0..40 * 16 * 1024).map(|i| (i % 239) as u8 ^ 0x5a).collect();
    std::fs::create_dir_all(&da).unwrap();
    std::fs::write(da.join("one.bin"), &one).unwrap();
    age(&da.join("one.bin"));
    a.ok(&["folder", "map", "docs", da.to_str().unwrap()]);
    stored_at_cloud(&a, 1);
    wait_for(WITHIN, || b.ok(&["folder", "ls"]).contains("content key 0"), "the key at bob");
    b.ok(&["folder", "map", "docs", db.to_str().unwrap()]);
    let whole = |name: &str, want: &[u8]| {
        wait_for_showing(
            WITHIN,
            || {
                scan(&b);
                std::fs::read(db.join(name)).is_ok_and(|got| got == want)
            },
            &format!("{name} right at bob"),
            || b.ok(&["status"]),
        )
    };
    whole("one.bin", &one);
    let served = relay.cloud().metrics.content_groups_served.get();
    assert!(served >= 40, "the groups came from the cloud, not the lying peer ({served})");

    // Now endlessly slow: 2 s a group, and no wrong bytes.
    a.kill();
    a.start_env(&[("FEEDMESH_TEST_SERVE_DELAY_US", "2000000")]);
    std::fs::write(da.join("two.bin"), &two).unwrap();
    age(&da.join("two.bin"));
    stored_at_cloud(&a, 2);
    whole("two.bin", &two);
    assert!(relay.cloud().metrics.content_groups_served.get() >= served + 40, "two.bin came from the cloud");
    // Nothing partial or wrong left behind.
    let partial = db.join(".feedmesh/partial");
    assert!(std::fs::read_dir(&partial).map_or(true, |d| d.count() == 0), "no partial file left");
    assert_eq!(std::fs::read(db.join("one.bin")).unwrap(), one);
}

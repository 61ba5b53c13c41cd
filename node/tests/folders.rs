//! Mapped directories over loopback (issue 14, item 1, as far as the node has it): a relay and two
//! real `feedmesh` daemons of two users sharing a folder, each folder mapped to a directory.
//! Local files are published, a bad name is skipped with its reason, a file the other side holds
//! already is adopted, a rename moves no content (the other side copies its own file and trashes
//! the old name), a delete removes the file there (into the trash, still retrievable), and a file
//! whose content only the other device has waits for it, saying so (content does not move between
//! devices yet).

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

fn scan(dev: &Dev) -> String {
    dev.ok(&["folder", "scan", "docs"])
}

#[test]
fn a_mapped_directory_publishes_renames_and_deletes_without_moving_content() {
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let (mut a, mut b) = (Dev::new(root.path(), "a1"), Dev::new(root.path(), "b1"));
    a.ok(&["init", "--relay", &relay.url, "--name", "alice", "--account", "alice"]);
    a.start();
    b.ok(&["init", "--relay", &relay.url, "--name", "bob"]);
    b.start();
    a.ok(&["folder", "create", "docs"]);
    a.ok_eventually(&["folder", "share", "docs", "bob"], WITHIN);
    b.ok_eventually(&["folder", "accept", "docs"], WITHIN);

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
    // must come from Alice's device, which the node cannot fetch yet: it waits, saying so.
    b.ok(&["folder", "map", "docs", db.to_str().unwrap()]);
    let out = scan(&b);
    assert!(out.contains("waiting: only-a.txt"), "{out}");
    assert!(!db.join("only-a.txt").exists(), "no partial or empty file under the final name");
    assert_eq!(std::fs::read_to_string(db.join("shared.txt")).unwrap(), "the same on both sides");

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
    assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 1, "the old name's content is in the trash");

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
    assert!(std::fs::read_dir(&trash).unwrap().count() >= 1);

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

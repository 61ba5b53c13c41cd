//! The planner: each rule on its own, then devices that edit, rename and delete files
//! concurrently, sync their replicas and carry out their plans, until their directories are the
//! same and every losing edit is kept as a conflict copy.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::feedsync::{Edit, Endpoint, When};
use crate::replica::Replica;

fn path(text: &str) -> FilePath {
    FilePath::new(text).unwrap()
}

fn root(n: u8) -> ContentHash {
    ContentHash::of(&[n])
}

fn file(n: u8) -> DiskFile {
    DiskFile { size: u64::from(n) * 100, mtime_ns: i64::from(n), executable: false, root: Some(root(n)) }
}

fn entry(at: &str, n: u8) -> FileEntry {
    FileEntry {
        path: path(at),
        size: u64::from(n) * 100,
        mtime_ns: i64::from(n),
        executable: false,
        root: root(n),
    }
}

/// A device: its replica of the folder's feed, its directory and its base.
struct Dev {
    by: Endpoint,
    replica: Replica,
    disk: BTreeMap<FilePath, DiskFile>,
    base: BTreeMap<FilePath, Synced>,
}

impl Dev {
    fn new(name: &str) -> Self {
        Self {
            by: Endpoint::new(name).unwrap(),
            replica: Replica::new(0),
            disk: BTreeMap::new(),
            base: BTreeMap::new(),
        }
    }

    fn plan(&self) -> Plan {
        plan(self.replica.items().map(|i| i.as_ref()), &self.disk, &self.base, Platform::Unix)
    }

    /// Carries out plans until there is nothing to do (what a driver does after each scan).
    fn settle(&mut self, secs: i64) {
        for _ in 0..8 {
            let plan = self.plan();
            assert!(plan.refused.is_empty(), "{:?}", plan.refused);
            if plan.is_empty() {
                return;
            }
            // What was on disk when the plan was made: a write's local source names it (a driver
            // keeps what a plan replaces or removes in its stash until the plan is done).
            let before = self.disk.clone();
            for action in plan.actions {
                if let Action::Write { local: Some(local), entry, .. } = &action {
                    assert_eq!(before[local].root, Some(entry.root), "a local source has the content");
                }
                self.carry_out(action, secs);
            }
        }
        panic!("{}: the plan does not settle: {:?}", self.by, self.plan());
    }

    fn carry_out(&mut self, action: Action, secs: i64) {
        let when = When::from_unix_secs(1_800_000_000 + secs).unwrap();
        let mut change = |id: &ItemId, edit: Edit| {
            self.replica.change(id, &self.by, &when, &edit).expect("a local change");
        };
        match action {
            Action::Publish(e) => {
                change(&e.path.item_id(), Edit { content: Some(e.to_content()), ..Edit::default() });
                self.base.insert(e.path.clone(), Synced::of(&e, None));
            }
            Action::PublishDelete(p) => {
                change(&p.item_id(), Edit { delete: true, ..Edit::default() });
                self.base.remove(&p);
            }
            Action::Resolve { path, copy } => {
                change(&path.item_id(), Edit { resolve: true, ..Edit::default() });
                self.base.remove(&copy);
            }
            Action::Write { at, entry, copy_of, .. } => {
                let file = DiskFile {
                    size: entry.size,
                    mtime_ns: entry.mtime_ns,
                    executable: entry.executable,
                    root: Some(entry.root),
                };
                self.disk.insert(at.clone(), file);
                self.base.insert(at, Synced::of(&entry, copy_of));
            }
            Action::Touch { at, entry } => {
                let file = self.disk.get_mut(&at).expect("touch a file that is there");
                file.executable = entry.executable;
                file.mtime_ns = entry.mtime_ns;
                self.base.insert(at, Synced::of(&entry, None));
            }
            Action::Adopt { at, synced } => {
                self.base.insert(at, synced);
            }
            Action::Remove { path } => {
                self.disk.remove(&path);
                self.base.remove(&path);
            }
            Action::Forget { path } => {
                self.base.remove(&path);
            }
        }
    }
}

fn sync(a: &mut Dev, b: &mut Dev) {
    let from_a: Vec<Arc<Item>> = a.replica.items().cloned().collect();
    let from_b: Vec<Arc<Item>> = b.replica.items().cloned().collect();
    for item in &from_a {
        b.replica.merge(item).unwrap();
    }
    for item in &from_b {
        a.replica.merge(item).unwrap();
    }
}

#[test]
fn a_new_local_file_is_published_and_a_remote_one_written() {
    let mut a = Dev::new("a");
    let mut b = Dev::new("b");
    a.disk.insert(path("x.txt"), file(1));
    assert_eq!(a.plan().actions, vec![Action::Publish(entry("x.txt", 1))]);
    a.settle(1);
    sync(&mut a, &mut b);
    assert_eq!(
        b.plan().actions,
        vec![Action::Write { at: path("x.txt"), entry: entry("x.txt", 1), local: None, copy_of: None }]
    );
    b.settle(2);
    assert_eq!(b.disk, a.disk);
    assert!(a.plan().is_empty() && b.plan().is_empty());
}

#[test]
fn a_rename_takes_the_content_from_the_old_path_before_removing_it() {
    let mut a = Dev::new("a");
    let mut b = Dev::new("b");
    a.disk.insert(path("old.bin"), file(7));
    a.settle(1);
    sync(&mut a, &mut b);
    b.settle(2);
    let moved = a.disk.remove(&path("old.bin")).unwrap();
    a.disk.insert(path("dir/new.bin"), moved);
    a.settle(3);
    sync(&mut a, &mut b);
    assert_eq!(
        b.plan().actions,
        vec![
            Action::Write {
                at: path("dir/new.bin"),
                entry: entry("dir/new.bin", 7),
                local: Some(path("old.bin")),
                copy_of: None
            },
            Action::Remove { path: path("old.bin") },
        ]
    );
}

#[test]
fn a_file_being_written_is_neither_published_nor_replaced() {
    let mut a = Dev::new("a");
    let mut b = Dev::new("b");
    b.disk.insert(path("x"), file(2));
    b.settle(1);
    sync(&mut a, &mut b);
    a.disk.insert(path("x"), DiskFile { root: None, ..file(3) });
    assert!(a.plan().is_empty(), "{:?}", a.plan());
}

#[test]
fn concurrent_edits_keep_the_loser_beside_the_winner_until_its_copy_is_deleted() {
    let mut a = Dev::new("a");
    let mut b = Dev::new("b");
    a.disk.insert(path("doc.txt"), file(1));
    a.settle(1);
    sync(&mut a, &mut b);
    b.settle(2);
    a.disk.insert(path("doc.txt"), file(2));
    a.settle(3);
    b.disk.insert(path("doc.txt"), file(3));
    b.settle(4);
    sync(&mut a, &mut b);
    a.settle(5);
    b.settle(6);
    assert_eq!(a.disk, b.disk);
    assert_eq!(a.disk.len(), 2, "the winner and one conflict copy: {:?}", a.disk.keys());
    let copy = a.disk.keys().find(|p| p.as_str().contains("(conflict, ")).unwrap().clone();
    let roots: BTreeSet<ContentHash> = a.disk.values().filter_map(|f| f.root).collect();
    assert_eq!(roots, BTreeSet::from([root(2), root(3)]), "both edits are on disk");
    // Deleting the copy on one side resolves the item everywhere.
    b.disk.remove(&copy);
    b.settle(7);
    assert!(b.replica.items().all(|i| i.conflicts.is_empty()));
    sync(&mut a, &mut b);
    a.settle(8);
    assert_eq!(a.disk, b.disk);
    assert_eq!(a.disk.len(), 1);
}

#[test]
fn deleting_one_of_two_conflict_copies_keeps_the_other_as_an_ordinary_file() {
    let mut devs: Vec<Dev> = ["a", "b", "c"].iter().map(|n| Dev::new(n)).collect();
    for (i, d) in devs.iter_mut().enumerate() {
        d.disk.insert(path("f"), file(i as u8 + 1));
        d.settle(1);
    }
    let (x, rest) = devs.split_at_mut(1);
    let (y, z) = rest.split_at_mut(1);
    for _ in 0..2 {
        sync(&mut x[0], &mut y[0]);
        sync(&mut y[0], &mut z[0]);
        sync(&mut x[0], &mut z[0]);
        for d in [&mut x[0], &mut y[0], &mut z[0]] {
            d.settle(2);
        }
    }
    let a = &mut x[0];
    assert_eq!(a.disk.len(), 3, "the winner and two copies: {:?}", a.disk.keys());
    let copies: Vec<FilePath> =
        a.disk.keys().filter(|p| p.as_str().contains("(conflict, ")).cloned().collect();
    let kept = a.disk[&copies[1]].root;
    a.disk.remove(&copies[0]);
    a.settle(3);
    for _ in 0..2 {
        sync(&mut x[0], &mut y[0]);
        sync(&mut y[0], &mut z[0]);
        for d in [&mut x[0], &mut y[0], &mut z[0]] {
            d.settle(4);
        }
    }
    for d in [&x[0], &y[0], &z[0]] {
        assert_eq!(d.disk.len(), 2, "{}: {:?}", d.by, d.disk.keys());
        assert_eq!(
            d.disk.get(&copies[1]).and_then(|f| f.root),
            kept,
            "the other loser is kept, as a file of its own"
        );
        assert!(d.replica.item(&copies[1].item_id()).is_some_and(|i| !i.version.deleted));
    }
}

#[test]
fn an_edit_that_loses_to_a_concurrent_delete_stays_on_disk() {
    let mut a = Dev::new("a");
    let mut b = Dev::new("b");
    a.disk.insert(path("notes"), file(1));
    a.settle(1);
    sync(&mut a, &mut b);
    b.settle(2);
    // b deletes twice (two updates) so its delete wins on `updates`; a edits once.
    b.disk.insert(path("notes"), file(4));
    b.settle(3);
    b.disk.remove(&path("notes"));
    b.settle(4);
    a.disk.insert(path("notes"), file(5));
    a.settle(5);
    sync(&mut a, &mut b);
    a.settle(6);
    b.settle(7);
    let item = a.replica.item(&path("notes").item_id()).unwrap();
    assert!(item.version.deleted, "the delete won");
    assert_eq!(a.disk, b.disk);
    assert_eq!(a.disk.values().filter_map(|f| f.root).collect::<Vec<_>>(), vec![root(5)], "the edit is kept");
}

#[test]
fn a_bad_path_from_a_peer_is_refused_and_the_rest_applied() {
    let mut a = Dev::new("a");
    let when = When::from_unix_secs(1_800_000_000).unwrap();
    let good = entry("ok.txt", 1);
    a.replica
        .change(
            &good.path.item_id(),
            &a.by,
            &when,
            &Edit { content: Some(good.to_content()), ..Edit::default() },
        )
        .unwrap();
    // A peer's item whose content names a path outside the folder, under some id.
    let bad = crate::feedsync::Content {
        attrs: "".into(),
        inner: good.to_content().inner.replace("ok.txt", "../../etc/passwd").into(),
        scope: Default::default(),
    };
    let id = ItemId::new("file-0000").unwrap();
    a.replica.change(&id, &a.by, &when, &Edit { content: Some(Arc::new(bad)), ..Edit::default() }).unwrap();
    // And one Windows cannot hold.
    let colon = entry("a:b", 2);
    a.replica
        .change(
            &colon.path.item_id(),
            &a.by,
            &when,
            &Edit { content: Some(colon.to_content()), ..Edit::default() },
        )
        .unwrap();
    let plan = plan(a.replica.items().map(|i| i.as_ref()), &a.disk, &a.base, Platform::Windows);
    assert_eq!(
        plan.refused,
        vec![
            Refused::Entry { id, reason: EntryError::Path(PathError::Dots { at: 0 }) },
            Refused::Path {
                id: colon.path.item_id(),
                path: "a:b".into(),
                reason: PathError::WindowsCharacter { at: 1, ch: ':' }
            }
        ]
    );
    assert_eq!(
        plan.actions,
        vec![Action::Write { at: path("ok.txt"), entry: good, local: None, copy_of: None }]
    );
}

// Devices that do anything to a few paths, in any order, with syncs between.

#[derive(Clone, Debug)]
enum Op {
    Write {
        dev: usize,
        at: usize,
        content: u8,
        exec: bool,
    },
    Delete {
        dev: usize,
        at: usize,
    },
    Rename {
        dev: usize,
        from: usize,
        to: usize,
    },
    /// Delete a conflict copy, if the device has one (resolves the item).
    DeleteCopy {
        dev: usize,
    },
    Sync {
        a: usize,
        b: usize,
    },
}

const PATHS: [&str; 4] = ["a", "b.txt", "d/c", "d/e.md"];
const DEVICES: usize = 3;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..DEVICES, 0..PATHS.len(), 1u8..6, any::<bool>()).prop_map(|(dev, at, content, exec)| Op::Write { dev, at, content, exec }),
        2 => (0..DEVICES, 0..PATHS.len()).prop_map(|(dev, at)| Op::Delete { dev, at }),
        2 => (0..DEVICES, 0..PATHS.len(), 0..PATHS.len()).prop_map(|(dev, from, to)| Op::Rename { dev, from, to }),
        1 => (0..DEVICES).prop_map(|dev| Op::DeleteCopy { dev }),
        3 => (0..DEVICES, 0..DEVICES).prop_map(|(a, b)| Op::Sync { a, b }),
    ]
}

fn pair(devs: &mut [Dev], a: usize, b: usize) -> (&mut Dev, &mut Dev) {
    let (lo, hi) = (a.min(b), a.max(b));
    let (left, right) = devs.split_at_mut(hi);
    (&mut left[lo], &mut right[0])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// After any history, syncing everyone and carrying out the plans leaves the same directory
    /// on every device, nothing left to do, each item's winner at its path and each live losing
    /// version as a conflict copy beside it.
    #[test]
    fn devices_converge_on_disk_and_keep_every_losing_edit(ops in proptest::collection::vec(op(), 0..40)) {
        let mut devs: Vec<Dev> = (0..DEVICES).map(|i| Dev::new(&format!("dev{i}"))).collect();
        for (step, op) in ops.into_iter().enumerate() {
            let secs = step as i64;
            match op {
                Op::Write { dev, at, content, exec } => {
                    let d = &mut devs[dev];
                    d.disk.insert(path(PATHS[at]), DiskFile { executable: exec, mtime_ns: secs, ..file(content) });
                    d.settle(secs);
                }
                Op::Delete { dev, at } => {
                    devs[dev].disk.remove(&path(PATHS[at]));
                    devs[dev].settle(secs);
                }
                Op::Rename { dev, from, to } => {
                    let d = &mut devs[dev];
                    if from != to {
                        if let Some(f) = d.disk.remove(&path(PATHS[from])) {
                            d.disk.insert(path(PATHS[to]), f);
                        }
                    }
                    d.settle(secs);
                }
                Op::DeleteCopy { dev } => {
                    let d = &mut devs[dev];
                    if let Some(copy) = d.disk.keys().find(|p| p.as_str().contains("(conflict, ")).cloned() {
                        d.disk.remove(&copy);
                    }
                    d.settle(secs);
                }
                Op::Sync { a, b } if a != b => {
                    let (x, y) = pair(&mut devs, a, b);
                    sync(x, y);
                    x.settle(secs);
                    y.settle(secs);
                }
                Op::Sync { .. } => {}
            }
        }
        // Quiesce: everyone syncs with everyone until nothing changes.
        for round in 0..6 {
            for a in 0..DEVICES {
                for b in a + 1..DEVICES {
                    let (x, y) = pair(&mut devs, a, b);
                    sync(x, y);
                    x.settle(1000 + round);
                    y.settle(1000 + round);
                }
            }
        }
        for d in &devs[1..] {
            prop_assert_eq!(d.replica.digest(), devs[0].replica.digest(), "replicas converge");
            prop_assert_eq!(&d.disk, &devs[0].disk, "directories converge");
        }
        for d in &devs {
            prop_assert!(d.plan().is_empty());
            for item in d.replica.items() {
                let e = FileEntry::from_version(&item.version).unwrap();
                if !item.version.deleted {
                    prop_assert_eq!(d.disk.get(&e.path).and_then(|f| f.root), Some(e.root), "the winner is at its path");
                }
                for loser in item.conflicts.iter().filter(|v| !v.deleted) {
                    let lost = FileEntry::from_version(loser).unwrap();
                    let copy = conflict_copy(&e.path, loser).unwrap();
                    prop_assert_eq!(d.disk.get(&copy).and_then(|f| f.root), Some(lost.root), "a losing edit is kept");
                }
            }
        }
    }
}

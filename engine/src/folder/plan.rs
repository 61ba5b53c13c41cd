//! What a mapped folder must do to bring its directory and its feed together: the planner,
//! sans-IO. The driver scans the directory ([`DiskFile`] per path), keeps what it last had in
//! sync per path ([`Synced`], its base), and passes both with the folder's items; the planner
//! answers with [`Action`]s (publish a local change, write or remove a file, keep a conflict
//! copy) and the items it refuses, each with its reason. Running it again after the actions are
//! carried out gives nothing to do: it is a three-way comparison per path (disk, base, feed), so
//! it needs no history of its own.
//!
//! Nothing is lost:
//! - a local change (the disk differs from the base) is published, never overwritten: a remote
//!   change made concurrently becomes a FeedSync conflict of the same item, and the loser, local
//!   or remote, is kept beside the winner as a conflict copy
//!   ([`super::entry::conflict_copy`]) until the user deletes the copy, which resolves the item;
//! - an edit that loses to a concurrent delete is a live conflict of a deleted item: its copy is
//!   kept the same way;
//! - a file still being written (its scan has no root yet) is neither published nor replaced.
//!
//! Renames do not move content twice: a write names a local file with the same root when there
//! is one ([`Action::Write::local`]), and the plan puts writes before removals, so a rename's
//! removal of the old path comes after its content was copied to the new one.

use std::collections::{BTreeMap, BTreeSet};

use super::entry::{conflict_copy, ContentHash, EntryError, FileEntry};
use super::path::{FilePath, PathError, Platform};
use crate::feedsync::{Item, ItemId};

/// A file as the driver's scan saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFile {
    pub size: u64,
    pub mtime_ns: i64,
    pub executable: bool,
    /// `None` while the file is not stable yet (still being written) or not hashed.
    pub root: Option<ContentHash>,
}

/// What the device last had in sync at a path: the file it published or wrote there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synced {
    pub root: ContentHash,
    pub size: u64,
    pub mtime_ns: i64,
    pub executable: bool,
    /// The file is the conflict copy of a losing version of this item.
    pub copy_of: Option<ItemId>,
}

impl Synced {
    /// The base entry for `entry` (written or published at its path).
    pub fn of(entry: &FileEntry, copy_of: Option<ItemId>) -> Self {
        Self {
            root: entry.root,
            size: entry.size,
            mtime_ns: entry.mtime_ns,
            executable: entry.executable,
            copy_of,
        }
    }
}

/// One thing to do. The driver carries them out in order and updates its base after each
/// (the action says what to record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The file at `entry.path` changed here: publish it (create or update its item); record
    /// `Synced::of(entry, None)`.
    Publish(FileEntry),
    /// The file at `path` was deleted here: publish the deletion; forget the base entry.
    PublishDelete(FilePath),
    /// The user deleted (or changed) a conflict copy of the item at `path`: resolve the item's
    /// conflicts. The base entry of the copy, `copy`, is forgotten.
    Resolve { path: FilePath, copy: FilePath },
    /// Write `entry`'s content at `at` (a temporary file, verified, then renamed into place), with
    /// its executable bit and mtime: the content of the local file `local` when there is one with
    /// the same root (where it was when the plan was made: a driver keeps what the plan replaces
    /// or removes in its stash until the plan is done, so a swap of two names works), else
    /// fetched. Replaces what is at `at` (whose content the driver may keep
    /// in its stash). Record `Synced::of(entry, copy_of)` at `at`.
    Write { at: FilePath, entry: FileEntry, local: Option<FilePath>, copy_of: Option<ItemId> },
    /// The content at `at` is right; set its executable bit and mtime to `entry`'s; record it.
    Touch { at: FilePath, entry: FileEntry },
    /// The file is what the feed says already (written by other means): record it.
    Adopt { at: FilePath, synced: Synced },
    /// A peer deleted the file at `path` and it is unchanged here: remove it; forget the base.
    Remove { path: FilePath },
    /// The file is gone on both sides: forget the base entry.
    Forget { path: FilePath },
}

/// Why an item of the folder is not applied here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("item {id}: {reason}")]
    Entry { id: ItemId, reason: EntryError },
    #[error("item {id} ({path}): {reason}")]
    Path { id: ItemId, path: String, reason: PathError },
    #[error("item {id}: a conflict copy of {path} would have a name this device cannot hold: {reason}")]
    CopyName { id: ItemId, path: String, reason: PathError },
}

/// The plan: actions in the order to carry them out, and the items refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub refused: Vec<Refused>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

/// What the feed says about one path.
struct Wanted {
    entry: FileEntry,
    deleted: bool,
}

/// Plans the folder (see the module doc). `items` are the folder's items; `disk` the scan;
/// `base` what was last in sync; `platform` which names the local file system can hold.
pub fn plan<'a>(
    items: impl IntoIterator<Item = &'a Item>,
    disk: &BTreeMap<FilePath, DiskFile>,
    base: &BTreeMap<FilePath, Synced>,
    platform: Platform,
) -> Plan {
    let mut refused = Vec::new();
    let mut wanted: BTreeMap<FilePath, Wanted> = BTreeMap::new();
    // Conflict copies the feed asks for: copy path -> (the item's path, the loser's entry).
    let mut copies: BTreeMap<FilePath, (FilePath, ItemId, FileEntry)> = BTreeMap::new();
    for item in items {
        let id = item.id().clone();
        let entry = match FileEntry::from_version(&item.version) {
            Ok(entry) => entry,
            Err(reason) => {
                refused.push(Refused::Entry { id, reason });
                continue;
            }
        };
        if let Err(reason) = entry.path.check_local(platform) {
            refused.push(Refused::Path { id, path: entry.path.to_string(), reason });
            continue;
        }
        for loser in item.conflicts.iter().filter(|v| !v.deleted) {
            let Ok(lost) = FileEntry::from_version(loser) else { continue };
            match conflict_copy(&entry.path, loser).and_then(|at| at.check_local(platform).map(|()| at)) {
                Ok(at) => {
                    let lost = FileEntry { path: at.clone(), ..lost };
                    copies.insert(at, (entry.path.clone(), id.clone(), lost));
                }
                Err(reason) => {
                    refused.push(Refused::CopyName { id: id.clone(), path: entry.path.to_string(), reason })
                }
            }
        }
        wanted.insert(entry.path.clone(), Wanted { deleted: item.version.deleted, entry });
    }
    // Content found on disk, by root (for writes that need no fetch).
    let mut local: BTreeMap<ContentHash, &FilePath> = BTreeMap::new();
    for (path, file) in disk {
        if let Some(root) = file.root {
            local.entry(root).or_insert(path);
        }
    }
    // Items whose conflict copy the user deleted or changed: they are resolved, and their other
    // copies become ordinary files first (a resolve folds every conflict of the item, and the
    // other losers must not go with it).
    let mut resolving: BTreeMap<&ItemId, &FilePath> = BTreeMap::new();
    for (at, (_, id, _)) in &copies {
        let (d, b) = (disk.get(at), base.get(at));
        let gone_or_changed = d.is_none_or(|d| d.root.is_some_and(|root| b.is_some_and(|b| b.root != root)));
        if b.is_some_and(|b| b.copy_of.as_ref() == Some(id)) && gone_or_changed {
            resolving.entry(id).or_insert(at);
        }
    }
    let paths: BTreeSet<&FilePath> =
        wanted.keys().chain(disk.keys()).chain(base.keys()).chain(copies.keys()).collect();
    let mut writes = Vec::new();
    let mut rest = Vec::new();
    // Bound: every path is the feed's, the scan's or the base's, each looked at once.
    for path in paths {
        let (d, b) = (disk.get(path), base.get(path));
        if d.is_some_and(|d| d.root.is_none()) {
            continue; // Still being written: neither published nor replaced.
        }
        let source = |root: &ContentHash| local.get(root).map(|p| (*p).clone());
        if let Some((of, id, lost)) = copies.get(path) {
            match resolving.get(id) {
                // The copy the user deleted or changed: resolve (a changed one is then an
                // ordinary file, published by the next plan).
                Some(copy) if *copy == path => {
                    rest.push(Action::Resolve { path: of.clone(), copy: path.clone() })
                }
                // Another copy of an item being resolved: an ordinary file from now on.
                Some(_) => plan_path(
                    path,
                    None,
                    d,
                    b.filter(|b| b.copy_of.is_none()),
                    &source,
                    &mut writes,
                    &mut rest,
                ),
                None => match d {
                    Some(d) if d.root == Some(lost.root) => {
                        if b.is_none_or(|b| b.copy_of.as_ref() != Some(id) || b.root != lost.root) {
                            rest.push(Action::Adopt {
                                at: path.clone(),
                                synced: Synced::of(lost, Some(id.clone())),
                            });
                        }
                    }
                    None => writes.push(Action::Write {
                        at: path.clone(),
                        entry: lost.clone(),
                        local: source(&lost.root),
                        copy_of: Some(id.clone()),
                    }),
                    // A file of the user's own at the copy's name: it is published (a new item),
                    // and the copy waits until the name is free.
                    Some(_) => plan_path(path, None, d, b, &source, &mut writes, &mut rest),
                },
            }
            continue;
        }
        plan_path(path, wanted.get(path), d, b, &source, &mut writes, &mut rest);
    }
    writes.extend(rest);
    Plan { actions: writes, refused }
}

/// The three-way comparison of one ordinary path: the feed's `w`, the disk's `d`, the base `b`.
fn plan_path(
    path: &FilePath,
    w: Option<&Wanted>,
    d: Option<&DiskFile>,
    b: Option<&Synced>,
    source: &dyn Fn(&ContentHash) -> Option<FilePath>,
    writes: &mut Vec<Action>,
    rest: &mut Vec<Action>,
) {
    let live = w.filter(|w| !w.deleted);
    // A base that records a conflict copy no longer asked for (its conflict was resolved).
    let b_copy = b.is_some_and(|b| b.copy_of.is_some());
    let changed = match (d, b) {
        (None, None) => false,
        (Some(_), None) | (None, Some(_)) => true,
        (Some(d), Some(b)) => {
            d.root != Some(b.root) || d.executable != b.executable || d.mtime_ns != b.mtime_ns
        }
    };
    let entry_of = |d: &DiskFile, root| FileEntry {
        path: path.clone(),
        size: d.size,
        mtime_ns: d.mtime_ns,
        executable: d.executable,
        root,
    };
    if changed {
        match d {
            Some(d) => {
                let Some(root) = d.root else { return };
                match live {
                    // What the feed says already (the same file made on two sides): take the
                    // feed's mtime rather than make a conflict of two equal contents.
                    Some(w) if w.entry.root == root && w.entry.executable == d.executable => {
                        if w.entry.mtime_ns == d.mtime_ns {
                            rest.push(Action::Adopt { at: path.clone(), synced: Synced::of(&w.entry, None) })
                        } else {
                            rest.push(Action::Touch { at: path.clone(), entry: w.entry.clone() })
                        }
                    }
                    _ => rest.push(Action::Publish(entry_of(d, root))),
                }
            }
            None if live.is_some() && !b_copy => rest.push(Action::PublishDelete(path.clone())),
            None => rest.push(Action::Forget { path: path.clone() }),
        }
        return;
    }
    // Unchanged here (or absent on both sides): the feed decides.
    match (live, d) {
        (Some(w), None) => writes.push(Action::Write {
            at: path.clone(),
            entry: w.entry.clone(),
            local: source(&w.entry.root),
            copy_of: None,
        }),
        (Some(w), Some(d)) if d.root != Some(w.entry.root) => writes.push(Action::Write {
            at: path.clone(),
            entry: w.entry.clone(),
            local: source(&w.entry.root),
            copy_of: None,
        }),
        // The content is right; the feed's mode or mtime changed since the last sync: set them.
        (Some(w), Some(d)) => {
            if b != Some(&Synced::of(&w.entry, None)) {
                if d.executable != w.entry.executable || d.mtime_ns != w.entry.mtime_ns {
                    rest.push(Action::Touch { at: path.clone(), entry: w.entry.clone() });
                } else {
                    rest.push(Action::Adopt { at: path.clone(), synced: Synced::of(&w.entry, None) });
                }
            }
        }
        // Deleted by a peer, or a copy whose conflict was resolved (by a peer: the copy this
        // device kept is unchanged): remove it.
        (None, Some(_)) if w.is_some() || b_copy => rest.push(Action::Remove { path: path.clone() }),
        // No item, unchanged, on disk: known to the base but never published (or its item
        // was lost): publish it.
        (None, Some(d)) => {
            if let Some(root) = d.root {
                rest.push(Action::Publish(entry_of(d, root)));
            }
        }
        // Absent everywhere (an unchanged absence has no base either).
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests;

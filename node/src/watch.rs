//! Mapped directories watched as they change (Live Folders, issue 14 item 1): a `notify` watcher
//! per mapped directory wakes the daemon's next round when something in it changes, and again a
//! little after the stability window (a file still being written is published only once it has
//! not changed for `folders::STABLE_FOR`, so the round that sees it stable has to come). The
//! periodic round stays the backstop: events can be lost (inotify's queue overflows, network file
//! systems send none), and nothing depends on them but latency.
//!
//! The daemon's own directory (`.feedmesh`: partial files written a group at a time) is not
//! watched at all, not merely ignored: the mapped directory itself is watched without recursion
//! and each of its other subdirectories recursively (new ones are added by the next round, which
//! their creation wakes). Otherwise every 16 KiB written by a transfer would wake the watcher's
//! thread, which cost a large transfer about a tenth of its time. Each watched directory counts its
//! changes ([`Watchers::changes`]): a round whose folder saw no change, no new item and no
//! pending file skips that folder's scan until the backstop (`crate::net::RESCAN_EVERY`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::folder::path::RESERVED_DIR;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

/// The watchers, by mapped directory, each with the count of changes it saw.
#[derive(Default)]
pub struct Watchers {
    by_dir: Mutex<BTreeMap<PathBuf, Watched>>,
}

/// One mapped directory's watcher.
struct Watched {
    watcher: RecommendedWatcher,
    changes: Arc<AtomicU64>,
    /// The subdirectories watched recursively (every one but `.feedmesh`).
    subdirs: std::collections::BTreeSet<PathBuf>,
}

impl Watched {
    /// Watches the subdirectories of `root` not watched yet (and forgets the ones gone). Bound:
    /// `root`'s entries, one listing per round.
    fn refresh(&mut self, root: &Path) {
        self.subdirs.retain(|d| d.is_dir());
        let Ok(entries) = std::fs::read_dir(root) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir || ours(root, &path) || self.subdirs.contains(&path) {
                continue;
            }
            match self.watcher.watch(&path, RecursiveMode::Recursive) {
                Ok(()) => {
                    self.subdirs.insert(path);
                }
                Err(e) => {
                    tracing::debug!(dir = %path.display(), error = %e, "not watched; the periodic rescan finds its changes")
                }
            }
        }
    }
}

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.by_dir.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "Watchers({n} directories)")
    }
}

/// Whether an event is only about the directory's own bookkeeping (`.feedmesh`), which the
/// daemon writes itself: waking for those would make every round wake the next.
fn ours(dir: &Path, path: &Path) -> bool {
    path.strip_prefix(dir)
        .ok()
        .and_then(|rel| rel.components().next())
        .is_some_and(|c| c.as_os_str() == RESERVED_DIR)
}

impl Watchers {
    /// How many changes (or lost events) the watcher of `dir` has seen; `None` when `dir` is not
    /// watched (then every round rescans it).
    pub fn changes(&self, dir: &Path) -> Option<u64> {
        let by_dir = self.by_dir.lock().unwrap_or_else(|p| p.into_inner());
        by_dir.get(dir).map(|w| w.changes.load(Ordering::SeqCst))
    }

    /// Watches exactly `dirs` (starting the new ones, dropping the ones no longer mapped).
    /// `wake` wakes the daemon; `later` is how long after an event it is woken again. A
    /// directory that cannot be watched is left to the periodic round (and said so in the log).
    pub fn sync<W: Fn() + Clone + Send + Sync + 'static>(&self, dirs: &[PathBuf], wake: W, later: Duration) {
        let mut by_dir = self.by_dir.lock().unwrap_or_else(|p| p.into_inner());
        by_dir.retain(|d, _| dirs.contains(d));
        for dir in dirs {
            if let Some(watched) = by_dir.get_mut(dir) {
                watched.refresh(dir);
                continue;
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
            let (wake, root) = (wake.clone(), dir.clone());
            let pending = Arc::new(AtomicBool::new(false));
            let changes = Arc::new(AtomicU64::new(0));
            let counted = changes.clone();
            let handler = move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else {
                    // An overflow or an error: wake anyway, the round rescans.
                    counted.fetch_add(1, Ordering::SeqCst);
                    wake();
                    return;
                };
                // Reads (serving a file to a peer opens it) change nothing; nor does the daemon's
                // own bookkeeping.
                if matches!(event.kind, notify::EventKind::Access(_))
                    || (!event.paths.is_empty() && event.paths.iter().all(|p| ours(&root, p)))
                {
                    return;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                wake();
                // One delayed wake at a time per directory, for the round that sees it stable.
                if !pending.swap(true, Ordering::SeqCst) {
                    let (wake, pending) = (wake.clone(), pending.clone());
                    runtime.spawn(async move {
                        tokio::time::sleep(later).await;
                        pending.store(false, Ordering::SeqCst);
                        wake();
                    });
                }
            };
            match notify::recommended_watcher(handler) {
                Ok(mut watcher) => match watcher.watch(dir, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        let mut watched = Watched { watcher, changes, subdirs: Default::default() };
                        watched.refresh(dir);
                        by_dir.insert(dir.clone(), watched);
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "not watched; the periodic rescan finds its changes")
                    }
                },
                Err(e) => tracing::warn!(error = %e, "no file watcher; the periodic rescan finds changes"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_own_files_do_not_wake_it() {
        let dir = Path::new("/m/docs");
        assert!(ours(dir, Path::new("/m/docs/.feedmesh/base.json")));
        assert!(ours(dir, Path::new("/m/docs/.feedmesh")));
        assert!(!ours(dir, Path::new("/m/docs/a.txt")));
        assert!(!ours(dir, Path::new("/m/docs/sub/.feedmesh/x")));
        assert!(!ours(dir, Path::new("/elsewhere/.feedmesh/x")));
    }
}

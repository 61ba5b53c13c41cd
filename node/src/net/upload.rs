//! Content of `cloud` folders to the cloud (Live Folders): every round, each mapped `cloud`
//! folder's live files this device holds whole and the cloud lacks are uploaded, chunk group by
//! chunk group, each group's bao frame sealed with the folder's newest content key
//! (`engine::folder::keys`), so the cloud keeps what it cannot read. Resumable: the cloud says
//! which groups it lacks. Past the owner's quota a folder's uploads stop (its content goes peer
//! to peer only) and `status` says so; the next try is [`OVER_QUOTA_RETRY`] later. Content keys
//! themselves travel through the signed directory ([`Net::share_keys`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use engine::control::{UploadReply, UploadState};
use engine::directory::{FolderId, Storage};
use engine::folder::blob::encode_group;
use engine::folder::fetch::GROUP_BYTES;
use engine::folder::{key_op, ring_of, ContentHash, ContentKey};
use transport::{frame, Open};

use super::{lock, Net};
use crate::folders;
use crate::state::CloudContent;

/// How long a folder past its quota waits before it tries the cloud again.
pub const OVER_QUOTA_RETRY: Duration = Duration::from_secs(300);
/// Groups read and sealed per blocking step of an upload (1 MiB).
const SEAL_BATCH: u64 = 64;
/// How long the cloud's word that it holds a folder's contents is trusted before each is asked
/// again: the cloud sweeps contents no live file has, and a content can leave a folder and come
/// back between two of this device's rounds (or be swept in a view of the folder the cloud had
/// while this device's did not change), so the cache must not hide that for ever.
pub const STORED_RECHECK: Duration = Duration::from_secs(15 * 60);

/// What the upload side keeps between rounds.
#[derive(Debug, Default)]
pub struct Uploads {
    /// Contents the cloud said it holds whole, per folder (see [`Uploads::keep_stored`]).
    stored: BTreeSet<(FolderId, ContentHash)>,
    /// Per folder, since when its `stored` entries are trusted.
    stored_since: std::collections::BTreeMap<FolderId, Instant>,
    /// Folders running an upload now.
    running: BTreeSet<FolderId>,
    /// Folders past quota, and since when.
    over: std::collections::BTreeMap<FolderId, Instant>,
}

impl Uploads {
    /// Forgets what the cloud said it holds of `folder` that is no live content of it now (`live`,
    /// sorted; none when the folder is no longer `cloud`): the cloud sweeps such content, so a
    /// content that comes back is asked about again. All of it once [`STORED_RECHECK`] has passed.
    pub fn keep_stored(&mut self, folder: FolderId, live: &[ContentHash], now: Instant) {
        let since = *self.stored_since.entry(folder).or_insert(now);
        let recheck = now.saturating_duration_since(since) >= STORED_RECHECK;
        if recheck {
            self.stored_since.insert(folder, now);
        }
        self.stored.retain(|(f, root)| *f != folder || (!recheck && live.binary_search(root).is_ok()));
    }

    /// Whether the cloud said it holds `root` of `folder` (and that is still trusted).
    pub fn is_stored(&self, folder: FolderId, root: ContentHash) -> bool {
        self.stored.contains(&(folder, root))
    }
}

impl Net {
    fn uploads(&self) -> std::sync::MutexGuard<'_, Uploads> {
        self.uploads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Content keys through the directory: for every folder this device may read, makes the
    /// change `engine::folder::key_op` asks for (the owner's first key, a rotation after a
    /// removal, wraps for readers that lack one). Returns how many changes it made.
    pub fn share_keys(&self) -> usize {
        let mut n = lock(&self.node);
        let folders: Vec<FolderId> = n.dir().state().folders.keys().copied().collect();
        let mut made = 0;
        // Bound: the folders of the directory, one change each per round at most.
        for folder in folders {
            let op = match key_op(n.dir().state(), &folder, &n.key, crate::state::random32) {
                Ok(Some(op)) => op,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(%folder, error = %e, "content key not shared");
                    continue;
                }
            };
            match n.make(op) {
                Ok(_) => made += 1,
                Err(e) => tracing::warn!(%folder, error = %format!("{e:#}"), "content key change refused"),
            }
        }
        made
    }

    /// Starts an upload round for a mapped `cloud` folder (nothing if one runs or the folder is
    /// resting past its quota).
    pub(super) fn upload_in_background(self: Arc<Self>, folder: FolderId, dir: PathBuf) {
        {
            let mut up = self.uploads();
            if up.over.get(&folder).is_some_and(|t| t.elapsed() < OVER_QUOTA_RETRY) {
                return;
            }
            if !up.running.insert(folder) {
                return;
            }
        }
        tokio::spawn(async move {
            let result = self.upload_folder(folder, &dir).await;
            self.uploads().running.remove(&folder);
            if let Err(e) = result {
                tracing::debug!(%folder, error = %format!("{e:#}"), "upload round ended early");
                let mut n = lock(&self.node);
                let entry = n.cloud_content.entry(folder).or_default();
                entry.waiting = Some(format!("{e:#}"));
            }
        });
    }

    /// One upload round of `folder`: every live content this device holds and the cloud lacks.
    async fn upload_folder(self: &Arc<Self>, folder: FolderId, dir: &Path) -> anyhow::Result<()> {
        let (key, live) = {
            let n = lock(&self.node);
            let Some(f) = n.dir().folder(&folder) else { return Ok(()) };
            if f.storage != Storage::Cloud {
                drop(n);
                lock(&self.node).cloud_content.remove(&folder);
                self.uploads().keep_stored(folder, &[], Instant::now());
                return Ok(());
            }
            let key = ring_of(n.dir().state(), &folder, &n.key).current().cloned();
            let Some(replica) = n.replica(&folder) else { return Ok(()) };
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let index = live.entry(folder).or_default();
            index.update(replica);
            (key, index.iter().copied().collect::<Vec<_>>())
        };
        let Some(key) = key else {
            let mut n = lock(&self.node);
            n.cloud_content.entry(folder).or_default().waiting =
                Some("waiting for the folder's content key (the owner's device makes it)".into());
            return Ok(());
        };
        let held = {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || folders::held_contents(&dir)).await??
        };
        let mut status = CloudContent::default();
        {
            let mut roots: Vec<ContentHash> = live.iter().map(|(root, _)| *root).collect();
            roots.sort_unstable();
            self.uploads().keep_stored(folder, &roots, Instant::now());
        }
        // Bound: the folder's live contents, one upload each.
        for (root, size) in live {
            let Some(path) = held.get(&(root, size)) else { continue };
            status.files += 1;
            if self.uploads().is_stored(folder, root) {
                status.stored_files += 1;
                continue;
            }
            let reply = self.upload_one(folder, dir, &key, root, size, path).await?;
            status.used = reply.used;
            status.quota = reply.quota;
            match reply.state {
                UploadState::Have => {
                    status.stored_files += 1;
                    self.uploads().stored.insert((folder, root));
                }
                UploadState::OverQuota => {
                    status.over_quota = true;
                    self.uploads().over.insert(folder, Instant::now());
                    break;
                }
                UploadState::P2p => break,
                // Not yet merged at the cloud, an epoch it does not know yet, or left for the
                // next round.
                _ => {}
            }
        }
        let mut n = lock(&self.node);
        let entry = n.cloud_content.entry(folder).or_default();
        if status.quota == 0 {
            (status.used, status.quota) = (entry.used, entry.quota);
        }
        *entry = status;
        Ok(())
    }

    /// Uploads one file's content: asks the cloud what it lacks, sends those groups sealed,
    /// returns the cloud's last word.
    async fn upload_one(
        self: &Arc<Self>,
        folder: FolderId,
        dir: &Path,
        key: &ContentKey,
        root: ContentHash,
        size: u64,
        path: &Path,
    ) -> anyhow::Result<UploadReply> {
        let conn = self.cloud().await?;
        let (mut send, recv) = tokio::time::timeout(Duration::from_secs(10), conn.open_bi())
            .await
            .map_err(|_| anyhow!("the cloud did not open a stream within 10 s"))??;
        let open = Open::Upload { folder, root: root.0, size, epoch: key.epoch };
        frame::write_value(&mut send, &open).await?;
        let mut recv = frame::Reader::new(recv);
        let first: UploadReply =
            tokio::time::timeout(Duration::from_secs(30), recv.read_value(1 << 16, "upload reply"))
                .await
                .map_err(|_| anyhow!("the cloud did not answer an upload within 30 s"))??
                .ok_or_else(|| anyhow!("the cloud closed the upload"))?;
        let UploadState::Need(runs) = &first.state else {
            let _ = send.finish();
            return Ok(first);
        };
        let (dir, path) = (dir.to_path_buf(), path.to_path_buf());
        let outboard = {
            let (dir, path) = (dir.clone(), path.clone());
            tokio::task::spawn_blocking(move || folders::outboard_for(&dir, &path, &root, size)).await??
        };
        let Some((path, outboard)) = outboard else {
            let _ = send.finish();
            bail!("{} changed on disk", path.display());
        };
        let outboard = Arc::new(outboard);
        // Bound: the groups the cloud asked for, sealed a batch at a time off the async threads.
        for (start, end) in runs.clone() {
            let mut at = start;
            while at < end {
                let upto = (at + SEAL_BATCH).min(end);
                let (path, outboard, key) = (path.clone(), outboard.clone(), key.clone());
                let frames = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Vec<u8>>> {
                    let file = std::fs::File::open(&path)?;
                    let mut out = Vec::new();
                    for group in at..upto {
                        let offset = group * GROUP_BYTES;
                        let len = (size.saturating_sub(offset)).min(GROUP_BYTES) as usize;
                        let mut bytes = vec![0u8; len];
                        folders::read_exact_at(&file, &mut bytes, offset)?;
                        let plain = encode_group(&bytes, group, &outboard)
                            .map_err(|_| anyhow!("{} changed on disk", path.display()))?;
                        let mut frame = group.to_le_bytes().to_vec();
                        frame.extend_from_slice(&key.seal_group(&root, group, &plain));
                        out.push(frame);
                    }
                    Ok(out)
                })
                .await??;
                for f in &frames {
                    frame::write(&mut send, f).await?;
                }
                at = upto;
            }
        }
        let _ = send.finish();
        let last: UploadReply =
            tokio::time::timeout(Duration::from_secs(60), recv.read_value(1 << 16, "upload reply"))
                .await
                .map_err(|_| anyhow!("the cloud did not confirm an upload within 60 s"))??
                .ok_or_else(|| anyhow!("the cloud closed the upload before confirming it"))?;
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cloud's word that it holds a content is dropped when the content stops being live in
    /// the folder (the cloud sweeps it; if it comes back it is asked about again), when the folder
    /// stops being `cloud`, and for everything once `STORED_RECHECK` has passed; other folders'
    /// entries are untouched. Before, an entry lived as long as the daemon, so a content swept
    /// after leaving the folder and then written again was never uploaded again.
    #[test]
    fn what_the_cloud_holds_is_asked_again_once_it_may_have_been_swept() {
        let (a, b) = (FolderId([1; 16]), FolderId([2; 16]));
        let (x, y) = (ContentHash([1; 32]), ContentHash([2; 32]));
        let t0 = Instant::now();
        let mut up = Uploads::default();
        up.keep_stored(a, &[x, y], t0);
        for (f, c) in [(a, x), (a, y), (b, x)] {
            up.stored.insert((f, c));
        }
        // y leaves folder a: forgotten there, kept in b.
        up.keep_stored(a, &[x], t0 + Duration::from_secs(1));
        assert!(up.is_stored(a, x) && !up.is_stored(a, y) && up.is_stored(b, x));
        // Before the recheck, what is live stays trusted.
        up.keep_stored(a, &[x, y], t0 + STORED_RECHECK - Duration::from_secs(1));
        assert!(up.is_stored(a, x));
        // At the recheck, everything of a is asked again (and trusted anew from then on).
        up.keep_stored(a, &[x, y], t0 + STORED_RECHECK);
        assert!(!up.is_stored(a, x) && up.is_stored(b, x));
        up.stored.insert((a, x));
        up.keep_stored(a, &[x], t0 + STORED_RECHECK + Duration::from_secs(1));
        assert!(up.is_stored(a, x));
        // The folder turned p2p: nothing of it is trusted.
        up.keep_stored(b, &[], t0 + Duration::from_secs(2));
        assert!(!up.is_stored(b, x));
    }
}

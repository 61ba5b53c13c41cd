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

/// What the upload side keeps between rounds.
#[derive(Debug, Default)]
pub struct Uploads {
    /// Contents the cloud said it holds whole, per folder.
    stored: BTreeSet<(FolderId, ContentHash)>,
    /// Folders running an upload now.
    running: BTreeSet<FolderId>,
    /// Folders past quota, and since when.
    over: std::collections::BTreeMap<FolderId, Instant>,
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
        // Bound: the folder's live contents, one upload each.
        for (root, size) in live {
            let Some(path) = held.get(&(root, size)) else { continue };
            status.files += 1;
            if self.uploads().stored.contains(&(folder, root)) {
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

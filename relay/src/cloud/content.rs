//! The cloud's side of Live Folders: it keeps the content of `cloud` folders' files, sealed by
//! the devices with the folder's content key (it never holds the key), within each user's quota,
//! and serves it to the folder's readers when no device that has a file is on.
//!
//! Upload (`Open::Upload`): the cloud checks that the device may read the folder, that the
//! folder is `cloud`, that the key epoch exists and that a live file of the folder has that
//! content (`engine::folder::LiveRoots`, kept from the replica's change log), then asks for the
//! groups it lacks; what the device sends is stored in batches as it comes, so an interrupted
//! upload resumes where it stopped. The quota counts the sealed bytes each folder owner's user
//! keeps; a sweep drops content no live file has any more when a user reaches it (at most once a
//! minute per user). The cloud cannot check sealed groups: a member that uploads garbage only
//! hurts its own folder, and readers verify every group (AEAD, then bao) and route around it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::control::{ContentReply, UploadReply, UploadState, UPLOAD_RUNS_MAX};
use engine::directory::{FolderId, Storage, UserId};
use engine::folder::blob::groups_of;
use engine::folder::fetch::GROUP_BYTES;
use engine::folder::keys::SEAL_OVERHEAD;
use engine::folder::{ContentHash, LiveRoots};
use engine::signing::DeviceId;
use iroh::endpoint::{RecvStream, SendStream};
use transport::frame;
use transport::store::{ObjectRecord, PutGroups};

use super::Cloud;

/// Most groups one content request may ask of the cloud (4 MiB).
pub const GROUPS_PER_REQUEST_MAX: u64 = 256;
/// Groups stored per transaction while an upload streams in (1 MiB).
pub const UPLOAD_BATCH_GROUPS: usize = 64;
/// Largest sealed frame: the group index, a group, the parent hashes from the root down (at
/// most 64 levels of 64 bytes) and the tag.
pub const SEALED_FRAME_MAX: usize = 8 + GROUP_BYTES as usize + 64 * 64 + SEAL_OVERHEAD;
/// Least time between two sweeps of one user's content.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What the content side keeps in memory.
#[derive(Debug, Default)]
pub struct ContentState {
    /// Per folder, the contents its live files have (caught up on each check).
    live: BTreeMap<FolderId, LiveRoots>,
    /// When each user's content was last swept.
    swept: BTreeMap<UserId, Instant>,
}

/// Why the cloud does not take or give content, as the device hears it.
enum Check {
    Ok { owner: UserId, storage: Storage },
    NotAllowed,
}

impl Cloud {
    fn content_lock(&self) -> std::sync::MutexGuard<'_, ContentState> {
        self.content.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `device` may read `folder` (an active device of its owner or an active member).
    fn check_reader(&self, device: &DeviceId, folder: &FolderId) -> Check {
        let st = self.lock();
        let state = st.dir().state();
        match state.folders.get(folder) {
            Some(f) if f.readers(state).contains(device) => Check::Ok { owner: f.owner, storage: f.storage },
            _ => Check::NotAllowed,
        }
    }

    /// Whether a live file of `folder` has this content (catching the index up first).
    fn is_live(&self, folder: &FolderId, root: &ContentHash, size: u64) -> bool {
        let st = self.lock();
        let Some(replica) = st.replica(folder) else { return false };
        let mut content = self.content_lock();
        let live = content.live.entry(*folder).or_default();
        live.update(replica);
        live.contains(root, size)
    }

    fn usage_of(&self, user: &UserId) -> u64 {
        self.store.content_usage(&user.0).unwrap_or(u64::MAX)
    }

    fn reply(&self, owner: &UserId, state: UploadState) -> UploadReply {
        UploadReply { state, used: self.usage_of(owner), quota: self.limits.content_quota_bytes_per_user }
    }

    /// Drops the content of `user`'s folders that no live file has any more (and everything of
    /// folders that became `p2p`), unless that was done less than [`SWEEP_EVERY`] ago. Returns
    /// the bytes given back.
    fn sweep(&self, user: &UserId) -> u64 {
        {
            let mut content = self.content_lock();
            if content.swept.get(user).is_some_and(|t| t.elapsed() < SWEEP_EVERY) {
                return 0;
            }
            content.swept.insert(*user, Instant::now());
        }
        let Ok(objects) = self.store.objects() else { return 0 };
        let mut dead = Vec::new();
        // Bound: the objects stored (each was a live file's content when it was stored).
        for (folder, root, record) in objects.into_iter().filter(|(_, _, r)| r.user == user.0) {
            let p2p = {
                let st = self.lock();
                st.dir().folder(&folder).is_none_or(|f| f.storage == Storage::P2p)
            };
            if p2p || !self.is_live(&folder, &ContentHash(root), record.size) {
                dead.push((folder, root, record.bytes));
            }
        }
        let mut freed = 0;
        for (folder, root, bytes) in dead {
            if self.store.delete_object(&folder, &root).is_ok() {
                freed += bytes;
            }
        }
        if freed > 0 {
            tracing::info!(user = %user, freed, "swept content no live file has");
        }
        freed
    }

    /// Answers `Open::Content` from the cloud's copy: sealed frames, or why not.
    pub(super) async fn serve_content(
        self: &Arc<Self>,
        device: DeviceId,
        folder: FolderId,
        root: ContentHash,
        size: u64,
        groups: Range<u64>,
        mut send: SendStream,
    ) -> anyhow::Result<()> {
        let asked =
            engine::folder::blob::asked_groups(groups.start, groups.end, size, GROUPS_PER_REQUEST_MAX);
        let reply = match (self.check_reader(&device, &folder), asked) {
            (Check::NotAllowed, _) => Err(ContentReply::NotAllowed),
            (Check::Ok { storage: Storage::P2p, .. }, _) => Err(ContentReply::NotHeld),
            (Check::Ok { .. }, Err(engine::folder::blob::AskError::TooMany)) => Err(ContentReply::TooLarge),
            (Check::Ok { .. }, Err(engine::folder::blob::AskError::OutOfFile)) => Err(ContentReply::NotHeld),
            (Check::Ok { .. }, Ok(_)) => Ok(()),
        };
        let found = match reply {
            Err(r) => Err(r),
            Ok(()) => {
                let me = self.clone();
                tokio::task::spawn_blocking(move || -> Result<(u32, Vec<Vec<u8>>), ContentReply> {
                    let record =
                        me.store.object(&folder, &root.0).ok().flatten().ok_or(ContentReply::NotHeld)?;
                    if record.size != size {
                        return Err(ContentReply::NotHeld);
                    }
                    let frames = me.store.get_groups(&folder, &root.0, groups).ok().flatten();
                    Ok((record.epoch, frames.ok_or(ContentReply::NotHeld)?))
                })
                .await?
            }
        };
        match found {
            Err(r) => frame::write_value(&mut send, &r).await?,
            Ok((epoch, frames)) => {
                frame::write_value(&mut send, &ContentReply::Sealed { epoch }).await?;
                for f in &frames {
                    frame::write(&mut send, f).await?;
                }
                self.metrics.content_groups_served.inc_by(frames.len() as u64);
            }
        }
        let _ = send.finish();
        Ok(())
    }

    /// Takes an upload (`Open::Upload`): see the module's doc.
    #[allow(clippy::too_many_arguments)] // one request's fields
    pub(super) async fn serve_upload(
        self: &Arc<Self>,
        device: DeviceId,
        folder: FolderId,
        root: ContentHash,
        size: u64,
        epoch: u32,
        mut send: SendStream,
        mut recv: frame::Reader<RecvStream>,
    ) -> anyhow::Result<()> {
        let quota = self.limits.content_quota_bytes_per_user;
        let owner = match self.check_reader(&device, &folder) {
            Check::NotAllowed => {
                let refused = UploadReply { state: UploadState::NotAllowed, used: 0, quota };
                frame::write_value(&mut send, &refused).await?;
                let _ = send.finish();
                return Ok(());
            }
            Check::Ok { owner, storage } => {
                let early = if storage == Storage::P2p {
                    Some(UploadState::P2p)
                } else if !self.lock().dir().folder(&folder).is_some_and(|f| f.keys.contains_key(&epoch)) {
                    Some(UploadState::NotAllowed)
                } else if !self.is_live(&folder, &root, size) {
                    Some(UploadState::NotInFolder)
                } else {
                    None
                };
                if let Some(state) = early {
                    frame::write_value(&mut send, &self.reply(&owner, state)).await?;
                    let _ = send.finish();
                    return Ok(());
                }
                owner
            }
        };
        let total = groups_of(size);
        let missing = |me: &Cloud| -> anyhow::Result<Vec<Range<u64>>> {
            let same_epoch = me.store.object(&folder, &root.0)?.is_some_and(|r| r.epoch == epoch);
            let stored = if same_epoch { me.store.stored_runs(&folder, &root.0)? } else { Vec::new() };
            Ok(complement(&stored, total))
        };
        let need = missing(self)?;
        if need.is_empty() {
            frame::write_value(&mut send, &self.reply(&owner, UploadState::Have)).await?;
            let _ = send.finish();
            return Ok(());
        }
        let need_bytes: u64 = need.iter().map(|r| bytes_of(r, size)).sum();
        if self.usage_of(&owner).saturating_add(need_bytes) > quota
            && (self.sweep(&owner) == 0 || self.usage_of(&owner).saturating_add(need_bytes) > quota)
        {
            frame::write_value(&mut send, &self.reply(&owner, UploadState::OverQuota)).await?;
            let _ = send.finish();
            return Ok(());
        }
        let runs: Vec<(u64, u64)> = need.iter().take(UPLOAD_RUNS_MAX).map(|r| (r.start, r.end)).collect();
        let asked: Vec<Range<u64>> = runs.iter().map(|(a, b)| *a..*b).collect();
        frame::write_value(&mut send, &self.reply(&owner, UploadState::Need(runs))).await?;
        let fresh = ObjectRecord { user: owner.0, size, epoch, groups: 0, bytes: 0 };
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut over = false;
        let asked_groups: u64 = asked.iter().map(|r| r.end - r.start).sum();
        // Bound: one frame per group asked for; a frame outside them ends the upload.
        for _ in 0..asked_groups {
            let frame = match recv.read(SEALED_FRAME_MAX).await {
                Ok(Some(f)) => f,
                _ => break,
            };
            let Some((index, sealed)) = frame.split_first_chunk::<8>() else { break };
            let group = u64::from_le_bytes(*index);
            if !asked.iter().any(|r| r.contains(&group)) {
                break;
            }
            batch.push((group, sealed.to_vec()));
            if batch.len() >= UPLOAD_BATCH_GROUPS
                && !self.store_batch(&folder, &root, &fresh, std::mem::take(&mut batch), quota).await?
            {
                over = true;
                break;
            }
        }
        if !batch.is_empty() && !over {
            over = !self.store_batch(&folder, &root, &fresh, batch, quota).await?;
        }
        let left = missing(self)?;
        let state = if over {
            UploadState::OverQuota
        } else if left.is_empty() {
            UploadState::Have
        } else {
            UploadState::Need(left.iter().take(UPLOAD_RUNS_MAX).map(|r| (r.start, r.end)).collect())
        };
        frame::write_value(&mut send, &self.reply(&owner, state)).await?;
        let _ = send.finish();
        Ok(())
    }

    /// Stores one batch off the async threads; false when it would pass the quota.
    async fn store_batch(
        self: &Arc<Self>,
        folder: &FolderId,
        root: &ContentHash,
        fresh: &ObjectRecord,
        batch: Vec<(u64, Vec<u8>)>,
        quota: u64,
    ) -> anyhow::Result<bool> {
        let (me, folder, root, fresh) = (self.clone(), *folder, *root, fresh.clone());
        let n = batch.len() as u64;
        let put =
            tokio::task::spawn_blocking(move || me.store.put_groups(&folder, &root.0, &fresh, &batch, quota))
                .await??;
        match put {
            PutGroups::Stored { .. } => {
                self.metrics.content_groups_stored.inc_by(n);
                Ok(true)
            }
            PutGroups::OverQuota { .. } => Ok(false),
        }
    }
}

/// Bytes of a file of `size` in `groups`.
fn bytes_of(groups: &Range<u64>, size: u64) -> u64 {
    let start = (groups.start * GROUP_BYTES).min(size);
    let end = (groups.end * GROUP_BYTES).min(size);
    end - start
}

/// The groups of `0..total` not in `have` (sorted, disjoint).
fn complement(have: &[Range<u64>], total: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in have {
        if r.start > at {
            out.push(at..r.start.min(total));
        }
        at = at.max(r.end);
    }
    if at < total {
        out.push(at..total);
    }
    out.retain(|r| r.start < r.end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complement_lists_what_is_missing() {
        assert_eq!(complement(&[], 3), vec![0..3]);
        assert_eq!(complement(&[0..3, 3..3], 3), Vec::<Range<u64>>::new());
        assert_eq!(complement(&[1..2, 4..5], 6), vec![0..1, 2..4, 5..6]);
        assert_eq!(bytes_of(&(0..2), GROUP_BYTES + 10), GROUP_BYTES + 10);
    }
}

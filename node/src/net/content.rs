//! File content between devices (Live Folders): serving chunk groups of files a mapped folder
//! holds, and fetching the ones a pass is waiting for, with the device's content scheduler
//! choosing the peers (`engine::device::Device::want_content`, the same state machine the
//! simulator drives) and bao verifying every group before it is written
//! (`engine::folder::blob`). One QUIC stream per request: `Open::Content`, then a
//! `ContentReply`, then the bao response in frames.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::anyhow;
use engine::control::ContentReply;
use engine::directory::FolderId;
use engine::folder::blob::{asked_groups, encode_group, encode_group_unchecked, AskError, Decoder, Groups};
use engine::folder::fetch::{Command, Event, Failure, RequestId, Route, Waiting, GROUP_BYTES};
use engine::folder::{ContentHash, FileEntry};
use engine::signing::DeviceId;
use iroh::endpoint::SendStream;
use tokio::sync::mpsc;
use transport::{frame, Open};

use super::{lock, Net};
use crate::folders;

/// Largest file this version serves (read whole to answer).
pub const SERVE_BYTES_MAX: u64 = 1 << 30;
/// Test hook: `FEEDMESH_TEST_SERVE_DELAY_US` slows serving by that much per group, so a test can
/// kill a device in the middle of a transfer. Read once; unset in normal use.
fn serve_delay() -> Duration {
    static DELAY: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let us = std::env::var("FEEDMESH_TEST_SERVE_DELAY_US").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        Duration::from_micros(us)
    })
}

/// Test hook: `FEEDMESH_TEST_SERVE_CORRUPT=1` makes this device serve every group with one
/// byte changed (a hostile peer, for the end-to-end tests). Read once; unset in normal use.
fn serve_corrupt() -> bool {
    static CORRUPT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CORRUPT.get_or_init(|| std::env::var("FEEDMESH_TEST_SERVE_CORRUPT").is_ok_and(|v| v == "1"))
}

/// What a mapped directory holds whole, the base's modification time it was built at, and when
/// it was built (each file in it was checked against the base then).
pub(super) type Held =
    (Option<std::time::SystemTime>, SystemTime, Arc<BTreeMap<(ContentHash, u64), PathBuf>>);

/// A file served with its outboard, and when it was last checked against the base (or, for
/// fetched objects and the trash, found).
type Source = (PathBuf, Arc<engine::folder::Outboard>, SystemTime);

/// Modification times closer than this to the moment a file was checked are not trusted to
/// prove it unchanged since (file systems with coarse timestamps).
const MTIME_SLACK: Duration = Duration::from_secs(2);

/// Large files whose outboards are kept in memory while they are served.
pub const OUTBOARDS_KEPT: usize = 16;

/// Outboards of large files being served, each read or computed once for all the requests.
pub(super) type Outboards = BTreeMap<(ContentHash, u64), Arc<tokio::sync::OnceCell<Option<Source>>>>;

/// Requests in flight to one source at once.
pub const REQUESTS_PER_SOURCE: u32 = 32;

/// Groups in flight to one source at once (4 MiB): a large file goes as a few long requests, not
/// 32 streams sharing the sender's window.
pub const GROUPS_PER_SOURCE: u64 = 256;

/// The device's content scheduler: many requests in flight per source (on a real link, unlike
/// the simulator's, a request costs a stream and a round trip, and small files are a request
/// each), and a starting point in each file drawn from the device's id.
pub fn fetch_config(me: &DeviceId) -> engine::folder::fetch::FetchConfig {
    let spread = u64::from_le_bytes(me.0[..8].try_into().unwrap_or([0; 8]));
    engine::folder::fetch::FetchConfig {
        spread,
        requests_per_source_max: REQUESTS_PER_SOURCE,
        groups_per_source_max: GROUPS_PER_SOURCE,
        ..Default::default()
    }
}

/// Most pieces (verified groups, ends) the fetch loop takes from its channel in one turn.
const PIECES_PER_TURN: usize = 64;

/// Most groups one request may ask for (4 MiB).
pub const GROUPS_PER_REQUEST_MAX: u64 = 256;

/// What a request brings, as it comes: each verified group, then its end.
enum Piece {
    Group { id: RequestId, root: ContentHash, group: u64, bytes: bytes::Bytes },
    End { id: RequestId, failure: Option<Failure> },
}

impl Net {
    /// Answers a peer's `Open::Content`: checks it may sync the folder with this device and that
    /// a live file of the folder has that content, then sends the groups from the mapped
    /// directory (or the fetched objects and the trash).
    pub(super) async fn serve_content(
        self: &Arc<Self>,
        peer: DeviceId,
        folder: FolderId,
        root: ContentHash,
        size: u64,
        groups: Range<u64>,
        mut send: SendStream,
    ) -> anyhow::Result<()> {
        let checked = {
            let n = lock(&self.node);
            if n.dir().may_sync(&folder, &n.id, &peer).is_err() {
                Err(ContentReply::NotAllowed)
            } else if !n.replica(&folder).is_some_and(|r| self.is_live(folder, r, &root, size)) {
                Err(ContentReply::NotInFolder)
            } else if size > SERVE_BYTES_MAX {
                Err(ContentReply::TooLarge)
            } else {
                Ok(n.dir_path.clone())
            }
        };
        let data_dir = match checked {
            Ok(d) => d,
            Err(reply) => return refuse(send, reply).await,
        };
        let Some(dir) = folders::Mappings::load(&data_dir)?.dir_of(&folder).map(Path::to_path_buf) else {
            return refuse(send, ContentReply::NotHeld).await;
        };
        let groups = match asked_groups(groups.start, groups.end, size, GROUPS_PER_REQUEST_MAX) {
            Ok(groups) => groups,
            Err(AskError::TooMany) => return refuse(send, ContentReply::TooLarge).await,
            Err(AskError::OutOfFile) => return refuse(send, ContentReply::NotHeld).await,
        };
        // Each group encoded from its own bytes (read at its offset) and the file's outboard
        // (computed once, kept in .feedmesh/outboards): a frame per group, so the asking device
        // verifies and keeps each as it comes.
        let held = self.held_path(&dir, &root, size);
        let Some((path, outboard, checked)) = self.source_of(&dir, held, root, size).await? else {
            return refuse(send, ContentReply::NotHeld).await;
        };
        let frames = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Vec<Vec<u8>>>> {
            let file = std::fs::File::open(&path)?;
            let stamp = |f: &std::fs::File| f.metadata().map(|m| (m.len(), m.modified().ok()));
            let before = stamp(&file)?;
            // One read for the request's groups (at most GROUPS_PER_REQUEST_MAX of them, checked
            // above), then a frame per group from its slice. Not zeroed first: read_to_end
            // fills spare capacity.
            let from = (groups.start * GROUP_BYTES).min(size);
            let to = (groups.end * GROUP_BYTES).min(size);
            let mut bytes = Vec::with_capacity((to - from) as usize);
            {
                use std::io::{Read, Seek};
                let mut reader = &file;
                reader.seek(std::io::SeekFrom::Start(from))?;
                reader.take(to - from).read_to_end(&mut bytes)?;
            }
            if bytes.len() as u64 != to - from {
                return Ok(None); // Shorter on disk: changed, not held any more.
            }
            // Unchanged since it was checked against the base (same size and modification
            // time before and after this read, and that time older than the check): its bytes
            // are the outboard's and need not be hashed again here (the asking device verifies
            // every group anyway). Otherwise each group is checked as it is encoded.
            let unchanged = before.0 == size
                && stamp(&file)? == before
                && before.1.is_some_and(|m| m + MTIME_SLACK <= checked);
            let mut frames = Vec::with_capacity((groups.end - groups.start) as usize);
            for (group, chunk) in groups.zip(bytes.chunks(GROUP_BYTES as usize)) {
                let encoded = if unchanged {
                    encode_group_unchecked(chunk, group, &outboard)
                } else {
                    encode_group(chunk, group, &outboard)
                };
                match encoded {
                    Ok(frame) => frames.push(frame),
                    Err(_) => return Ok(None), // Changed on disk: not held any more.
                }
            }
            Ok(Some(frames))
        })
        .await??;
        let Some(frames) = frames else {
            // Changed on disk: what is kept of it is stale.
            self.outboards.lock().unwrap_or_else(|p| p.into_inner()).remove(&(root, size));
            return refuse(send, ContentReply::NotHeld).await;
        };
        frame::write_value(&mut send, &ContentReply::Ok).await?;
        if serve_delay().is_zero() && !serve_corrupt() {
            frame::write_frames(&mut send, frames).await?;
            let _ = send.finish();
            return Ok(());
        }
        for f in &frames {
            if !serve_delay().is_zero() {
                tokio::time::sleep(serve_delay()).await;
            }
            if serve_corrupt() {
                let mut bad = f.clone();
                if let Some(last) = bad.last_mut() {
                    *last ^= 0x20;
                }
                frame::write(&mut send, &bad).await?;
                continue;
            }
            frame::write(&mut send, f).await?;
        }
        let _ = send.finish();
        Ok(())
    }

    /// Asks `peer` for `groups` of `root` and sends each group to `out` as soon as it verified;
    /// the last message says why the request ended early, if it did.
    #[allow(clippy::too_many_arguments)] // one request's fields, passed into its task
    async fn fetch_groups(
        self: Arc<Self>,
        id: RequestId,
        peer: DeviceId,
        folder: FolderId,
        root: ContentHash,
        size: u64,
        groups: Range<u64>,
        out: mpsc::Sender<Piece>,
    ) {
        let failure = async {
            let from_cloud = peer == self.cloud_id;
            let conn = if from_cloud { self.cloud().await } else { self.peer(peer).await };
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(peer = %engine::signing::hex(&peer.0[..4]), error = %format!("{e:#}"), "content: no connection");
                    return Some(Failure::Closed);
                }
            };
            // A connection to a device that went away can hang until its idle timeout: bounded,
            // and dropped from the cache so the next request dials its current address.
            let opened = tokio::time::timeout(Duration::from_secs(5), conn.open_bi()).await;
            let Ok(Ok((mut send, recv))) = opened else {
                self.peers.lock().await.remove(&peer);
                return Some(Failure::Closed);
            };
            let open = Open::Content { folder, root: root.0, size, start: groups.start, end: groups.end };
            if frame::write_value(&mut send, &open).await.is_err() {
                return Some(Failure::Closed);
            }
            let _ = send.finish();
            let mut recv = frame::Reader::new(recv);
            let reply = tokio::time::timeout(Duration::from_secs(10), recv.read_value::<ContentReply>(1024, "content reply")).await;
            let mut key = None;
            match reply {
                Ok(Ok(Some(ContentReply::Ok))) if !from_cloud => {}
                Ok(Ok(Some(ContentReply::Sealed { epoch }))) if from_cloud => {
                    let n = lock(&self.node);
                    match engine::folder::ring_of(n.dir().state(), &folder, &n.key).epoch(epoch) {
                        Ok(k) => key = Some(k.clone()),
                        // A key this device was not given: the cloud's copy is of no use to it.
                        Err(_) => return Some(Failure::NotHeld),
                    }
                }
                Ok(Ok(Some(ContentReply::Busy))) => return Some(Failure::Closed),
                Ok(Ok(Some(ContentReply::NotAllowed))) => return Some(Failure::Refused),
                Ok(Ok(Some(_))) => return Some(Failure::NotHeld),
                other => {
                    tracing::debug!(peer = %engine::signing::hex(&peer.0[..4]), reply = ?other.map(|r| r.map_err(|e| e.to_string())), "content: no reply");
                    self.peers.lock().await.remove(&peer);
                    return Some(Failure::Closed);
                }
            }
            // Bound: one frame per group asked for, each one group and the parents proving it.
            for group in groups.clone() {
                let bound = GROUP_BYTES as usize + 64 * 64 + engine::folder::keys::SEAL_OVERHEAD;
                let frame = match recv.read(bound).await {
                    Ok(Some(frame)) => frame,
                    _ => return Some(Failure::Closed),
                };
                // The cloud's copy: opened with the folder's key first (it proves a member sealed
                // this group for this file and place), then verified like any peer's.
                let frame = match &key {
                    None => frame,
                    Some(k) => match k.open_group(&root, group, &frame) {
                        Ok(plain) => bytes::BytesMut::from(&plain[..]),
                        Err(_) => return Some(Failure::Corrupt),
                    },
                };
                let Ok(wanted) = Groups::new(group..group + 1, size) else { return Some(Failure::NotHeld) };
                let verified = Decoder::new(root, &wanted, &frame[..]).next();
                match verified {
                    Some(Ok((g, bytes))) if g == group => {
                        if out.send(Piece::Group { id, root, group, bytes }).await.is_err() {
                            return None;
                        }
                    }
                    Some(Err(engine::folder::BlobError::Truncated { .. })) | None => {
                        return Some(Failure::Closed)
                    }
                    _ => return Some(Failure::Corrupt),
                }
            }
            None
        }
        .await;
        let _ = out.send(Piece::End { id, failure }).await;
    }

    /// [`Net::fetch_waiting`] in a task of its own, then a pass to place what came; nothing when
    /// one is running for the folder already.
    pub(super) fn fetch_in_background(
        self: Arc<Self>,
        folder: FolderId,
        dir: PathBuf,
        wants: Vec<FileEntry>,
    ) {
        if self.fetching.lock().unwrap_or_else(|p| p.into_inner()).contains(&folder) {
            return;
        }
        tokio::spawn(async move {
            if self.fetch_waiting(folder, dir.clone(), wants, Duration::from_secs(60)).await > 0 {
                let node = self.node.clone();
                let _ = tokio::task::spawn_blocking(move || folders::pass(&node, &folder, &dir)).await;
                self.wake.notify_one();
            }
        });
    }

    /// Fetches the content of `wants` (files a pass of `dir` is waiting for) from the devices
    /// that map `folder`, resuming partial files, until every one is whole, nothing more can be
    /// done now, or `within` has passed. Returns how many files became whole.
    pub async fn fetch_waiting(
        self: &Arc<Self>,
        folder: FolderId,
        dir: PathBuf,
        wants: Vec<FileEntry>,
        within: Duration,
    ) -> usize {
        if wants.is_empty() {
            return 0;
        }
        // One fetch per folder at a time (the daemon's and a `folder scan`'s would write the same
        // partial files).
        if !self.fetching.lock().unwrap_or_else(|p| p.into_inner()).insert(folder) {
            return 0;
        }
        // However this ends (or is dropped), the folder's scheduler ends with it: its requests
        // die with this task.
        struct Done<'a>(&'a Net, FolderId);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                lock(&self.0.node).device.end_content(self.1);
                self.0.fetching.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
            }
        }
        let _done = Done(self, folder);
        let (mut holders, cloud) = {
            let n = lock(&self.node);
            let f = n.dir().folder(&folder);
            (
                n.device.content_holders(&folder),
                f.is_some_and(|f| f.storage == engine::directory::Storage::Cloud),
            )
        };
        // A `cloud` folder's content may also be at the cloud: the last route, asked when no
        // device that has a file answers (or none is on).
        if cloud {
            holders.push(self.cloud_id);
        }
        // Where the folder's devices are now (a device that restarted listens elsewhere).
        let _ = self.request(transport::Request::Peers { folder }).await;
        let started = Instant::now();
        let now = || self.now_us();
        {
            let mut n = lock(&self.node);
            for holder in &holders {
                let route = if *holder == self.cloud_id { Route::Cloud } else { Route::Direct };
                let _ = n.device.handle_content_route(now(), folder, *holder, Some(route));
            }
        }
        let mut sizes: BTreeMap<ContentHash, u64> = BTreeMap::new();
        // The scheduler holds at most FETCHES_MAX files: the rest wait here and go in as
        // files finish, so one fetch runs through any number of files without a pause.
        let mut queue: std::collections::VecDeque<&FileEntry> = wants.iter().collect();
        let mut top_up = |sizes: &mut BTreeMap<ContentHash, u64>| {
            // Bound: the queue, each entry taken once (or put back once when the scheduler is
            // full, which ends the turn).
            while sizes.len() < engine::folder::fetch::FETCHES_MAX {
                let Some(want) = queue.pop_front() else { break };
                let have = folders::partial_have(&dir, &want.root, want.size);
                let wanted = lock(&self.node).device.want_content(
                    now(),
                    folder,
                    want.root,
                    want.size,
                    &have,
                    &holders,
                );
                match wanted {
                    Ok(()) => {
                        sizes.insert(want.root, want.size);
                    }
                    Err(engine::folder::FetchError::Full) => {
                        queue.push_front(want);
                        break;
                    }
                    Err(_) => {}
                }
            }
            !queue.is_empty()
        };
        let mut queued = top_up(&mut sizes);
        let paths: BTreeMap<ContentHash, String> =
            wants.iter().map(|w| (w.root, w.path.to_string())).collect();
        let (tx, mut rx) = mpsc::channel::<Piece>(256);
        let mut batch: Vec<Piece> = Vec::with_capacity(PIECES_PER_TURN);
        let mut running: BTreeMap<RequestId, tokio::task::JoinHandle<()>> = BTreeMap::new();
        // Partial files open for writing, by content (closed when whole).
        let mut open: BTreeMap<ContentHash, folders::Partial> = BTreeMap::new();
        let mut done = 0;
        let mut finishing: Vec<tokio::task::JoinHandle<anyhow::Result<()>>> = Vec::new();
        let (mut shown, mut fetched) = (started, 0u64);
        // Bound: `within` of wall time; every turn handles a piece, a timer or ends.
        loop {
            let (commands, events, idle, deadline) = {
                let mut n = lock(&self.node);
                let commands: Vec<Command<DeviceId>> =
                    std::iter::from_fn(|| n.device.poll_content(folder)).collect();
                let events: Vec<Event<DeviceId>> =
                    std::iter::from_fn(|| n.device.poll_content_event(folder)).collect();
                let idle = n.device.content(folder).is_none_or(|f| f.wanted().next().is_none());
                (commands, events, idle, n.device.content_timeout(folder))
            };
            for command in commands {
                match command {
                    Command::Request(r) => {
                        let (me, tx) = (self.clone(), tx.clone());
                        let size = sizes.get(&r.hash).copied().unwrap_or(0);
                        let task =
                            tokio::spawn(me.fetch_groups(r.id, r.peer, folder, r.hash, size, r.groups, tx));
                        running.insert(r.id, task);
                    }
                    Command::Cancel(id) => {
                        if let Some(task) = running.remove(&id) {
                            task.abort();
                        }
                    }
                }
            }
            for event in events {
                if let Event::Done { hash } = event {
                    open.remove(&hash);
                    // Invariant: every file wanted has its size here until it is done.
                    let Some(size) = sizes.remove(&hash) else { continue };
                    // Its log cut off and moved off this loop, many at once.
                    let dir = dir.clone();
                    finishing.push(tokio::task::spawn_blocking(move || {
                        folders::finish_partial(&dir, &hash, size)
                    }));
                }
            }
            if queued {
                queued = top_up(&mut sizes);
            }
            // What `status` shows, at most every 200 ms (and at the end): not per group.
            let finished = (idle && !queued) || started.elapsed() >= within;
            if finished || shown.elapsed() >= Duration::from_millis(200) {
                self.show_progress(folder, &paths);
                lock(&self.node).groups_fetched += std::mem::take(&mut fetched);
                shown = Instant::now();
            }
            if finished {
                break;
            }
            // Nothing in flight and nothing to wait for soon (no holder, or every one backing
            // off): the next round tries again, and `status` says why meanwhile.
            if running.is_empty() && deadline.is_none_or(|t| t.saturating_sub(now()) > 3_000_000) {
                break;
            }
            let wait = deadline.map_or(within, |t| Duration::from_micros(t.saturating_sub(now())));
            tokio::select! {
                // What has come, up to PIECES_PER_TURN pieces: written, logged, and told to the
                // scheduler a run of groups at a time (not a lock and a scheduling per group).
                got = rx.recv_many(&mut batch, PIECES_PER_TURN) => {
                    if got == 0 {
                        break;
                    }
                    // Per request, the groups written (consecutive ones merged) or its failure.
                    let mut runs: Vec<(RequestId, Range<u64>)> = Vec::new();
                    let mut failed: Vec<(RequestId, Failure)> = Vec::new();
                    let mut ended: Vec<RequestId> = Vec::new();
                    let pieces = std::mem::take(&mut batch);
                    // Bound: PIECES_PER_TURN pieces.
                    let mut i = 0;
                    while i < pieces.len() {
                        let Piece::Group { root, .. } = &pieces[i] else {
                            if let Piece::End { id, failure } = &pieces[i] {
                                ended.push(*id);
                                failed.extend(failure.map(|f| (*id, f)));
                            }
                            i += 1;
                            continue;
                        };
                        // The groups of one file that came in a row: written, then logged (a
                        // crash loses at most these, and never logs one not written).
                        let root = *root;
                        let same = pieces[i..]
                            .iter()
                            .take_while(|p| matches!(p, Piece::Group { root: r, .. } if *r == root))
                            .count();
                        let groups: Vec<(RequestId, u64, &[u8])> = pieces[i..i + same]
                            .iter()
                            .filter_map(|p| match p {
                                Piece::Group { id, group, bytes, .. } => Some((*id, *group, &bytes[..])),
                                Piece::End { .. } => None,
                            })
                            .collect();
                        i += same;
                        let written = match open.entry(root) {
                            std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
                            std::collections::btree_map::Entry::Vacant(e) => {
                                // A piece of a file not wanted (any more) is not written.
                                sizes
                                    .get(&root)
                                    .copied()
                                    .ok_or_else(|| anyhow!("a group of a file not being fetched"))
                                    .and_then(|size| folders::Partial::open(&dir, &root, size))
                                    .map(|p| e.insert(p))
                            }
                        }
                        .and_then(|p| {
                            let data: Vec<(u64, &[u8])> = groups.iter().map(|(_, g, b)| (*g, *b)).collect();
                            p.write_groups(&data)
                        });
                        for (id, group, _) in groups {
                            if written.is_err() {
                                failed.push((id, Failure::Closed));
                                continue;
                            }
                            fetched += 1;
                            match runs.last_mut() {
                                Some((last, run)) if *last == id && run.end == group => run.end += 1,
                                _ => runs.push((id, group..group + 1)),
                            }
                        }
                    }
                    batch = pieces;
                    batch.clear();
                    let at = now();
                    let mut n = lock(&self.node);
                    for (id, run) in runs {
                        n.device.handle_content_groups(at, folder, id, run);
                    }
                    for (id, why) in failed {
                        n.device.handle_content_failure(at, folder, id, why);
                    }
                    drop(n);
                    for id in ended {
                        running.remove(&id);
                    }
                },
                // The device's timers (this folder's stalls and back-offs among them).
                _ = tokio::time::sleep(wait) => self.input(|n, now| n.device.handle_timeout(now)),
            }
        }
        for (_, task) in running {
            task.abort();
        }
        for finish in finishing {
            if matches!(finish.await, Ok(Ok(()))) {
                done += 1;
            }
        }
        tracing::info!(%folder, wanted = wants.len(), done, seconds = started.elapsed().as_secs_f64(), "content fetch ended");
        lock(&self.node).groups_fetched += fetched;
        self.show_progress(folder, &paths);
        done
    }
}

impl Net {
    /// Whether a live file of `folder` has this content (the folder's index caught up first).
    pub(super) fn is_live(
        &self,
        folder: FolderId,
        replica: &engine::replica::Replica,
        root: &ContentHash,
        size: u64,
    ) -> bool {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let index = live.entry(folder).or_default();
        index.update(replica);
        index.contains(root, size)
    }

    /// Where the mapped directory `dir` holds `root` whole, from a map rebuilt when its base
    /// changes (so serving many files reads the base once, not once per request).
    fn held_path(&self, dir: &Path, root: &ContentHash, size: u64) -> Option<(PathBuf, SystemTime)> {
        let stamp = std::fs::metadata(dir.join(engine::folder::path::RESERVED_DIR).join("base.json"))
            .and_then(|m| m.modified())
            .ok();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = held.get(dir).is_some_and(|(s, _, _)| *s == stamp && stamp.is_some());
        if !fresh {
            let built = SystemTime::now();
            let map = folders::held_contents(dir).ok()?;
            held.insert(dir.to_path_buf(), (stamp, built, Arc::new(map)));
        }
        held.get(dir).and_then(|(_, built, map)| Some((map.get(&(*root, size))?.clone(), *built)))
    }

    /// Where `root` is read from and its outboard. A large file's outboard is read (or computed)
    /// once and shared by every request for it while it is served ([`OUTBOARDS_KEPT`] files);
    /// a small file's is computed from its bytes.
    async fn source_of(
        &self,
        dir: &Path,
        held: Option<(PathBuf, SystemTime)>,
        root: ContentHash,
        size: u64,
    ) -> anyhow::Result<Option<Source>> {
        let lookup = {
            let dir = dir.to_path_buf();
            move || -> anyhow::Result<Option<Source>> {
                // When the file found was last checked: the held map's build, or now (a lookup
                // in the base checks the file's size and time as it finds it).
                let (found, checked) = match held {
                    Some((path, built)) => (folders::outboard_for(&dir, &path, &root, size)?, built),
                    None => {
                        let now = SystemTime::now();
                        (folders::content_source(&dir, &root, size)?, now)
                    }
                };
                Ok(found.map(|(p, o)| (p, Arc::new(o), checked)))
            }
        };
        if size <= folders::OUTBOARD_CACHE_FROM {
            return tokio::task::spawn_blocking(lookup).await?;
        }
        let cell = {
            let mut kept = self.outboards.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() >= OUTBOARDS_KEPT && !kept.contains_key(&(root, size)) {
                kept.pop_first();
            }
            kept.entry((root, size)).or_default().clone()
        };
        let found =
            cell.get_or_try_init(|| async { tokio::task::spawn_blocking(lookup).await? }).await?.clone();
        if found.is_none() {
            self.outboards.lock().unwrap_or_else(|p| p.into_inner()).remove(&(root, size));
        }
        Ok(found)
    }

    /// What `status` shows of a fetch: per file still needed, the share held, the sources and
    /// their rates, or why nothing is in flight.
    fn show_progress(&self, folder: FolderId, paths: &BTreeMap<ContentHash, String>) {
        let now = self.now_us();
        let mut guard = lock(&self.node);
        let n = &mut *guard;
        let Some(fetcher) = n.device.content(folder) else {
            n.needs.remove(&folder);
            return;
        };
        let needs: Vec<folders::FileNeed> = fetcher
            .wanted()
            .filter_map(|hash| {
                let p = fetcher.progress(now, hash)?;
                let waiting = p.waiting.map(|w| match w {
                    Waiting::NoHolder => {
                        "no device that has it is known (or those that said so did not)".to_string()
                    }
                    Waiting::Unreachable => "the devices that have it are not reachable now".to_string(),
                    Waiting::BackingOff { until } => format!(
                        "its sources stalled or refused; trying again in {} s",
                        until.saturating_sub(now).div_ceil(1_000_000)
                    ),
                    Waiting::Policy => "only routes the policy excludes reach its holders".to_string(),
                    Waiting::Busy => "its sources are busy with other files".to_string(),
                });
                let sources = p
                    .sources
                    .iter()
                    .map(|(d, route, rate)| {
                        let name = if *d == self.cloud_id {
                            "cloud".to_string()
                        } else {
                            engine::signing::hex(&d.0[..4])
                        };
                        (name, format!("{route:?}").to_lowercase(), *rate)
                    })
                    .collect();
                Some(folders::FileNeed {
                    path: paths.get(hash).cloned().unwrap_or_else(|| hash.to_hex()),
                    size: p.size,
                    have_bytes: p.have_bytes,
                    sources,
                    waiting,
                })
            })
            .collect();
        if needs.is_empty() {
            n.needs.remove(&folder);
        } else {
            n.needs.insert(folder, needs);
        }
    }
}

async fn refuse(mut send: SendStream, reply: ContentReply) -> anyhow::Result<()> {
    frame::write_value(&mut send, &reply).await.map_err(|e| anyhow!("{e}"))?;
    let _ = send.finish();
    Ok(())
}

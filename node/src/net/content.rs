//! File content between devices (Live Folders): serving chunk groups of files a mapped folder
//! holds, and fetching the ones a pass is waiting for, with the engine's scheduler choosing the
//! peers (`engine::folder::Fetcher`) and bao verifying every group before it is written
//! (`engine::folder::blob`). One QUIC stream per request: `Open::Content`, then a
//! `ContentReply`, then the bao response in frames.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use engine::control::ContentReply;
use engine::directory::FolderId;
use engine::folder::blob::{encode, Decoder, Groups, Outboard};
use engine::folder::fetch::{
    Command, Event, Failure, FetchConfig, Fetcher, RequestId, Route, Waiting, GROUP_BYTES,
};
use engine::folder::{ContentHash, FileEntry};
use engine::signing::DeviceId;
use iroh::endpoint::SendStream;
use tokio::sync::mpsc;
use transport::{frame, Open, FRAME_MAX};

use super::{lock, Net};
use crate::folders;

/// Largest file this version serves (read whole to answer).
pub const SERVE_BYTES_MAX: u64 = 1 << 30;
/// Frames of a response are at most this long.
const CHUNK: usize = 256 << 10;

/// What one request brought: verified groups, and why it ended early.
struct Fetched {
    id: RequestId,
    root: ContentHash,
    groups: Vec<(u64, bytes::Bytes)>,
    failure: Option<Failure>,
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
            } else if !n.replica(&folder).is_some_and(|r| {
                r.items().any(|i| {
                    std::iter::once(&i.version)
                        .chain(i.conflicts.iter())
                        .filter(|v| !v.deleted)
                        .any(|v| FileEntry::from_version(v).is_ok_and(|e| e.root == root && e.size == size))
                })
            }) {
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
        let response = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Vec<u8>>> {
            let Some(data) = folders::read_content(&dir, &root, size)? else { return Ok(None) };
            let outboard = Outboard::of(&data);
            if outboard.root != root {
                return Ok(None);
            }
            Ok(encode(&data, &outboard, groups).ok())
        })
        .await??;
        let Some(response) = response else { return refuse(send, ContentReply::NotHeld).await };
        frame::write_value(&mut send, &ContentReply::Ok).await?;
        for chunk in response.chunks(CHUNK) {
            frame::write(&mut send, chunk).await?;
        }
        let _ = send.finish();
        Ok(())
    }

    /// Asks `peer` for `groups` of `root`; the groups that verified, and why it stopped early.
    async fn fetch_groups(
        self: Arc<Self>,
        peer: DeviceId,
        folder: FolderId,
        root: ContentHash,
        size: u64,
        groups: Range<u64>,
    ) -> (Vec<(u64, bytes::Bytes)>, Option<Failure>) {
        let asked = async {
            let conn = self.peer(peer).await?;
            let (mut send, recv) = conn.open_bi().await?;
            let open = Open::Content { folder, root: root.0, size, start: groups.start, end: groups.end };
            frame::write_value(&mut send, &open).await?;
            let _ = send.finish();
            let mut recv = frame::Reader::new(recv);
            let reply: Option<ContentReply> = recv.read_value(1024, "content reply").await?;
            match reply {
                Some(ContentReply::Ok) => {}
                Some(ContentReply::NotAllowed) => return anyhow::Ok(Err(Failure::Refused)),
                Some(_) => return anyhow::Ok(Err(Failure::NotHeld)),
                None => return anyhow::Ok(Err(Failure::Closed)),
            }
            // Bound: the groups' bytes and the parents that prove them, no more.
            let bound = (groups.end - groups.start) * (GROUP_BYTES + 128) + 64 * 128;
            let mut response = Vec::new();
            while let Some(chunk) = recv.read(FRAME_MAX).await? {
                if (response.len() + chunk.len()) as u64 > bound {
                    break;
                }
                response.extend_from_slice(&chunk);
            }
            anyhow::Ok(Ok(response))
        }
        .await;
        let response = match asked {
            Ok(Ok(r)) => r,
            Ok(Err(failure)) => return (Vec::new(), Some(failure)),
            Err(_) => return (Vec::new(), Some(Failure::Closed)),
        };
        let Ok(wanted) = Groups::new(groups.clone(), size) else {
            return (Vec::new(), Some(Failure::NotHeld));
        };
        let mut good = Vec::new();
        for item in Decoder::new(root, &wanted, response.as_slice()) {
            match item {
                Ok(group) => good.push(group),
                Err(engine::folder::BlobError::Corrupt { .. }) => return (good, Some(Failure::Corrupt)),
                Err(_) => return (good, Some(Failure::Closed)),
            }
        }
        let failure = (good.len() as u64) < groups.end - groups.start;
        (good, failure.then_some(Failure::Closed))
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
        let (me, holders) = {
            let n = lock(&self.node);
            let holders: Vec<DeviceId> = n
                .dir()
                .folder(&folder)
                .map(|f| f.mapped.iter().copied().filter(|d| *d != n.id).collect())
                .unwrap_or_default();
            (n.id, holders)
        };
        let started = Instant::now();
        let now = || started.elapsed().as_micros() as u64;
        let spread = u64::from_le_bytes(me.0[..8].try_into().unwrap_or([0; 8]));
        let mut fetcher: Fetcher<DeviceId> = Fetcher::new(FetchConfig { spread, ..FetchConfig::default() });
        for holder in &holders {
            let _ = fetcher.handle_route(now(), *holder, Some(Route::Direct));
        }
        let mut sizes: BTreeMap<ContentHash, u64> = BTreeMap::new();
        for want in &wants {
            let have = folders::partial_have(&dir, &want.root);
            if fetcher.want(now(), want.root, want.size, &have, &holders).is_ok() {
                sizes.insert(want.root, want.size);
            }
        }
        let paths: BTreeMap<ContentHash, String> =
            wants.iter().map(|w| (w.root, w.path.to_string())).collect();
        let (tx, mut rx) = mpsc::channel::<Fetched>(64);
        let mut running: BTreeMap<RequestId, tokio::task::JoinHandle<()>> = BTreeMap::new();
        let mut done = 0;
        // Bound: `within` of wall time; every turn handles a result, a timer or ends.
        loop {
            while let Some(command) = fetcher.poll_command() {
                match command {
                    Command::Request(r) => {
                        let (me, tx) = (self.clone(), tx.clone());
                        let size = sizes.get(&r.hash).copied().unwrap_or(0);
                        let task = tokio::spawn(async move {
                            let (groups, failure) =
                                me.fetch_groups(r.peer, folder, r.hash, size, r.groups).await;
                            let _ = tx.send(Fetched { id: r.id, root: r.hash, groups, failure }).await;
                        });
                        running.insert(r.id, task);
                    }
                    Command::Cancel(id) => {
                        if let Some(task) = running.remove(&id) {
                            task.abort();
                        }
                    }
                }
            }
            while let Some(event) = fetcher.poll_event() {
                if let Event::Done { hash } = event {
                    if folders::finish_partial(&dir, &hash).is_ok() {
                        done += 1;
                    }
                }
            }
            self.show_progress(folder, &fetcher, now(), &paths);
            if fetcher.wanted().next().is_none() || started.elapsed() >= within {
                break;
            }
            // Nothing in flight and nothing to wait for soon (no holder, or every one backing
            // off): the next round tries again, and `status` says why meanwhile.
            if running.is_empty()
                && fetcher.poll_timeout().is_none_or(|t| t.saturating_sub(now()) > 3_000_000)
            {
                break;
            }
            let wait =
                fetcher.poll_timeout().map_or(within, |t| Duration::from_micros(t.saturating_sub(now())));
            tokio::select! {
                fetched = rx.recv() => {
                    let Some(f) = fetched else { break };
                    running.remove(&f.id);
                    if !f.groups.is_empty() {
                        let mut runs = fetcher.have(&f.root).unwrap_or_default();
                        for (g, _) in &f.groups {
                            runs.push(*g..*g + 1);
                        }
                        let merged = merge_runs(runs);
                        let (dir, root, groups) = (dir.clone(), f.root, f.groups.clone());
                        let written = tokio::task::spawn_blocking(move || folders::write_groups(&dir, &root, &groups, &merged)).await;
                        if !matches!(written, Ok(Ok(()))) {
                            fetcher.handle_failure(now(), f.id, Failure::Closed);
                            continue;
                        }
                        for (g, _) in &f.groups {
                            fetcher.handle_groups(now(), f.id, *g..*g + 1);
                        }
                    }
                    if let Some(failure) = f.failure {
                        fetcher.handle_failure(now(), f.id, failure);
                    }
                }
                _ = tokio::time::sleep(wait) => fetcher.handle_timeout(now()),
            }
        }
        for (_, task) in running {
            task.abort();
        }
        done
    }
}

impl Net {
    /// What `status` shows of a fetch: per file still needed, the share held, the sources and
    /// their rates, or why nothing is in flight.
    fn show_progress(
        &self,
        folder: FolderId,
        fetcher: &Fetcher<DeviceId>,
        now: u64,
        paths: &BTreeMap<ContentHash, String>,
    ) {
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
                        (engine::signing::hex(&d.0[..4]), format!("{route:?}").to_lowercase(), *rate)
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
        let mut n = lock(&self.node);
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

/// Sorted, merged runs.
fn merge_runs(mut runs: Vec<Range<u64>>) -> Vec<Range<u64>> {
    runs.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for run in runs {
        match out.last_mut() {
            Some(last) if run.start <= last.end => last.end = last.end.max(run.end),
            _ => out.push(run),
        }
    }
    out
}

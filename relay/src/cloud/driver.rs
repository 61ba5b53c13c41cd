//! The relay's one host loop around the engine's cloud (`engine::cloud::Cloud`): the engine
//! decides, this file carries out. Every input path hands its input to the engine under the
//! state lock and then calls [`Cloud::pump`]: sync frames from streams ([`Cloud::serve_sync`]),
//! streams that end early, the timer task ([`run_timers`]), control requests and posted feeds.
//! `pump` stores everything the engine polls out (`poll_persist`) before it routes any transmit
//! polled after it, routes sync messages to their streams, finishes the streams of sessions that
//! ended, counts them, and passes the engine's notices on.
//!
//! Over QUIC each sync session is one bidirectional stream: the device opens it, writes
//! `Open::Sync`, then the session's messages; the cloud answers on the same stream and finishes
//! it when the session is over. A stream is known by (device, session id); its writer is a task
//! of its own fed through a bounded queue, so a slow reader never blocks the pump (a full queue
//! drops the stream and ends its session). What stays in the relay before a frame reaches the
//! engine: the per-device frame budget, the storage quota (checked when a session opens) and the
//! signature check, which runs before the lock is taken.

use std::sync::{Arc, Weak};
use std::time::Duration;

use engine::authz::AuthSession;
use engine::cloud::Persist;
use engine::directory::{FolderId, SignedChange};
use engine::feedsync::Item;
use engine::sessions::{Commit, Stream};
use engine::signing::DeviceId;
use engine::sync::{Outcome, SyncError};
use engine::ticket::ChannelKey;
use engine::time::Micros;
use engine::wire::{self, Body, Message, WIRE_VERSION};
use iroh::endpoint::{RecvStream, SendStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use transport::{frame, FRAME_MAX};

use super::{Cloud, State};
use crate::metrics::Reason;

/// Messages queued for one stream's writer. Sessions alternate (a message, then its answer), so
/// a stream that falls this far behind is not reading: it is dropped.
pub const STREAM_QUEUE: usize = 8;

/// Sync streams one device may run at once. The engine's session table is shared by every device
/// (`engine::sessions::SESSIONS_MAX`); this keeps one device from filling it. A stream past it is
/// finished unanswered (the device sees its session lost and retries on its schedule).
pub const SYNC_STREAMS_PER_DEVICE: usize = 64;

/// The writer of one sync stream, as the pump knows it.
#[derive(Debug)]
pub(super) struct StreamOut {
    /// Tells this stream from a later one with the same (device, session id).
    id: u64,
    /// Dropping it makes the writer finish the stream once the queue is written.
    tx: mpsc::Sender<Vec<u8>>,
}

/// How far the monotonic clock may fall behind the wall clock before it follows it (a machine
/// that slept, or a wall clock set forward).
const DRIFT_MAX_US: Micros = 60_000_000;

/// The engine's time: Unix microseconds of this machine's clock when the relay started (tickets
/// are checked against it, so it must be wall time), advanced by a monotonic clock, so a wall
/// clock that steps neither fires session timers early nor holds them back. It never goes back;
/// when the wall clock gets ahead of it by more than a minute (the machine slept) it jumps
/// forward to it, and a wall clock set back is not followed (its time would go back).
#[derive(Clone, Copy, Debug)]
pub struct HostClock {
    wall_us: Micros,
    start: Instant,
    last: Micros,
}

impl HostClock {
    pub fn start() -> Self {
        let wall_us = transport::now_us();
        HostClock { wall_us, start: Instant::now(), last: wall_us }
    }

    /// The engine's time now.
    pub fn now_us(&mut self) -> Micros {
        let mono = self.wall_us.saturating_add(self.start.elapsed().as_micros() as Micros);
        let wall = transport::now_us();
        let now = if wall > mono.saturating_add(DRIFT_MAX_US) {
            self.wall_us = wall;
            self.start = Instant::now();
            wall
        } else {
            mono
        };
        self.last = self.last.max(now);
        self.last
    }

    /// The monotonic instant at which the engine's time is `at` (now, if it already was).
    pub fn instant_of(&self, at: Micros) -> Instant {
        let after = Duration::from_micros(at.saturating_sub(self.wall_us));
        // Beyond what an Instant holds: wake in an hour and look again.
        self.start.checked_add(after).unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }
}

/// A store write failed: what it was for stays queued (or is handed out again) and nothing that
/// depends on it was sent.
#[derive(Debug, thiserror::Error)]
#[error("storing what the cloud accepted failed")]
pub struct Unstored;

impl Cloud {
    /// Carries out what the engine polled, after any input: commits first (directory changes
    /// and replica changes, each stored before any transmit polled after it), then the sync
    /// messages to their streams, then the sessions that ended, the notices and the timer.
    /// Called with the state locked; nothing here awaits. `Err` when something could not be
    /// stored: the sync messages of this round are then not sent, and their sessions end.
    pub(super) fn pump(&self, st: &mut State) -> Result<(), Unstored> {
        let mut stored = self.retry_unstored(st);
        while stored {
            match st.control.poll_persist() {
                None => break,
                Some(Persist::Directory(changes)) => stored = self.store_directory(st, &changes),
                Some(Persist::Items(commit)) => {
                    if !self.store_commit(st, &commit) {
                        st.unstored.push_back(commit);
                        stored = false;
                    }
                }
            }
        }
        let mut dropped = Vec::new();
        while let Some(t) = st.control.poll_transmit() {
            match t.stream {
                Stream::Sync => {
                    let Some((sid, _, _)) = wire::peek(&t.bytes) else { continue };
                    let key = (t.to, sid);
                    let Some(out) = st.streams.get(&key) else { continue };
                    if stored && out.tx.try_send(t.bytes).is_ok() {
                        self.metrics.frames_sent.inc();
                    } else {
                        dropped.push(key);
                    }
                }
                // The relay answers control requests itself (`handle_request`), so the engine
                // queues no answer for it; notices go through `poll_notice`.
                other => tracing::debug!(stream = ?other, "a transmit the relay does not route"),
            }
        }
        for (device, sid) in dropped {
            st.streams.remove(&(device, sid));
            st.control.handle_lost(device, sid);
        }
        while let Some(ended) = st.control.poll_ended() {
            // Its last messages are queued: the writer finishes the stream after them.
            st.streams.remove(&(ended.peer, ended.session));
            self.count_session(&ended.peer, &ended.folder, &ended.outcome);
        }
        self.flush_notices(st);
        let next = st.control.poll_timeout();
        if next.is_some_and(|t| st.armed.is_none_or(|armed| t < armed)) {
            st.armed = next;
            self.timer.notify_one();
        }
        if stored {
            Ok(())
        } else {
            Err(Unstored)
        }
    }

    /// Stores the replica changes a failed write left, in order; whether none is left.
    fn retry_unstored(&self, st: &mut State) -> bool {
        while let Some(commit) = st.unstored.pop_front() {
            if !self.store_commit(st, &commit) {
                st.unstored.push_front(commit);
                return false;
            }
        }
        true
    }

    /// Stores directory changes the engine accepted; on failure the engine hands them out again.
    fn store_directory(&self, st: &mut State, changes: &[SignedChange]) -> bool {
        if let Err(e) = self.store.save_changes(changes) {
            tracing::error!(error = %e, "saving directory changes");
            st.control.persist_failed(changes);
            return false;
        }
        self.metrics.directory_changes.inc_by(changes.len() as u64);
        self.publish_directory(st, changes);
        true
    }

    /// Stores a replica's changes. A session's bytes count against the storage of the device
    /// that sent them; posted items are counted by their signers in `merge_posted`.
    fn store_commit(&self, st: &mut State, commit: &Commit<DeviceId>) -> bool {
        let items: Vec<&Arc<Item>> = commit.items.iter().map(|(item, _)| item).collect();
        if let Err(e) = self.store.save_items(&commit.folder, items.iter().copied()) {
            tracing::error!(error = %e, folder = %commit.folder, "saving items");
            return false;
        }
        self.metrics.items_stored.inc_by(items.len() as u64);
        if let Some(device) = commit.from {
            let bytes: u64 = items.iter().map(|i| wire::encoded_len(&wire::to_wire(i)) as u64).sum();
            if let Err(e) = self.store.add_usage(&device.0, bytes) {
                tracing::error!(error = %e, %device, "counting storage");
            }
        }
        self.publish_folder(st, commit.folder);
        true
    }

    fn count_session(&self, device: &DeviceId, folder: &FolderId, outcome: &Outcome) {
        let kind = match outcome {
            Outcome::Done { .. } => "done",
            Outcome::Failed(SyncError::Refused(_)) => "refused",
            Outcome::Failed(_) => "failed",
            Outcome::Running => return,
        };
        if let Outcome::Failed(e) = outcome {
            tracing::info!(%device, %folder, error = %e, "sync session failed");
        }
        self.metrics.sessions.get_or_create(&Reason::new(kind)).inc();
    }

    /// Serves one sync stream: its first message (a `DirHello`) names the folder and the session;
    /// the storage quota is checked; then every message goes to the engine, until the session is
    /// over (its writer finished the stream) or the device ends or breaks the stream (the session
    /// ends as lost).
    pub(super) async fn serve_sync(
        self: Arc<Self>,
        device: DeviceId,
        channel: ChannelKey,
        mut send: SendStream,
        mut recv: frame::Reader<RecvStream>,
    ) -> anyhow::Result<()> {
        let Some(first) = recv.read(FRAME_MAX).await? else { return Ok(()) };
        let folder = AuthSession::folder_of(&first, FRAME_MAX)
            .ok_or_else(|| anyhow::anyhow!("a sync stream must open with DirHello"))?;
        // The header is enough: `folder_of` decoded the whole message.
        let (sid, _, _) = wire::peek(&first).ok_or_else(|| anyhow::anyhow!("no session header"))?;
        if self.store.usage(&device.0)? > self.limits.storage_bytes_per_device {
            self.metrics.refusals.get_or_create(&Reason::new("storage-limit")).inc();
            let reason = engine::refusal::RefusalCode::StorageLimit {
                limit_bytes: self.limits.storage_bytes_per_device,
            };
            let bytes = wire::encode(&Message {
                version: WIRE_VERSION,
                session: sid,
                step: 3,
                body: Body::Refused { reason },
            });
            frame::write(&mut send, &bytes).await?;
            let _ = send.finish();
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let id = {
            let mut st = self.lock();
            if st.streams.contains_key(&(device, sid)) {
                anyhow::bail!("session {sid} already runs on another stream");
            }
            if st.streams.range((device, 0)..=(device, u64::MAX)).count() >= SYNC_STREAMS_PER_DEVICE {
                self.metrics.refusals.get_or_create(&Reason::new("sync-streams")).inc();
                anyhow::bail!("{SYNC_STREAMS_PER_DEVICE} sync streams of this device run already");
            }
            st.next_stream += 1;
            let id = st.next_stream;
            st.streams.insert((device, sid), StreamOut { id, tx });
            id
        };
        let mut writer = tokio::spawn(write_frames(send, rx));
        let mut next = Some(first);
        let ended = loop {
            let bytes = match next.take() {
                Some(bytes) => bytes,
                None => tokio::select! {
                    // Cancel-safe: losing to the writer loses no part of a frame.
                    got = recv.read(FRAME_MAX) => match got {
                        Ok(Some(bytes)) => bytes,
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e.into()),
                    },
                    // The session is over and its stream finished, or the stream broke.
                    _ = &mut writer => break Ok(()),
                },
            };
            // One session per stream: a message of another session ends this one.
            if wire::peek(&bytes).map(|(s, _, _)| s) != Some(sid) {
                break Err(anyhow::anyhow!("a message of another session on the stream of {sid}"));
            }
            if !self.sync_frame(device, channel, folder, sid, id, &bytes) {
                // The session is over: what else the device sends on the stream is not read.
                break Ok(());
            }
        };
        self.stream_ended(device, sid, id);
        ended
    }

    /// One sync message from `device` on its stream `id` of session `sid`: the frame budget, the
    /// signatures (checked before the lock is taken), then the engine and the pump. Whether the
    /// stream still carries a session (false: it ended, nothing more is read).
    fn sync_frame(
        &self,
        device: DeviceId,
        channel: ChannelKey,
        folder: FolderId,
        sid: u64,
        id: u64,
        bytes: &[u8],
    ) -> bool {
        let signers = {
            let mut st = self.lock();
            if st.streams.get(&(device, sid)).is_none_or(|s| s.id != id) {
                return false;
            }
            if st.buckets.take(&device, transport::now_us()).is_err() {
                // Dropped unread, as a lost packet would be: the session retransmits or times out.
                return true;
            }
            st.dir().folder(&folder).map(|_| st.dir().signers(&folder))
        };
        self.metrics.frames_received.inc();
        // Signatures are checked before the cloud's lock is taken (issue 11: a message's
        // ed25519 work must not stall every other device and request).
        let verified =
            transport::preverify(bytes, signers.as_ref().map(|_| folder.scope()), signers.as_ref());
        let mut guard = self.lock();
        let st = &mut *guard;
        st.control.set_verified(folder, verified);
        let now = st.clock.now_us();
        st.control.handle_sync(now, device, channel, bytes);
        st.control.set_verified(folder, Default::default());
        let _ = self.pump(st);
        // A message that opened no session (the table is full, or it was no session's first)
        // gets no answer: the stream ends, and the device sees its session lost.
        let mine = st.streams.get(&(device, sid)).is_some_and(|s| s.id == id);
        if mine && st.control.session_folder(device, sid).is_none() {
            st.streams.remove(&(device, sid));
            self.metrics.sessions.get_or_create(&Reason::new("failed")).inc();
            return false;
        }
        mine
    }

    /// The reader of stream `id` stopped: if its session still runs, it ends as lost.
    fn stream_ended(&self, device: DeviceId, sid: u64, id: u64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.streams.get(&(device, sid)).is_some_and(|s| s.id == id) {
            st.streams.remove(&(device, sid));
            st.control.handle_lost(device, sid);
            let _ = self.pump(st);
        }
    }
}

/// Writes what the pump queued for one stream, then finishes it once the pump lets go of the
/// queue (the session ended, or the stream was dropped).
async fn write_frames(mut send: SendStream, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = rx.recv().await {
        if frame::write(&mut send, &bytes).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// The timer task: runs the engine's `handle_timeout` at each deadline it polls, on the
/// monotonic clock ([`HostClock`]), and pumps. Woken early when a deadline comes earlier. Holds
/// the cloud weakly, so it never keeps a stopped relay's store open.
pub async fn run_timers(cloud: Weak<Cloud>, timer: Arc<Notify>) {
    loop {
        let wake = {
            let Some(cloud) = cloud.upgrade() else { return };
            let mut st = cloud.lock();
            let next = st.control.poll_timeout();
            st.armed = next;
            next.map(|at| st.clock.instant_of(at))
        };
        match wake {
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = timer.notified() => continue,
            },
            None => {
                timer.notified().await;
                continue;
            }
        }
        let Some(cloud) = cloud.upgrade() else { return };
        let mut guard = cloud.lock();
        let st = &mut *guard;
        let now = st.clock.now_us();
        st.control.handle_timeout(now);
        let _ = cloud.pump(st);
    }
}

impl Cloud {
    /// Starts the timer task ([`run_timers`]); the caller keeps the handle with its other tasks.
    pub fn spawn_timers(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run_timers(Arc::downgrade(self), self.timer.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::HostClock;

    /// The engine's time follows the monotonic (here paused) clock from the wall time it started
    /// at, never goes back, and a deadline is due by it when the timer for it fires.
    #[tokio::test(start_paused = true)]
    async fn the_engine_runs_on_a_monotonic_clock() {
        let mut clock = HostClock::start();
        let before = clock.now_us();
        assert!(before.abs_diff(transport::now_us()) < 60_000_000);
        let at = before + 5_000_000;
        tokio::time::sleep_until(clock.instant_of(at)).await;
        let after = clock.now_us();
        assert!(after >= at);
        assert!(after >= before);
        assert!(clock.instant_of(before - 1) <= tokio::time::Instant::now(), "a past deadline is due now");
    }
}

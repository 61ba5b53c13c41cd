//! The session table both roles keep: authorized sync sessions by peer and session id, the
//! initiator's cursors per peer and folder, and what the sessions send and report. The device
//! ([`crate::device::Device`]) and the cloud ([`crate::cloud::Cloud`]) own one each; a driver
//! never touches a session directly.
//!
//! A peer is whatever the driver names peers by (`P`): a device id in the binaries, a node index
//! in the simulator. The table keeps at most [`SESSIONS_MAX`] sessions; past it a new responder
//! is not opened (the initiator retries on its own schedule).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::sync::Arc;

use crate::authz::{AuthSession, Policy};
use crate::directory::{Directory, FolderId};
use crate::feedsync::Item;
use crate::replica::{Replica, Seq};
use crate::sync::{Config, Outcome, Retained, Session};
use crate::ticket::ChannelKey;
use crate::time::Micros;

/// Sessions one role runs at once (responders past it are not opened).
pub const SESSIONS_MAX: usize = 4096;

/// Past this many sessions the table indexes their deadlines.
const INDEX_FROM: usize = 32;

/// What a driver names a peer by.
pub trait Peer: Copy + Ord + Debug {}
impl<T: Copy + Ord + Debug> Peer for T {}

/// Which logical stream a transmit belongs to. Over QUIC each sync session is one bidirectional
/// stream and each control request another; a datagram driver (the simulator) carries the tag
/// beside the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// A sync session's message (the session id is inside the bytes).
    Sync,
    /// A control request (`control::encode(&Request)`), numbered by the device.
    Request(u64),
    /// The cloud's answer to request `id` (`control::encode(&Response)`).
    Response(u64),
    /// A notice from the cloud (`control::encode(&Notice)`), on a unidirectional stream.
    Notice,
}

/// Bytes for a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit<P> {
    pub to: P,
    pub stream: Stream,
    pub bytes: Vec<u8>,
}

/// What changed in a replica, for the driver to store. The driver commits it before it sends any
/// transmit polled after it (a peer may act on an answer only once what it answers is stored);
/// what is not committed is lost on a crash, and the role restarts from what was.
#[derive(Clone, Debug, PartialEq)]
pub struct Commit<P> {
    pub folder: FolderId,
    /// The peer whose session brought the change (`None`: a local write).
    pub from: Option<P>,
    /// The new states of the items that changed, with their fingerprints, in log order.
    pub items: Vec<(Arc<Item>, u64)>,
}

/// A session that ended.
#[derive(Clone, Debug)]
pub struct Ended<P> {
    pub peer: P,
    pub folder: FolderId,
    pub session: u64,
    /// This side started it.
    pub initiated: bool,
    pub outcome: Outcome,
}

#[derive(Debug)]
struct Entry {
    folder: FolderId,
    initiated: bool,
    /// The session's deadline as last filed in [`Sessions::deadlines`].
    deadline: Option<Micros>,
    session: Run,
}

/// A running session: an open one (`Policy::Open`: no directory phase) is the feed session
/// alone, which is all an `AuthSession` with that policy would pass messages to; the simulator's
/// plain model runs 100,000 devices, and the wrapper was 400 bytes of each session.
#[derive(Debug)]
enum Run {
    Plain(Box<Session>),
    Auth(Box<AuthSession>),
}

impl Run {
    fn handle_message(
        &mut self,
        now: Micros,
        dir: &mut Directory,
        replica: &mut Replica,
        bytes: &[u8],
    ) -> Result<(), crate::sync::SyncError> {
        match self {
            Run::Plain(s) => s.handle_message(now, replica, bytes),
            Run::Auth(s) => s.handle_message(now, dir, replica, bytes),
        }
    }

    fn handle_timeout(&mut self, now: Micros) {
        match self {
            Run::Plain(s) => s.handle_timeout(now),
            Run::Auth(s) => s.handle_timeout(now),
        }
    }

    fn connection_lost(&mut self) {
        match self {
            Run::Plain(s) => s.connection_lost(),
            Run::Auth(s) => s.connection_lost(),
        }
    }

    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        match self {
            Run::Plain(s) => s.poll_transmit(),
            Run::Auth(s) => s.poll_transmit(),
        }
    }

    fn poll_timeout(&self) -> Option<Micros> {
        match self {
            Run::Plain(s) => s.poll_timeout(),
            Run::Auth(s) => s.poll_timeout(),
        }
    }

    fn outcome(&self) -> Outcome {
        match self {
            Run::Plain(s) => s.outcome().clone(),
            Run::Auth(s) => s.outcome(),
        }
    }
}

/// The table.
#[derive(Debug)]
pub(crate) struct Sessions<P: Peer> {
    /// Shared: a simulator's 100,000 devices hold one copy.
    pub(crate) cfg: std::sync::Arc<Config>,
    table: BTreeMap<(P, u64), Entry>,
    /// Every session's deadline, so the earliest is found without visiting every session (a
    /// cloud runs thousands at once). Kept only once the table has held more than
    /// [`INDEX_FROM`] sessions; a device's handful are scanned (and its table pays one word).
    #[allow(clippy::box_collection)] // Boxed on purpose: it keeps `Device` in a smaller size class.
    deadlines: Option<Box<std::collections::BTreeSet<(Micros, P, u64)>>>,
    /// The session this side started with each (peer, folder), while it runs.
    outgoing: Vec<((P, FolderId), u64)>,
    /// Initiator-side cursors per (peer, folder) (volatile).
    retained: Vec<((P, FolderId), Retained)>,
    pub(crate) transmit: VecDeque<Transmit<P>>,
    pub(crate) commits: VecDeque<Commit<P>>,
    pub(crate) ended: VecDeque<Ended<P>>,
}

/// Inserts `x` at `i`, the first time with room for exactly one: most devices hold one folder
/// and one peer, and a vector's first growth makes room for four (a simulator with 100,000
/// devices paid 700 bytes each for the room). Later growth is the vector's own (amortised).
pub(crate) fn insert_small<T>(v: &mut Vec<T>, i: usize, x: T) {
    if v.capacity() == 0 {
        v.reserve_exact(1);
    }
    v.insert(i, x);
}

fn find<K: Ord, V>(v: &[(K, V)], k: &K) -> Result<usize, usize> {
    v.binary_search_by(|(x, _)| x.cmp(k))
}

impl<P: Peer> Sessions<P> {
    pub(crate) fn new(cfg: std::sync::Arc<Config>) -> Self {
        Self {
            cfg,
            table: BTreeMap::new(),
            deadlines: None,
            outgoing: Vec::new(),
            retained: Vec::new(),
            transmit: VecDeque::new(),
            commits: VecDeque::new(),
            ended: VecDeque::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Forgets every session and cursor (a crash: this is volatile state).
    pub(crate) fn clear(&mut self) {
        self.table = BTreeMap::new();
        self.deadlines = None;
        self.outgoing = Vec::new();
        self.retained = Vec::new();
        self.transmit.clear();
        self.ended.clear();
    }

    /// Whether this side runs a session it started with `peer` on `folder`.
    pub(crate) fn busy(&self, peer: P, folder: FolderId) -> bool {
        find(&self.outgoing, &(peer, folder)).is_ok()
    }

    /// Starts a session as initiator (the caller checked [`Sessions::busy`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn initiate(
        &mut self,
        now: Micros,
        peer: P,
        channel: ChannelKey,
        sid: u64,
        folder: FolderId,
        policy: Policy,
        dir: &Directory,
        replica: &Replica,
    ) {
        let retained = find(&self.retained, &(peer, folder)).map(|i| self.retained[i].1).unwrap_or_default();
        let session = match policy {
            Policy::Open => {
                Run::Plain(Box::new(Session::initiate(sid, now, replica, Config::clone(&self.cfg), retained)))
            }
            policy => Run::Auth(Box::new(AuthSession::initiate(
                sid,
                now,
                folder,
                policy,
                channel,
                dir,
                replica,
                Config::clone(&self.cfg),
                retained,
            ))),
        };
        self.table.insert((peer, sid), Entry { folder, initiated: true, deadline: None, session });
        match find(&self.outgoing, &(peer, folder)) {
            Ok(i) => self.outgoing[i].1 = sid,
            Err(i) => insert_small(&mut self.outgoing, i, ((peer, folder), sid)),
        }
        self.after(peer, sid, replica, None);
    }

    /// The folder of the session a message belongs to, if it runs here.
    pub(crate) fn folder_of(&self, peer: P, sid: u64) -> Option<FolderId> {
        self.table.get(&(peer, sid)).map(|e| e.folder)
    }

    /// Whether a message of session `sid` from `peer` that runs nowhere here may open a
    /// responder: not one of this side's own sessions, and room in the table.
    pub(crate) fn may_open(&self, peer: P, sid: u64) -> bool {
        self.table.len() < SESSIONS_MAX && !self.outgoing.iter().any(|((p, _), s)| *p == peer && *s == sid)
    }

    /// Where a sync message from `peer` goes: its session's id and folder, and whether it opens
    /// a new responder (only a session's first message does, from a session this side did not
    /// start, with room in the table). An open role's sessions are all on `open_folder`; a keyed
    /// role learns a new session's folder from its `DirHello`. `None`: drop it.
    pub(crate) fn route(
        &self,
        peer: P,
        bytes: &[u8],
        open_folder: Option<FolderId>,
    ) -> Option<(u64, FolderId, bool)> {
        // The header only: the session decodes the message once.
        let (sid, step, _) = crate::wire::peek(bytes)?;
        if let Some(folder) = self.folder_of(peer, sid) {
            return Some((sid, folder, false));
        }
        if step != 0 || !self.may_open(peer, sid) {
            return None;
        }
        let folder = match open_folder {
            Some(folder) => folder,
            None => AuthSession::folder_of(bytes, self.cfg.max_message_bytes)?,
        };
        Some((sid, folder, true))
    }

    /// Hands a message to session `sid` with the role's replica of its folder, or, for a folder
    /// the role does not hold (`None`), with an empty stand-in whose changes are never handed
    /// out (the session refuses; nothing reaches a replica). Returns whether a commit was queued.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn deliver(
        &mut self,
        now: Micros,
        peer: P,
        channel: ChannelKey,
        sid: u64,
        folder: FolderId,
        opens: Option<Policy>,
        dir: &mut Directory,
        replica: Option<&mut Replica>,
        bytes: &[u8],
    ) -> bool {
        let commits = self.commits.len();
        let held = replica.is_some();
        let mut scratch;
        let replica = match replica {
            Some(r) => r,
            None => {
                scratch = Replica::new_signed(0, folder.scope());
                &mut scratch
            }
        };
        if let Some(policy) = opens {
            self.open(peer, channel, sid, folder, policy, replica);
        }
        self.handle(now, peer, sid, dir, replica, bytes);
        if !held {
            self.commits.truncate(commits);
        }
        self.commits.len() > commits
    }

    /// Opens a responder for the first message of session `sid`.
    pub(crate) fn open(
        &mut self,
        peer: P,
        channel: ChannelKey,
        sid: u64,
        folder: FolderId,
        policy: Policy,
        replica: &Replica,
    ) {
        let session = match policy {
            Policy::Open => Run::Plain(Box::new(Session::respond(sid, replica, Config::clone(&self.cfg)))),
            policy => Run::Auth(Box::new(AuthSession::respond(
                sid,
                policy,
                channel,
                replica,
                Config::clone(&self.cfg),
            ))),
        };
        self.table.insert((peer, sid), Entry { folder, initiated: false, deadline: None, session });
        self.file_deadline(peer, sid);
    }

    /// Hands a message to its session; returns whether the replica changed.
    pub(crate) fn handle(
        &mut self,
        now: Micros,
        peer: P,
        sid: u64,
        dir: &mut Directory,
        replica: &mut Replica,
        bytes: &[u8],
    ) {
        let head = replica.head();
        let Some(entry) = self.table.get_mut(&(peer, sid)) else { return };
        // A refusal or a bad message ends the session; its outcome says why.
        let _ = entry.session.handle_message(now, dir, replica, bytes);
        self.after(peer, sid, replica, Some(head));
    }

    /// The earliest deadline of any session.
    pub(crate) fn poll_timeout(&self) -> Option<Micros> {
        match &self.deadlines {
            Some(index) => index.first().map(|&(t, _, _)| t),
            None => self.table.values().filter_map(|e| e.deadline).min(),
        }
    }

    /// Sessions whose deadline passed, for [`Sessions::timeout`].
    pub(crate) fn due(&self, now: Micros) -> Vec<(P, u64, FolderId)> {
        if self.poll_timeout().is_none_or(|t| t > now) {
            return Vec::new();
        }
        let Some(index) = &self.deadlines else {
            return self
                .table
                .iter()
                .filter(|(_, e)| e.deadline.is_some_and(|t| t <= now))
                .map(|(&(p, s), e)| (p, s, e.folder))
                .collect();
        };
        index
            .iter()
            .take_while(|(t, _, _)| *t <= now)
            .filter_map(|&(_, p, s)| self.table.get(&(p, s)).map(|e| (p, s, e.folder)))
            .collect()
    }

    /// Files a session's current deadline (after anything that may change it).
    fn file_deadline(&mut self, peer: P, sid: u64) {
        if self.deadlines.is_none() && self.table.len() > INDEX_FROM {
            self.deadlines = Some(Box::new(
                self.table.iter().filter_map(|(&(p, s), e)| e.deadline.map(|t| (t, p, s))).collect(),
            ));
        }
        let Some(entry) = self.table.get_mut(&(peer, sid)) else { return };
        let now = entry.session.poll_timeout();
        if now != entry.deadline {
            if let Some(index) = &mut self.deadlines {
                if let Some(old) = entry.deadline {
                    index.remove(&(old, peer, sid));
                }
                if let Some(new) = now {
                    index.insert((new, peer, sid));
                }
            }
            entry.deadline = now;
        }
    }

    pub(crate) fn timeout(&mut self, now: Micros, peer: P, sid: u64, replica: &Replica) {
        let Some(entry) = self.table.get_mut(&(peer, sid)) else { return };
        entry.session.handle_timeout(now);
        self.after(peer, sid, replica, None);
    }

    /// The transport lost session `sid`'s stream: the session ends (see
    /// [`AuthSession::connection_lost`]) and is retired like any other.
    pub(crate) fn lost(&mut self, peer: P, sid: u64, replica: &Replica) {
        let Some(entry) = self.table.get_mut(&(peer, sid)) else { return };
        entry.session.connection_lost();
        self.after(peer, sid, replica, None);
    }

    /// Collects what a session has to send, records replica changes, keeps the initiator's
    /// cursor, and retires it once it is over.
    fn after(&mut self, peer: P, sid: u64, replica: &Replica, head_before: Option<Seq>) {
        let Some(entry) = self.table.get_mut(&(peer, sid)) else { return };
        let folder = entry.folder;
        if let Some(head) = head_before {
            if replica.head() != head {
                let items: Vec<(Arc<Item>, u64)> =
                    replica.log_since(head).map(|c| (c.item.clone(), c.fp)).collect();
                self.commits.push_back(Commit { folder, from: Some(peer), items });
            }
        }
        while let Some(bytes) = entry.session.poll_transmit() {
            self.transmit.push_back(Transmit { to: peer, stream: Stream::Sync, bytes });
        }
        let timeout = entry.session.poll_timeout();
        let outcome = entry.session.outcome();
        let initiated = entry.initiated;
        let finished = timeout.is_none() && !matches!(outcome, Outcome::Running);
        let mine =
            initiated && find(&self.outgoing, &(peer, folder)).is_ok_and(|i| self.outgoing[i].1 == sid);
        if mine {
            match &outcome {
                Outcome::Done { retained, .. } => match find(&self.retained, &(peer, folder)) {
                    Ok(i) => self.retained[i].1 = *retained,
                    Err(i) => insert_small(&mut self.retained, i, ((peer, folder), *retained)),
                },
                Outcome::Failed(_) if finished => {
                    if let Ok(i) = find(&self.retained, &(peer, folder)) {
                        self.retained.remove(i);
                    }
                }
                _ => {}
            }
            // The initiator may start the next session once its outcome is known.
            if !matches!(outcome, Outcome::Running) {
                if let Ok(i) = find(&self.outgoing, &(peer, folder)) {
                    self.outgoing.remove(i);
                }
                if self.outgoing.is_empty() {
                    // Idle most of the time: hold no memory then.
                    self.outgoing = Vec::new();
                }
            }
        }
        if finished {
            if let Some(entry) = self.table.remove(&(peer, sid)) {
                if let (Some(index), Some(old)) = (&mut self.deadlines, entry.deadline) {
                    index.remove(&(old, peer, sid));
                }
            }
            if self.table.is_empty() {
                // An empty map can still hold its root node: a device is idle most of the time.
                self.table = BTreeMap::new();
            }
            self.ended.push_back(Ended { peer, folder, session: sid, initiated, outcome });
        } else {
            self.file_deadline(peer, sid);
        }
    }

    /// Structural checks: every outgoing entry names a running session of its own.
    pub(crate) fn check_invariants(&self) -> Result<(), &'static str> {
        if self.table.len() > SESSIONS_MAX + 1 {
            return Err("more sessions than SESSIONS_MAX");
        }
        if self.deadlines.as_ref().is_some_and(|index| index.len() > self.table.len()) {
            return Err("a deadline filed for a session that is gone");
        }
        // In full (every session's deadline filed as it is) when the table is small, as a
        // device's is; a cloud's thousands are checked by count only, after every event.
        if self.table.len() <= 64 {
            for (&(peer, sid), e) in &self.table {
                let t = e.session.poll_timeout();
                if t != e.deadline
                    || t.is_some_and(|t| {
                        self.deadlines.as_ref().is_some_and(|index| !index.contains(&(t, peer, sid)))
                    })
                {
                    return Err("a session's deadline is not filed as it is");
                }
            }
        }
        for ((peer, folder), sid) in &self.outgoing {
            match self.table.get(&(*peer, *sid)) {
                Some(e) if e.initiated && e.folder == *folder => {}
                _ => return Err("an outgoing entry without its session"),
            }
        }
        if self.outgoing.windows(2).any(|w| w[0].0 >= w[1].0)
            || self.retained.windows(2).any(|w| w[0].0 >= w[1].0)
        {
            return Err("peer maps out of order");
        }
        Ok(())
    }
}

//! The authorized session: a layer above [`Session`] that lets feed data move only between devices
//! the rule allows. Sans-IO, same shape as `Session` (`handle_message`, `handle_timeout`,
//! `poll_transmit`, `poll_timeout`), same wire envelope (so `wire::peek` routes it).
//!
//! With [`Policy::Open`] it is a plain `Session` (what existing callers get). With
//! [`Policy::Directory`]:
//!
//! ```text
//! I -> R  DirHello { folder, I's ticket, I's directory heads }
//! R -> I  DirSync  { R's ticket, R's heads, directory changes I lacks }     (R checked I's ticket)
//! I -> R  DirDone  { directory changes R lacks }, then the feed Session's Hello ...
//!                                                 (I checked R's ticket, caught up, authorized R)
//!         R catches up, authorizes I, and only then answers feed messages.
//! ```
//!
//! Each side checks the peer's ticket (signature, window with skew, channel binding, folder) and,
//! after catching its directory up with the peer's, its own verified directory
//! ([`Directory::may_sync`]); so a removal known to either side takes effect before any feed data
//! moves. The rule is checked again before every feed message is handled, so a removal made or
//! learned while a session runs stops it too. A refusal sends `Refused { reason }` and ends the session with
//! `Outcome::Failed(SyncError::Refused(..))`; feed messages that arrive before authorization are
//! dropped unread, so nothing from an unauthorized peer reaches a replica.

use std::collections::VecDeque;

use crate::directory::{Directory, FolderId, Heads, SignedChange, DEPS_MAX};
use crate::replica::Replica;
use crate::signing::DeviceId;
use crate::sync::{Config, Micros, Outcome, Retained, Session, Stats, SyncError};
use crate::ticket::{ChannelKey, CloudId, Ticket};
use crate::wire::{self, Body, Message, WIRE_VERSION};

pub use crate::refusal::Refusal;

/// What a device presents and trusts: its id and current ticket, and the cloud's ticket key.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub device: DeviceId,
    pub ticket: Ticket,
    pub cloud: CloudId,
}

/// Whether sessions are authorized.
#[derive(Clone, Debug)]
pub enum Policy {
    /// No tickets, no directory: a plain [`Session`].
    Open,
    /// Tickets and the verified directory, as in the module docs.
    Directory(Box<Credentials>),
}

/// Counters of the directory phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub changes_sent: u64,
    pub changes_received: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Role {
    Initiator,
    Responder,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Phase {
    /// Exchanging tickets and directory changes.
    Directory,
    /// Authorized: the feed session runs.
    Feed,
    /// Refused or failed.
    Over,
}

/// One authorized sync session for one folder with one peer.
/// `Clone` forks a session with its whole state (the model checker explores both branches).
#[derive(Clone, Debug)]
pub struct AuthSession {
    role: Role,
    id: u64,
    cfg: Config,
    policy: Policy,
    peer: ChannelKey,
    folder: Option<FolderId>,
    peer_device: Option<DeviceId>,
    retained: Retained,
    phase: Phase,
    inner: Option<Session>,
    transmit: VecDeque<Vec<u8>>,
    /// My last directory-phase message, for retransmission and duplicate answers.
    last_dir: Option<Vec<u8>>,
    deadline: Option<Micros>,
    retries: u32,
    /// Initiator: a feed message came back, so the responder has my `DirDone`.
    feed_heard: bool,
    outcome: Option<Outcome>,
    dir_stats: DirStats,
}

impl AuthSession {
    /// Feeds the session's state to `h` for a model checker, as [`Session::hash_state`] does:
    /// left out are the configuration and credentials (fixed for the session's life) and the
    /// directory-phase counters; times are relative to `now`.
    pub fn hash_state<H: std::hash::Hasher>(&self, now: Micros, h: &mut H) {
        use std::hash::Hash;
        (self.role, self.id, self.peer, self.folder, self.peer_device, self.retained, self.phase).hash(h);
        (&self.transmit, &self.last_dir, self.retries, self.feed_heard).hash(h);
        self.deadline.map(|d| i128::from(d) - i128::from(now)).hash(h);
        match &self.inner {
            None => 0u8.hash(h),
            Some(inner) => inner.hash_state(now, h),
        }
        match &self.outcome {
            None => 0u8.hash(h),
            Some(o) => crate::sync::hash_outcome(o, h),
        }
    }
}

impl AuthSession {
    fn new(role: Role, id: u64, cfg: Config, policy: Policy, peer: ChannelKey) -> Self {
        Self {
            role,
            id,
            cfg,
            policy,
            peer,
            folder: None,
            peer_device: None,
            retained: Retained::default(),
            phase: Phase::Directory,
            inner: None,
            transmit: VecDeque::new(),
            last_dir: None,
            deadline: None,
            retries: 0,
            feed_heard: false,
            outcome: None,
            dir_stats: DirStats::default(),
        }
    }

    /// Starts a session for `folder` with the peer whose channel key the transport authenticated
    /// as `peer`. `replica` is this device's replica of `folder`.
    #[allow(clippy::too_many_arguments)]
    pub fn initiate(
        id: u64,
        now: Micros,
        folder: FolderId,
        policy: Policy,
        peer: ChannelKey,
        directory: &Directory,
        replica: &Replica,
        cfg: Config,
        retained: Retained,
    ) -> Self {
        let mut s = Self::new(Role::Initiator, id, cfg, policy, peer);
        s.folder = Some(folder);
        s.retained = retained;
        match &s.policy {
            Policy::Open => s.start_feed(now, replica),
            Policy::Directory(creds) => {
                let body = Body::DirHello {
                    folder,
                    ticket: creds.ticket.clone(),
                    heads: directory.heads().into_iter().collect(),
                };
                s.send_dir(now, 0, body);
            }
        }
        s
    }

    /// A responder, made when the first message of a new session arrives (then pass it to
    /// [`AuthSession::handle_message`] with the replica of [`AuthSession::folder_of`]).
    pub fn respond(id: u64, policy: Policy, peer: ChannelKey, replica: &Replica, cfg: Config) -> Self {
        let mut s = Self::new(Role::Responder, id, cfg, policy, peer);
        if matches!(s.policy, Policy::Open) {
            s.inner = Some(Session::respond(id, replica, s.cfg.clone()));
            s.phase = Phase::Feed;
        }
        s
    }

    /// The folder a `DirHello` asks for (to pick the replica for a new responder).
    pub fn folder_of(bytes: &[u8], max_bytes: usize) -> Option<FolderId> {
        match wire::decode(bytes, max_bytes).ok()?.body {
            Body::DirHello { folder, .. } => Some(folder),
            _ => None,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The folder (the responder learns it from `DirHello`).
    pub fn folder(&self) -> Option<FolderId> {
        self.folder
    }

    /// The peer's device as its verified ticket names it.
    pub fn peer_device(&self) -> Option<DeviceId> {
        self.peer_device
    }

    /// Whether feed data may move (the peer passed every check).
    pub fn authorized(&self) -> bool {
        self.phase == Phase::Feed
    }

    pub fn outcome(&self) -> Outcome {
        if let Some(outcome) = &self.outcome {
            return outcome.clone();
        }
        match &self.inner {
            Some(inner) => inner.outcome().clone(),
            None => Outcome::Running,
        }
    }

    /// The transport lost the stream the session ran on (reset, closed, or its connection gone):
    /// a running session ends now as failed with [`SyncError::ConnectionLost`] instead of at its
    /// retransmission timer, and one that already has its outcome stops lingering.
    pub fn connection_lost(&mut self) {
        if matches!(self.outcome(), Outcome::Running) {
            self.outcome = Some(Outcome::Failed(SyncError::ConnectionLost));
        }
        self.phase = Phase::Over;
        self.deadline = None;
    }

    /// The feed session's counters (zero before authorization).
    pub fn stats(&self) -> Stats {
        self.inner.as_ref().map(|i| i.stats()).unwrap_or_default()
    }

    pub fn dir_stats(&self) -> DirStats {
        self.dir_stats
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Micros> {
        match self.phase {
            Phase::Directory => self.deadline,
            Phase::Feed => {
                let inner = self.inner.as_ref().and_then(|i| i.poll_timeout());
                // A responder waiting for the Hello keeps the directory phase's timer (a fresh
                // feed responder has none): else a peer that goes silent after DirDone leaves
                // the session running for good (found by the `auth_responder` fuzz target).
                inner.or(self.deadline.filter(|_| self.waits_for_hello()))
            }
            Phase::Over => None,
        }
    }

    /// A responder whose feed session is running and has not answered a Hello yet (it answers
    /// every Hello it takes; a message it ignores, such as one of another session, does not count).
    fn waits_for_hello(&self) -> bool {
        self.role == Role::Responder
            && self.outcome.is_none()
            && self
                .inner
                .as_ref()
                .is_some_and(|i| matches!(i.outcome(), Outcome::Running) && i.stats().messages_sent == 0)
    }

    pub fn handle_timeout(&mut self, now: Micros) {
        match self.phase {
            Phase::Over => {}
            Phase::Feed if self.waits_for_hello() && self.deadline.is_some_and(|d| now >= d) => {
                self.retransmit_dir(now);
            }
            Phase::Directory => {
                let Some(deadline) = self.deadline else { return };
                if now < deadline {
                    return;
                }
                self.retransmit_dir(now);
            }
            Phase::Feed => {
                let Some(inner) = self.inner.as_mut() else { return };
                inner.handle_timeout(now);
                let resent = self.drain_inner();
                // The responder may not have my DirDone: it answers no feed message without it.
                if resent && self.role == Role::Initiator && !self.feed_heard {
                    if let Some(last) = self.last_dir.clone() {
                        self.transmit.push_front(last);
                    }
                }
            }
        }
    }

    /// The directory phase's timer fired (or, for a responder, the wait for the Hello): resend
    /// the last directory message with backoff, or fail after `max_retries`.
    fn retransmit_dir(&mut self, now: Micros) {
        if self.retries >= self.cfg.max_retries {
            self.phase = Phase::Over;
            self.deadline = None;
            self.outcome = Some(Outcome::Failed(SyncError::Timeout(self.retries)));
            return;
        }
        self.retries += 1;
        if let Some(last) = self.last_dir.clone() {
            self.transmit.push_back(last);
        }
        let backoff = (self.cfg.rto_us << self.retries.min(16)).min(self.cfg.rto_max_us.max(self.cfg.rto_us));
        self.deadline = Some(now + backoff);
    }

    /// Handles a message from the peer. Errors are returned for undecodable or refused input;
    /// the replica changes only through the feed session, after authorization.
    pub fn handle_message(
        &mut self,
        now: Micros,
        directory: &mut Directory,
        replica: &mut Replica,
        bytes: &[u8],
    ) -> Result<(), SyncError> {
        if self.phase == Phase::Over {
            return Ok(());
        }
        let kind = wire::peek(bytes).map(|(_, _, kind)| kind);
        let directory_kind = matches!(kind, Some("DirHello" | "DirSync" | "DirDone" | "Refused"));
        if !directory_kind {
            if self.phase != Phase::Feed {
                // Not authorized yet (or never): feed data is dropped unread.
                return Ok(());
            }
            // The rule holds for every feed message, not only at authorization: a removal made
            // or learned while the session runs (the owner's own, between the peer's DirDone and
            // its Hello) stops the feed before anything more moves (found by the swarm, seed 87).
            if let (Policy::Directory(creds), Some(folder), Some(peer)) =
                (&self.policy, self.folder, self.peer_device)
            {
                if let Err(refusal) = may_sync(directory, creds, &folder, &peer) {
                    return self.refuse(now, refusal);
                }
            }
            let Some(inner) = self.inner.as_mut() else { return Ok(()) };
            let result = inner.handle_message(now, replica, bytes);
            if self.role == Role::Initiator && result.is_ok() {
                self.feed_heard = true;
            }
            self.drain_inner();
            return result;
        }
        let message = wire::decode(bytes, self.cfg.max_message_bytes)?;
        if message.session != self.id || message.version != WIRE_VERSION {
            return Ok(());
        }
        let creds = match &self.policy {
            Policy::Directory(creds) => creds.clone(),
            Policy::Open => return Ok(()),
        };
        match (self.role, message.body) {
            (_, Body::Refused { reason }) => {
                let refusal = Refusal::Peer(reason);
                self.phase = Phase::Over;
                self.outcome = Some(Outcome::Failed(SyncError::Refused(refusal.clone())));
                Err(SyncError::Refused(refusal))
            }
            (Role::Responder, Body::DirHello { folder, ticket, heads }) => {
                if self.last_dir.is_some() {
                    if self.phase == Phase::Directory {
                        self.resend_last();
                    }
                    return Ok(());
                }
                self.folder = Some(folder);
                let result = (|| {
                    let body = ticket
                        .verify_for_folder(&creds.cloud, now, &self.peer, &folder)
                        .map_err(Refusal::Ticket)?
                        .clone();
                    self.peer_device = Some(body.device);
                    heads_of(&heads)
                })();
                match result {
                    Ok(heads) => {
                        let mine: Vec<(DeviceId, u32)> = directory.heads().into_iter().collect();
                        let reserve = wire::encoded_len(&creds.ticket) + wire::encoded_len(&mine);
                        let (changes, complete) = self.budgeted(directory.missing_for(&heads), reserve);
                        self.dir_stats.changes_sent += changes.len() as u64;
                        let ticket = creds.ticket.clone();
                        self.send_dir(now, 1, Body::DirSync { ticket, heads: mine, changes, complete });
                        Ok(())
                    }
                    Err(refusal) => self.refuse(now, refusal),
                }
            }
            (Role::Initiator, Body::DirSync { ticket, heads, changes, complete }) => {
                if self.phase == Phase::Feed {
                    // My DirDone was lost.
                    self.resend_last();
                    return Ok(());
                }
                let result = (|| {
                    let folder = self.folder.ok_or(Refusal::Protocol("DirSync before DirHello"))?;
                    let body = ticket
                        .verify_for_folder(&creds.cloud, now, &self.peer, &folder)
                        .map_err(Refusal::Ticket)?
                        .clone();
                    self.peer_device = Some(body.device);
                    self.dir_stats.changes_received += changes.len() as u64;
                    directory.apply(&changes).map_err(Refusal::Directory)?;
                    if !complete {
                        return Err(Refusal::DirectoryBehind);
                    }
                    may_sync(directory, &creds, &folder, &body.device)?;
                    replica.set_signers(Some(directory.signers(&folder)));
                    let heads = heads_of(&heads)?;
                    Ok(self.budgeted(directory.missing_for(&heads), 0))
                })();
                match result {
                    Ok((changes, complete)) => {
                        self.dir_stats.changes_sent += changes.len() as u64;
                        self.send_dir(now, 2, Body::DirDone { changes, complete });
                        self.start_feed(now, replica);
                        Ok(())
                    }
                    Err(refusal) => self.refuse(now, refusal),
                }
            }
            (Role::Responder, Body::DirDone { changes, complete }) => {
                if self.phase == Phase::Feed || self.last_dir.is_none() {
                    return Ok(());
                }
                let result = (|| {
                    let folder = self.folder.ok_or(Refusal::Protocol("DirDone before DirHello"))?;
                    let peer = self.peer_device.ok_or(Refusal::Protocol("DirDone before DirHello"))?;
                    self.dir_stats.changes_received += changes.len() as u64;
                    directory.apply(&changes).map_err(Refusal::Directory)?;
                    if !complete {
                        return Err(Refusal::DirectoryBehind);
                    }
                    may_sync(directory, &creds, &folder, &peer)?;
                    replica.set_signers(Some(directory.signers(&folder)));
                    Ok(())
                })();
                match result {
                    Ok(()) => {
                        self.start_feed(now, replica);
                        Ok(())
                    }
                    Err(refusal) => self.refuse(now, refusal),
                }
            }
            // Out-of-turn directory messages (duplicates, a confused peer) are ignored.
            _ => Ok(()),
        }
    }

    fn start_feed(&mut self, now: Micros, replica: &Replica) {
        let inner = match self.role {
            Role::Initiator => Session::initiate(self.id, now, replica, self.cfg.clone(), self.retained),
            Role::Responder => Session::respond(self.id, replica, self.cfg.clone()),
        };
        self.inner = Some(inner);
        self.phase = Phase::Feed;
        // A responder keeps its directory timer (restarted) until the Hello arrives.
        self.deadline = (self.role == Role::Responder).then(|| now + self.cfg.rto_us);
        self.retries = 0;
        self.drain_inner();
    }

    /// Moves the feed session's messages to my queue; whether there were any.
    fn drain_inner(&mut self) -> bool {
        let Some(inner) = self.inner.as_mut() else { return false };
        let mut any = false;
        while let Some(bytes) = inner.poll_transmit() {
            self.transmit.push_back(bytes);
            any = true;
        }
        any
    }

    fn resend_last(&mut self) {
        if let Some(last) = self.last_dir.clone() {
            self.dir_stats.messages_sent += 1;
            self.dir_stats.bytes_sent += last.len() as u64;
            self.transmit.push_back(last);
        }
    }

    fn send_dir(&mut self, now: Micros, step: u32, body: Body) {
        let bytes = wire::encode(&Message { version: WIRE_VERSION, session: self.id, step, body });
        self.dir_stats.messages_sent += 1;
        self.dir_stats.bytes_sent += bytes.len() as u64;
        self.transmit.push_back(bytes.clone());
        self.last_dir = Some(bytes);
        self.retries = 0;
        self.deadline = Some(now + self.cfg.rto_us);
    }

    fn refuse(&mut self, now: Micros, refusal: Refusal) -> Result<(), SyncError> {
        self.send_dir(now, 3, Body::Refused { reason: refusal.code() });
        self.phase = Phase::Over;
        self.deadline = None;
        self.outcome = Some(Outcome::Failed(SyncError::Refused(refusal.clone())));
        Err(SyncError::Refused(refusal))
    }

    /// A causal prefix of `changes` that fits one message beside `reserve` bytes of other
    /// fields; whether it is all of them.
    fn budgeted(&self, changes: Vec<SignedChange>, reserve: usize) -> (Vec<SignedChange>, bool) {
        let mut budget = self.cfg.max_message_bytes.saturating_sub(256 + reserve);
        let total = changes.len();
        let mut out = Vec::new();
        for change in changes {
            let len = wire::encoded_len(&change);
            if len > budget || out.len() >= crate::directory::CHANGES_PER_BATCH_MAX {
                break;
            }
            budget -= len;
            out.push(change);
        }
        let complete = out.len() == total;
        (out, complete)
    }
}

/// The rule between two devices ([`Directory::may_sync`]), or, when either side is the cloud
/// (the ticket authority, which keeps a replica of every feed), [`Directory::may_hold`] for the
/// device on the other side. The cloud is never a signer: what it relays stays verifiable.
fn may_sync(
    directory: &Directory,
    creds: &Credentials,
    folder: &FolderId,
    peer: &DeviceId,
) -> Result<(), Refusal> {
    let allowed = if *peer == creds.cloud {
        directory.may_hold(folder, &creds.device)
    } else if creds.device == creds.cloud {
        directory.may_hold(folder, peer)
    } else {
        directory.may_sync(folder, &creds.device, peer)
    };
    Ok(allowed?)
}

fn heads_of(heads: &[(DeviceId, u32)]) -> Result<Heads, Refusal> {
    if heads.len() > DEPS_MAX {
        return Err(Refusal::Protocol("too many directory heads"));
    }
    Ok(heads.iter().copied().collect())
}

//! The cloud as a sans-IO state machine: the verified directory, the ticket authority, the
//! address book, the pairing mailbox, the notices it owes connected devices, and its replicas of
//! folders with the sync sessions devices run against them.
//!
//! One API shape for every role: what comes in is a `handle_*` call with the caller's time; what
//! must go out or be stored is polled (`poll_notice`, `poll_persist`). The cloud holds no device
//! key: its key signs tickets only. Password work (argon2, slow on purpose) is the driver's: a
//! request that needs a password reaches [`Cloud::handle_pair_request`] only with the user whose
//! account password the driver checked; account names and passwords (the relay's web login) stay
//! in the driver.
//!
//! Persistence: every directory change the cloud accepts is handed out once by
//! [`Cloud::poll_persist`]; the driver must store it before it sends the answer to the request
//! that carried it (so an acknowledged change survives a crash). What is not stored is lost on a
//! crash: the address book and the pairing mailbox are volatile by design (devices announce again
//! and pairings are retried), the directory is rebuilt from the stored changes by [`Cloud::new`].
//! Replica changes are handed out as [`Persist::Items`]; the driver commits them before it sends
//! any transmit polled after them. They come from sessions ([`Cloud::handle_sync`]) and from
//! items the driver received outside any session ([`Cloud::merge_items`], the relay's FeedSync
//! POST); a driver that checks signatures before it takes its lock hands the result in with
//! [`Cloud::set_verified`], and a driver over streams reports a stream that broke with
//! [`Cloud::handle_lost`]. [`Cloud::restart`] is a crash and restart: volatile state goes,
//! the replicas are rebuilt from what they hold under a new epoch.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::authz::{Credentials, Policy};
use crate::control::{self, ControlError, Notice, PairView, PeerAddr, Request, Response};
use crate::directory::{
    ChangeId, Directory, FolderId, SignedChange, UserId, CHANGES_PER_BATCH_MAX, DEPS_MAX,
};
use crate::feedsync::{FeedsyncError, Item};
use crate::refusal::DirCode;
use crate::replica::Replica;
use crate::sessions::{Commit, Ended, Peer, Sessions, Stream, Transmit};
use crate::signing::{DeviceId, DeviceKey, Verified};
use crate::sync::Config;
use crate::ticket::ChannelKey;
use crate::ticket::{CloudId, Rights, Ticket, TicketAuthority, TICKET_LIFETIME_US};
use crate::time::Micros;

/// The cloud's bounds on what devices make it keep.
#[derive(Clone, Debug)]
pub struct CloudLimits {
    /// Pending pairings per user.
    pub pairings_per_user: usize,
    /// Pending pairings in all (past it the oldest goes).
    pub pairings_max: usize,
    /// Notices queued for the driver (past it the oldest goes; devices also sync on a schedule).
    pub notices_max: usize,
    /// Lifetime of the tickets the cloud issues.
    pub ticket_lifetime_us: Micros,
}

impl Default for CloudLimits {
    fn default() -> Self {
        Self {
            pairings_per_user: 16,
            pairings_max: 65_536,
            notices_max: 4096,
            ticket_lifetime_us: TICKET_LIFETIME_US,
        }
    }
}

/// A notice for connected devices: the driver sends it to each connected device that may see it
/// ([`Cloud::may_see`]) other than `origin`, the device whose request caused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub notice: Notice,
    pub origin: Option<DeviceId>,
}

/// Something the driver must store.
#[derive(Clone, Debug, PartialEq)]
pub enum Persist<P = DeviceId> {
    /// Directory changes accepted since the last poll, in the order they were applied.
    Directory(Vec<SignedChange>),
    /// A replica's changes.
    Items(Commit<P>),
}

/// The cloud's replicas, by folder (sorted). Drivers and tests read them here; only the cloud
/// changes them (there is no public way to make or change one of these).
#[derive(Debug)]
pub struct Replicas(Vec<(FolderId, Replica)>);

impl Replicas {
    pub fn get(&self, folder: &FolderId) -> Option<&Replica> {
        self.index(folder).ok().map(|i| &self.0[i].1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Replicas with their folders, by folder.
    pub fn iter(&self) -> impl Iterator<Item = (&FolderId, &Replica)> {
        self.0.iter().map(|(f, r)| (f, r))
    }

    pub fn keys(&self) -> impl Iterator<Item = &FolderId> {
        self.0.iter().map(|(f, _)| f)
    }

    pub fn values(&self) -> impl Iterator<Item = &Replica> {
        self.0.iter().map(|(_, r)| r)
    }

    fn index(&self, folder: &FolderId) -> Result<usize, usize> {
        self.0.binary_search_by_key(folder, |(f, _)| *f)
    }
}

type Pair<'a> = (&'a FolderId, &'a Replica);

fn pair((folder, replica): &(FolderId, Replica)) -> Pair<'_> {
    (folder, replica)
}

impl<'a> IntoIterator for &'a Replicas {
    type Item = Pair<'a>;
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (FolderId, Replica)>, fn(&'a (FolderId, Replica)) -> Pair<'a>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(pair)
    }
}

/// Why [`Cloud::merge_items`] merged nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MergeItemsError {
    #[error("no such folder")]
    NoSuchFolder,
}

/// The cloud.
#[derive(Debug)]
pub struct Cloud<P: Peer = DeviceId> {
    id: CloudId,
    authority: TicketAuthority,
    dir: Directory,
    limits: CloudLimits,
    addrs: BTreeMap<DeviceId, PeerAddr>,
    pairings: BTreeMap<u64, PairView>,
    next_pairing: u64,
    /// Changes the driver has (stored, or handed out by `poll_persist`).
    handed_out: BTreeSet<ChangeId>,
    /// The directory's size when devices were last told it changed.
    announced_len: usize,
    notices: VecDeque<Outgoing>,
    /// Whether sessions are open (no tickets, no directory: the simulator's plain model).
    open: bool,
    /// Replicas by folder, sorted. Public to read (a driver's HTTP views, tests); the cloud
    /// alone changes them.
    pub replicas: Replicas,
    epoch: u64,
    sessions: Sessions<P>,
    ended: VecDeque<Ended<P>>,
}

impl<P: Peer> Cloud<P> {
    /// A cloud whose ticket key is `key` and whose stored directory is `dir` (its changes count as
    /// stored).
    pub fn new(key: DeviceKey, dir: Directory, limits: CloudLimits) -> Self {
        let handed_out = dir.changes().map(SignedChange::id).collect();
        let announced_len = dir.len();
        Self {
            id: DeviceId::of(&key),
            authority: TicketAuthority::new(key),
            dir,
            limits,
            addrs: BTreeMap::new(),
            pairings: BTreeMap::new(),
            next_pairing: 1,
            handed_out,
            announced_len,
            notices: VecDeque::new(),
            open: false,
            replicas: Replicas(Vec::new()),
            epoch: 0,
            sessions: Sessions::new(Default::default()),
            ended: VecDeque::new(),
        }
    }

    /// Sets how the cloud's sync sessions run and the epoch of replicas it makes.
    pub fn with_sessions(mut self, cfg: Config, epoch: u64) -> Self {
        self.sessions = Sessions::new(std::sync::Arc::new(cfg));
        self.epoch = epoch;
        self
    }

    /// Runs open sessions (no tickets, no directory) on the one feed
    /// [`crate::device::OPEN_FOLDER`]: the simulator's plain model.
    pub fn open_sessions(mut self) -> Self {
        self.open = true;
        self.install(crate::device::OPEN_FOLDER, Replica::new(self.epoch));
        self
    }

    /// Installs a stored replica of `folder`.
    pub fn install(&mut self, folder: FolderId, replica: Replica) {
        match self.replicas.index(&folder) {
            Ok(i) => self.replicas.0[i].1 = replica,
            Err(i) => self.replicas.0.insert(i, (folder, replica)),
        }
    }

    pub fn replica(&self, folder: &FolderId) -> Option<&Replica> {
        self.replicas.get(folder)
    }

    /// Replicas, by folder.
    pub fn replicas(&self) -> impl Iterator<Item = (&FolderId, &Replica)> {
        self.replicas.iter()
    }

    /// Whether the cloud keeps a replica of `folder`: every folder of its directory (or the one
    /// open feed).
    fn keeps(&self, folder: &FolderId) -> bool {
        if self.open {
            *folder == crate::device::OPEN_FOLDER
        } else {
            self.dir.folder(folder).is_some()
        }
    }

    fn replica_index(&mut self, folder: FolderId) -> usize {
        match self.replicas.index(&folder) {
            Ok(i) => i,
            Err(i) => {
                self.replicas.0.insert(i, (folder, Replica::new_signed(self.epoch, folder.scope())));
                i
            }
        }
    }

    fn session_policy(&mut self, now: Micros, folder: FolderId) -> Policy {
        if self.open {
            return Policy::Open;
        }
        let ticket = self.own_ticket(now, folder);
        Policy::Directory(Box::new(Credentials { device: self.id, ticket, cloud: self.id }))
    }

    /// A sync message from `peer`, whose channel key the transport authenticated as `channel`.
    /// A session's first message (`DirHello`, or `Hello` for open sessions) opens a responder.
    /// Changes it merges are handed out by [`Cloud::poll_persist`] and announced to the devices
    /// that hold the folder (not to the sender).
    pub fn handle_sync(&mut self, now: Micros, peer: P, channel: ChannelKey, bytes: &[u8]) {
        let open_folder = self.open.then_some(crate::device::OPEN_FOLDER);
        let Some((sid, folder, new)) = self.sessions.route(peer, bytes, open_folder) else { return };
        let opens = new.then(|| self.session_policy(now, folder));
        let replica = match self.keeps(&folder) {
            true => {
                let i = self.replica_index(folder);
                Some(&mut self.replicas.0[i].1)
            }
            false => None,
        };
        let committed =
            self.sessions.deliver(now, peer, channel, sid, folder, opens, &mut self.dir, replica, bytes);
        // The sender's device, named by its channel key (the transport binds the two).
        let origin = Some(DeviceId(channel.0));
        if committed && !self.open {
            self.folder_changed(folder, origin);
        }
        self.after_directory_change(origin);
        while let Some(e) = self.sessions.ended.pop_front() {
            self.ended.push_back(e);
        }
    }

    /// A control request from `device` (authenticated by the channel; the driver's peer handle
    /// `peer`) numbered `id` by the device: the answer goes out as [`Stream::Response`].
    pub fn handle_control(&mut self, now: Micros, peer: P, device: DeviceId, id: u64, bytes: &[u8]) {
        let response = match control::decode::<Request>(bytes, control::CONTROL_MAX) {
            Ok(request) => self.handle_request(now, device, request),
            Err(_) => Response::Refused(ControlError::Limit),
        };
        let bytes = control::encode(&response);
        self.sessions.transmit.push_back(Transmit { to: peer, stream: Stream::Response(id), bytes });
    }

    /// Sends the driver's own answer to request `id` of `peer`: for the requests that need a
    /// password checked first ([`Cloud::handle_pair_request`]), whose answer the driver makes.
    pub fn respond(&mut self, peer: P, id: u64, response: &Response) {
        let bytes = control::encode(response);
        self.sessions.transmit.push_back(Transmit { to: peer, stream: Stream::Response(id), bytes });
    }

    /// Runs the sessions' timers that are due.
    pub fn handle_timeout(&mut self, now: Micros) {
        for (peer, sid, folder) in self.sessions.due(now) {
            if self.keeps(&folder) {
                let i = self.replica_index(folder);
                self.sessions.timeout(now, peer, sid, &self.replicas.0[i].1);
            } else {
                let scratch = Replica::new_signed(0, folder.scope());
                self.sessions.timeout(now, peer, sid, &scratch);
            }
        }
        while let Some(e) = self.sessions.ended.pop_front() {
            self.ended.push_back(e);
        }
    }

    /// The transport lost the stream of session `sid` with `peer` (reset, finished early, or its
    /// connection gone): the session ends now, failed with `ConnectionLost`, instead of at its
    /// retransmission timer, so a peer that drops streams holds no table entry for long.
    pub fn handle_lost(&mut self, peer: P, sid: u64) {
        let Some(folder) = self.sessions.folder_of(peer, sid) else { return };
        if self.keeps(&folder) {
            let i = self.replica_index(folder);
            self.sessions.lost(peer, sid, &self.replicas.0[i].1);
        } else {
            let scratch = Replica::new_signed(0, folder.scope());
            self.sessions.lost(peer, sid, &scratch);
        }
        while let Some(e) = self.sessions.ended.pop_front() {
            self.ended.push_back(e);
        }
    }

    /// The folder of session `sid` with `peer`, while it runs.
    pub fn session_folder(&self, peer: P, sid: u64) -> Option<FolderId> {
        self.sessions.folder_of(peer, sid)
    }

    /// Signatures the driver checked ahead of the next message for `folder`, outside whatever
    /// lock it keeps the cloud under (see `Replica::set_verified`); they replace the previous
    /// set. Only valid signatures are in it, so it changes no outcome, only where the work runs.
    pub fn set_verified(&mut self, folder: FolderId, verified: Verified) {
        // A folder the cloud does not keep runs on a scratch replica that refuses.
        if self.keeps(&folder) {
            let i = self.replica_index(folder);
            self.replicas.0[i].1.set_verified(verified);
        }
    }

    /// Merges items from outside any session (a feed posted to the driver's web API) into the
    /// replica of `folder`, each checked against the folder's signers as a session's are
    /// (`verified`: signatures the driver checked ahead, see [`Cloud::set_verified`]). What
    /// changed is handed out by [`Cloud::poll_persist`] as a commit from no peer, and devices
    /// holding the folder are told. Returns, per item, whether it changed the replica or why it
    /// was refused.
    pub fn merge_items(
        &mut self,
        folder: FolderId,
        items: &[Arc<Item>],
        verified: Verified,
    ) -> Result<Vec<Result<bool, FeedsyncError>>, MergeItemsError> {
        if self.open || !self.keeps(&folder) {
            return Err(MergeItemsError::NoSuchFolder);
        }
        let signers = self.dir.signers(&folder);
        let i = self.replica_index(folder);
        let replica = &mut self.replicas.0[i].1;
        replica.set_signers(Some(signers));
        replica.set_verified(verified);
        let head = replica.head();
        let results = items.iter().map(|item| replica.merge(item)).collect();
        replica.set_verified(Verified::default());
        let changed: Vec<(Arc<Item>, u64)> =
            replica.log_since(head).map(|c| (c.item.clone(), c.fp)).collect();
        if !changed.is_empty() {
            self.sessions.commits.push_back(Commit { folder, from: None, items: changed });
            self.folder_changed(folder, None);
        }
        Ok(results)
    }

    /// The next bytes to send (session messages and answers to control requests).
    pub fn poll_transmit(&mut self) -> Option<Transmit<P>> {
        self.sessions.transmit.pop_front()
    }

    /// The earliest session deadline.
    pub fn poll_timeout(&self) -> Option<Micros> {
        self.sessions.poll_timeout()
    }

    /// The next session that ended.
    pub fn poll_ended(&mut self) -> Option<Ended<P>> {
        self.ended.pop_front()
    }

    /// Sessions running now.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// A crash and restart: sessions, the address book, pairings and queued notices are lost;
    /// the directory and the replicas are what was stored, the replicas rebuilt under `epoch`.
    pub fn restart(&mut self, epoch: u64) {
        self.sessions.clear();
        self.sessions.commits.clear();
        self.ended.clear();
        self.addrs.clear();
        self.pairings.clear();
        self.notices.clear();
        self.epoch = epoch;
        for (folder, replica) in &mut self.replicas.0 {
            *replica = crate::device::rebuilt(replica, epoch, *folder, !self.open);
        }
    }

    /// The ticket key's id (what devices trust).
    pub fn id(&self) -> CloudId {
        self.id
    }

    pub fn directory(&self) -> &Directory {
        &self.dir
    }

    /// The directory, for a sync session's catch-up (`AuthSession::handle_message`); the changes
    /// it applies are handed out by the next [`Cloud::poll_persist`] like any others.
    pub fn directory_mut(&mut self) -> &mut Directory {
        &mut self.dir
    }

    /// The address book: the last address each active device announced.
    pub fn addresses(&self) -> impl Iterator<Item = &PeerAddr> {
        self.addrs.values()
    }

    /// Pending pairings (the relay's HTTP API shows whether a device has one).
    pub fn pairings(&self) -> impl Iterator<Item = &PairView> {
        self.pairings.values()
    }

    /// Whether `device` may see `notice`: folder notices go to devices that may hold the folder,
    /// directory and pairing notices to active devices.
    pub fn may_see(&self, notice: &Notice, device: &DeviceId) -> bool {
        match notice {
            Notice::Folder(f) => self.dir.may_hold(f, device).is_ok(),
            Notice::Directory | Notice::Pairing => self.dir.user_of(device).is_some(),
        }
    }

    /// A ticket for the cloud itself, for its side of a sync session on `folder`.
    pub fn own_ticket(&mut self, now: Micros, folder: FolderId) -> Ticket {
        let rights = Rights { folders: vec![folder], relay: false };
        self.authority.issue(self.id, self.id.into(), rights, now, self.limits.ticket_lifetime_us)
    }

    /// Records that the cloud's replica of `folder` changed (a session or a posted feed merged
    /// something): connected devices that hold it are told.
    pub fn folder_changed(&mut self, folder: FolderId, origin: Option<DeviceId>) {
        self.notify(Notice::Folder(folder), origin);
    }

    /// Answers a request from `device` (authenticated by the channel) that needs no password.
    /// Requests that do are refused here: see [`Cloud::handle_pair_request`].
    pub fn handle_request(&mut self, now: Micros, device: DeviceId, request: Request) -> Response {
        match self.request(now, device, request) {
            Ok(response) => response,
            Err(error) => Response::Refused(error),
        }
    }

    fn request(&mut self, now: Micros, device: DeviceId, request: Request) -> Result<Response, ControlError> {
        Ok(match request {
            Request::Ticket => {
                let active = self.dir.user_of(&device).is_some();
                let folders = if active { self.dir.folders_of(&device) } else { Vec::new() };
                let rights = Rights { folders, relay: active };
                let lifetime = self.limits.ticket_lifetime_us;
                let ticket = self.authority.issue(device, device.into(), rights, now, lifetime);
                Response::Ticket { ticket, cloud: self.id }
            }
            Request::Directory { heads, changes } => {
                if heads.len() > DEPS_MAX || changes.len() > CHANGES_PER_BATCH_MAX {
                    return Err(ControlError::Limit);
                }
                self.dir.apply(&changes).map_err(|e| ControlError::Directory(DirCode::of(&e)))?;
                self.after_directory_change(Some(device));
                let heads = heads.into_iter().collect();
                let mut missing = self.dir.missing_for(&heads);
                missing.truncate(CHANGES_PER_BATCH_MAX);
                Response::Directory { changes: missing }
            }
            Request::Announce { addr } => {
                if addr.device != device {
                    return Err(ControlError::NotOwnAddress);
                }
                if crate::control::Bounded::check_bounds(&addr).is_err() {
                    return Err(ControlError::Limit);
                }
                // Only active devices are ever handed out as peers, so only they are kept: the
                // address book is bounded by the directory.
                if self.dir.user_of(&device).is_none() {
                    return Err(ControlError::NotActive);
                }
                self.addrs.insert(device, addr);
                Response::Ok
            }
            Request::Peers { folder } => {
                self.dir
                    .may_hold(&folder, &device)
                    .map_err(|d| ControlError::Folder(crate::refusal::Refusal::from(d).code()))?;
                let mapped = self.dir.folder(&folder).map(|f| f.mapped.clone()).unwrap_or_default();
                let peers = mapped
                    .iter()
                    .filter(|d| **d != device && self.dir.may_sync(&folder, &device, d).is_ok())
                    .filter_map(|d| self.addrs.get(d).cloned())
                    .take(crate::control::PEERS_MAX)
                    .collect();
                Response::Peers { peers }
            }
            // Password requests: the driver checks the password first.
            Request::Account { .. } | Request::PairRequest { .. } => {
                return Err(ControlError::PasswordRequired)
            }
            Request::PairStatus { id } => {
                let p = self
                    .pairings
                    .get(&id)
                    .filter(|p| p.device == device)
                    .ok_or(ControlError::NoSuchPairing)?;
                Response::PairStatus(p.clone())
            }
            Request::PairConsent { id, pairing } => {
                let p = self
                    .pairings
                    .get_mut(&id)
                    .filter(|p| p.device == device)
                    .ok_or(ControlError::NoSuchPairing)?;
                if pairing.device != device || p.existing.is_none() {
                    return Err(ControlError::ConsentOutOfTurn);
                }
                if crate::directory::pairing_commitment(&device, &pairing.nonce_new) != p.commitment {
                    return Err(ControlError::CommitmentMismatch);
                }
                p.pairing = Some(pairing);
                self.notify(Notice::Pairing, Some(device));
                Response::Ok
            }
            Request::PairList => {
                let user = self.dir.user_of(&device).ok_or(ControlError::NotActive)?;
                // Pairings whose device has joined are done.
                let dir = &self.dir;
                self.pairings.retain(|_, p| dir.user_of(&p.device).is_none());
                let mine = self.pairings.values().filter(|p| p.user == user);
                Response::Pairings(mine.take(crate::control::PAIRINGS_MAX).cloned().collect())
            }
            Request::PairNonce { id, nonce } => {
                let user = self.dir.user_of(&device).ok_or(ControlError::NotActive)?;
                let p = self
                    .pairings
                    .get_mut(&id)
                    .filter(|p| p.user == user)
                    .ok_or(ControlError::NoSuchPairing)?;
                if p.existing.is_none() {
                    p.existing = Some((device, nonce));
                }
                Response::Ok
            }
        })
    }

    /// A new device's pairing request, after the driver checked the password of `user`'s account.
    /// One pending request per device (a new one replaces it); at most
    /// [`CloudLimits::pairings_per_user`] per user.
    pub fn handle_pair_request(&mut self, device: DeviceId, user: UserId, commitment: [u8; 32]) -> Response {
        if self.dir.user_of(&device).is_some() {
            return Response::Refused(ControlError::AlreadyActive);
        }
        // A retransmitted request (its answer was lost or late) gets the same pairing: a new id
        // would orphan the one the device already took from the first answer, and it would ask
        // about it forever (found by the swarm, seed 295).
        if let Some(p) = self
            .pairings
            .values()
            .find(|p| p.device == device && p.user == user && p.commitment == commitment)
        {
            return Response::PairId { id: p.id };
        }
        self.pairings.retain(|_, p| p.device != device);
        if self.pairings.values().filter(|p| p.user == user).count() >= self.limits.pairings_per_user {
            return Response::Refused(ControlError::TooManyPairings);
        }
        while self.pairings.len() >= self.limits.pairings_max {
            self.pairings.pop_first();
        }
        let id = self.next_pairing;
        self.next_pairing += 1;
        self.pairings.insert(id, PairView { id, user, device, commitment, existing: None, pairing: None });
        self.notify(Notice::Pairing, Some(device));
        Response::PairId { id }
    }

    /// Whether `device` may set up the account of its user (the driver checks the name's form and
    /// who holds it): the user, if the device is active.
    pub fn account_user(&self, device: &DeviceId) -> Result<UserId, ControlError> {
        self.dir.user_of(device).ok_or(ControlError::NotActive)
    }

    /// Call after the directory changed by any path (a request, a session's catch-up): connected
    /// devices are told, and the changes are queued for storage.
    pub fn after_directory_change(&mut self, origin: Option<DeviceId>) {
        // Once per change, however many times the driver asks.
        if self.dir.len() > self.announced_len {
            self.announced_len = self.dir.len();
            self.notify(Notice::Directory, origin);
        }
    }

    /// What to store: directory changes (each handed out once) and replica changes.
    pub fn poll_persist(&mut self) -> Option<Persist<P>> {
        if let Some(c) = self.sessions.commits.pop_front() {
            return Some(Persist::Items(c));
        }
        if self.dir.len() == self.handed_out.len() {
            return None;
        }
        let new: Vec<SignedChange> =
            self.dir.changes().filter(|c| !self.handed_out.contains(&c.id())).cloned().collect();
        self.handed_out.extend(new.iter().map(SignedChange::id));
        (!new.is_empty()).then_some(Persist::Directory(new))
    }

    /// The driver could not store `changes` (handed out by `poll_persist`): they are handed out
    /// again by the next poll.
    pub fn persist_failed(&mut self, changes: &[SignedChange]) {
        for c in changes {
            self.handed_out.remove(&c.id());
        }
    }

    /// The next notice for connected devices.
    pub fn poll_notice(&mut self) -> Option<Outgoing> {
        self.notices.pop_front()
    }

    fn notify(&mut self, notice: Notice, origin: Option<DeviceId>) {
        if self.notices.len() >= self.limits.notices_max {
            self.notices.pop_front();
        }
        self.notices.push_back(Outgoing { notice, origin });
    }

    /// Checks the state's invariants (the simulator calls it after every event).
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        if self.addrs.iter().any(|(d, a)| *d != a.device) {
            return Err("an address filed under another device");
        }
        if self.pairings.len() > self.limits.pairings_max {
            return Err("too many pairings");
        }
        if self.notices.len() > self.limits.notices_max {
            return Err("too many notices");
        }
        if self.handed_out.len() > self.dir.len() {
            return Err("handed out a change the directory does not hold");
        }
        self.sessions.check_invariants()?;
        if self.replicas.0.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("replicas out of order");
        }
        if self.replicas.values().any(|r| r.check_structure().is_err()) {
            return Err("a replica's structure");
        }
        Ok(())
    }
}

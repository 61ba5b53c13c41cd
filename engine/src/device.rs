//! A device as a sans-IO state machine: its directory, its replicas, its sync sessions with peers
//! and the cloud, its ticket and the control requests it makes. The simulator and the node run
//! this same type; they differ only in what they feed it and where its output goes.
//!
//! One API shape (as [`crate::cloud::Cloud`]):
//! - in: [`Device::handle_sync`] (a sync message from a peer), [`Device::handle_response`] (the
//!   cloud's answer to a control request), [`Device::handle_notice`], [`Device::handle_timeout`],
//!   and local commands ([`Device::write`], [`Device::start_sync`], [`Device::request`]);
//! - out: [`Device::poll_transmit`], [`Device::poll_persist`], [`Device::poll_event`],
//!   [`Device::poll_timeout`].
//!
//! Time: every `now` is the device's clock in microseconds since the Unix epoch. Timers are
//! deadlines on that clock and ticket windows are checked against it, so a driver passes its wall
//! time at start plus a monotonic clock's elapsed time (the node), or its virtual clock plus the
//! device's skew (the simulator). Randomness (session ids, the replica epoch) comes from the
//! caller.
//!
//! File content (Live Folders) goes through the same device: per folder, the content scheduler
//! ([`crate::folder::Fetcher`]) that chooses which peer each range of a wanted file comes from.
//! The driver says what the device wants ([`Device::want_content`]) and what it learnt about
//! holders and routes, carries out the scheduler's requests ([`Device::poll_content`]), feeds back
//! each verified group or failure, and sees completions ([`Device::poll_content_event`]); the
//! scheduler's timers are the device's ([`Device::poll_timeout`], [`Device::handle_timeout`]).
//! Content is not in [`Event`] because its events belong to the driver's per-folder transfer
//! loop, not to the session driver.
//!
//! Persistence and crashes: each [`Persist`] is what the driver must commit before it sends any
//! transmit polled after it. A crash loses everything not committed: sessions, cursors, pending
//! requests, and merges whose commit did not happen. The driver restarts the device from its
//! store with a new replica epoch ([`Device::restart`]), so that peers' cursors into the old log
//! are not trusted. One exception is open to a driver: items merged from a peer
//! ([`Commit::from`] is `Some`) may be stored later (at the session's end), since a device
//! acknowledges nothing it merges and a restarted one fetches again what it lost; the node does
//! so. A cloud's merges are acknowledged and have no such exception.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::authz::{Credentials, Policy};
use crate::control::{self, ControlError, Notice, PeerAddr, Request, Response};
use crate::directory::{Directory, FolderId, SignedChange, CHANGES_PER_BATCH_MAX};
use crate::feedsync::{Edit, Endpoint, FeedsyncError, Item, ItemId, When};
use crate::folder::fetch::{self, Failure, FetchConfig, FetchError, Fetcher, RequestId, Route};
use crate::folder::ContentHash;
use crate::replica::Replica;
use crate::sessions::{Commit, Ended, Peer, Sessions, Stream, Transmit};
use crate::signing::{DeviceId, DeviceKey};
use crate::sync::Config;
use crate::ticket::{ChannelKey, CloudId, Ticket};
use crate::time::Micros;

/// The folder of an open (unauthorized, unsigned) device: it has one feed and no directory.
pub const OPEN_FOLDER: FolderId = FolderId([0; 16]);

/// Control requests a device has outstanding at once (one per kind and folder).
pub const REQUESTS_MAX: usize = 64;

/// Who the device is.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // made once per device
pub enum Identity {
    /// No key, no directory, no tickets: one unsigned feed ([`OPEN_FOLDER`]) synced with
    /// plain sessions. The simulator's plain model.
    Open(Endpoint),
    /// A keyed device: signed versions, the verified directory, tickets from the cloud `cloud`.
    Keyed { key: DeviceKey, cloud: CloudId },
}

/// How the device behaves.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// The sync sessions' configuration, shared (a simulator's devices hold one copy).
    pub sync: std::sync::Arc<Config>,
    /// First retry of an unanswered control request; doubles up to `request_rto_max_us`.
    pub request_rto_us: Micros,
    pub request_rto_max_us: Micros,
    /// Refresh the ticket when half of its lifetime is over.
    pub refresh_tickets: bool,
    /// The content scheduler's configuration (each folder's [`Fetcher`] starts from it).
    pub content: std::sync::Arc<FetchConfig>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            sync: Default::default(),
            request_rto_us: 1_000_000,
            request_rto_max_us: 30_000_000,
            refresh_tickets: true,
            content: Default::default(),
        }
    }
}

/// Something a driver or application must see.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // polled one at a time, never stored in bulk
pub enum Event<P> {
    /// A session ended, with its outcome (a refusal carries its typed reason).
    SessionEnded(Ended<P>),
    /// The directory gained changes (from a session's catch-up or a control answer).
    DirectoryChanged,
    /// A fresh ticket arrived.
    TicketRenewed { expires_us: Micros },
    /// The cloud refused control request `id` (0: a directory answer this device refused).
    Refused { id: u64, request: &'static str, error: ControlError },
    /// The cloud's answer to peers request `id`.
    Peers { id: u64, folder: FolderId, peers: Vec<PeerAddr> },
    /// Any other answer to request `id` (pairing, announce, account), for the application.
    Answer { id: u64, request: Request, response: Response },
    /// The cloud says a folder changed: sync it with the cloud soon.
    FolderChanged(FolderId),
    /// An answer that does not fit its request (a ticket for another device or from another
    /// cloud); dropped.
    BadAnswer { request: &'static str },
}

/// What the driver must store.
#[derive(Clone, Debug)]
pub enum Persist<P> {
    Items(Commit<P>),
    Directory(Vec<SignedChange>),
}

/// Why a local command did not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    #[error("this device has no ticket yet")]
    NoTicket,
    #[error("a session with this peer on this folder is already running")]
    Busy,
    #[error("this device does not hold that folder")]
    NotHeld,
    #[error("too many control requests outstanding")]
    TooManyRequests,
    #[error("an open device has no key")]
    NoKey,
    #[error("this device's ticket does not grant the folder (a fresh one was asked for)")]
    NotGranted,
    #[error("this device is not an active device of its directory yet (pairing under way?)")]
    NotActive,
    #[error("directory change refused: {0}")]
    Directory(#[from] crate::directory::DirError),
    #[error(transparent)]
    Feedsync(#[from] FeedsyncError),
}

#[derive(Debug)]
struct Pending {
    id: u64,
    request: Request,
    deadline: Micros,
    retries: u32,
}

/// What only a keyed device has. Boxed: the simulator's plain model runs 100,000 open devices,
/// for which it would be most of their memory.
#[derive(Debug)]
struct Keys {
    key: DeviceKey,
    id: DeviceId,
    cloud: CloudId,
    ticket: Option<Ticket>,
    ticket_due: Option<Micros>,
}

/// The directory and how much of it was handed out to store. Boxed and made on first change, for
/// the same reason as [`Keys`].
#[derive(Debug, Default)]
struct DirState {
    dir: Directory,
    persisted: usize,
    /// Each author's last change handed out for storing. The directory's log is in its total
    /// order, not in arrival order: a change that arrives late can sort before stored ones, so
    /// what is new is found by author and sequence number.
    heads: crate::directory::Heads,
    /// What the cloud is known to hold (a lower bound: each author's last change it accepted
    /// from us or sent us). Volatile: after a restart or a refused push, everything goes again.
    cloud_heads: crate::directory::Heads,
}

/// How the device times its own requests and ticket refresh.
#[derive(Clone, Copy, Debug)]
struct Timing {
    request_rto_us: Micros,
    request_rto_max_us: Micros,
    refresh_tickets: bool,
}

/// The directory of a device that has none.
fn no_directory() -> &'static Directory {
    static EMPTY: std::sync::OnceLock<Directory> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Directory::new)
}

/// The device.
#[derive(Debug)]
pub struct Device<P: Peer> {
    endpoint: Endpoint,
    keys: Option<Box<Keys>>,
    /// The peer handle of the cloud (where control requests go).
    cloud: Option<P>,
    dir: Option<Box<DirState>>,
    /// Replicas by folder, sorted.
    replicas: Vec<(FolderId, Replica)>,
    epoch: u64,
    /// [`DeviceConfig`] but its sessions' part, which the session table keeps (once per device).
    cfg: Timing,
    sessions: Sessions<P>,
    requests: Vec<Pending>,
    next_request: u64,
    events: VecDeque<Event<P>>,
    persist: VecDeque<Persist<P>>,
    content_cfg: std::sync::Arc<FetchConfig>,
    /// Per folder with a transfer under way, its content scheduler. Bound: one per folder of
    /// the directory the driver asked content for (the driver ends it, [`Device::end_content`]).
    content: std::collections::BTreeMap<FolderId, Box<Fetcher<P>>>,
}

impl<P: Peer> Device<P> {
    /// A device restored from its store: `dir` and `replicas` are what was committed (replicas
    /// are rebuilt under `epoch`, which the caller draws anew on every start).
    pub fn new(
        identity: Identity,
        cloud: Option<P>,
        dir: Directory,
        replicas: Vec<(FolderId, Replica)>,
        epoch: u64,
        cfg: DeviceConfig,
    ) -> Self {
        let (endpoint, keys) = match identity {
            Identity::Open(endpoint) => (endpoint, None),
            Identity::Keyed { key, cloud } => {
                let id = DeviceId::of(&key);
                let keys = Keys { key, id, cloud, ticket: None, ticket_due: None };
                (id.endpoint(), Some(Box::new(keys)))
            }
        };
        let dir = (!dir.is_empty()).then(|| {
            Box::new(DirState {
                persisted: dir.len(),
                heads: dir.heads(),
                cloud_heads: Default::default(),
                dir,
            })
        });
        let mut device = Self {
            endpoint,
            keys,
            cloud,
            dir,
            replicas: Vec::new(),
            epoch,
            cfg: Timing {
                request_rto_us: cfg.request_rto_us,
                request_rto_max_us: cfg.request_rto_max_us,
                refresh_tickets: cfg.refresh_tickets,
            },
            content_cfg: cfg.content,
            sessions: Sessions::new(cfg.sync),
            requests: Vec::new(),
            next_request: 1,
            events: VecDeque::new(),
            persist: VecDeque::new(),
            content: Default::default(),
        };
        for (folder, replica) in replicas {
            device.install(folder, replica);
        }
        if device.keys.is_none() && device.replica(&OPEN_FOLDER).is_none() {
            device.install(OPEN_FOLDER, Replica::new(epoch));
        }
        device
    }

    /// Installs `replica` as the replica of `folder` as it is (the driver's own choice of
    /// replica: the simulator's forger keeps an unsigned one).
    pub fn install(&mut self, folder: FolderId, replica: Replica) {
        match self.replicas.binary_search_by_key(&folder, |(f, _)| *f) {
            Ok(i) => self.replicas[i].1 = replica,
            Err(i) => crate::sessions::insert_small(&mut self.replicas, i, (folder, replica)),
        }
    }

    pub fn config(&self) -> DeviceConfig {
        DeviceConfig {
            sync: self.sessions.cfg.clone(),
            request_rto_us: self.cfg.request_rto_us,
            request_rto_max_us: self.cfg.request_rto_max_us,
            refresh_tickets: self.cfg.refresh_tickets,
            content: self.content_cfg.clone(),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn id(&self) -> Option<DeviceId> {
        self.keys.as_ref().map(|k| k.id)
    }

    pub fn directory(&self) -> &Directory {
        self.dir.as_ref().map_or(no_directory(), |d| &d.dir)
    }

    pub fn ticket(&self) -> Option<&Ticket> {
        self.keys.as_ref().and_then(|k| k.ticket.as_ref())
    }

    pub fn replica(&self, folder: &FolderId) -> Option<&Replica> {
        self.replicas.binary_search_by_key(folder, |(f, _)| *f).ok().map(|i| &self.replicas[i].1)
    }

    /// Replicas, by folder.
    pub fn replicas(&self) -> impl Iterator<Item = (&FolderId, &Replica)> {
        self.replicas.iter().map(|(f, r)| (f, r))
    }

    /// Sessions running now.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The folder of session `sid` with `peer`, while it runs here.
    pub fn session_folder(&self, peer: P, sid: u64) -> Option<FolderId> {
        self.sessions.folder_of(peer, sid)
    }

    /// Whether a session this device started with `peer` on `folder` runs.
    pub fn syncing(&self, peer: P, folder: FolderId) -> bool {
        self.sessions.busy(peer, folder)
    }

    /// Sets the ticket (the first one from pairing or from the store; later ones come from
    /// [`Device::handle_response`]) and schedules its refresh at half its lifetime.
    pub fn set_ticket(&mut self, now: Micros, ticket: Ticket) {
        let lifetime = ticket.body.expires_us.saturating_sub(ticket.body.issued_us);
        if let Some(k) = self.keys.as_mut() {
            k.ticket_due = self.cfg.refresh_tickets.then(|| now.saturating_add(lifetime / 2));
            k.ticket = Some(ticket);
        }
    }

    /// Stops (or resumes) refreshing the ticket.
    pub fn set_refresh_tickets(&mut self, on: bool) {
        self.cfg.refresh_tickets = on;
        if let (false, Some(k)) = (on, self.keys.as_mut()) {
            k.ticket_due = None;
        }
    }

    /// Whether this device holds `folder`: an open device its one feed; a keyed one the folders
    /// its directory says are mapped here.
    fn holds(&self, folder: &FolderId) -> bool {
        match self.id() {
            None => *folder == OPEN_FOLDER,
            Some(id) => {
                self.replica(folder).is_some()
                    || self.directory().folder(folder).is_some_and(|f| f.mapped.contains(&id))
            }
        }
    }

    fn replica_index(&mut self, folder: FolderId) -> usize {
        match self.replicas.binary_search_by_key(&folder, |(f, _)| *f) {
            Ok(i) => i,
            Err(i) => {
                let replica = Replica::new_signed(self.epoch, folder.scope());
                crate::sessions::insert_small(&mut self.replicas, i, (folder, replica));
                i
            }
        }
    }

    fn policy(&self) -> Option<Policy> {
        match &self.keys {
            Some(k) => {
                let ticket = k.ticket.clone()?;
                Some(Policy::Directory(Box::new(Credentials { device: k.id, ticket, cloud: k.cloud })))
            }
            None => Some(Policy::Open),
        }
    }

    // ------------------------------------------------------------------ local commands

    /// Writes (puts, edits, deletes or resolves) item `id` of `folder` at wall time `when`.
    pub fn write(
        &mut self,
        folder: FolderId,
        id: &ItemId,
        when: &When,
        edit: &Edit,
    ) -> Result<Arc<Item>, CommandError> {
        if !self.holds(&folder) {
            return Err(CommandError::NotHeld);
        }
        let i = self.replica_index(folder);
        let replica = &mut self.replicas[i].1;
        let head = replica.head();
        match &self.keys {
            Some(k) => replica.change_signed(id, &k.key, when, edit)?,
            None => replica.change(id, &self.endpoint, when, edit)?,
        };
        let items: Vec<(Arc<Item>, u64)> = replica.log_since(head).map(|c| (c.item.clone(), c.fp)).collect();
        let state = replica.item(id).cloned().ok_or(CommandError::NotHeld)?;
        self.persist.push_back(Persist::Items(Commit { folder, from: None, items }));
        Ok(state)
    }

    /// Local changes to `folder`, all at `when`, as one write: signed together (one signature
    /// per [`crate::signing::BATCH_MAX`] versions, [`Replica::change_signed_many`]) and
    /// persisted as one commit. A bulk import's way in. Returns how many changes were made; on
    /// an error, the changes before it are made and persisted, as with that many
    /// [`Device::write`]s.
    pub fn write_many(
        &mut self,
        folder: FolderId,
        when: &When,
        changes: &[(ItemId, Edit)],
    ) -> Result<usize, CommandError> {
        if !self.holds(&folder) {
            return Err(CommandError::NotHeld);
        }
        let i = self.replica_index(folder);
        let replica = &mut self.replicas[i].1;
        let head = replica.head();
        let result = match &self.keys {
            Some(k) => replica.change_signed_many(&k.key, when, changes).map_err(|(_, e)| e),
            None => changes
                .iter()
                .try_fold(0, |n, (id, edit)| replica.change(id, &self.endpoint, when, edit).map(|_| n + 1)),
        };
        let items: Vec<(Arc<Item>, u64)> = replica.log_since(head).map(|c| (c.item.clone(), c.fp)).collect();
        if !items.is_empty() {
            self.persist.push_back(Persist::Items(Commit { folder, from: None, items }));
        }
        Ok(result?)
    }

    /// Starts a sync session of `folder` with `peer`, whose channel key the transport
    /// authenticated as `channel`; `sid` is the caller's random session id.
    pub fn start_sync(
        &mut self,
        now: Micros,
        peer: P,
        channel: ChannelKey,
        folder: FolderId,
        sid: u64,
    ) -> Result<(), CommandError> {
        if self.sessions.busy(peer, folder) {
            return Err(CommandError::Busy);
        }
        if !self.holds(&folder) {
            return Err(CommandError::NotHeld);
        }
        if self.id().is_some_and(|id| self.directory().user_of(&id).is_none()) {
            return Err(CommandError::NotActive);
        }
        // A ticket that does not grant the folder would only be refused by the peer: ask for a
        // fresh one instead (the directory may have granted it since).
        if self.ticket().is_some_and(|t| t.body.rights.folders.binary_search(&folder).is_err()) {
            if !self.pending(&Request::Ticket) {
                let _ = self.request(now, Request::Ticket);
            }
            return Err(CommandError::NotGranted);
        }
        self.force_sync(now, peer, channel, folder, sid)
    }

    /// [`Device::start_sync`] without this side's own checks (that it holds the folder, is
    /// active, and that its ticket grants the folder): for tests and simulated adversaries, so
    /// that what is tested is the peer's checks. Still one session per peer and folder.
    pub fn force_sync(
        &mut self,
        now: Micros,
        peer: P,
        channel: ChannelKey,
        folder: FolderId,
        sid: u64,
    ) -> Result<(), CommandError> {
        if self.sessions.busy(peer, folder) {
            return Err(CommandError::Busy);
        }
        let policy = self.policy().ok_or(CommandError::NoTicket)?;
        self.begin(now, peer, channel, folder, sid, policy);
        Ok(())
    }

    fn begin(
        &mut self,
        now: Micros,
        peer: P,
        channel: ChannelKey,
        folder: FolderId,
        sid: u64,
        policy: Policy,
    ) {
        let i = self.replica_index(folder);
        let replica = &self.replicas[i].1;
        let dir = self.dir.as_ref().map_or(no_directory(), |d| &d.dir);
        self.sessions.initiate(now, peer, channel, sid, folder, policy, dir, replica);
        self.drain();
    }

    /// Sends a control request to the cloud (retried until answered). At most one request of each
    /// kind and folder is outstanding: a new one replaces the old.
    pub fn request(&mut self, now: Micros, request: Request) -> Result<u64, CommandError> {
        let Some(cloud) = self.cloud else { return Err(CommandError::NoTicket) };
        self.requests.retain(|p| !same_kind(&p.request, &request));
        if self.requests.len() >= REQUESTS_MAX {
            return Err(CommandError::TooManyRequests);
        }
        let id = self.next_request;
        self.next_request += 1;
        let bytes = control::encode(&request);
        self.sessions.transmit.push_back(Transmit { to: cloud, stream: Stream::Request(id), bytes });
        self.requests.push(Pending {
            id,
            request,
            deadline: now.saturating_add(self.cfg.request_rto_us),
            retries: 0,
        });
        Ok(id)
    }

    /// Makes a directory change signed by this device's key at wall time `when` (seconds):
    /// creating a user or folder, inviting, mapping, pairing a device in. It goes to the cloud
    /// with the next [`Device::sync_directory`] and to peers with the next session.
    pub fn make(&mut self, when: i64, op: crate::directory::Op) -> Result<SignedChange, CommandError> {
        let k = self.keys.as_ref().ok_or(CommandError::NoKey)?;
        let change = self.dir.get_or_insert_with(Default::default).dir.make(&k.key, when, op)?;
        self.flush();
        Ok(change)
    }

    // ------------------------------------------------------------------ input

    /// A sync message from `peer` (authenticated by the transport as `channel`). A message of a
    /// session that runs nowhere here opens a responder only if it is a session's first message
    /// (a `Hello` for an open device, a `DirHello` for a keyed one).
    pub fn handle_sync(&mut self, now: Micros, peer: P, channel: ChannelKey, bytes: &[u8]) {
        let open_folder = self.keys.is_none().then_some(OPEN_FOLDER);
        let Some((sid, folder, new)) = self.sessions.route(peer, bytes, open_folder) else { return };
        let opens = match new {
            true => match self.policy() {
                Some(policy) => Some(policy),
                None => return,
            },
            false => None,
        };
        let dir_len = self.directory().len();
        let replica = match self.holds(&folder) {
            true => {
                let i = self.replica_index(folder);
                Some(&mut self.replicas[i].1)
            }
            false => None,
        };
        // An open device's sessions never touch a directory: a stand-in (no allocation).
        let mut none = Directory::new();
        let dir = match self.keys.is_some() {
            true => &mut self.dir.get_or_insert_with(Default::default).dir,
            false => &mut none,
        };
        self.sessions.deliver(now, peer, channel, sid, folder, opens, dir, replica, bytes);
        if self.directory().len() != dir_len {
            self.events.push_back(Event::DirectoryChanged);
        }
        self.drain();
    }

    /// The cloud's answer to control request `id` (a late or unknown answer is ignored).
    pub fn handle_response(&mut self, now: Micros, id: u64, bytes: &[u8]) {
        let Some(i) = self.requests.iter().position(|p| p.id == id) else { return };
        let Ok(response) = control::decode::<Response>(bytes, control::CONTROL_MAX) else { return };
        let request = self.requests.swap_remove(i).request;
        match (request, response) {
            (request, Response::Refused(error)) => {
                if let (Request::Directory { .. }, Some(state)) = (&request, self.dir.as_mut()) {
                    state.cloud_heads.clear();
                }
                self.events.push_back(Event::Refused { id, request: request.kind(), error });
            }
            (Request::Ticket, Response::Ticket { ticket, cloud }) => {
                if Some(cloud) != self.keys.as_ref().map(|k| k.cloud) || Some(ticket.body.device) != self.id()
                {
                    self.events.push_back(Event::BadAnswer { request: "ticket" });
                    return;
                }
                let expires_us = ticket.body.expires_us;
                self.set_ticket(now, ticket);
                self.events.push_back(Event::TicketRenewed { expires_us });
            }
            (Request::Directory { changes: pushed, .. }, Response::Directory { changes }) => {
                let full = changes.len() == CHANGES_PER_BATCH_MAX;
                let state = self.dir.get_or_insert_with(Default::default);
                let applied = state.dir.apply(&changes);
                if applied.is_ok() {
                    // The cloud accepted what we pushed and holds what it sent (only changes our
                    // own directory accepted count: a hostile answer cannot grow this map).
                    for c in pushed.iter().chain(&changes) {
                        let head = state.cloud_heads.entry(c.body.author).or_insert(0);
                        *head = (*head).max(c.body.seq);
                    }
                } else {
                    state.cloud_heads.clear();
                }
                match applied {
                    Ok(0) => {}
                    Ok(_) => {
                        self.events.push_back(Event::DirectoryChanged);
                        if full {
                            let _ = self.sync_directory(now);
                        }
                    }
                    Err(e) => self.events.push_back(Event::Refused {
                        id,
                        request: "directory",
                        error: ControlError::Directory(crate::refusal::DirCode::of(&e)),
                    }),
                }
                self.drain();
            }
            (Request::Peers { folder }, Response::Peers { peers }) => {
                self.events.push_back(Event::Peers { id, folder, peers });
            }
            (request, response) => self.events.push_back(Event::Answer { id, request, response }),
        }
    }

    /// Whether request `id` is still outstanding (not answered, not replaced, not lost to a
    /// restart).
    pub fn is_pending(&self, id: u64) -> bool {
        self.requests.iter().any(|p| p.id == id)
    }

    /// Whether a request of `request`'s kind (and folder) is outstanding.
    pub fn pending(&self, request: &Request) -> bool {
        self.requests.iter().any(|p| same_kind(&p.request, request))
    }

    /// Pushes this device's directory changes to the cloud and asks for what it lacks.
    pub fn sync_directory(&mut self, now: Micros) -> Result<u64, CommandError> {
        let heads = self.directory().heads().into_iter().collect();
        // Only what the cloud is not known to hold. Pushing the whole directory every time cost
        // each device its whole directory per control round (the swarm's seed 420: 19 KB per
        // push on a lossy 542 kbit/s uplink, enough to starve the device's sync sessions).
        let changes = match self.dir.as_ref() {
            Some(state) => {
                let mut missing = state.dir.missing_for(&state.cloud_heads);
                missing.truncate(CHANGES_PER_BATCH_MAX);
                missing
            }
            None => Vec::new(),
        };
        self.request(now, Request::Directory { heads, changes })
    }

    /// A notice from the cloud (its wire bytes). Notices are hints: a lost one costs only the
    /// wait for the device's own schedule.
    pub fn handle_notice(&mut self, bytes: &[u8]) {
        let Ok(notice) = control::decode::<Notice>(bytes, control::CONTROL_MAX) else { return };
        match notice {
            Notice::Folder(folder) if self.holds(&folder) => {
                self.events.push_back(Event::FolderChanged(folder))
            }
            Notice::Folder(_) => {}
            Notice::Directory => self.events.push_back(Event::DirectoryChanged),
            Notice::Pairing => {}
        }
    }

    /// The transport lost the stream of session `sid` with `peer`: the session ends at once,
    /// failed with `ConnectionLost` (over a reliable stream nothing more of it can arrive).
    pub fn handle_lost(&mut self, peer: P, sid: u64) {
        let Some(folder) = self.sessions.folder_of(peer, sid) else { return };
        match self.holds(&folder) {
            true => {
                let i = self.replica_index(folder);
                self.sessions.lost(peer, sid, &self.replicas[i].1);
            }
            false => {
                let scratch = Replica::new_signed(0, folder.scope());
                self.sessions.lost(peer, sid, &scratch);
            }
        }
        self.drain();
    }

    /// Merges items from outside any session (an import of a feed file) into `folder`, each
    /// checked against the folder's signers as a session would; the ones that merged are handed
    /// out by [`Device::poll_persist`]. Returns, per item, whether it merged.
    pub fn import(&mut self, folder: FolderId, items: &[Arc<Item>]) -> Result<Vec<bool>, CommandError> {
        if !self.holds(&folder) {
            return Err(CommandError::NotHeld);
        }
        let signers = self.id().map(|_| self.directory().signers(&folder));
        let i = self.replica_index(folder);
        let replica = &mut self.replicas[i].1;
        if let Some(signers) = signers {
            replica.set_signers(Some(signers));
        }
        let head = replica.head();
        let merged = items.iter().map(|item| replica.merge(item).is_ok()).collect();
        let changed: Vec<(Arc<Item>, u64)> =
            replica.log_since(head).map(|c| (c.item.clone(), c.fp)).collect();
        if !changed.is_empty() {
            self.persist.push_back(Persist::Items(Commit { folder, from: None, items: changed }));
        }
        Ok(merged)
    }

    /// Runs every timer that is due: session retransmissions and expiries, request retries, the
    /// ticket refresh.
    pub fn handle_timeout(&mut self, now: Micros) {
        for (peer, sid, folder) in self.sessions.due(now) {
            let i = self.replica_index(folder);
            self.sessions.timeout(now, peer, sid, &self.replicas[i].1);
        }
        if let Some(cloud) = self.cloud {
            let (rto, max) = (self.cfg.request_rto_us, self.cfg.request_rto_max_us);
            for p in self.requests.iter_mut().filter(|p| p.deadline <= now) {
                // The same id: a late answer to the first send still counts.
                p.retries = p.retries.saturating_add(1);
                let backoff = (rto << p.retries.min(16)).min(max.max(rto));
                p.deadline = now.saturating_add(backoff);
                let bytes = control::encode(&p.request);
                self.sessions.transmit.push_back(Transmit {
                    to: cloud,
                    stream: Stream::Request(p.id),
                    bytes,
                });
            }
        }
        if let Some(k) = self.keys.as_mut().filter(|k| k.ticket_due.is_some_and(|t| t <= now)) {
            k.ticket_due = None;
            if !self.requests.iter().any(|p| matches!(p.request, Request::Ticket)) {
                let _ = self.request(now, Request::Ticket);
            }
        }
        for fetcher in self.content.values_mut() {
            fetcher.handle_timeout(now);
        }
        self.drain();
    }

    /// Forgets what a crash loses (sessions, cursors, requests, unsent output) and rebuilds the
    /// replicas from what they hold under a new `epoch`. The driver calls this when the device
    /// comes back; what it holds then must be what was committed.
    pub fn restart(&mut self, epoch: u64) {
        self.sessions.clear();
        self.sessions.commits.clear();
        self.requests.clear();
        self.events.clear();
        self.persist.clear();
        // Transfers in flight are lost with the process; the driver wants again what it lacks.
        self.content.clear();
        self.epoch = epoch;
        if let Some(state) = self.dir.as_mut() {
            state.cloud_heads.clear();
        }
        for (folder, replica) in &mut self.replicas {
            *replica = rebuilt(replica, epoch, *folder, self.keys.is_some());
        }
        if let Some(k) = self.keys.as_mut().filter(|k| k.ticket.is_some()) {
            // A ticket from before the crash may be near its end: refresh at once.
            k.ticket_due = self.cfg.refresh_tickets.then_some(0);
        }
    }

    // ------------------------------------------------------------------ content

    /// Fetch `hash` (`size` bytes, of which the groups `have` are held already) for `folder`
    /// from `holders` (for a keyed device, [`Device::content_holders`] names them). Wanting it
    /// again adds holders. Starts the folder's scheduler if none runs.
    pub fn want_content(
        &mut self,
        now: Micros,
        folder: FolderId,
        hash: ContentHash,
        size: u64,
        have: &[std::ops::Range<u64>],
        holders: &[P],
    ) -> Result<(), FetchError> {
        let cfg = &self.content_cfg;
        let fetcher = self.content.entry(folder).or_insert_with(|| Box::new(Fetcher::new((**cfg).clone())));
        fetcher.want(now, hash, size, have, holders)
    }

    /// The devices that may hold a file of `folder`: its other mapping devices, by the directory
    /// (the driver adds the cloud for a `cloud` folder, under the cloud's handle).
    pub fn content_holders(&self, folder: &FolderId) -> Vec<DeviceId> {
        let me = self.id();
        self.directory()
            .folder(folder)
            .map(|f| f.mapped.iter().copied().filter(|d| Some(*d) != me).collect())
            .unwrap_or_default()
    }

    /// Stop fetching `hash` for `folder` (deleted, replaced, or found elsewhere).
    pub fn unwant_content(&mut self, now: Micros, folder: FolderId, hash: &ContentHash) {
        if let Some(f) = self.content.get_mut(&folder) {
            f.unwant(now, hash);
        }
    }

    /// How `peer` is reached now (`None`: not at all), for `folder`'s transfers (told before
    /// the first want, it starts the folder's scheduler).
    pub fn handle_content_route(
        &mut self,
        now: Micros,
        folder: FolderId,
        peer: P,
        route: Option<Route>,
    ) -> Result<(), FetchError> {
        let cfg = &self.content_cfg;
        let fetcher = self.content.entry(folder).or_insert_with(|| Box::new(Fetcher::new((**cfg).clone())));
        fetcher.handle_route(now, peer, route)
    }

    /// `peer` holds `hash` whole (it said so, or wrote it).
    pub fn handle_content_holder(&mut self, now: Micros, folder: FolderId, peer: P, hash: ContentHash) {
        if let Some(f) = self.content.get_mut(&folder) {
            f.handle_holder(now, peer, hash);
        }
    }

    /// `peer` holds the groups `runs` of `hash` (a device fetching it too).
    pub fn handle_content_holder_runs(
        &mut self,
        now: Micros,
        folder: FolderId,
        peer: P,
        hash: ContentHash,
        runs: &[std::ops::Range<u64>],
    ) -> Result<(), FetchError> {
        match self.content.get_mut(&folder) {
            Some(f) => f.handle_holder_runs(now, peer, hash, runs),
            None => Ok(()),
        }
    }

    /// Request `id` of `folder` brought the verified (and stored) groups `groups`.
    pub fn handle_content_groups(
        &mut self,
        now: Micros,
        folder: FolderId,
        id: RequestId,
        groups: std::ops::Range<u64>,
    ) {
        if let Some(f) = self.content.get_mut(&folder) {
            f.handle_groups(now, id, groups);
        }
    }

    /// Request `id` of `folder` ended before all its groups came, for `why`.
    pub fn handle_content_failure(&mut self, now: Micros, folder: FolderId, id: RequestId, why: Failure) {
        if let Some(f) = self.content.get_mut(&folder) {
            f.handle_failure(now, id, why);
        }
    }

    /// The next request (or cancel) `folder`'s scheduler asks the driver to carry out.
    pub fn poll_content(&mut self, folder: FolderId) -> Option<fetch::Command<P>> {
        self.content.get_mut(&folder)?.poll_command()
    }

    /// The next completion, stall or corrupt source of `folder`'s transfers.
    pub fn poll_content_event(&mut self, folder: FolderId) -> Option<fetch::Event<P>> {
        self.content.get_mut(&folder)?.poll_event()
    }

    /// The next deadline of `folder`'s transfers alone (a driver's per-folder loop sleeps to it;
    /// [`Device::poll_timeout`] includes it).
    pub fn content_timeout(&self, folder: FolderId) -> Option<Micros> {
        self.content.get(&folder)?.poll_timeout()
    }

    /// `folder`'s scheduler, to read progress, what is held and what is wanted.
    pub fn content(&self, folder: FolderId) -> Option<&Fetcher<P>> {
        self.content.get(&folder).map(|f| &**f)
    }

    /// The driver's transfer loop for `folder` ended (its requests are gone): the scheduler goes
    /// with it, and the next transfer starts from what the driver holds then.
    pub fn end_content(&mut self, folder: FolderId) {
        self.content.remove(&folder);
    }

    // ------------------------------------------------------------------ output

    /// The next bytes to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit<P>> {
        pop(&mut self.sessions.transmit)
    }

    /// The next thing to commit. Commit it before sending any transmit polled after it.
    pub fn poll_persist(&mut self) -> Option<Persist<P>> {
        pop(&mut self.persist)
    }

    pub fn poll_event(&mut self) -> Option<Event<P>> {
        pop(&mut self.events)
    }

    /// The earliest deadline: a session's, a request retry's, the ticket refresh, or a content
    /// transfer's (a stalled request, a back-off's end).
    pub fn poll_timeout(&self) -> Option<Micros> {
        let requests = self.requests.iter().map(|p| p.deadline).min();
        let ticket_due = self.keys.as_ref().and_then(|k| k.ticket_due);
        let content = self.content.values().filter_map(|f| f.poll_timeout()).min();
        [self.sessions.poll_timeout(), requests, ticket_due, content].into_iter().flatten().min()
    }

    /// Moves the session table's output into the device's queues.
    fn drain(&mut self) {
        while let Some(c) = pop(&mut self.sessions.commits) {
            self.persist.push_back(Persist::Items(c));
        }
        if let Some(d) = self.dir.as_mut().filter(|d| d.dir.len() > d.persisted) {
            let new: Vec<SignedChange> = d.dir.missing_for(&d.heads);
            d.heads = d.dir.heads();
            d.persisted = d.dir.len();
            if !new.is_empty() {
                self.persist.push_back(Persist::Directory(new));
            }
        }
        while let Some(e) = pop(&mut self.sessions.ended) {
            self.events.push_back(Event::SessionEnded(e));
        }
    }

    /// Checks the device's invariants (the simulator calls it after every event): the session
    /// table's structure, replicas sorted and each one's structure, bounded requests.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.sessions.check_invariants()?;
        if self.replicas.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("replicas out of order".into());
        }
        if self.requests.len() > REQUESTS_MAX {
            return Err("too many requests".into());
        }
        if self.dir.as_ref().is_some_and(|d| d.persisted > d.dir.len()) {
            return Err("persisted more directory changes than held".into());
        }
        for (_, r) in &self.replicas {
            r.check_structure()?;
        }
        for fetcher in self.content.values() {
            // Panics on a broken invariant (its own tests' contract), like the simulator's checks.
            fetcher.check_invariants();
        }
        Ok(())
    }

    /// The driver's escape hatch for adversaries the simulator plays (a forger merging what it
    /// forged): the replica of `folder`, if held.
    pub fn replica_mut(&mut self, folder: &FolderId) -> Option<&mut Replica> {
        let i = self.replicas.binary_search_by_key(folder, |(f, _)| *f).ok()?;
        Some(&mut self.replicas[i].1)
    }

    /// The directory, for a simulated adversary or an owner's local change
    /// ([`Directory::make`]); changes made here are persisted by the next poll.
    pub fn directory_mut(&mut self) -> &mut Directory {
        &mut self.dir.get_or_insert_with(Default::default).dir
    }

    /// Hands out directory changes made through [`Device::directory_mut`].
    pub fn flush(&mut self) {
        if self.dir.as_ref().is_some_and(|d| d.dir.len() != d.persisted) {
            self.events.push_back(Event::DirectoryChanged);
        }
        self.drain();
    }
}

/// Pops the front of a queue, releasing its memory once it is empty: a simulator holds
/// 100,000 devices, each of whose queues is empty nearly all the time.
pub(crate) fn pop<T>(q: &mut VecDeque<T>) -> Option<T> {
    let item = q.pop_front();
    if q.is_empty() && q.capacity() > 0 {
        *q = VecDeque::new();
    }
    item
}

/// Whether two requests are the same kind (and folder): a new one replaces the old.
fn same_kind(a: &Request, b: &Request) -> bool {
    match (a, b) {
        (Request::Peers { folder: x }, Request::Peers { folder: y }) => x == y,
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

/// `replica`'s items in a new replica under `epoch` (same signing mode and scope).
pub(crate) fn rebuilt(replica: &Replica, epoch: u64, folder: FolderId, keyed: bool) -> Replica {
    let mut fresh = match (keyed, replica.scope(), replica.signing()) {
        (true, _, crate::replica::Signing::Off) => Replica::new(epoch).scoped(folder.scope()),
        (true, _, _) => Replica::new_signed(epoch, folder.scope()),
        (false, Some(scope), _) => Replica::new(epoch).scoped(scope),
        (false, None, _) => Replica::new(epoch),
    };
    if let Some(signers) = replica.signers() {
        fresh.set_signers(Some((*signers).clone()));
    }
    for item in replica.items() {
        // From the device's own store: verified when they came in, not verified again.
        let _ = fresh.merge_checked(item);
    }
    fresh
}

//! The cloud's control plane as a sans-IO state machine: the verified directory, the ticket
//! authority, the address book, the pairing mailbox, and the notices it owes connected devices.
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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::control::{ControlError, Notice, PairView, PeerAddr, Request, Response};
use crate::directory::{
    ChangeId, Directory, FolderId, SignedChange, UserId, CHANGES_PER_BATCH_MAX, DEPS_MAX,
};
use crate::refusal::DirCode;
use crate::signing::{DeviceId, DeviceKey};
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
}

impl Default for CloudLimits {
    fn default() -> Self {
        Self { pairings_per_user: 16, pairings_max: 65_536, notices_max: 4096 }
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Persist {
    /// Directory changes accepted since the last poll, in the order they were applied.
    Directory(Vec<SignedChange>),
}

/// The cloud's control plane.
#[derive(Debug)]
pub struct Cloud {
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
}

impl Cloud {
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
        self.authority.issue(self.id, self.id.into(), rights, now, TICKET_LIFETIME_US)
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
                let ticket = self.authority.issue_from(&self.dir, device, device.into(), now);
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
                self.dir.may_hold(&folder, &device).map_err(|r| ControlError::Folder(r.code()))?;
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

    /// Directory changes to store, each handed out once.
    pub fn poll_persist(&mut self) -> Option<Persist> {
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
        Ok(())
    }
}

//! The mesh directory: users, devices, folders, members, invitations and folder mappings, as a
//! log of signed changes that every device replicates and verifies itself.
//!
//! **Log structure.** Every change is signed by one device (its *author*) and numbered along that
//! author's chain (`seq` 1, 2, ...). It names its causal past as `deps`: the heads (last `seq` of
//! each author) its author had applied, including its own previous change. A change is accepted
//! only after its past, only with a valid signature, and only if its author was entitled to make
//! it **in the state of its causal past**; so a log is a per-author causal structure (a DAG), and
//! the cloud, which holds no device key of the directory, can add nothing to it.
//!
//! **Merge of concurrent changes.** The state is a fold of the accepted changes in one total
//! order that extends causality: by `(lamport, change id)`, where `lamport` is one more than the
//! greatest `lamport` of the change's dependencies and the change id is the BLAKE3 hash of its
//! signed bytes. Each change is checked again at its place in that order; one whose author lost
//! the right in between (e.g. a concurrent removal that sorts first) stays in the log but has no
//! effect (it is *inert*). Every device with the same set of changes computes the same state,
//! whatever order they arrived in.
//!
//! **Pairing.** A user's first device creates the user (the user id is that device's key); each
//! later device is added by a change signed by an active device of the user, carrying the new
//! device's own signature over the pairing transcript. The transcript binds both keys, a nonce of
//! each side and the short code both screens showed: the new device committed to its nonce first
//! ([`pairing_commitment`]), so neither side (nor the cloud between them) can grind keys to hit a
//! chosen code. Each side checks the code the user typed from the other's screen.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::feedsync::xml::xml_forbids;
use crate::feedsync::{Content, Dialect, Endpoint, Feed, Item, ItemId, When};
use crate::ids::short_debug;
pub use crate::ids::{FolderId, UserId};
use crate::signing::{self, hex, DeviceId, DeviceKey, Sig64, SignatureError};
use crate::ticket::{ChannelKey, Rights, Ticket, TicketAuthority, TICKET_LIFETIME_US};
use crate::time::Micros;

/// Domain of change signatures.
pub const CHANGE_DOMAIN: &[u8] = b"feedmesh/directory-change/v1\0";
/// Domain of the new device's consent in a pairing.
pub const PAIRING_DOMAIN: &[u8] = b"feedmesh/pairing-consent/v1\0";
/// Most changes in one directory.
pub const CHANGES_MAX: usize = 1 << 16;
/// Most changes applied in one batch (one message).
pub const CHANGES_PER_BATCH_MAX: usize = 4096;
/// Most authors a change may name in its dependencies.
pub const DEPS_MAX: usize = 4096;
/// Longest user or folder name, in bytes.
pub const NAME_BYTES_MAX: usize = 256;
/// Short codes have this many decimal digits.
pub const SHORT_CODE_DIGITS: u32 = 6;
/// Most wrapped keys one [`Op::FolderKeys`] carries (more readers take several changes).
pub const KEYS_PER_CHANGE_MAX: usize = 256;
/// Most content-key epochs a folder keeps (one per rotation, i.e. per removal).
pub const KEY_EPOCHS_MAX: usize = 4096;

/// An invitation: the first 16 bytes of the id of the change that made it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InviteId(pub [u8; 16]);

/// BLAKE3 of a change's signed bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChangeId(pub [u8; 32]);

short_debug!(InviteId, "invite");
short_debug!(ChangeId, "change");

/// Where a folder's file content may be kept (Live Folders).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default, Serialize, Deserialize)]
pub enum Storage {
    /// Also at the cloud (sealed with the folder's content key, within the owner's quota), so a
    /// device can fetch while every other device is off. The default, as in Live Mesh.
    #[default]
    Cloud,
    /// Between devices only: the cloud keeps the metadata and never a byte of content.
    P2p,
}

/// A member's role: admins (and the owner) may change membership.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub enum Role {
    Member,
    Admin,
}

/// What the new device proves in an `AddDevice`: its key, both nonces, and its signature over the
/// transcript with the short code (see [`consent_message`]).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Pairing {
    pub device: DeviceId,
    pub nonce_existing: [u8; 32],
    pub nonce_new: [u8; 32],
    pub consent: Sig64,
}

/// One directory operation.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Op {
    /// By the user's first device; the user id is the author's key.
    CreateUser { name: String },
    /// By an active device of `user`.
    AddDevice { user: UserId, pairing: Pairing },
    /// By an active device of `user` (the device itself included).
    RemoveDevice { user: UserId, device: DeviceId },
    /// By an active device; its user owns the folder.
    CreateFolder { name: String },
    /// By a device of the owner or of an active admin.
    Invite { folder: FolderId, invitee: UserId, role: Role },
    /// Sends an open invitation again (one lost in transit); by the owner or an admin.
    Resend { invitation: InviteId },
    /// By the owner or an admin.
    Cancel { invitation: InviteId },
    /// By a device of the invitee.
    Accept { invitation: InviteId },
    /// By a device of the invitee.
    Decline { invitation: InviteId },
    /// By the owner or an admin (only the owner removes an admin), or by the member itself.
    RemoveMember { folder: FolderId, user: UserId },
    /// Maps the folder on the author device; its user must own it or be an active member.
    Map { folder: FolderId },
    /// By a device of the same user as `device`.
    Unmap { folder: FolderId, device: DeviceId },
    /// Where the folder's content may be kept; by a device of the owner or an admin.
    SetStorage { folder: FolderId, storage: Storage },
    /// The folder's content key of `epoch`, wrapped for some of the devices that may read the
    /// folder (`engine::folder::keys`); by an active device of the owner or a member. A new
    /// epoch (the next one) only by a device of the owner; `check` commits to the key, and every
    /// later change of the same epoch must carry the same one.
    FolderKeys { folder: FolderId, epoch: u32, check: [u8; 32], keys: Vec<crate::folder::WrappedKey> },
}

/// What a change says, as signed.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ChangeBody {
    pub author: DeviceId,
    /// 1, 2, ... along the author's chain.
    pub seq: u32,
    /// The causal past: last `seq` of each author the author had applied (its own `seq - 1`
    /// included when > 0), sorted by device, unique, no zeros.
    pub deps: Vec<(DeviceId, u32)>,
    /// Unix seconds of the author's clock, for the news feed only.
    pub when: i64,
    pub op: Op,
}

/// A change and its author's signature over `CHANGE_DOMAIN || postcard(body)`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SignedChange {
    pub body: ChangeBody,
    pub signature: Sig64,
}

impl SignedChange {
    fn signed_bytes(body: &ChangeBody) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        postcard::to_allocvec(body).unwrap_or_default()
    }

    /// Signs `body` with `key` (which must be the author's).
    pub fn sign(body: ChangeBody, key: &DeviceKey) -> Self {
        let signature = signing::sign(key, CHANGE_DOMAIN, &Self::signed_bytes(&body));
        Self { body, signature }
    }

    /// BLAKE3 of the signed bytes and the signature.
    pub fn id(&self) -> ChangeId {
        let mut hasher = blake3::Hasher::new_derive_key("feedmesh directory change id v1");
        hasher.update(&Self::signed_bytes(&self.body));
        hasher.update(&self.signature.0);
        ChangeId(*hasher.finalize().as_bytes())
    }

    /// The folder a `CreateFolder` change creates.
    pub fn folder_id(&self) -> FolderId {
        FolderId(first16(&self.id()))
    }

    /// The invitation an `Invite` change makes.
    pub fn invite_id(&self) -> InviteId {
        InviteId(first16(&self.id()))
    }

    /// Checks what needs no state: bounds, dependency shape, the signature and (for `AddDevice`)
    /// the new device's consent.
    pub fn verify(&self) -> Result<(), DirError> {
        let b = &self.body;
        let bad = |why: &'static str| DirError::Malformed { author: b.author, seq: b.seq, why };
        if b.seq == 0 {
            return Err(bad("seq 0"));
        }
        if b.deps.len() > DEPS_MAX {
            return Err(bad("too many dependencies"));
        }
        if b.deps.windows(2).any(|w| w[0].0 >= w[1].0) || b.deps.iter().any(|d| d.1 == 0) {
            return Err(bad("dependencies not sorted, unique and positive"));
        }
        let own = b.deps.iter().find(|d| d.0 == b.author).map_or(0, |d| d.1);
        if own != b.seq - 1 {
            return Err(bad("dependencies do not name the author's previous change"));
        }
        match &b.op {
            Op::CreateUser { name } | Op::CreateFolder { name } if name.len() > NAME_BYTES_MAX => {
                return Err(bad("name too long"))
            }
            // Names go into the news feed's XML and onto terminals: no control characters (which
            // covers every character XML forbids but U+FFFE and U+FFFF) and none of those two.
            Op::CreateUser { name } | Op::CreateFolder { name }
                if name.chars().any(|c| c.is_control() || xml_forbids(c)) =>
            {
                return Err(bad("name holds a control character or one XML forbids"))
            }
            Op::FolderKeys { folder, epoch, keys, .. } => {
                if keys.is_empty() || keys.len() > KEYS_PER_CHANGE_MAX {
                    return Err(bad("no wrapped keys, or too many"));
                }
                if keys.iter().any(|k| k.folder != *folder || k.epoch != *epoch || k.sealed.len() != 48) {
                    return Err(bad("a wrapped key of another folder or epoch, or malformed"));
                }
                if keys.windows(2).any(|w| w[0].device >= w[1].device) {
                    return Err(bad("wrapped keys not sorted by device and unique"));
                }
            }
            _ => {}
        }
        b.author
            .verify(CHANGE_DOMAIN, &Self::signed_bytes(b), &self.signature)
            .map_err(|e| DirError::Signature { author: b.author, seq: b.seq, error: e })?;
        if let Op::AddDevice { user, pairing } = &b.op {
            let code = short_code(&b.author, &pairing.device, &pairing.nonce_existing, &pairing.nonce_new);
            let message = consent_message(user, &b.author, pairing, code);
            pairing
                .device
                .verify(PAIRING_DOMAIN, &message, &pairing.consent)
                .map_err(|e| DirError::Signature { author: b.author, seq: b.seq, error: e })?;
        }
        Ok(())
    }
}

fn first16(id: &ChangeId) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&id.0[..16]);
    out
}

/// Why a directory change or batch is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirError {
    #[error("change {seq} of {author}: {why}")]
    Malformed { author: DeviceId, seq: u32, why: &'static str },
    #[error("change {seq} of {author}: {error}")]
    Signature { author: DeviceId, seq: u32, error: SignatureError },
    #[error("change {seq} of {author}: the author may not {why}")]
    NotEntitled { author: DeviceId, seq: u32, why: &'static str },
    #[error("{author} signed two different changes numbered {seq}")]
    Equivocation { author: DeviceId, seq: u32 },
    #[error("{count} changes depend on changes not received")]
    MissingDependency { count: usize },
    #[error("over the limit of {0}")]
    Limit(&'static str),
    #[error("pairing: {0}")]
    Pairing(&'static str),
}

/// The new device's commitment to its nonce, sent before it learns the existing device's nonce.
pub fn pairing_commitment(device: &DeviceId, nonce_new: &[u8; 32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("feedmesh pairing commitment v1");
    hasher.update(&device.0);
    hasher.update(nonce_new);
    *hasher.finalize().as_bytes()
}

/// The short code both screens show: six decimal digits from BLAKE3 of both keys and nonces.
pub fn short_code(
    existing: &DeviceId,
    device: &DeviceId,
    nonce_existing: &[u8; 32],
    nonce_new: &[u8; 32],
) -> u32 {
    let mut hasher = blake3::Hasher::new_derive_key("feedmesh pairing short code v1");
    hasher.update(&existing.0);
    hasher.update(&device.0);
    hasher.update(nonce_existing);
    hasher.update(nonce_new);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    (u64::from_le_bytes(first) % 10u64.pow(SHORT_CODE_DIGITS)) as u32
}

/// What the new device signs to consent to being added to `user` by `existing`.
pub fn consent_message(user: &UserId, existing: &DeviceId, pairing: &Pairing, code: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 * 5 + 4);
    out.extend_from_slice(&user.0);
    out.extend_from_slice(&existing.0);
    out.extend_from_slice(&pairing.device.0);
    out.extend_from_slice(&pairing.nonce_existing);
    out.extend_from_slice(&pairing.nonce_new);
    out.extend_from_slice(&code.to_be_bytes());
    out
}

/// The new device's side of a pairing: checks the existing device's nonce against nothing (it
/// came second) and the code the user typed (shown by the existing device) against its own,
/// then signs its consent. `commitment` was sent earlier; the existing device checks it.
pub fn pair_new_device(
    new_key: &DeviceKey,
    user: UserId,
    existing: DeviceId,
    nonce_existing: [u8; 32],
    nonce_new: [u8; 32],
    code_typed: u32,
) -> Result<Pairing, DirError> {
    let device = DeviceId::of(new_key);
    let code = short_code(&existing, &device, &nonce_existing, &nonce_new);
    if code != code_typed {
        return Err(DirError::Pairing("the code typed is not the code of this pairing"));
    }
    let mut pairing = Pairing { device, nonce_existing, nonce_new, consent: Sig64([0; 64]) };
    pairing.consent =
        signing::sign(new_key, PAIRING_DOMAIN, &consent_message(&user, &existing, &pairing, code));
    Ok(pairing)
}

/// A member of a folder.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Member {
    pub state: MemberState,
    pub role: Role,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MemberState {
    /// Invited, not yet accepted.
    Pending,
    Active,
    Removed,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum InviteState {
    Open,
    Accepted,
    Declined,
    Cancelled,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Invitation {
    pub folder: FolderId,
    pub invitee: UserId,
    pub role: Role,
    pub state: InviteState,
    /// How many times it was sent (1 + re-sends).
    pub sent: u32,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Folder {
    pub owner: UserId,
    pub name: String,
    pub members: BTreeMap<UserId, Member>,
    /// Devices the folder is mapped on.
    pub mapped: BTreeSet<DeviceId>,
    pub storage: Storage,
    /// The content keys by epoch (the newest is the one new content is sealed with).
    pub keys: BTreeMap<u32, EpochKeys>,
}

/// One epoch of a folder's content key, as the directory holds it: never the key itself.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EpochKeys {
    /// The device (of the owner) that made the key.
    pub by: DeviceId,
    /// `ContentKey::check` of the key.
    pub check: [u8; 32],
    /// The key wrapped for each device that may open it.
    pub wrapped: BTreeMap<DeviceId, crate::folder::WrappedKey>,
}

impl Folder {
    /// The active devices of the owner and the active members: who may read the folder's files.
    pub fn readers(&self, state: &State) -> BTreeSet<DeviceId> {
        std::iter::once(&self.owner)
            .chain(self.members.iter().filter(|(_, m)| m.state == MemberState::Active).map(|(u, _)| u))
            .filter_map(|u| state.users.get(u))
            .flat_map(|u| u.devices.iter().filter(|(_, active)| **active).map(|(d, _)| *d))
            .collect()
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct User {
    pub name: String,
    /// Every device ever added, and whether it is still active.
    pub devices: BTreeMap<DeviceId, bool>,
}

/// One entry of the news feed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NewsEvent {
    pub change: ChangeId,
    pub author: DeviceId,
    pub when: i64,
    pub title: &'static str,
    pub detail: String,
}

/// The directory's state: a fold of the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub users: BTreeMap<UserId, User>,
    pub device_user: BTreeMap<DeviceId, UserId>,
    pub folders: BTreeMap<FolderId, Folder>,
    pub invitations: BTreeMap<InviteId, Invitation>,
    pub news: Vec<NewsEvent>,
}

impl State {
    /// The user of an active device.
    pub fn active_user(&self, device: &DeviceId) -> Option<UserId> {
        let user = self.device_user.get(device)?;
        self.users.get(user)?.devices.get(device).copied().unwrap_or(false).then_some(*user)
    }

    /// The owner or an active member of `folder`.
    pub fn is_participant(&self, folder: &Folder, user: &UserId) -> bool {
        folder.owner == *user || folder.members.get(user).is_some_and(|m| m.state == MemberState::Active)
    }

    fn is_admin(&self, folder: &Folder, user: &UserId) -> bool {
        folder.owner == *user
            || folder
                .members
                .get(user)
                .is_some_and(|m| m.state == MemberState::Active && m.role == Role::Admin)
    }

    /// Checks `op` by `author` against this state and applies it, or says why not. Atomic: every
    /// check comes before the first change, so a refused op leaves the state as it was.
    fn step(&mut self, id: ChangeId, body: &ChangeBody) -> Result<(), &'static str> {
        let author = body.author;
        let (title, detail): (&'static str, String) = match &body.op {
            Op::CreateUser { name } => {
                let user = UserId::of_first_device(author);
                if self.device_user.contains_key(&author) || self.users.contains_key(&user) {
                    return Err("create a user with a device that already has one");
                }
                self.users
                    .insert(user, User { name: name.clone(), devices: BTreeMap::from([(author, true)]) });
                self.device_user.insert(author, user);
                ("user created", format!("{user} ({name}) with device {author}"))
            }
            Op::AddDevice { user, pairing } => {
                if self.active_user(&author) != Some(*user) {
                    return Err("add a device to a user it is not an active device of");
                }
                if self.device_user.contains_key(&pairing.device) {
                    return Err("add a device that is already known");
                }
                if let Some(u) = self.users.get_mut(user) {
                    u.devices.insert(pairing.device, true);
                }
                self.device_user.insert(pairing.device, *user);
                ("device added", format!("{} to {user} by {author}", pairing.device))
            }
            Op::RemoveDevice { user, device } => {
                if self.active_user(&author) != Some(*user) || self.active_user(device) != Some(*user) {
                    return Err("remove a device of another user");
                }
                if let Some(u) = self.users.get_mut(user) {
                    u.devices.insert(*device, false);
                }
                for folder in self.folders.values_mut() {
                    folder.mapped.remove(device);
                }
                ("device removed", format!("{device} of {user} by {author}"))
            }
            Op::CreateFolder { name } => {
                let owner = self.active_user(&author).ok_or("create a folder without an active device")?;
                let folder = FolderId(first16(&id));
                let value = Folder {
                    owner,
                    name: name.clone(),
                    members: BTreeMap::new(),
                    mapped: BTreeSet::new(),
                    storage: Storage::Cloud,
                    keys: BTreeMap::new(),
                };
                self.folders.insert(folder, value);
                ("folder created", format!("{folder} ({name}) owned by {owner}"))
            }
            Op::Invite { folder: fid, invitee, role } => {
                let by = self.active_user(&author).ok_or("invite without an active device")?;
                let folder = self.folders.get(fid).ok_or("invite to an unknown folder")?;
                if !self.is_admin(folder, &by) {
                    return Err("invite to a folder it does not own or administer");
                }
                if !self.users.contains_key(invitee) {
                    return Err("invite an unknown user");
                }
                if folder.owner == *invitee
                    || folder.members.get(invitee).is_some_and(|m| m.state != MemberState::Removed)
                {
                    return Err("invite a user who is a member or invited");
                }
                let invite = InviteId(first16(&id));
                self.invitations.insert(
                    invite,
                    Invitation {
                        folder: *fid,
                        invitee: *invitee,
                        role: *role,
                        state: InviteState::Open,
                        sent: 1,
                    },
                );
                if let Some(f) = self.folders.get_mut(fid) {
                    f.members.insert(*invitee, Member { state: MemberState::Pending, role: *role });
                }
                ("member invited", format!("{invitee} to {fid} as {role:?} ({invite})"))
            }
            Op::Resend { invitation } | Op::Cancel { invitation } => {
                let by = self.active_user(&author).ok_or("change an invitation without an active device")?;
                let inv = self.invitations.get(invitation).ok_or("change an unknown invitation")?;
                let folder = self.folders.get(&inv.folder).ok_or("change an invitation of no folder")?;
                if !self.is_admin(folder, &by) {
                    return Err("change an invitation to a folder it does not own or administer");
                }
                if inv.state != InviteState::Open {
                    return Err("change an invitation that is no longer open");
                }
                let (fid, invitee) = (inv.folder, inv.invitee);
                if matches!(body.op, Op::Resend { .. }) {
                    if let Some(inv) = self.invitations.get_mut(invitation) {
                        inv.sent = inv.sent.saturating_add(1);
                    }
                    ("invitation sent again", format!("{invitation} to {invitee}"))
                } else {
                    self.close_invitation(invitation, InviteState::Cancelled);
                    ("invitation cancelled", format!("{invitation} to {invitee} for {fid}"))
                }
            }
            Op::Accept { invitation } | Op::Decline { invitation } => {
                let by = self.active_user(&author).ok_or("answer an invitation without an active device")?;
                let inv = self.invitations.get(invitation).ok_or("answer an unknown invitation")?;
                if inv.invitee != by {
                    return Err("answer an invitation to another user");
                }
                if inv.state != InviteState::Open {
                    return Err("answer an invitation that is no longer open");
                }
                let (fid, role) = (inv.folder, inv.role);
                if matches!(body.op, Op::Accept { .. }) {
                    if let Some(inv) = self.invitations.get_mut(invitation) {
                        inv.state = InviteState::Accepted;
                    }
                    if let Some(f) = self.folders.get_mut(&fid) {
                        f.members.insert(by, Member { state: MemberState::Active, role });
                    }
                    ("member joined", format!("{by} joined {fid}"))
                } else {
                    self.close_invitation(invitation, InviteState::Declined);
                    ("invitation declined", format!("{by} declined {fid}"))
                }
            }
            Op::RemoveMember { folder: fid, user } => {
                let by = self.active_user(&author).ok_or("remove a member without an active device")?;
                let folder = self.folders.get(fid).ok_or("remove a member of an unknown folder")?;
                let member = folder.members.get(user).copied().ok_or("remove a user who is not a member")?;
                if member.state == MemberState::Removed {
                    return Err("remove a member already removed");
                }
                let allowed = by == *user
                    || folder.owner == by
                    || (self.is_admin(folder, &by) && member.role != Role::Admin);
                if !allowed || folder.owner == *user {
                    return Err("remove this member");
                }
                let devices: Vec<DeviceId> =
                    self.users.get(user).map(|u| u.devices.keys().copied().collect()).unwrap_or_default();
                let open: Vec<InviteId> = self
                    .invitations
                    .iter()
                    .filter(|(_, i)| i.folder == *fid && i.invitee == *user && i.state == InviteState::Open)
                    .map(|(id, _)| *id)
                    .collect();
                for invite in open {
                    if let Some(i) = self.invitations.get_mut(&invite) {
                        i.state = InviteState::Cancelled;
                    }
                }
                if let Some(f) = self.folders.get_mut(fid) {
                    f.members.insert(*user, Member { state: MemberState::Removed, role: member.role });
                    for d in devices {
                        f.mapped.remove(&d);
                    }
                }
                ("member removed", format!("{user} from {fid} by {by}"))
            }
            Op::Map { folder: fid } => {
                let by = self.active_user(&author).ok_or("map without an active device")?;
                let folder = self.folders.get(fid).ok_or("map an unknown folder")?;
                if !self.is_participant(folder, &by) {
                    return Err("map a folder it does not own or belong to");
                }
                if let Some(f) = self.folders.get_mut(fid) {
                    f.mapped.insert(author);
                }
                ("folder mapped", format!("{fid} on {author}"))
            }
            Op::Unmap { folder: fid, device } => {
                let by = self.active_user(&author).ok_or("unmap without an active device")?;
                if self.device_user.get(device) != Some(&by) {
                    return Err("unmap a device of another user");
                }
                let folder = self.folders.get_mut(fid).ok_or("unmap an unknown folder")?;
                folder.mapped.remove(device);
                ("folder unmapped", format!("{fid} from {device}"))
            }
            Op::SetStorage { folder: fid, storage } => {
                let by = self.active_user(&author).ok_or("set storage without an active device")?;
                let folder = self.folders.get(fid).ok_or("set the storage of an unknown folder")?;
                if !self.is_admin(folder, &by) {
                    return Err("set the storage of a folder it does not own or administer");
                }
                if let Some(f) = self.folders.get_mut(fid) {
                    f.storage = *storage;
                }
                ("folder storage set", format!("{fid} keeps content {storage:?}"))
            }
            Op::FolderKeys { folder: fid, epoch, check, keys } => {
                let by = self.active_user(&author).ok_or("share a key without an active device")?;
                let folder = self.folders.get(fid).ok_or("share a key of an unknown folder")?;
                if !self.is_participant(folder, &by) {
                    return Err("share a key of a folder it does not own or belong to");
                }
                match folder.keys.get(epoch) {
                    Some(known) if known.check != *check => {
                        return Err("share a key of an epoch that has another key")
                    }
                    Some(_) => {}
                    None => {
                        let next = folder.keys.keys().next_back().map_or(0, |e| e.saturating_add(1));
                        if *epoch != next || folder.owner != by {
                            return Err("make a key epoch other than the next, or not as the owner");
                        }
                        if folder.keys.len() >= KEY_EPOCHS_MAX {
                            return Err("make more key epochs than a folder keeps");
                        }
                    }
                }
                // Wraps for devices that may not read the folder (any more) are left out.
                let readers = folder.readers(self);
                let Some(f) = self.folders.get_mut(fid) else {
                    return Err("share a key of an unknown folder");
                };
                let entry = f.keys.entry(*epoch).or_insert_with(|| EpochKeys {
                    by: author,
                    check: *check,
                    wrapped: BTreeMap::new(),
                });
                let mut shared = 0;
                for k in keys.iter().filter(|k| readers.contains(&k.device)) {
                    entry.wrapped.insert(k.device, k.clone());
                    shared += 1;
                }
                ("content key shared", format!("{fid} epoch {epoch} with {shared} devices by {author}"))
            }
        };
        self.news.push(NewsEvent { change: id, author, when: body.when, title, detail });
        Ok(())
    }

    fn close_invitation(&mut self, invitation: &InviteId, state: InviteState) {
        let Some(inv) = self.invitations.get_mut(invitation) else { return };
        inv.state = state;
        let (fid, invitee) = (inv.folder, inv.invitee);
        if let Some(f) = self.folders.get_mut(&fid) {
            if f.members.get(&invitee).is_some_and(|m| m.state == MemberState::Pending) {
                f.members.remove(&invitee);
            }
        }
    }
}

/// Where a change sits in the total order.
type OrderKey = (u64, ChangeId);

#[derive(Clone, Debug)]
struct Entry {
    change: Arc<SignedChange>,
    lamport: u64,
}

/// The last `seq` of each author: what a side has of the log.
pub type Heads = BTreeMap<DeviceId, u32>;

/// Why the directory does not let a device sync or hold a folder ([`Directory::may_sync`],
/// [`Directory::may_hold`]); a session refuses with it (`refusal::Refusal` takes it in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    UnknownFolder { folder: FolderId },
    DeviceNotActive { device: DeviceId },
    NotMapped { device: DeviceId },
    NotMember { device: DeviceId },
}

/// A verified directory log and its state.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    /// Accepted changes in the total order.
    log: BTreeMap<OrderKey, Entry>,
    /// Each author's chain: the order key of its change `seq` at index `seq - 1`.
    chains: BTreeMap<DeviceId, Vec<OrderKey>>,
    /// Changes without effect at their place in the order.
    inert: BTreeSet<ChangeId>,
    state: State,
}

impl Directory {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn len(&self) -> usize {
        self.log.len()
    }

    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }

    /// Last `seq` of each author.
    pub fn heads(&self) -> Heads {
        self.chains.iter().map(|(d, c)| (*d, c.len() as u32)).collect()
    }

    /// A digest of the accepted set (equal logs, equal digests): BLAKE3 over the change ids in order.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key("feedmesh directory digest v1");
        for (_, id) in self.log.keys() {
            hasher.update(&id.0);
        }
        *hasher.finalize().as_bytes()
    }

    /// Whether a change is in the log but without effect (its author lost the right first).
    pub fn is_inert(&self, id: &ChangeId) -> bool {
        self.inert.contains(id)
    }

    /// Every change, in the total order (a causal order).
    pub fn changes(&self) -> impl Iterator<Item = &SignedChange> {
        self.log.values().map(|e| e.change.as_ref())
    }

    /// The changes a side with `heads` lacks, in causal order.
    pub fn missing_for(&self, heads: &Heads) -> Vec<SignedChange> {
        self.log
            .values()
            .filter(|e| heads.get(&e.change.body.author).is_none_or(|&h| e.change.body.seq > h))
            .map(|e| (*e.change).clone())
            .collect()
    }

    /// Makes, signs and applies a change by `key` at `when` (unix seconds); returns it, to be
    /// sent to other devices. Fails (changing nothing) if the key may not make it.
    pub fn make(&mut self, key: &DeviceKey, when: i64, op: Op) -> Result<SignedChange, DirError> {
        let author = DeviceId::of(key);
        let seq = self.chains.get(&author).map_or(0, |c| c.len() as u32) + 1;
        let deps: Vec<(DeviceId, u32)> = self.heads().into_iter().collect();
        let change = SignedChange::sign(ChangeBody { author, seq, deps, when, op }, key);
        self.apply(std::slice::from_ref(&change))?;
        Ok(change)
    }

    /// The existing device's side of a pairing: checks the new device's commitment, the code the
    /// user typed (shown on the new device) and the new device's consent, then adds it.
    #[allow(clippy::too_many_arguments)]
    pub fn add_paired_device(
        &mut self,
        existing_key: &DeviceKey,
        user: UserId,
        commitment: [u8; 32],
        pairing: Pairing,
        code_typed: u32,
        when: i64,
    ) -> Result<SignedChange, DirError> {
        let existing = DeviceId::of(existing_key);
        if pairing_commitment(&pairing.device, &pairing.nonce_new) != commitment {
            return Err(DirError::Pairing("the new device's nonce does not match its commitment"));
        }
        if short_code(&existing, &pairing.device, &pairing.nonce_existing, &pairing.nonce_new) != code_typed {
            return Err(DirError::Pairing("the code typed is not the code of this pairing"));
        }
        self.make(existing_key, when, Op::AddDevice { user, pairing })
    }

    /// Verifies and applies changes (any order; duplicates ignored). All or nothing: on an error
    /// the directory is unchanged. Returns how many were new.
    pub fn apply(&mut self, changes: &[SignedChange]) -> Result<usize, DirError> {
        if changes.len() > CHANGES_PER_BATCH_MAX {
            return Err(DirError::Limit("directory changes per batch"));
        }
        let mut next = self.clone();
        let mut pending: Vec<&SignedChange> = Vec::new();
        for change in changes {
            match next.known(change)? {
                true => {}
                false => pending.push(change),
            }
        }
        if next.log.len() + pending.len() > CHANGES_MAX {
            return Err(DirError::Limit("directory changes"));
        }
        let mut added = 0;
        while !pending.is_empty() {
            let before = pending.len();
            let mut waiting = Vec::new();
            for change in pending {
                if next.known(change)? {
                    continue;
                }
                let ready = change
                    .body
                    .deps
                    .iter()
                    .all(|(d, s)| next.chains.get(d).map_or(0, |c| c.len() as u32) >= *s);
                if ready {
                    next.insert(change)?;
                    added += 1;
                } else {
                    waiting.push(change);
                }
            }
            if waiting.len() == before {
                return Err(DirError::MissingDependency { count: waiting.len() });
            }
            pending = waiting;
        }
        *self = next;
        Ok(added)
    }

    /// Whether the change is already in the log (an error if its slot holds another change).
    fn known(&self, change: &SignedChange) -> Result<bool, DirError> {
        let b = &change.body;
        if b.seq == 0 {
            return Ok(false);
        }
        let Some(slot) = self.chains.get(&b.author).and_then(|c| c.get(b.seq as usize - 1)) else {
            return Ok(false);
        };
        if *self.log[slot].change != *change {
            return Err(DirError::Equivocation { author: b.author, seq: b.seq });
        }
        Ok(true)
    }

    /// Inserts one change whose dependencies are all in the log.
    fn insert(&mut self, change: &SignedChange) -> Result<(), DirError> {
        change.verify()?;
        let b = &change.body;
        let have = self.chains.get(&b.author).map_or(0, |c| c.len() as u32);
        if b.seq != have + 1 {
            return Err(DirError::Malformed {
                author: b.author,
                seq: b.seq,
                why: "not the next of its chain",
            });
        }
        let id = change.id();
        let mut lamport = 1;
        for (d, s) in &b.deps {
            if let Some(key) = self.chains.get(d).and_then(|c| c.get(*s as usize - 1)) {
                lamport = lamport.max(self.log[key].lamport + 1);
            }
        }
        let key = (lamport, id);
        let last = self.log.keys().next_back().is_none_or(|k| *k < key);
        let not_entitled = |why| DirError::NotEntitled { author: b.author, seq: b.seq, why };
        // Entitlement in the causal past. The common case: the author had everything we have, so
        // its past is our state and the change goes last in the order (`State::step` changes
        // nothing when it fails).
        let whole_past = b.deps.len() == self.chains.len()
            && b.deps.iter().all(|(d, s)| self.chains.get(d).is_some_and(|c| c.len() as u32 == *s));
        let refold = if whole_past && last {
            self.state.step(id, b).map_err(not_entitled)?;
            false
        } else {
            let mut past = if whole_past { self.state.clone() } else { self.fold(Some(&b.deps)).0 };
            past.step(id, b).map_err(not_entitled)?;
            true
        };
        self.log.insert(key, Entry { change: Arc::new(change.clone()), lamport });
        self.chains.entry(b.author).or_default().push(key);
        if refold {
            let (state, inert) = self.fold(None);
            self.state = state;
            self.inert = inert;
        }
        Ok(())
    }

    /// Folds the log in order (only the changes within `past`, when given); returns the state
    /// and the inert changes.
    fn fold(&self, past: Option<&[(DeviceId, u32)]>) -> (State, BTreeSet<ChangeId>) {
        let within = |b: &ChangeBody| match past {
            None => true,
            Some(deps) => deps.iter().any(|(d, s)| *d == b.author && b.seq <= *s),
        };
        let mut state = State::default();
        let mut inert = BTreeSet::new();
        for ((_, id), entry) in &self.log {
            let body = &entry.change.body;
            if !within(body) {
                continue;
            }
            // `step` changes nothing when it fails.
            if state.step(*id, body).is_err() {
                inert.insert(*id);
            }
        }
        (state, inert)
    }

    /// The user of an active device.
    pub fn user_of(&self, device: &DeviceId) -> Option<UserId> {
        self.state.active_user(device)
    }

    pub fn folder(&self, folder: &FolderId) -> Option<&Folder> {
        self.state.folders.get(folder)
    }

    pub fn invitation(&self, invitation: &InviteId) -> Option<&Invitation> {
        self.state.invitations.get(invitation)
    }

    /// The rule: `me` syncs `folder` with `peer` only if both are active devices, the folder is
    /// mapped on both, and they belong to the same user or to participants (owner or active
    /// members) of the folder.
    pub fn may_sync(&self, folder: &FolderId, me: &DeviceId, peer: &DeviceId) -> Result<(), Denied> {
        let f = self.folder(folder).ok_or(Denied::UnknownFolder { folder: *folder })?;
        let mine = self.user_of(me).ok_or(Denied::DeviceNotActive { device: *me })?;
        let theirs = self.user_of(peer).ok_or(Denied::DeviceNotActive { device: *peer })?;
        if mine != theirs {
            for (device, user) in [(me, mine), (peer, theirs)] {
                if !self.state.is_participant(f, &user) {
                    return Err(Denied::NotMember { device: *device });
                }
            }
        }
        for device in [me, peer] {
            if !f.mapped.contains(device) {
                return Err(Denied::NotMapped { device: *device });
            }
        }
        Ok(())
    }

    /// Whether `device` may hold `folder` at all: it is active, its user owns the folder or is an
    /// active member, and the folder is mapped on it. (The rule for syncing with the cloud.)
    pub fn may_hold(&self, folder: &FolderId, device: &DeviceId) -> Result<(), Denied> {
        let f = self.folder(folder).ok_or(Denied::UnknownFolder { folder: *folder })?;
        let user = self.user_of(device).ok_or(Denied::DeviceNotActive { device: *device })?;
        if !self.state.is_participant(f, &user) {
            return Err(Denied::NotMember { device: *device });
        }
        if !f.mapped.contains(device) {
            return Err(Denied::NotMapped { device: *device });
        }
        Ok(())
    }

    /// The devices whose versions a replica of `folder` accepts: every device (active or not:
    /// their past versions stay valid) of the owner and of members who were ever active.
    pub fn signers(&self, folder: &FolderId) -> BTreeSet<DeviceId> {
        let Some(f) = self.folder(folder) else { return BTreeSet::new() };
        let mut users = vec![f.owner];
        users.extend(f.members.iter().filter(|(_, m)| m.state != MemberState::Pending).map(|(u, _)| *u));
        users.iter().filter_map(|u| self.state.users.get(u)).flat_map(|u| u.devices.keys().copied()).collect()
    }

    /// The folders mapped on `device` (what its ticket may grant).
    pub fn folders_of(&self, device: &DeviceId) -> Vec<FolderId> {
        self.state.folders.iter().filter(|(_, f)| f.mapped.contains(device)).map(|(id, _)| *id).collect()
    }

    /// The news feed: one FeedSync item per effective change, in the log's order, made by its
    /// author's endpoint at its `when`. Every device with the same log builds the same feed.
    pub fn news(&self) -> Feed {
        let mut feed = Feed::new(Dialect::Atom);
        feed.envelope.head[0] = "<title>feedmesh directory news</title>".into();
        for event in &self.state.news {
            let id = ItemId::new(&format!("dir-{}", hex(&event.change.0[..16])));
            let when = When::from_unix_secs(event.when.clamp(0, crate::feedsync::limits::WHEN_SECS_MAX));
            let (Ok(id), Ok(when)) = (id, when) else { continue };
            let by: Endpoint = event.author.endpoint();
            let inner =
                format!("<title>{}</title><summary>{}</summary>", event.title, escape_text(&event.detail));
            let content = Arc::new(Content {
                attrs: "".into(),
                inner: inner.into(),
                scope: feed.envelope.scope.clone(),
            });
            // Ids are unique per change and the news is far below the item limit.
            let _ = feed.put(Item::create(id, &by, &when, content, true));
        }
        feed
    }
}

fn escape_text(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Tickets as the directory grants them (here, so that `ticket` needs nothing of the directory).
impl TicketAuthority {
    /// A ticket whose folders are those the cloud's copy of the directory maps on `device`
    /// (none for a device that is not active), with relay use, for
    /// [`crate::ticket::TICKET_LIFETIME_US`].
    pub fn issue_from(
        &mut self,
        directory: &Directory,
        device: DeviceId,
        channel: ChannelKey,
        now_us: Micros,
    ) -> Ticket {
        let active = directory.user_of(&device).is_some();
        let folders = if active { directory.folders_of(&device) } else { Vec::new() };
        self.issue(device, channel, Rights { folders, relay: active }, now_us, TICKET_LIFETIME_US)
    }
}

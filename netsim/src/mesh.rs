//! The mesh security model in the simulator (issue 5, `[mesh]` in a scenario): the cloud's ticket
//! authority, users and paired devices in a verified directory, one shared folder, signed
//! replicas, and the adversaries of the threat model (a removed member, stale tickets, forged
//! versions, replayed tickets, skewed clocks, a cloud that makes up devices or alters versions).
//!
//! The directory's genesis (users, pairings, the folder, invitations, acceptances, mappings) is
//! made at time 0 by the devices' own keys, as if before the run; every later change (the
//! removal) spreads only through the authorized sessions' directory catch-up, the cloud's
//! included. The cloud (node 0) is the engine's `Cloud`, holding no device key, as in the
//! relay. Devices are the engine's `Device`: each asks the cloud for a fresh ticket over the
//! control plane at half its ticket's lifetime (retried until answered); only the adversaries'
//! tickets (replayed, injected) are the driver's doing.
//!
//! Clocks: a device's ticket clock is `BASE_US + virtual time + its skew` (drift is not applied
//! to it), so that skews never go below zero; the authorized session's timers are in that clock
//! and converted back to virtual time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use engine::authz::{Credentials, Policy, Refusal};
use engine::directory::{
    pair_new_device, pairing_commitment, short_code, ChangeBody, Directory, FolderId, MemberState, Op,
    Role as MemberRole, SignedChange, UserId,
};
use engine::feedsync::{self, Item, Version};
use engine::signing::{DeviceId, DeviceKey, Sig64, VersionSignature};
use engine::sync::{Micros, SyncError};
use engine::ticket::{ChannelKey, Rights, Ticket, TicketAuthority, TicketError, TICKET_SKEW_US};
use engine::wire::{self, Body};
use rand::Rng as _;
use rand_chacha::ChaCha8Rng;

use crate::scenario::Mesh;

/// Where every ticket clock starts (microseconds), so that negative skews stay positive.
pub const BASE_US: u64 = 1_000_000_000_000;

/// What a device does in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Honest,
    /// Stops refreshing its ticket.
    Stale,
    /// Forges versions in its (unsigned) replica.
    Forger,
    /// Presents device 1's ticket.
    Replayer,
    /// Made up by the cloud: not in the directory; scripted, runs no session.
    Injected,
}

/// One device's (or the cloud replica's) mesh state.
#[derive(Debug)]
pub struct MeshNode {
    pub key: DeviceKey,
    pub device: DeviceId,
    pub channel: ChannelKey,
    pub dir: Directory,
    pub creds: Credentials,
    pub role: Role,
    /// A device of the removed user.
    pub removed: bool,
    /// When this device's directory first showed the removal (virtual time).
    pub removal_known_at: Option<Micros>,
    /// Injected: the cloud-signed `AddDevice` it offers, and how many answers it gave.
    pub inject: Option<SignedChange>,
    pub attempts: u64,
    /// The user this device belongs to (or pairs into, if late).
    pub user: Option<UserId>,
    /// Not in the genesis directory: pairs in during the run.
    pub late: bool,
    /// The pairing a late device runs.
    pub pair: Option<Box<PairState>>,
    /// Peers the cloud named (node indices), sorted.
    pub known: Vec<u32>,
    /// Control rounds run.
    pub rounds: u64,
    /// Pairings this device answered (id -> its nonce) and those it added to the directory.
    pub answered: BTreeMap<u64, [u8; 32]>,
    pub added: BTreeSet<u64>,
}

/// A late device's side of its pairing.
#[derive(Debug)]
pub struct PairState {
    pub id: Option<u64>,
    pub nonce: [u8; 32],
    pub consented: bool,
    /// It mapped the folder once active.
    pub mapped: bool,
}

/// The address a simulated device announces: its node index as 10.x.y.z:4433.
pub fn addr_of(node: u32) -> std::net::SocketAddr {
    let [_, a, b, c] = node.to_be_bytes();
    std::net::SocketAddr::from(([10, a, b, c], 4433))
}

/// The node an announced address names.
pub fn node_of(addr: &std::net::SocketAddr) -> Option<u32> {
    match addr.ip() {
        std::net::IpAddr::V4(v4) if addr.port() == 4433 => {
            let [_, a, b, c] = v4.octets();
            Some(u32::from_be_bytes([0, a, b, c]))
        }
        _ => None,
    }
}

/// The account name and password of user `u` (the driver's web login, not the engine's).
pub fn account_of(u: usize) -> (String, String) {
    (format!("user-{u}"), format!("password-of-user-{u}"))
}

impl MeshNode {
    pub fn policy(&self) -> Policy {
        Policy::Directory(Box::new(self.creds.clone()))
    }
}

/// What the mesh model adds to a run's report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MeshReport {
    /// Sessions that ended refused (or failed on a forged version), by reason, counted at the
    /// device that ended them (`peer-refused`: the other side refused first).
    pub refusals: BTreeMap<String, u64>,
    /// The virtual ms at which each reason was first seen.
    pub refusal_first_ms: BTreeMap<String, u64>,
    /// Authorized sessions that completed.
    pub sessions_done: u64,
    pub tickets_issued: u64,
    /// Forged or altered versions made (forgers, the cloud in transit) and sessions an honest
    /// replica ended on one.
    pub forged_made: u64,
    pub forged_rejected: u64,
    /// Forged versions held by an honest replica at the end (must be 0).
    pub forged_present: u64,
    /// Versions that reached a removed member's device from a sender that knew of the removal
    /// before the version was written (must be 0).
    pub removed_leaks: u64,
    /// Item states the removed member's devices merged in all (before and after the removal).
    pub removed_received: u64,
    /// Devices whose directory showed the removal by the end.
    pub removal_known_by: u32,
    /// Devices that must converge (honest, not removed, clock within the allowance).
    pub expected_devices: u32,
    /// Late devices that paired in over the control plane, and when the last one was active.
    pub pairings_completed: u32,
    pub last_pairing_ms: u64,
    /// Notices the cloud sent to devices, and those the extra notice loss dropped.
    pub notices_sent: u64,
    pub notices_dropped: u64,
}

/// The world's mesh state.
#[derive(Debug)]
pub struct MeshWorld {
    pub spec: Mesh,
    /// Users by index (account `user-{u}`).
    pub user_ids: Vec<UserId>,
    pub authority: TicketAuthority,
    pub folder: FolderId,
    pub removed_user: Option<UserId>,
    pub owner_key: DeviceKey,
    pub lifetime_us: Micros,
    pub forged: BTreeSet<[u8; 16]>,
    /// Honest writes: version identity -> virtual time written.
    pub write_times: BTreeMap<[u8; 16], Micros>,
    pub report: MeshReport,
}

/// A version's identity (the checker's): BLAKE3 of its canonical encoding (no signature).
pub fn version_key(version: &Version) -> [u8; 16] {
    let hash = blake3::hash(&feedsync::encode_version(version));
    let mut out = [0u8; 16];
    out.copy_from_slice(&hash.as_bytes()[..16]);
    out
}

/// Every version of an item: the winner and its conflicts.
pub fn versions(item: &Item) -> impl Iterator<Item = &Version> {
    std::iter::once(&item.version).chain(item.conflicts.iter())
}

fn key_from(rng: &mut ChaCha8Rng) -> DeviceKey {
    DeviceKey::from_bytes(&rng.random::<[u8; 32]>())
}

/// Pairs `new` into `user` through `existing` (both sides of the short-code ceremony).
fn pair(
    rng: &mut ChaCha8Rng,
    dir: &mut Directory,
    existing: &DeviceKey,
    new: &DeviceKey,
    user: UserId,
    when: i64,
) {
    let (ne, nn): ([u8; 32], [u8; 32]) = (rng.random(), rng.random());
    let new_id = DeviceId::of(new);
    let code = short_code(&DeviceId::of(existing), &new_id, &ne, &nn);
    let pairing =
        pair_new_device(new, user, DeviceId::of(existing), ne, nn, code).expect("the code is right");
    dir.add_paired_device(existing, user, pairing_commitment(&new_id, &nn), pairing, code, when)
        .expect("an active device pairs a new one");
}

/// Builds the world for `devices` devices plus the cloud (node 0): returns it, every node's
/// mesh state (index = node; the cloud's names its ticket key, it is no device of the
/// directory), the cloud's ticket key and the genesis directory.
pub fn build(
    spec: &Mesh,
    devices: u32,
    rng: &mut ChaCha8Rng,
    when: i64,
) -> (MeshWorld, Vec<MeshNode>, DeviceKey, Directory) {
    let role_of = |d: u32| {
        if spec.injected.contains(&d) {
            Role::Injected
        } else if spec.forgers.contains(&d) {
            Role::Forger
        } else if spec.replayers.contains(&d) {
            Role::Replayer
        } else if spec.stale_tickets.contains(&d) {
            Role::Stale
        } else {
            Role::Honest
        }
    };
    let keys: Vec<DeviceKey> = (0..=devices).map(|_| key_from(rng)).collect();
    let cloud_key = key_from(rng);
    let in_dir: Vec<u32> = (1..=devices).filter(|&d| role_of(d) != Role::Injected).collect();
    let late = |d: u32| spec.late_devices.contains(&d);
    let users = spec.users as usize;
    let mut user_index = vec![None; devices as usize + 1];
    for (k, &d) in in_dir.iter().enumerate() {
        user_index[d as usize] = Some(k % users);
    }
    let firsts: Vec<u32> = in_dir[..users].to_vec();
    let mut dir = Directory::new();
    let mut user_ids = Vec::with_capacity(users);
    for (u, &first) in firsts.iter().enumerate() {
        let k = &keys[first as usize];
        dir.make(k, when, Op::CreateUser { name: format!("user-{u}") }).expect("a new user");
        user_ids.push(UserId::of_first_device(DeviceId::of(k)));
    }
    for d in in_dir.iter().copied().filter(|&d| !late(d)) {
        let u = user_index[d as usize].expect("directory devices have users");
        if firsts[u] != d {
            let existing = keys[firsts[u] as usize].clone();
            pair(rng, &mut dir, &existing, &keys[d as usize], user_ids[u], when);
        }
    }
    let owner = &keys[firsts[0] as usize].clone();
    let folder =
        dir.make(owner, when, Op::CreateFolder { name: "shared".into() }).expect("a folder").folder_id();
    for u in 1..users {
        let invite = Op::Invite { folder, invitee: user_ids[u], role: MemberRole::Member };
        let invitation = dir.make(owner, when, invite).expect("the owner invites").invite_id();
        dir.make(&keys[firsts[u] as usize], when, Op::Accept { invitation }).expect("the invitee accepts");
    }
    for d in in_dir.iter().copied().filter(|&d| !late(d)) {
        dir.make(&keys[d as usize], when, Op::Map { folder }).expect("a participant maps the folder");
    }
    let lifetime_us = spec.ticket_lifetime_ms * 1_000;
    let mut authority = TicketAuthority::new(cloud_key.clone());
    let cloud = authority.id();
    let removed_user = spec.remove_user.map(|u| user_ids[u as usize]);
    let mut nodes = Vec::with_capacity(devices as usize + 1);
    for (i, key) in keys.into_iter().enumerate() {
        // The cloud (node 0) holds no device key: it is named by its ticket key.
        let key = if i == 0 { cloud_key.clone() } else { key };
        let device = DeviceId::of(&key);
        let channel = ChannelKey::from(device);
        let role = if i == 0 { Role::Honest } else { role_of(i as u32) };
        let inject = (role == Role::Injected).then(|| {
            // The cloud "pairs" the device into user 0 with its own key: no device of the user signed.
            let (ne, nn): ([u8; 32], [u8; 32]) = (rng.random(), rng.random());
            let code = short_code(&cloud, &device, &ne, &nn);
            let pairing = pair_new_device(&key, user_ids[0], cloud, ne, nn, code).expect("the code is right");
            let body = ChangeBody {
                author: cloud,
                seq: 1,
                deps: dir.heads().into_iter().collect(),
                when,
                op: Op::AddDevice { user: user_ids[0], pairing },
            };
            SignedChange::sign(body, &cloud_key)
        });
        // A late device is not active yet: its first ticket grants nothing.
        let rights = if i > 0 && late(i as u32) {
            Rights::default()
        } else {
            Rights { folders: vec![folder], relay: true }
        };
        // The first ticket; the device asks the cloud for the next ones.
        let ticket = authority.issue(device, channel, rights, BASE_US, lifetime_us);
        let removed =
            removed_user.is_some() && user_index[i].is_some_and(|u| spec.remove_user == Some(u as u32));
        nodes.push(MeshNode {
            key,
            device,
            channel,
            dir: dir.clone(),
            creds: Credentials { device, ticket, cloud },
            role,
            removed,
            removal_known_at: None,
            inject,
            attempts: 0,
            user: user_index[i].map(|u| user_ids[u]),
            late: i > 0 && late(i as u32),
            pair: (i > 0 && late(i as u32)).then(|| {
                Box::new(PairState { id: None, nonce: rng.random(), consented: false, mapped: false })
            }),
            known: Vec::new(),
            rounds: 0,
            answered: BTreeMap::new(),
            added: BTreeSet::new(),
        });
    }
    // Replayers present device 1's ticket.
    let stolen = nodes[1].creds.ticket.clone();
    for n in nodes.iter_mut().filter(|n| n.role == Role::Replayer) {
        n.creds.ticket = stolen.clone();
    }
    let world = MeshWorld {
        spec: spec.clone(),
        user_ids: user_ids.clone(),
        authority,
        folder,
        removed_user,
        owner_key: owner.clone(),
        lifetime_us,
        forged: BTreeSet::new(),
        write_times: BTreeMap::new(),
        report: MeshReport { tickets_issued: devices as u64, ..MeshReport::default() },
    };
    (world, nodes, cloud_key, dir)
}

impl MeshWorld {
    /// A fresh ticket for `node` at virtual time `now` from the cloud's copy of the directory,
    /// `cloud_dir` (an injected device gets the folder anyway: the cloud lies for it).
    pub fn issue(&mut self, node: &MeshNode, cloud_dir: &Directory, now: Micros) -> Ticket {
        self.report.tickets_issued += 1;
        let folders = if node.role == Role::Injected {
            vec![self.folder]
        } else if cloud_dir.user_of(&node.device).is_some() {
            cloud_dir.folders_of(&node.device)
        } else {
            Vec::new()
        };
        let relay = !folders.is_empty();
        self.authority.issue(
            node.device,
            node.channel,
            Rights { folders, relay },
            BASE_US + now,
            self.lifetime_us,
        )
    }

    /// Counts a finished session's failure, if it was a refusal or a forged version.
    pub fn count_failure(&mut self, error: &SyncError, now: Micros) {
        let Some(reason) = reason(error) else { return };
        if reason == "forged-version" {
            self.report.forged_rejected += 1;
        }
        *self.report.refusals.entry(reason.to_string()).or_default() += 1;
        self.report.refusal_first_ms.entry(reason.to_string()).or_insert(now / 1_000);
    }

    /// Whether `dir` shows the removal.
    pub fn shows_removal(&self, dir: &Directory) -> bool {
        let Some(user) = self.removed_user else { return false };
        dir.folder(&self.folder)
            .and_then(|f| f.members.get(&user))
            .is_some_and(|m| m.state == MemberState::Removed)
    }

    /// The owner's removal of the member, made on its device (the cloud learns it by syncing).
    pub fn remove_member(&mut self, owner_dir: &mut Directory, when: i64) {
        let Some(user) = self.removed_user else { return };
        let op = Op::RemoveMember { folder: self.folder, user };
        let _ = owner_dir.make(&self.owner_key, when, op);
    }
}

/// The report key of a failure, if it is a refusal or a forged version.
pub fn reason(error: &SyncError) -> Option<&'static str> {
    Some(match error {
        SyncError::Signature(_) => "forged-version",
        SyncError::Refused(r) => match r {
            Refusal::Ticket(t) => match t {
                TicketError::Expired { .. } => "ticket-expired",
                TicketError::NotYetValid { .. } => "ticket-not-yet-valid",
                TicketError::WrongChannel => "ticket-wrong-channel",
                TicketError::FolderNotGranted(_) => "ticket-folder-not-granted",
                TicketError::Signature(_) => "ticket-signature",
                _ => "ticket-other",
            },
            Refusal::Directory(_) => "directory-change-refused",
            Refusal::DirectoryBehind => "directory-behind",
            Refusal::UnknownFolder { .. } => "unknown-folder",
            Refusal::DeviceNotActive { .. } => "device-not-active",
            Refusal::NotMapped { .. } => "not-mapped",
            Refusal::NotMember { .. } => "not-member",
            Refusal::Protocol(_) => "protocol",
            Refusal::StorageLimit { .. } => "storage-limit",
            Refusal::Peer(_) => "peer-refused",
        },
        _ => return None,
    })
}

/// Whether a clock offset is within the tickets' skew allowance.
pub fn skew_within(skew_ms: i64) -> bool {
    skew_ms.unsigned_abs() * 1_000 <= TICKET_SKEW_US
}

/// The injected device's scripted answer to a directory message: a `DirSync` to a `DirHello`, a
/// `DirDone` to a `DirSync`, offering the cloud-signed `AddDevice` every other time.
pub fn injected_answer(node: &mut MeshNode, bytes: &[u8], max: usize) -> Option<Vec<u8>> {
    let message = wire::decode(bytes, max).ok()?;
    node.attempts += 1;
    let changes: Vec<SignedChange> =
        if node.attempts % 2 == 1 { node.inject.iter().cloned().collect() } else { Vec::new() };
    let (step, body) = match message.body {
        Body::DirHello { .. } => {
            let heads = node.dir.heads().into_iter().collect();
            (1, Body::DirSync { ticket: node.creds.ticket.clone(), heads, changes, complete: true })
        }
        Body::DirSync { .. } => (2, Body::DirDone { changes, complete: true }),
        _ => return None,
    };
    Some(wire::encode(&wire::Message { version: message.version, session: message.session, step, body }))
}

/// The injected device's opening `DirHello`.
pub fn injected_hello(node: &MeshNode, folder: FolderId, sid: u64) -> Vec<u8> {
    let body = Body::DirHello {
        folder,
        ticket: node.creds.ticket.clone(),
        heads: node.dir.heads().into_iter().collect(),
    };
    wire::encode(&wire::Message { version: wire::WIRE_VERSION, session: sid, step: 0, body })
}

/// Alters the first item of an item-carrying feed message (keeping its signature); returns the
/// new bytes and the altered version's identity.
pub fn tamper(bytes: &[u8], max: usize) -> Option<(Vec<u8>, [u8; 16])> {
    let mut message = wire::decode(bytes, max).ok()?;
    let items = match &mut message.body {
        Body::Changes { items, .. } | Body::Diff { items, .. } | Body::Items { items, .. } => items,
        _ => return None,
    };
    let first = items.first_mut()?;
    first.version.inner.push_str("<!-- altered in transit -->");
    let item = wire::from_wire(first).ok()?;
    Some((wire::encode(&message), version_key(&item.version)))
}

/// A forged version of `current` (or a new item): a new version named after `victim`, carrying
/// the previous version's signature (or none that verifies).
pub fn forge(
    current: Option<&Arc<Item>>,
    id: &feedsync::ItemId,
    victim: &feedsync::Endpoint,
    when: &feedsync::When,
    text: String,
) -> Option<Item> {
    let mut scratch = engine::replica::Replica::new(0);
    if let Some(cur) = current {
        scratch.merge(cur).ok()?;
    }
    let edit = feedsync::Edit {
        content: Some(Arc::new(feedsync::Content { inner: text.into(), ..feedsync::Content::empty() })),
        ..feedsync::Edit::default()
    };
    scratch.change(id, victim, when, &edit).ok()?;
    let mut forged = (**scratch.item(id)?).clone();
    let signature = current
        .and_then(|c| c.version.signature.clone())
        .unwrap_or_else(|| VersionSignature::single(Sig64([7; 64])));
    forged.version.signature = Some(signature);
    Some(forged)
}

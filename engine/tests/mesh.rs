//! Issue 5 through the public API: the directory log, pairing, tickets, signed versions and the
//! authorized session. Each test names the claim of ARCHITECTURE.md's threat model it backs.

use std::sync::Arc;

use engine::authz::{AuthSession, Credentials, Policy, Refusal};
use engine::directory::{
    pair_new_device, pairing_commitment, short_code, DirError, Directory, FolderId, MemberState, Op, Role,
    SignedChange, UserId,
};
use engine::feedsync::{read_feed, write_feed, Content, Dialect, Edit, Feed, ItemId, When};
use engine::loopback::{self, Authorized, Channel, Clean, Direction};
use engine::replica::Replica;
use engine::signing::{DeviceId, DeviceKey, SignatureError};
use engine::sync::{Config, Micros, Outcome, Retained, SyncError};
use engine::ticket::{ChannelKey, Rights, Ticket, TicketAuthority, TicketError, TICKET_SKEW_US};

fn key(n: u8) -> DeviceKey {
    DeviceKey::from_bytes(&[n; 32])
}

fn edit(text: &str) -> Edit {
    Edit {
        content: Some(Arc::new(Content {
            inner: format!("<title>{text}</title>").into(),
            ..Content::empty()
        })),
        ..Edit::default()
    }
}

fn when(secs: i64) -> When {
    When::from_unix_secs(1_700_000_000 + secs).unwrap()
}

const T0: Micros = 1_000_000_000_000;

/// Alice (devices a1, a2) owns folder F; Bob (b1) is an active member; Carol (c1) is a user who
/// is not a member. F is mapped on a1, a2 and b1. Every device holds the whole directory.
struct World {
    keys: Vec<(&'static str, DeviceKey)>,
    dir: Directory,
    folder: FolderId,
    cloud: TicketAuthority,
}

impl World {
    fn new() -> Self {
        let (a1, a2, b1, c1) = (key(1), key(2), key(3), key(4));
        let mut dir = Directory::new();
        dir.make(&a1, 1, Op::CreateUser { name: "alice".into() }).unwrap();
        dir.make(&b1, 2, Op::CreateUser { name: "bob".into() }).unwrap();
        dir.make(&c1, 3, Op::CreateUser { name: "carol".into() }).unwrap();
        let alice = UserId::of_first_device(DeviceId::of(&a1));
        pair(&mut dir, &a1, &a2, alice);
        let folder = dir.make(&a1, 5, Op::CreateFolder { name: "photos".into() }).unwrap().folder_id();
        let bob = UserId::of_first_device(DeviceId::of(&b1));
        let invite =
            dir.make(&a1, 6, Op::Invite { folder, invitee: bob, role: Role::Member }).unwrap().invite_id();
        dir.make(&b1, 7, Op::Accept { invitation: invite }).unwrap();
        for k in [&a1, &a2, &b1] {
            dir.make(k, 8, Op::Map { folder }).unwrap();
        }
        let cloud = TicketAuthority::new(key(200));
        Self { keys: vec![("a1", a1), ("a2", a2), ("b1", b1), ("c1", c1)], dir, folder, cloud }
    }

    fn key(&self, name: &str) -> &DeviceKey {
        &self.keys.iter().find(|(n, _)| *n == name).unwrap().1
    }

    fn device(&self, name: &str) -> DeviceId {
        DeviceId::of(self.key(name))
    }

    fn ticket(&mut self, name: &str, now: Micros) -> Ticket {
        let device = self.device(name);
        self.cloud.issue_from(&self.dir, device, device.into(), now)
    }

    fn policy(&mut self, name: &str, now: Micros) -> Policy {
        let ticket = self.ticket(name, now);
        Policy::Directory(Box::new(Credentials { device: self.device(name), ticket, cloud: self.cloud.id() }))
    }
}

/// Pairs `new` into `user` through `existing`, as the two devices would.
fn pair(dir: &mut Directory, existing: &DeviceKey, new: &DeviceKey, user: UserId) -> SignedChange {
    let (nonce_existing, nonce_new) = ([7u8; 32], [9u8; 32]);
    let new_id = DeviceId::of(new);
    let commitment = pairing_commitment(&new_id, &nonce_new);
    let code = short_code(&DeviceId::of(existing), &new_id, &nonce_existing, &nonce_new);
    let pairing =
        pair_new_device(new, user, DeviceId::of(existing), nonce_existing, nonce_new, code).unwrap();
    dir.add_paired_device(existing, user, commitment, pairing, code, 4).unwrap()
}

/// One side of a session under test.
struct Side<'a> {
    dir: &'a mut Directory,
    replica: &'a mut Replica,
    policy: Policy,
    channel: ChannelKey,
}

struct Ran {
    initiator: Outcome,
    responder: Outcome,
}

/// Runs an authorized session on a clean channel, `i` initiating. Each side sees the other's
/// *channel* key (what the transport authenticated), whatever ticket it presents.
fn run(i: Side<'_>, r: Side<'_>, folder: FolderId, now: Micros) -> Ran {
    let cfg = Config::default();
    let session = AuthSession::initiate(
        9,
        now,
        folder,
        i.policy,
        r.channel,
        i.dir,
        i.replica,
        cfg.clone(),
        Retained::default(),
    );
    let mut si = Authorized { session, directory: i.dir, replica: i.replica };
    let session = AuthSession::respond(9, r.policy, i.channel, r.replica, cfg);
    let mut sr = Authorized { session, directory: r.dir, replica: r.replica };
    loopback::run_clean(&mut si, &mut sr, Clean { now, step_us: 0, rounds_max: 64 }, |_, _| {});
    Ran { initiator: si.session.outcome(), responder: sr.session.outcome() }
}

fn refusal(outcome: &Outcome) -> Option<&Refusal> {
    match outcome {
        Outcome::Failed(SyncError::Refused(r)) => Some(r),
        _ => None,
    }
}

fn done(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Done { .. })
}

// ---------------------------------------------------------------- directory and pairing

#[test]
fn pairing_needs_the_code_on_both_sides() {
    let mut w = World::new();
    let (a1, n) = (w.key("a1").clone(), key(50));
    let alice = UserId::of_first_device(DeviceId::of(&a1));
    let (ne, nn) = ([1u8; 32], [2u8; 32]);
    let code = short_code(&DeviceId::of(&a1), &DeviceId::of(&n), &ne, &nn);
    // The new device refuses a code that is not the one it shows.
    let wrong = (code + 1) % 1_000_000;
    assert!(matches!(
        pair_new_device(&n, alice, DeviceId::of(&a1), ne, nn, wrong),
        Err(DirError::Pairing(_))
    ));
    let pairing = pair_new_device(&n, alice, DeviceId::of(&a1), ne, nn, code).unwrap();
    let commitment = pairing_commitment(&DeviceId::of(&n), &nn);
    // The existing device refuses a wrong code, and a nonce that does not match the commitment.
    let err = w.dir.add_paired_device(&a1, alice, commitment, pairing.clone(), wrong, 9);
    assert!(matches!(err, Err(DirError::Pairing(_))));
    let err = w.dir.add_paired_device(&a1, alice, [0; 32], pairing.clone(), code, 9);
    assert!(matches!(err, Err(DirError::Pairing(_))));
    assert_eq!(w.dir.user_of(&DeviceId::of(&n)), None);
    w.dir.add_paired_device(&a1, alice, commitment, pairing, code, 9).unwrap();
    assert_eq!(w.dir.user_of(&DeviceId::of(&n)), Some(alice));
    assert!(w.dir.news().items().any(|i| i.version.content.inner.contains("device added")));
}

/// Threat model: the cloud cannot add a device or a member.
#[test]
fn cloud_cannot_add_a_device_or_a_member() {
    let w = World::new();
    let cloud = key(200);
    let alice = UserId::of_first_device(w.device("a1"));
    let carol = UserId::of_first_device(w.device("c1"));
    // The cloud's key signs an AddDevice for a device of its own (with the device's consent).
    let evil = key(201);
    let (ne, nn) = ([3u8; 32], [4u8; 32]);
    let code = short_code(&DeviceId::of(&cloud), &DeviceId::of(&evil), &ne, &nn);
    let pairing = pair_new_device(&evil, alice, DeviceId::of(&cloud), ne, nn, code).unwrap();
    let mut dir = w.dir.clone();
    let err = dir.make(&cloud, 10, Op::AddDevice { user: alice, pairing }).unwrap_err();
    assert!(matches!(err, DirError::NotEntitled { .. }), "{err}");
    // ... nor invite a member, nor make one join.
    let err =
        dir.make(&cloud, 10, Op::Invite { folder: w.folder, invitee: carol, role: Role::Admin }).unwrap_err();
    assert!(matches!(err, DirError::NotEntitled { .. }), "{err}");
    assert_eq!(dir.digest(), w.dir.digest());
    // A member (not admin) cannot invite either.
    let err = dir.make(w.key("b1"), 10, Op::Invite { folder: w.folder, invitee: carol, role: Role::Member });
    assert!(matches!(err, Err(DirError::NotEntitled { .. })));
}

/// Concurrent changes merge deterministically: every delivery order gives the same log and state.
#[test]
fn concurrent_directory_changes_merge_in_any_order() {
    let mut w = World::new();
    let bob = UserId::of_first_device(w.device("b1"));
    let carol = UserId::of_first_device(w.device("c1"));
    // Make Bob an admin: re-invite after a removal.
    let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
    let r = da.make(w.key("a1"), 20, Op::RemoveMember { folder: w.folder, user: bob }).unwrap();
    let inv =
        da.make(w.key("a1"), 21, Op::Invite { folder: w.folder, invitee: bob, role: Role::Admin }).unwrap();
    let acc = {
        db.apply(&[r.clone(), inv.clone()]).unwrap();
        db.make(w.key("b1"), 22, Op::Accept { invitation: inv.invite_id() }).unwrap()
    };
    da.apply(std::slice::from_ref(&acc)).unwrap();
    // Concurrently: Alice (a2) removes Bob again; Bob (admin) invites Carol.
    let (mut x, mut y) = (da.clone(), da.clone());
    let removal = x.make(w.key("a2"), 30, Op::RemoveMember { folder: w.folder, user: bob }).unwrap();
    let invite =
        y.make(w.key("b1"), 30, Op::Invite { folder: w.folder, invitee: carol, role: Role::Member }).unwrap();
    x.apply(std::slice::from_ref(&invite)).unwrap();
    y.apply(std::slice::from_ref(&removal)).unwrap();
    assert_eq!(x.digest(), y.digest());
    assert_eq!(x.state(), y.state());
    assert_eq!(x.folder(&w.folder).unwrap().members[&bob].state, MemberState::Removed);
    // A fresh device that receives the whole log in reverse order agrees too.
    let mut all: Vec<SignedChange> = x.changes().cloned().collect();
    all.reverse();
    let mut fresh = Directory::new();
    fresh.apply(&all).unwrap();
    assert_eq!(fresh.state(), x.state());
    // Exactly one of the two concurrent changes is first; if the removal sorts first, Bob's
    // invitation is inert, else Carol is pending: either way every replica says the same.
    let carol_pending = x.folder(&w.folder).unwrap().members.get(&carol).map(|m| m.state);
    assert_eq!(carol_pending.is_none(), x.is_inert(&invite.id()));
    w.dir = x;
}

#[test]
fn invitations_decline_cancel_and_resend() {
    let mut w = World::new();
    let carol = UserId::of_first_device(w.device("c1"));
    let (a1, c1) = (w.key("a1").clone(), w.key("c1").clone());
    let inv =
        w.dir.make(&a1, 40, Op::Invite { folder: w.folder, invitee: carol, role: Role::Member }).unwrap();
    let id = inv.invite_id();
    w.dir.make(&a1, 41, Op::Resend { invitation: id }).unwrap();
    assert_eq!(w.dir.invitation(&id).unwrap().sent, 2);
    w.dir.make(&c1, 42, Op::Decline { invitation: id }).unwrap();
    assert!(!w.dir.folder(&w.folder).unwrap().members.contains_key(&carol));
    // A declined invitation can be neither accepted nor re-sent.
    assert!(w.dir.make(&c1, 43, Op::Accept { invitation: id }).is_err());
    assert!(w.dir.make(&a1, 43, Op::Resend { invitation: id }).is_err());
    let again =
        w.dir.make(&a1, 44, Op::Invite { folder: w.folder, invitee: carol, role: Role::Member }).unwrap();
    w.dir.make(&a1, 45, Op::Cancel { invitation: again.invite_id() }).unwrap();
    assert!(w.dir.make(&c1, 46, Op::Accept { invitation: again.invite_id() }).is_err());
}

// ---------------------------------------------------------------- sessions

fn signed_replica(w: &World, items: &[(&str, &str)]) -> Replica {
    let mut r = Replica::new_signed(1, w.folder.scope());
    for (i, (id, by)) in items.iter().enumerate() {
        r.change_signed(&ItemId::new(id).unwrap(), w.key(by), &when(i as i64), &edit(id)).unwrap();
    }
    r
}

#[test]
fn members_sync_signed_versions() {
    let mut w = World::new();
    let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
    let mut ra = signed_replica(&w, &[("x", "a1"), ("y", "a1")]);
    let mut rb = signed_replica(&w, &[("z", "b1")]);
    let (pa, pb) = (w.policy("a1", T0), w.policy("b1", T0));
    let ran = run(
        Side { dir: &mut da, replica: &mut ra, policy: pa, channel: w.device("a1").into() },
        Side { dir: &mut db, replica: &mut rb, policy: pb, channel: w.device("b1").into() },
        w.folder,
        T0 + 1,
    );
    assert!(done(&ran.initiator) && done(&ran.responder), "{:?} {:?}", ran.initiator, ran.responder);
    assert_eq!(ra.digest(), rb.digest());
    assert_eq!(ra.len(), 3);
}

/// Threat model: a removed member gets no change from a device that has seen the removal, and a
/// removal known to either side takes effect before data flows.
#[test]
fn removed_member_gets_no_later_change() {
    let mut w = World::new();
    let bob = UserId::of_first_device(w.device("b1"));
    let (mut d_a1, mut d_a2, mut d_b1) = (w.dir.clone(), w.dir.clone(), w.dir.clone());
    let (mut r_a1, mut r_a2, mut r_b1) = (
        signed_replica(&w, &[("x", "a1")]),
        Replica::new_signed(2, w.folder.scope()),
        Replica::new_signed(3, w.folder.scope()),
    );
    let tickets = [w.policy("a1", T0), w.policy("a2", T0), w.policy("b1", T0)];
    let ch = |w: &World, n| ChannelKey::from(w.device(n));
    // Alice (a1) removes Bob and writes a later change.
    d_a1.make(w.key("a1"), 50, Op::RemoveMember { folder: w.folder, user: bob }).unwrap();
    r_a1.change_signed(&ItemId::new("after").unwrap(), w.key("a1"), &when(60), &edit("secret")).unwrap();

    // b1 asks a1 (who knows): b1 catches its directory up first and refuses itself.
    let ran = run(
        Side { dir: &mut d_b1, replica: &mut r_b1, policy: tickets[2].clone(), channel: ch(&w, "b1") },
        Side { dir: &mut d_a1, replica: &mut r_a1, policy: tickets[0].clone(), channel: ch(&w, "a1") },
        w.folder,
        T0 + 1,
    );
    assert_eq!(refusal(&ran.initiator), Some(&Refusal::NotMember { device: w.device("b1") }));
    assert!(r_b1.is_empty(), "nothing reached the removed member");
    // a1 asks b1 (who now knows as well, but let us use a fresh b1 directory that does not).
    let mut d_b1_old = w.dir.clone();
    let ran = run(
        Side { dir: &mut d_a1, replica: &mut r_a1, policy: tickets[0].clone(), channel: ch(&w, "a1") },
        Side { dir: &mut d_b1_old, replica: &mut r_b1, policy: tickets[2].clone(), channel: ch(&w, "b1") },
        w.folder,
        T0 + 2,
    );
    assert!(refusal(&ran.initiator).is_some() && refusal(&ran.responder).is_some());
    assert!(r_b1.is_empty());

    // a2 has not seen the removal: it still syncs with b1 (expected: the removal is not known).
    let ran = run(
        Side { dir: &mut d_b1, replica: &mut r_b1, policy: tickets[2].clone(), channel: ch(&w, "b1") },
        Side { dir: &mut d_a2, replica: &mut r_a2, policy: tickets[1].clone(), channel: ch(&w, "a2") },
        w.folder,
        T0 + 3,
    );
    // ... except that b1 itself now carries the removal in its directory and refuses.
    assert!(refusal(&ran.initiator).is_some());
    // a1 and a2 sync: a2 learns the removal and the later change.
    let ran = run(
        Side { dir: &mut d_a2, replica: &mut r_a2, policy: tickets[1].clone(), channel: ch(&w, "a2") },
        Side { dir: &mut d_a1, replica: &mut r_a1, policy: tickets[0].clone(), channel: ch(&w, "a1") },
        w.folder,
        T0 + 4,
    );
    assert!(done(&ran.initiator), "{:?}", ran.initiator);
    assert!(r_a2.item(&ItemId::new("after").unwrap()).is_some());
    // Now b1, with an old directory and a valid ticket, gets nothing from a2.
    let mut d_b1_old = w.dir.clone();
    let ran = run(
        Side { dir: &mut d_b1_old, replica: &mut r_b1, policy: tickets[2].clone(), channel: ch(&w, "b1") },
        Side { dir: &mut d_a2, replica: &mut r_a2, policy: tickets[1].clone(), channel: ch(&w, "a2") },
        w.folder,
        T0 + 5,
    );
    assert!(refusal(&ran.initiator).is_some());
    assert!(r_b1.item(&ItemId::new("after").unwrap()).is_none());
}

/// A removal made while a session runs stops it before any more feed data moves: the owner
/// authorized the member, then removed it before the member's feed Hello arrived (the Hello had
/// overtaken the DirDone and was retransmitted); the owner refuses instead of serving its later
/// change (found by the swarm, seed 87).
#[test]
fn a_removal_made_during_a_session_stops_its_feed() {
    let mut w = World::new();
    let bob = UserId::of_first_device(w.device("b1"));
    let (mut d_a1, mut d_b1) = (w.dir.clone(), w.dir.clone());
    let mut r_a1 = signed_replica(&w, &[("x", "a1")]);
    let mut r_b1 = Replica::new_signed(3, w.folder.scope());
    let (p_a1, p_b1) = (w.policy("a1", T0), w.policy("b1", T0));
    let (ch_a1, ch_b1) = (ChannelKey::from(w.device("a1")), ChannelKey::from(w.device("b1")));
    let cfg = Config::default();
    let mut i =
        AuthSession::initiate(9, T0, w.folder, p_b1, ch_a1, &d_b1, &r_b1, cfg.clone(), Retained::default());
    let mut r = AuthSession::respond(9, p_a1, ch_b1, &r_a1, cfg);
    // DirHello, DirSync: the owner authorized Bob's device.
    let hello = i.poll_transmit().expect("DirHello");
    r.handle_message(T0, &mut d_a1, &mut r_a1, &hello).unwrap();
    let sync = r.poll_transmit().expect("DirSync");
    i.handle_message(T0, &mut d_b1, &mut r_b1, &sync).unwrap();
    let dir_done = i.poll_transmit().expect("DirDone");
    let feed_hello = i.poll_transmit().expect("the feed Hello");
    r.handle_message(T0, &mut d_a1, &mut r_a1, &dir_done).unwrap();
    // Now the owner removes Bob and writes a change Bob must never get.
    d_a1.make(w.key("a1"), 50, Op::RemoveMember { folder: w.folder, user: bob }).unwrap();
    r_a1.change_signed(&ItemId::new("after").unwrap(), w.key("a1"), &when(60), &edit("secret")).unwrap();
    let refused = r.handle_message(T0 + 1, &mut d_a1, &mut r_a1, &feed_hello);
    assert!(matches!(refused, Err(SyncError::Refused(Refusal::NotMember { .. }))), "{refused:?}");
    assert!(refusal(&r.outcome()).is_some(), "{:?}", r.outcome());
    while let Some(reply) = r.poll_transmit() {
        let _ = i.handle_message(T0 + 2, &mut d_b1, &mut r_b1, &reply);
    }
    assert!(refusal(&i.outcome()).is_some(), "the member learns it was refused: {:?}", i.outcome());
    assert!(r_b1.is_empty(), "nothing reached the removed member");
}

/// Threat model: a ticket replayed by another device (another channel key) fails.
#[test]
fn replayed_ticket_from_another_device_fails() {
    let mut w = World::new();
    let (mut da, mut dc) = (w.dir.clone(), w.dir.clone());
    let (mut ra, mut rc) = (signed_replica(&w, &[("x", "a1")]), Replica::new_signed(4, w.folder.scope()));
    // Carol's device c1 presents b1's ticket over its own channel.
    let stolen = w.policy("b1", T0);
    let pa = w.policy("a1", T0);
    let ran = run(
        Side { dir: &mut dc, replica: &mut rc, policy: stolen, channel: w.device("c1").into() },
        Side { dir: &mut da, replica: &mut ra, policy: pa, channel: w.device("a1").into() },
        w.folder,
        T0 + 1,
    );
    assert_eq!(refusal(&ran.responder), Some(&Refusal::Ticket(TicketError::WrongChannel)));
    assert!(matches!(refusal(&ran.initiator), Some(Refusal::Peer(_))), "the refusal reaches the peer");
    assert!(rc.is_empty());
}

/// Threat model: the cloud can issue a valid ticket to a device it made up, but devices refuse
/// it, because their own directory does not know the device.
#[test]
fn cloud_injected_device_is_refused() {
    let mut w = World::new();
    let evil = key(201);
    let evil_id = DeviceId::of(&evil);
    let ticket = w.cloud.issue(
        evil_id,
        evil_id.into(),
        Rights { folders: vec![w.folder], relay: true },
        T0,
        600_000_000,
    );
    let policy = Policy::Directory(Box::new(Credentials { device: evil_id, ticket, cloud: w.cloud.id() }));
    let (mut da, mut de) = (w.dir.clone(), w.dir.clone());
    let (mut ra, mut re) = (signed_replica(&w, &[("x", "a1")]), Replica::new_signed(5, w.folder.scope()));
    let pa = w.policy("a1", T0);
    let before = ra.digest();
    let ran = run(
        Side { dir: &mut da, replica: &mut ra, policy: pa, channel: w.device("a1").into() },
        Side { dir: &mut de, replica: &mut re, policy, channel: evil_id.into() },
        w.folder,
        T0 + 1,
    );
    assert_eq!(refusal(&ran.initiator), Some(&Refusal::DeviceNotActive { device: evil_id }));
    assert!(re.is_empty());
    assert_eq!(ra.digest(), before);
}

/// A removed member's device that skips its own checks and sends feed data anyway is refused by
/// the responder, and its items never reach the responder's replica.
#[test]
fn malicious_initiator_is_refused_by_the_responder() {
    use engine::sync::Session;
    use engine::wire::{encode, Body, Message, WIRE_VERSION};
    let mut w = World::new();
    let bob = UserId::of_first_device(w.device("b1"));
    let mut da = w.dir.clone();
    da.make(w.key("a1"), 50, Op::RemoveMember { folder: w.folder, user: bob }).unwrap();
    let mut ra = signed_replica(&w, &[("x", "a1")]);
    let rb = signed_replica(&w, &[("evil", "b1")]);
    let before = ra.digest();
    let Policy::Directory(creds_b) = w.policy("b1", T0) else { unreachable!() };
    let pa = w.policy("a1", T0);
    let msg = |step, body| encode(&Message { version: WIRE_VERSION, session: 5, step, body });
    let hello = msg(0, Body::DirHello { folder: w.folder, ticket: creds_b.ticket.clone(), heads: vec![] });
    let done = msg(2, Body::DirDone { changes: vec![], complete: true });
    let mut feed = Session::initiate(5, T0, &rb, Config::default(), Retained::default());
    let feed_hello = feed.poll_transmit().unwrap();
    let mut responder = AuthSession::respond(5, pa, w.device("b1").into(), &ra, Config::default());
    // Feed data before the directory phase is dropped unread.
    responder.handle_message(T0, &mut da, &mut ra, &feed_hello).unwrap();
    responder.handle_message(T0, &mut da, &mut ra, &hello).unwrap();
    let err = responder.handle_message(T0, &mut da, &mut ra, &done).unwrap_err();
    assert_eq!(err, SyncError::Refused(Refusal::NotMember { device: w.device("b1") }));
    let _ = responder.handle_message(T0, &mut da, &mut ra, &feed_hello);
    assert!(!responder.authorized());
    assert_eq!(ra.digest(), before);
    assert!(ra.item(&ItemId::new("evil").unwrap()).is_none());
}

/// Threat model: an expired ticket (past the skew allowance) is refused; within it, accepted.
#[test]
fn expired_ticket_is_refused_with_a_reason() {
    let mut w = World::new();
    let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
    let (mut ra, mut rb) = (signed_replica(&w, &[("x", "a1")]), Replica::new_signed(6, w.folder.scope()));
    let (pa, pb) = (w.policy("a1", T0), w.policy("b1", T0));
    let expiry = T0 + engine::ticket::TICKET_LIFETIME_US;
    // Just within the allowance: works.
    let ok = run(
        Side { dir: &mut db, replica: &mut rb, policy: pb.clone(), channel: w.device("b1").into() },
        Side { dir: &mut da, replica: &mut ra, policy: pa.clone(), channel: w.device("a1").into() },
        w.folder,
        expiry + TICKET_SKEW_US - 1,
    );
    assert!(done(&ok.initiator), "{:?}", ok.initiator);
    let late = run(
        Side { dir: &mut db, replica: &mut rb, policy: pb, channel: w.device("b1").into() },
        Side { dir: &mut da, replica: &mut ra, policy: pa, channel: w.device("a1").into() },
        w.folder,
        expiry + TICKET_SKEW_US,
    );
    assert!(matches!(refusal(&late.responder), Some(Refusal::Ticket(TicketError::Expired { .. }))));
}

/// Issue 11, defect 2: a member of two folders replays one folder's signed versions into the
/// other. Bob (b1) is a member of F and of G; Alice's tombstone of item "x" in F would delete G's
/// "x" under her name, and G's private "secret" must not reach F. Signatures name the folder, so
/// both are refused whole by the honest side.
#[test]
fn a_version_signed_for_one_folder_is_refused_in_another() {
    let mut w = World::new();
    let bob = UserId::of_first_device(w.device("b1"));
    let a1 = w.key("a1").clone();
    let g = w.dir.make(&a1, 20, Op::CreateFolder { name: "other".into() }).unwrap().folder_id();
    let invite = w.dir.make(&a1, 21, Op::Invite { folder: g, invitee: bob, role: Role::Member }).unwrap();
    let b1 = w.key("b1").clone();
    w.dir.make(&b1, 22, Op::Accept { invitation: invite.invite_id() }).unwrap();
    for k in [&a1, &b1] {
        w.dir.make(k, 23, Op::Map { folder: g }).unwrap();
    }
    // G holds "x" (Alice's) on a1; F holds Alice's tombstone of an "x" of its own.
    let mut ra_g = Replica::new_signed(1, g.scope());
    ra_g.change_signed(&ItemId::new("x").unwrap(), &a1, &when(1), &edit("x in G")).unwrap();
    let mut in_f = signed_replica(&w, &[("x", "a1")]);
    let tombstone = Edit { delete: true, ..Edit::default() };
    in_f.change_signed(&ItemId::new("x").unwrap(), &a1, &when(50), &tombstone).unwrap();
    // Bob's (compromised) device puts F's tombstone into what it serves for G.
    let mut rb = Replica::new(7).scoped(g.scope());
    rb.merge(in_f.item(&ItemId::new("x").unwrap()).unwrap()).unwrap();
    let before = ra_g.digest();
    let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
    let (pa, pb) = (w.policy("a1", T0), w.policy("b1", T0));
    let ran = run(
        Side { dir: &mut db, replica: &mut rb, policy: pb, channel: w.device("b1").into() },
        Side { dir: &mut da, replica: &mut ra_g, policy: pa, channel: w.device("a1").into() },
        g,
        T0 + 1,
    );
    assert!(
        matches!(ran.responder, Outcome::Failed(SyncError::Signature(SignatureError::Invalid { .. }))),
        "{:?}",
        ran.responder
    );
    assert_eq!(ra_g.digest(), before, "G's item kept");
    assert!(!ra_g.item(&ItemId::new("x").unwrap()).unwrap().version.deleted);
    // The same tombstone in its own folder verifies.
    let fresh_f = Replica::new_signed(9, w.folder.scope());
    assert!(fresh_f.check_incoming(in_f.item(&ItemId::new("x").unwrap()).unwrap()).is_ok());
}

/// Threat model: a forged or altered version is refused whole by a signed replica, in a session.
#[test]
fn forged_version_is_refused_in_a_session() {
    let mut w = World::new();
    let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
    let mut ra = signed_replica(&w, &[("x", "a1")]);
    // b1 is compromised: its (unsigned-mode) replica holds a version claiming to be a1's, with
    // content a1 never wrote (a1's signature over other bytes).
    let honest = signed_replica(&w, &[("x", "a1")]);
    let mut forged = (**honest.item(&ItemId::new("x").unwrap()).unwrap()).clone();
    forged.version.updates += 1;
    let mut rb = Replica::new(7);
    rb.merge(&Arc::new(forged)).unwrap();
    let before = ra.digest();
    let (pa, pb) = (w.policy("a1", T0), w.policy("b1", T0));
    let ran = run(
        Side { dir: &mut db, replica: &mut rb, policy: pb, channel: w.device("b1").into() },
        Side { dir: &mut da, replica: &mut ra, policy: pa, channel: w.device("a1").into() },
        w.folder,
        T0 + 1,
    );
    assert!(
        matches!(ran.responder, Outcome::Failed(SyncError::Signature(SignatureError::Invalid { .. }))),
        "{:?}",
        ran.responder
    );
    assert_eq!(ra.digest(), before);
}

/// Existing callers: the open policy is the plain session.
#[test]
fn open_policy_is_the_plain_session() {
    let w = World::new();
    let (mut da, mut db) = (Directory::new(), Directory::new());
    let mut ra = Replica::new(1);
    ra.change(
        &ItemId::new("x").unwrap(),
        &engine::feedsync::Endpoint::new("a").unwrap(),
        &when(0),
        &edit("x"),
    )
    .unwrap();
    let mut rb = Replica::new(2);
    let ran = run(
        Side { dir: &mut da, replica: &mut ra, policy: Policy::Open, channel: ChannelKey([1; 32]) },
        Side { dir: &mut db, replica: &mut rb, policy: Policy::Open, channel: ChannelKey([2; 32]) },
        w.folder,
        T0,
    );
    assert!(done(&ran.initiator));
    assert_eq!(ra.digest(), rb.digest());
}

/// A channel on which messages arrive at once, one at a time: the oldest in flight, or (three
/// times in ten) the newest; a third are lost and a tenth come twice, by the flips of `coin`.
struct Shuffled<C> {
    coin: C,
    in_flight: Vec<(Micros, Direction, Vec<u8>)>,
}

impl<C: FnMut(u64) -> bool> Channel for Shuffled<C> {
    fn send(&mut self, now: Micros, to: Direction, bytes: Vec<u8>) {
        self.in_flight.push((now, to, bytes));
    }

    fn next_arrival(&self) -> Option<Micros> {
        self.in_flight.iter().map(|(at, _, _)| *at).min()
    }

    fn arrive(&mut self) -> Option<(Micros, Direction, Vec<u8>)> {
        if self.in_flight.is_empty() {
            return None;
        }
        let pick = if (self.coin)(300_000) { self.in_flight.len() - 1 } else { 0 };
        let m = self.in_flight.remove(pick);
        if (self.coin)(330_000) {
            return None;
        }
        if (self.coin)(100_000) {
            self.in_flight.push(m.clone());
        }
        Some(m)
    }
}

/// The directory phase survives loss, duplication and reordering: for many seeds, a session
/// over a channel that drops a third of the messages and duplicates some still converges.
#[test]
fn authorized_session_survives_a_lossy_channel() {
    let mut w = World::new();
    let (pa, pb) = (w.policy("a1", T0), w.policy("b1", T0));
    let cfg = Config { max_retries: 40, ..Config::default() };
    let mut converged = 0;
    for seed in 0..24u64 {
        let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
        // b1 also brings a directory change a1 lacks (it maps the folder again: a no-op change).
        db.make(w.key("b1"), 70, Op::Unmap { folder: w.folder, device: w.device("b1") }).unwrap();
        db.make(w.key("b1"), 71, Op::Map { folder: w.folder }).unwrap();
        let mut ra = signed_replica(&w, &[("x", "a1"), ("y", "a2")]);
        let mut rb = signed_replica(&w, &[("z", "b1")]);
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let coin = move |ppm: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % 1_000_000 < ppm
        };
        let session = AuthSession::initiate(
            3,
            T0,
            w.folder,
            pa.clone(),
            w.device("b1").into(),
            &da,
            &ra,
            cfg.clone(),
            Retained::default(),
        );
        let mut si = Authorized { session, directory: &mut da, replica: &mut ra };
        let session = AuthSession::respond(3, pb.clone(), w.device("a1").into(), &rb, cfg.clone());
        let mut sr = Authorized { session, directory: &mut db, replica: &mut rb };
        let mut channel = Shuffled { coin, in_flight: Vec::new() };
        loopback::run_faulty(&mut si, &mut sr, &mut channel, T0, 4000);
        let si = si.session;
        assert!(
            !matches!(si.outcome(), Outcome::Failed(SyncError::Refused(_))),
            "seed {seed}: {:?}",
            si.outcome()
        );
        if done(&si.outcome()) && ra.digest() == rb.digest() && da.digest() == db.digest() {
            converged += 1;
        }
    }
    // Retries are bounded, so an unlucky seed may time out; most must converge.
    assert!(converged >= 20, "{converged} of 24 converged");
}

// ---------------------------------------------------------------- FeedSync XML

/// Signed versions survive FeedSync XML (the extension element), and an altered one fails.
#[test]
fn signatures_round_trip_through_feedsync_xml() {
    let w = World::new();
    let mut feed = Feed::new(Dialect::Rss);
    let r = signed_replica(&w, &[("x", "a1"), ("y", "b1")]);
    for item in r.items() {
        feed.put((**item).clone()).unwrap();
    }
    let xml = write_feed(&feed);
    assert!(xml.contains("<fms:signature xmlns:fms=\"urn:feedmesh:signature:1\">"));
    let back = read_feed(xml.as_bytes()).unwrap();
    let mut fresh = Replica::new_signed(9, w.folder.scope());
    for item in back.items() {
        assert!(item.version.signature.is_some());
        fresh.merge(&Arc::new(item.clone())).unwrap();
    }
    assert_eq!(fresh.digest(), r.digest());
    assert_eq!(write_feed(&back), xml);
    // Altering the title in the XML breaks the signature.
    let altered = read_feed(xml.replacen("<title>x</title>", "<title>X</title>", 1).as_bytes()).unwrap();
    let mut fresh = Replica::new_signed(9, w.folder.scope());
    let bad = altered.items().map(|i| fresh.merge(&Arc::new(i.clone()))).filter(|r| r.is_err()).count();
    assert_eq!(bad, 1);
    // A bad signature element is a typed problem, not a panic.
    let junk = xml.replacen("\">", "\">zz", 1);
    let _ = read_feed(junk.as_bytes());
}

#[test]
fn signed_replicas_refuse_unsigned_local_changes() {
    let mut r = Replica::new_signed(1, engine::signing::FeedScope([3; 16]));
    let err = r
        .change(
            &ItemId::new("x").unwrap(),
            &engine::feedsync::Endpoint::new("a").unwrap(),
            &when(0),
            &edit("x"),
        )
        .unwrap_err();
    assert_eq!(err, engine::feedsync::FeedsyncError::Signature(SignatureError::LocalUnsigned));
}

// ---------------------------------------------------------------- the cloud as a sync peer

/// The cloud keeps a replica of every feed: a device that may hold the folder syncs with it (in
/// both roles), a device without the folder mapped is refused, and what the cloud relays is
/// still the devices' signed versions.
#[test]
fn the_cloud_syncs_with_devices_that_hold_the_folder() {
    let mut w = World::new();
    let folder = w.folder;
    let cloud_key = key(200);
    let cloud_id = DeviceId::of(&cloud_key);
    let cloud_policy = |w: &mut World, now: Micros| {
        let ticket = w.cloud.issue(
            cloud_id,
            cloud_id.into(),
            Rights { folders: vec![folder], relay: false },
            now,
            60_000_000,
        );
        Policy::Directory(Box::new(Credentials { device: cloud_id, ticket, cloud: w.cloud.id() }))
    };
    let mut a1_dir = w.dir.clone();
    let mut cloud_dir = w.dir.clone();
    let mut a1_rep = signed_replica(&w, &[("x", "a1")]);
    let mut cloud_rep = Replica::new_signed(2, w.folder.scope());
    let (pa1, pc) = (w.policy("a1", T0), cloud_policy(&mut w, T0));
    let ran = run(
        Side { dir: &mut a1_dir, replica: &mut a1_rep, policy: pa1, channel: w.device("a1").into() },
        Side { dir: &mut cloud_dir, replica: &mut cloud_rep, policy: pc, channel: cloud_id.into() },
        folder,
        T0,
    );
    assert!(done(&ran.initiator) && done(&ran.responder), "{:?} {:?}", ran.initiator, ran.responder);
    assert_eq!(cloud_rep.digest(), a1_rep.digest());
    // The cloud initiates towards b1 (a member), which gets a1's signed version.
    let mut b1_dir = w.dir.clone();
    let mut b1_rep = Replica::new_signed(3, w.folder.scope());
    let (pc, pb1) = (cloud_policy(&mut w, T0), w.policy("b1", T0));
    let ran = run(
        Side { dir: &mut cloud_dir, replica: &mut cloud_rep, policy: pc, channel: cloud_id.into() },
        Side { dir: &mut b1_dir, replica: &mut b1_rep, policy: pb1, channel: w.device("b1").into() },
        folder,
        T0,
    );
    assert!(done(&ran.initiator) && done(&ran.responder));
    assert_eq!(b1_rep.digest(), a1_rep.digest());
    // c1 is not a member (give it a ticket that grants the folder anyway: the cloud's own
    // authority would not).
    let ticket = w.cloud.issue(
        w.device("c1"),
        w.device("c1").into(),
        Rights { folders: vec![folder], relay: true },
        T0,
        60_000_000,
    );
    let pc1 =
        Policy::Directory(Box::new(Credentials { device: w.device("c1"), ticket, cloud: w.cloud.id() }));
    let mut c1_dir = w.dir.clone();
    let mut c1_rep = Replica::new_signed(4, w.folder.scope());
    let pc = cloud_policy(&mut w, T0);
    let ran = run(
        Side { dir: &mut c1_dir, replica: &mut c1_rep, policy: pc1, channel: w.device("c1").into() },
        Side { dir: &mut cloud_dir, replica: &mut cloud_rep, policy: pc, channel: cloud_id.into() },
        folder,
        T0,
    );
    // c1's own directory already says it may not hold the folder, so it refuses first; the
    // cloud ends refused too. Either way nothing of the folder reaches c1.
    assert!(matches!(refusal(&ran.initiator), Some(Refusal::NotMember { .. })), "{:?}", ran.initiator);
    assert!(refusal(&ran.responder).is_some(), "{:?}", ran.responder);
    assert!(c1_rep.is_empty());
    // And the cloud applies the same rule itself: c1 may not hold it.
    assert!(matches!(
        cloud_dir.may_hold(&folder, &w.device("c1")),
        Err(engine::directory::Denied::NotMember { .. })
    ));
    assert!(cloud_dir.may_hold(&folder, &w.device("b1")).is_ok());
}

/// Checking a batch on several threads gives what checking it item by item gives: the first
/// failing item's error, and nothing merged; a clean batch merges whole.
#[test]
fn batch_verification_does_not_depend_on_the_thread_count() {
    let w = World::new();
    let names: Vec<String> = (0..200).map(|i| format!("i{i:03}")).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "a1")).collect();
    let source = signed_replica(&w, &pairs);
    let clean: Vec<Arc<_>> = source.items().cloned().collect();
    let mut bad = clean.clone();
    for (at, forge) in [(60, false), (150, false), (170, true)] {
        let mut item = (*bad[at]).clone();
        if forge {
            item.version.updates += 1;
        } else {
            item.version.signature = None;
        }
        bad[at] = Arc::new(item);
    }
    for threads in [1, 2, 3, 7, 64] {
        let mut fresh = Replica::new_signed(10, w.folder.scope());
        assert_eq!(
            fresh.check_incoming_all(&bad, threads),
            Err(SignatureError::Missing { id: ItemId::new("i060").unwrap() }),
            "{threads} threads"
        );
        assert!(fresh.merge_all(&bad, threads).is_err());
        assert!(fresh.is_empty(), "a refused batch merges nothing ({threads} threads)");
        assert_eq!(fresh.merge_all(&clean, threads).unwrap(), 200);
        assert_eq!(fresh.digest(), source.digest(), "{threads} threads");
    }
}

/// Found by the `auth_responder` fuzz target: an authorized responder whose peer goes silent
/// after the directory phase had no timer (the directory timer was dropped and a fresh feed
/// responder has none), so the session ran for good. Now it keeps resending its last directory
/// message with backoff and fails with a timeout.
#[test]
fn a_responder_whose_peer_falls_silent_after_authorization_times_out() {
    let mut w = World::new();
    let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
    let (mut ra, mut rb) = (signed_replica(&w, &[("x", "a1")]), Replica::new_signed(2, w.folder.scope()));
    let (pa, pb) = (w.policy("a1", T0), w.policy("b1", T0));
    let cfg = Config::default();
    let mut si = AuthSession::initiate(
        9,
        T0,
        w.folder,
        pa,
        w.device("b1").into(),
        &da,
        &ra,
        cfg.clone(),
        Retained::default(),
    );
    let mut sr: Option<AuthSession> = None;
    // Deliver both ways until the responder is authorized, then the initiator falls silent.
    for _ in 0..16 {
        if sr.as_ref().is_some_and(|s| s.authorized()) {
            break;
        }
        while let Some(m) = si.poll_transmit() {
            let s = sr.get_or_insert_with(|| {
                AuthSession::respond(9, pb.clone(), w.device("a1").into(), &rb, cfg.clone())
            });
            let _ = s.handle_message(T0, &mut db, &mut rb, &m);
        }
        if let Some(s) = sr.as_mut() {
            while let Some(m) = s.poll_transmit() {
                let _ = si.handle_message(T0, &mut da, &mut ra, &m);
            }
        }
    }
    let mut sr = sr.expect("a responder");
    assert!(sr.authorized());
    while sr.poll_transmit().is_some() {}
    let mut resent = 0;
    for _ in 0..=cfg.max_retries + 1 {
        let Some(at) = sr.poll_timeout() else { break };
        sr.handle_timeout(at);
        while sr.poll_transmit().is_some() {
            resent += 1;
        }
    }
    assert!(matches!(sr.outcome(), Outcome::Failed(SyncError::Timeout(_))), "{:?}", sr.outcome());
    assert_eq!(sr.poll_timeout(), None);
    assert_eq!(resent, cfg.max_retries as usize, "the last directory message, resent with backoff");
}

/// Issue 11 (found by the `directory` fuzz target): a user's or folder's name goes into the
/// directory's news feed and onto terminals, so a name with a character XML forbids (NUL) or a
/// control character (an escape) is refused where the change enters, and the news feed of what
/// was accepted holds the feed invariants.
#[test]
fn directory_names_with_control_characters_are_refused() {
    let mut w = World::new();
    let a1 = w.key("a1").clone();
    let before = w.dir.digest();
    for name in ["nul\0here", "esc\x1b[31mred", "line\nbreak", "del\x7f", "c1\u{85}", "nonchar\u{ffff}"] {
        for op in [Op::CreateFolder { name: name.into() }, Op::CreateUser { name: name.into() }] {
            let refused = w.dir.make(&a1, 30, op);
            assert!(matches!(refused, Err(DirError::Malformed { .. })), "{name:?}: {refused:?}");
        }
    }
    assert_eq!(w.dir.digest(), before, "a refused change changes nothing");
    w.dir.make(&a1, 31, Op::CreateFolder { name: "Ünïcode names & spaces <ok>".into() }).unwrap();
    w.dir.news().check_invariants().expect("the news feed holds the feed invariants");
}

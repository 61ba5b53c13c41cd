//! The cloud's control plane (`engine::cloud::Cloud`) through its public API: every request kind,
//! its typed refusals, what it hands out to store and whom it notifies.

use engine::cloud::{Cloud, CloudLimits, Outgoing, Persist};
use engine::control::{ControlError, Notice, PeerAddr, Request, Response};
use engine::directory::{
    pair_new_device, pairing_commitment, short_code, Directory, FolderId, Op, Role, SignedChange, UserId,
};
use engine::refusal::{DirCode, RefusalCode};
use engine::signing::{DeviceId, DeviceKey};

const T0: u64 = 1_700_000_000_000_000;

fn key(n: u8) -> DeviceKey {
    DeviceKey::from_bytes(&[n; 32])
}

/// Alice (a1) owns folder F, mapped on a1 and Bob's b1; Carol (c1) is no member. The cloud holds
/// everything but Carol's last change, which she pushes herself.
struct World {
    cloud: Cloud,
    a1: DeviceKey,
    b1: DeviceKey,
    c1: DeviceKey,
    folder: FolderId,
    carol_map: Vec<SignedChange>,
}

fn world() -> World {
    let (a1, b1, c1) = (key(1), key(2), key(3));
    let mut dir = Directory::new();
    dir.make(&a1, 1, Op::CreateUser { name: "alice".into() }).unwrap();
    dir.make(&b1, 2, Op::CreateUser { name: "bob".into() }).unwrap();
    dir.make(&c1, 3, Op::CreateUser { name: "carol".into() }).unwrap();
    let folder = dir.make(&a1, 4, Op::CreateFolder { name: "f".into() }).unwrap().folder_id();
    let bob = UserId::of_first_device(DeviceId::of(&b1));
    let invite = dir.make(&a1, 5, Op::Invite { folder, invitee: bob, role: Role::Member }).unwrap();
    dir.make(&b1, 6, Op::Accept { invitation: invite.invite_id() }).unwrap();
    for k in [&a1, &b1] {
        dir.make(k, 7, Op::Map { folder }).unwrap();
    }
    let cloud_dir = dir.clone();
    let carol_map = vec![dir.make(&c1, 8, Op::CreateFolder { name: "carol's".into() }).unwrap()];
    World { cloud: Cloud::new(key(200), cloud_dir, CloudLimits::default()), a1, b1, c1, folder, carol_map }
}

fn id(k: &DeviceKey) -> DeviceId {
    DeviceId::of(k)
}

fn drain_notices(cloud: &mut Cloud) -> Vec<Outgoing> {
    std::iter::from_fn(|| cloud.poll_notice()).collect()
}

#[test]
fn tickets_name_the_folders_the_directory_maps() {
    let mut w = world();
    let Response::Ticket { ticket, cloud } = w.cloud.handle_request(T0, id(&w.a1), Request::Ticket) else {
        panic!("no ticket")
    };
    assert_eq!(cloud, w.cloud.id());
    assert!(ticket.verify_for_folder(&cloud, T0, &id(&w.a1).into(), &w.folder).is_ok());
    // A device the directory does not know gets a ticket that grants nothing.
    let stranger = id(&key(99));
    let Response::Ticket { ticket, .. } = w.cloud.handle_request(T0, stranger, Request::Ticket) else {
        panic!("no ticket")
    };
    assert!(ticket.body.rights.folders.is_empty() && !ticket.body.rights.relay);
}

#[test]
fn directory_changes_are_applied_whole_stored_once_and_announced() {
    let mut w = world();
    let carol = id(&w.c1);
    assert_eq!(w.cloud.poll_persist(), None, "what the cloud was built from counts as stored");
    // A batch with one forged change is refused whole, with a typed reason, and changes nothing.
    let mut forged = w.carol_map.clone();
    forged[0].signature.0[0] ^= 1;
    let before = w.cloud.directory().digest();
    let refused = w.cloud.handle_request(T0, carol, Request::Directory { heads: vec![], changes: forged });
    assert_eq!(refused, Response::Refused(ControlError::Directory(DirCode::Signature)));
    assert_eq!(w.cloud.directory().digest(), before);
    assert_eq!(w.cloud.poll_persist(), None);
    assert!(drain_notices(&mut w.cloud).is_empty());
    // The real one: applied, handed out to store once, announced to others than Carol.
    let heads: Vec<_> = Directory::new().heads().into_iter().collect();
    let answer =
        w.cloud.handle_request(T0, carol, Request::Directory { heads, changes: w.carol_map.clone() });
    let Response::Directory { changes } = answer else { panic!("{answer:?}") };
    assert_eq!(changes.len(), w.cloud.directory().len(), "an empty directory is sent everything");
    // A driver that also reports the change (as the relay does after any path) adds no notice.
    w.cloud.after_directory_change(Some(carol));
    assert_eq!(w.cloud.poll_persist(), Some(Persist::Directory(w.carol_map.clone())));
    assert_eq!(w.cloud.poll_persist(), None);
    assert_eq!(
        drain_notices(&mut w.cloud),
        vec![Outgoing { notice: Notice::Directory, origin: Some(carol) }]
    );
    // Sent again (a retry after a lost answer): nothing new to store or announce.
    let again =
        w.cloud.handle_request(T0, carol, Request::Directory { heads: vec![], changes: w.carol_map.clone() });
    assert!(matches!(again, Response::Directory { .. }));
    assert_eq!(w.cloud.poll_persist(), None);
    assert!(drain_notices(&mut w.cloud).is_empty());
    w.cloud.check_invariants().unwrap();
}

#[test]
fn peers_are_the_announced_devices_that_may_sync_the_folder() {
    let mut w = world();
    let (a1, b1, c1) = (id(&w.a1), id(&w.b1), id(&w.c1));
    let addr =
        |d: DeviceId| PeerAddr { device: d, relay: None, direct: vec!["10.0.0.1:4000".parse().unwrap()] };
    // A device announces only its own address, and only an active device is kept.
    assert_eq!(
        w.cloud.handle_request(T0, a1, Request::Announce { addr: addr(b1) }),
        Response::Refused(ControlError::NotOwnAddress)
    );
    let stranger = id(&key(99));
    assert_eq!(
        w.cloud.handle_request(T0, stranger, Request::Announce { addr: addr(stranger) }),
        Response::Refused(ControlError::NotActive)
    );
    for d in [a1, b1, c1] {
        assert_eq!(w.cloud.handle_request(T0, d, Request::Announce { addr: addr(d) }), Response::Ok);
    }
    let folder = w.folder;
    assert_eq!(
        w.cloud.handle_request(T0, a1, Request::Peers { folder }),
        Response::Peers { peers: vec![addr(b1)] },
        "Bob maps the folder; Carol is no member; a1 is the asker"
    );
    assert_eq!(
        w.cloud.handle_request(T0, c1, Request::Peers { folder }),
        Response::Refused(ControlError::Folder(RefusalCode::NotMember { device: c1 }))
    );
    w.cloud.check_invariants().unwrap();
}

#[test]
fn a_pairing_goes_through_the_mailbox_in_turn() {
    let mut w = world();
    let alice = UserId::of_first_device(id(&w.a1));
    let new = key(7);
    let (nonce_existing, nonce_new) = ([1u8; 32], [2u8; 32]);
    let commitment = pairing_commitment(&id(&new), &nonce_new);
    // Password-checked requests never pass `handle_request`.
    let asked = Request::PairRequest { account: "alice".into(), password: "pw".into(), commitment };
    assert_eq!(
        w.cloud.handle_request(T0, id(&new), asked),
        Response::Refused(ControlError::PasswordRequired)
    );
    let Response::PairId { id: pid } = w.cloud.handle_pair_request(id(&new), alice, commitment) else {
        panic!("no pairing id")
    };
    assert_eq!(
        drain_notices(&mut w.cloud),
        vec![Outgoing { notice: Notice::Pairing, origin: Some(id(&new)) }]
    );
    assert!(w.cloud.may_see(&Notice::Pairing, &id(&w.a1)) && !w.cloud.may_see(&Notice::Pairing, &id(&new)));
    // Consent before the existing device answered is out of turn.
    let code = short_code(&id(&w.a1), &id(&new), &nonce_existing, &nonce_new);
    let pairing = pair_new_device(&new, alice, id(&w.a1), nonce_existing, nonce_new, code).unwrap();
    let consent = Request::PairConsent { id: pid, pairing: pairing.clone() };
    assert_eq!(
        w.cloud.handle_request(T0, id(&new), consent.clone()),
        Response::Refused(ControlError::ConsentOutOfTurn)
    );
    // Another user's device sees no pairing of Alice's and cannot answer it.
    let Response::Pairings(bobs) = w.cloud.handle_request(T0, id(&w.b1), Request::PairList) else { panic!() };
    assert!(bobs.is_empty());
    let nonce = Request::PairNonce { id: pid, nonce: nonce_existing };
    assert_eq!(
        w.cloud.handle_request(T0, id(&w.b1), nonce.clone()),
        Response::Refused(ControlError::NoSuchPairing)
    );
    // Alice's device lists and answers it; the new device consents; Alice's device adds it.
    let Response::Pairings(list) = w.cloud.handle_request(T0, id(&w.a1), Request::PairList) else { panic!() };
    assert_eq!(list.len(), 1);
    assert_eq!(w.cloud.handle_request(T0, id(&w.a1), nonce), Response::Ok);
    assert_eq!(w.cloud.handle_request(T0, id(&new), consent), Response::Ok);
    let Response::PairStatus(view) = w.cloud.handle_request(T0, id(&new), Request::PairStatus { id: pid })
    else {
        panic!()
    };
    let mut alices = w.cloud.directory().clone();
    let added =
        alices.add_paired_device(&w.a1, alice, view.commitment, view.pairing.unwrap(), code, 9).unwrap();
    let pushed =
        w.cloud.handle_request(T0, id(&w.a1), Request::Directory { heads: vec![], changes: vec![added] });
    assert!(matches!(pushed, Response::Directory { .. }));
    assert_eq!(w.cloud.account_user(&id(&new)), Ok(alice), "the new device is Alice's now");
    // A joined device's pairing is done; a device already active cannot ask again.
    let Response::Pairings(list) = w.cloud.handle_request(T0, id(&w.a1), Request::PairList) else { panic!() };
    assert!(list.is_empty());
    assert_eq!(
        w.cloud.handle_pair_request(id(&new), alice, commitment),
        Response::Refused(ControlError::AlreadyActive)
    );
    w.cloud.check_invariants().unwrap();
}

#[test]
fn pending_pairings_are_bounded_per_user_and_in_all() {
    let limits = CloudLimits { pairings_per_user: 2, pairings_max: 3, ..CloudLimits::default() };
    let mut w = world();
    let mut cloud = Cloud::new(key(200), w.cloud.directory_mut().clone(), limits);
    let (alice, bob) = (UserId::of_first_device(id(&w.a1)), UserId::of_first_device(id(&w.b1)));
    let ask = |cloud: &mut Cloud, n: u8, user| cloud.handle_pair_request(id(&key(n)), user, [n; 32]);
    assert!(matches!(ask(&mut cloud, 50, alice), Response::PairId { .. }));
    assert!(matches!(ask(&mut cloud, 51, alice), Response::PairId { .. }));
    assert_eq!(ask(&mut cloud, 52, alice), Response::Refused(ControlError::TooManyPairings));
    // A device asking again replaces its own request instead of counting twice.
    assert!(matches!(ask(&mut cloud, 51, alice), Response::PairId { .. }));
    assert!(matches!(ask(&mut cloud, 60, bob), Response::PairId { .. }));
    assert!(matches!(ask(&mut cloud, 61, bob), Response::PairId { .. }), "the oldest pending one goes");
    assert_eq!(cloud.pairings().count(), 3);
    cloud.check_invariants().unwrap();
}

/// A retransmitted pairing request (its answer lost or late) gets the pairing it made, not a new
/// one that orphans the id the device took from the first answer (found by the swarm, seed 295:
/// the new device asked about the orphaned id forever and never joined). A request with a new
/// commitment replaces the old pairing.
#[test]
fn a_repeated_pairing_request_gets_the_same_pairing() {
    let mut w = world();
    let alice = UserId::of_first_device(id(&w.a1));
    let new = key(7);
    let commitment = pairing_commitment(&id(&new), &[2u8; 32]);
    let Response::PairId { id: first } = w.cloud.handle_pair_request(id(&new), alice, commitment) else {
        panic!("no pairing id")
    };
    drain_notices(&mut w.cloud);
    assert_eq!(w.cloud.handle_pair_request(id(&new), alice, commitment), Response::PairId { id: first });
    assert!(drain_notices(&mut w.cloud).is_empty(), "no second notice for the same pairing");
    assert!(matches!(
        w.cloud.handle_request(T0, id(&new), Request::PairStatus { id: first }),
        Response::PairStatus(_)
    ));
    let again = pairing_commitment(&id(&new), &[3u8; 32]);
    let Response::PairId { id: second } = w.cloud.handle_pair_request(id(&new), alice, again) else {
        panic!("no pairing id")
    };
    assert_ne!(second, first);
    assert_eq!(w.cloud.pairings().count(), 1, "the new request replaced the old");
    w.cloud.check_invariants().unwrap();
}

//! Property tests for issue 5: random forged, expired and mismatched tickets, unsigned or wrongly
//! signed directory changes and altered versions are all rejected; valid ones are all accepted.

use std::sync::Arc;

use engine::directory::{Directory, Op, Role, SignedChange, UserId};
use engine::feedsync::{Content, Edit, ItemId, When};
use engine::replica::Replica;
use engine::signing::{DeviceId, DeviceKey, FeedScope, Sig64};

/// The folder the property tests sign versions for.
const SCOPE: FeedScope = FeedScope([1; 16]);
use engine::ticket::{
    ChannelKey, Rights, TicketAuthority, TicketError, TICKET_LIFETIME_MAX_US, TICKET_SKEW_US,
};
use proptest::prelude::*;

fn key(n: u8) -> DeviceKey {
    DeviceKey::from_bytes(&[n; 32])
}

const T0: u64 = 1_000_000_000_000;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Tickets: valid ones (any time within the window and the skew allowance) verify; a flipped
    /// bit anywhere, another cloud key, another channel, or a time outside the window fails.
    #[test]
    fn tickets_forged_expired_or_mismatched_are_rejected(
        lifetime in 1u64..TICKET_LIFETIME_MAX_US,
        offset in 0u64..u64::MAX,
        flip in 0usize..4096,
        bit in 0u8..8,
        folders in prop::collection::vec(any::<[u8; 16]>(), 0..4),
        mode in 0u8..5,
    ) {
        let mut cloud = TicketAuthority::new(key(200));
        let device = DeviceId::of(&key(1));
        let channel = ChannelKey::from(device);
        let folders: Vec<_> = folders.into_iter().map(engine::directory::FolderId).collect();
        let ticket = cloud.issue(device, channel, Rights { folders, relay: true }, T0, lifetime);
        let window = lifetime + 2 * TICKET_SKEW_US;
        let inside = T0 - TICKET_SKEW_US + offset % window;
        match mode {
            0 => prop_assert!(ticket.verify(&cloud.id(), inside, &channel).is_ok()),
            1 => {
                // Forged: one bit flipped in the body or the signature.
                let mut bytes = postcard::to_allocvec(&ticket).unwrap();
                let at = flip % bytes.len();
                bytes[at] ^= 1 << bit;
                if let Ok(forged) = postcard::from_bytes::<engine::ticket::Ticket>(&bytes) {
                    prop_assert!(forged == ticket || forged.verify(&cloud.id(), inside, &channel).is_err());
                }
            }
            2 => {
                let late = T0 + lifetime + TICKET_SKEW_US + offset % (1 << 40);
                prop_assert!(matches!(ticket.verify(&cloud.id(), late, &channel), Err(TicketError::Expired { .. })), "expired");
                let early = T0 - TICKET_SKEW_US - 1 - offset % (T0 / 2);
                prop_assert!(matches!(ticket.verify(&cloud.id(), early, &channel), Err(TicketError::NotYetValid { .. })), "early");
            }
            3 => {
                let other = ChannelKey::from(DeviceId::of(&key(2)));
                prop_assert_eq!(ticket.verify(&cloud.id(), inside, &other), Err(TicketError::WrongChannel));
            }
            _ => {
                let other_cloud = DeviceId::of(&key(201));
                prop_assert!(matches!(ticket.verify(&other_cloud, inside, &channel), Err(TicketError::Signature(_))));
            }
        }
    }

    /// Directory changes: a random valid history replays on a fresh device; the same history with
    /// one change altered (a flipped bit in its body or signature), unsigned, or re-signed by a key
    /// not entitled to it is refused whole.
    #[test]
    fn directory_changes_unsigned_or_wrongly_signed_are_rejected(
        script in prop::collection::vec((0u8..6, 0u8..3, 0u8..3), 1..12),
        victim in any::<prop::sample::Index>(),
        flip in 0usize..4096,
        bit in 0u8..8,
        mode in 0u8..3,
    ) {
        let keys = [key(1), key(2), key(3)];
        let users: Vec<UserId> = keys.iter().map(|k| UserId::of_first_device(DeviceId::of(k))).collect();
        let mut dir = Directory::new();
        for (i, k) in keys.iter().enumerate() {
            dir.make(k, i as i64, Op::CreateUser { name: format!("u{i}") }).unwrap();
        }
        let folder = dir.make(&keys[0], 9, Op::CreateFolder { name: "f".into() }).unwrap().folder_id();
        let mut invites = Vec::new();
        for (op, who, whom) in script {
            let (who, whom) = (who as usize, whom as usize);
            let op = match op {
                0 => Op::Invite { folder, invitee: users[whom], role: if who == 0 { Role::Admin } else { Role::Member } },
                1 => match invites.last() { Some(&invitation) => Op::Accept { invitation }, None => continue },
                2 => match invites.first() { Some(&invitation) => Op::Resend { invitation }, None => continue },
                3 => Op::RemoveMember { folder, user: users[whom] },
                4 => Op::Map { folder },
                _ => Op::Unmap { folder, device: DeviceId::of(&keys[who]) },
            };
            // Ops the author may not make are refused locally; others go into the log.
            if let Ok(change) = dir.make(&keys[who], 20, op) {
                if matches!(change.body.op, Op::Invite { .. }) {
                    invites.push(change.invite_id());
                }
            }
        }
        let log: Vec<SignedChange> = dir.changes().cloned().collect();
        // Valid: accepted on a fresh device, same state.
        let mut fresh = Directory::new();
        fresh.apply(&log).unwrap();
        prop_assert_eq!(fresh.state(), dir.state());

        let at = victim.index(log.len());
        let mut bad = log.clone();
        match mode {
            0 => {
                let mut bytes = postcard::to_allocvec(&bad[at]).unwrap();
                let i = flip % bytes.len();
                bytes[i] ^= 1 << bit;
                match postcard::from_bytes::<SignedChange>(&bytes) {
                    Ok(c) if c != log[at] => bad[at] = c,
                    _ => return Ok(()),
                }
            }
            1 => bad[at].signature = Sig64([0; 64]),
            _ => {
                // Signed by a key outside the directory, claiming to be that key's change.
                let outsider = key(99);
                let mut body = bad[at].body.clone();
                body.author = DeviceId::of(&outsider);
                body.seq = 1;
                body.deps.retain(|(d, _)| *d != DeviceId::of(&outsider));
                bad[at] = SignedChange::sign(body, &outsider);
            }
        }
        let mut fresh = Directory::new();
        prop_assert!(fresh.apply(&bad).is_err(), "mode {mode}: altered change {at} accepted");
        prop_assert!(fresh.is_empty(), "all or nothing");
    }

    /// Versions: signed ones verify; any change to id, updates, flags, history or content, a
    /// flipped signature bit, a missing signature, a signer outside the allowed set, or another
    /// folder (the version replayed into a feed it was not signed for) is refused.
    #[test]
    fn altered_versions_are_rejected(
        text in "[a-z]{0,12}",
        edits in 1usize..4,
        mode in 0u8..8,
        bit in 0usize..512,
    ) {
        let (a, b) = (key(1), key(2));
        let mut r = Replica::new_signed(1, SCOPE);
        let id = ItemId::new("item").unwrap();
        for k in 0..edits {
            let content = Arc::new(Content { inner: format!("<title>{text}{k}</title>").into(), ..Content::empty() });
            let who = if k % 2 == 0 { &a } else { &b };
            r.change_signed(&id, who, &When::from_unix_secs(1_700_000_000 + k as i64).unwrap(), &Edit { content: Some(content), ..Edit::default() }).unwrap();
        }
        let item = (**r.item(&id).unwrap()).clone();
        let fresh = Replica::new_signed(2, SCOPE);
        prop_assert!(fresh.check_incoming(&item).is_ok());
        let mut bad = item.clone();
        let v = &mut bad.version;
        match mode {
            0 => v.updates += 1,
            1 => v.deleted = !v.deleted,
            2 => v.content = Arc::new(Content { inner: format!("<title>{text}!</title>").into(), ..Content::empty() }),
            3 => {
                let mut h = v.history.to_vec();
                h.last_mut().unwrap().sequence += 1;
                v.history = Arc::from(h);
            }
            4 => {
                let mut sig = v.signature.as_ref().unwrap().to_bytes();
                let at = bit % sig.len();
                sig[at] ^= 1 << (bit % 8);
                v.signature = engine::signing::VersionSignature::from_bytes(&sig);
            }
            5 => v.signature = None,
            6 => {
                let other = Replica::new_signed(5, FeedScope([2; 16]));
                prop_assert!(other.check_incoming(&item).is_err(), "version replayed into another folder");
                let mut other = other;
                prop_assert!(other.merge(&Arc::new(item)).is_err());
                prop_assert!(other.is_empty());
                return Ok(());
            }
            _ => {
                let mut only_b = Replica::new_signed(3, SCOPE);
                only_b.set_signers(Some([DeviceId::of(&key(7))].into_iter().collect()));
                prop_assert!(only_b.check_incoming(&item).is_err(), "signer outside the allowed set");
                return Ok(());
            }
        }
        prop_assert!(fresh.check_incoming(&bad).is_err(), "mode {mode}: altered version accepted");
        let mut into = Replica::new_signed(4, SCOPE);
        prop_assert!(into.merge(&Arc::new(bad)).is_err());
        prop_assert!(into.is_empty());
    }

    /// Concurrent directory changes: two devices change the directory apart, then exchange in
    /// either direction, or a third receives everything shuffled: all end with the same log order,
    /// state and digest.
    #[test]
    fn concurrent_directory_changes_converge(
        left in prop::collection::vec((0u8..5, 0u8..3), 0..8),
        right in prop::collection::vec((0u8..5, 0u8..3), 0..8),
        shuffle in any::<u64>(),
    ) {
        let keys = [key(1), key(2), key(3)];
        let users: Vec<UserId> = keys.iter().map(|k| UserId::of_first_device(DeviceId::of(k))).collect();
        let mut base = Directory::new();
        for (i, k) in keys.iter().enumerate() {
            base.make(k, i as i64, Op::CreateUser { name: format!("u{i}") }).unwrap();
        }
        let folder = base.make(&keys[0], 9, Op::CreateFolder { name: "f".into() }).unwrap().folder_id();
        let inv = base.make(&keys[0], 9, Op::Invite { folder, invitee: users[1], role: Role::Admin }).unwrap();
        base.make(&keys[1], 9, Op::Accept { invitation: inv.invite_id() }).unwrap();
        let play = |dir: &mut Directory, script: &[(u8, u8)], author: &DeviceKey| {
            for &(op, whom) in script {
                let op = match op {
                    0 => Op::Invite { folder, invitee: users[whom as usize], role: Role::Member },
                    1 => Op::RemoveMember { folder, user: users[whom as usize] },
                    2 => Op::Map { folder },
                    3 => Op::Unmap { folder, device: DeviceId::of(author) },
                    _ => Op::CreateFolder { name: format!("g{whom}") },
                };
                let _ = dir.make(author, 30, op);
            }
        };
        // The owner (device 1) and the admin (device 2) act concurrently.
        let (mut a, mut b) = (base.clone(), base.clone());
        play(&mut a, &left, &keys[0]);
        play(&mut b, &right, &keys[1]);
        let from_a: Vec<SignedChange> = a.missing_for(&b.heads());
        let from_b: Vec<SignedChange> = b.missing_for(&a.heads());
        a.apply(&from_b).unwrap();
        b.apply(&from_a).unwrap();
        prop_assert_eq!(a.digest(), b.digest());
        prop_assert_eq!(a.state(), b.state());
        let mut all: Vec<SignedChange> = a.changes().cloned().collect();
        let mut x = shuffle | 1;
        for i in (1..all.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            all.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut c = Directory::new();
        c.apply(&all).unwrap();
        prop_assert_eq!(c.state(), a.state());
        prop_assert_eq!(c.digest(), a.digest());
    }
}

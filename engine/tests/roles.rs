//! The role machines on their own: open devices and a cloud passing bytes by hand (no
//! simulator), checking what a driver relies on: a write is handed out to commit, a merge is
//! handed out before the transmit that answers it, a restart forgets volatile state and changes
//! the replica epoch, and answers that fit no request are dropped.

use std::sync::Arc;

use engine::cloud::{Cloud, CloudLimits, Persist as CloudPersist};
use engine::control::{self, Request, Response};
use engine::device::{CommandError, Device, DeviceConfig, Event, Identity, Persist, OPEN_FOLDER};
use engine::directory::Directory;
use engine::feedsync::{Content, Edit, Endpoint, ItemId, When};
use engine::sessions::Stream;
use engine::signing::DeviceKey;
use engine::ticket::ChannelKey;

const CLOUD: u8 = 0;

fn device(name: &str, epoch: u64) -> Device<u8> {
    let endpoint = Endpoint::new(name).unwrap();
    Device::new(
        Identity::Open(endpoint),
        Some(CLOUD),
        Directory::new(),
        Vec::new(),
        epoch,
        DeviceConfig::default(),
    )
}

fn cloud() -> Cloud<u8> {
    Cloud::new(DeviceKey::from_bytes(&[7; 32]), Directory::new(), CloudLimits::default())
        .with_sessions(engine::sync::Config::default(), 99)
        .open_sessions()
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

/// Delivers between device `me` (peer index `me`) and the cloud until both are quiet. Returns,
/// in order, what the cloud polled: `true` for a commit, `false` for a transmit.
fn run(now: u64, me: u8, d: &mut Device<u8>, c: &mut Cloud<u8>) -> Vec<bool> {
    let mut cloud_order = Vec::new();
    for _ in 0..64 {
        let mut moved = false;
        while d.poll_persist().is_some() {}
        while d.poll_event().is_some() {}
        let mut to_cloud = Vec::new();
        while let Some(t) = d.poll_transmit() {
            to_cloud.push(t);
        }
        for t in to_cloud {
            moved = true;
            assert_eq!(t.to, CLOUD);
            match t.stream {
                Stream::Sync => c.handle_sync(now, me, ChannelKey([me; 32]), &t.bytes),
                Stream::Request(id) => {
                    c.handle_control(now, me, engine::signing::DeviceId([me; 32]), id, &t.bytes)
                }
                _ => {}
            }
            // What a driver must do: commit what the cloud hands out, then send.
            while let Some(p) = c.poll_persist() {
                cloud_order.push(matches!(p, CloudPersist::Items(_)));
            }
            while let Some(t) = c.poll_transmit() {
                cloud_order.push(false);
                match t.stream {
                    Stream::Sync => d.handle_sync(now, CLOUD, ChannelKey([0; 32]), &t.bytes),
                    Stream::Response(id) => d.handle_response(now, id, &t.bytes),
                    _ => {}
                }
            }
        }
        if !moved {
            break;
        }
    }
    cloud_order
}

#[test]
fn a_write_reaches_another_device_through_the_cloud_and_is_committed_before_it_is_answered() {
    let (mut a, mut b, mut c) = (device("a", 1), device("b", 2), cloud());
    let when = When::from_unix_secs(1_700_000_000).unwrap();
    let id = ItemId::new("x").unwrap();
    a.write(OPEN_FOLDER, &id, &when, &edit("hello")).unwrap();
    match a.poll_persist() {
        Some(Persist::Items(commit)) => {
            assert_eq!(commit.from, None, "a local write");
            assert_eq!(commit.items.len(), 1);
        }
        other => panic!("a write is handed out to commit: {other:?}"),
    }
    a.start_sync(1_000, CLOUD, ChannelKey([0; 32]), OPEN_FOLDER, 11).unwrap();
    assert_eq!(a.start_sync(1_000, CLOUD, ChannelKey([0; 32]), OPEN_FOLDER, 12), Err(CommandError::Busy));
    let order = run(1_000, 1, &mut a, &mut c);
    // The cloud handed its merge out to commit, once, in the step that merged it (the driver
    // commits it before sending that step's answer).
    assert_eq!(order.iter().filter(|&&commit| commit).count(), 1, "{order:?}");
    assert_eq!(c.replica(&OPEN_FOLDER).unwrap().len(), 1);
    b.start_sync(2_000, CLOUD, ChannelKey([0; 32]), OPEN_FOLDER, 21).unwrap();
    run(2_000, 2, &mut b, &mut c);
    assert_eq!(b.replica(&OPEN_FOLDER).unwrap().digest(), a.replica(&OPEN_FOLDER).unwrap().digest());
    a.check_invariants().unwrap();
    b.check_invariants().unwrap();
    c.check_invariants().unwrap();
}

#[test]
fn a_restart_forgets_sessions_and_requests_and_changes_the_epoch() {
    let mut a = device("a", 1);
    let when = When::from_unix_secs(1_700_000_000).unwrap();
    a.write(OPEN_FOLDER, &ItemId::new("x").unwrap(), &when, &edit("kept")).unwrap();
    a.start_sync(0, CLOUD, ChannelKey([0; 32]), OPEN_FOLDER, 5).unwrap();
    a.request(0, Request::Ticket).unwrap();
    assert!(a.syncing(CLOUD, OPEN_FOLDER));
    assert!(a.poll_timeout().is_some());
    let digest = a.replica(&OPEN_FOLDER).unwrap().digest();
    a.restart(77);
    assert!(!a.syncing(CLOUD, OPEN_FOLDER), "sessions are volatile");
    assert!(!a.pending(&Request::Ticket), "so are requests");
    assert!(a.poll_transmit().is_none() && a.poll_persist().is_none());
    let r = a.replica(&OPEN_FOLDER).unwrap();
    assert_eq!(r.epoch(), 77, "a new epoch: peers' cursors into the old log are refused");
    assert_eq!(r.digest(), digest, "what was committed is kept");
    a.check_invariants().unwrap();
}

#[test]
fn answers_that_fit_no_request_are_dropped() {
    let mut a = device("a", 1);
    // No request 5 is outstanding: nothing happens.
    a.handle_response(0, 5, &control::encode(&Response::Ok));
    assert!(a.poll_event().is_none());
    // A request answered with a refusal says so, typed.
    let id = a.request(0, Request::PairList).unwrap();
    a.handle_response(0, id, &control::encode(&Response::Refused(control::ControlError::NotActive)));
    match a.poll_event() {
        Some(Event::Refused { request, error, .. }) => {
            assert_eq!(request, "pair-list");
            assert_eq!(error, control::ControlError::NotActive);
        }
        other => panic!("{other:?}"),
    }
    // Garbage is dropped after one bounded decode, and the request stays outstanding.
    let id = a.request(0, Request::PairList).unwrap();
    a.handle_response(0, id, &[0xff; 40]);
    assert!(a.pending(&Request::PairList));
    a.check_invariants().unwrap();
}

/// The directory's log is in its total order (lamport, change id), not in arrival order: a change
/// that arrives after others can sort before them. What the device hands out to store is exactly
/// what arrived, whatever its place (handing out "everything past the count stored" stored an
/// old change twice and lost the new one, and the node's store would not load).
#[test]
fn directory_changes_handed_out_are_the_ones_that_arrived() {
    let key = DeviceKey::from_bytes(&[1; 32]);
    let cloud = engine::signing::DeviceId::of(&DeviceKey::from_bytes(&[7; 32]));
    let mut d: Device<u8> = Device::new(
        Identity::Keyed { key, cloud },
        Some(CLOUD),
        Directory::new(),
        Vec::new(),
        1,
        DeviceConfig::default(),
    );
    let mine = d.make(10, engine::directory::Op::CreateUser { name: "me".into() }).unwrap();
    let first: Vec<_> = std::iter::from_fn(|| d.poll_persist()).collect();
    assert!(matches!(&first[..], [Persist::Directory(c)] if c == &vec![mine.clone()]));
    let mut sorted_before = 0;
    for seed in 2..40u8 {
        let other = DeviceKey::from_bytes(&[seed; 32]);
        let mut theirs = Directory::new();
        let change =
            theirs.make(&other, 10, engine::directory::Op::CreateUser { name: format!("u{seed}") }).unwrap();
        d.directory_mut().apply(std::slice::from_ref(&change)).unwrap();
        d.flush();
        if d.directory().changes().next() == Some(&change) {
            sorted_before += 1;
        }
        let out: Vec<_> = std::iter::from_fn(|| d.poll_persist()).collect();
        match &out[..] {
            [Persist::Directory(c)] => assert_eq!(c, &vec![change], "seed {seed}"),
            other => panic!("seed {seed}: {other:?}"),
        }
    }
    assert!(sorted_before > 0, "some arrivals sort before what was stored");
}

/// A device pushes to the cloud only the directory changes the cloud is not known to hold: after
/// one round trip a push carries nothing, a new change goes alone, and a restart (which forgets
/// what the cloud holds) pushes everything once. (Every push used to carry the whole directory:
/// the swarm's seed 420 had 19 KB pushes each control round starve a thin uplink.)
#[test]
fn a_directory_push_carries_only_what_the_cloud_lacks() {
    let key = DeviceKey::from_bytes(&[1; 32]);
    let me = engine::signing::DeviceId::of(&key);
    let cloud_key = DeviceKey::from_bytes(&[7; 32]);
    let mut c: Cloud<u8> = Cloud::new(cloud_key.clone(), Directory::new(), CloudLimits::default());
    let mut d: Device<u8> = Device::new(
        Identity::Keyed { key, cloud: engine::signing::DeviceId::of(&cloud_key) },
        Some(CLOUD),
        Directory::new(),
        Vec::new(),
        1,
        DeviceConfig::default(),
    );
    d.make(10, engine::directory::Op::CreateUser { name: "me".into() }).unwrap();
    // Pushes once and returns how many changes the push carried.
    let push = |d: &mut Device<u8>, c: &mut Cloud<u8>, now: u64| -> usize {
        d.sync_directory(now).unwrap();
        let mut carried = None;
        while let Some(t) = d.poll_transmit() {
            let Stream::Request(id) = t.stream else { continue };
            if let Ok(Request::Directory { changes, .. }) =
                control::decode::<Request>(&t.bytes, control::CONTROL_MAX)
            {
                carried = Some(changes.len());
            }
            c.handle_control(now, 1, me, id, &t.bytes);
            while c.poll_persist().is_some() {}
            while let Some(answer) = c.poll_transmit() {
                if let Stream::Response(id) = answer.stream {
                    d.handle_response(now, id, &answer.bytes);
                }
            }
        }
        while d.poll_event().is_some() {}
        carried.expect("a directory request")
    };
    assert_eq!(push(&mut d, &mut c, 1), 1, "the first push carries the change");
    assert_eq!(c.directory().len(), 1);
    assert_eq!(push(&mut d, &mut c, 2), 0, "the cloud holds it now");
    d.make(20, engine::directory::Op::CreateFolder { name: "f".into() }).unwrap();
    assert_eq!(push(&mut d, &mut c, 3), 1, "only the new change");
    d.restart(2);
    assert_eq!(push(&mut d, &mut c, 4), 2, "after a restart, everything once");
    assert_eq!(push(&mut d, &mut c, 5), 0);
}

/// Live Folders' content through the device: the folder's scheduler starts with a want, its
/// requests come out of `poll_content`, verified groups finish the file, a silent source stalls
/// at the device's own deadline (`poll_timeout`, `handle_timeout`) and the file goes to the
/// other holder, and a restart or the driver's end of the transfer forgets it.
#[test]
fn content_is_fetched_through_the_device_and_its_timers() {
    use engine::folder::fetch::{Command, Event as Fetched, Route, GROUP_BYTES};
    use engine::folder::ContentHash;
    let folder = OPEN_FOLDER;
    let hash = ContentHash::of(b"a file");
    let size = 3 * GROUP_BYTES;
    let (slow, honest) = (1u8, 2u8);
    let mut d = device("a", 1);
    assert!(d.poll_content(folder).is_none() && d.content(folder).is_none());
    d.handle_content_route(0, folder, slow, Some(Route::Lan)).unwrap();
    d.handle_content_route(0, folder, honest, Some(Route::Relayed)).unwrap();
    let held = std::slice::from_ref(&(0..1)); // group 0 held already
    d.want_content(0, folder, hash, size, held, &[slow]).unwrap();
    // Group 0 is held: the request asks the nearest holder for the rest.
    let Some(Command::Request(first)) = d.poll_content(folder) else { panic!("no request") };
    assert_eq!((first.peer, first.hash, first.groups.clone()), (slow, hash, 1..3));
    assert!(d.poll_content(folder).is_none());
    // The device's next deadline is the request's stall; nothing happens before it.
    let stall = d.poll_timeout().expect("a stall deadline");
    d.handle_timeout(stall - 1);
    assert!(d.poll_content_event(folder).is_none());
    d.handle_content_holder(1, folder, honest, hash);
    d.handle_timeout(stall);
    assert!(matches!(d.poll_content_event(folder), Some(Fetched::Stalled { peer, .. }) if peer == slow));
    // The stalled request is cancelled and the other holder asked.
    let mut asked = None;
    while let Some(c) = d.poll_content(folder) {
        if let Command::Request(r) = c {
            asked = Some(r);
        }
    }
    let again = asked.expect("the other holder is asked");
    assert_eq!((again.peer, again.groups.clone()), (honest, 1..3));
    d.handle_content_groups(stall + 1, folder, again.id, 1..3);
    assert_eq!(d.poll_content_event(folder), Some(Fetched::Done { hash }));
    assert!(d.content(folder).is_some_and(|f| f.wanted().next().is_none()));
    d.check_invariants().unwrap();
    // A restart forgets transfers (the driver wants again what it lacks); so does their end.
    d.want_content(stall + 2, folder, ContentHash::of(b"another"), size, &[], &[honest]).unwrap();
    d.restart(2);
    assert!(d.content(folder).is_none() && d.poll_content(folder).is_none());
    d.want_content(stall + 3, folder, hash, size, &[], &[honest]).unwrap();
    d.end_content(folder);
    assert!(d.content(folder).is_none() && d.poll_timeout().is_none());
}

//! Sync sessions against the relay over QUIC, as a device runs them (issue 12 item 5: the relay
//! drives the engine's cloud for sessions too): what a device sends is stored before the session
//! ends and survives a restart, the cloud passes it on to a device that lacks it, a stream the
//! device drops ends its session at once, and the storage quota refuses a session up front.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use engine::authz::{AuthSession, Credentials, Policy};
use engine::directory::{Directory, FolderId, Op};
use engine::replica::Replica;
use engine::signing::DeviceKey;
use engine::sync::{Outcome, SyncError};
use iroh::endpoint::Connection;
use iroh::{EndpointAddr, TransportAddr};
use support::{Mesh, Person, Relay, PATIENCE};
use transport::{frame, EndpointOptions, Open, Request, Response, ALPN};

/// `n` items signed by `key` for `folder`, in a device's replica.
fn replica_with(folder: FolderId, key: &DeviceKey, n: usize) -> Replica {
    support::signed_replica(folder, key, n, "item", "text")
}

/// A user with its folder mapped on its device.
fn alice_with_folder(relay: &Relay, mesh: &mut Mesh) -> (Person, FolderId) {
    let alice = mesh.person(relay, 1, "alice");
    let folder = mesh.folder(relay, &alice, "notes");
    mesh.change(relay, &alice.key, Op::Map { folder });
    (alice, folder)
}

async fn connect(relay: &Relay, key: &DeviceKey) -> (iroh::Endpoint, Connection) {
    let running = relay.running();
    let cloud = EndpointAddr::from_parts(
        running.endpoint.id(),
        running.endpoint.bound_sockets().into_iter().map(TransportAddr::Ip),
    );
    let opts = EndpointOptions { bind: Some(SocketAddr::from(([127, 0, 0, 1], 0))), ..Default::default() };
    let ep = transport::endpoint(key, &opts).await.unwrap();
    let conn = ep.connect(cloud, ALPN).await.unwrap();
    (ep, conn)
}

/// Runs one session on `folder` from `person`'s device, with its `dir` and `replica`, as the node
/// does: a stream, `Open::Sync`, then the initiator's messages.
async fn sync(
    conn: &Connection,
    person: &Person,
    folder: FolderId,
    dir: &mut Directory,
    replica: &mut Replica,
) -> Outcome {
    let Response::Ticket { ticket, cloud } = transport::request(conn, Request::Ticket).await.unwrap() else {
        panic!("no ticket")
    };
    let policy = Policy::Directory(Box::new(Credentials { device: person.device, ticket, cloud }));
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = frame::Reader::new(recv);
    frame::write_value(&mut send, &Open::Sync).await.unwrap();
    let mut session = AuthSession::initiate(
        rand::random(),
        transport::now_us(),
        folder,
        policy,
        transport::channel_of(conn.remote_id()),
        dir,
        replica,
        transport::stream_config(),
        Default::default(),
    );
    let handle = |s: &mut AuthSession, now, bytes: &[u8]| s.handle_message(now, dir, replica, bytes);
    let driven =
        transport::drive(&mut session, &mut send, &mut recv, handle, |s, now| s.handle_timeout(now)).await;
    driven.unwrap().outcome
}

fn cloud_items(relay: &Relay, folder: &FolderId) -> usize {
    relay.running().cloud.lock().replicas.get(folder).map_or(0, Replica::len)
}

fn sessions_counted(relay: &Relay, kind: &str) -> u64 {
    let metrics = relay.running().cloud.metrics.render(0);
    let line = format!("feedmesh_sessions_total{{kind=\"{kind}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&line)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// What a device sends is in the cloud's replica and store when its session ends; the cloud
/// reloads it after a restart and passes it on to a device that lacks it.
#[test]
fn what_a_device_syncs_is_stored_and_passed_on() {
    let relay = Relay::start(relay::Limits::default());
    let mut mesh = Mesh::new();
    let (alice, folder) = alice_with_folder(&relay, &mut mesh);
    let mut dir = mesh.dir.clone();
    let mut replica = replica_with(folder, &alice.key, 20);
    let outcome = relay.rt.block_on(async {
        let (_ep, conn) = connect(&relay, &alice.key).await;
        sync(&conn, &alice, folder, &mut dir, &mut replica).await
    });
    assert!(matches!(outcome, Outcome::Done { .. }), "{outcome:?}");
    assert_eq!(cloud_items(&relay, &folder), 20);
    assert!(relay.running().cloud.usage(&alice.device) > 0, "the session's bytes count");
    // The cloud's side ends (and is counted) when its timer task runs after the device got
    // `Done`, which may be just after the device's side ended.
    let deadline = std::time::Instant::now() + PATIENCE;
    while sessions_counted(&relay, "done") < 1 || relay.running().cloud.lock().control.sessions() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the session did not end in the engine, or was not counted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // A restart reloads what was stored; a device with nothing gets all of it.
    let relay = Relay::start_in(relay.stop(), relay::Limits::default());
    assert_eq!(cloud_items(&relay, &folder), 20, "stored before the session ended");
    let mut empty = Replica::new_signed(2, folder.scope());
    let mut dir = mesh.dir.clone();
    let outcome = relay.rt.block_on(async {
        let (_ep, conn) = connect(&relay, &alice.key).await;
        sync(&conn, &alice, folder, &mut dir, &mut empty).await
    });
    assert!(matches!(outcome, Outcome::Done { .. }), "{outcome:?}");
    assert_eq!(empty.len(), 20);
    assert_eq!(empty.digest(), replica.digest());
}

/// A device that drops a session's stream half-way leaves nothing running at the cloud: the
/// session ends as soon as its stream does, not at the retransmission timer (30 s over QUIC).
#[test]
fn a_dropped_stream_ends_its_session() {
    let relay = Relay::start(relay::Limits::default());
    let mut mesh = Mesh::new();
    let (alice, folder) = alice_with_folder(&relay, &mut mesh);
    let dir = mesh.dir.clone();
    let replica = replica_with(folder, &alice.key, 3);
    relay.rt.block_on(async {
        let (_ep, conn) = connect(&relay, &alice.key).await;
        let Response::Ticket { ticket, cloud } = transport::request(&conn, Request::Ticket).await.unwrap()
        else {
            panic!("no ticket")
        };
        let policy = Policy::Directory(Box::new(Credentials { device: alice.device, ticket, cloud }));
        let (mut send, recv) = conn.open_bi().await.unwrap();
        frame::write_value(&mut send, &Open::Sync).await.unwrap();
        let mut session = AuthSession::initiate(
            7,
            transport::now_us(),
            folder,
            policy,
            transport::channel_of(conn.remote_id()),
            &dir,
            &replica,
            transport::stream_config(),
            Default::default(),
        );
        let hello = session.poll_transmit().unwrap();
        frame::write(&mut send, &hello).await.unwrap();
        let mut recv = frame::Reader::new(recv);
        // The cloud answers: its session runs.
        let answer = tokio::time::timeout(PATIENCE, recv.read(transport::FRAME_MAX)).await.unwrap();
        assert!(answer.unwrap().is_some());
        assert_eq!(relay.running().cloud.lock().control.sessions(), 1);
        send.reset(0u32.into()).unwrap();
        drop(recv);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while relay.running().cloud.lock().control.sessions() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the session outlived its stream");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert_eq!(sessions_counted(&relay, "failed"), 1);
}

/// A device over its storage quota is refused when its session opens, with the quota's code.
#[test]
fn a_device_over_its_storage_quota_is_refused() {
    let limits = relay::Limits { storage_bytes_per_device: 1_000, ..relay::Limits::default() };
    let relay = Relay::start(limits);
    let mut mesh = Mesh::new();
    let (alice, folder) = alice_with_folder(&relay, &mut mesh);
    let mut dir = mesh.dir.clone();
    let mut replica = replica_with(folder, &alice.key, 20);
    let (first, second) = relay.rt.block_on(async {
        let (_ep, conn) = connect(&relay, &alice.key).await;
        let first = sync(&conn, &alice, folder, &mut dir, &mut replica).await;
        let mut more = replica_with(folder, &alice.key, 25);
        let second = sync(&conn, &alice, folder, &mut dir, &mut more).await;
        (first, second)
    });
    assert!(matches!(first, Outcome::Done { .. }), "{first:?}");
    assert!(
        matches!(&second, Outcome::Failed(SyncError::Refused(r)) if r.to_string().contains("storage")),
        "{second:?}"
    );
    assert_eq!(cloud_items(&relay, &folder), 20);
}

/// One device runs at most `SYNC_STREAMS_PER_DEVICE` sessions at the cloud at once (the engine's
/// session table is shared by every device): a stream past it is ended unanswered.
#[test]
fn one_device_runs_a_bounded_number_of_sync_streams() {
    let relay = Relay::start(relay::Limits::default());
    let mut mesh = Mesh::new();
    let (alice, folder) = alice_with_folder(&relay, &mut mesh);
    let dir = mesh.dir.clone();
    let replica = replica_with(folder, &alice.key, 1);
    let cap = relay::cloud::SYNC_STREAMS_PER_DEVICE;
    relay.rt.block_on(async {
        let (_ep, conn) = connect(&relay, &alice.key).await;
        let Response::Ticket { ticket, cloud } = transport::request(&conn, Request::Ticket).await.unwrap()
        else {
            panic!("no ticket")
        };
        let mut open = Vec::new();
        for sid in 0..=cap as u64 {
            let policy = Policy::Directory(Box::new(Credentials {
                device: alice.device,
                ticket: ticket.clone(),
                cloud,
            }));
            let mut session = AuthSession::initiate(
                1000 + sid,
                transport::now_us(),
                folder,
                policy,
                transport::channel_of(conn.remote_id()),
                &dir,
                &replica,
                transport::stream_config(),
                Default::default(),
            );
            let (mut send, recv) = conn.open_bi().await.unwrap();
            frame::write_value(&mut send, &Open::Sync).await.unwrap();
            frame::write(&mut send, &session.poll_transmit().unwrap()).await.unwrap();
            let mut recv = frame::Reader::new(recv);
            let answer = tokio::time::timeout(PATIENCE, recv.read(transport::FRAME_MAX)).await.unwrap();
            if (sid as usize) < cap {
                assert!(answer.unwrap().is_some(), "session {sid} is answered");
            } else {
                assert!(!matches!(answer, Ok(Some(_))), "a session past the cap is not answered");
            }
            open.push((send, recv));
        }
        assert_eq!(relay.running().cloud.lock().control.sessions(), cap);
    });
    let metrics = relay.running().cloud.metrics.render(0);
    assert!(metrics.contains("feedmesh_refusals_total{kind=\"sync-streams\"} 1"), "{metrics}");
}

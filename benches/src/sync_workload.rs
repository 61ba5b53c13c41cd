//! The sync workload, shared by the criterion sync bench and the sync sweep: `n` shared items
//! (feedmesh replica or automerge document, one change per item), differences added as new items
//! on one side, and a session driver over a clean in-order channel for each engine (feedmesh's is
//! the engine's own, `engine::loopback::run_clean`).

use std::sync::Arc;

use automerge::sync::{self as am_sync, SyncDoc as _};
use automerge::transaction::Transactable as _;
use automerge::{ActorId, Automerge, ObjType, ROOT};
use engine::feedsync::{Content, Edit, Endpoint, ItemId, When};
use engine::loopback::{self, Clean, Plain};
use engine::replica::Replica;
use engine::sync::{Config, Retained, Stats};

fn edit(text: &str) -> Edit {
    Edit {
        content: Some(Arc::new(Content {
            attrs: "".into(),
            inner: format!("<title>{text}</title><description>item {text}</description>").into(),
            ..Content::empty()
        })),
        ..Edit::default()
    }
}

/// A replica of `n` items `item-0 ..`.
pub fn replica(n: usize) -> Replica {
    let mut r = Replica::new(0);
    let by = Endpoint::new("origin").expect("constant endpoint is valid");
    let when = When::from_unix_secs(1_600_000_000).expect("in range");
    for i in 0..n {
        let id = ItemId::new(&format!("item-{i}")).expect("generated ids are valid");
        r.change(&id, &by, &when, &edit(&i.to_string())).expect("within limits");
    }
    r
}

/// Adds `count` new items `prefix-k`, made by endpoint `prefix`.
pub fn diverge(r: &mut Replica, prefix: &str, count: usize) {
    let by = Endpoint::new(prefix).expect("prefixes are valid endpoints");
    let when = When::from_unix_secs(1_700_000_000).expect("in range");
    for k in 0..count {
        let id = ItemId::new(&format!("{prefix}-{k}")).expect("generated ids are valid");
        r.change(&id, &by, &when, &edit(&format!("{prefix}{k}"))).expect("within limits");
    }
}

/// A device key from a one-byte seed (benchmarks only).
pub fn device_key(seed: u8) -> engine::signing::DeviceKey {
    engine::signing::DeviceKey::from_bytes(&[seed; 32])
}

/// The folder every benchmark's signed versions belong to.
pub const SCOPE: engine::signing::FeedScope = engine::signing::FeedScope([7; 16]);

/// A signed replica of `n` items `item-0 ..`, every version signed by `key` for [`SCOPE`].
pub fn replica_signed(n: usize, key: &engine::signing::DeviceKey) -> Replica {
    let mut r = Replica::new_signed(0, SCOPE);
    let when = When::from_unix_secs(1_600_000_000).expect("in range");
    for i in 0..n {
        let id = ItemId::new(&format!("item-{i}")).expect("generated ids are valid");
        r.change_signed(&id, key, &when, &edit(&i.to_string())).expect("within limits");
    }
    r
}

/// [`diverge`] with versions signed by `key`.
pub fn diverge_signed(r: &mut Replica, key: &engine::signing::DeviceKey, prefix: &str, count: usize) {
    let when = When::from_unix_secs(1_700_000_000).expect("in range");
    for k in 0..count {
        let id = ItemId::new(&format!("{prefix}-{k}")).expect("generated ids are valid");
        r.change_signed(&id, key, &when, &edit(&format!("{prefix}{k}"))).expect("within limits");
    }
}

/// What one feedmesh session did.
#[derive(Clone, Copy, Debug)]
pub struct SessionRun {
    pub messages: u64,
    pub initiator: Stats,
    pub responder: Stats,
    pub retained: Retained,
}

/// One feedmesh session, `a` initiating, on a clean in-order channel ([`engine::loopback`]).
pub fn session(a: &mut Replica, b: &mut Replica, retained: Retained) -> SessionRun {
    let mut sa = Plain::initiate(1, 0, a, Config::default(), retained);
    let mut sb = Plain::respond(1, b, Config::default());
    let pumped = loopback::run_clean(&mut sa, &mut sb, Clean::at(0), |_, _| {});
    SessionRun {
        messages: pumped.messages,
        initiator: sa.session.stats(),
        responder: sb.session.stats(),
        retained: sa.retained(),
    }
}

/// An automerge document of `n` maps under ROOT, one change each.
pub fn am_doc(n: usize) -> Automerge {
    let mut doc = Automerge::new();
    doc.set_actor(ActorId::from(b"origin".as_slice()));
    for i in 0..n {
        put_item(&mut doc, &format!("item-{i}"), &i.to_string());
    }
    doc
}

fn put_item(doc: &mut Automerge, key: &str, text: &str) {
    let mut tx = doc.transaction();
    // Writing plain data into a fresh transaction cannot fail.
    let obj = tx.put_object(ROOT, key, ObjType::Map).expect("put map");
    tx.put(&obj, "title", text).expect("put title");
    tx.put(&obj, "description", format!("item {text}")).expect("put description");
    tx.commit();
}

/// The automerge twin of [`diverge`].
pub fn am_diverge(doc: &mut Automerge, prefix: &str, count: usize) {
    doc.set_actor(ActorId::from(prefix.as_bytes()));
    for k in 0..count {
        put_item(doc, &format!("{prefix}-{k}"), &format!("{prefix}{k}"));
    }
}

/// Runs automerge's sync protocol to quiescence; returns (messages, bytes).
pub fn am_session(
    a: &mut Automerge,
    b: &mut Automerge,
    sa: &mut am_sync::State,
    sb: &mut am_sync::State,
) -> (u64, u64) {
    let (mut messages, mut bytes) = (0u64, 0u64);
    loop {
        let mut moved = false;
        if let Some(m) = a.generate_sync_message(sa) {
            let encoded = m.encode();
            messages += 1;
            bytes += encoded.len() as u64;
            let m = am_sync::Message::decode(&encoded).expect("own encoding decodes");
            b.receive_sync_message(sb, m).expect("valid message");
            moved = true;
        }
        if let Some(m) = b.generate_sync_message(sb) {
            let encoded = m.encode();
            messages += 1;
            bytes += encoded.len() as u64;
            let m = am_sync::Message::decode(&encoded).expect("own encoding decodes");
            a.receive_sync_message(sa, m).expect("valid message");
            moved = true;
        }
        if !moved {
            break;
        }
    }
    (messages, bytes)
}

//! The two roles as wholes: an `engine::device::Device` (a1 of the fixture) and an
//! `engine::cloud::Cloud` (the fixture's cloud), wired to each other, fed attacker bytes on every
//! input they take from the network (sync messages, control requests and answers, notices), local
//! commands and timers.
//!
//! Input: [`crate::Steps`]. A message step's first byte picks what it is (below); a timer step
//! moves the clock and fires both roles' timers. After each step whatever the device sends the
//! cloud and the cloud sends the device is delivered (at most [`PUMP_MAX`] rounds), as a perfect
//! network would; what goes to other peers is dropped. What must hold after every step: both
//! roles' invariants; every transmit within its bound (a sync message within the session limit,
//! control within `CONTROL_MAX`); every commit non-empty.
//!
//! | first byte % 8 | what |
//! | --- | --- |
//! | 0 | a sync message to the device from the peer named by the next byte |
//! | 1 | an answer to the device's control request numbered by the next byte |
//! | 2 | a notice to the device |
//! | 3 | a sync message to the cloud from the peer named by the next byte |
//! | 4 | a control request to the cloud from that peer, numbered by the byte after |
//! | 5 | the device starts a sync with the peer named by the next byte (session id: the byte after) |
//! | 6 | the device sends a control request (the rest, decoded; a ticket request if it does not decode) |
//! | 7 | the device writes item `item-N` (N: the next byte) |

use engine::cloud::{Cloud, CloudLimits};
use engine::control::{self, Request, CONTROL_MAX};
use engine::device::{Device, DeviceConfig, Identity};
use engine::feedsync::{Content, Edit, ItemId, When};
use engine::replica::Replica;
use engine::sessions::{Stream, Transmit};
use std::sync::Arc;

use crate::fixture::{config, world, T0};
use crate::{Step, Steps};

/// Rounds of delivery between the two roles after one step.
pub const PUMP_MAX: usize = 64;

/// Peers by index: 0 the cloud, 1 the device itself (a1), then a2, b1, c1 and a stranger.
const PEERS: [&str; 6] = ["cloud", "a1", "a2", "b1", "c1", "stranger"];

fn name(peer: u8) -> &'static str {
    PEERS[usize::from(peer) % PEERS.len()]
}

fn fresh() -> (Device<u8>, Cloud<u8>) {
    let w = world();
    let replica = Replica::new_signed(7, w.folder.scope());
    let identity = Identity::Keyed { key: w.key("a1").clone(), cloud: w.cloud() };
    let cfg = DeviceConfig { sync: config().into(), ..DeviceConfig::default() };
    let mut device = Device::new(identity, Some(0), w.dir.clone(), vec![(w.folder, replica)], 5, cfg);
    device.set_ticket(T0, w.tickets["a1"].clone());
    let mut cloud =
        Cloud::new(w.key("cloud").clone(), w.dir.clone(), CloudLimits::default()).with_sessions(config(), 9);
    cloud.install(w.folder, Replica::new_signed(9, w.folder.scope()));
    (device, cloud)
}

fn check_transmit(t: &Transmit<u8>) {
    let max = match t.stream {
        Stream::Sync => config().max_message_bytes,
        Stream::Request(_) | Stream::Response(_) | Stream::Notice => CONTROL_MAX,
    };
    assert!(t.bytes.len() <= max, "a {:?} transmit of {} bytes", t.stream, t.bytes.len());
}

/// Delivers between the roles until both are quiet (or [`PUMP_MAX`] rounds), checking what
/// passes and draining what a driver would.
fn pump(now: u64, device: &mut Device<u8>, cloud: &mut Cloud<u8>) {
    let w = world();
    for _ in 0..PUMP_MAX {
        let mut moved = false;
        while device.poll_persist().is_some() {}
        while device.poll_event().is_some() {}
        while let Some(p) = cloud.poll_persist() {
            if let engine::cloud::Persist::Items(c) = p {
                assert!(!c.items.is_empty(), "an empty commit");
            }
        }
        while cloud.poll_notice().is_some() {}
        while cloud.poll_ended().is_some() {}
        let mut to_cloud = Vec::new();
        while let Some(t) = device.poll_transmit() {
            check_transmit(&t);
            if t.to == 0 {
                to_cloud.push(t);
            }
        }
        let mut to_device = Vec::new();
        while let Some(t) = cloud.poll_transmit() {
            check_transmit(&t);
            if t.to == 1 {
                to_device.push(t);
            }
        }
        for t in to_cloud {
            moved = true;
            match t.stream {
                Stream::Sync => cloud.handle_sync(now, 1, w.channel("a1"), &t.bytes),
                Stream::Request(id) => cloud.handle_control(now, 1, w.device("a1"), id, &t.bytes),
                Stream::Response(_) | Stream::Notice => {}
            }
        }
        for t in to_device {
            moved = true;
            match t.stream {
                Stream::Sync => device.handle_sync(now, 0, w.channel("cloud"), &t.bytes),
                Stream::Response(id) => device.handle_response(now, id, &t.bytes),
                Stream::Notice => device.handle_notice(&t.bytes),
                Stream::Request(_) => {}
            }
        }
        device.check_invariants().unwrap_or_else(|e| panic!("device invariants: {e}"));
        cloud.check_invariants().unwrap_or_else(|e| panic!("cloud invariants: {e}"));
        if !moved {
            return;
        }
    }
}

pub fn roles(data: &[u8]) {
    let w = world();
    let (mut device, mut cloud) = fresh();
    let mut now = T0;
    for step in Steps::new(data) {
        match step {
            Step::Timeout(advance) => {
                now += advance;
                device.handle_timeout(now);
                cloud.handle_timeout(now);
            }
            Step::Message(bytes) => {
                let Some((&op, rest)) = bytes.split_first() else { continue };
                let (arg, tail) = rest.split_first().map_or((0, &[][..]), |(a, t)| (*a, t));
                let (arg2, tail2) = tail.split_first().map_or((0, &[][..]), |(a, t)| (*a, t));
                match op % 8 {
                    0 => device.handle_sync(now, arg, w.channel(name(arg)), tail),
                    1 => device.handle_response(now, u64::from(arg), tail),
                    2 => device.handle_notice(rest),
                    3 => {
                        let peer = 2 + arg % 4;
                        cloud.handle_sync(now, peer, w.channel(name(peer)), tail);
                    }
                    4 => {
                        let peer = 2 + arg % 4;
                        cloud.handle_control(now, peer, w.device(name(peer)), u64::from(arg2), tail2);
                    }
                    5 => {
                        let peer = [0, 2, 3][usize::from(arg % 3)];
                        let _ =
                            device.start_sync(now, peer, w.channel(name(peer)), w.folder, u64::from(arg2));
                    }
                    6 => {
                        let request =
                            control::decode::<Request>(rest, CONTROL_MAX).unwrap_or(Request::Ticket);
                        let _ = device.request(now, request);
                    }
                    _ => {
                        let id = ItemId::new(&format!("item-{arg}")).expect("generated ids are valid");
                        let when = When::from_unix_secs(1_700_000_000 + (now / 1_000_000) as i64 % 1_000_000)
                            .expect("a 2023 time is valid");
                        let text =
                            String::from_utf8_lossy(&tail[..tail.len().min(64)]).replace(['<', '&'], "");
                        let content = Arc::new(Content {
                            inner: format!("<title>{text}</title>").into(),
                            ..Content::empty()
                        });
                        let _ = device.write(
                            w.folder,
                            &id,
                            &when,
                            &Edit { content: Some(content), ..Edit::default() },
                        );
                    }
                }
            }
        }
        pump(now, &mut device, &mut cloud);
    }
}

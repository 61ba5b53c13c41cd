//! The cloud's control plane (`engine::cloud::Cloud`) fed sequences of control requests from the
//! fixture's devices, decoded as the transport decodes them (`control::decode`).
//!
//! Input: steps, each a device byte (which of [`NAMES`] asks; a high bit makes it a
//! password-checked pairing request for the asker's user or Alice's) and a length-prefixed
//! control frame ([`crate::Steps`] framing: tag below `0x80`, `u16` length, the frame; a tag from
//! `0x80` moves the clock). What must hold after every step: the cloud's invariants; a refused
//! directory batch changes nothing; every accepted change is handed out to store exactly once
//! and announced; a ticket verifies for the asker's channel; answers hold their bounds and
//! encode within the frame limit; peers handed out may sync the folder with the asker.

use std::collections::BTreeSet;

use engine::cloud::{Cloud, CloudLimits, Persist};
use engine::control::{self, Bounded, Request, Response, CONTROL_MAX};
use engine::directory::{ChangeId, Directory, UserId};

use crate::fixture::{world, NAMES, T0};
use crate::{Step, Steps};

/// A cloud that holds the fixture's directory.
fn fresh() -> Cloud {
    let w = world();
    Cloud::new(
        w.key("cloud").clone(),
        w.dir.clone(),
        CloudLimits { pairings_per_user: 4, pairings_max: 8, notices_max: 16, ..CloudLimits::default() },
    )
}

pub fn cloud_control(data: &[u8]) {
    let w = world();
    let mut cloud = fresh();
    let mut stored: BTreeSet<ChangeId> = w.dir.changes().map(|c| c.id()).collect();
    let mut now = T0;
    for step in Steps::new(data) {
        let bytes = match step {
            Step::Timeout(advance) => {
                now += advance;
                continue;
            }
            Step::Message(bytes) => bytes,
        };
        let Some((&who, frame)) = bytes.split_first() else { continue };
        let name = NAMES[usize::from(who & 0x7f) % NAMES.len()];
        let device = w.device(name);
        let Ok(request) = control::decode::<Request>(frame, CONTROL_MAX) else { continue };
        let before = cloud.directory().digest();
        let is_directory = matches!(request, Request::Directory { .. });
        let is_ticket = matches!(request, Request::Ticket);
        let peers_of = match &request {
            Request::Peers { folder } => Some(*folder),
            _ => None,
        };
        let answer = match request {
            Request::PairRequest { commitment, .. } if who & 0x80 != 0 => {
                // As if the driver checked the password of the asker's user's account (or Alice's).
                let user = cloud
                    .directory()
                    .user_of(&device)
                    .unwrap_or_else(|| UserId::of_first_device(w.device("a1")));
                cloud.handle_pair_request(device, user, commitment)
            }
            request => cloud.handle_request(now, device, request),
        };
        answer.check_bounds().expect("an answer holds its bounds");
        assert!(control::encode(&answer).len() <= CONTROL_MAX, "an answer fits a control frame");
        match &answer {
            Response::Refused(_) if is_directory => {
                assert_eq!(
                    cloud.directory().digest(),
                    before,
                    "a refused directory batch changed the directory"
                )
            }
            Response::Ticket { ticket, cloud: id } => {
                assert!(is_ticket);
                assert!(
                    ticket.verify(id, now, &device.into()).is_ok(),
                    "a fresh ticket verifies for its asker"
                );
            }
            Response::Peers { peers } => {
                let folder = peers_of.expect("peers answer a peers request");
                for p in peers {
                    assert!(
                        cloud.directory().may_sync(&folder, &device, &p.device).is_ok(),
                        "handed out a peer that may not sync"
                    );
                }
            }
            _ => {}
        }
        let mut persisted = Vec::new();
        while let Some(Persist::Directory(changes)) = cloud.poll_persist() {
            persisted.extend(changes);
        }
        for c in &persisted {
            assert!(stored.insert(c.id()), "a change handed out to store twice");
        }
        assert_eq!(stored.len(), cloud.directory().len(), "every accepted change is handed out to store");
        if !persisted.is_empty() {
            let notices: Vec<_> = std::iter::from_fn(|| cloud.poll_notice()).collect();
            assert!(
                notices.iter().any(|n| n.notice == control::Notice::Directory),
                "a directory change was not announced"
            );
        }
        cloud.check_invariants().expect("the cloud's invariants");
    }
    // The directory the cloud ends with rebuilds from its own log.
    let all: Vec<_> = cloud.directory().changes().cloned().collect();
    let mut rebuilt = Directory::new();
    assert_eq!(rebuilt.apply(&all), Ok(all.len()));
    assert_eq!(rebuilt.digest(), cloud.directory().digest());
}

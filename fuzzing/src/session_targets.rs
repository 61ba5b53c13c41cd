//! Targets for the session state machines: a `sync::Session` and an `authz::AuthSession`, each
//! as responder and as initiator, over the fixture replicas (unsigned or signed). The input is a
//! header byte and then [`Steps`]: the attacker's messages, in order, with timer firings between
//! them. After every step the session's output is checked (every message decodes, is within the
//! size limit and names the session), the replica's invariants hold, and a failed session has
//! no timer; at the end the clock runs on until the session has no timer left, and a session
//! that said anything must then have ended (a silent peer cannot keep it alive).
//!
//! Header bits: 0, signed replicas; 1, the replicas (and for the initiator its retained cursors)
//! after a first session, so the incremental path is open; 2-3 (authorized sessions), which
//! device the peer's channel key is (the honest peer, a2, c1 who is no member, a stranger); 4,
//! this side's replica is empty.

use engine::authz::AuthSession;
use engine::directory::Directory;
use engine::replica::Replica;
use engine::signing::{self, DeviceId};
use engine::sync::{Config, Micros, Outcome, Retained, Session};
use engine::wire::{self, Body, WIRE_VERSION};

use crate::fixture::{self, world, SESSION, T0};
use crate::{Step, Steps};

/// Messages one step may make a session send: an answer, a retransmission, and the directory
/// phase's resent message in front of a feed message.
const SENT_PER_STEP_MAX: usize = 4;

/// Which side sends the session's even steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Initiator,
    Responder,
}

/// What a target knows about a session between steps.
#[derive(Debug)]
struct Watch {
    side: Side,
    cfg: Config,
    sent: u64,
}

impl Watch {
    fn new(side: Side) -> Self {
        Self { side, cfg: fixture::config(), sent: 0 }
    }

    /// Checks the messages a step made the session send.
    fn sent(&mut self, out: Vec<Vec<u8>>) {
        assert!(out.len() <= SENT_PER_STEP_MAX, "one step sent {} messages", out.len());
        for bytes in out {
            self.sent += 1;
            assert!(bytes.len() <= self.cfg.max_message_bytes, "sent {} bytes, over the limit", bytes.len());
            let message =
                wire::decode(&bytes, self.cfg.max_message_bytes).expect("what a session sends decodes");
            assert_eq!(message.session, SESSION, "a session sends under its own id");
            assert_eq!(message.version, WIRE_VERSION);
            // Feed messages alternate (initiator even steps, responder odd); the directory phase
            // numbers its own (a refusal is step 3 from either side).
            if !matches!(
                message.body,
                Body::DirHello { .. } | Body::DirSync { .. } | Body::DirDone { .. } | Body::Refused { .. }
            ) {
                let parity = match self.side {
                    Side::Initiator => 0,
                    Side::Responder => 1,
                };
                assert_eq!(message.step % 2, parity, "{:?} sent step {}", self.side, message.step);
            }
        }
    }
}

fn drain_session(s: &mut Session) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| s.poll_transmit()).collect()
}

fn drain_auth(s: &mut AuthSession) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| s.poll_transmit()).collect()
}

fn check_replica(replica: &Replica) {
    replica.check_invariants().expect("replica invariants after a session step");
}

/// A signed replica holds only versions with valid signatures for its folder.
fn check_signed(replica: &Replica) {
    let scope = world().folder.scope();
    for item in replica.items() {
        for version in std::iter::once(&item.version).chain(&item.conflicts) {
            assert!(
                signing::verify_version(version, &scope).is_ok(),
                "a signed replica holds an unverified version"
            );
        }
    }
}

fn replica_for(signed: bool, later: bool, empty: bool, responder: bool) -> Replica {
    let p = fixture::pairs().get(signed);
    if empty {
        let epoch = if responder { 2 } else { 1 };
        return if signed { Replica::new_signed(epoch, world().folder.scope()) } else { Replica::new(epoch) };
    }
    match (later, responder) {
        (false, false) => p.a.clone(),
        (false, true) => p.b.clone(),
        (true, false) => p.later_a.clone(),
        (true, true) => p.later_b.clone(),
    }
}

/// Runs a plain session through the steps; `s` is fresh (a responder) or has sent its Hello.
fn run_session(mut s: Session, side: Side, mut replica: Replica, signed: bool, rest: &[u8]) {
    let mut watch = Watch::new(side);
    let mut now: Micros = T0;
    watch.sent(drain_session(&mut s));
    for step in Steps::new(rest) {
        match step {
            Step::Message(bytes) => {
                now += 1_000;
                let _ = s.handle_message(now, &mut replica, bytes);
            }
            Step::Timeout(dt) => {
                now += dt;
                s.handle_timeout(now);
            }
        }
        watch.sent(drain_session(&mut s));
        check_replica(&replica);
        if matches!(s.outcome(), Outcome::Failed(_)) {
            assert_eq!(s.poll_timeout(), None, "a failed session keeps a timer");
        }
    }
    // The peer goes silent: the timer alone must end the session.
    for _ in 0..=watch.cfg.max_retries + 2 {
        let Some(at) = s.poll_timeout() else { break };
        assert!(at < now + 3_600_000_000, "a timer more than an hour away");
        now = now.max(at);
        s.handle_timeout(now);
        watch.sent(drain_session(&mut s));
    }
    assert_eq!(s.poll_timeout(), None, "the timer did not end the session");
    if watch.sent > 0 {
        assert!(
            !matches!(s.outcome(), Outcome::Running),
            "a session that spoke is still running with no timer"
        );
    }
    check_replica(&replica);
    if signed {
        check_signed(&replica);
    }
}

/// A plain responder fed the initiator's messages.
pub fn session_responder(data: &[u8]) {
    let Some((&header, rest)) = data.split_first() else { return };
    let (signed, later, empty) = (header & 1 != 0, header & 2 != 0, header & 0x10 != 0);
    let replica = replica_for(signed, later, empty, true);
    let s = Session::respond(SESSION, &replica, fixture::config());
    run_session(s, Side::Responder, replica, signed, rest);
}

/// A plain initiator (its Hello sent) fed the responder's messages.
pub fn session_initiator(data: &[u8]) {
    let Some((&header, rest)) = data.split_first() else { return };
    let (signed, later, empty) = (header & 1 != 0, header & 2 != 0, header & 0x10 != 0);
    let replica = replica_for(signed, later, empty, false);
    let retained = if later { fixture::pairs().get(signed).retained } else { Retained::default() };
    let s = Session::initiate(SESSION, T0, &replica, fixture::config(), retained);
    run_session(s, Side::Initiator, replica, signed, rest);
}

/// The device the peer's channel key belongs to, from header bits 2-3.
fn peer_name(header: u8, honest: &'static str) -> &'static str {
    match (header >> 2) & 3 {
        0 => honest,
        1 => "a2",
        2 => "c1",
        _ => "stranger",
    }
}

/// Runs an authorized session through the steps. Nothing reaches the replica before the session
/// is authorized; a changed directory is still a function of its set of changes.
fn run_auth(mut s: AuthSession, side: Side, mut dir: Directory, mut replica: Replica, rest: &[u8]) {
    let mut watch = Watch::new(side);
    let mut now: Micros = T0;
    let start = (replica.digest(), replica.len(), replica.head());
    let mut authorized = false;
    watch.sent(drain_auth(&mut s));
    for step in Steps::new(rest) {
        match step {
            Step::Message(bytes) => {
                now += 1_000;
                let _ = s.handle_message(now, &mut dir, &mut replica, bytes);
            }
            Step::Timeout(dt) => {
                now += dt;
                s.handle_timeout(now);
            }
        }
        authorized |= s.authorized();
        watch.sent(drain_auth(&mut s));
        check_replica(&replica);
        if !authorized {
            assert_eq!(
                (replica.digest(), replica.len(), replica.head()),
                start,
                "an unauthorized peer changed the replica"
            );
        }
        if matches!(s.outcome(), Outcome::Failed(_)) {
            assert_eq!(s.poll_timeout(), None, "a failed session keeps a timer");
        }
    }
    for _ in 0..=2 * (watch.cfg.max_retries + 2) {
        let Some(at) = s.poll_timeout() else { break };
        assert!(at < now + 3_600_000_000, "a timer more than an hour away");
        now = now.max(at);
        s.handle_timeout(now);
        watch.sent(drain_auth(&mut s));
    }
    assert_eq!(s.poll_timeout(), None, "the timer did not end the session");
    if watch.sent > 0 {
        assert!(
            !matches!(s.outcome(), Outcome::Running),
            "a session that spoke is still running with no timer"
        );
    }
    if authorized {
        let peer = s.peer_device().expect("an authorized session knows its peer's device");
        let folder = world().folder;
        assert!(
            dir.may_sync(&folder, &DeviceId::of(world().key(me(side))), &peer).is_ok(),
            "authorized a peer the directory does not allow"
        );
    }
    check_replica(&replica);
    check_signed(&replica);
    let w = world();
    if dir.len() != w.dir.len() {
        let all: Vec<_> = dir.changes().cloned().collect();
        let mut rebuilt = Directory::new();
        assert_eq!(rebuilt.apply(&all), Ok(all.len()), "a directory's own log rebuilds it");
        assert_eq!(rebuilt.digest(), dir.digest(), "the directory is a function of its set of changes");
    }
}

fn me(side: Side) -> &'static str {
    match side {
        Side::Initiator => "a1",
        Side::Responder => "b1",
    }
}

/// An authorized responder (device b1) fed the initiator's messages.
pub fn auth_responder(data: &[u8]) {
    let Some((&header, rest)) = data.split_first() else { return };
    let w = world();
    let replica = replica_for(true, header & 2 != 0, header & 0x10 != 0, true);
    let peer = w.channel(peer_name(header, "a1"));
    let s = AuthSession::respond(SESSION, w.policy("b1"), peer, &replica, fixture::config());
    run_auth(s, Side::Responder, w.dir.clone(), replica, rest);
}

/// An authorized initiator (device a1, its DirHello sent) fed the responder's messages.
pub fn auth_initiator(data: &[u8]) {
    let Some((&header, rest)) = data.split_first() else { return };
    let w = world();
    let later = header & 2 != 0;
    let replica = replica_for(true, later, header & 0x10 != 0, false);
    let retained = if later { fixture::pairs().signed.retained } else { Retained::default() };
    let peer = w.channel(peer_name(header, "b1"));
    let dir = w.dir.clone();
    let s = AuthSession::initiate(
        SESSION,
        T0,
        w.folder,
        w.policy("a1"),
        peer,
        &dir,
        &replica,
        fixture::config(),
        retained,
    );
    run_auth(s, Side::Initiator, dir, replica, rest);
}

#[cfg(test)]
mod tests {
    use engine::replica::Replica;
    use engine::sync::{Outcome, Session, SyncError};

    use crate::fixture::{self, SESSION, T0};

    /// The committed peel-loop regression (`regressions/session_responder/riblt-peel-loop-*-v6`)
    /// still reaches the coded-symbol decoder at the current wire version, and is refused there.
    #[test]
    fn the_peel_loop_hello_reaches_the_decoder_and_is_refused() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/regressions/wire_message/riblt-peel-loop-hello-v6");
        let hello = std::fs::read(path).expect("the committed regression");
        assert_eq!(
            hello[0],
            engine::wire::WIRE_VERSION,
            "regenerate the regression for the new wire version"
        );
        let mut empty = Replica::new(2);
        let mut s = Session::respond(SESSION, &empty, fixture::config());
        let result = s.handle_message(T0, &mut empty, &hello);
        assert!(matches!(result, Err(SyncError::Symbols(_))), "{result:?}");
        assert!(matches!(s.outcome(), Outcome::Failed(SyncError::Symbols(_))));
    }
}

//! Two sync sessions wired back to back in memory: the one pump that tests, fuzz fixtures and
//! benchmarks use to run a session pair, instead of each moving `poll_transmit` output into the
//! other side's `handle_message` by hand.
//!
//! An [`End`] is one side of the pair: a [`Plain`] `Session` with its replica, or an
//! [`Authorized`] `AuthSession` with its directory and replica (or a caller's own). Two channels:
//! - [`run_clean`]: in order, nothing lost, no timers; what an initiator sends is handed to the
//!   responder as soon as it is polled. Allocates nothing and copies no message, so benchmarks
//!   time the sessions only.
//! - [`run_faulty`]: messages go through a [`Channel`] (the caller's model of loss, duplication,
//!   delay and reordering, or [`Faulty`] with the caller's deterministic fates), and timers fire
//!   in time order.
//!
//! Time is a parameter and randomness the caller's, as everywhere in the engine. The pumps only
//! move messages: the sessions stay with the caller, who reads their outcomes and stats.
//! Protocol tests that drive single messages step by step do not need this module.

use std::collections::BTreeMap;

use crate::authz::AuthSession;
use crate::directory::Directory;
use crate::replica::Replica;
use crate::sync::{Micros, Outcome, Retained, Session};

/// Which way a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// From the initiator to the responder.
    ToResponder,
    /// From the responder to the initiator.
    ToInitiator,
}

/// One side of a loopback pair: a session and what it works on. Errors of `handle_message` are
/// not returned: a session that fails says so in its outcome.
pub trait End {
    fn poll_transmit(&mut self) -> Option<Vec<u8>>;
    fn handle_message(&mut self, now: Micros, bytes: &[u8]);
    fn poll_timeout(&self) -> Option<Micros>;
    fn handle_timeout(&mut self, now: Micros);
    fn outcome(&self) -> Outcome;
}

/// A plain [`Session`] with its replica.
#[derive(Debug)]
pub struct Plain<'r> {
    pub session: Session,
    pub replica: &'r mut Replica,
}

impl<'r> Plain<'r> {
    /// [`Session::initiate`] on `replica`.
    pub fn initiate(
        id: u64,
        now: Micros,
        replica: &'r mut Replica,
        cfg: crate::sync::Config,
        retained: Retained,
    ) -> Self {
        Self { session: Session::initiate(id, now, replica, cfg, retained), replica }
    }

    /// [`Session::respond`] on `replica`.
    pub fn respond(id: u64, replica: &'r mut Replica, cfg: crate::sync::Config) -> Self {
        Self { session: Session::respond(id, replica, cfg), replica }
    }

    /// What the initiator keeps for its next session with the peer: the outcome's, once done.
    pub fn retained(&self) -> Retained {
        match self.session.outcome() {
            Outcome::Done { retained, .. } => *retained,
            _ => Retained::default(),
        }
    }
}

impl End for Plain<'_> {
    #[inline]
    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.session.poll_transmit()
    }

    #[inline]
    fn handle_message(&mut self, now: Micros, bytes: &[u8]) {
        let _ = self.session.handle_message(now, self.replica, bytes);
    }

    fn poll_timeout(&self) -> Option<Micros> {
        self.session.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Micros) {
        self.session.handle_timeout(now);
    }

    fn outcome(&self) -> Outcome {
        self.session.outcome().clone()
    }
}

/// An [`AuthSession`] with its directory and replica.
#[derive(Debug)]
pub struct Authorized<'r> {
    pub session: AuthSession,
    pub directory: &'r mut Directory,
    pub replica: &'r mut Replica,
}

impl End for Authorized<'_> {
    #[inline]
    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.session.poll_transmit()
    }

    #[inline]
    fn handle_message(&mut self, now: Micros, bytes: &[u8]) {
        let _ = self.session.handle_message(now, self.directory, self.replica, bytes);
    }

    fn poll_timeout(&self) -> Option<Micros> {
        self.session.poll_timeout()
    }

    fn handle_timeout(&mut self, now: Micros) {
        self.session.handle_timeout(now);
    }

    fn outcome(&self) -> Outcome {
        self.session.outcome()
    }
}

/// The clean channel of [`run_clean`]: starts at `now`, each message arrives `step_us` after the
/// one before, and after `rounds_max` rounds (a round: the initiator's messages, then the
/// responder's) a pair that still talks is left as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clean {
    pub now: Micros,
    pub step_us: Micros,
    pub rounds_max: u32,
}

impl Clean {
    /// Rounds of [`Clean::at`]: far more than a session takes on a clean channel (one round
    /// trip a round), so only a pair that never falls quiet meets it.
    pub const ROUNDS_MAX: u32 = 4096;

    /// Every message at `now`, at most [`Clean::ROUNDS_MAX`] rounds.
    pub fn at(now: Micros) -> Self {
        Self { now, step_us: 0, rounds_max: Self::ROUNDS_MAX }
    }
}

/// What a pump did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pumped {
    /// Messages the two sides sent (polled), whatever the channel did with them.
    pub messages: u64,
    /// The clock when the pump stopped.
    pub now: Micros,
    /// Whether it stopped because the pair fell quiet (else its bound stopped it).
    pub quiet: bool,
}

/// Runs `initiator` and `responder` over a clean, in-order channel until neither has anything to
/// send (or `clean.rounds_max` rounds). Each message is handed to `delivered`, with its
/// direction, after the other side handled it (a transcript, or `|_, _| {}`).
pub fn run_clean<I: End, R: End>(
    initiator: &mut I,
    responder: &mut R,
    clean: Clean,
    mut delivered: impl FnMut(Direction, Vec<u8>),
) -> Pumped {
    let mut pumped = Pumped { now: clean.now, ..Pumped::default() };
    for _ in 0..clean.rounds_max {
        let mut moved = false;
        while let Some(m) = initiator.poll_transmit() {
            moved = true;
            pumped.messages += 1;
            pumped.now += clean.step_us;
            responder.handle_message(pumped.now, &m);
            delivered(Direction::ToResponder, m);
        }
        while let Some(m) = responder.poll_transmit() {
            moved = true;
            pumped.messages += 1;
            pumped.now += clean.step_us;
            initiator.handle_message(pumped.now, &m);
            delivered(Direction::ToInitiator, m);
        }
        if !moved {
            pumped.quiet = true;
            break;
        }
    }
    pumped
}

/// What carries messages in [`run_faulty`]: it may lose, duplicate, delay and reorder them.
pub trait Channel {
    /// Takes a message sent at `now`.
    fn send(&mut self, now: Micros, to: Direction, bytes: Vec<u8>);
    /// When the next message in flight arrives; `None` when nothing is in flight.
    fn next_arrival(&self) -> Option<Micros>;
    /// Takes the next message out of the channel, with when it arrives; `None` when the channel
    /// drops it instead (or nothing is in flight).
    fn arrive(&mut self) -> Option<(Micros, Direction, Vec<u8>)>;
}

/// Runs `initiator` and `responder` over `channel` from `now`, one event a step: a message
/// arrives, or (when the next timer comes first) both sides' timers are handled. Stops when
/// nothing is in flight and the initiator has finished with no timer left and the responder has
/// finished too (a responder lingering for a repeat is not waited for), when nothing is in flight
/// and no timer is armed, or after `steps_max` steps.
pub fn run_faulty<I: End, R: End, C: Channel>(
    initiator: &mut I,
    responder: &mut R,
    channel: &mut C,
    now: Micros,
    steps_max: u32,
) -> Pumped {
    let mut pumped = Pumped { now, ..Pumped::default() };
    for _ in 0..steps_max {
        while let Some(m) = initiator.poll_transmit() {
            pumped.messages += 1;
            channel.send(pumped.now, Direction::ToResponder, m);
        }
        while let Some(m) = responder.poll_transmit() {
            pumped.messages += 1;
            channel.send(pumped.now, Direction::ToInitiator, m);
        }
        let next_message = channel.next_arrival();
        let initiator_done =
            !matches!(initiator.outcome(), Outcome::Running) && initiator.poll_timeout().is_none();
        let responder_done = !matches!(responder.outcome(), Outcome::Running);
        if initiator_done && responder_done && next_message.is_none() {
            pumped.quiet = true;
            break;
        }
        let next_timer = [initiator.poll_timeout(), responder.poll_timeout()].into_iter().flatten().min();
        let message_first = match (next_message, next_timer) {
            (Some(m), Some(t)) => m <= t,
            (Some(_), None) => true,
            (None, _) => false,
        };
        match (message_first, next_timer) {
            (true, _) => {
                let Some((at, to, bytes)) = channel.arrive() else { continue };
                pumped.now = pumped.now.max(at);
                match to {
                    Direction::ToResponder => responder.handle_message(pumped.now, &bytes),
                    Direction::ToInitiator => initiator.handle_message(pumped.now, &bytes),
                }
            }
            (false, Some(t)) => {
                pumped.now = pumped.now.max(t);
                initiator.handle_timeout(pumped.now);
                responder.handle_timeout(pumped.now);
            }
            (false, None) => {
                pumped.quiet = true;
                break;
            }
        }
    }
    pumped
}

/// What [`Faulty`] does with one message: the delay after which each copy arrives. No copy: it
/// is lost; two: it is duplicated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fate {
    pub copies: [Option<Micros>; 2],
}

impl Fate {
    /// Lost.
    pub const LOST: Fate = Fate { copies: [None, None] };

    /// One copy, after `delay`.
    pub fn after(delay: Micros) -> Self {
        Self { copies: [Some(delay), None] }
    }
}

/// A channel of timed deliveries: each message's [`Fate`] comes from the caller's `fate` (a
/// seeded RNG or a fixed pattern), and messages arrive in the order of their arrival times,
/// ties in the order they were sent.
pub struct Faulty<F> {
    fate: F,
    /// (arrives at, sequence) -> (direction, bytes).
    wire: BTreeMap<(Micros, u64), (Direction, Vec<u8>)>,
    sent: u64,
}

impl<F: FnMut(Direction, &[u8]) -> Fate> Faulty<F> {
    pub fn new(fate: F) -> Self {
        Self { fate, wire: BTreeMap::new(), sent: 0 }
    }

    /// Copies in flight.
    pub fn in_flight(&self) -> usize {
        self.wire.len()
    }
}

impl<F> std::fmt::Debug for Faulty<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faulty").field("in_flight", &self.wire.len()).field("sent", &self.sent).finish()
    }
}

impl<F: FnMut(Direction, &[u8]) -> Fate> Channel for Faulty<F> {
    fn send(&mut self, now: Micros, to: Direction, mut bytes: Vec<u8>) {
        let fate = (self.fate)(to, &bytes);
        let mut delays = fate.copies.into_iter().flatten().peekable();
        while let Some(delay) = delays.next() {
            self.sent += 1;
            // The last copy takes the message itself.
            let copy = if delays.peek().is_some() { bytes.clone() } else { std::mem::take(&mut bytes) };
            self.wire.insert((now + delay, self.sent), (to, copy));
        }
    }

    fn next_arrival(&self) -> Option<Micros> {
        self.wire.keys().next().map(|&(at, _)| at)
    }

    fn arrive(&mut self) -> Option<(Micros, Direction, Vec<u8>)> {
        self.wire.pop_first().map(|((at, _), (to, bytes))| (at, to, bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::feedsync::{Content, Edit, Endpoint, ItemId, When};
    use crate::sync::Config;

    /// A replica of `epoch` with items `names`, each made by endpoint `by`.
    fn replica(epoch: u64, by: &str, names: &[&str]) -> Replica {
        let mut r = Replica::new(epoch);
        let by = Endpoint::new(by).unwrap();
        let when = When::from_unix_secs(1_700_000_000).unwrap();
        for name in names {
            let edit = Edit {
                content: Some(Arc::new(Content {
                    inner: format!("<title>{name}</title>").into(),
                    ..Content::empty()
                })),
                ..Edit::default()
            };
            r.change(&ItemId::new(name).unwrap(), &by, &when, &edit).unwrap();
        }
        r
    }

    #[test]
    fn a_clean_pair_falls_quiet_and_hands_over_every_message_in_order() {
        let (mut a, mut b) = (replica(1, "a", &["x", "y"]), replica(2, "b", &["z"]));
        let mut seen = Vec::new();
        let mut sa = Plain::initiate(1, 5, &mut a, Config::default(), Retained::default());
        let mut sb = Plain::respond(1, &mut b, Config::default());
        let clean = Clean { now: 5, step_us: 10, rounds_max: 16 };
        let pumped = run_clean(&mut sa, &mut sb, clean, |to, m| seen.push((to, m.len())));
        assert!(pumped.quiet);
        assert!(matches!(sa.session.outcome(), Outcome::Done { .. }), "{:?}", sa.session.outcome());
        let (stats_a, stats_b) = (sa.session.stats(), sb.session.stats());
        assert_eq!(pumped.messages, stats_a.messages_sent + stats_b.messages_sent);
        assert_eq!(pumped.now, 5 + 10 * pumped.messages);
        assert_eq!(seen.len() as u64, pumped.messages);
        assert_eq!(seen[0].0, Direction::ToResponder, "the initiator speaks first");
        assert!(seen.windows(2).all(|w| w[0].0 != w[1].0), "strictly alternating: {seen:?}");
        let bytes: usize = seen.iter().map(|(_, len)| len).sum();
        assert_eq!(bytes as u64, stats_a.bytes_sent + stats_b.bytes_sent);
        assert_ne!(sa.retained(), Retained::default());
        drop((sa, sb));
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn a_clean_pair_that_keeps_talking_stops_at_the_bound() {
        let (mut a, mut b) = (replica(1, "a", &["x"]), replica(2, "b", &["y"]));
        let mut sa = Plain::initiate(1, 0, &mut a, Config::default(), Retained::default());
        let mut sb = Plain::respond(1, &mut b, Config::default());
        let pumped = run_clean(&mut sa, &mut sb, Clean { now: 0, step_us: 0, rounds_max: 1 }, |_, _| {});
        assert!(!pumped.quiet);
        assert_eq!(pumped.messages, 2, "one round: the Hello and its answer");
    }

    #[test]
    fn a_faulty_channel_loses_duplicates_and_delays_as_its_fates_say() {
        let (mut a, mut b) = (replica(1, "a", &["x", "y"]), replica(2, "b", &["z"]));
        // A fixed pattern: lost, on time, twice (the copies out of order).
        let mut n = 0u64;
        let mut fates = Vec::new();
        let mut channel = Faulty::new(|to, _: &[u8]| {
            n += 1;
            let fate = match n % 3 {
                1 => Fate::LOST,
                2 => Fate::after(1_000),
                _ => Fate { copies: [Some(2_000), Some(500)] },
            };
            fates.push((to, fate));
            fate
        });
        let cfg = Config::default();
        let mut sa = Plain::initiate(1, 0, &mut a, cfg.clone(), Retained::default());
        let mut sb = Plain::respond(1, &mut b, cfg);
        let pumped = run_faulty(&mut sa, &mut sb, &mut channel, 0, 10_000);
        assert!(pumped.quiet);
        assert_eq!(channel.in_flight(), 0);
        drop(channel);
        assert_eq!(fates.len() as u64, pumped.messages, "one fate a message sent");
        assert_eq!(fates[0], (Direction::ToResponder, Fate::LOST));
        assert!(matches!(sa.session.outcome(), Outcome::Done { .. }), "{:?}", sa.session.outcome());
        assert!(sa.session.stats().retransmissions > 0, "the lost Hello was sent again");
        assert!(pumped.now >= Config::default().rto_us, "time went on to the timer");
        drop((sa, sb));
        assert_eq!(a.digest(), b.digest());
    }
}

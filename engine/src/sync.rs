//! A sans-IO sync session between two replicas of one feed.
//!
//! Shape (quinn-proto's): `handle_message(now, replica, bytes)` and `handle_timeout(now, replica)`
//! take input; `poll_transmit()` and `poll_timeout()` give output; time is the caller's.
//!
//! Messages strictly alternate (initiator steps 0, 2, 4, ...; responder 1, 3, 5, ...). A side that
//! sent a message and waits retransmits it when its timer fires (exponential backoff, bounded);
//! a duplicate of the peer's previous message makes it resend its last reply; anything else out of
//! order is dropped. Merging is idempotent, so loss, duplication and reordering cannot corrupt a
//! replica; every received item is validated before it is merged.
//!
//! Two paths, chosen in the first message:
//! - **incremental** (both cursors retained): `Hello{push, cursor}` carries the initiator's changes
//!   since the responder's acknowledgement; `Changes` answers with the responder's since the
//!   initiator's cursor. One round trip.
//! - **full reconciliation**: `Hello{symbols}` carries the first coded symbols of the initiator's
//!   fingerprint set (rateless IBLT, [`crate::riblt`]); the responder asks for `More` until the
//!   difference decodes, then `Diff` sends its missing items and the fingerprints it wants, the
//!   initiator answers with `Items`, and `Done` closes. Two round trips when the difference is
//!   small; bytes beyond the payload about 1.4 coded symbols (17-19 bytes) per difference.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::feedsync::Item;
use crate::replica::{Cursor, Fingerprint, Replica, Seq};
use crate::riblt::{self, Decoder, Symbol};
use crate::wire::{
    self, Body, Fixed64, Message, Push, WireCursor, WireError, WireItem, WireSymbol, WIRE_VERSION,
};

/// Microseconds of the caller's clock.
pub use crate::time::Micros;

/// Session limits and timers.
#[derive(Clone, Debug)]
pub struct Config {
    /// Largest message either side sends or accepts.
    pub max_message_bytes: usize,
    /// Coded symbols in the first message of a full reconciliation.
    pub initial_symbols: u64,
    /// Most coded symbols one reconciliation may use (then it fails).
    pub max_symbols: u64,
    /// First retransmission timeout; doubles with each retry up to `rto_max_us`.
    pub rto_us: Micros,
    pub rto_max_us: Micros,
    /// Retransmissions of one message before the session fails.
    pub max_retries: u32,
    /// How long the side that sent the last message keeps answering duplicates (longer than the
    /// peer's whole retransmission schedule).
    pub linger_us: Micros,
    /// Whether a responder whose whole part was one reply to the Hello lingers too. The Hello is
    /// idempotent, so a caller that answers a step-0 message of an unknown (or finished) session
    /// with a new responder can turn this off: then a busy responder holds no finished sessions
    /// in the common one-round-trip case.
    pub linger_after_hello: bool,
    /// Threads that verify a signed message's items (1: on the caller's thread). Results do not
    /// depend on it; a driver on a multi-core machine raises it, the simulator keeps 1.
    pub verify_threads: usize,
    /// Chunks a side sends before the peer's `Continue` for the ones before them (0: one chunk,
    /// then wait, as over a lossy channel: a retransmission repeats only the last message). A
    /// driver on a reliable, ordered stream raises it so that the next chunk is on its way while
    /// the peer checks, merges and stores this one.
    pub send_ahead: u32,
    /// Deliberately wrong behaviour, for showing that the simulator's swarm finds a bug and
    /// shrinks it (`netsim/tests/swarm.rs`). No driver sets it; `None` by default.
    #[doc(hidden)]
    pub planted_bug: Option<PlantedBug>,
}

/// A bug the simulator's swarm test plants on purpose (see [`Config::planted_bug`]).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlantedBug {
    /// A responder serving an initiator's cursor skips the first change after it: the
    /// initiator's cursor then passes a change it never got.
    CursorSkipsOneChange,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            initial_symbols: 16,
            max_symbols: 1 << 22,
            rto_us: 200_000,
            rto_max_us: 3_200_000,
            max_retries: 10,
            linger_us: 60_000_000,
            linger_after_hello: true,
            verify_threads: 1,
            send_ahead: 0,
            planted_bug: None,
        }
    }
}

/// Why a session failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("peer did not answer after {0} retransmissions")]
    Timeout(u32),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("peer aborted: {0}")]
    Aborted(crate::refusal::AbortCode),
    /// The driver's stream or connection to the peer ended before the session did.
    #[error("the connection to the peer was lost")]
    ConnectionLost,
    #[error("reconciliation needs more than {0} coded symbols")]
    TooManySymbols(u64),
    /// The peer's coded symbols cannot be a set difference.
    #[error("bad coded symbols: {0}")]
    Symbols(#[from] riblt::DecodeError),
    #[error(transparent)]
    Wire(#[from] WireError),
    /// An authorized session was refused (by this side or the peer), with the reason.
    #[error("session refused: {0}")]
    Refused(crate::refusal::Refusal),
    /// A signed replica refused a forged, altered, unsigned or unauthorized version.
    #[error("refused version: {0}")]
    Signature(#[from] crate::signing::SignatureError),
}

impl SyncError {
    /// The reason as it travels in `Body::Abort`.
    pub fn code(&self) -> crate::refusal::AbortCode {
        use crate::refusal::AbortCode;
        match self {
            SyncError::Timeout(_) | SyncError::ConnectionLost => AbortCode::Timeout,
            SyncError::Protocol(_) => AbortCode::Protocol,
            SyncError::Aborted(code) => *code,
            SyncError::TooManySymbols(_) => AbortCode::TooManySymbols,
            SyncError::Symbols(_) => AbortCode::Symbols,
            SyncError::Wire(_) => AbortCode::Wire,
            SyncError::Refused(_) => AbortCode::Refused,
            SyncError::Signature(_) => AbortCode::Signature,
        }
    }
}

/// What a caller keeps per peer between sessions (from the initiator's point of view).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Retained {
    /// How far I have the peer's log.
    pub peer_log: Option<Cursor>,
    /// How far the peer has acknowledged mine.
    pub acked: Option<Cursor>,
}

/// Counters of one session, for reports and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub retransmissions: u64,
    /// Encoded bytes of the items sent.
    pub payload_bytes_sent: u64,
    pub items_sent: u64,
    pub items_received: u64,
    pub items_changed: u64,
    pub symbols_sent: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Running,
    /// Finished. `retained` is what to keep for the next session with this peer (meaningful for
    /// the initiator; the responder learns only `peer_log`). `digests_equal` is false only when a
    /// replica changed during the session.
    Done {
        retained: Retained,
        digests_equal: bool,
    },
    Failed(SyncError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Role {
    Initiator,
    Responder,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Phase {
    /// Waiting for the peer's next message.
    Waiting,
    /// Sent the last message; answering duplicates until the linger deadline.
    Lingering,
    Finished,
}

/// One sync session.
/// `Clone` forks a session with its whole state (the model checker explores both branches).
#[derive(Clone, Debug)]
pub struct Session {
    role: Role,
    id: u64,
    cfg: Config,
    /// Step of my next message; the peer's next is `next_step` - 1 + 2 = `next_step` + 1 ... see
    /// `expect`.
    next_step: u32,
    expect: u32,
    last_sent: Option<Vec<u8>>,
    phase: Phase,
    deadline: Option<Micros>,
    retries: u32,
    transmit: VecDeque<Vec<u8>>,
    /// My (fingerprint, id) set when reconciliation started, sorted by fingerprint.
    snapshot: Vec<(Fingerprint, crate::feedsync::ItemId)>,
    decoder: Decoder,
    /// My symbol stream (initiator: what I send; responder: what I subtract).
    encoder: riblt::Encoder,
    symbols_sent: u64,
    /// Items I still have to send, as ids (the current version is sent).
    outbox: VecDeque<crate::feedsync::ItemId>,
    /// Whether my outbox is the last thing I send (responder: then `Done` follows the peer's).
    my_log_at_start: Cursor,
    peer_log: Option<Cursor>,
    acked: Option<Cursor>,
    /// Responder: fingerprints of what the initiator pushed or announced, sorted (not echoed
    /// back).
    pushed: Vec<Fingerprint>,
    /// Initiator: the changes announced by fingerprint in `Hello`, sorted, to answer `want`.
    announced: Vec<(Fingerprint, crate::feedsync::ItemId)>,
    /// Responder: announced fingerprints it lacks, for the first `Changes`.
    want: Vec<Fingerprint>,
    /// Responder (incremental): it asked for items, so the initiator's `Items` come before `Done`.
    awaiting_items: bool,
    /// Initiator: the responder's items are all in; now sending mine.
    sending_mine: bool,
    /// Responder: my log position when I fixed what to send (a snapshot for reconciliation, or
    /// the changes for the incremental path). The peer's cursor must not pass it: changes after
    /// it were not sent.
    served_log: Option<Cursor>,
    /// `stats.items_changed` when `served_log` was fixed.
    changed_at_serve: u64,
    /// Incremental path: the peer's cursor of my log. Items then go as the versions the peer
    /// lacks ([`Replica::item_since`]): a hot item holds a conflict per concurrent writer, and
    /// sending all of them in every session made its cost grow with every update.
    delta_since: Option<Seq>,
    /// Ranges `(from, to]` of my log made by merging the peer's items in this session: the
    /// versions they brought are the peer's, not sent back. Coalesced; at most
    /// [`BROUGHT_RANGES_MAX`] (past it, more is sent back, never less).
    brought: Vec<(Seq, Seq)>,
    /// The versions the peer said it holds (responder: the `Hello`'s `held`; initiator: the
    /// `held` of `Changes` or `Diff`), sorted and deduplicated: left out of the items I send
    /// ([`Replica::item_since`]).
    held: Vec<u64>,
    /// Responder (incremental): of the initiator's `held`, the versions I hold too, sent with my
    /// `want` in the first `Changes`.
    held_back: Vec<u64>,
    /// Initiator: how many versions my `Hello` named as held (the most `Changes::held` may).
    held_sent: usize,
    /// My chunks (`Changes`, `Diff`, `Items` saying `more`) the peer has not answered with
    /// `Continue` yet: at most `1 + Config::send_ahead`.
    unanswered: u32,
    /// Whether my last chunk said `more` (my part goes on).
    streaming: bool,
    /// My part ended with chunks sent ahead still unanswered: I linger once they are answered
    /// (ending before would drop the stream the peer still writes those `Continue`s on).
    linger_when_answered: bool,
    stats: Stats,
    outcome: Outcome,
}

impl Session {
    /// Feeds the session's state to `h` for a model checker (`proofs/src/model.rs`): everything a
    /// later step can depend on, and nothing else. Left out: the configuration (fixed for the
    /// session's life) and the counters no decision reads (`Stats` but `items_changed`). Times
    /// are hashed relative to `now`, the caller's clock, so that two states that differ only by a
    /// shift of time are one state (the session compares times only with each other).
    pub fn hash_state<H: std::hash::Hasher>(&self, now: Micros, h: &mut H) {
        use std::hash::Hash;
        (self.role, self.id, self.next_step, self.expect, &self.last_sent, &self.phase).hash(h);
        self.deadline.map(|d| i128::from(d) - i128::from(now)).hash(h);
        (self.retries, &self.transmit, &self.snapshot, &self.decoder, &self.encoder).hash(h);
        (self.symbols_sent, &self.outbox, self.my_log_at_start, self.peer_log, self.acked).hash(h);
        (&self.pushed, &self.announced, &self.want, self.awaiting_items, self.sending_mine).hash(h);
        (self.served_log, self.changed_at_serve, self.stats.items_changed).hash(h);
        (self.delta_since, &self.brought, &self.held, &self.held_back, self.held_sent).hash(h);
        (self.unanswered, self.streaming, self.linger_when_answered).hash(h);
        hash_outcome(&self.outcome, h);
    }
}

/// Hashes an outcome (for [`Session::hash_state`]): its description, which names every field.
pub(crate) fn hash_outcome<H: std::hash::Hasher>(outcome: &Outcome, h: &mut H) {
    use std::hash::Hash;
    match outcome {
        Outcome::Running => 0u8.hash(h),
        other => format!("{other:?}").hash(h),
    }
}

impl Session {
    fn new(role: Role, id: u64, cfg: Config, replica: &Replica) -> Self {
        let (next_step, expect) = match role {
            Role::Initiator => (0, 1),
            Role::Responder => (1, 0),
        };
        Self {
            role,
            id,
            cfg,
            next_step,
            expect,
            last_sent: None,
            phase: Phase::Waiting,
            deadline: None,
            retries: 0,
            transmit: VecDeque::new(),
            snapshot: Vec::new(),
            decoder: Decoder::new(),
            encoder: riblt::Encoder::default(),
            symbols_sent: 0,
            outbox: VecDeque::new(),
            my_log_at_start: replica.cursor(),
            peer_log: None,
            acked: None,
            pushed: Vec::new(),
            announced: Vec::new(),
            want: Vec::new(),
            awaiting_items: false,
            sending_mine: false,
            served_log: None,
            changed_at_serve: 0,
            delta_since: None,
            brought: Vec::new(),
            held: Vec::new(),
            held_back: Vec::new(),
            held_sent: 0,
            unanswered: 0,
            streaming: false,
            linger_when_answered: false,
            stats: Stats::default(),
            outcome: Outcome::Running,
        }
    }

    /// Starts a session as the initiator. `retained` is what this side kept from the last
    /// session with the peer; with both cursors (and the same epoch), the incremental path.
    pub fn initiate(id: u64, now: Micros, replica: &Replica, cfg: Config, retained: Retained) -> Self {
        let mut s = Self::new(Role::Initiator, id, cfg, replica);
        let mine = replica.cursor();
        let incremental = match (retained.peer_log, retained.acked) {
            (Some(_), Some(acked)) => acked.epoch == mine.epoch && acked.seq <= mine.seq,
            _ => false,
        };
        let mut push = None;
        let mut symbols = Vec::new();
        let mut held = Vec::new();
        if incremental {
            // My own changes go as items (the peer can hardly have them); what I merged from
            // others is announced by fingerprint, and the peer asks for what it lacks.
            let from = retained.acked.map(|c| c.seq).unwrap_or_default();
            let mut items = Vec::new();
            let mut have = Vec::new();
            for change in replica.log_since(from) {
                if change.local {
                    // The versions the peer lacks: a local change brought at least one. Of an
                    // item with conflicts only what the change itself brought goes inline; the
                    // versions merged from others before it are announced like merged changes
                    // (the peer most likely has them already; it asks for the item if not).
                    let id = change.item.id();
                    let merged_before = replica.item_since(id, from, &[], &[]).zip(replica.item_since(
                        id,
                        Seq(change.seq.0 - 1),
                        &[],
                        &[],
                    ));
                    match merged_before {
                        Some((all, own))
                            if !Arc::ptr_eq(&all, &own) && all.conflicts.len() > own.conflicts.len() =>
                        {
                            items.push(wire::to_wire(&own));
                            have.push(Fixed64::from(change.fp));
                            s.announced.push((change.fp, id.clone()));
                            held.extend(replica.held_since(id, from).map(Fixed64::from));
                        }
                        Some((all, _)) => items.push(wire::to_wire(&all)),
                        None => {
                            if let Some(item) = replica.item_since(id, from, &[], &[]) {
                                items.push(wire::to_wire(&item));
                            }
                        }
                    }
                } else {
                    have.push(Fixed64::from(change.fp));
                    s.announced.push((change.fp, change.item.id().clone()));
                    held.extend(replica.held_since(change.item.id(), from).map(Fixed64::from));
                }
            }
            let bytes: usize = items.iter().map(wire::encoded_len).sum();
            if bytes + have.len() * 8 + 256 <= s.cfg.max_message_bytes {
                // `held` only saves the peer bytes: what does not fit is left out.
                let room = ((s.cfg.max_message_bytes - bytes - have.len() * 8 - 256) / 9).min(HELD_MAX);
                held.truncate(room);
                s.stats.payload_bytes_sent += bytes as u64;
                s.stats.items_sent += items.len() as u64;
                s.announced.sort_unstable_by_key(|(fp, _)| *fp);
                s.delta_since = Some(from);
                s.held_sent = held.len();
                push = Some(Push { epoch: mine.epoch, from: from.0, items, have });
            } else {
                s.announced.clear();
                held.clear();
            }
        }
        if push.is_none() {
            s.take_snapshot(replica);
            symbols = s.next_symbols(s.cfg.initial_symbols);
            // Full reconciliation: every version of my items with conflicts, as far as they fit.
            let room = (s.cfg.max_message_bytes.saturating_sub(256 + symbols.len() * 24) / 9).min(HELD_MAX);
            held = replica.held_versions().take(room).map(Fixed64::from).collect();
            s.held_sent = held.len();
        }
        let body = Body::Hello {
            log: wire_cursor(mine),
            count: replica.len() as u64,
            digest: replica.digest().into(),
            cursor: if push.is_some() { retained.peer_log.map(wire_cursor) } else { None },
            push,
            symbols,
            held,
        };
        s.send(now, body);
        s
    }

    /// A responder session, made when the first message of a new session arrives (then pass that
    /// message to [`Session::handle_message`]).
    pub fn respond(id: u64, replica: &Replica, cfg: Config) -> Self {
        Self::new(Role::Responder, id, cfg, replica)
    }

    /// The session id a message belongs to (for routing), if it decodes.
    pub fn session_of(bytes: &[u8], max_bytes: usize) -> Result<u64, WireError> {
        wire::decode(bytes, max_bytes).map(|m| m.session)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// When to call [`Session::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Micros> {
        match self.phase {
            Phase::Finished => None,
            _ => self.deadline,
        }
    }

    pub fn handle_timeout(&mut self, now: Micros) {
        let Some(deadline) = self.deadline else { return };
        if now < deadline {
            return;
        }
        match self.phase {
            Phase::Finished => {}
            Phase::Lingering => {
                self.phase = Phase::Finished;
                self.deadline = None;
            }
            Phase::Waiting => {
                if self.retries >= self.cfg.max_retries {
                    self.fail(SyncError::Timeout(self.retries));
                    return;
                }
                self.retries += 1;
                if let Some(last) = self.last_sent.clone() {
                    self.stats.retransmissions += 1;
                    self.stats.bytes_sent += last.len() as u64;
                    self.transmit.push_back(last);
                }
                self.deadline = Some(
                    now + (self.cfg.rto_us << self.retries.min(16))
                        .min(self.cfg.rto_max_us.max(self.cfg.rto_us)),
                );
            }
        }
    }

    /// Handles a message from the peer. An error is returned for bytes that do not decode or
    /// break the protocol; the replica is never left half-changed by a bad message.
    pub fn handle_message(
        &mut self,
        now: Micros,
        replica: &mut Replica,
        bytes: &[u8],
    ) -> Result<(), SyncError> {
        let message = wire::decode(bytes, self.cfg.max_message_bytes)?;
        if message.session != self.id || message.version != WIRE_VERSION {
            return Ok(());
        }
        if self.phase == Phase::Finished {
            return Ok(());
        }
        if message.step != self.expect {
            // The peer repeated its previous message: our answer was lost. Send it again.
            if message.step.wrapping_add(2) == self.expect {
                if let Some(last) = self.last_sent.clone() {
                    self.stats.retransmissions += 1;
                    self.stats.bytes_sent += last.len() as u64;
                    self.transmit.push_back(last);
                }
            }
            return Ok(());
        }
        if self.phase == Phase::Lingering {
            return Ok(());
        }
        self.expect += 2;
        self.retries = 0;
        let result = match self.role {
            Role::Initiator => self.initiator(now, replica, message.body),
            Role::Responder => self.responder(now, replica, message.body),
        };
        if result.is_ok() {
            self.send_ahead(now, replica);
        }
        if let Err(err) = &result {
            self.send(now, Body::Abort { reason: err.code() });
            self.fail(err.clone());
        }
        result
    }

    fn initiator(&mut self, now: Micros, replica: &mut Replica, body: Body) -> Result<(), SyncError> {
        match body {
            Body::Changes { log, items, more, want, held } => {
                self.merge_all(replica, &items)?;
                self.peer_log = Some(cursor(log));
                if want.len() > self.announced.len() {
                    return Err(SyncError::Protocol("peer wants more than we announced".into()));
                }
                if held.len() > self.held_sent {
                    return Err(SyncError::Protocol("peer holds more versions than we named".into()));
                }
                if !held.is_empty() {
                    // What the wanted items leave out (the peer holds those versions).
                    self.held = held.into_iter().map(u64::from).collect();
                    self.held.sort_unstable();
                    self.held.dedup();
                }
                for fp in want {
                    let fp = u64::from(fp);
                    match self.announced.binary_search_by_key(&fp, |(f, _)| *f) {
                        Ok(i) => self.outbox.push_back(self.announced[i].1.clone()),
                        Err(_) => {
                            return Err(SyncError::Protocol(
                                "peer wants a fingerprint we did not announce".into(),
                            ))
                        }
                    }
                }
                if more {
                    self.send(now, Body::Continue);
                } else if !self.outbox.is_empty() {
                    // The peer lacked some announced changes: send them; it closes with `Done`.
                    self.sending_mine = true;
                    self.send_chunk(now, replica);
                } else {
                    self.acked = Some(self.acknowledged(replica));
                    self.finish(replica, None);
                }
            }
            Body::More { upto } => {
                if upto > self.cfg.max_symbols {
                    return Err(SyncError::TooManySymbols(upto));
                }
                if self.snapshot.is_empty() && self.symbols_sent == 0 {
                    self.take_snapshot(replica);
                }
                let want = upto.saturating_sub(self.symbols_sent);
                let from = self.symbols_sent;
                let symbols = self.next_symbols(want);
                self.send(now, Body::Symbols { from, symbols });
            }
            Body::Diff { log, want, items, more, held } => {
                self.merge_all(replica, &items)?;
                self.peer_log = Some(cursor(log));
                if held.len() > self.cfg.max_message_bytes / 8 {
                    return Err(SyncError::Protocol("more held versions than a message holds".into()));
                }
                self.held = held.into_iter().map(u64::from).collect();
                self.held.sort_unstable();
                self.held.dedup();
                let mut ids = Vec::with_capacity(want.len());
                for fp in want {
                    let fp = u64::from(fp);
                    match self.snapshot_id(fp) {
                        Some(id) => ids.push(id),
                        None => {
                            return Err(SyncError::Protocol("peer wants a fingerprint we do not have".into()))
                        }
                    }
                }
                self.queue_in_log_order(replica, ids);
                if more {
                    self.send(now, Body::Continue);
                } else {
                    self.sending_mine = true;
                    self.send_chunk(now, replica);
                }
            }
            Body::Items { items, more } => {
                if self.sending_mine {
                    return Err(SyncError::Protocol("items while we are sending ours".into()));
                }
                self.merge_all(replica, &items)?;
                if more {
                    self.send(now, Body::Continue);
                } else {
                    self.sending_mine = true;
                    self.send_chunk(now, replica);
                }
            }
            Body::Continue => {
                if !self.sending_mine || !self.answered(now) {
                    return Err(SyncError::Protocol("continue out of turn".into()));
                }
                if self.streaming {
                    self.send_chunk(now, replica);
                }
            }
            Body::Done { log, digest } => {
                self.peer_log = Some(cursor(log));
                self.acked = Some(self.acknowledged(replica));
                self.finish(replica, Some(u64::from(digest)));
            }
            Body::Abort { reason } => self.fail(SyncError::Aborted(reason)),
            other => return Err(SyncError::Protocol(format!("initiator got {}", other.kind()))),
        }
        Ok(())
    }

    fn responder(&mut self, now: Micros, replica: &mut Replica, body: Body) -> Result<(), SyncError> {
        match body {
            Body::Hello { log, count, digest, cursor: their_cursor, push, symbols, held } => {
                // Bounded by the message's size already; named here too (it is sorted below).
                if held.len() > self.cfg.max_message_bytes / 8 {
                    return Err(SyncError::Protocol("more held versions than a message holds".into()));
                }
                let mut held: Vec<u64> = held.into_iter().map(u64::from).collect();
                held.sort_unstable();
                held.dedup();
                let initiator_log = cursor(log);
                self.peer_log = Some(initiator_log);
                // The initiator's changes since our acknowledgement. We acknowledged them in this
                // epoch of ours (its cursor of our log says so), and a replica that loses state
                // changes epoch, so we still have everything before `from`.
                let mine = replica.cursor();
                let same_epoch = their_cursor.is_some_and(|c| c.epoch == mine.epoch && c.seq <= mine.seq.0);
                let mut push_ok = false;
                let mut announced = Vec::new();
                let pushed = push.is_some();
                if let Some(push) = push {
                    push_ok = push.epoch == initiator_log.epoch && same_epoch;
                    let items = decode_items(&push.items)?;
                    self.pushed = items.iter().map(|i| crate::replica::fingerprint(i)).collect();
                    self.merge_items(replica, items)?;
                    announced = push.have.into_iter().map(u64::from).collect();
                }
                let mine = replica.cursor();
                let serve = their_cursor.map(cursor).filter(|c| c.epoch == mine.epoch && c.seq <= mine.seq);
                if let (true, Some(since)) = (push_ok, serve) {
                    self.served_log = Some(replica.cursor());
                    self.changed_at_serve = self.stats.items_changed;
                    self.want = announced
                        .iter()
                        .copied()
                        .filter(|&fp| replica.by_fingerprint(fp).is_none())
                        .collect();
                    self.want.sort_unstable();
                    self.want.dedup();
                    self.awaiting_items = !self.want.is_empty();
                    self.delta_since = Some(since.seq);
                    // Of the named versions, those I hold, for the initiator to leave out of the
                    // items I want (a hot item's state never matches by fingerprint).
                    if !self.want.is_empty() {
                        self.held_back = held.iter().copied().filter(|&h| replica.holds_version(h)).collect();
                    }
                    self.held = held;
                    self.pushed.extend(announced);
                    self.pushed.sort_unstable();
                    let skip = usize::from(self.cfg.planted_bug == Some(PlantedBug::CursorSkipsOneChange));
                    for change in replica.log_since(since.seq).skip(skip) {
                        if self.pushed.binary_search(&change.fp).is_err() {
                            self.outbox.push_back(change.item.id().clone());
                        }
                    }
                    self.send_changes(now, replica);
                    return Ok(());
                }
                if u64::from(digest) == replica.digest() {
                    self.send_done(now, replica);
                    return Ok(());
                }
                if count == 0 && !pushed {
                    // The initiator holds nothing (a new device): the difference is all of ours,
                    // known without decoding symbols (with 10^5 items that is about 1.4 * 10^5
                    // symbols and a dozen round trips). A peer that says 0 but holds items only
                    // gets ours now and sends its own in a later session.
                    // What is served is the log as of now: `Done` must not report a later
                    // position, or the initiator's cursor would pass changes merged from other
                    // sessions meanwhile that it never got (found by the swarm, seed 89).
                    self.served_log = Some(replica.cursor());
                    self.changed_at_serve = self.stats.items_changed;
                    let ids: Vec<crate::feedsync::ItemId> =
                        replica.log_since(Seq(0)).map(|c| c.item.id().clone()).collect();
                    self.send_diff(now, replica, Vec::new(), ids)?;
                    return Ok(());
                }
                // Full reconciliation: the initiator's versions of its items with conflicts are
                // left out of the items I send it.
                self.held = held;
                self.take_snapshot(replica);
                self.absorb_symbols(now, replica, 0, &symbols)?;
            }
            Body::Symbols { from, symbols } => self.absorb_symbols(now, replica, from, &symbols)?,
            Body::Continue => {
                if !self.answered(now) {
                    return Err(SyncError::Protocol("continue with nothing to send".into()));
                }
                if self.sending_mine && self.streaming {
                    self.send_changes_or_items(now, replica);
                }
            }
            Body::Items { items, more } => {
                self.merge_all(replica, &items)?;
                if more {
                    self.send(now, Body::Continue);
                } else {
                    self.send_done(now, replica);
                }
            }
            Body::Abort { reason } => self.fail(SyncError::Aborted(reason)),
            other => return Err(SyncError::Protocol(format!("responder got {}", other.kind()))),
        }
        Ok(())
    }

    /// Responder: add the initiator's symbols starting at `from`; answer `Diff` or `More`.
    fn absorb_symbols(
        &mut self,
        now: Micros,
        replica: &Replica,
        from: u64,
        symbols: &[WireSymbol],
    ) -> Result<(), SyncError> {
        if from != self.decoder.len() {
            return Err(SyncError::Protocol(format!("symbols from {from}, expected {}", self.decoder.len())));
        }
        let total = from + symbols.len() as u64;
        if total > self.cfg.max_symbols {
            return Err(SyncError::TooManySymbols(total));
        }
        let remote: Vec<Symbol> = symbols.iter().map(|s| Symbol::from(*s)).collect();
        let local = self.encoder.next_symbols(remote.len());
        let decoded = !remote.is_empty() && self.decoder.add(&remote, &local)?;
        if !decoded {
            // Double while small, then grow by half: the stream is never wasted, but what is sent
            // past the decoding point is.
            let step = if total < 64 { total.max(self.cfg.initial_symbols / 2).max(1) } else { total / 2 };
            let upto = (total + step).min(self.cfg.max_symbols);
            if upto <= total {
                return Err(SyncError::TooManySymbols(total));
            }
            self.send(now, Body::More { upto });
            return Ok(());
        }
        let difference = self.decoder.difference().clone();
        let want: Vec<Fixed64> = difference.remote.iter().map(|&fp| Fixed64::from(fp)).collect();
        let ids = difference.local.iter().filter_map(|fp| self.snapshot_id(*fp)).collect();
        self.send_diff(now, replica, want, ids)
    }

    /// Responder: `Diff` with the fingerprints wanted from the initiator and the first chunk of
    /// `ids` (ours it lacks), the rest queued.
    fn send_diff(
        &mut self,
        now: Micros,
        replica: &Replica,
        want: Vec<Fixed64>,
        ids: Vec<crate::feedsync::ItemId>,
    ) -> Result<(), SyncError> {
        if want.len() * 9 + 256 > self.cfg.max_message_bytes {
            return Err(SyncError::Protocol("difference too large for one message".into()));
        }
        // The versions of my items with conflicts that go to the initiator: it leaves them out
        // of the items I want (a hot item differs on both sides, each holding most versions).
        let room = (self.cfg.max_message_bytes.saturating_sub(want.len() * 9 + 256) / 18).min(HELD_MAX);
        let mut held = Vec::new();
        for id in &ids {
            if held.len() >= room {
                break;
            }
            held.extend(replica.held_since(id, Seq(0)).take(room - held.len()).map(Fixed64::from));
        }
        self.queue_in_log_order(replica, ids);
        let budget = self.cfg.max_message_bytes.saturating_sub(want.len() * 9 + held.len() * 9 + 256);
        let items = self.take_chunk(replica, budget);
        let more = !self.outbox.is_empty();
        self.sending_mine = more;
        let log = wire_cursor(self.served_log.unwrap_or(replica.cursor()));
        self.send(now, Body::Diff { log, want, items, more, held });
        Ok(())
    }

    fn send_changes(&mut self, now: Micros, replica: &Replica) {
        self.sending_mine = true;
        self.send_changes_or_items(now, replica);
    }

    /// Responder: the next chunk of `Changes` (incremental) or `Items` (after `Diff`).
    fn send_changes_or_items(&mut self, now: Micros, replica: &Replica) {
        let incremental = self.snapshot.is_empty() && self.decoder.is_empty();
        let want: Vec<Fixed64> = std::mem::take(&mut self.want).into_iter().map(Fixed64::from).collect();
        let held: Vec<Fixed64> = std::mem::take(&mut self.held_back).into_iter().map(Fixed64::from).collect();
        let budget = self.cfg.max_message_bytes.saturating_sub(256 + want.len() * 9 + held.len() * 9);
        let items = self.take_chunk(replica, budget);
        let more = !self.outbox.is_empty();
        if incremental {
            let log = wire_cursor(self.served_log.unwrap_or(replica.cursor()));
            self.send(now, Body::Changes { log, items, more, want, held });
            if !more && !self.awaiting_items {
                self.linger(now);
            }
        } else {
            self.sending_mine = more;
            self.send(now, Body::Items { items, more });
        }
    }

    /// Initiator: the next chunk of my items.
    fn send_chunk(&mut self, now: Micros, replica: &Replica) {
        let items = self.take_chunk(replica, self.cfg.max_message_bytes.saturating_sub(256));
        let more = !self.outbox.is_empty();
        self.send(now, Body::Items { items, more });
    }

    /// A `Continue` came: one chunk fewer unanswered. False when none was (out of turn). One
    /// that answers a chunk sent ahead asks for nothing new once my part has ended; the peer is
    /// alive, so my timer starts again.
    fn answered(&mut self, now: Micros) -> bool {
        if self.unanswered == 0 {
            return false;
        }
        self.unanswered -= 1;
        if self.unanswered == 0 && self.linger_when_answered {
            self.linger_when_answered = false;
            self.linger(now);
        } else if !self.streaming {
            self.deadline = Some(now + self.cfg.rto_us);
        }
        true
    }

    /// While my part goes on and fewer than `1 + send_ahead` chunks are unanswered, the next
    /// chunk now (a `Continue` for it would only ask for it). Bound: each chunk sent saying
    /// `more` takes one of the `1 + send_ahead` places; the last one ends the part.
    fn send_ahead(&mut self, now: Micros, replica: &Replica) {
        while self.streaming
            && self.unanswered <= self.cfg.send_ahead
            && self.phase == Phase::Waiting
            && self.outcome == Outcome::Running
        {
            let before = self.unanswered;
            match self.role {
                Role::Initiator if self.sending_mine => self.send_chunk(now, replica),
                Role::Responder if self.sending_mine => self.send_changes_or_items(now, replica),
                _ => return,
            }
            if self.unanswered == before && self.streaming {
                return; // No progress (cannot happen: a chunk saying `more` counts).
            }
        }
    }

    fn send_done(&mut self, now: Micros, replica: &Replica) {
        // Past what was served when every change since came from this session's merges of the
        // initiator's items: the initiator has those (it sent them after merging what I sent), so
        // its next session must not have them echoed back.
        let served = match self.served_log {
            None => replica.cursor(),
            Some(at) => {
                let now = replica.cursor();
                let mine = self.stats.items_changed - self.changed_at_serve;
                if now.epoch == at.epoch && now.seq.0 - at.seq.0 == mine {
                    now
                } else {
                    at
                }
            }
        };
        let log = wire_cursor(served);
        self.send(now, Body::Done { log, digest: replica.digest().into() });
        self.linger(now);
    }

    fn linger(&mut self, now: Micros) {
        if self.unanswered > 0 {
            // Chunks sent ahead are still to be answered: the peer is writing to me yet.
            self.linger_when_answered = true;
            return;
        }
        self.phase = Phase::Lingering;
        self.deadline = Some(now + self.cfg.linger_us);
        // A responder whose whole part was one reply to the Hello need not linger when its caller
        // opens a new responder for a repeated Hello (`linger_after_hello` off): the Hello is
        // idempotent, so the new responder answers it just as well. Only replies to later steps
        // must be repeatable. (The common case: a busy cloud would otherwise hold one lingering
        // session per device per sync interval.)
        if self.role == Role::Responder && self.expect == 2 && !self.cfg.linger_after_hello {
            self.phase = Phase::Finished;
            self.deadline = None;
        }
        // Only the last message is needed from here on (to answer duplicates): free the rest, as
        // a busy responder may linger in thousands of sessions at once.
        self.snapshot = Vec::new();
        self.decoder = Decoder::new();
        self.encoder = riblt::Encoder::default();
        self.outbox = VecDeque::new();
        self.pushed = Vec::new();
        self.announced = Vec::new();
        self.want = Vec::new();
        let retained = Retained { peer_log: self.peer_log, acked: None };
        self.outcome = Outcome::Done { retained, digests_equal: true };
    }

    /// How far the peer now has my log: my head when the session started, or my head now when
    /// every change since then came from this session (the peer has those: it sent them, or
    /// merged my version of them too). Without this, the next session would push back everything
    /// the peer just sent.
    fn acknowledged(&self, replica: &Replica) -> Cursor {
        let now = replica.cursor();
        let start = self.my_log_at_start;
        if now.epoch == start.epoch && now.seq.0 - start.seq.0 == self.stats.items_changed {
            now
        } else {
            start
        }
    }

    fn finish(&mut self, replica: &Replica, peer_digest: Option<u64>) {
        self.phase = Phase::Finished;
        self.deadline = None;
        let digests_equal = peer_digest.is_none_or(|d| d == replica.digest());
        self.outcome = Outcome::Done {
            retained: Retained { peer_log: self.peer_log, acked: self.acked },
            digests_equal,
        };
    }

    /// The transport lost the stream the session ran on: a running session ends now as failed
    /// with [`SyncError::ConnectionLost`], and one that already has its outcome stops lingering.
    pub fn connection_lost(&mut self) {
        if matches!(self.outcome, Outcome::Running) {
            self.fail(SyncError::ConnectionLost);
        }
        self.phase = Phase::Finished;
        self.deadline = None;
    }

    fn fail(&mut self, err: SyncError) {
        self.phase = Phase::Finished;
        self.deadline = None;
        self.outcome = Outcome::Failed(err);
    }

    /// Queues `ids` to send in the order of my change log, not the reconciliation's (fingerprint)
    /// order: the versions of one bulk write are neighbours there, so they travel together and a
    /// receiver checks their batch signature once per message, not once per version.
    fn queue_in_log_order(&mut self, replica: &Replica, ids: Vec<crate::feedsync::ItemId>) {
        let mut ids: Vec<(Seq, crate::feedsync::ItemId)> =
            ids.into_iter().map(|id| (replica.seq_of(&id).unwrap_or_default(), id)).collect();
        ids.sort_unstable();
        self.outbox.extend(ids.into_iter().map(|(_, id)| id));
    }

    /// Items from the outbox, up to `budget` encoded bytes. The first item goes even past the
    /// budget when the budget is the whole message's, since it could never go otherwise (items
    /// are bounded by `ITEM_ENCODED_MAX` so that this cannot happen with the default limits);
    /// under a smaller budget (a message that also carries wants) it waits for the next chunk.
    fn take_chunk(&mut self, replica: &Replica, budget: usize) -> Vec<WireItem> {
        let mut items = Vec::new();
        let mut used = 0usize;
        let whole = self.cfg.max_message_bytes.saturating_sub(256);
        while let Some(id) = self.outbox.front() {
            let item = match self.delta_since {
                Some(since) => replica.item_since(id, since, &self.brought, &self.held),
                None if !self.held.is_empty() => replica.item_since(id, Seq(0), &[], &self.held),
                None => replica.item(id).cloned(),
            };
            let Some(item) = item else {
                self.outbox.pop_front();
                continue;
            };
            let wire_item = wire::to_wire(&item);
            let len = wire::encoded_len(&wire_item);
            if used + len > budget && (!items.is_empty() || budget < whole) {
                break;
            }
            used += len;
            self.outbox.pop_front();
            items.push(wire_item);
        }
        self.stats.payload_bytes_sent += used as u64;
        self.stats.items_sent += items.len() as u64;
        items
    }

    fn snapshot_id(&self, fp: Fingerprint) -> Option<crate::feedsync::ItemId> {
        self.snapshot.binary_search_by_key(&fp, |(f, _)| *f).ok().map(|i| self.snapshot[i].1.clone())
    }

    fn take_snapshot(&mut self, replica: &Replica) {
        self.snapshot = replica.fingerprinted().map(|(fp, id)| (fp, id.clone())).collect();
        self.snapshot.sort_unstable_by_key(|(fp, _)| *fp);
        self.encoder = riblt::Encoder::new(self.snapshot.iter().map(|(fp, _)| *fp));
        if self.role == Role::Responder {
            self.served_log = Some(replica.cursor());
            self.changed_at_serve = self.stats.items_changed;
        }
    }

    fn next_symbols(&mut self, count: u64) -> Vec<WireSymbol> {
        let per_message = (self.cfg.max_message_bytes.saturating_sub(256) / 16) as u64;
        let count = count.min(per_message).min(self.cfg.max_symbols.saturating_sub(self.symbols_sent));
        let symbols = self.encoder.next_symbols(count as usize);
        self.symbols_sent += count;
        self.stats.symbols_sent += count;
        symbols.into_iter().map(WireSymbol::from).collect()
    }

    fn merge_all(&mut self, replica: &mut Replica, items: &[WireItem]) -> Result<(), SyncError> {
        let items = decode_items(items)?;
        self.merge_items(replica, items)
    }

    fn merge_items(&mut self, replica: &mut Replica, items: Vec<Arc<Item>>) -> Result<(), SyncError> {
        // Every item of the message is checked before any is merged (all or nothing): the item
        // invariants (only for the versions this replica lacks: the rest passed them when they
        // entered), then, in a signed replica, the signatures.
        for item in &items {
            item.check_against(replica.item(item.id()).map(|i| i.as_ref()))
                .map_err(|e| SyncError::Wire(WireError::Item(e.to_string())))?;
        }
        replica.check_incoming_all(&items, self.cfg.verify_threads)?;
        let from = replica.head();
        let result = self.merge_checked_all(replica, items);
        let to = replica.head();
        if to > from {
            let n = self.brought.len();
            match self.brought.last_mut() {
                Some(last) if last.1 == from => last.1 = to,
                _ if n < BROUGHT_RANGES_MAX => self.brought.push((from, to)),
                _ => {}
            }
        }
        result
    }

    fn merge_checked_all(&mut self, replica: &mut Replica, items: Vec<Arc<Item>>) -> Result<(), SyncError> {
        for item in items {
            self.stats.items_received += 1;
            if replica.merge_checked(&item).map_err(|e| SyncError::Protocol(e.to_string()))? {
                self.stats.items_changed += 1;
            }
        }
        Ok(())
    }

    fn send(&mut self, now: Micros, body: Body) {
        if let Body::Changes { more, .. } | Body::Diff { more, .. } | Body::Items { more, .. } = &body {
            self.unanswered += u32::from(*more);
            self.streaming = *more;
        }
        let message = Message { version: WIRE_VERSION, session: self.id, step: self.next_step, body };
        self.next_step += 2;
        let bytes = wire::encode(&message);
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        self.transmit.push_back(bytes.clone());
        self.last_sent = Some(bytes);
        self.deadline = Some(now + self.cfg.rto_us);
    }
}

/// Most ranges a session keeps of what the peer's items brought ([`Session`]'s `brought`): one
/// per message merged, coalesced when nothing else changed the log between them.
const BROUGHT_RANGES_MAX: usize = 64;

/// Decodes the items of a message (their structure: ids, endpoints, times). The item checks
/// come in `merge_items`, against what the replica holds, before any item is merged.
fn decode_items(items: &[WireItem]) -> Result<Vec<Arc<Item>>, SyncError> {
    // One message's items share their endpoints and scopes (mostly one folder, few writers).
    let mut shared = wire::Interner::default();
    items
        .iter()
        .map(|w| wire::from_wire_structure_in(w, &mut shared).map(Arc::new).map_err(SyncError::from))
        .collect()
}

fn wire_cursor(c: Cursor) -> WireCursor {
    WireCursor { epoch: c.epoch, seq: c.seq.0 }
}

fn cursor(c: WireCursor) -> Cursor {
    Cursor { epoch: c.epoch, seq: Seq(c.seq) }
}

/// Most versions a `Hello` or `Diff` names as held (`Body::Hello::held`, 8 bytes each; a
/// message's room bounds it too): a hot item holds a conflict per concurrent writer.
const HELD_MAX: usize = 4096;

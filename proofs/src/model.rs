//! The authorized sync protocol, model-checked with `stateright` on the engine's own state
//! machines (issue 15, item 4).
//!
//! Nothing here re-implements the protocol: every step of the model calls the engine's
//! [`AuthSession`] (directory catch-up, tickets, then the feed [`engine::sync::Session`] with its
//! epochs, cursors, retransmission and fingerprint path) on real signed replicas and a real signed
//! directory. The model adds only what the real world adds around it: an asynchronous network
//! that holds every message in flight as a multiset (so any delivery order), loses, duplicates and
//! corrupts them within budgets; a clock per device whose timers fire at any moment (so any
//! interleaving of timeouts, retransmissions and deliveries; under fair delivery they fire in
//! deadline order and only while nothing is in flight); local writes at any moment, during
//! sessions too; and a device that starts its next session with what it retained from the last
//! one (so the incremental path with cursors runs). A state is identified by the directories'
//! digests, the replicas' digests and logs, the sessions' own `hash_state` (times relative to the
//! device's clock) and the messages in flight.
//! See `proofs/README.md` for the bounds, the state counts, and how each property maps to code;
//! `proofs/tests/model.rs` runs the small bounds in the default suite, the `feedmesh-model`
//! binary any bound.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use engine::authz::{AuthSession, Credentials, Policy};
use engine::directory::{
    pair_new_device, pairing_commitment, short_code, Directory, FolderId, Op, Role, UserId,
};
use engine::feedsync::{Content, Edit, ItemId, When};
use engine::replica::Replica;
use engine::signing::{DeviceId, DeviceKey};
use engine::sync::{Config, Micros, Outcome, Retained};
use engine::ticket::{ChannelKey, TicketAuthority};
use stateright::{Checker, Model, Property};

const T0: Micros = 1_000_000_000_000;

fn key(n: u8) -> DeviceKey {
    DeviceKey::from_bytes(&[n; 32])
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

fn when(secs: i64) -> When {
    When::from_unix_secs(1_700_000_000 + secs).unwrap()
}

/// Which world the model starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Two members (a1 of the owner, b1 of an invited user) whose directories each hold a change
    /// the other lacks, each with an item, each allowed local writes at any time.
    Members,
    /// c1, of a user who is not a member, starts a session with b1; both hold items.
    Outsider,
    /// a1's directory holds the owner's removal of Bob; b1 has not heard of it and starts a
    /// session with a1.
    Removed,
}

/// What the network may do beyond delivering.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub lose: u8,
    pub duplicate: u8,
    pub corrupt: u8,
    /// Timers that may fire while a message is still in flight (premature timeouts: the message
    /// was only slow). A timer fires freely while nothing is in flight.
    pub early_timers: u8,
    /// A timer fires only while no message is in flight (delivery is faster than any timeout):
    /// the fair-delivery model, under which sessions must end `Done` and replicas converge.
    pub timely: bool,
}

/// The model: its world, budgets and session limits.
#[allow(missing_debug_implementations)]
#[derive(Clone)]
pub struct ProtocolModel {
    variant: Variant,
    faults: Faults,
    /// Local writes each device may make (Members only).
    writes: u8,
    /// Sessions the initiator may start, one after the other.
    sessions: u8,
    pub cfg: Config,
    world: Arc<World>,
}

/// Keys, the folder and the directories the variants start from.
struct World {
    keys: [DeviceKey; 3],
    folder: FolderId,
    /// Per device: its directory at the start.
    dirs: [Directory; 2],
    policies: [Policy; 2],
    channels: [ChannelKey; 2],
    replicas: [Replica; 2],
}

impl World {
    fn new(variant: Variant) -> Self {
        let (a1, b1, c1, a2) = (key(1), key(3), key(4), key(2));
        let mut dir = Directory::new();
        dir.make(&a1, 1, Op::CreateUser { name: "alice".into() }).unwrap();
        dir.make(&b1, 2, Op::CreateUser { name: "bob".into() }).unwrap();
        dir.make(&c1, 3, Op::CreateUser { name: "carol".into() }).unwrap();
        let folder = dir.make(&a1, 5, Op::CreateFolder { name: "photos".into() }).unwrap().folder_id();
        let bob = UserId::of_first_device(DeviceId::of(&b1));
        let carol = UserId::of_first_device(DeviceId::of(&c1));
        let invite =
            dir.make(&a1, 6, Op::Invite { folder, invitee: bob, role: Role::Member }).unwrap().invite_id();
        dir.make(&b1, 7, Op::Accept { invitation: invite }).unwrap();
        for k in [&a1, &b1] {
            dir.make(k, 8, Op::Map { folder }).unwrap();
        }
        let mut cloud = TicketAuthority::new(key(200));
        let signed = |k: &DeviceKey, epoch: u64, id: &str| {
            let mut r = Replica::new_signed(epoch, folder.scope());
            r.change_signed(&ItemId::new(id).unwrap(), k, &when(epoch as i64), &edit(id)).unwrap();
            r
        };
        let (mut d0, mut d1) = (dir.clone(), dir.clone());
        let (k0, k1) = match variant {
            Variant::Members => {
                // Each side knows a change the other does not: the directory catch-up runs both ways.
                d0.make(&a1, 20, Op::Invite { folder, invitee: carol, role: Role::Member }).unwrap();
                let alice = UserId::of_first_device(DeviceId::of(&a1));
                pair_a2(&mut d1, &a1, &a2, alice);
                (a1.clone(), b1.clone())
            }
            Variant::Outsider => (c1.clone(), b1.clone()),
            Variant::Removed => {
                d1.make(&a1, 30, Op::RemoveMember { folder, user: bob }).unwrap();
                (b1.clone(), a1.clone())
            }
        };
        let policy = |cloud: &mut TicketAuthority, k: &DeviceKey| {
            let device = DeviceId::of(k);
            let ticket = cloud.issue_from(&dir, device, device.into(), T0);
            Policy::Directory(Box::new(Credentials { device, ticket, cloud: cloud.id() }))
        };
        let policies = [policy(&mut cloud, &k0), policy(&mut cloud, &k1)];
        let replicas = [signed(&k0, 1, "x"), signed(&k1, 2, "z")];
        let channels = [ChannelKey::from(DeviceId::of(&k0)), ChannelKey::from(DeviceId::of(&k1))];
        Self { keys: [k0, k1, c1], folder, dirs: [d0, d1], policies, channels, replicas }
    }
}

/// Pairs `new` into `user` through `existing`, as the two devices would.
fn pair_a2(dir: &mut Directory, existing: &DeviceKey, new: &DeviceKey, user: UserId) {
    let (nonce_existing, nonce_new) = ([7u8; 32], [9u8; 32]);
    let new_id = DeviceId::of(new);
    let commitment = pairing_commitment(&new_id, &nonce_new);
    let code = short_code(&DeviceId::of(existing), &new_id, &nonce_existing, &nonce_new);
    let pairing =
        pair_new_device(new, user, DeviceId::of(existing), nonce_existing, nonce_new, code).unwrap();
    dir.add_paired_device(existing, user, commitment, pairing, code, 21).unwrap();
}

/// One device: 0 initiates, 1 responds.
#[derive(Clone)]
struct Node {
    /// Shared between states until a step changes them (most steps do not).
    dir: Arc<Directory>,
    replica: Arc<Replica>,
    now: Micros,
    /// Sessions by id (the responder makes one per `DirHello` of a new id). `now` is this
    /// device's clock (under fair delivery the two run together).
    sessions: BTreeMap<u64, AuthSession>,
    writes_left: u8,
}

#[derive(Clone)]
pub struct State {
    nodes: [Node; 2],
    /// Messages in flight: (to, bytes), sorted, duplicates kept.
    net: Vec<(u8, Arc<Vec<u8>>)>,
    lose: u8,
    duplicate: u8,
    corrupt: u8,
    early_timers: u8,
    sessions_started: u8,
    sessions_done: u8,
    /// What the initiator kept from its last finished session with the peer.
    retained: Retained,
    /// Violations found while stepping (checked by the `always` properties).
    pub cursor_skipped: Option<String>,
    pub half_applied: Option<String>,
}

impl Hash for State {
    fn hash<H: Hasher>(&self, h: &mut H) {
        for n in &self.nodes {
            n.dir.digest().hash(h);
            n.replica.digest().hash(h);
            n.replica.cursor().hash(h);
            for c in n.replica.log_since(Default::default()) {
                (c.seq, c.fp, c.local).hash(h);
                // Which versions a peer is sent depends on where each entered.
                n.replica.arrivals(c.item.id()).hash(h);
            }
            // Absolute time is left out: the sessions hash their deadlines relative to it.
            n.writes_left.hash(h);
            for (id, session) in &n.sessions {
                id.hash(h);
                session.hash_state(n.now, h);
            }
        }
        self.net.hash(h);
        (
            self.lose,
            self.duplicate,
            self.corrupt,
            self.early_timers,
            self.sessions_started,
            self.sessions_done,
        )
            .hash(h);
        self.retained.hash(h);
        (&self.cursor_skipped, &self.half_applied).hash(h);
    }
}

impl State {
    /// A 128-bit digest of [`Hash`]'s canonical form: states are equal when it is.
    fn fingerprint(&self) -> (u64, u64) {
        let mut a = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut a);
        let mut b = std::collections::hash_map::DefaultHasher::new();
        0xfeed_u16.hash(&mut b);
        self.hash(&mut b);
        (a.finish(), b.finish())
    }
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint() == other.fingerprint()
    }
}

impl Eq for State {}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, n) in self.nodes.iter().enumerate() {
            writeln!(
                f,
                "node {i}: now {} replica {} items digest {:016x} cursor {:?}; sessions {:?}",
                n.now,
                n.replica.len(),
                n.replica.digest(),
                n.replica.cursor(),
                n.sessions.iter().map(|(id, s)| (*id, s.outcome())).collect::<Vec<_>>()
            )?;
        }
        writeln!(f, "in flight: {:?}", self.net.iter().map(|(to, b)| (*to, b.len())).collect::<Vec<_>>())?;
        write!(
            f,
            "retained {:?}; skipped {:?}; half {:?}",
            self.retained, self.cursor_skipped, self.half_applied
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Start,
    Deliver(usize),
    Lose(usize),
    Duplicate(usize),
    /// Deliver message `.0` with one byte flipped (`.1`: 0 in the middle, 1 the last byte).
    Corrupt(usize, u8),
    Timeout(u8),
    Write(u8),
}

fn running(o: &Outcome) -> bool {
    matches!(o, Outcome::Running)
}

impl ProtocolModel {
    pub fn new(variant: Variant, faults: Faults, writes: u8, sessions: u8) -> Self {
        let cfg = Config {
            max_retries: 2,
            rto_us: 100_000,
            rto_max_us: 400_000,
            linger_us: 2_000_000,
            ..Config::default()
        };
        Self { variant, faults, writes, sessions, cfg, world: Arc::new(World::new(variant)) }
    }

    fn next_deadline(n: &Node) -> Option<Micros> {
        n.sessions.values().filter_map(|x| x.poll_timeout()).min()
    }

    fn initiator_busy(s: &State) -> bool {
        s.nodes[0].sessions.values().any(|x| running(&x.outcome()))
    }

    /// Moves what `node`'s sessions want to send into the network.
    fn pump(s: &mut State, node: usize) {
        let to = (1 - node) as u8;
        for session in s.nodes[node].sessions.values_mut() {
            while let Some(bytes) = session.poll_transmit() {
                s.net.push((to, Arc::new(bytes)));
            }
        }
        s.net.sort();
    }

    fn deliver(&self, s: &mut State, to: usize, bytes: &[u8]) {
        let max = self.cfg.max_message_bytes;
        let Ok(session_id) = engine::sync::Session::session_of(bytes, max) else { return };
        let node = &mut s.nodes[to];
        if !node.sessions.contains_key(&session_id) {
            // Only a `DirHello` makes a responder (as a device does); anything else for an
            // unknown session is dropped.
            if to != 1 || AuthSession::folder_of(bytes, max) != Some(self.world.folder) {
                return;
            }
            let session = AuthSession::respond(
                session_id,
                self.world.policies[1].clone(),
                self.world.channels[0],
                &node.replica,
                self.cfg.clone(),
            );
            node.sessions.insert(session_id, session);
        }
        let before = (node.replica.digest(), node.replica.cursor(), node.dir.digest());
        let was_running = running(&node.sessions[&session_id].outcome());
        let session = node.sessions.get_mut(&session_id).unwrap();
        let (mut dir, mut replica) = (node.dir.as_ref().clone(), node.replica.as_ref().clone());
        let result = session.handle_message(node.now, &mut dir, &mut replica, bytes);
        if dir.digest() != before.2 {
            node.dir = Arc::new(dir);
        }
        if (replica.digest(), replica.cursor()) != (before.0, before.1) {
            node.replica = Arc::new(replica);
        }
        if let Err(e) = &result {
            if (node.replica.digest(), node.replica.cursor()) != (before.0, before.1) {
                s.half_applied.get_or_insert(format!("node {to}: {e} but the replica changed"));
            }
        }
        if to == 0 && was_running {
            if let Outcome::Done { retained, .. } = session.outcome() {
                s.retained = retained;
                s.sessions_done += 1;
                Self::check_cursors(s);
            }
        }
        Self::pump(s, to);
    }

    /// No cursor skips a change: when the initiator finishes, everything of the responder's log
    /// up to the cursor it keeps (`peer_log`) is held by the initiator, and everything of its own
    /// log up to what the responder acknowledged (`acked`) is held by the responder.
    fn check_cursors(s: &mut State) {
        let pairs = [(s.retained.peer_log, 1usize, 0usize), (s.retained.acked, 0, 1)];
        for (cursor, from, to) in pairs {
            let Some(cursor) = cursor else { continue };
            let source = &s.nodes[from].replica;
            if cursor.epoch != source.epoch() {
                continue;
            }
            for change in source.log_since(Default::default()) {
                if change.seq > cursor.seq {
                    break;
                }
                let mut holder = s.nodes[to].replica.as_ref().clone();
                let digest = holder.digest();
                let changed = holder.merge(change.item).map(|_| holder.digest() != digest).unwrap_or(true);
                if changed {
                    s.cursor_skipped.get_or_insert(format!(
                        "node {to} holds a cursor at {:?} of node {from}'s log but lacks its change {:?}",
                        cursor.seq, change.seq
                    ));
                }
            }
        }
    }

    fn converged(s: &State) -> bool {
        s.nodes[0].replica.digest() == s.nodes[1].replica.digest()
    }
}

impl Model for ProtocolModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let w = &self.world;
        let node = |i: usize| Node {
            dir: Arc::new(w.dirs[i].clone()),
            replica: Arc::new(w.replicas[i].clone()),
            now: T0 + 1,
            sessions: BTreeMap::new(),
            writes_left: if self.variant == Variant::Members { self.writes } else { 0 },
        };
        vec![State {
            nodes: [node(0), node(1)],
            net: Vec::new(),
            lose: self.faults.lose,
            duplicate: self.faults.duplicate,
            corrupt: self.faults.corrupt,
            early_timers: self.faults.early_timers,
            sessions_started: 0,
            sessions_done: 0,
            retained: Retained::default(),
            cursor_skipped: None,
            half_applied: None,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.cursor_skipped.is_some() || s.half_applied.is_some() {
            return;
        }
        let first = s.sessions_started == 0;
        let needed = first || !Self::converged(s) || s.nodes.iter().any(|n| n.writes_left > 0);
        if !Self::initiator_busy(s) && s.sessions_started < self.sessions && needed {
            actions.push(Action::Start);
        }
        for i in 0..s.net.len() {
            if i > 0 && s.net[i] == s.net[i - 1] {
                continue; // the same message twice: one choice
            }
            actions.push(Action::Deliver(i));
            if s.lose > 0 {
                actions.push(Action::Lose(i));
            }
            if s.duplicate > 0 {
                actions.push(Action::Duplicate(i));
            }
            if s.corrupt > 0 {
                actions.push(Action::Corrupt(i, 1));
            }
        }
        // Timers: under fair delivery only while nothing is in flight, and in the order of one
        // shared clock (the earliest deadline first); otherwise any device's earliest timer (each
        // device's clock is its own, so any order of the two devices' timers), while messages are
        // in flight only within the `early_timers` budget.
        let deadlines: Vec<Option<Micros>> = s.nodes.iter().map(Self::next_deadline).collect();
        let earliest = deadlines.iter().flatten().min().copied();
        let early_allowed = !self.faults.timely && s.early_timers > 0;
        if s.net.is_empty() || early_allowed {
            for (i, d) in deadlines.iter().enumerate() {
                if d.is_some() && (!self.faults.timely || *d == earliest) {
                    actions.push(Action::Timeout(i as u8));
                }
            }
        }
        // A write may come at any moment while another session is still to start, so the last
        // session starts after the last write (fairness: writes do not go on forever).
        for (i, n) in s.nodes.iter().enumerate() {
            if n.writes_left > 0 && s.sessions_started < self.sessions {
                actions.push(Action::Write(i as u8));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Start => {
                s.sessions_started += 1;
                let id = u64::from(s.sessions_started);
                let n = &mut s.nodes[0];
                let session = AuthSession::initiate(
                    id,
                    n.now,
                    self.world.folder,
                    self.world.policies[0].clone(),
                    self.world.channels[1],
                    &n.dir,
                    &n.replica,
                    self.cfg.clone(),
                    s.retained,
                );
                n.sessions.insert(id, session);
                Self::pump(&mut s, 0);
            }
            Action::Deliver(i) => {
                let (to, bytes) = s.net.remove(i);
                self.deliver(&mut s, to as usize, &bytes);
            }
            Action::Lose(i) => {
                s.net.remove(i);
                s.lose -= 1;
            }
            Action::Duplicate(i) => {
                let m = s.net[i].clone();
                s.net.push(m);
                s.net.sort();
                s.duplicate -= 1;
            }
            Action::Corrupt(i, at) => {
                let (to, bytes) = s.net.remove(i);
                let mut bytes = bytes.as_ref().clone();
                let at = if at == 0 { bytes.len() / 2 } else { bytes.len() - 1 };
                bytes[at] ^= 0x20;
                s.corrupt -= 1;
                self.deliver(&mut s, to as usize, &bytes);
            }
            Action::Timeout(i) => {
                let next = Self::next_deadline(&s.nodes[i as usize])?;
                if !s.net.is_empty() {
                    s.early_timers -= 1;
                }
                if self.faults.timely {
                    for n in &mut s.nodes {
                        n.now = n.now.max(next);
                    }
                }
                let n = &mut s.nodes[i as usize];
                n.now = n.now.max(next);
                let now = n.now;
                for x in n.sessions.values_mut() {
                    x.handle_timeout(now);
                }
                Self::pump(&mut s, i as usize);
            }
            Action::Write(i) => {
                let n = &mut s.nodes[i as usize];
                n.writes_left -= 1;
                let k = &self.world.keys[i as usize];
                let id = format!("w{i}{}", n.writes_left);
                let stamp = 100 + i64::from(n.writes_left) + 10 * i64::from(i);
                Arc::make_mut(&mut n.replica)
                    .change_signed(&ItemId::new(&id).unwrap(), k, &when(stamp), &edit(&id))
                    .unwrap();
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut p = vec![
            Property::<Self>::always("no cursor skips a change", |_, s: &State| s.cursor_skipped.is_none()),
            Property::<Self>::always("no message is half applied", |_, s: &State| s.half_applied.is_none()),
            Property::<Self>::always("every session ends", |m: &Self, s: &State| {
                let mut next = Vec::new();
                m.actions(s, &mut next);
                !next.is_empty()
                    || s.nodes.iter().all(|n| n.sessions.values().all(|x| !running(&x.outcome())))
            }),
        ];
        match self.variant {
            Variant::Members => {
                if self.faults.timely && self.faults.lose == 0 && self.faults.corrupt == 0 {
                    p.push(Property::<Self>::always(
                        "under fair delivery sessions end Done and replicas converge",
                        |m: &Self, s: &State| {
                            let mut next = Vec::new();
                            m.actions(s, &mut next);
                            !next.is_empty()
                                || (Self::converged(s)
                                    && s.nodes[0]
                                        .sessions
                                        .values()
                                        .all(|x| matches!(x.outcome(), Outcome::Done { .. })))
                        },
                    ));
                }
                if self.sessions >= 2 {
                    p.push(Property::<Self>::sometimes(
                        "an incremental session completes",
                        |_, s: &State| s.sessions_done >= 2,
                    ));
                }
                p.push(Property::<Self>::sometimes("a session completes", |_, s: &State| {
                    s.sessions_done >= 1
                }));
            }
            Variant::Outsider | Variant::Removed => {
                p.push(Property::<Self>::always(
                    "nothing moves without authorization",
                    |m: &Self, s: &State| {
                        (0..2).all(|i| s.nodes[i].replica.digest() == m.world.replicas[i].digest())
                    },
                ));
                p.push(Property::<Self>::sometimes("the session is refused", |_, s: &State| {
                    s.nodes[0].sessions.values().any(|x| matches!(x.outcome(), Outcome::Failed(_)))
                }));
            }
        }
        p
    }
}

/// One configuration of the model: a world and the budgets that bound it.
#[derive(Clone, Debug)]
pub struct Configuration {
    pub name: &'static str,
    pub variant: Variant,
    pub faults: Faults,
    /// Local writes each member may make, at any moment.
    pub writes: u8,
    /// Sessions the initiator may start, one after the other.
    pub sessions: u8,
    /// Steps from the start beyond which the search does not go (`None`: every reachable state).
    pub max_depth: Option<usize>,
}

impl Configuration {
    pub fn model(&self) -> ProtocolModel {
        ProtocolModel::new(self.variant, self.faults, self.writes, self.sessions)
    }
}

const fn faults(lose: u8, duplicate: u8, corrupt: u8, early_timers: u8, timely: bool) -> Faults {
    Faults { lose, duplicate, corrupt, early_timers, timely }
}

/// The configurations at a bound: `small` is what the default suite checks, `large` what
/// `feedmesh-model --bound large` checks (the figures in proofs/README.md).
pub fn configurations(large: bool) -> Vec<Configuration> {
    let (w, extra) = if large { (1, 1) } else { (1, 0) };
    vec![
        Configuration {
            name: "members, fair delivery",
            variant: Variant::Members,
            faults: faults(0, 1, 0, 0, true),
            writes: w,
            sessions: w + 2,
            max_depth: None,
        },
        Configuration {
            name: "members, loss, duplication, early timers",
            variant: Variant::Members,
            faults: faults(1, 1, 0, 1, false),
            writes: extra,
            sessions: 1 + extra,
            max_depth: None,
        },
        Configuration {
            name: "outsider",
            variant: Variant::Outsider,
            faults: faults(1, 1, 1, 1, false),
            writes: 0,
            sessions: 1,
            max_depth: None,
        },
        Configuration {
            name: "removed member",
            variant: Variant::Removed,
            faults: faults(1, 1, 1, 1, false),
            writes: 0,
            sessions: 1,
            max_depth: None,
        },
    ]
    .into_iter()
    .chain(large.then_some(Configuration {
        name: "members, one corrupted message",
        variant: Variant::Members,
        faults: faults(0, 0, 1, 0, false),
        writes: 0,
        sessions: 1,
        max_depth: None,
    }))
    .collect()
}

/// What checking one configuration found.
#[derive(Clone, Debug)]
pub struct Report {
    pub name: &'static str,
    pub distinct_states: usize,
    pub generated_states: usize,
    pub max_depth: usize,
    pub seconds: f64,
    /// Each property and whether it held (`sometimes` ones: whether an example was found).
    pub properties: Vec<(&'static str, bool)>,
    /// The first property that failed, with the path to it.
    pub counterexample: Option<String>,
}

/// Checks one configuration exhaustively (depth first, `threads` threads).
pub fn check(config: &Configuration, threads: usize) -> Report {
    check_model(config.name, config.model(), threads, config.max_depth)
}

pub fn check_model(
    name: &'static str,
    model: ProtocolModel,
    threads: usize,
    max_depth: Option<usize>,
) -> Report {
    let started = std::time::Instant::now();
    let props: Vec<(&'static str, bool)> = model
        .properties()
        .iter()
        .map(|p| (p.name, p.expectation == stateright::Expectation::Sometimes))
        .collect();
    // Depth first: the checker keeps fingerprints of the states it saw and the current path only.
    // With a depth bound the search is partial (a state first met deeper than the bound is not
    // expanded, even if it is also reachable within it): for exploring, not for the tables.
    match max_depth {
        None => report(name, started, props, model.checker().threads(threads).spawn_dfs().join()),
        Some(depth) => report(
            name,
            started,
            props,
            model.checker().threads(threads).target_max_depth(depth).spawn_dfs().join(),
        ),
    }
}

fn report(
    name: &'static str,
    started: std::time::Instant,
    props: Vec<(&'static str, bool)>,
    checker: impl Checker<ProtocolModel>,
) -> Report {
    let mut properties = Vec::new();
    let mut counterexample = None;
    for (prop, sometimes) in props {
        let found = checker.discovery(prop);
        let holds = if sometimes { found.is_some() } else { found.is_none() };
        if !holds && counterexample.is_none() {
            counterexample = Some(match found {
                Some(path) => {
                    format!("{prop}: {:?}\nlast state:\n{:?}", path.clone().into_actions(), path.last_state())
                }
                None => format!("{prop}: no example found"),
            });
        }
        properties.push((prop, holds));
    }
    Report {
        name,
        distinct_states: checker.unique_state_count(),
        generated_states: checker.state_count(),
        max_depth: checker.max_depth(),
        seconds: started.elapsed().as_secs_f64(),
        properties,
        counterexample,
    }
}

//! The fixed world every target runs against, built once per process and deterministically, so
//! that messages recorded from real sessions (the seed corpora, `examples/seeds.rs`) replay
//! byte for byte into a fresh target: the same keys, directory, folder, tickets and replicas.
//!
//! Alice (devices a1, a2) owns folder F; Bob (b1) is an active member; Carol (c1) is a user who
//! is not a member; F is mapped on a1, a2 and b1 (the mesh tests' world). The cloud's ticket key
//! is `key(200)`; `key(99)` is a stranger nobody knows.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use engine::authz::{AuthSession, Credentials, Policy};
use engine::directory::{
    pair_new_device, pairing_commitment, short_code, Directory, FolderId, Op, Role, SignedChange, UserId,
};
use engine::feedsync::{Content, Edit, Endpoint, ItemId, When};
use engine::loopback::{self, Authorized, Clean, Direction, Plain};
use engine::replica::Replica;
use engine::signing::{DeviceId, DeviceKey};
use engine::sync::{Config, Micros, Outcome, Retained};
use engine::ticket::{ChannelKey, Ticket, TicketAuthority};

/// The clock at which every target starts (tickets are issued then).
pub const T0: Micros = 1_000_000_000_000;
/// The session id of every fixture session (a recorded message names it).
pub const SESSION: u64 = 9;
/// Most steps a fixture session takes before it is declared stuck.
const PUMP_MAX: u32 = 256;

/// A device key from a one-byte seed.
pub fn key(n: u8) -> DeviceKey {
    DeviceKey::from_bytes(&[n; 32])
}

/// The names of the world's device keys, in the order of [`World::keys`].
pub const NAMES: [&str; 6] = ["a1", "a2", "b1", "c1", "cloud", "stranger"];

#[derive(Debug)]
pub struct World {
    /// a1, a2, b1, c1, the cloud, a stranger (see [`NAMES`]).
    pub keys: Vec<DeviceKey>,
    pub dir: Directory,
    /// Every change of `dir`, in the order they were made.
    pub changes: Vec<SignedChange>,
    pub folder: FolderId,
    /// Tickets issued at [`T0`] by the cloud for a1, a2, b1 and c1, bound to their own keys.
    pub tickets: BTreeMap<&'static str, Ticket>,
}

impl World {
    fn build() -> Self {
        let keys: Vec<DeviceKey> = [1u8, 2, 3, 4, 200, 99].into_iter().map(key).collect();
        let (a1, a2, b1, c1) = (&keys[0], &keys[1], &keys[2], &keys[3]);
        let mut dir = Directory::new();
        let mut changes = Vec::new();
        let make =
            |dir: &mut Directory, changes: &mut Vec<SignedChange>, k: &DeviceKey, when: i64, op: Op| {
                // The fixture's changes are all entitled (the mesh tests make the same ones).
                let change = dir.make(k, when, op).expect("fixture change is entitled");
                changes.push(change.clone());
                change
            };
        make(&mut dir, &mut changes, a1, 1, Op::CreateUser { name: "alice".into() });
        make(&mut dir, &mut changes, b1, 2, Op::CreateUser { name: "bob".into() });
        make(&mut dir, &mut changes, c1, 3, Op::CreateUser { name: "carol".into() });
        let alice = UserId::of_first_device(DeviceId::of(a1));
        let (nonce_existing, nonce_new) = ([7u8; 32], [9u8; 32]);
        let code = short_code(&DeviceId::of(a1), &DeviceId::of(a2), &nonce_existing, &nonce_new);
        let pairing = pair_new_device(a2, alice, DeviceId::of(a1), nonce_existing, nonce_new, code)
            .expect("the code is the pairing's own");
        let commitment = pairing_commitment(&DeviceId::of(a2), &nonce_new);
        let added =
            dir.add_paired_device(a1, alice, commitment, pairing, code, 4).expect("fixture pairing is valid");
        changes.push(added);
        let folder =
            make(&mut dir, &mut changes, a1, 5, Op::CreateFolder { name: "photos".into() }).folder_id();
        let bob = UserId::of_first_device(DeviceId::of(b1));
        let invite =
            make(&mut dir, &mut changes, a1, 6, Op::Invite { folder, invitee: bob, role: Role::Member })
                .invite_id();
        make(&mut dir, &mut changes, b1, 7, Op::Accept { invitation: invite });
        for k in [a1, a2, b1] {
            make(&mut dir, &mut changes, k, 8, Op::Map { folder });
        }
        let mut cloud = TicketAuthority::new(keys[4].clone());
        let mut tickets = BTreeMap::new();
        for (name, k) in NAMES.iter().zip(&keys).take(4) {
            let device = DeviceId::of(k);
            tickets.insert(*name, cloud.issue_from(&dir, device, device.into(), T0));
        }
        Self { keys, dir, changes, folder, tickets }
    }

    /// The key of a device by name ([`NAMES`]).
    pub fn key(&self, name: &str) -> &DeviceKey {
        let i = NAMES.iter().position(|n| *n == name).unwrap_or(NAMES.len() - 1);
        &self.keys[i]
    }

    pub fn device(&self, name: &str) -> DeviceId {
        DeviceId::of(self.key(name))
    }

    pub fn channel(&self, name: &str) -> ChannelKey {
        self.device(name).into()
    }

    pub fn cloud(&self) -> DeviceId {
        self.device("cloud")
    }

    /// The authorized-session policy of device `name` (its ticket, the cloud's key).
    pub fn policy(&self, name: &str) -> Policy {
        let ticket = self.tickets.get(name).cloned().unwrap_or_else(|| self.tickets["c1"].clone());
        Policy::Directory(Box::new(Credentials { device: self.device(name), ticket, cloud: self.cloud() }))
    }
}

/// The world (built on first use).
pub fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(World::build)
}

/// Session settings of every fixture session: the engine's defaults (what the binaries use, but
/// for the stream timers).
pub fn config() -> Config {
    Config::default()
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
    // 2023-11-14 plus a few seconds: a valid time.
    When::from_unix_secs(1_700_000_000 + secs).expect("a 2023 time is valid")
}

fn id(text: &str) -> ItemId {
    ItemId::new(text).expect("fixture ids are valid")
}

/// Two replicas of one feed before and after a first session between them.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Before any session: shared items, items only one side has, one concurrent edit.
    pub a: Replica,
    pub b: Replica,
    /// After a clean full session between `a` and `b` and a new change on each side; `retained`
    /// is what `a` kept of it, so the next session from `a` is incremental.
    pub later_a: Replica,
    pub later_b: Replica,
    pub retained: Retained,
}

/// The unsigned pair (plain FeedSync) and the signed one (F's devices, signatures bound to F).
#[derive(Debug)]
pub struct Pairs {
    pub plain: Pair,
    pub signed: Pair,
}

impl Pairs {
    pub fn get(&self, signed: bool) -> &Pair {
        if signed {
            &self.signed
        } else {
            &self.plain
        }
    }
}

fn plain_pair() -> Pair {
    let (mut a, mut b) = (Replica::new(1), Replica::new(2));
    let origin = Endpoint::new("origin").expect("valid endpoint");
    let (ea, eb) = (Endpoint::new("a").expect("valid"), Endpoint::new("b").expect("valid"));
    let mut base = Replica::new(0);
    for i in 0..4 {
        let name = format!("c{i}");
        base.change(&id(&name), &origin, &when(0), &edit(&name)).expect("unsigned change");
    }
    for item in base.items() {
        a.merge(item).expect("unsigned merge");
        b.merge(item).expect("unsigned merge");
    }
    a.change(&id("a0"), &ea, &when(10), &edit("a0")).expect("unsigned change");
    a.change(&id("c0"), &ea, &when(11), &edit("edit a")).expect("unsigned change");
    b.change(&id("b0"), &eb, &when(12), &edit("b0")).expect("unsigned change");
    b.change(&id("c0"), &eb, &when(13), &edit("edit b")).expect("unsigned change");
    b.change(&id("c1"), &eb, &when(14), &Edit { delete: true, ..Edit::default() }).expect("delete");
    let (mut later_a, mut later_b) = (a.clone(), b.clone());
    let (outcome, _) = run_plain(&mut later_a, &mut later_b, Retained::default());
    let retained = match outcome {
        Outcome::Done { retained, .. } => retained,
        _ => Retained::default(),
    };
    later_a.change(&id("a1"), &ea, &when(20), &edit("a1")).expect("unsigned change");
    later_b.change(&id("c2"), &eb, &when(21), &edit("again b")).expect("unsigned change");
    Pair { a, b, later_a, later_b, retained }
}

fn signed_pair(w: &World) -> Pair {
    let scope = w.folder.scope();
    let (mut a, mut b) = (Replica::new_signed(3, scope), Replica::new_signed(4, scope));
    let mut base = Replica::new_signed(0, scope);
    for (i, name) in ["x", "y"].into_iter().enumerate() {
        base.change_signed(&id(name), w.key("a1"), &when(i as i64), &edit(name)).expect("signed change");
    }
    for item in base.items() {
        a.merge(item).expect("verified merge");
        b.merge(item).expect("verified merge");
    }
    a.change_signed(&id("ax"), w.key("a1"), &when(10), &edit("ax")).expect("signed change");
    a.change_signed(&id("x"), w.key("a2"), &when(11), &edit("x by a2")).expect("signed change");
    b.change_signed(&id("bz"), w.key("b1"), &when(12), &edit("bz")).expect("signed change");
    b.change_signed(&id("x"), w.key("b1"), &when(13), &edit("x by b1")).expect("signed change");
    let (mut later_a, mut later_b) = (a.clone(), b.clone());
    let (outcome, _) = run_plain(&mut later_a, &mut later_b, Retained::default());
    let retained = match outcome {
        Outcome::Done { retained, .. } => retained,
        _ => Retained::default(),
    };
    later_a.change_signed(&id("a-later"), w.key("a1"), &when(20), &edit("later")).expect("signed change");
    later_b.change_signed(&id("y"), w.key("b1"), &when(21), &edit("y by b1")).expect("signed change");
    Pair { a, b, later_a, later_b, retained }
}

/// The replica pairs (built on first use).
pub fn pairs() -> &'static Pairs {
    static PAIRS: OnceLock<Pairs> = OnceLock::new();
    PAIRS.get_or_init(|| Pairs { plain: plain_pair(), signed: signed_pair(world()) })
}

/// Builds every fixture now, so that a measured input is not charged for it.
pub fn prepare() {
    let _ = world();
    let _ = pairs();
}

/// One message of a recorded session: whether it went from the initiator to the responder, and
/// its bytes.
pub type Transcript = Vec<(bool, Vec<u8>)>;

/// The clean channel of every fixture session: from [`T0`], a millisecond a message, at most
/// [`PUMP_MAX`] rounds.
fn clean() -> Clean {
    Clean { now: T0, step_us: 1_000, rounds_max: PUMP_MAX }
}

/// Runs a plain session from `a` to `b` on a clean channel (no loss, no timers) and returns the
/// initiator's outcome and every message.
pub fn run_plain(a: &mut Replica, b: &mut Replica, retained: Retained) -> (Outcome, Transcript) {
    let cfg = config();
    let mut si = Plain::initiate(SESSION, T0, a, cfg.clone(), retained);
    let mut sr = Plain::respond(SESSION, b, cfg);
    let mut transcript = Vec::new();
    loopback::run_clean(&mut si, &mut sr, clean(), |to, m| {
        transcript.push((to == Direction::ToResponder, m))
    });
    (si.session.outcome().clone(), transcript)
}

/// Runs an authorized session from device `initiator` (with `a`, `dir_a`) to device `responder`
/// (with `b`, `dir_b`) on a clean channel; each side sees the other's own channel key.
#[allow(clippy::too_many_arguments)]
pub fn run_auth(
    initiator: &str,
    a: &mut Replica,
    dir_a: &mut Directory,
    responder: &str,
    b: &mut Replica,
    dir_b: &mut Directory,
    retained: Retained,
) -> (Outcome, Outcome, Transcript) {
    let w = world();
    let cfg = config();
    let session = AuthSession::initiate(
        SESSION,
        T0,
        w.folder,
        w.policy(initiator),
        w.channel(responder),
        dir_a,
        a,
        cfg.clone(),
        retained,
    );
    let mut si = Authorized { session, directory: dir_a, replica: a };
    let session = AuthSession::respond(SESSION, w.policy(responder), w.channel(initiator), b, cfg);
    let mut sr = Authorized { session, directory: dir_b, replica: b };
    let mut transcript = Vec::new();
    loopback::run_clean(&mut si, &mut sr, clean(), |to, m| {
        transcript.push((to == Direction::ToResponder, m))
    });
    (si.session.outcome(), sr.session.outcome(), transcript)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_world_is_deterministic_and_sessions_converge() {
        let w = world();
        assert_eq!(w.dir.len(), w.changes.len());
        assert!(w.dir.may_sync(&w.folder, &w.device("a1"), &w.device("b1")).is_ok());
        assert!(w.dir.may_sync(&w.folder, &w.device("a1"), &w.device("c1")).is_err());
        assert_eq!(World::build().dir.digest(), w.dir.digest());
        for signed in [false, true] {
            let p = pairs().get(signed);
            assert_ne!(p.a.digest(), p.b.digest());
            let (mut a, mut b) = (p.later_a.clone(), p.later_b.clone());
            let (outcome, transcript) = run_plain(&mut a, &mut b, p.retained);
            assert!(matches!(outcome, Outcome::Done { .. }), "{outcome:?}");
            assert_eq!(a.digest(), b.digest());
            // Incremental: one round trip.
            assert_eq!(transcript.len(), 2, "signed {signed}");
        }
    }

    #[test]
    fn authorized_sessions_between_members_converge() {
        let w = world();
        let p = &pairs().signed;
        let (mut a, mut b) = (p.a.clone(), p.b.clone());
        let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
        let (i, r, transcript) = run_auth("a1", &mut a, &mut da, "b1", &mut b, &mut db, Retained::default());
        assert!(matches!(i, Outcome::Done { .. }), "{i:?}");
        assert!(matches!(r, Outcome::Done { .. }), "{r:?}");
        assert_eq!(a.digest(), b.digest());
        assert!(transcript.len() >= 4);
    }
}
